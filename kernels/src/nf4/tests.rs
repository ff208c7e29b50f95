use super::*;
use crate::rng::Rng;

fn randn_f32(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

fn quantize(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mut packed = vec![0u8; nf4_packed_len(x.len())];
    let mut absmax = vec![0.0f32; nf4_num_blocks(x.len(), blocksize)];
    quantize_nf4(x, blocksize, &mut packed, &mut absmax);
    (packed, absmax)
}

fn dequantize(packed: &[u8], absmax: &[f32], blocksize: usize, n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    dequantize_nf4(packed, absmax, blocksize, &mut out);
    out
}

fn nibble(packed: &[u8], k: usize) -> u8 {
    if k % 2 == 0 {
        packed[k / 2] >> 4
    } else {
        packed[k / 2] & 0x0F
    }
}

/// The next f32 towards +∞ (f32::next_up needs Rust 1.86; the workspace supports 1.85). Finite, non-zero x only.
fn next_up(x: f32) -> f32 {
    if x > 0.0 {
        f32::from_bits(x.to_bits() + 1)
    } else {
        f32::from_bits(x.to_bits() - 1)
    }
}

fn max_gap(code: &[f32]) -> f32 {
    code.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
}

#[test]
fn code_and_thresholds_are_consistent() {
    assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]), "NF4 code sorted");
    assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
    for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
        // The kernel's literals are the midpoints of adjacent codes, to f32 precision.
        let mid = (NF4_CODE[k] as f64 + NF4_CODE[k + 1] as f64) / 2.0;
        assert!((t as f64 - mid).abs() < 1e-7, "threshold {k}: {t} vs midpoint {mid}");
    }
}

#[test]
fn decision_tree_counts_thresholds_below() {
    // The tree is a binary search: its code must be the number of thresholds strictly below x.
    let mut rng = Rng::new(11);
    let mut xs: Vec<f32> = (0..100_000).map(|_| rng.uniform_range(-1.2, 1.2) as f32).collect();
    for &t in &NF4_THRESHOLDS {
        xs.extend([t, next_up(t), -next_up(-t)]);
    }
    for x in xs {
        let below = NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8;
        assert_eq!(nf4_code_index(x), below, "x = {x:e}");
    }
    assert_eq!(nf4_code_index(f32::NAN), 0, "NaN (all-zero block) takes code 0");
}

#[test]
fn tie_at_a_threshold_goes_to_the_lower_code() {
    for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
        assert_eq!(nf4_code_index(t), k as u8, "exactly on threshold {k}");
        assert_eq!(nf4_code_index(next_up(t)), k as u8 + 1, "one ulp above threshold {k}");
    }
    // Through the kernel: with 1.0 in the block, the scale is exactly 1 and each threshold stays a tie.
    let mut x = vec![1.0f32];
    x.extend(NF4_THRESHOLDS);
    x.extend(NF4_THRESHOLDS.iter().map(|&t| next_up(t)));
    x.resize(64, 0.0);
    let (packed, absmax) = quantize(&x, 64);
    assert_eq!(absmax, [1.0]);
    for k in 0..15 {
        assert_eq!(nibble(&packed, 1 + k), k as u8, "tie {k} through quantize_nf4");
        assert_eq!(nibble(&packed, 16 + k), k as u8 + 1, "above tie {k} through quantize_nf4");
    }
}

#[test]
fn every_code_value_round_trips_exactly() {
    for scale in [1.0f32, 2.5, 0.0173, 3.0e-5, 117.0] {
        let x: Vec<f32> = NF4_CODE.iter().map(|&c| c * scale).collect();
        let (packed, absmax) = quantize(&x, 32);
        assert_eq!(absmax, [scale]);
        for k in 0..16 {
            assert_eq!(nibble(&packed, k), k as u8, "scale {scale}: code {k}");
        }
        let back = dequantize(&packed, &absmax, 32, x.len());
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn round_trip_error_is_at_most_half_the_largest_code_gap() {
    let half_gap = 0.5 * max_gap(&NF4_CODE) as f64;
    let mut rng = Rng::new(5);
    for (n, blocksize) in [(4096, 64), (1000, 32), (777, 128), (5000, 4096), (1, 64), (63, 64)] {
        let x = randn_f32(&mut rng, n, 0.02);
        let (packed, absmax) = quantize(&x, blocksize);
        let back = dequantize(&packed, &absmax, blocksize, n);
        for (i, (&v, &w)) in x.iter().zip(&back).enumerate() {
            let a = absmax[i / blocksize] as f64;
            assert!(a >= v.abs() as f64, "absmax below |x| at {i}");
            let err = (v as f64 - w as f64).abs();
            assert!(err <= half_gap * a * (1.0 + 1e-6), "n {n}, block {blocksize}, [{i}]: {v} → {w}, absmax {a}");
        }
        // Each block's largest element comes back exactly (its code is ±1).
        for (b, chunk) in x.chunks(blocksize).enumerate() {
            let i = b * blocksize
                + chunk.iter().enumerate().fold(0, |m, (j, v)| if v.abs() > chunk[m].abs() { j } else { m });
            assert_eq!(back[i], x[i], "block {b} max element");
        }
    }
}

#[test]
fn all_zero_block_stores_code_zero_like_the_cuda_kernel() {
    let mut x = vec![0.0f32; 3 * 64];
    x[64 + 5] = -0.25; // only the middle block is non-zero
    let (packed, absmax) = quantize(&x, 64);
    assert_eq!(absmax, [0.0, 0.25, 0.0]);
    assert!(packed[..32].iter().chain(&packed[64..]).all(|&b| b == 0x00), "0·(1/0) = NaN → code 0, not 7");
    assert!(packed[32..64].iter().enumerate().all(|(j, &b)| b == if j == 2 { 0x70 } else { 0x77 }));
    let back = dequantize(&packed, &absmax, 64, x.len());
    assert!(back.iter().zip(&x).all(|(a, b)| a == b), "values come back (zeros as −1.0 · 0)");
    // −1.0 · 0 = −0.0: the sign bnb's kernel produces for an all-zero block.
    assert_eq!(back[0].to_bits(), (-0.0f32).to_bits());
}

#[test]
fn subnormals_flush_to_zero_like_the_fast_math_kernels() {
    let sub = f32::MIN_POSITIVE / 4.0; // subnormal
    assert_eq!(
        (ftz(sub), ftz(-sub).to_bits(), ftz(1.5), ftz(-0.0).to_bits()),
        (0.0, (-0.0f32).to_bits(), 1.5, (-0.0f32).to_bits())
    );
    let mut x = vec![0.0f32; 3 * 64];
    // Block 0: subnormals only → absmax 0 (FMNMX.FTZ) → code 0 everywhere.
    x[..64].iter_mut().enumerate().for_each(|(i, v)| *v = sub * (i % 3) as f32);
    // Block 1: a tiny normal absmax; its subnormal neighbour scales to 0 → code 7 (IEEE arithmetic: code 5).
    let tiny = 3.5 * f32::MIN_POSITIVE;
    x[64] = tiny;
    x[65] = -0.75 * f32::MIN_POSITIVE;
    x[66] = 0.75 * tiny;
    // Normal, but its code (10) times tiny is subnormal.
    x[67] = 0.29 * tiny;
    // Block 2: absmax ≥ 2^126 makes 1/absmax subnormal → scale 0 → every code 7, the maximum's too.
    x[128] = 2.0e38;
    x[129] = -1.0e38;
    let (packed, absmax) = quantize(&x, 64);
    assert_eq!(absmax, [0.0, tiny, 2.0e38]);
    assert!(packed[..32].iter().all(|&b| b == 0x00));
    assert_eq!(packed[32], 0xF7, "max → 15, flushed subnormal → 7");
    assert_eq!(packed[33], (14 << 4) | 10, "0.75·tiny and 0.29·tiny are normal");
    assert!(packed[64..].iter().all(|&b| b == 0x77));
    // Dequantization flushes subnormal products: code 10 (0.246) · tiny is subnormal → 0.
    let back = dequantize(&packed, &absmax, 64, x.len());
    assert_eq!((back[64], back[65], back[66], back[67]), (tiny, 0.0, NF4_CODE[14] * tiny, 0.0));
    assert!(back[128..].iter().all(|&v| v == 0.0));
}

#[test]
fn odd_length_pads_the_last_low_nibble_with_a_quantized_zero() {
    let mut rng = Rng::new(8);
    let x = randn_f32(&mut rng, 65, 1.0);
    let (packed, absmax) = quantize(&x, 64);
    assert_eq!((packed.len(), absmax.len()), (33, 2));
    assert_eq!(absmax[1], x[64].abs());
    assert_eq!(packed[32], (nf4_code_index(x[64] / absmax[1]) << 4) | 7, "pad nibble = code of 0.0 = 7");
    let back = dequantize(&packed, &absmax, 64, 65);
    assert_eq!(back[64], NF4_CODE[(packed[32] >> 4) as usize] * absmax[1]);
    // A last block that is all zero pads with code 0 instead (its scale is ∞).
    let mut z = x.clone();
    z[64] = 0.0;
    let (packed, _) = quantize(&z, 64);
    assert_eq!(packed[32], 0x00);
    // Odd n inside one block (n = 7): 4 bytes, the pad is the low nibble of the last.
    let (packed, absmax) = quantize(&x[..7], 32);
    assert_eq!((packed.len(), absmax.len()), (4, 1));
    assert_eq!(packed[3] & 0x0F, 7);
}

#[test]
fn nibble_order_high_is_the_earlier_element() {
    // Hand-made bytes: 0x0F = (code 0, code 15), 0x7A = (code 7, code 10); 0xD3 = (13, 3) in block 2.
    let packed = [0x0F, 0x7A, 0xD3];
    let absmax = [2.0f32];
    let out = dequantize(&packed, &absmax, 64, 6);
    assert_eq!(out, [-2.0, 2.0, 0.0, NF4_CODE[10] * 2.0, NF4_CODE[13] * 2.0, NF4_CODE[3] * 2.0]);
    let x = [-1.0f32, 1.0, 0.0, NF4_CODE[10], NF4_CODE[13], NF4_CODE[3]];
    let (q, a) = quantize(&x, 64);
    assert_eq!((q.as_slice(), a.as_slice()), (&packed[..], &[1.0f32][..]));
}

#[test]
fn bf16_and_f16_paths_match_f32() {
    let mut rng = Rng::new(21);
    let x16: Vec<bf16> = randn_f32(&mut rng, 1001, 0.05).into_iter().map(bf16::from_f32).collect();
    let x32: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
    let (packed, absmax) = quantize(&x32, 64);
    let mut packed16 = vec![0u8; packed.len()];
    let mut absmax16 = vec![0.0f32; absmax.len()];
    quantize_nf4(&x16, 64, &mut packed16, &mut absmax16);
    assert_eq!((packed16, absmax16), (packed.clone(), absmax.clone()));
    let f32_out = dequantize(&packed, &absmax, 64, x32.len());
    let mut bf_out = vec![bf16::ZERO; x32.len()];
    dequantize_nf4(&packed, &absmax, 64, &mut bf_out);
    assert!(bf_out.iter().zip(&f32_out).all(|(b, &f)| b.to_bits() == bf16::from_f32(f).to_bits()), "one rounding");
    let mut h_out = vec![f16::ZERO; x32.len()];
    dequantize_nf4(&packed, &absmax, 64, &mut h_out);
    assert!(h_out.iter().zip(&f32_out).all(|(h, &f)| h.to_bits() == f16::from_f32(f).to_bits()));
}

/// Each row's factor multiplies its blocks' absmax (one f32 rounding) before the codes do: within one rounding of
/// the plain weight times the factor, exactly 0 for a zero factor and the plain weight for a factor of 1; the row
/// length must be whole blocks.
#[test]
fn rows_scaled_dequantization_folds_each_factor_into_its_rows_absmax() {
    let mut rng = Rng::new(23);
    let (rows, row_len, blocksize) = (5, 192, 64);
    let x = randn_f32(&mut rng, rows * row_len, 0.05);
    let (packed, absmax) = quantize(&x, blocksize);
    let plain = dequantize(&packed, &absmax, blocksize, x.len());
    let scale = [0.5f32, 1.0, 0.0, -3.25, 1.0e-3];
    let mut out = vec![f32::NAN; x.len()];
    dequantize_nf4_rows_scaled(&packed, &absmax, blocksize, &scale, row_len, &mut out);
    for (r, (row, want)) in out.chunks(row_len).zip(plain.chunks(row_len)).enumerate() {
        for (i, (&got, &w)) in row.iter().zip(want).enumerate() {
            let exact = w as f64 * scale[r] as f64;
            assert!(
                (got as f64 - exact).abs() <= 2.0 * f32::EPSILON as f64 * exact.abs(),
                "row {r} col {i}: {got} vs {exact}"
            );
            let block = (r * row_len + i) / blocksize;
            let code = nibble(&packed, r * row_len + i);
            assert_eq!(got.to_bits(), nf4_value(code, absmax[block] * scale[r]).to_bits(), "row {r} col {i}");
        }
    }
    assert!(out[2 * row_len..3 * row_len].iter().all(|&v| v == 0.0));
    assert_eq!(&out[row_len..2 * row_len], &plain[row_len..2 * row_len]);
    let mut bf_out = vec![bf16::ZERO; x.len()];
    dequantize_nf4_rows_scaled(&packed, &absmax, blocksize, &scale, row_len, &mut bf_out);
    assert!(bf_out.iter().zip(&out).all(|(b, &f)| b.to_bits() == bf16::from_f32(f).to_bits()), "one rounding");
}

#[test]
#[should_panic(expected = "whole blocks")]
fn rows_scaled_dequantization_needs_rows_of_whole_blocks() {
    let (packed, absmax) = quantize(&[0.5; 192], 64);
    dequantize_nf4_rows_scaled(&packed, &absmax, 64, &[1.0, 1.0], 96, &mut [0.0f32; 192]);
}

#[test]
#[should_panic(expected = "not a power of two")]
fn rejects_a_blocksize_bnb_does_not_have() {
    quantize(&[1.0; 96], 48);
}

/// bnb's `create_dynamic_map` as torch 2.11 evaluates it on CPU: float32 `linspace(0.1, 1, f)` whose elements are
/// `start + step·i` for the first half and `end − step·(f−1−i)` for the rest, each a fused multiply-add (ATen's
/// scalar linspace loop compiled with FMA contraction); float32 midpoints; times `(float)10^(i−6)`.
fn torch_dynamic_map(signed: bool) -> Vec<f32> {
    let linspace = |start: f32, end: f32, steps: usize| -> Vec<f32> {
        let step = (end - start) / (steps - 1) as f32;
        (0..steps)
            .map(|i| {
                if i < steps / 2 {
                    step.mul_add(i as f32, start)
                } else {
                    (-step).mul_add((steps - 1 - i) as f32, end)
                }
            })
            .collect()
    };
    let mut data = Vec::new();
    for (i, scale) in [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0].into_iter().enumerate() {
        let items = if signed { (1 << i) + 1 } else { (1 << (i + 1)) + 1 };
        let b = linspace(0.1, 1.0, items);
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|&m| scale as f32 * m));
        if signed {
            data.extend(means.iter().map(|&m| -(scale as f32) * m));
        }
    }
    data.extend([0.0, 1.0]);
    data.sort_by(f32::total_cmp);
    data
}

#[test]
fn dynamic_map_properties() {
    let s = &DYNAMIC_MAP_SIGNED;
    assert!(s.windows(2).all(|w| w[0] < w[1]), "signed map strictly increasing");
    assert_eq!((s[0], s[127], s[255]), (-0.99296875f32, 0.0, 1.0));
    // Decimal anchors of REFERENCE.md §1.7 (the f32 values widened to f64).
    let anchors = [
        (0, -0.992968738079071),
        (63, -0.10703125596046448),
        (64, -0.09859374910593033),
        (126, -5.500000384017767e-07),
        (128, 5.500000384017767e-07),
        (254, 0.992968738079071),
    ];
    for (i, v) in anchors {
        assert_eq!(s[i] as f64, v, "signed[{i}]");
    }
    assert!((0..127).all(|i| s[i] == -s[254 - i]), "negative half mirrors the positive half");
    let u = &DYNAMIC_MAP_UNSIGNED;
    assert!(u.windows(2).all(|w| w[0] < w[1]), "unsigned map strictly increasing");
    assert_eq!((u[0], u[255]), (0.0, 1.0));
}

#[test]
fn dynamic_map_is_torch_f32_construction() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&torch_dynamic_map(true)), bits(&DYNAMIC_MAP_SIGNED));
    assert_eq!(bits(&torch_dynamic_map(false)), bits(&DYNAMIC_MAP_UNSIGNED));
}

#[test]
fn eight_bit_search_finds_the_nearest_entry() {
    let mut rng = Rng::new(13);
    for code in [&DYNAMIC_MAP_SIGNED, &DYNAMIC_MAP_UNSIGNED] {
        let lo = if code[0] < 0.0 { -1.05 } else { 0.0 };
        let mut xs: Vec<f32> = (0..50_000).map(|_| rng.uniform_range(lo, 1.05) as f32).collect();
        xs.extend((0..20_000).map(|_| (rng.uniform_range(lo, 1.0) * 10f64.powi(-(rng.below(7) as i32))) as f32));
        xs.extend(code.iter().copied());
        for x in xs {
            let q = quantize_8bit_nearest(code, x) as usize;
            let d = |i: usize| (code[i] as f64 - x as f64).abs();
            let best = (0..256).map(d).fold(f64::INFINITY, f64::min);
            // The kernel's midpoint is computed in f32, so within an ulp of a midpoint either neighbour is right.
            assert!(
                d(q) <= best + 1e-7 * (1.0 + x.abs() as f64),
                "x = {x:e}: got {q} ({}), best distance {best:e}",
                code[q]
            );
        }
        for (i, &c) in code.iter().enumerate() {
            assert_eq!(quantize_8bit_nearest(code, c) as usize, i, "entry {i} maps to itself");
        }
    }
    assert_eq!(quantize_8bit_nearest(&DYNAMIC_MAP_SIGNED, f32::NAN), 0);
}

#[test]
fn nested_absmax_round_trip() {
    let mut rng = Rng::new(17);
    // absmax of 64-blocks of N(0, 0.02) weights: about 0.05 ± 0.01; 600 blocks = 3 nested blocks, the last partial.
    let absmax: Vec<f32> = (0..600).map(|_| (0.05 + 0.01 * rng.normal()).abs() as f32).collect();
    let nested = quantize_absmax_nested(&absmax);
    assert_eq!((nested.qabsmax.len(), nested.absmax2.len()), (600, 3));
    let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / 600.0;
    assert!((nested.offset as f64 - mean).abs() <= 2.0 * f32::EPSILON as f64 * mean, "offset is the mean");
    for (j, chunk) in absmax.chunks(NESTED_BLOCKSIZE).enumerate() {
        let m = chunk.iter().fold(0.0f32, |m, &a| m.max((a - nested.offset).abs()));
        assert_eq!(nested.absmax2[j], m, "absmax2[{j}]");
    }
    let mut back = vec![0.0f32; 600];
    dequantize_absmax_nested(&nested.qabsmax, &nested.absmax2, nested.offset, &DYNAMIC_MAP_SIGNED, &mut back);
    let half_gap = 0.5 * max_gap(&DYNAMIC_MAP_SIGNED) as f64;
    for (i, (&a, &b)) in absmax.iter().zip(&back).enumerate() {
        let bound = half_gap * nested.absmax2[i / NESTED_BLOCKSIZE] as f64 * (1.0 + 1e-6) + 1e-7 * a as f64;
        assert!(((a - b) as f64).abs() <= bound, "[{i}]: {a} → {b}, bound {bound:e}");
    }
    // The exact arithmetic: code · absmax2 rounded, then + offset rounded (no fused multiply-add).
    let q = nested.qabsmax[10] as usize;
    assert_eq!(back[10], DYNAMIC_MAP_SIGNED[q] * nested.absmax2[0] + nested.offset);
}

#[test]
fn nested_single_block_has_zero_scale() {
    // One NF4 block: absmax − mean = 0, so absmax2 = 0, and 0·(1/0) = NaN lands on index 0, like the kernel.
    let nested = quantize_absmax_nested(&[0.75]);
    assert_eq!(nested, NestedAbsmax { offset: 0.75, qabsmax: vec![0], absmax2: vec![0.0] });
    let mut back = [0.0f32];
    dequantize_absmax_nested(&nested.qabsmax, &nested.absmax2, nested.offset, &DYNAMIC_MAP_SIGNED, &mut back);
    assert_eq!(back, [0.75]);
}

#[test]
fn mean_multiplies_by_the_f32_reciprocal() {
    assert_eq!(absmax_mean(&[1.0, 2.0, 3.0, 4.0]), 2.5);
    // n = 3: torch's CUDA mean is sum · (1.0f / 3), not sum / 3.
    let a = [0.1f32, 0.2, 0.35];
    let sum = (a.iter().map(|&v| v as f64).sum::<f64>()) as f32;
    assert_eq!(absmax_mean(&a).to_bits(), (sum * (1.0f32 / 3.0)).to_bits());
}

#[test]
fn bits_per_param() {
    let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
    let n = 4096 * 4096;
    assert_eq!(nf4_bits_per_param(n, 64, false), 4.5);
    assert_eq!(round3(nf4_bits_per_param(n, 64, true)), 4.127);
    assert_eq!(nf4_bits_per_param(n, 128, false), 4.25);
    // Small tensors pay for the offset and the padding: 7 elements = 4 bytes + one f32 absmax.
    assert_eq!(nf4_bits_per_param(7, 64, false), (32.0 + 32.0) / 7.0);
}

#[test]
fn bit_identical_across_thread_counts() {
    let mut rng = Rng::new(23);
    let n = (1 << 17) + 37;
    let x = randn_f32(&mut rng, n, 0.02);
    let run = |threads| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(|| {
            let (packed, absmax) = quantize(&x, 64);
            let nested = quantize_absmax_nested(&absmax);
            let mut rebuilt = vec![0.0f32; absmax.len()];
            dequantize_absmax_nested(
                &nested.qabsmax,
                &nested.absmax2,
                nested.offset,
                &DYNAMIC_MAP_SIGNED,
                &mut rebuilt,
            );
            let out = dequantize(&packed, &rebuilt, 64, n);
            (
                packed,
                absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                nested,
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            )
        })
    };
    let one = run(1);
    for threads in [2, 4] {
        assert!(run(threads) == one, "{threads} threads vs 1");
    }
}
