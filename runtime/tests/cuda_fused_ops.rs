//! Fused ops against the unfused ops they replace, on every device through `test_device!`: `add_rms_norm` (the
//! residual add and the norm that reads it) forward and backward equal `add` then `rms_norm` and the tape's sum of
//! the two gradients — bit for bit on the CPU, where the fused op is the same arithmetic in the same order; within
//! [`F32`] in f32 and [`BF16`] in bf16 on CUDA, where the fused kernel reduces each row in another order (and in
//! bf16 rounds h once, as the unfused add stores it); the norm of the fused op's own h is its y, bit for bit
//! everywhere. Odd row widths, both norm offsets (Llama's w, Gemma's 1 + w),
//! and the weight's gradient wanted or not. `rope_qk` (q and k in one launch) and its backward against `rope` of
//! each, bit for bit; `glu_matmul_t` (an MLP's GLU and down_proj adapter's U, one launch for a decoding step) against
//! `glu` then `matmul`, and `rms_norm_matmul_t` (a layer's norm and the adapters' U after it) against the norm then
//! `matmul`, bit for bit. Decoding's NF4 GEMV against the GEMM with the dequantized weight, and LoRA's fused dropout
//! products against dropout and the products.

use qlora_runtime::ops::activation::{glu, glu_matmul_t, Glu};
use qlora_runtime::ops::elementwise::add;
use qlora_runtime::ops::linalg::matmul;
use qlora_runtime::ops::rms_norm::{add_rms_norm, rms_norm, rms_norm_backward, rms_norm_matmul_t};
use qlora_runtime::ops::rope::{rope, rope_backward, rope_qk, rope_qk_backward, rope_qkv_into, rope_tables};
use qlora_runtime::testing::{assert_close, Tolerance};
use qlora_runtime::{test_device, DType, Device, Rng, Tensor};

/// f32 on CUDA: the same f32 arithmetic, rows reduced in another order (a few ulps on rstd, carried to y and dx).
const F32: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };
/// bf16 on CUDA: both paths round to bf16 (unit roundoff 2⁻⁹); one rounding of difference per element.
const BF16: Tolerance = Tolerance { abs: 1e-2, rel: 1e-2 };

fn values(t: &Tensor) -> Vec<f64> {
    t.to_device(Device::Cpu).unwrap().to_vec::<f64>()
}

fn fused_add_rms_norm_equals_add_then_rms_norm(device: Device) {
    let mut rng = Rng::new(21);
    let dtypes: &[DType] = if device == Device::Cpu { &[DType::F32] } else { &[DType::F32, DType::BF16] };
    for &dtype in dtypes {
        for (rows, dim) in [(1, 8), (5, 96), (3, 1000), (7, 2048), (2, 4101)] {
            for offset in [0.0, 1.0] {
                let t = |shape: &[usize], rng: &mut Rng| {
                    Tensor::randn(shape, 1.0, DType::F32, rng).to_dtype(dtype).to_device(device).unwrap()
                };
                let (x, r, w) = (t(&[rows, dim], &mut rng), t(&[rows, dim], &mut rng), t(&[dim], &mut rng));
                let (dy, dh) = (t(&[rows, dim], &mut rng), t(&[rows, dim], &mut rng));
                let [h, y, rstd] = add_rms_norm(&x, &r, &w, 1e-6, offset).unwrap();
                // The norm of the fused op's own h is its y, bit for bit on every device (one row kernel): what a
                // LoRA group after it relies on to form y again from h (`Tape::lora_linear_group_of`).
                let (y_of_h, rstd_of_h) = rms_norm(&h, &w, 1e-6, offset).unwrap();
                let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y_of_h), bits(&y), "{dtype:?} {rows}×{dim} offset {offset}: y of h");
                assert_eq!(bits(&rstd_of_h), bits(&rstd), "{dtype:?} {rows}×{dim} offset {offset}: rstd of h");
                let h_ref = add(&x, &r).unwrap();
                let (y_ref, rstd_ref) = rms_norm(&h_ref, &w, 1e-6, offset).unwrap();
                for need_dw in [false, true] {
                    let (dx, dw) = rms_norm_backward(&h, &w, &rstd, &dy, Some(&dh), offset, need_dw).unwrap();
                    let (dnorm, dw_ref) = rms_norm_backward(&h_ref, &w, &rstd_ref, &dy, None, offset, need_dw).unwrap();
                    let dx_ref = add(&dh, &dnorm).unwrap();
                    assert_eq!(dw.is_some(), need_dw);
                    let what = format!("{dtype:?} {rows}×{dim} offset {offset}");
                    let pairs =
                        [("h", &h, &h_ref), ("y", &y, &y_ref), ("rstd", &rstd, &rstd_ref), ("dx", &dx, &dx_ref)];
                    let mut pairs: Vec<(&str, &Tensor, &Tensor)> = pairs.to_vec();
                    if let (Some(a), Some(b)) = (&dw, &dw_ref) {
                        pairs.push(("dw", a, b));
                    }
                    for (name, got, want) in pairs {
                        assert_eq!(got.shape(), want.shape(), "{what} {name}");
                        if device == Device::Cpu {
                            assert_eq!(values(got), values(want), "{what} {name}: the same bits on the CPU");
                        } else {
                            let tol = if dtype == DType::BF16 { BF16 } else { F32 };
                            assert_close(&format!("{what} {name}"), &values(got), &values(want), tol);
                        }
                    }
                }
            }
        }
    }
}
test_device!(
    fused_add_rms_norm_equals_add_then_rms_norm,
    fused_add_rms_norm_equals_add_then_rms_norm_cpu,
    fused_add_rms_norm_equals_add_then_rms_norm_cuda
);

fn fused_rope_qk_equals_rope_of_each(device: Device) {
    let mut rng = Rng::new(22);
    let dtypes: &[DType] = if device == Device::Cpu { &[DType::F32] } else { &[DType::F32, DType::BF16] };
    for &dtype in dtypes {
        // (tokens, q heads, k heads, head_dim): the vector path (half a multiple of 8) and the scalar one.
        for (tokens, q_heads, k_heads, head_dim) in [(1, 32, 8, 128), (7, 4, 2, 64), (5, 3, 1, 80), (3, 2, 2, 6)] {
            let positions: Vec<i32> = (0..tokens).map(|_| rng.below(4096) as i32).collect();
            let inv_freq: Vec<f32> =
                (0..head_dim / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / head_dim as f32)).collect();
            let (cos, sin) = rope_tables(
                &Tensor::from_vec(positions, &[tokens]).unwrap(),
                &Tensor::from_vec(inv_freq, &[head_dim / 2]).unwrap(),
            )
            .unwrap();
            let (cos, sin) = (cos.to_device(device).unwrap(), sin.to_device(device).unwrap());
            let t = |heads: usize, rng: &mut Rng| {
                let shape = [tokens, heads, head_dim];
                Tensor::randn(&shape, 1.0, DType::F32, rng).to_dtype(dtype).to_device(device).unwrap()
            };
            let (q, k) = (t(q_heads, &mut rng), t(k_heads, &mut rng));
            let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let what = format!("{dtype:?} {tokens} tokens, heads {q_heads}/{k_heads}, head_dim {head_dim}");
            let [yq, yk] = rope_qk(&q, &k, &cos, &sin).unwrap();
            assert_eq!(bits(&yq), bits(&rope(&q, &cos, &sin).unwrap()), "{what}: q");
            assert_eq!(bits(&yk), bits(&rope(&k, &cos, &sin).unwrap()), "{what}: k");
            let [dq, dk] = rope_qk_backward(&q, &k, &cos, &sin).unwrap();
            assert_eq!(bits(&dq), bits(&rope_backward(&q, &cos, &sin).unwrap()), "{what}: dq");
            assert_eq!(bits(&dk), bits(&rope_backward(&k, &cos, &sin).unwrap()), "{what}: dk");
            // Into a KV cache's buffers of `rows` rows from row `at`: the rows before and after keep their values.
            let (rows, at, row) = (tokens + 5, 3, k_heads * head_dim);
            let v = t(k_heads, &mut rng);
            let before = |rng: &mut Rng| {
                Tensor::randn(&[rows, row], 1.0, DType::F32, rng).to_dtype(dtype).to_device(device).unwrap()
            };
            let (k_old, v_old) = (before(&mut rng), before(&mut rng));
            let (k_was, v_was) = (bits(&k_old), bits(&v_old));
            // Clones share the buffers: the write must copy them first rather than change what k_old and v_old hold.
            let (mut k_dst, mut v_dst) = (k_old.clone(), v_old.clone());
            let q_rotated = rope_qkv_into([&q, &k, &v], &cos, &sin, [&mut k_dst, &mut v_dst], at).unwrap();
            assert_eq!(bits(&q_rotated), bits(&yq), "{what}: q, with the cache's writes");
            let spliced =
                |old: &[u64], new: &Tensor| [&old[..at * row], &bits(new)[..], &old[(at + tokens) * row..]].concat();
            assert_eq!(bits(&k_dst), spliced(&k_was, &yk), "{what}: k rotated into rows {at}..");
            assert_eq!(bits(&v_dst), spliced(&v_was, &v), "{what}: v copied into rows {at}..");
            assert_eq!((bits(&k_old), bits(&v_old)), (k_was, v_was), "{what}: the clones kept their values");
        }
    }
}

test_device!(
    fused_rope_qk_equals_rope_of_each,
    fused_rope_qk_equals_rope_of_each_cpu,
    fused_rope_qk_equals_rope_of_each_cuda
);

fn fused_glu_matmul_t_equals_glu_then_matmul(device: Device) {
    let mut rng = Rng::new(23);
    let dtypes: &[DType] = if device == Device::Cpu { &[DType::F32] } else { &[DType::F32, DType::BF16] };
    for &dtype in dtypes {
        // (rows, n, k): a decoding step's rows, which one launch takes on CUDA (the 1B's down_proj adapter, several
        // sequences), and shapes it does not take (the 8B's longer rows, many rows, a short or odd k).
        for (rows, n, k) in
            [(1, 16, 8192), (3, 32, 2048), (8, 5, 264), (1, 16, 14336), (12, 16, 512), (2, 16, 100), (1, 7, 1001)]
        {
            let t = |shape: &[usize], rng: &mut Rng| {
                Tensor::randn(shape, 1.0, DType::F32, rng).to_dtype(dtype).to_device(device).unwrap()
            };
            let (gate, up, b) = (t(&[rows, k], &mut rng), t(&[rows, k], &mut rng), t(&[n, k], &mut rng));
            let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for kind in [Glu::SwiGlu, Glu::GeGlu] {
                let what = format!("{dtype:?} {kind:?} [{rows}, {k}]·[{n}, {k}]ᵀ");
                let (x, u) = glu_matmul_t(kind, &gate, &up, &b).unwrap();
                let want_x = glu(kind, &gate, &up).unwrap();
                let want_u = matmul(&want_x, &b.t().unwrap()).unwrap();
                assert_eq!((x.shape(), u.shape()), (&[rows, k][..], &[rows, n][..]), "{what}: shapes");
                assert_eq!(bits(&x), bits(&want_x), "{what}: x");
                assert_eq!(bits(&u), bits(&want_u), "{what}: x·bᵀ");
            }
        }
        let t = |shape: &[usize]| Tensor::zeros(shape, dtype).to_device(device).unwrap();
        for (gate, up, b) in [([1, 64], [1, 64], [4, 32]), ([1, 64], [2, 64], [4, 64])] {
            let err = glu_matmul_t(Glu::SwiGlu, &t(&gate), &t(&up), &t(&b)).unwrap_err().to_string();
            assert!(err.contains("glu_matmul_t"), "gate {gate:?}, up {up:?}, b {b:?}: {err}");
        }
    }
}

test_device!(
    fused_glu_matmul_t_equals_glu_then_matmul,
    fused_glu_matmul_t_equals_glu_then_matmul_cpu,
    fused_glu_matmul_t_equals_glu_then_matmul_cuda
);

fn fused_rms_norm_matmul_t_equals_norm_then_matmul(device: Device) {
    let mut rng = Rng::new(24);
    let dtypes: &[DType] = if device == Device::Cpu { &[DType::F32] } else { &[DType::F32, DType::BF16] };
    for &dtype in dtypes {
        // (rows, n, dim): decoding's rows, which one launch takes on CUDA (the 8B's q/k/v adapters, SmolLM2's width),
        // and shapes it does not take (many rows, rows past 4096, an odd width).
        for (rows, n, dim) in [(1, 48, 4096), (3, 32, 576), (8, 16, 2048), (12, 16, 512), (1, 16, 8192), (2, 8, 1001)] {
            let t = |shape: &[usize], rng: &mut Rng| {
                Tensor::randn(shape, 1.0, DType::F32, rng).to_dtype(dtype).to_device(device).unwrap()
            };
            let (x, r, w, a) =
                (t(&[rows, dim], &mut rng), t(&[rows, dim], &mut rng), t(&[dim], &mut rng), t(&[n, dim], &mut rng));
            let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for offset in [0.0, 1.0] {
                let what = format!("{dtype:?} offset {offset} [{rows}, {dim}]·[{n}, {dim}]ᵀ");
                let [h, y, u] = rms_norm_matmul_t(&x, Some(&r), &w, (1e-6, offset), &a).unwrap();
                let [want_h, want_y, _] = add_rms_norm(&x, &r, &w, 1e-6, offset).unwrap();
                let want_u = matmul(&want_y, &a.t().unwrap()).unwrap();
                assert_eq!(u.shape(), &[rows, n], "{what}: product's shape");
                assert_eq!(bits(&h), bits(&want_h), "{what}: h");
                assert_eq!(bits(&y), bits(&want_y), "{what}: y");
                assert_eq!(bits(&u), bits(&want_u), "{what}: y·aᵀ");
                // Without a residual, h is x.
                let [h, y, u] = rms_norm_matmul_t(&x, None, &w, (1e-6, offset), &a).unwrap();
                let want_y = rms_norm(&x, &w, 1e-6, offset).unwrap().0;
                let want_u = matmul(&want_y, &a.t().unwrap()).unwrap();
                assert_eq!(bits(&h), bits(&x), "{what}, no residual: h");
                assert_eq!(bits(&y), bits(&want_y), "{what}, no residual: y");
                assert_eq!(bits(&u), bits(&want_u), "{what}, no residual: y·aᵀ");
            }
        }
        let t = |shape: &[usize]| Tensor::zeros(shape, dtype).to_device(device).unwrap();
        for (x, r, w, a) in
            [([1, 64], [1, 64], [64], [4, 32]), ([1, 64], [2, 64], [64], [4, 64]), ([1, 64], [1, 64], [32], [4, 64])]
        {
            let err = rms_norm_matmul_t(&t(&x), Some(&t(&r)), &t(&w), (1e-6, 0.0), &t(&a)).unwrap_err().to_string();
            assert!(err.contains("rms_norm_matmul_t"), "x {x:?}, residual {r:?}, weight {w:?}, a {a:?}: {err}");
        }
    }
}

test_device!(
    fused_rms_norm_matmul_t_equals_norm_then_matmul,
    fused_rms_norm_matmul_t_equals_norm_then_matmul_cpu,
    fused_rms_norm_matmul_t_equals_norm_then_matmul_cuda
);

/// Decoding's product against an NF4 weight, x·Wᵀ read packed (`Nf4Weight::gemv`), equals x times the dequantized
/// weight (dequantized in f32): on the CPU within the rounding of a sum, on CUDA within f32 summation error (f32)
/// and the output's bf16 rounding (bf16); rows 1 to 8, plain and double-quantized scales, a width off the
/// vector path; more than 8 rows or a wrong width is an error. With LoRA's up-projection (U a column block of a wider
/// U, as a projection group's is), the result is x·Wᵀ + s·U·Bᵀ, and the same bits in a group of weights as alone; U
/// and B of the wrong shapes are errors.
fn nf4_gemv_equals_x_times_the_dequantized_weight(device: Device) {
    use qlora_runtime::ops::linalg::{matmul, matmul_into};
    use qlora_runtime::quant::{LoraUp, Nf4Weight, GEMV_MAX_ROWS};
    let mut rng = Rng::new(22);
    for (out_f, in_f, double_quant) in [(40, 256, false), (33, 4096, true), (9, 100, true), (7, 14336, false)] {
        let w = Tensor::randn(&[out_f, in_f], 0.05, DType::F32, &mut rng);
        let w4 = Nf4Weight::quantize(&w, 64, double_quant).unwrap().to_device(device).unwrap();
        let dtypes: &[DType] = if device == Device::Cpu { &[DType::F32] } else { &[DType::F32, DType::BF16] };
        // The kernel multiplies by absmax × code in f32, never rounded to bf16: the reference does too, so a bf16
        // result differs from it by its own rounding and f32 summation order, not by 4096 weight roundings.
        let dense = w4.dequantize(DType::F32).unwrap();
        for &dtype in dtypes {
            for rows in 1..=GEMV_MAX_ROWS {
                let x =
                    Tensor::randn(&[rows, in_f], 1.0, DType::F32, &mut rng).to_dtype(dtype).to_device(device).unwrap();
                let got = w4.gemv(&x, None).unwrap();
                assert_eq!((got.shape(), got.dtype(), got.device()), (&[rows, out_f][..], dtype, device));
                let want = matmul(&x.to_dtype(DType::F32), &dense.t().unwrap()).unwrap();
                let tol = if dtype == DType::BF16 { BF16 } else { F32 };
                assert_close(&format!("gemv {rows}x[{out_f}, {in_f}] {dtype:?}"), &values(&got), &values(&want), tol);
                let on = |t: Tensor| t.to_dtype(dtype).to_device(device).unwrap();
                let wide = on(Tensor::randn(&[rows, 40], 1.0, DType::F32, &mut rng));
                let (u, b) =
                    (wide.narrow(1, 16, 8).unwrap(), on(Tensor::randn(&[out_f, 8], 0.5, DType::F32, &mut rng)));
                let got = w4.gemv(&x, Some(LoraUp { u: &u, b: &b, alpha: 0.75 })).unwrap();
                let mut want = want;
                let (u32, b32) = (u.to_dtype(DType::F32), b.to_dtype(DType::F32));
                matmul_into(&mut want, &u32, &b32.t().unwrap(), 0.75, 1.0).unwrap();
                let what = format!("gemv + LoRA {rows}x[{out_f}, {in_f}] {dtype:?}");
                assert_close(&what, &values(&got), &values(&want), tol);
                // A group (one launch on a GPU) gives each weight's bits as its own call does.
                let group = [(&w4, Some(LoraUp { u: &u, b: &b, alpha: 0.75 })), (&w4, None)];
                let both = Nf4Weight::gemv_group(&group, &x).unwrap();
                assert_eq!(values(&both[0]), values(&got), "{what}: in a group");
                assert_eq!(values(&both[1]), values(&w4.gemv(&x, None).unwrap()), "{what}: in a group, no LoRA");
                let bad = LoraUp { u: &u, b: &wide, alpha: 1.0 };
                assert!(w4.gemv(&x, Some(bad)).unwrap_err().to_string().contains("LoRA U"), "{what}: bad shapes");
            }
        }
        let too_many = Tensor::zeros(&[GEMV_MAX_ROWS + 1, in_f], DType::F32).to_device(device).unwrap();
        assert!(w4.gemv(&too_many, None).unwrap_err().to_string().contains("expected [1..=8"));
        let wrong = Tensor::zeros(&[1, in_f + 1], DType::F32).to_device(device).unwrap();
        assert!(w4.gemv(&wrong, None).is_err());
    }
}
test_device!(
    nf4_gemv_equals_x_times_the_dequantized_weight,
    nf4_gemv_equals_x_times_the_dequantized_weight_cpu,
    nf4_gemv_equals_x_times_the_dequantized_weight_cuda
);

/// LoRA's products through a dropout mask, fused on a GPU in bf16 (`ops::lora`): dropout(x)·Aᵀ and dx +=
/// dropout(du·A) equal dropout and the products as separate ops in f32 on the CPU, from the same bf16 values —
/// within [`BF16`] (the fused kernels sum in f32 and round once; an element on the wrong side of the mask would be off
/// by its whole value). Ranks 1 to 64 (each kernel tile), widths on and off the 8-wide vector path and past one
/// 256-column chunk, rows not a multiple of a block's, p = 0 (nothing dropped) to 0.5; a wrong shape or p is an error.
fn lora_dropout_products_equal_dropout_then_the_products(device: Device) {
    use qlora_runtime::ops::elementwise::{add, dropout};
    use qlora_runtime::ops::linalg::matmul;
    use qlora_runtime::ops::lora::{dropout_matmul_accumulate, dropout_matmul_t};
    let mut rng = Rng::new(23);
    let dtype = if device == Device::Cpu { DType::F32 } else { DType::BF16 };
    let tol = if dtype == DType::BF16 { BF16 } else { F32 };
    for (rows, cols, r, p) in
        [(37, 264, 16, 0.1), (5, 77, 1, 0.5), (300, 512, 20, 0.05), (64, 4096, 64, 0.3), (9, 8, 33, 0.0)]
    {
        let what = format!("[{rows}, {cols}] r {r} p {p}");
        // The operands as the device holds them, and the same values in f32 on the CPU.
        let make = |shape: &[usize], rng: &mut Rng| {
            let t = Tensor::randn(shape, 1.0, DType::F32, rng).to_dtype(dtype);
            (t.to_device(device).unwrap(), t.to_dtype(DType::F32))
        };
        let ((x, x32), (a, a32), (du, du32), (dx0, dx32)) = (
            make(&[rows, cols], &mut rng),
            make(&[r, cols], &mut rng),
            make(&[rows, r], &mut rng),
            make(&[rows, cols], &mut rng),
        );
        let seed = 1000 + rows as u64;
        let u = dropout_matmul_t(&x, &a, p, seed).unwrap();
        assert_eq!((u.shape(), u.dtype(), u.device()), (&[rows, r][..], dtype, device), "{what}");
        let want = matmul(&dropout(&x32, p, seed).unwrap(), &a32.t().unwrap()).unwrap();
        assert_close(&format!("dropout(x)·Aᵀ {what}"), &values(&u), &values(&want), tol);

        let mut dx = dx0.clone();
        dropout_matmul_accumulate(&mut dx, &du, &a, p, seed).unwrap();
        let want = add(&dx32, &dropout(&matmul(&du32, &a32).unwrap(), p, seed).unwrap()).unwrap();
        assert_close(&format!("dx + dropout(du·A) {what}"), &values(&dx), &values(&want), tol);
        assert_eq!(values(&dx0), values(&dx32), "{what}: the accumulation wrote into a copy, not the shared input");

        let e = dropout_matmul_t(&x, &du, p, seed).unwrap_err().to_string();
        assert!(e.contains("[rows, cols] and [r, cols]"), "{what}: {e}");
        assert!(dropout_matmul_accumulate(&mut dx, &x, &a, p, seed).is_err(), "{what}: du of the wrong shape");
        assert!(dropout_matmul_t(&x, &a, 1.0, seed).unwrap_err().to_string().contains("p must be in [0, 1)"));
    }
}
test_device!(
    lora_dropout_products_equal_dropout_then_the_products,
    lora_dropout_products_equal_dropout_then_the_products_cpu,
    lora_dropout_products_equal_dropout_then_the_products_cuda
);

/// LoRA's adapter gradients for a block of projections sharing U (`lora_grads`) equal dU from `matmul_columns` and
/// each dB from `matmul_scaled(dyᵀ, Uᵢ)`, the ops the LoRA group took before: on a GPU in bf16 through one read of each
/// dy (within [`BF16`]), from U read in place as a column block of a wider U; shapes the kernel does not take (a rank
/// of 20, a width off the 8-element rows) go through the GEMMs; a U of the wrong width is an error.
fn lora_grads_equal_the_two_products(device: Device) {
    use qlora_runtime::ops::linalg::{matmul_columns, matmul_scaled};
    use qlora_runtime::ops::lora::lora_grads;
    let mut rng = Rng::new(29);
    let dtype = if device == Device::Cpu { DType::F32 } else { DType::BF16 };
    let tol = if dtype == DType::BF16 { BF16 } else { F32 };
    // (rows, [(out, r)] of the block, U's columns before the block's)
    type Case = (usize, &'static [(usize, usize)], usize);
    let cases: [Case; 4] = [
        (300, &[(1024, 16), (136, 16), (136, 16)], 0),
        (77, &[(520, 32)], 16),
        (9, &[(77, 16)], 0),
        (40, &[(64, 20), (48, 20)], 0),
    ];
    for (rows, block, lead) in cases {
        let what = format!("{rows} rows, block {block:?}, U from column {lead}");
        let make = |shape: &[usize], scale: f64, rng: &mut Rng| {
            let t = Tensor::randn(shape, scale, DType::F32, rng).to_dtype(dtype);
            (t.to_device(device).unwrap(), t.to_dtype(DType::F32))
        };
        let width: usize = block.iter().map(|&(_, r)| r).sum();
        let (u_lane, u32_lane) = make(&[rows, lead + width + 8], 1.0, &mut rng);
        let (u, u32) = (u_lane.narrow(1, lead, width).unwrap(), u32_lane.narrow(1, lead, width).unwrap());
        let (mut dys, mut bs) = (Vec::new(), Vec::new());
        for &(out, r) in block {
            dys.push(make(&[rows, out], 1.0, &mut rng));
            bs.push(make(&[out, r], 0.1, &mut rng));
        }
        let scales = [0.5, 2.0, 1.25];
        let on = |i: usize, f32s: bool| {
            let (dy, b) = if f32s { (&dys[i].1, &bs[i].1) } else { (&dys[i].0, &bs[i].0) };
            (dy, b, scales[i])
        };
        let products: Vec<_> = (0..block.len()).map(|i| on(i, false)).collect();
        let reference: Vec<_> = (0..block.len()).map(|i| on(i, true)).collect();
        let (du, dbs) = lora_grads(&products, &u).unwrap();
        assert_eq!((du.shape(), du.dtype(), du.device()), (&[rows, width][..], dtype, device), "{what}");
        assert_close(&format!("dU {what}"), &values(&du), &values(&matmul_columns(&reference).unwrap()), tol);
        let mut col = 0;
        for (i, &(_, r)) in block.iter().enumerate() {
            let want = matmul_scaled(&dys[i].1.t().unwrap(), &u32.narrow(1, col, r).unwrap(), scales[i]).unwrap();
            assert_close(&format!("dB{i} {what}"), &values(&dbs[i]), &values(&want), tol);
            col += r;
        }
        let e = lora_grads(&products, &u_lane).unwrap_err().to_string();
        assert!(e.contains(&format!("ranks summing to {width}")), "{what}: {e}");
        let flat = Tensor::zeros_on(&[rows * width], dtype, device).unwrap();
        let e = lora_grads(&products, &flat).unwrap_err().to_string();
        assert!(e.contains("must be a matrix"), "{what}: {e}");
        let e = lora_grads(&products, &u.narrow(0, 1, rows - 1).unwrap()).unwrap_err().to_string();
        assert!(e.contains("dy ["), "{what}: rows that do not match: {e}");
    }
}
test_device!(
    lora_grads_equal_the_two_products,
    lora_grads_equal_the_two_products_cpu,
    lora_grads_equal_the_two_products_cuda
);
