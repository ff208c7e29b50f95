//! GPU parity (STYLE.md §12, tier 3): every CUDA kernel against its CPU twin on fresh random inputs, at several
//! shapes (odd ones included), in f32 and bf16. Outputs start as NaN, so an element a kernel forgets to write fails.
//!
//! The CPU twin of a bf16 kernel is the f32 CPU kernel on the widened inputs, its outputs rounded once to bf16: what
//! the GPU does in registers. Tolerances: f32 `Tolerance::F32` (same operations, fused multiply-adds and libm vs CUDA
//! math differ in the last bits), [`REDUCED`] where a sum runs in another order, bf16 `Tolerance::BF16` (one rounding
//! of nearly equal values can land one bf16 ulp apart), and exact where the kernel promises the CPU's bits.
//!
//! Each test prints `qlora-gpu: <test>: ran on cuda:0 (...)` or `qlora-gpu: <test>: skipped: <why>`; without a GPU
//! they skip (and pass), unless QLORA_REQUIRE_GPU=1, which makes a missing GPU a failure (scripts/gpu-check.sh sets
//! it on the GPU machine).

use half::bf16;
use qlora_kernels::attention::{self, AttentionParams};
use qlora_kernels::cuda::{self, CudaDevice, DeviceBuffer, Error, GpuFloat};
use qlora_kernels::matmul::Gemm;
use qlora_kernels::testing::{assert_close, gpu, Tolerance};
use qlora_kernels::{
    activation, adamw, cross_entropy, elementwise, embedding, matmul, nf4, reduce, rms_norm, rope, Rng,
};

/// f32 outputs that depend on a sum over hundreds to thousands of terms, which the GPU adds in another order.
const REDUCED: Tolerance = Tolerance { abs: 1e-4, rel: 1e-4 };
/// The kernel promises the CPU's bits.
const EXACT: Tolerance = Tolerance { abs: 0.0, rel: 0.0 };

/// Element counts: one element, odd sizes, and more than one grid-stride pass of small grids.
const LENS: [usize; 5] = [1, 7, 1000, 4099, 70_001];
/// (rows, dim) of row kernels: single elements, dims below, at and past the block size, odd everywhere.
const ROWS: [(usize, usize); 6] = [(1, 1), (3, 5), (7, 17), (4, 257), (33, 1000), (2, 4099)];

/// The I/O types under test.
trait Elem: GpuFloat {
    const NAME: &'static str;
    const TOL: Tolerance;
    /// This type's tolerance for a kernel whose f32 tolerance is `f32_tol` (looser or exact per kernel).
    fn tol(f32_tol: Tolerance) -> Tolerance;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const TOL: Tolerance = Tolerance::F32;
    fn tol(f32_tol: Tolerance) -> Tolerance {
        f32_tol
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    const TOL: Tolerance = Tolerance::BF16;
    fn tol(_: Tolerance) -> Tolerance {
        Tolerance::BF16
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// `n` values `scale·N(0, 1)`, in T.
fn randn<T: Elem>(rng: &mut Rng, n: usize, scale: f64) -> Vec<T> {
    (0..n).map(|_| T::from_f32((scale * rng.normal()) as f32)).collect()
}

fn widen<T: Elem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|&x| x.to_f32()).collect()
}

fn narrow<T: Elem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn upload<T: cuda::DeviceCopy>(dev: &CudaDevice, v: &[T]) -> DeviceBuffer<T> {
    dev.upload(v).expect("upload")
}

/// A buffer of `n` NaNs: every element the kernel leaves unwritten fails the comparison.
fn poisoned<T: Elem>(dev: &CudaDevice, n: usize) -> DeviceBuffer<T> {
    upload(dev, &vec![T::from_f32(f32::NAN); n])
}

/// Compares a device buffer with the CPU twin's f32 result rounded to T.
#[track_caller]
fn check<T: Elem>(what: &str, got: &DeviceBuffer<T>, want: &[f32], tol: Tolerance) {
    let got: Vec<f64> = got.to_vec().expect("download").iter().map(|&v| v.to_f32() as f64).collect();
    let want: Vec<f64> = want.iter().map(|&v| T::from_f32(v).to_f32() as f64).collect();
    assert_close(&format!("{what} [{}]", T::NAME), &got, &want, tol);
}

/// Runs a generic case for f32 then bf16.
macro_rules! both_dtypes {
    ($case:ident, $dev:expr, $rng:expr) => {{
        $case::<f32>($dev, $rng);
        $case::<bf16>($dev, $rng);
    }};
}

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    // On a machine without CUDA this returns the driver error; with a GPU, an ordinal past the last one errs.
    let count = cuda::device_count();
    let result = CudaDevice::new(count.as_ref().map_or(0, |&c| c));
    let err = result.expect_err("no device at this ordinal");
    assert!(matches!(err, Error::NoDriver { .. } | Error::DriverTooOld { .. } | Error::NoDevice { .. }), "{err}");
    println!("qlora-gpu: no_gpu_is_an_error_not_a_panic: {err}");
}

#[test]
fn elementwise_matches_cpu() {
    let Some(dev) = gpu("elementwise_matches_cpu") else { return };
    both_dtypes!(elementwise_case, &dev, &mut Rng::new(1));
}

fn elementwise_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for n in LENS {
        let (a, b) = (randn::<T>(rng, n, 1.0), randn::<T>(rng, n, 1.0));
        let (aw, bw) = (widen(&a), widen(&b));
        let (ga, gb) = (upload(dev, &a), upload(dev, &b));
        let mut want = vec![0.0f32; n];
        let mut out = poisoned::<T>(dev, n);
        cuda::elementwise::add(&ga, &gb, &mut out).unwrap();
        elementwise::add(&aw, &bw, &mut want);
        check(&format!("add n={n}"), &out, &want, T::TOL);

        let mut out = poisoned::<T>(dev, n);
        cuda::elementwise::mul(&ga, &gb, &mut out).unwrap();
        elementwise::mul(&aw, &bw, &mut want);
        check(&format!("mul n={n}"), &out, &want, T::TOL);

        let mut out = poisoned::<T>(dev, n);
        cuda::elementwise::scale(&ga, -1.5, &mut out).unwrap();
        elementwise::scale(&aw, -1.5, &mut want);
        check(&format!("scale n={n}"), &out, &want, T::TOL);

        // The mask must match exactly: a zero against a kept value is far outside any tolerance.
        let mut out = poisoned::<T>(dev, n);
        let keep = (1.0 / 0.7) as f32;
        cuda::elementwise::dropout(&ga, 0.3, 99 + n as u64, keep, &mut out).unwrap();
        elementwise::dropout(&aw, 0.3, 99 + n as u64, keep, &mut want);
        check(&format!("dropout n={n}"), &out, &want, T::TOL);

        let mut y = upload(dev, &b);
        cuda::elementwise::axpy(0.25, &ga, &mut y).unwrap();
        let mut want = bw.clone();
        elementwise::axpy(0.25, &aw, &mut want);
        check(&format!("axpy n={n}"), &y, &want, T::TOL);
    }
    for (rows, cols) in ROWS {
        let (x, bias) = (randn::<T>(rng, rows * cols, 1.0), randn::<T>(rng, cols, 1.0));
        let mut gx = upload(dev, &x);
        cuda::elementwise::add_bias(&mut gx, &upload(dev, &bias)).unwrap();
        let mut want = widen(&x);
        elementwise::add_bias(&mut want, &widen(&bias));
        check(&format!("add_bias {rows}x{cols}"), &gx, &want, T::TOL);
    }
}

#[test]
fn activations_match_cpu() {
    let Some(dev) = gpu("activations_match_cpu") else { return };
    both_dtypes!(activation_case, &dev, &mut Rng::new(2));
}

type CpuUnary = fn(&[f32], &mut [f32]);
type CpuBinary = fn(&[f32], &[f32], &mut [f32]);
type CpuGluBackward = fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32]);
type GpuUnary<T> = fn(&DeviceBuffer<T>, &mut DeviceBuffer<T>) -> cuda::Result<()>;
type GpuBinary<T> = fn(&DeviceBuffer<T>, &DeviceBuffer<T>, &mut DeviceBuffer<T>) -> cuda::Result<()>;
type GpuGluBackward<T> = fn(
    &DeviceBuffer<T>,
    &DeviceBuffer<T>,
    &DeviceBuffer<T>,
    &mut DeviceBuffer<T>,
    &mut DeviceBuffer<T>,
) -> cuda::Result<()>;

fn activation_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    const CAP: f32 = 30.0;
    let unary: [(&str, GpuUnary<T>, CpuUnary); 2] = [
        ("silu_forward", cuda::activation::silu_forward, activation::silu_forward),
        ("gelu_tanh_forward", cuda::activation::gelu_tanh_forward, activation::gelu_tanh_forward),
    ];
    let binary: [(&str, GpuBinary<T>, CpuBinary); 4] = [
        ("silu_backward", cuda::activation::silu_backward, activation::silu_backward),
        ("gelu_tanh_backward", cuda::activation::gelu_tanh_backward, activation::gelu_tanh_backward),
        ("swiglu_forward", cuda::activation::swiglu_forward, activation::swiglu_forward),
        ("geglu_forward", cuda::activation::geglu_forward, activation::geglu_forward),
    ];
    let glu: [(&str, GpuGluBackward<T>, CpuGluBackward); 2] = [
        ("swiglu_backward", cuda::activation::swiglu_backward, activation::swiglu_backward),
        ("geglu_backward", cuda::activation::geglu_backward, activation::geglu_backward),
    ];
    for n in LENS {
        // Spread over the saturating tails as well as the curved middle.
        let (x, u, g) = (randn::<T>(rng, n, 4.0), randn::<T>(rng, n, 1.0), randn::<T>(rng, n, 1.0));
        let (xw, uw, gw) = (widen(&x), widen(&u), widen(&g));
        let (gx, gu, gg) = (upload(dev, &x), upload(dev, &u), upload(dev, &g));
        let mut want = vec![0.0f32; n];
        for (name, gpu_fn, cpu_fn) in unary {
            let mut out = poisoned::<T>(dev, n);
            gpu_fn(&gx, &mut out).unwrap();
            cpu_fn(&xw, &mut want);
            check(&format!("{name} n={n}"), &out, &want, T::TOL);
        }
        for (name, gpu_fn, cpu_fn) in binary {
            // Backwards take (x, dy); GLU forwards take (gate, up).
            let mut out = poisoned::<T>(dev, n);
            gpu_fn(&gx, &gu, &mut out).unwrap();
            cpu_fn(&xw, &uw, &mut want);
            check(&format!("{name} n={n}"), &out, &want, T::TOL);
        }
        for (name, gpu_fn, cpu_fn) in glu {
            let (mut d_gate, mut d_up) = (poisoned::<T>(dev, n), poisoned::<T>(dev, n));
            gpu_fn(&gx, &gu, &gg, &mut d_gate, &mut d_up).unwrap();
            let mut want_up = vec![0.0f32; n];
            cpu_fn(&xw, &uw, &gw, &mut want, &mut want_up);
            check(&format!("{name} d_gate n={n}"), &d_gate, &want, T::TOL);
            check(&format!("{name} d_up n={n}"), &d_up, &want_up, T::TOL);
        }
        let xc = randn::<T>(rng, n, 2.0 * CAP as f64);
        let (xcw, gxc) = (widen(&xc), upload(dev, &xc));
        let mut out = poisoned::<T>(dev, n);
        cuda::activation::softcap_forward(&gxc, CAP, &mut out).unwrap();
        activation::softcap_forward(&xcw, CAP, &mut want);
        check(&format!("softcap_forward n={n}"), &out, &want, T::TOL);
        let mut out = poisoned::<T>(dev, n);
        cuda::activation::softcap_backward(&gxc, CAP, &gg, &mut out).unwrap();
        activation::softcap_backward(&xcw, CAP, &gw, &mut want);
        check(&format!("softcap_backward n={n}"), &out, &want, T::TOL);
    }
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(dev) = gpu("rms_norm_matches_cpu") else { return };
    both_dtypes!(rms_norm_case, &dev, &mut Rng::new(3));
}

fn rms_norm_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    const EPS: f32 = 1e-6;
    // 300 rows: several rows per dw block; 600: more rows than dw blocks.
    for (rows, dim) in ROWS.into_iter().chain([(300, 64), (600, 33)]) {
        for offset in [0.0f32, 1.0] {
            let what = format!("{rows}x{dim} offset {offset}");
            let (x, w, dy) =
                (randn::<T>(rng, rows * dim, 1.0), randn::<T>(rng, dim, 1.0), randn::<T>(rng, rows * dim, 1.0));
            let (xw, ww, dyw) = (widen(&x), widen(&w), widen(&dy));
            let (gx, gw, gdy) = (upload(dev, &x), upload(dev, &w), upload(dev, &dy));
            let (mut y, mut rstd) = (poisoned::<T>(dev, rows * dim), poisoned::<f32>(dev, rows));
            cuda::rms_norm::rms_norm_forward(&gx, &gw, dim, EPS, offset, &mut y, &mut rstd).unwrap();
            let (mut want_y, mut want_rstd) = (vec![0.0f32; rows * dim], vec![0.0f32; rows]);
            rms_norm::rms_norm_forward(&xw, &ww, dim, EPS, offset, &mut want_y, &mut want_rstd);
            check(&format!("rms_norm y {what}"), &y, &want_y, T::tol(REDUCED));
            check(&format!("rms_norm rstd {what}"), &rstd, &want_rstd, REDUCED);

            // Backward from the CPU's rstd, so that it is checked on its own.
            let (mut dx, mut dw) = (poisoned::<T>(dev, rows * dim), poisoned::<T>(dev, dim));
            let cpu_rstd = upload(dev, &want_rstd);
            cuda::rms_norm::rms_norm_backward(&gx, &gw, &cpu_rstd, &gdy, dim, offset, &mut dx, &mut dw).unwrap();
            let (mut want_dx, mut want_dw) = (vec![0.0f32; rows * dim], vec![0.0f32; dim]);
            rms_norm::rms_norm_backward(&xw, &ww, &want_rstd, &dyw, dim, offset, &mut want_dx, &mut want_dw);
            check(&format!("rms_norm dx {what}"), &dx, &want_dx, T::tol(REDUCED));
            check(&format!("rms_norm dw {what}"), &dw, &want_dw, T::tol(REDUCED));
        }
    }
}

#[test]
fn rope_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("rope_matches_cpu_bit_for_bit") else { return };
    both_dtypes!(rope_case, &dev, &mut Rng::new(4));
}

fn rope_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (tokens, heads, head_dim) in [(1, 1, 2), (3, 3, 6), (7, 4, 64), (33, 5, 128), (5, 2, 256)] {
        let what = format!("tokens {tokens} heads {heads} head_dim {head_dim}");
        let inv_freq: Vec<f32> = rope::rope_inv_freq(head_dim, 10000.0);
        let positions: Vec<i32> = (0..tokens).map(|_| rng.below(4096) as i32).collect();
        let half = head_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; tokens * half], vec![0.0f32; tokens * half]);
        rope::rope_tables(&positions, &inv_freq, &mut cos, &mut sin);
        let x = randn::<T>(rng, tokens * heads * head_dim, 1.0);
        let (gx, gc, gs) = (upload(dev, &x), upload(dev, &cos), upload(dev, &sin));
        let mut want = vec![0.0f32; x.len()];

        let mut y = poisoned::<T>(dev, x.len());
        cuda::rope::rope_forward(&gx, &gc, &gs, heads, head_dim, &mut y).unwrap();
        rope::rope_forward(&widen(&x), &cos, &sin, heads, head_dim, &mut want);
        check(&format!("rope_forward {what}"), &y, &want, EXACT);

        let mut dx = poisoned::<T>(dev, x.len());
        cuda::rope::rope_backward(&gx, &gc, &gs, heads, head_dim, &mut dx).unwrap();
        rope::rope_backward(&widen(&x), &cos, &sin, heads, head_dim, &mut want);
        check(&format!("rope_backward {what}"), &dx, &want, EXACT);
    }
}

#[test]
fn cross_entropy_matches_cpu() {
    let Some(dev) = gpu("cross_entropy_matches_cpu") else { return };
    both_dtypes!(cross_entropy_case, &dev, &mut Rng::new(5));
}

fn cross_entropy_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (rows, vocab) in [(1, 2), (3, 11), (7, 257), (33, 1000), (4, 32_003)] {
        let what = format!("{rows}x{vocab}");
        let logits = randn::<T>(rng, rows * vocab, 3.0);
        // About a third of the rows ignored, the first always trained.
        let targets: Vec<i32> =
            (0..rows)
                .map(|r| {
                    if r > 0 && rng.below(3) == 0 {
                        cross_entropy::IGNORE_INDEX
                    } else {
                        rng.below(vocab as u64) as i32
                    }
                })
                .collect();
        let d_loss: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
        let lw = widen(&logits);
        let (gl, gt, gd) = (upload(dev, &logits), upload(dev, &targets), upload(dev, &d_loss));
        let (mut loss, mut lse) = (poisoned::<f32>(dev, rows), poisoned::<f32>(dev, rows));
        cuda::cross_entropy::cross_entropy_forward(&gl, &gt, vocab, &mut loss, &mut lse).unwrap();
        let (mut want_loss, mut want_lse) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        cross_entropy::cross_entropy_forward(&lw, &targets, vocab, &mut want_loss, &mut want_lse);
        check(&format!("cross_entropy loss {what}"), &loss, &want_loss, REDUCED);
        check(&format!("cross_entropy lse {what}"), &lse, &want_lse, REDUCED);

        let mut d_logits = poisoned::<T>(dev, rows * vocab);
        let cpu_lse = upload(dev, &want_lse);
        cuda::cross_entropy::cross_entropy_backward(&gl, &gt, &cpu_lse, &gd, vocab, &mut d_logits).unwrap();
        let mut want = vec![0.0f32; rows * vocab];
        cross_entropy::cross_entropy_backward(&lw, &targets, &want_lse, &d_loss, vocab, &mut want);
        check(&format!("cross_entropy d_logits {what}"), &d_logits, &want, T::tol(REDUCED));
    }
}

#[test]
fn cross_entropy_marks_a_bad_target_with_nan() {
    let Some(dev) = gpu("cross_entropy_marks_a_bad_target_with_nan") else { return };
    let (rows, vocab) = (3, 5);
    let logits = upload(&dev, &vec![0.5f32; rows * vocab]);
    let targets = upload(&dev, &[1, 5, cross_entropy::IGNORE_INDEX]);
    let (mut loss, mut lse) = (poisoned::<f32>(&dev, rows), poisoned::<f32>(&dev, rows));
    cuda::cross_entropy::cross_entropy_forward(&logits, &targets, vocab, &mut loss, &mut lse).unwrap();
    let loss = loss.to_vec().unwrap();
    assert!(loss[0].is_finite() && loss[1].is_nan() && loss[2] == 0.0, "{loss:?}");
    let mut d = poisoned::<f32>(&dev, rows * vocab);
    cuda::cross_entropy::cross_entropy_backward(&logits, &targets, &lse, &upload(&dev, &[1.0f32; 3]), vocab, &mut d)
        .unwrap();
    let d = d.to_vec().unwrap();
    assert!(d[..vocab].iter().all(|v| v.is_finite()) && d[vocab..2 * vocab].iter().all(|v| v.is_nan()));
    assert!(d[2 * vocab..].iter().all(|&v| v == 0.0));
}

#[test]
fn embedding_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("embedding_matches_cpu_bit_for_bit") else { return };
    both_dtypes!(embedding_case, &dev, &mut Rng::new(6));
}

fn embedding_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    // Few ids over many tokens: heavy repetition, the backward's hard case.
    for (vocab, dim, n) in [(1, 1, 1), (5, 3, 4), (4, 8, 3000), (1000, 33, 2000), (7, 4099, 40), (50, 257, 0)] {
        let what = format!("vocab {vocab} dim {dim} n {n}");
        let table = randn::<T>(rng, vocab * dim, 1.0);
        let ids: Vec<i32> = (0..n).map(|_| rng.below(vocab as u64) as i32).collect();
        let gids = upload(dev, &ids);
        let mut out = poisoned::<T>(dev, n * dim);
        cuda::embedding::embedding_forward(&upload(dev, &table), &gids, dim, &mut out).unwrap();
        let mut want = vec![0.0f32; n * dim];
        embedding::embedding_forward(&widen(&table), &ids, dim, &mut want);
        check(&format!("embedding_forward {what}"), &out, &want, EXACT);

        let d_out = randn::<T>(rng, n * dim, 1.0);
        let prior = randn::<T>(rng, vocab * dim, 1.0);
        let mut d_table = upload(dev, &prior);
        cuda::embedding::embedding_backward_accumulate(&upload(dev, &d_out), &gids, dim, &mut d_table).unwrap();
        let mut want = widen(&prior);
        embedding::embedding_backward_accumulate(&widen(&d_out), &ids, dim, &mut want);
        check(&format!("embedding_backward_accumulate {what}"), &d_table, &want, EXACT);
    }
}

#[test]
fn embedding_marks_a_bad_id_with_nan() {
    let Some(dev) = gpu("embedding_marks_a_bad_id_with_nan") else { return };
    let table = upload(&dev, &[1.0f32, 2.0, 3.0, 4.0]);
    let mut out = poisoned::<f32>(&dev, 6);
    cuda::embedding::embedding_forward(&table, &upload(&dev, &[1, 2, -1]), 2, &mut out).unwrap();
    let out = out.to_vec().unwrap();
    assert_eq!(&out[..2], [3.0, 4.0]);
    assert!(out[2..].iter().all(|v| v.is_nan()), "{out:?}");
}

#[test]
fn adamw_matches_cpu() {
    let Some(dev) = gpu("adamw_matches_cpu") else { return };
    both_dtypes!(adamw_case, &dev, &mut Rng::new(7));
}

fn adamw_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for n in LENS {
        let p0 = randn::<T>(rng, n, 1.0);
        let (mut gp, mut gm, mut gv) = (upload(dev, &p0), dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        for step in 1..=5 {
            let h = adamw::AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step };
            let g = randn::<T>(rng, n, 1.0);
            cuda::adamw::adamw_step(&h, &mut gp, &upload(dev, &g), &mut gm, &mut gv).unwrap();
            // The twin keeps p in T between steps, as the GPU does.
            let mut pw = widen(&p);
            adamw::adamw_step(&h, &mut pw, &widen(&g), &mut m, &mut v);
            p = narrow(&pw);
        }
        check(&format!("adamw p n={n}"), &gp, &widen(&p), T::TOL);
        check(&format!("adamw m n={n}"), &gm, &m, Tolerance::F32);
        check(&format!("adamw v n={n}"), &gv, &v, Tolerance::F32);
    }
}

#[test]
fn nf4_dequantization_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("nf4_dequantization_matches_cpu_bit_for_bit") else { return };
    let mut rng = Rng::new(8);
    let tiny = 1.5 * f32::MIN_POSITIVE;
    for (n, blocksize) in [(1, 64), (63, 64), (1001, 64), (64 * 37 + 3, 32), (5000, 256), (4096, 4096)] {
        let what = format!("n {n} blocksize {blocksize}");
        let mut x: Vec<f32> = (0..n).map(|_| (0.02 * rng.normal()) as f32).collect();
        // A block whose products are subnormal: both sides flush them to zero.
        x.iter_mut().take(blocksize.min(n)).enumerate().for_each(|(i, v)| *v = tiny * ((i % 7) as f32 - 3.0) / 3.0);
        let mut packed = vec![0u8; nf4::nf4_packed_len(n)];
        let mut absmax = vec![0.0f32; nf4::nf4_num_blocks(n, blocksize)];
        nf4::quantize_nf4(&x, blocksize, &mut packed, &mut absmax);
        let (gq, ga) = (upload(&dev, &packed), upload(&dev, &absmax));

        let mut out = poisoned::<f32>(&dev, n);
        cuda::nf4::dequantize_nf4(&gq, &ga, blocksize, &mut out).unwrap();
        let mut want = vec![0.0f32; n];
        nf4::dequantize_nf4(&packed, &absmax, blocksize, &mut want);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out.to_vec().unwrap()), bits(&want), "dequantize_nf4 f32 {what}");

        let mut out = poisoned::<bf16>(&dev, n);
        cuda::nf4::dequantize_nf4(&gq, &ga, blocksize, &mut out).unwrap();
        let mut want = vec![bf16::ZERO; n];
        nf4::dequantize_nf4(&packed, &absmax, blocksize, &mut want);
        let bits16 = |v: &[bf16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits16(&out.to_vec().unwrap()), bits16(&want), "dequantize_nf4 bf16 {what}");
    }

    for nb in [1, 255, 600, 4097] {
        let absmax: Vec<f32> = (0..nb).map(|_| (0.05 + 0.01 * rng.normal()).abs() as f32).collect();
        let nested = nf4::quantize_absmax_nested(&absmax);
        let code = upload(&dev, &nf4::DYNAMIC_MAP_SIGNED);
        let mut out = poisoned::<f32>(&dev, nb);
        let (gq, g2) = (upload(&dev, &nested.qabsmax), upload(&dev, &nested.absmax2));
        cuda::nf4::dequantize_absmax_nested(&gq, &g2, nested.offset, &code, &mut out).unwrap();
        let mut want = vec![0.0f32; nb];
        nf4::dequantize_absmax_nested(
            &nested.qabsmax,
            &nested.absmax2,
            nested.offset,
            &nf4::DYNAMIC_MAP_SIGNED,
            &mut want,
        );
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out.to_vec().unwrap()), bits(&want), "dequantize_absmax_nested nb {nb}");
    }
}

#[test]
fn buffers_copy_and_the_allocator_reuses_and_reports() {
    let Some(dev) = gpu("buffers_copy_and_the_allocator_reuses_and_reports") else { return };
    let values: Vec<f32> = (0..1234).map(|i| i as f32 * 0.5).collect();
    let buf = upload(&dev, &values);
    assert_eq!(buf.to_vec().unwrap(), values);
    assert_eq!(buf.try_clone().unwrap().to_vec().unwrap(), values);
    assert_eq!(dev.zeros::<bf16>(777).unwrap().to_vec().unwrap(), vec![bf16::ZERO; 777]);
    let empty = dev.alloc::<i32>(0).unwrap();
    assert!(empty.is_empty() && empty.to_vec().unwrap().is_empty());

    // Other tests share the device and its allocator, so only lower bounds hold.
    let before = dev.memory_stats();
    drop(dev.alloc::<u8>(3 << 20).unwrap());
    let again = dev.alloc::<u8>(3 << 20).unwrap();
    let after = dev.memory_stats();
    assert!(after.cache_hits > before.cache_hits, "a dropped block is reused: {before:?} → {after:?}");
    assert!(after.current >= 3 << 20 && after.reserved >= after.current && after.peak >= after.current);
    drop(again);

    let (free, total) = dev.mem_info().unwrap();
    assert!(free <= total && total > 0);
    let err = dev.alloc::<u8>(total * 4).expect_err("four times the GPU's memory");
    let msg = err.to_string();
    assert!(matches!(err, Error::OutOfMemory { .. }) && msg.contains("micro-batch"), "{msg}");
    println!("qlora-gpu: out-of-memory message: {msg}");
    dev.empty_cache().unwrap();
}

#[test]
fn hopper_gets_sm_90a() {
    let Some(dev) = gpu("hopper_gets_sm_90a") else { return };
    let target = dev.target().to_string();
    match dev.compute_capability() {
        (9, 0) => assert_eq!(target, "sm_90a"),
        (major, minor) => println!("qlora-gpu: hopper_gets_sm_90a: not Hopper ({major}.{minor}): {target}"),
    }
}

#[test]
fn matmul_matches_cpu() {
    let Some(dev) = gpu("matmul_matches_cpu") else { return };
    both_dtypes!(matmul_case, &dev, &mut Rng::new(9));
}

/// One GEMM on the GPU and the CPU twin (f32, on the widened inputs), C starting as `c0` (or NaN when beta == 0, which
/// must not read it). Tolerance: REDUCED for f32 (k-term sums in cuBLASLt's order), BF16 for bf16 (one rounding).
fn matmul_one<T: Elem>(dev: &CudaDevice, rng: &mut Rng, g: Gemm, what: &str) {
    let len = |batch: usize, stride: usize, size: usize| if batch == 0 { 0 } else { (batch - 1) * stride + size };
    let a = randn::<T>(rng, len(g.batch, g.stride_a, g.m * g.k), 1.0);
    let b = randn::<T>(rng, len(g.batch, g.stride_b, g.k * g.n), 1.0);
    let c_len = len(g.batch, if g.batch == 1 { g.m * g.n } else { g.stride_c }, g.m * g.n);
    let c0: Vec<T> = if g.beta == 0.0 { vec![T::from_f32(f32::NAN); c_len] } else { randn::<T>(rng, c_len, 1.0) };
    let mut gc = upload(dev, &c0);
    cuda::matmul::matmul(&g, &upload(dev, &a), &upload(dev, &b), &mut gc).unwrap();
    let mut want = widen(&c0);
    matmul::matmul(&g, &widen(&a), &widen(&b), &mut want);
    // Gaps between batch entries of C are neither written nor read: they keep c0 (NaN where beta == 0) on both sides.
    let got: Vec<f64> = gc.to_vec().unwrap().iter().map(|&v| v.to_f32() as f64).collect();
    let want: Vec<f64> = want.iter().map(|&v| T::from_f32(v).to_f32() as f64).collect();
    let written = |i: usize| g.batch == 1 || i % g.stride_c.max(1) < g.m * g.n;
    let (got, want): (Vec<f64>, Vec<f64>) =
        got.iter().zip(&want).enumerate().filter(|&(i, _)| written(i)).map(|(_, (&x, &y))| (x, y)).unzip();
    assert_close(&format!("matmul {what} [{}]", T::NAME), &got, &want, T::tol(REDUCED));
}

fn matmul_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (m, n, k) in [(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 129, 257), (100, 3, 1000), (2, 257, 31)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb);
            matmul_one::<T>(dev, rng, g, &format!("{m}x{n}x{k} ta {ta} tb {tb}"));
            matmul_one::<T>(dev, rng, g.alpha(0.5).beta(0.75), &format!("{m}x{n}x{k} ta {ta} tb {tb} α .5 β .75"));
            let g = g.batched(3).alpha(-1.25).beta(1.0);
            matmul_one::<T>(dev, rng, g, &format!("3×{m}x{n}x{k} ta {ta} tb {tb} β 1"));
            // One weight for every batch entry (stride 0), and C entries with gaps between them.
            let bcast = Gemm { stride_b: 0, stride_c: m * n + 5, ..g.beta(0.0) };
            matmul_one::<T>(dev, rng, bcast, &format!("3×{m}x{n}x{k} ta {ta} tb {tb} B broadcast, C gaps"));
            let bcast = Gemm { stride_a: 0, ..g.beta(0.5) };
            matmul_one::<T>(dev, rng, bcast, &format!("3×{m}x{n}x{k} ta {ta} tb {tb} A broadcast"));
        }
    }
    // The products cuBLASLt does not take: C = beta·C, or zeros for beta == 0 over NaN.
    for (k, alpha, beta) in [(0, 1.0, 0.0), (0, 1.0, 0.5), (5, 0.0, 0.0), (5, 0.0, -2.0), (0, 1.0, 1.0)] {
        let g = Gemm::new(7, 9, k).alpha(alpha).beta(beta).batched(2);
        matmul_one::<T>(dev, rng, g, &format!("k {k} α {alpha} β {beta}"));
    }
    matmul_one::<T>(dev, rng, Gemm::new(4, 4, 4).batched(0), "batch 0");
    matmul_one::<T>(dev, rng, Gemm::new(0, 4, 4), "m 0");
}

#[test]
fn reductions_match_cpu() {
    let Some(dev) = gpu("reductions_match_cpu") else { return };
    both_dtypes!(reduce_case, &dev, &mut Rng::new(10));
}

/// Sums: the GPU adds in f32 in a tree, the CPU in f64, so the bound scales with Σ|x| (f32's 2⁻²⁴ per level of a
/// ~20-level tree, with margin): |got − want| ≤ 1e-6·Σ|x| + 1e-5·|want|. max |x| is exact. The twin runs on the
/// widened inputs, and the GPU's f64 result is not rounded to T.
fn reduce_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for n in LENS.into_iter().chain([0, 1 << 20]) {
        let x = randn::<T>(rng, n, 1.0);
        let (xw, gx) = (widen(&x), upload(dev, &x));
        let abs_sum: f64 = xw.iter().map(|v| v.abs() as f64).sum();
        let sq_sum: f64 = xw.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let tol = |mag: f64| Tolerance { abs: 1e-6 * mag, rel: 1e-5 };
        let what = format!("n={n} [{}]", T::NAME);
        assert_close(
            &format!("sum {what}"),
            &[cuda::reduce::sum(&gx).unwrap()],
            &[reduce::sum(&xw) as f64],
            tol(abs_sum),
        );
        let got = cuda::reduce::sum_squares(&gx).unwrap();
        assert_close(&format!("sum_squares {what}"), &[got], &[reduce::sum_squares(&xw) as f64], tol(sq_sum));
        let got = cuda::reduce::max_abs(&gx).unwrap();
        assert_close(&format!("max_abs {what}"), &[got], &[reduce::max_abs(&xw) as f64], EXACT);
    }
    let mut x = randn::<T>(rng, 5000, 1.0);
    x[4321] = T::from_f32(f32::NAN);
    assert!(cuda::reduce::max_abs(&upload(dev, &x)).unwrap().is_nan(), "max_abs hides a NaN [{}]", T::NAME);

    for (rows, cols) in ROWS.into_iter().chain([(0, 5), (5000, 3), (70_001, 1), (129, 300)]) {
        let x = randn::<T>(rng, rows * cols, 1.0);
        let mut out = poisoned::<T>(dev, cols);
        cuda::reduce::sum_rows(&upload(dev, &x), cols, &mut out).unwrap();
        let mut want = vec![0.0f32; cols];
        reduce::sum_rows(&widen(&x), cols, &mut want);
        let tol = Tolerance { abs: 1e-6 * rows as f64, ..REDUCED };
        check(&format!("sum_rows {rows}x{cols}"), &out, &want, T::tol(tol));
    }
}

#[test]
fn casts_round_as_half_does() {
    let Some(dev) = gpu("casts_round_as_half_does") else { return };
    let mut rng = Rng::new(11);
    let mut x: Vec<f32> = (0..70_001).map(|_| (rng.normal() * 10f64.powi(rng.below(60) as i32 - 30)) as f32).collect();
    // Ties (round to even), the largest finite values, infinities, signed zeros and subnormals.
    x.extend([1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), f32::MAX, -f32::MAX, f32::INFINITY, f32::NEG_INFINITY]);
    x.extend([0.0, -0.0, 1e-40, -3e-39, f32::MIN_POSITIVE, 3.3895314e38]);
    let gx = upload(&dev, &x);
    let mut b = poisoned::<bf16>(&dev, x.len());
    cuda::copy::cast(&gx, &mut b).unwrap();
    let b = b.to_vec().unwrap();
    let bits = |v: &[bf16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&b), bits(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()), "cast f32 → bf16");

    let gb = upload(&dev, &b);
    let mut back = poisoned::<f32>(&dev, x.len());
    cuda::copy::cast(&gb, &mut back).unwrap();
    let fbits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(fbits(&back.to_vec().unwrap()), fbits(&b.iter().map(|v| v.to_f32()).collect::<Vec<_>>()), "bf16 → f32");

    let mut same = poisoned::<f32>(&dev, x.len());
    cuda::copy::cast(&gx, &mut same).unwrap();
    assert_eq!(fbits(&same.to_vec().unwrap()), fbits(&x), "cast f32 → f32");
    let mut same = poisoned::<bf16>(&dev, x.len());
    cuda::copy::cast(&gb, &mut same).unwrap();
    assert_eq!(bits(&same.to_vec().unwrap()), bits(&b), "cast bf16 → bf16");
    let mut nan = poisoned::<bf16>(&dev, 1);
    cuda::copy::cast(&upload(&dev, &[f32::NAN]), &mut nan).unwrap();
    assert!(nan.to_vec().unwrap()[0].is_nan(), "cast keeps NaN");
}

/// The CPU reference of strided_copy: the view's elements in row-major order.
fn gather<T: Copy>(src: &[T], offset: usize, shape: &[usize], strides: &[usize]) -> Vec<T> {
    let n: usize = shape.iter().product();
    (0..n)
        .map(|i| {
            let (mut rem, mut at) = (i, offset);
            for d in (0..shape.len()).rev() {
                at += (rem % shape[d]) * strides[d];
                rem /= shape[d];
            }
            src[at]
        })
        .collect()
}

#[test]
fn strided_copy_gathers_views() {
    let Some(dev) = gpu("strided_copy_gathers_views") else { return };
    let mut rng = Rng::new(12);
    let len = 5 * 7 * 9 + 11;
    let f: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
    strided_case(&dev, &f, "f32");
    strided_case(&dev, &f.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), "bf16");
    strided_case(&dev, &(0..len).map(|_| rng.next_u64() as i32).collect::<Vec<_>>(), "i32");
    strided_case(&dev, &(0..len).map(|_| rng.next_u64() as u8).collect::<Vec<_>>(), "u8");
}

/// Views of a buffer holding a [5, 7, 9] tensor after 11 elements: the whole tensor, transposed, narrowed, one
/// element (rank 0), a broadcast (stride 0), a rank-8 view, and an empty one. Compared bit for bit.
fn strided_case<T: cuda::DeviceCopy + PartialEq + std::fmt::Debug>(dev: &CudaDevice, src: &[T], name: &str) {
    let views: [(&str, usize, Vec<usize>, Vec<usize>); 8] = [
        ("contiguous", 11, vec![5, 7, 9], vec![63, 9, 1]),
        ("transposed 0↔2", 11, vec![9, 7, 5], vec![1, 9, 63]),
        ("permuted (1, 2, 0)", 11, vec![7, 9, 5], vec![9, 1, 63]),
        ("narrowed [1..4, 2..7, 3..8]", 11 + 63 + 18 + 3, vec![3, 5, 5], vec![63, 9, 1]),
        ("rank 0", 100, vec![], vec![]),
        ("broadcast rows", 11, vec![4, 9], vec![0, 1]),
        ("rank 8", 0, vec![2, 1, 2, 1, 2, 1, 2, 3], vec![150, 7, 70, 3, 30, 2, 9, 1]),
        ("empty", 11, vec![3, 0, 2], vec![1, 1, 1]),
    ];
    let gsrc = upload(dev, src);
    for (what, offset, shape, strides) in views {
        let want = gather(src, offset, &shape, &strides);
        let mut dst = upload(dev, &vec![src[0]; want.len()]);
        // Poison with a value the view does not hold where one exists, so unwritten elements show.
        if let Some(other) = src.iter().find(|v| !want.contains(v)) {
            dst = upload(dev, &vec![*other; want.len()]);
        }
        cuda::copy::strided_copy(&gsrc, offset, &shape, &strides, &mut dst).unwrap();
        assert_eq!(dst.to_vec().unwrap(), want, "strided_copy {what} [{name}]");
    }
}

/// The f32 reference kernels (bf16 and f16 run the flash kernels: tests/cuda_flash_attention.rs).
#[test]
fn attention_matches_cpu() {
    let Some(dev) = gpu("attention_matches_cpu") else { return };
    attention_case::<f32>(&dev, &mut Rng::new(13));
}

/// lse with −∞ (a query that sees no key) mapped to a finite sentinel, so that assert_close can compare it.
fn finite_lse(v: impl IntoIterator<Item = f32>) -> Vec<f64> {
    v.into_iter().map(|l| if l == f32::NEG_INFINITY { -1e30 } else { l as f64 }).collect()
}

/// Forward and backward against the CPU twin on its f32 kernel over the widened inputs. Backward takes the CPU's
/// out (rounded to T) and lse, so it is checked on its own. Tolerances: f32 REDUCED (sums over up to a few hundred
/// keys, or a GQA group's queries, in another order, and an online softmax instead of a two-pass one); bf16 BF16
/// (one rounding of each output); lse REDUCED in both (f32 on both sides).
fn attention_case<T: Elem + cuda::attention::AttentionFloat>(dev: &CudaDevice, rng: &mut Rng) {
    struct Case {
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        causal: bool,
        window: Option<usize>,
        softcap: Option<f64>,
        /// Per sequence: (queries, keys).
        lens: Vec<(usize, usize)>,
    }
    let case = |n_heads, n_kv_heads, head_dim, causal, window, softcap, lens: &[(usize, usize)]| Case {
        n_heads,
        n_kv_heads,
        head_dim,
        causal,
        window,
        softcap,
        lens: lens.to_vec(),
    };
    let cases = [
        // MHA, three packed sequences of odd lengths.
        case(2, 2, 64, true, None, None, &[(17, 17), (1, 1), (33, 33)]),
        // GQA 3, fewer queries than keys (bottom-right aligned).
        case(6, 2, 128, true, None, None, &[(5, 9), (1, 30), (13, 13)]),
        // GQA 4, sliding window and softcap (inputs scaled so that the cap bends the scores).
        case(4, 1, 256, true, Some(7), Some(2.5), &[(19, 19), (3, 11), (25, 25)]),
        // Odd head_dim, non-causal: a sequence without keys (its queries see nothing), one with more queries than
        // keys, a window on both sides of the diagonal, and an empty sequence.
        case(3, 1, 40, false, Some(5), None, &[(4, 0), (9, 6), (0, 0), (7, 12)]),
        // One longer sequence: the online softmax over hundreds of keys.
        case(2, 2, 64, true, Some(100), Some(30.0), &[(300, 300)]),
        case(8, 2, 40, true, None, None, &[(1, 64), (2, 2), (45, 45)]),
    ];
    for c in cases {
        let p = AttentionParams {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f64).sqrt(),
            causal: c.causal,
            sliding_window: c.window,
            softcap: c.softcap,
        };
        let what = format!(
            "heads {}/{} head_dim {} causal {} window {:?} softcap {:?} lens {:?}",
            c.n_heads, c.n_kv_heads, c.head_dim, c.causal, c.window, c.softcap, c.lens
        );
        let cu = |pick: fn(&(usize, usize)) -> usize| -> Vec<i32> {
            std::iter::once(0)
                .chain(c.lens.iter().scan(0, |t, l| {
                    *t += pick(l) as i32;
                    Some(*t)
                }))
                .collect()
        };
        let (cu_q, cu_k) = (cu(|l| l.0), cu(|l| l.1));
        let (tq, tk) = (*cu_q.last().unwrap() as usize, *cu_k.last().unwrap() as usize);
        let max_q = c.lens.iter().map(|l| l.0).max().unwrap();
        let max_k = c.lens.iter().map(|l| l.1).max().unwrap();
        let (nq, nk) = (tq * c.n_heads * c.head_dim, tk * c.n_kv_heads * c.head_dim);
        let qk_scale = if c.softcap.is_some() { 3.0 } else { 1.0 };
        let (q, k, v) = (randn::<T>(rng, nq, qk_scale), randn::<T>(rng, nk, qk_scale), randn::<T>(rng, nk, 1.0));
        let d_out = randn::<T>(rng, nq, 1.0);
        let (qw, kw, vw, dow) = (widen(&q), widen(&k), widen(&v), widen(&d_out));
        let (gq, gk, gv, gdo) = (upload(dev, &q), upload(dev, &k), upload(dev, &v), upload(dev, &d_out));
        let (gcq, gck) = (upload(dev, &cu_q), upload(dev, &cu_k));

        let (mut out, mut lse) = (poisoned::<T>(dev, nq), poisoned::<f32>(dev, tq * c.n_heads));
        cuda::attention::attention_forward(&p, &gq, &gk, &gv, &gcq, &gck, max_q, max_k, &mut out, &mut lse).unwrap();
        let (mut want_out, mut want_lse) = (vec![0.0f32; nq], vec![0.0f32; tq * c.n_heads]);
        attention::attention_forward(&p, &qw, &kw, &vw, &cu_q, &cu_k, &mut want_out, &mut want_lse);
        check(&format!("attention out {what}"), &out, &want_out, T::tol(REDUCED));
        let got_lse = finite_lse(lse.to_vec().unwrap());
        assert_close(&format!("attention lse {what} [{}]", T::NAME), &got_lse, &finite_lse(want_lse.clone()), REDUCED);

        let out_t: Vec<T> = narrow(&want_out);
        let (gout, glse) = (upload(dev, &out_t), upload(dev, &want_lse));
        let (mut dq, mut dk, mut dv) = (poisoned::<T>(dev, nq), poisoned::<T>(dev, nk), poisoned::<T>(dev, nk));
        cuda::attention::attention_backward(
            &p, &gq, &gk, &gv, &gout, &glse, &gdo, &gcq, &gck, max_q, max_k, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();
        let (mut want_dq, mut want_dk, mut want_dv) = (vec![0.0f32; nq], vec![0.0f32; nk], vec![0.0f32; nk]);
        attention::attention_backward(
            &p,
            &qw,
            &kw,
            &vw,
            &widen(&out_t),
            &want_lse,
            &dow,
            &cu_q,
            &cu_k,
            &mut want_dq,
            &mut want_dk,
            &mut want_dv,
        );
        check(&format!("attention dq {what}"), &dq, &want_dq, T::tol(REDUCED));
        check(&format!("attention dk {what}"), &dk, &want_dk, T::tol(REDUCED));
        check(&format!("attention dv {what}"), &dv, &want_dv, T::tol(REDUCED));
    }
}
