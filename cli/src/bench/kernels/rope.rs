//! Rotary embeddings forward and backward on the queries, [tokens, heads, head_dim], with f32 cos/sin tables.

use super::{dims, models, Bench, Work, TOKENS};
use anyhow::Result;
use half::bf16;
use qlora_kernels::cuda::rope::{rope, Direction};
use qlora_kernels::cuda::DeviceBuffer;

struct Set {
    x: DeviceBuffer<bf16>,
    y: DeviceBuffer<bf16>,
}

pub fn run(b: &mut Bench) -> Result<()> {
    let (fwd, bwd) = ("rope fwd", "rope bwd");
    if !b.wants(fwd) && !b.wants(bwd) {
        return Ok(());
    }
    for (model, c) in models()? {
        let (t, heads, hd) = (TOKENS, c.num_attention_heads, c.head_dim);
        let n = t * heads * hd;
        let (cos, sin) = (b.uniform_f32(t * hd / 2, -1.0, 1.0)?, b.uniform_f32(t * hd / 2, -1.0, 1.0)?);
        let mut sets = (0..b.copies(4 * n))
            .map(|_| Ok(Set { x: b.normal_bf16(n, 1.0)?, y: b.dev.alloc(n)? }))
            .collect::<Result<Vec<_>>>()?;
        let count = sets.len();
        // Read x, write y; the tables are read once per token (every head reuses them from cache).
        let bytes = (4 * n + 2 * 4 * t * hd / 2) as f64;
        let shape = format!("{model} q {} bf16", dims(&[t, heads, hd]));
        for (name, dir) in [(fwd, Direction::Forward), (bwd, Direction::Backward)] {
            if !b.wants(name) {
                continue;
            }
            b.row(name, &shape, Work::Bytes(bytes), |i| {
                let s = &mut sets[i % count];
                Ok(rope(dir, &s.x, [&cos, &sin], heads, hd, &mut s.y)?)
            })?;
        }
    }
    Ok(())
}
