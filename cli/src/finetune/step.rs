//! One optimizer step, the code `finetune` and `bench` both run: for each micro-batch a forward and a backward whose
//! loss is the sum of its token losses divided by the trained tokens of the *whole* accumulated batch (so the
//! gradient is the per-token mean over all of it, however the tokens fall into micro-batches); then global-norm
//! clipping and an AdamW update at the given learning rate. Dropout streams are derived from (seed, step,
//! micro-batch), so a resumed run continues bit for bit.
//!
//! A non-finite loss or gradient norm stops the step before the update with a [`NonFinite`] error, which the caller
//! may complete (finetune names the last good checkpoint). A [`Phases`] observer hears where the step's time goes.

use anyhow::{Context, Result};
use qlora_autograd::Tape;
use qlora_models::transformer::{Batch, CausalLm};
use qlora_optim::{AdamW, GradNorm};
use qlora_runtime::cuda::read_scalars;
use qlora_runtime::{Device, Tensor};

/// The parts of a step, in the order they run (forward and backward once per micro-batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
    /// Clipping (the gradient norm included) and the AdamW update.
    Optimizer,
}

/// Hears each phase start (which ends the one before) and the step's end, to time them; `()` hears nothing.
pub trait Phases {
    fn enter(&mut self, phase: Phase) -> Result<()>;
    fn finish(&mut self) -> Result<()>;
}

impl Phases for () {
    fn enter(&mut self, _: Phase) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What a step needs besides the model, the optimizer and the data.
pub struct StepConfig {
    /// Where the model lives; batches are moved there.
    pub device: Device,
    /// The run's seed, from which the dropout streams derive.
    pub seed: u64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub lr: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    /// Σ token losses ÷ trained tokens of the step.
    pub loss: f64,
    /// Before clipping.
    pub grad_norm: f64,
}

/// A loss or gradient norm that is not a number: the step stopped before the update.
#[derive(Debug)]
pub struct NonFinite {
    pub what: &'static str,
    pub value: f64,
    /// 1-based, as reported.
    pub step: u64,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is {} at step {}: stopped before updating the adapter", self.what, self.value, self.step)
    }
}

impl std::error::Error for NonFinite {}

/// SplitMix64's finaliser: decorrelates seeds built from small integers.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dropout stream of micro-batch `micro` of step `step` (the model derives per-layer streams from it).
fn dropout_seed(seed: u64, step: u64, micro: usize) -> u64 {
    mix(seed ^ mix(step.wrapping_add(0x9E37_79B9_7F4A_7C15) ^ mix(micro as u64 + 1)))
}

/// Optimizer step `step` (0-based) over `micro_batches` (host batches, moved to `config.device` one at a time).
pub fn optimizer_step(
    model: &CausalLm,
    optimizer: &mut AdamW,
    micro_batches: &[Batch],
    step: u64,
    config: &StepConfig,
    phases: &mut dyn Phases,
) -> Result<StepOutcome> {
    let trained_tokens: usize = micro_batches.iter().map(Batch::trained_tokens).sum();
    // Each micro-batch's loss stays where it was computed; all are read at the end with the gradient norm.
    let mut losses = Vec::with_capacity(micro_batches.len());
    for (j, batch) in micro_batches.iter().enumerate() {
        losses.push(micro_step(model, batch, (step, j), trained_tokens, config, phases)?);
    }
    phases.enter(Phase::Optimizer)?;
    let norm = optimizer.grad_norm_sq()?;
    // The step's one wait for a GPU: the losses and the gradient norm, read together.
    let (loss, grad_norm) = match &norm {
        GradNorm::Host(sq) => (read_scalars(&losses.iter().collect::<Vec<_>>())?.iter().sum::<f64>(), sq.sqrt()),
        GradNorm::Device(sq) => {
            let mut values = read_scalars(&losses.iter().chain([sq]).collect::<Vec<_>>())?;
            let sq = values.pop().expect("the norm was read last");
            (values.iter().sum(), sq.sqrt())
        }
    };
    let outcome = StepOutcome { loss, grad_norm };
    update(optimizer, &norm, outcome, step, config)?;
    phases.finish()?;
    Ok(outcome)
}

/// Forward and backward of micro-batch `j` of step `step` (`at` = (step, j)), its loss divided by the whole step's
/// `trained_tokens`: the gradients are added into the parameters, the loss tensor is returned where it was computed.
pub(crate) fn micro_step(
    model: &CausalLm,
    batch: &Batch,
    (step, j): (u64, usize),
    trained_tokens: usize,
    config: &StepConfig,
    phases: &mut dyn Phases,
) -> Result<Tensor> {
    phases.enter(Phase::Forward)?;
    let batch = &batch.to_device(config.device)?;
    let tape = Tape::new();
    let seed = dropout_seed(config.seed, step, j);
    let l = model
        .loss(&tape, batch, trained_tokens as f64, seed)
        .with_context(|| format!("forward at step {}", step + 1))?;
    phases.enter(Phase::Backward)?;
    tape.backward(&l).with_context(|| format!("backward at step {}", step + 1))?;
    Ok(l.value().clone())
}

/// The end of a step once its gradients are in place and `read` (its loss and gradient norm) is known: stops on a
/// non-finite value, else clips (to `config.max_grad_norm`, 0 = off) and updates at `config.lr`.
pub(crate) fn update(
    optimizer: &mut AdamW,
    norm: &GradNorm,
    read: StepOutcome,
    step: u64,
    config: &StepConfig,
) -> Result<()> {
    for (what, value) in [("loss", read.loss), ("gradient norm", read.grad_norm)] {
        if !value.is_finite() {
            return Err(NonFinite { what, value, step: step + 1 }.into());
        }
    }
    let max_norm = if config.max_grad_norm > 0.0 { config.max_grad_norm } else { f64::INFINITY };
    optimizer.set_lr(config.lr);
    optimizer.step_clipped(norm, max_norm)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_seeds_differ_by_step_and_micro_batch() {
        let seeds: Vec<u64> = (0..4).flat_map(|step| (0..3).map(move |micro| dropout_seed(42, step, micro))).collect();
        let mut unique = seeds.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seeds.len());
        assert_ne!(dropout_seed(42, 0, 0), dropout_seed(43, 0, 0));
    }
}
