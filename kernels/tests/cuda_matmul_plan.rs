//! The cuBLASLt plan cache of `kernels/src/cuda/matmul.rs`: a repeated product adds no plan and gives the same bits
//! as its first (uncached) run; products of other shapes or layouts get plans of their own and never another's; alpha
//! and beta share a plan and still give the CPU twin's results. f32 and bf16.
//!
//! Each test prints `qlora-gpu: <test>: ran on cuda:0 (...)` or `qlora-gpu: <test>: skipped: <why>`; without a GPU
//! they skip (and pass), unless QLORA_REQUIRE_GPU=1. They count the device's plans, so they run one at a time.

use qlora_kernels::cuda::matmul::{matmul as gpu_matmul, plan_count};
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer};
use qlora_kernels::matmul::{matmul, Gemm};
use qlora_kernels::testing::{assert_close, gpu};
use qlora_kernels::Rng;
use std::sync::{Mutex, MutexGuard};

// The parity suite's element types and helpers; this file is its own test binary because plan counts are global.
#[path = "cuda_parity/common.rs"]
#[allow(dead_code, unused_imports, unused_macros)]
mod common;
use common::{parity_test, Elem, REDUCED};

/// Plan counts are per device and tests share it: each case holds this while it counts.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Operands<T: Elem> {
    a: DeviceBuffer<T>,
    b: DeviceBuffer<T>,
    c0: Vec<T>,
    host: (Vec<f32>, Vec<f32>),
}

fn entries(batch: usize, stride: usize, size: usize) -> usize {
    if batch == 0 {
        0
    } else {
        (batch - 1) * stride + size
    }
}

impl<T: Elem> Operands<T> {
    fn new(dev: &CudaDevice, rng: &mut Rng, g: &Gemm) -> Self {
        let mut randn = |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect() };
        let a = randn(entries(g.batch, g.stride_a, g.m * g.k));
        let b = randn(entries(g.batch, g.stride_b, g.k * g.n));
        let c_len = entries(g.batch, if g.batch == 1 { g.m * g.n } else { g.stride_c }, g.m * g.n);
        let c0 = if g.beta == 0.0 { vec![T::from_f32(f32::NAN); c_len] } else { randn(c_len) };
        let widen = |v: &[T]| v.iter().map(|&x| x.to_f32()).collect::<Vec<f32>>();
        let host = (widen(&a), widen(&b));
        Operands { a: dev.upload(&a).unwrap(), b: dev.upload(&b).unwrap(), c0, host }
    }

    /// The GPU's C for `g` (alpha and beta may differ from the operands' product: they share a plan).
    fn gpu(&self, dev: &CudaDevice, g: &Gemm) -> Vec<T> {
        let mut c = dev.upload(&self.c0).unwrap();
        gpu_matmul(g, &self.a, &self.b, &mut c).unwrap();
        c.to_vec().unwrap()
    }

    /// Compares with the CPU twin on the widened operands, over the elements the product writes.
    #[track_caller]
    fn check(&self, g: &Gemm, got: &[T], what: &str) {
        let mut want: Vec<f32> = self.c0.iter().map(|&x| x.to_f32()).collect();
        matmul(g, &self.host.0, &self.host.1, &mut want);
        let written = |i: usize| g.batch == 1 || i % g.stride_c.max(1) < g.m * g.n;
        let (got, want): (Vec<f64>, Vec<f64>) = (0..got.len())
            .filter(|&i| written(i))
            .map(|i| (got[i].to_f32() as f64, T::from_f32(want[i]).to_f32() as f64))
            .unzip();
        // f32 sums of k terms in cuBLASLt's order against the CPU's: REDUCED.
        assert_close(&format!("{what} [{}]", T::NAME), &got, &want, T::tol(REDUCED));
    }
}

/// Products of several shapes, transposes, batch layouts and alignments (odd C strides change C's alignment).
fn products() -> Vec<Gemm> {
    let mut out = Vec::new();
    for (m, n, k) in [(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 128, 256), (100, 3, 1000)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb);
            out.push(g);
            out.push(g.batched(3));
            out.push(Gemm { stride_b: 0, stride_c: m * n + 5, ..g.batched(3) });
        }
    }
    out
}

/// Bit patterns, so that the NaN left in C's gaps compares equal to itself.
fn bits<T: Elem>(v: &[T]) -> Vec<u32> {
    v.iter().map(|&x| x.to_f32().to_bits()).collect()
}

parity_test!(repeated_products_reuse_their_plan_and_bits: repeated_case, seed 51);

fn repeated_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    let _serial = serial();
    let products = products();
    let operands: Vec<Operands<T>> = products.iter().map(|g| Operands::new(dev, rng, g)).collect();
    let first: Vec<Vec<T>> = products.iter().zip(&operands).map(|(g, o)| o.gpu(dev, g)).collect();
    let planned = plan_count(dev).unwrap();
    // Interleaved, so that each lookup has every other plan beside it to pick by mistake.
    for round in 0..2 {
        for (i, (g, o)) in products.iter().zip(&operands).enumerate() {
            let what = format!("round {round} product {i} {g:?}");
            let again = o.gpu(dev, g);
            assert_eq!(bits(&again), bits(&first[i]), "{what} [{}]: a cached plan changed the bits", T::NAME);
            o.check(g, &again, &what);
        }
    }
    assert_eq!(plan_count(dev).unwrap(), planned, "repeated products added plans [{}]", T::NAME);
}

parity_test!(alpha_and_beta_share_a_plan_and_match_cpu: alpha_beta_case, seed 52);

fn alpha_beta_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    let _serial = serial();
    for g in [Gemm::new(33, 65, 129).trans_b(true), Gemm::new(7, 9, 11).batched(4).trans_a(true)] {
        let o = Operands::<T>::new(dev, rng, &g.beta(1.0));
        o.gpu(dev, &g);
        let planned = plan_count(dev).unwrap();
        for (alpha, beta) in [(1.0, 0.0), (0.5, 0.75), (-1.25, 1.0), (2.0, -0.5), (1.0, 1.0)] {
            let variant = g.alpha(alpha).beta(beta);
            o.check(&variant, &o.gpu(dev, &variant), &format!("{variant:?}"));
        }
        // alpha == 0 and k == 0 only scale C, without cuBLASLt.
        let scale_only = g.alpha(0.0).beta(0.5);
        o.check(&scale_only, &o.gpu(dev, &scale_only), "alpha 0");
        assert_eq!(plan_count(dev).unwrap(), planned, "{g:?}: alpha and beta share one plan [{}]", T::NAME);
    }
}

#[test]
fn new_shapes_get_plans_of_their_own() {
    let _serial = serial();
    let Some(dev) = gpu("new_shapes_get_plans_of_their_own") else { return };
    let mut rng = Rng::new(53);
    // Shapes no other test uses: each adds exactly one plan, the first time only.
    for (i, g) in [Gemm::new(5, 6, 7), Gemm::new(5, 6, 8), Gemm::new(6, 5, 7), Gemm::new(5, 6, 7).trans_a(true)]
        .into_iter()
        .enumerate()
    {
        let o = Operands::<f32>::new(&dev, &mut rng, &g);
        let before = plan_count(&dev).unwrap();
        let got = o.gpu(&dev, &g);
        o.check(&g, &got, &format!("new shape {i}"));
        assert_eq!(plan_count(&dev).unwrap(), before + 1, "{g:?}: one new plan");
        o.gpu(&dev, &g);
        assert_eq!(plan_count(&dev).unwrap(), before + 1, "{g:?}: none the second time");
    }
}

/// Decoding's LoRA x·Aᵀ (a few rows of x, a transposed A with a long k) runs `gemm_few_rows`, not cuBLASLt: no plan,
/// the CPU's values; with k off the kernel's 8-element vectors, the product takes cuBLASLt and plans.
#[test]
fn few_rows_against_a_long_k_plan_nothing() {
    let _serial = serial();
    let Some(dev) = gpu("few_rows_against_a_long_k_plan_nothing") else { return };
    let mut rng = Rng::new(54);
    let g = Gemm::new(1, 48, 4096).trans_b(true);
    let o = Operands::<f32>::new(&dev, &mut rng, &g);
    let before = plan_count(&dev).unwrap();
    o.check(&g, &o.gpu(&dev, &g), "few rows");
    assert_eq!(plan_count(&dev).unwrap(), before, "{g:?}: the few-rows kernel, no cuBLASLt plan");
    let odd = Gemm::new(1, 48, 4095).trans_b(true);
    let o = Operands::<f32>::new(&dev, &mut rng, &odd);
    o.check(&odd, &o.gpu(&dev, &odd), "few rows, odd k");
    assert_eq!(plan_count(&dev).unwrap(), before + 1, "{odd:?}: cuBLASLt");
}
