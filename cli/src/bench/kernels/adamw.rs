//! The fused AdamW update over f32 adapters: all of a model's LoRA parameters (r = 16 on all seven projections) in
//! one launch, which bounds a multi-tensor update, and one q_proj lora_A alone, the size the optimizer updates
//! today one launch at a time.

use super::{dims, models, Bench, Work};
use crate::bench::memory::projection_shapes;
use anyhow::Result;
use qlora_kernels::adamw::AdamWStep;
use qlora_kernels::cuda::adamw::adamw_step;
use qlora_kernels::cuda::DeviceBuffer;
use qlora_optim::AdamWConfig;

/// finetune's default rank.
const RANK: usize = 16;

struct Set {
    p: DeviceBuffer<f32>,
    g: DeviceBuffer<f32>,
    m: DeviceBuffer<f32>,
    v: DeviceBuffer<f32>,
}

pub fn run(b: &mut Bench) -> Result<()> {
    let name = "adamw f32";
    if !b.wants(name) {
        return Ok(());
    }
    let mut sizes: Vec<(String, usize)> = Vec::new();
    for (model, c) in models()? {
        let shapes = projection_shapes(&c);
        let per_layer: usize = shapes.iter().map(|(_, [o, i])| RANK * (o + i)).sum();
        sizes.push((format!("{model} all adapters, r {RANK}"), per_layer * c.num_hidden_layers));
        if model == "llama-3-8b" {
            sizes.push((format!("{model} one q_proj lora_A, r {RANK}"), RANK * shapes[0].1[1]));
        }
    }
    // finetune's defaults.
    let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = AdamWConfig::default();
    for (what, n) in sizes {
        // p and the moments are read and written, g read: 7 f32 accesses per parameter.
        let bytes = 7 * 4 * n;
        let mut sets = (0..b.copies(bytes))
            .map(|_| {
                Ok(Set {
                    p: b.normal_f32(n, 0.01)?,
                    g: b.normal_f32(n, 1e-3)?,
                    m: b.normal_f32(n, 1e-4)?,
                    v: b.uniform_f32(n, 1e-8, 1e-6)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let count = sets.len();
        let shape = format!("{what} {}", dims(&[n]));
        b.row(name, &shape, Work::Bytes(bytes as f64), |i| {
            let s = &mut sets[i % count];
            // The step count only changes the bias corrections.
            let h = AdamWStep { lr, beta1, beta2, eps, weight_decay, step: 1 + i as u64 };
            Ok(adamw_step(&h, &mut s.p, &s.g, &mut s.m, &mut s.v, None)?)
        })?;
    }
    Ok(())
}
