//! f32 → ggml's F16, Q8_0, Q4_0 and Q4_1, the inverse of [`super::dequant`] for the types `export-gguf`
//! writes. Each block is quantized as ggml's reference `quantize_row_q*_ref` (ggml-quants.c) and gguf-py's
//! numpy `quantize_blocks` do it: scales computed and applied in f32 in the same order, the scale rounded to
//! f16 to nearest even, Q8_0 rounding half away from zero (`roundf`), Q4_0/Q4_1 truncating `x + 8.5` /
//! `x + 0.5` and clamping to 15. `scripts/reference/gguf_quantize_ref.py` records gguf-py's bytes for the
//! test that holds these to them.

use super::dequant::GgmlType;
use half::f16;
use rayon::prelude::*;

/// Values per block of the 32-value types.
pub const QK: usize = 32;

/// Types a model's matrices can be written in ([`quantize`] also writes F32, for norms).
pub const QUANTIZABLE: [GgmlType; 4] = [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

/// Quantizes `values` (whole rows, row-major) as `ty`. A 32-value type needs `values.len()` to be a multiple
/// of 32; callers choose F16 for rows that are not (see [`type_for_row`]).
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, String> {
    let block: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => return Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => {
            return Ok(values.par_iter().flat_map_iter(|v| f16::from_f32(*v).to_le_bytes()).collect());
        }
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        other => {
            let names: Vec<&str> = QUANTIZABLE.iter().map(|t| t.name()).collect();
            return Err(format!("cannot quantize to {} (supported: {})", other.name(), names.join(", ")));
        }
    };
    if values.len() % QK != 0 {
        return Err(format!("{} values are not whole {QK}-value blocks of {}", values.len(), ty.name()));
    }
    let size = ty.type_size();
    let mut out = vec![0u8; values.len() / QK * size];
    // 512 blocks per task: large enough that scheduling is noise, small enough to spread a layer over cores.
    out.par_chunks_mut(size * 512).zip(values.par_chunks(QK * 512)).for_each(|(o, v)| {
        for (ob, vb) in o.chunks_exact_mut(size).zip(v.chunks_exact(QK)) {
            block(vb, ob);
        }
    });
    Ok(out)
}

/// The type a matrix with rows of `row_len` values is stored in when `wanted` was asked for: llama.cpp's
/// converter falls back to F16 where a row is not whole blocks.
pub fn type_for_row(wanted: GgmlType, row_len: usize) -> GgmlType {
    if row_len % wanted.block_size() == 0 {
        wanted
    } else {
        GgmlType::F16
    }
}

/// 1 / d, or 0 for an all-zero block (ggml's `d ? 1.0f/d : 0.0f`).
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// `block_q8_0`: f16 d, then 32 i8. d = max|x| / 127, q = roundf(x / d).
fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| if m < v.abs() { v.abs() } else { m });
    let d = amax / 127.0;
    let id = inverse(d);
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        // f32::round rounds half away from zero, as C's roundf.
        *o = ((v * id).round() as i8) as u8;
    }
}

/// `block_q4_0`: f16 d, then 16 bytes holding value j in the low nibble of byte j and value j + 16 in the high
/// nibble. d = (the value of largest magnitude, first if tied) / -8; q = min(15, trunc(x / d + 8.5)).
fn q4_0(x: &[f32], out: &mut [u8]) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = inverse(d);
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    for j in 0..QK / 2 {
        out[2 + j] = q(x[j]) | (q(x[j + QK / 2]) << 4);
    }
}

/// `block_q4_1`: f16 d, f16 m, then nibbles as Q4_0. m = min, d = (max − min) / 15,
/// q = min(15, trunc((x − m) / d + 0.5)).
fn q4_1(x: &[f32], out: &mut [u8]) {
    let (min, max) =
        x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (if v < lo { v } else { lo }, if v > hi { v } else { hi }));
    let d = (max - min) / 15.0;
    let id = inverse(d);
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    out[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
    let q = |v: f32| (((v - min) * id + 0.5).trunc() as u8).min(15);
    for j in 0..QK / 2 {
        out[4 + j] = q(x[j]) | (q(x[j + QK / 2]) << 4);
    }
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
        let x = values(32 * 64, 7, 3.0);
        // Half a step, except Q4_0's clamped top level (levels −8d..7d, the extreme at −8d: a whole step).
        for (ty, max_err) in [(GgmlType::Q8_0, 0.5 / 127.0), (GgmlType::Q4_0, 1.0 / 8.0), (GgmlType::Q4_1, 1.0 / 15.0)]
        {
            let y = roundtrip(ty, &x);
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // Plus the f16 rounding of the scale (and of Q4_1's minimum).
                let bound = amax * (max_err + 2e-3);
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= bound, "{}: {a} → {b} (bound {bound})", ty.name());
                }
            }
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
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            assert!(roundtrip(ty, &[0.0; 64]).iter().all(|v| *v == 0.0), "{}", ty.name());
        }
        // Q4_1 keeps a constant block exactly (d = 0, m = the value).
        assert!(roundtrip(GgmlType::Q4_1, &[0.75; 32]).iter().all(|v| *v == 0.75));
        assert!(quantize(GgmlType::Q8_0, &[0.0; 31]).unwrap_err().contains("not whole 32-value blocks"));
        assert!(quantize(GgmlType::Q6_K, &[0.0; 256]).unwrap_err().contains("cannot quantize to Q6_K"));
        assert_eq!(type_for_row(GgmlType::Q4_0, 48), GgmlType::F16);
        assert_eq!(type_for_row(GgmlType::Q4_0, 64), GgmlType::Q4_0);
    }
}
