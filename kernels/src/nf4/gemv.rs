//! The NF4 matrix-vector product of decoding: y = x·Wᵀ for a few rows of x (one per sequence being decoded) against an
//! NF4 weight W [out, in] read packed, never dequantized whole, the CPU reference of `nf4_gemv` in
//! `kernels/cuda/nf4_gemv.cu`. Each weight is the dequantized value bit for bit (ftz(code · absmax) in f32, as
//! [`dequantize_nf4`](super::dequantize_nf4) writes it); products and sums run in f64 and are rounded once, so the
//! GPU's f32 sums in another order are compared against the exact dot product. An adapter's up-projection (LoRA's
//! s·U·Bᵀ, U = x·Aᵀ computed before) can ride on it, added to the dot product before the one rounding.

use super::{assert_blocksize, nf4_num_blocks, nf4_packed_len, nf4_value};

/// LoRA's up-projection added to a GEMV's output: y += alpha·U·Bᵀ, U: [m, r] with rows `ldu` apart, B: [out, r].
#[derive(Clone, Copy, Debug)]
pub struct GemvLora<'a> {
    pub u: &'a [f32],
    pub ldu: usize,
    pub b: &'a [f32],
    pub rank: usize,
    pub alpha: f32,
}

/// packed: [(out·in + 1) / 2] u8 and absmax: [ceil(out·in / blocksize)] f32 (for a double-quantized weight, rebuilt
/// with [`dequantize_absmax_nested`](super::dequantize_absmax_nested)) of W [out, in]; x: [m, in] → y: [m, out] =
/// x·Wᵀ (+ alpha·U·Bᵀ with `lora`).
pub fn nf4_gemv(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    x: &[f32],
    in_f: usize,
    lora: Option<GemvLora<'_>>,
    y: &mut [f32],
) {
    assert_blocksize("nf4_gemv", blocksize, 32);
    assert!(in_f > 0 && x.len() % in_f == 0, "nf4_gemv: x of {} values for rows of {in_f}", x.len());
    let m = x.len() / in_f;
    assert!(m > 0 && y.len() % m == 0, "nf4_gemv: y of {} values for {m} rows", y.len());
    let out_f = y.len() / m;
    let n = out_f * in_f;
    assert_eq!(packed.len(), nf4_packed_len(n), "nf4_gemv: packed length for a [{out_f}, {in_f}] weight");
    assert_eq!(absmax.len(), nf4_num_blocks(n, blocksize), "nf4_gemv: absmax length for a [{out_f}, {in_f}] weight");
    if let Some(l) = lora {
        assert!(l.rank <= l.ldu || m == 1, "nf4_gemv: U rows {} apart for rank {}", l.ldu, l.rank);
        assert!(l.u.len() >= (m - 1) * l.ldu + l.rank, "nf4_gemv: U of {} values for {m} rows", l.u.len());
        assert_eq!(l.b.len(), out_f * l.rank, "nf4_gemv: B of {} values for [{out_f}, {}]", l.b.len(), l.rank);
    }
    let weight = |e: usize| {
        let byte = packed[e / 2];
        nf4_value(if e % 2 == 0 { byte >> 4 } else { byte & 0x0F }, absmax[e / blocksize])
    };
    for o in 0..out_f {
        let mut acc = vec![0.0f64; m];
        for i in 0..in_f {
            let w = weight(o * in_f + i) as f64;
            for (r, a) in acc.iter_mut().enumerate() {
                *a += w * x[r * in_f + i] as f64;
            }
        }
        for (r, a) in acc.into_iter().enumerate() {
            let up = lora.map_or(0.0, |l| {
                let dot: f64 = (0..l.rank).map(|j| l.u[r * l.ldu + j] as f64 * l.b[o * l.rank + j] as f64).sum();
                l.alpha as f64 * dot
            });
            y[r * out_f + o] = (a + up) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{dequantize_nf4, quantize_nf4};
    use super::*;
    use crate::Rng;

    /// The product equals x times the dequantized weight, at odd sizes and several rows.
    #[test]
    fn equals_x_times_the_dequantized_weight() {
        let mut rng = Rng::new(5);
        for (m, out_f, in_f) in [(1, 3, 64), (3, 5, 96), (8, 7, 33)] {
            let w: Vec<f32> = (0..out_f * in_f).map(|_| rng.normal() as f32).collect();
            let n = w.len();
            let (mut packed, mut absmax) = (vec![0u8; nf4_packed_len(n)], vec![0f32; nf4_num_blocks(n, 32)]);
            quantize_nf4(&w, 32, &mut packed, &mut absmax);
            let mut dense = vec![0f32; n];
            dequantize_nf4(&packed, &absmax, 32, &mut dense);
            let x: Vec<f32> = (0..m * in_f).map(|_| rng.normal() as f32).collect();
            let mut y = vec![0f32; m * out_f];
            nf4_gemv(&packed, &absmax, 32, &x, in_f, None, &mut y);
            // The same product with an adapter's up-projection: U [m, 3] read from rows 5 apart.
            let (rank, ldu, alpha) = (3, 5, 0.75f32);
            let u: Vec<f32> = (0..m * ldu).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..out_f * rank).map(|_| rng.normal() as f32).collect();
            let mut y_lora = vec![0f32; m * out_f];
            let lora = GemvLora { u: &u, ldu, b: &b, rank, alpha };
            nf4_gemv(&packed, &absmax, 32, &x, in_f, Some(lora), &mut y_lora);
            for r in 0..m {
                for o in 0..out_f {
                    let want: f64 = (0..in_f).map(|i| dense[o * in_f + i] as f64 * x[r * in_f + i] as f64).sum();
                    assert_eq!(y[r * out_f + o], want as f32, "row {r}, output {o} of {m}×[{out_f}, {in_f}]");
                    let up: f64 = (0..rank).map(|j| u[r * ldu + j] as f64 * b[o * rank + j] as f64).sum();
                    let want = want + alpha as f64 * up;
                    assert_eq!(y_lora[r * out_f + o], want as f32, "with LoRA: row {r}, output {o}");
                }
            }
        }
    }
}
