//! RMSNorm forward and backward over [tokens, hidden] (Gemma's 1 + w offset where the model has it).

use super::{dims, models, Bench, Work, TOKENS};
use anyhow::Result;
use half::bf16;
use qlora_kernels::cuda::rms_norm::{rms_norm_backward, rms_norm_forward};
use qlora_kernels::cuda::DeviceBuffer;
use qlora_models::config::Family;

/// One repetition's buffers.
struct Set {
    x: DeviceBuffer<bf16>,
    dy: DeviceBuffer<bf16>,
    y: DeviceBuffer<bf16>,
    rstd: DeviceBuffer<f32>,
    dx: DeviceBuffer<bf16>,
    dw: DeviceBuffer<bf16>,
}

pub fn run(b: &mut Bench) -> Result<()> {
    for (model, c) in models()? {
        let (t, h) = (TOKENS, c.hidden_size);
        let offset = if c.family == Family::Llama { 0.0 } else { 1.0 };
        let eps = c.rms_norm_eps as f32;
        let shape = format!("{model} {} bf16", dims(&[t, h]));
        let (fwd, bwd) = ("rms_norm fwd", "rms_norm bwd");
        if !b.wants(fwd) && !b.wants(bwd) {
            continue;
        }
        let weight = b.normal_bf16(h, 0.1)?;
        let act = t * h * 2;
        let mut sets = (0..b.copies(5 * act))
            .map(|_| {
                Ok(Set {
                    x: b.normal_bf16(t * h, 1.0)?,
                    dy: b.normal_bf16(t * h, 1.0)?,
                    y: b.dev.alloc(t * h)?,
                    rstd: b.dev.alloc(t)?,
                    dx: b.dev.alloc(t * h)?,
                    dw: b.dev.alloc(h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n = sets.len();
        // Every set's rstd is written before backward reads it.
        for s in &mut sets {
            rms_norm_forward(&s.x, None, &weight, h, eps, offset, &mut s.y, &mut s.rstd)?;
        }
        if b.wants(fwd) {
            let bytes = 2 * act + 4 * t;
            b.row(fwd, &shape, Work::Bytes(bytes as f64), |i| {
                let s = &mut sets[i % n];
                Ok(rms_norm_forward(&s.x, None, &weight, h, eps, offset, &mut s.y, &mut s.rstd)?)
            })?;
        }
        if b.wants(bwd) {
            let bytes = 3 * act + 4 * t;
            b.row(bwd, &shape, Work::Bytes(bytes as f64), |i| {
                let s = &mut sets[i % n];
                Ok(rms_norm_backward(&s.x, &weight, &s.rstd, &s.dy, None, h, offset, &mut s.dx, Some(&mut s.dw))?)
            })?;
        }
    }
    Ok(())
}
