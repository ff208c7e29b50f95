//! The MLP's gated activation over [tokens, intermediate], forward, backward, and the backward that also writes the
//! forward's product (`bwd+out`): SwiGLU for Llama, GeGLU (tanh) for Gemma.

use super::{dims, models, Bench, Work, TOKENS};
use anyhow::Result;
use half::bf16;
use qlora_kernels::cuda::activation::{glu_backward, glu_backward_out, glu_forward, Glu};
use qlora_kernels::cuda::DeviceBuffer;
use qlora_models::config::Activation;

struct Set {
    gate: DeviceBuffer<bf16>,
    up: DeviceBuffer<bf16>,
    d_out: DeviceBuffer<bf16>,
    out: DeviceBuffer<bf16>,
    d_gate: DeviceBuffer<bf16>,
    d_up: DeviceBuffer<bf16>,
}

pub fn run(b: &mut Bench) -> Result<()> {
    for (model, c) in models()? {
        let glu = if c.activation == Activation::Silu { "swiglu" } else { "geglu" };
        let (fwd, bwd, bwd_out) = (format!("{glu} fwd"), format!("{glu} bwd"), format!("{glu} bwd+out"));
        if !b.wants(&fwd) && !b.wants(&bwd) && !b.wants(&bwd_out) {
            continue;
        }
        let n = TOKENS * c.intermediate_size;
        // Six bf16 buffers of n elements.
        let mut sets = (0..b.copies(12 * n))
            .map(|_| {
                Ok(Set {
                    gate: b.normal_bf16(n, 1.0)?,
                    up: b.normal_bf16(n, 1.0)?,
                    d_out: b.normal_bf16(n, 1.0)?,
                    out: b.dev.alloc(n)?,
                    d_gate: b.dev.alloc(n)?,
                    d_up: b.dev.alloc(n)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let count = sets.len();
        let kind = if c.activation == Activation::Silu { Glu::SwiGlu } else { Glu::GeGlu };
        let shape = format!("{model} {} bf16", dims(&[TOKENS, c.intermediate_size]));
        if b.wants(&fwd) {
            b.row(&fwd, &shape, Work::Bytes((3 * 2 * n) as f64), |i| {
                let s = &mut sets[i % count];
                Ok(glu_forward(kind, &s.gate, &s.up, &mut s.out)?)
            })?;
        }
        if b.wants(&bwd) {
            b.row(&bwd, &shape, Work::Bytes((5 * 2 * n) as f64), |i| {
                let s = &mut sets[i % count];
                Ok(glu_backward(kind, &s.gate, &s.up, &s.d_out, &mut s.d_gate, &mut s.d_up)?)
            })?;
        }
        if b.wants(&bwd_out) {
            b.row(&bwd_out, &shape, Work::Bytes((6 * 2 * n) as f64), |i| {
                let s = &mut sets[i % count];
                // The product lands over d_out: later calls read it back as d_out (the same bytes).
                Ok(glu_backward_out(kind, &s.gate, &s.up, &mut s.d_out, &mut s.d_gate, &mut s.d_up)?)
            })?;
        }
    }
    Ok(())
}
