//! f32 → the ggml types `export-gguf` writes, the inverse of [`super::dequant`]: F32 and F16 as they are, the
//! 32-value block types (`legacy.rs`) and the K-quants (`kquants.rs`), each block as ggml's reference quantizer
//! writes it, which is what llama-quantize runs without an importance matrix (and gguf-py's numpy quantizers
//! for Q8_0/Q4_0/Q4_1). `scripts/reference/gguf_quantize_ref.py` records gguf-py's bytes and
//! `scripts/llamacpp/kquant_ref.c` ggml's own for the tests that hold these to them.

mod kquants;
mod legacy;

use super::dequant::GgmlType;
use half::f16;
use rayon::prelude::*;

pub use kquants::QK_K;

/// Values per block of the 32-value types.
pub const QK: usize = 32;

/// Types [`quantize`] writes.
pub const QUANTIZABLE: [GgmlType; 10] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Quantizes `values` (whole rows, row-major) as `ty`; `values.len()` must be a multiple of the type's block
/// size (callers pick a type whose blocks divide a row, see [`super::ftype`]).
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, String> {
    let block: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => return Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => {
            return Ok(values.par_iter().flat_map_iter(|v| f16::from_f32(*v).to_le_bytes()).collect());
        }
        GgmlType::Q8_0 => legacy::q8_0,
        GgmlType::Q4_0 => legacy::q4_0,
        GgmlType::Q4_1 => legacy::q4_1,
        GgmlType::Q5_0 => legacy::q5_0,
        GgmlType::Q5_1 => legacy::q5_1,
        GgmlType::Q4_K => kquants::q4_k,
        GgmlType::Q5_K => kquants::q5_k,
        GgmlType::Q6_K => kquants::q6_k,
        other => {
            let names: Vec<&str> = QUANTIZABLE.iter().map(|t| t.name()).collect();
            return Err(format!("cannot quantize to {} (supported: {})", other.name(), names.join(", ")));
        }
    };
    let (n, size) = (ty.block_size(), ty.type_size());
    if values.len() % n != 0 {
        return Err(format!("{} values are not whole {n}-value blocks of {}", values.len(), ty.name()));
    }
    let mut out = vec![0u8; values.len() / n * size];
    // 16 K blocks of 256 values per task: large enough that scheduling is noise, small enough to spread a layer
    // over cores.
    let per_task = 4096 / n;
    out.par_chunks_mut(size * per_task).zip(values.par_chunks(n * per_task)).for_each(|(o, v)| {
        for (ob, vb) in o.chunks_exact_mut(size).zip(v.chunks_exact(n)) {
            block(vb, ob);
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::dequant::dequantize;
    use super::*;

    fn roundtrip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
        let bytes = quantize(ty, x).unwrap();
        assert_eq!(bytes.len(), x.len() / ty.block_size() * ty.type_size());
        let mut out = vec![0.0; x.len()];
        dequantize(ty, &bytes, &mut out).unwrap();
        out
    }

    /// Deterministic values in [-scale, scale).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn errors_stay_within_each_types_step() {
        let x = values(QK_K * 16, 7, 3.0);
        // Half a step, except Q4_0/Q5_0's clamped top level (levels −8d..7d, the extreme at −8d: a whole step).
        for (ty, max_err) in [
            (GgmlType::Q8_0, 0.5 / 127.0),
            (GgmlType::Q4_0, 1.0 / 8.0),
            (GgmlType::Q4_1, 1.0 / 15.0),
            (GgmlType::Q5_0, 1.0 / 16.0),
            (GgmlType::Q5_1, 1.0 / 31.0),
        ] {
            let y = roundtrip(ty, &x);
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // Plus the f16 rounding of the scale (and of the minimum).
                let bound = amax * (max_err + 2e-3);
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= bound, "{}: {a} → {b} (bound {bound})", ty.name());
                }
            }
        }
        // K-quants: the group scales are themselves quantized (6 or 8 bits) against the super-block's largest,
        // so a value may be off by a step of the widest group (range / levels) rather than half its own.
        for (ty, levels) in [(GgmlType::Q4_K, 15.0), (GgmlType::Q5_K, 31.0), (GgmlType::Q6_K, 63.0)] {
            let y = roundtrip(ty, &x);
            let mut sq = 0.0f64;
            for (xb, yb) in x.chunks(QK_K).zip(y.chunks(QK_K)) {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let bound = 2.0 * amax / levels;
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= bound, "{}: {a} → {b} (bound {bound})", ty.name());
                    sq += f64::from(a - b).powi(2);
                }
            }
            // Uniform values in ±3: the error of a uniform quantizer of step 6/levels is step/√12 at best;
            // the search over scales must stay within 1.5× of it.
            let rms = (sq / x.len() as f64).sqrt();
            let ideal = 6.0 / f64::from(levels) / 12f64.sqrt();
            assert!(rms < 1.5 * ideal, "{}: rms error {rms}, ideal {ideal}", ty.name());
        }
        let h = roundtrip(GgmlType::F16, &x);
        assert!(x.iter().zip(&h).all(|(a, b)| *b == f16::from_f32(*a).to_f32()));
    }

    #[test]
    fn hand_checked_blocks_and_edge_cases() {
        // Q8_0: max |x| = 127 → d = 1; 2.5 rounds away from zero to 3, -2.5 to -3.
        let mut x = vec![0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        let b = quantize(GgmlType::Q8_0, &x).unwrap();
        assert_eq!(&b[..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!((b[2] as i8, b[3] as i8, b[4] as i8), (127, 3, -3));
        // Q4_0: the signed extreme -8 gives d = 1; x + 8.5 truncated, 8 clamps to 15.
        let mut x = vec![0.0f32; 32];
        x[0] = -8.0;
        x[16] = 8.0;
        x[1] = 0.6;
        let b = quantize(GgmlType::Q4_0, &x).unwrap();
        assert_eq!(&b[..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!((b[2] & 15, b[2] >> 4, b[3] & 15, b[4] & 15), (0, 15, 9, 8));
        // All-zero blocks quantize to zero scales and decode to zeros.
        for ty in QUANTIZABLE {
            assert!(roundtrip(ty, &[0.0; QK_K]).iter().all(|v| *v == 0.0), "{}", ty.name());
        }
        // Q6_K writes an all-zero super-block as zero bytes.
        assert!(quantize(GgmlType::Q6_K, &[0.0; QK_K]).unwrap().iter().all(|b| *b == 0));
        // Q4_1/Q5_1 keep a constant block exactly (d = 0, m = the value); Q4_K/Q5_K a constant negative one
        // up to the f16 rounding of dmin (scale 0, the whole value in the min).
        for ty in [GgmlType::Q4_1, GgmlType::Q5_1] {
            assert!(roundtrip(ty, &[0.75; 32]).iter().all(|v| *v == 0.75), "{}", ty.name());
        }
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
            assert!(roundtrip(ty, &[-0.75; QK_K]).iter().all(|v| (v + 0.75).abs() < 1e-3), "{}", ty.name());
        }
        assert!(quantize(GgmlType::Q8_0, &[0.0; 31]).unwrap_err().contains("not whole 32-value blocks"));
        assert!(quantize(GgmlType::Q4_K, &[0.0; 288]).unwrap_err().contains("not whole 256-value blocks of Q4_K"));
        assert!(quantize(GgmlType::Q2_K, &[0.0; 256]).unwrap_err().contains("cannot quantize to Q2_K"));
    }
}
