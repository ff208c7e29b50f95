//! Gradient checkpointing: a scope that saves only its inputs and recomputes its ops during backward.
//!
//! The scope's closure runs twice: once without recording (forward), and again on a fresh tape inside
//! backward, whose records are consumed immediately. So the closure must be a pure function of its inputs and
//! the parameters it captures: randomness (dropout) must come from a seed it captured, never from shared state.

use crate::tape::{Backward, SavedBytes, Tape, Var};
use qlora_runtime::op::{backward_fn, bytes};
use qlora_runtime::{Error, Result, Tensor};
use std::sync::Arc;

/// The scope's backward: recompute `f` on a fresh tape from the saved inputs, then backpropagate the output
/// gradients through it. Tensors the recompute saves count against the outer tape's saved bytes while they live.
fn recompute<F>(f: F, inputs: Vec<Tensor>, needs_grad: Vec<bool>, saved: Arc<SavedBytes>) -> Box<dyn Backward>
where
    F: Fn(&Tape, &[Var]) -> Result<Vec<Var>> + 'static,
{
    backward_fn("checkpoint", bytes(&inputs), move |grads| {
        let tape = Tape::with_saved_bytes(saved);
        let vars: Vec<Var> = inputs
            .into_iter()
            .zip(&needs_grad)
            .map(|(t, &need)| if need { tape.input(t) } else { Var::constant(t) })
            .collect();
        let outs = f(&tape, &vars)?;
        if outs.len() != grads.len() {
            return Err(Error::invalid("checkpoint", "the scope returned a different number of outputs on recompute"));
        }
        let seeds: Vec<(&Var, Tensor)> = outs.iter().zip(grads).filter_map(|(o, g)| Some((o, g.clone()?))).collect();
        let mut reached = tape.backward_with(&seeds)?;
        Ok(vars.iter().map(|v| v.id().and_then(|id| reached.remove(&id))).collect())
    })
}

impl Tape {
    /// Runs `f` on `inputs` as one recorded op that saves only the inputs; its internals are recomputed in
    /// backward. Trainable parameters that `f` reaches through [`Tape::param`] get their gradients then.
    pub fn checkpoint<F>(&self, inputs: &[&Var], f: F) -> Result<Vec<Var>>
    where
        F: Fn(&Tape, &[Var]) -> Result<Vec<Var>> + 'static,
    {
        if !self.is_recording() {
            let vars: Vec<Var> = inputs.iter().map(|&v| v.clone()).collect();
            return f(self, &vars);
        }
        let constants: Vec<Var> = inputs.iter().map(|v| Var::constant(v.value().clone())).collect();
        let (outs, reaches_params) = self.watch_trainable(|| self.no_grad(|| f(self, &constants)));
        let outs = outs?;
        let op = recompute(
            f,
            inputs.iter().map(|v| v.value().clone()).collect(),
            inputs.iter().map(|v| v.requires_grad()).collect(),
            self.saved_bytes().clone(),
        );
        let values = outs.into_iter().map(|v| v.value().clone()).collect();
        let needed = reaches_params || inputs.iter().any(|v| v.requires_grad());
        Ok(self.record_if(needed, op, inputs, values))
    }
}
