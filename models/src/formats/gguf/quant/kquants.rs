//! f32 → ggml's K-quants Q4_K, Q5_K and Q6_K (256-value super-blocks), as llama-quantize writes them without an
//! importance matrix: ggml-quants.c's `quantize_row_q4_K_ref`, `quantize_row_q5_K_ref` and
//! `quantize_row_q6_K_ref` with their helpers `make_qkx2_quants` and `make_qx_quants`, operation for operation in
//! f32 (same order, no fused multiply-add: ggml builds these in ggml-base, without `-march`), so that the bytes
//! are llama-quantize's. Layouts are ggml-common.h's `block_q4_K`, `block_q5_K` and `block_q6_K`.

use half::f16;

/// Values per super-block (`QK_K`).
pub const QK_K: usize = 256;

/// Below this largest magnitude a group counts as all zero (ggml-quants.c's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest, ties to even, by adding 1.5·2²³ so that the integer lands in the
/// low mantissa bits. Exact for |x| ≤ 2²², as ggml asserts; beyond that it wraps, and every caller clamps.
fn nearest_int(x: f32) -> i32 {
    ((x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn f16_round(v: f32) -> (u16, f32) {
    let h = f16::from_f32(v);
    (h.to_bits(), h.to_f32())
}

/// `make_qkx2_quants` (with `use_mad` false): levels `l` in 0..=nmax and (scale, min) with x ≈ scale·l − min
/// for one 32-value group, minimizing the weighted squared error over `nstep + 1` trial scales around the
/// min/max one. Returns (scale, min), min ≥ 0 being subtracted.
fn scale_and_min(x: &[f32], w: &[f32], nmax: i32, rmin: f32, rdelta: f32, nstep: i32, l: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        l[i] = nearest_int(iscale * (x[i] - min)).clamp(0, nmax) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = li as u8;
            let lf = li as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K and Q5_K's common part: per 32-value group a (scale, min) from [`scale_and_min`] with ggml's weights
/// `rms(group) + |x|`, both quantized to 6 bits against the super-block's largest, whose f16 ratios d and dmin
/// head the block; then the levels recomputed against the stored scales. Writes d, dmin and the 12 packed
/// scale bytes to `head` (16 bytes) and returns the 256 levels.
fn scaled_levels(x: &[f32], nmax: i32, rmin: f32, nstep: i32, head: &mut [u8]) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..QK_K / 32 {
        let g = &x[32 * j..32 * (j + 1)];
        let sum_x2 = g.iter().fold(0.0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|i| av_x + g[i].abs());
        (scales[j], mins[j]) = scale_and_min(g, &w, nmax, rmin, 0.1, nstep, &mut levels[32 * j..32 * (j + 1)]);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // ggml stores nearest_int's result in a uint8_t before clamping it to 63.
    let six = |v: f32| (nearest_int(v) as u8).min(63);
    let ls: [u8; 8] = std::array::from_fn(|j| six(inv_scale * scales[j]));
    let lm: [u8; 8] = std::array::from_fn(|j| six(inv_min * mins[j]));
    // `get_scale_min_k4`'s layout: groups 0-3 in the low 6 bits of bytes 0-3 (scale) and 4-7 (min); groups 4-7
    // in the nibbles of bytes 8-11 with their top two bits in the spare bits of bytes 0-7.
    let sc = &mut head[4..16];
    for j in 0..4 {
        sc[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
        sc[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
        sc[j + 8] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4);
    }
    let (d_bits, d) = f16_round(max_scale / 63.0);
    let (dmin_bits, dmin) = f16_round(max_min / 63.0);
    head[..2].copy_from_slice(&d_bits.to_le_bytes());
    head[2..4].copy_from_slice(&dmin_bits.to_le_bytes());
    for j in 0..QK_K / 32 {
        let dj = d * ls[j] as f32;
        // A zero scale keeps the levels scale_and_min chose, as ggml's `continue` does.
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * lm[j] as f32;
        for i in 32 * j..32 * (j + 1) {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    levels
}

/// `block_q4_K` (144 bytes): f16 d, f16 dmin, 12 scale bytes, then 128 bytes of nibbles, each 64-value chunk
/// as 32 bytes holding value i in the low nibble and value i + 32 in the high one.
pub(super) fn q4_k(x: &[f32], out: &mut [u8]) {
    let levels = scaled_levels(x, 15, -1.0, 20, &mut out[..16]);
    for (chunk, q) in levels.chunks_exact(64).zip(out[16..].chunks_exact_mut(32)) {
        for i in 0..32 {
            q[i] = chunk[i] | (chunk[i + 32] << 4);
        }
    }
}

/// `block_q5_K` (176 bytes): f16 d, f16 dmin, 12 scale bytes, 32 bytes of fifth bits (bit 2c of byte i for value
/// i of 64-value chunk c, bit 2c + 1 for value i + 32), then the low nibbles as Q4_K packs them.
pub(super) fn q5_k(x: &[f32], out: &mut [u8]) {
    let levels = scaled_levels(x, 31, -0.5, 15, &mut out[..16]);
    let (qh, qs) = out[16..].split_at_mut(32);
    qh.fill(0);
    for (c, (chunk, q)) in levels.chunks_exact(64).zip(qs.chunks_exact_mut(32)).enumerate() {
        for i in 0..32 {
            let (lo, hi) = (chunk[i], chunk[i + 32]);
            qh[i] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            q[i] = (lo & 0xF) | ((hi & 0xF) << 4);
        }
    }
}

/// `make_qx_quants` with rmse_type 1 and no importance weights: signed levels in −nmax..nmax−1, stored offset
/// by nmax in `l`, and the scale minimizing the x²-weighted squared error over 19 trial scales.
fn signed_scale(x: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Sums of w·x·l and w·l² with w = x², in ggml's association order.
    let sums = |iscale: f32| {
        x.iter().fold((0.0f32, 0.0f32), |(lx, l2), &v| {
            let (w, lf) = (v * v, level(iscale, v) as f32);
            (lx + w * v * lf, l2 + w * lf * lf)
        })
    };
    let mut store = |iscale: f32| {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (level(iscale, v) + nmax) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    store(iscale);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `block_q6_K` (210 bytes): 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 i8 group scales, then
/// f16 d. Per 16-value group a signed scale from [`signed_scale`]; the scales quantized to i8 against the
/// largest in magnitude, and the 6-bit levels recomputed against them.
pub(super) fn q6_k(x: &[f32], out: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
    for (ib, s) in scales.iter_mut().enumerate() {
        *s = signed_scale(&x[16 * ib..16 * (ib + 1)], 32, &mut levels[16 * ib..16 * (ib + 1)]);
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = *s;
        }
    }
    if max_abs < GROUP_MAX_EPS {
        // An all-zero super-block: every byte zero, d = +0.
        out.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let (d_bits, d) = f16_round(1.0 / iscale);
    let sc: [i8; QK_K / 16] = std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for (j, &s) in sc.iter().enumerate() {
        let dj = d * s as f32;
        // A zero scale keeps signed_scale's levels, as ggml's `continue` does.
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            levels[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, rest) = out.split_at_mut(QK_K / 2);
    let (qh, rest) = rest.split_at_mut(QK_K / 4);
    // Each 128-value half: 64 bytes of ql (values i and i + 64 in byte i, i + 32 and i + 96 in byte i + 32)
    // and 32 bytes of qh (the top two bits of values i, i + 32, i + 64, i + 96 in byte i).
    for ((half, ql), qh) in levels.chunks_exact(128).zip(ql.chunks_exact_mut(64)).zip(qh.chunks_exact_mut(32)) {
        for i in 0..32 {
            let [a, b, c, e] = [half[i], half[i + 32], half[i + 64], half[i + 96]];
            ql[i] = (a & 0xF) | ((c & 0xF) << 4);
            ql[i + 32] = (b & 0xF) | ((e & 0xF) << 4);
            qh[i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    for (o, s) in rest[..QK_K / 16].iter_mut().zip(sc) {
        *o = s as u8;
    }
    rest[QK_K / 16..].copy_from_slice(&d_bits.to_le_bytes());
}
