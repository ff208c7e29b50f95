//! NF4 dequantization of the projection weights to bf16, as every QLoRA forward and backward does before its GEMM:
//! with f32 block scales, the rebuild of double-quantized (nested) scales alone, and both together as a
//! double-quantized weight is dequantized. Bytes as `../shared/bench/kernel_anchors.py` counts bitsandbytes':
//! packed nibbles and scales read, bf16 written.

use super::{dims, models, Bench, Work};
use crate::bench::memory::projection_shapes;
use anyhow::Result;
use half::bf16;
use qlora_kernels::cuda::nf4::{dequantize_absmax_nested, dequantize_nf4};
use qlora_kernels::cuda::DeviceBuffer;
use qlora_kernels::nf4::{nf4_num_blocks, nf4_packed_len, DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE};

/// bitsandbytes' and finetune's block size.
const BLOCKSIZE: usize = 64;

struct Set {
    packed: DeviceBuffer<u8>,
    absmax: DeviceBuffer<f32>,
    qabsmax: DeviceBuffer<u8>,
    absmax2: DeviceBuffer<f32>,
    out: DeviceBuffer<bf16>,
}

pub fn run(b: &mut Bench) -> Result<()> {
    let rows = ["nf4 dequant", "nf4 nested absmax", "nf4 dequant + nested absmax"];
    if !rows.iter().any(|r| b.wants(r)) {
        return Ok(());
    }
    let code2 = b.dev.upload(&DYNAMIC_MAP_SIGNED)?;
    for (model, c) in models()? {
        let shapes = projection_shapes(&c);
        let mut wanted = vec![shapes[4]];
        if model == "llama-3-8b" {
            wanted.push(shapes[0]);
        }
        for (proj, [o, i]) in wanted {
            let n = o * i;
            let nb = nf4_num_blocks(n, BLOCKSIZE);
            let mut sets = (0..b.copies(n / 2 + 2 * n))
                .map(|_| {
                    Ok(Set {
                        packed: b.bytes(nf4_packed_len(n))?,
                        // Block scales of a N(0, 0.02²) weight: the largest |value| of 64 draws, about 0.048.
                        absmax: b.uniform_f32(nb, 0.035, 0.065)?,
                        qabsmax: b.bytes(nb)?,
                        absmax2: b.uniform_f32(nb.div_ceil(NESTED_BLOCKSIZE), 0.01, 0.02)?,
                        out: b.dev.alloc(n)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let count = sets.len();
            let shape = format!("{model} {proj} {} → bf16", dims(&[o, i]));
            if b.wants(rows[0]) {
                let bytes = n / 2 + 4 * nb + 2 * n;
                b.row(rows[0], &shape, Work::Bytes(bytes as f64), |k| {
                    let s = &mut sets[k % count];
                    Ok(dequantize_nf4(&s.packed, &s.absmax, BLOCKSIZE, &mut s.out)?)
                })?;
            }
            if b.wants(rows[1]) {
                let bytes = nb + 4 * nb.div_ceil(NESTED_BLOCKSIZE) + 4 * nb;
                b.row(rows[1], &shape, Work::Bytes(bytes as f64), |k| {
                    let s = &mut sets[k % count];
                    Ok(dequantize_absmax_nested(&s.qabsmax, &s.absmax2, 0.048, &code2, &mut s.absmax)?)
                })?;
            }
            if b.wants(rows[2]) {
                let bytes = n / 2 + n / 64 + 2 * n;
                b.row(rows[2], &shape, Work::Bytes(bytes as f64), |k| {
                    let s = &mut sets[k % count];
                    dequantize_absmax_nested(&s.qabsmax, &s.absmax2, 0.048, &code2, &mut s.absmax)?;
                    Ok(dequantize_nf4(&s.packed, &s.absmax, BLOCKSIZE, &mut s.out)?)
                })?;
            }
        }
    }
    Ok(())
}
