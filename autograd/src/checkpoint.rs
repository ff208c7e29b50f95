//! Gradient checkpointing: a scope that saves only its inputs and recomputes its ops during backward.
//!
//! The scope's closure runs twice: once without recording (forward), and again on a fresh tape inside
//! backward, whose records are consumed immediately. So the closure must be a pure function of its inputs and
//! the parameters it captures: randomness (dropout) must come from a seed it captured, never from shared state.
//!
//! A scope may keep its inputs in host memory instead ([`Tape::checkpoint_offloaded`]): a chain of scopes (the
//! first decoder layers, or all of them) then holds almost nothing on the device between forward and backward,
//! each scope's backward starting the copy back of the previous scope's inputs so that it runs under its own
//! recompute.

use crate::tape::{Backward, SavedBytes, Tape, Var};
use qlora_runtime::offload::Offloaded;
use qlora_runtime::op::{backward_fn, bytes};
use qlora_runtime::{DType, Device, Error, Result, Tensor};
use std::rc::Rc;
use std::sync::Arc;

/// Where a scope's inputs wait for its backward.
enum Kept {
    Device(Vec<Tensor>),
    /// In host memory; `prefetch` are the previous scope's inputs, whose copy back this backward starts first.
    Host {
        inputs: Vec<Rc<Offloaded>>,
        prefetch: Vec<Rc<Offloaded>>,
    },
}

impl Kept {
    /// Bytes held where the scope computes until backward.
    fn device_bytes(&self) -> usize {
        match self {
            Kept::Device(inputs) => bytes(inputs),
            Kept::Host { inputs, .. } => inputs.iter().map(|i| i.resident_bytes()).sum(),
        }
    }

    fn take(self) -> Result<Vec<Tensor>> {
        match self {
            Kept::Device(inputs) => Ok(inputs),
            Kept::Host { inputs, prefetch } => {
                // This scope's own copies first (started a scope earlier unless this is the chain's last), then the
                // previous scope's behind them on the copy stream, so that waiting for ours never waits for theirs.
                for i in inputs.iter().chain(&prefetch) {
                    i.prefetch()?;
                }
                inputs.iter().map(|i| i.restore()).collect()
            }
        }
    }
}

/// The scope's backward: recompute `f` on a fresh tape from the kept inputs, then backpropagate the output
/// gradients through it. Tensors the recompute saves count against the outer tape's saved bytes while they live.
fn recompute<F>(f: F, kept: Kept, needs_grad: Vec<bool>, saved: Arc<SavedBytes>) -> Box<dyn Backward>
where
    F: Fn(&Tape, &[Var]) -> Result<Vec<Var>> + 'static,
{
    backward_fn("checkpoint", kept.device_bytes(), move |grads| {
        let tape = Tape::for_recompute(saved);
        let vars: Vec<Var> = kept
            .take()?
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
        self.scope(inputs, f, Kept::Device(inputs.iter().map(|v| v.value().clone()).collect()))
    }

    /// [`Tape::checkpoint`] with the inputs kept in host memory until backward (pinned, copied on a second stream:
    /// `qlora_runtime::offload`): their copy out starts before the scope's forward and is fenced after it, so it
    /// runs under that forward and the device copies can go as soon as nothing else holds them. `previous` are the
    /// handles the previous scope of a chain returned: this scope's backward starts their copy back before its own
    /// recompute. Returns the outputs and this scope's handles, for the next scope. Without recording it is
    /// [`Tape::checkpoint`]'s plain call, and returns no handles.
    pub fn checkpoint_offloaded<F>(
        &self,
        inputs: &[&Var],
        previous: Vec<Rc<Offloaded>>,
        f: F,
    ) -> Result<(Vec<Var>, Vec<Rc<Offloaded>>)>
    where
        F: Fn(&Tape, &[Var]) -> Result<Vec<Var>> + 'static,
    {
        if !self.is_recording() {
            return Ok((self.checkpoint(inputs, f)?, Vec::new()));
        }
        let handles: Vec<Rc<Offloaded>> =
            inputs.iter().map(|v| Offloaded::new(v.value()).map(Rc::new)).collect::<Result<_>>()?;
        let outs = self.scope(inputs, f, Kept::Host { inputs: handles.clone(), prefetch: previous })?;
        for h in &handles {
            h.release()?;
        }
        Ok((outs, handles))
    }

    /// [`Tape::checkpoint`] of a scope inside a recompute ([`Tape::recomputing`]) whose outputs nothing reads but
    /// ops whose backward reads no values (adds, concatenation) on the way to the recompute's result: `f` does not
    /// run now, zeros of `outputs` (shape and dtype each, on the first input's device) stand in for its values, and
    /// it runs once, recorded, in backward as every scope does. A layer's recompute records its MLP blocks so: their
    /// forward would compute values only the layer's unread output depends on. An error on any other tape.
    pub fn checkpoint_unread<F>(&self, inputs: &[&Var], outputs: &[(&[usize], DType)], f: F) -> Result<Vec<Var>>
    where
        F: Fn(&Tape, &[Var]) -> Result<Vec<Var>> + 'static,
    {
        if !self.recomputing() || !self.is_recording() {
            return Err(Error::invalid("checkpoint", "a scope recorded unread outside a recording recompute"));
        }
        let device = inputs.first().map_or(Device::Cpu, |v| v.value().device());
        let values =
            outputs.iter().map(|(shape, dtype)| Tensor::zeros_on(shape, *dtype, device)).collect::<Result<_>>()?;
        let kept = Kept::Device(inputs.iter().map(|v| v.value().clone()).collect());
        let op = recompute(f, kept, inputs.iter().map(|v| v.requires_grad()).collect(), self.saved_bytes().clone());
        // Whether `f` reaches a trainable parameter is unknown without running it: recorded as if it does (the
        // scopes this serves hold adapters; one that holds none costs a recompute whose gradients go nowhere).
        Ok(self.record_if(true, op, inputs, values))
    }

    /// Runs `f` without recording, then records one op whose backward recomputes it from the inputs as `kept`.
    fn scope<F>(&self, inputs: &[&Var], f: F, kept: Kept) -> Result<Vec<Var>>
    where
        F: Fn(&Tape, &[Var]) -> Result<Vec<Var>> + 'static,
    {
        let constants: Vec<Var> = inputs.iter().map(|v| Var::constant(v.value().clone())).collect();
        let (outs, reaches_params) = self.watch_trainable(|| self.no_grad(|| f(self, &constants)));
        let outs = outs?;
        let op = recompute(f, kept, inputs.iter().map(|v| v.requires_grad()).collect(), self.saved_bytes().clone());
        let values = outs.into_iter().map(|v| v.value().clone()).collect();
        let needed = reaches_params || inputs.iter().any(|v| v.requires_grad());
        Ok(self.record_if(needed, op, inputs, values))
    }
}
