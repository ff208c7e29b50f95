//! The GEMMs of a step's linear layers (bf16, cuBLASLt through `matmul`): x·Wᵀ of Llama-3-8B's projections and
//! head at 4 × 2048 tokens, the shapes `../shared/bench/kernel_anchors.py` times in PyTorch.

use super::{dims, models, Bench, Work, TOKENS};
use crate::bench::memory::projection_shapes;
use anyhow::Result;
use qlora_kernels::cuda::matmul::matmul;
use qlora_kernels::matmul::Gemm;

pub fn run(b: &mut Bench) -> Result<()> {
    let (_, c) = models()?.into_iter().find(|(name, _)| *name == "llama-3-8b").expect("a listed model");
    let shapes = projection_shapes(&c);
    let mut wanted: Vec<(&str, [usize; 2])> = vec![
        ("q_proj/o_proj", shapes[0].1),
        ("k_proj/v_proj", shapes[1].1),
        ("gate_proj/up_proj", shapes[4].1),
        ("down_proj", shapes[6].1),
    ];
    wanted.push(("lm_head", [c.vocab_size, c.hidden_size]));
    for (what, [n, k]) in wanted {
        let name = format!("gemm x·Wᵀ {what}");
        if !b.wants(&name) {
            continue;
        }
        let m = TOKENS;
        let (x, w) = (b.normal_bf16(m * k, 1.0)?, b.normal_bf16(n * k, 0.02)?);
        let mut y = b.dev.alloc(m * n)?;
        let g = Gemm::new(m, n, k).trans_b(true);
        let shape = format!("llama-3-8b {} bf16", dims(&[m, n, k]));
        b.row(&name, &shape, Work::Flops(2.0 * (m * n * k) as f64), |_| Ok(matmul(&g, &x, &w, &mut y)?))?;
    }
    Ok(())
}
