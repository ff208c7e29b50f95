//! Cross-entropy forward and backward over the full [tokens, vocab] logits (what the step computes today; the fused
//! chunked head of issue 12 will replace it): Llama 3's vocabulary of 128256 and Gemma 2's of 256000.

use super::{dims, models, Bench, Work, TOKENS};
use anyhow::Result;
use qlora_kernels::cuda::cross_entropy::{cross_entropy_backward, cross_entropy_forward};
use qlora_kernels::cuda::DeviceBuffer;

pub fn run(b: &mut Bench) -> Result<()> {
    let (fwd, bwd) = ("cross_entropy fwd", "cross_entropy bwd");
    if !b.wants(fwd) && !b.wants(bwd) {
        return Ok(());
    }
    let mut vocabs: Vec<(usize, &str)> = Vec::new();
    for (model, c) in models()? {
        if !vocabs.iter().any(|(v, _)| *v == c.vocab_size) {
            vocabs.push((c.vocab_size, model));
        }
    }
    for (v, model) in vocabs {
        let t = TOKENS;
        let logits = b.normal_bf16(t * v, 2.0)?;
        let targets = b.ids(t, v)?;
        let mut loss: DeviceBuffer<f32> = b.dev.alloc(t)?;
        let mut lse: DeviceBuffer<f32> = b.dev.alloc(t)?;
        let d_loss = b.uniform_f32(t, 0.5 / t as f64, 1.5 / t as f64)?;
        let mut d_logits = b.dev.alloc(t * v)?;
        cross_entropy_forward(&logits, &targets, v, &mut loss, &mut lse)?;
        let shape = format!("{model} logits {} bf16", dims(&[t, v]));
        let logit_bytes = (2 * t * v) as f64;
        if b.wants(fwd) {
            b.row(fwd, &shape, Work::Bytes(logit_bytes), |_| {
                Ok(cross_entropy_forward(&logits, &targets, v, &mut loss, &mut lse)?)
            })?;
        }
        if b.wants(bwd) {
            b.row(bwd, &shape, Work::Bytes(2.0 * logit_bytes), |_| {
                Ok(cross_entropy_backward(&logits, &targets, &lse, &d_loss, v, &mut d_logits)?)
            })?;
        }
    }
    Ok(())
}
