//! f32 → ggml's 32-value block types Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, as ggml's reference
//! `quantize_row_q*_ref` (ggml-quants.c) and gguf-py's numpy `quantize_blocks` do it: scales computed and applied
//! in f32 in the same order, the scale rounded to f16 to nearest even, Q8_0 rounding half away from zero
//! (`roundf`), the 4- and 5-bit types truncating `x + 8.5` / `x + 16.5` / `x + 0.5` and clamping where ggml
//! clamps. llama-quantize reaches these same functions when it has no importance matrix.

use super::QK;
use half::f16;

/// 1 / d, or 0 for an all-zero block (ggml's `d ? 1.0f/d : 0.0f`).
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn put_f16(out: &mut [u8], v: f32) {
    out.copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The value of largest magnitude, the first if tied (Q4_0 and Q5_0 scale by its sign).
fn signed_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// The head of Q4_1/Q5_1 blocks: m = min, d = (max − min) / `steps` (min and max compared as ggml does: a NaN
/// never replaces the running value), both written as f16 to `out[..4]`; returns (m, 1 / d).
fn min_and_step(x: &[f32], steps: f32, out: &mut [u8]) -> (f32, f32) {
    let (min, max) =
        x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (if v < lo { v } else { lo }, if v > hi { v } else { hi }));
    let d = (max - min) / steps;
    put_f16(&mut out[..2], d);
    put_f16(&mut out[2..4], min);
    (min, inverse(d))
}

/// `block_q8_0`: f16 d, then 32 i8. d = max|x| / 127, q = roundf(x / d).
pub(super) fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| if m < v.abs() { v.abs() } else { m });
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(&mut out[..2], d);
    for (o, v) in out[2..].iter_mut().zip(x) {
        // f32::round rounds half away from zero, as C's roundf.
        *o = ((v * id).round() as i8) as u8;
    }
}

/// Nibbles as the 32-value types pack them: value j in the low nibble of byte j, value j + 16 in the high one.
fn pack_nibbles(levels: &[u8; QK], out: &mut [u8]) {
    for j in 0..QK / 2 {
        out[j] = (levels[j] & 15) | ((levels[j + QK / 2] & 15) << 4);
    }
}

/// The fifth bits of 32 levels as the little-endian u32 `qh` of Q5_0/Q5_1 (bit j for value j).
fn fifth_bits(levels: &[u8; QK], out: &mut [u8]) {
    let qh = levels.iter().enumerate().fold(0u32, |qh, (j, &l)| qh | (u32::from(l >> 4 & 1) << j));
    out.copy_from_slice(&qh.to_le_bytes());
}

/// `block_q4_0`: f16 d, then 16 nibble bytes. d = (the value of largest magnitude) / -8;
/// q = min(15, trunc(x / d + 8.5)).
pub(super) fn q4_0(x: &[f32], out: &mut [u8]) {
    let d = signed_max(x) / -8.0;
    let id = inverse(d);
    put_f16(&mut out[..2], d);
    let levels = std::array::from_fn(|j| ((x[j] * id + 8.5).trunc() as u8).min(15));
    pack_nibbles(&levels, &mut out[2..]);
}

/// `block_q4_1`: f16 d, f16 m, then 16 nibble bytes. m = min, d = (max − min) / 15,
/// q = min(15, trunc((x − m) / d + 0.5)).
pub(super) fn q4_1(x: &[f32], out: &mut [u8]) {
    let (min, id) = min_and_step(x, 15.0, out);
    let levels = std::array::from_fn(|j| (((x[j] - min) * id + 0.5).trunc() as u8).min(15));
    pack_nibbles(&levels, &mut out[4..]);
}

/// `block_q5_0`: f16 d, u32 qh (fifth bits), then 16 nibble bytes. d = (the value of largest magnitude) / -16;
/// q = min(31, trunc(x / d + 16.5)).
pub(super) fn q5_0(x: &[f32], out: &mut [u8]) {
    let d = signed_max(x) / -16.0;
    let id = inverse(d);
    put_f16(&mut out[..2], d);
    // ggml converts to int8_t before the clamp; the sum lies in [0.5, 32.5], where both conversions agree.
    let levels = std::array::from_fn(|j| ((x[j] * id + 16.5) as i8).min(31) as u8);
    fifth_bits(&levels, &mut out[2..6]);
    pack_nibbles(&levels, &mut out[6..]);
}

/// `block_q5_1`: f16 d, f16 m, u32 qh, then 16 nibble bytes. m = min, d = (max − min) / 31,
/// q = trunc((x − m) / d + 0.5), unclamped as in ggml (at most 31 up to rounding).
pub(super) fn q5_1(x: &[f32], out: &mut [u8]) {
    let (min, id) = min_and_step(x, 31.0, out);
    let levels = std::array::from_fn(|j| ((x[j] - min) * id + 0.5) as u8);
    fifth_bits(&levels, &mut out[4..8]);
    pack_nibbles(&levels, &mut out[8..]);
}
