//! On-device dtype casts (f32 master adapters meeting bf16 activations, f32 results narrowed): f32 → bf16 and back,
//! over a [tokens, intermediate] activation of Llama-3-8B.

use super::{dims, Bench, Work, TOKENS};
use anyhow::Result;
use half::bf16;
use qlora_kernels::cuda::copy::cast;
use qlora_kernels::cuda::DeviceBuffer;

pub fn run(b: &mut Bench) -> Result<()> {
    let (down, up) = ("cast f32→bf16", "cast bf16→f32");
    if !b.wants(down) && !b.wants(up) {
        return Ok(());
    }
    let shape = [TOKENS, 14336];
    let n = shape[0] * shape[1];
    let wide = b.normal_f32(n, 1.0)?;
    let narrow = b.normal_bf16(n, 1.0)?;
    let mut wide_out: DeviceBuffer<f32> = b.dev.alloc(n)?;
    let mut narrow_out: DeviceBuffer<bf16> = b.dev.alloc(n)?;
    let label = format!("llama-3-8b mlp {}", dims(&shape));
    let bytes = Work::Bytes((6 * n) as f64);
    if b.wants(down) {
        b.row(down, &label, bytes, |_| Ok(cast(&wide, &mut narrow_out)?))?;
    }
    if b.wants(up) {
        b.row(up, &label, bytes, |_| Ok(cast(&narrow, &mut wide_out)?))?;
    }
    Ok(())
}
