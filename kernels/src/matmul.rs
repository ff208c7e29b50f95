//! Batched matrix multiply on top of the `gemm` crate.
//!
//! Backward needs no kernel of its own: for C = op(A)·op(B) with upstream G = ∂L/∂C, the gradients in stored
//! layout are as below (the tests check each row by finite differences). Each is a `Gemm::new(rows, cols, inner)`
//! with (rows, cols) the gradient's stored shape and inner = n for dA, m for dB.
//!
//! | trans_a, trans_b | dA (stored)                      | dB (stored)                      |
//! |------------------|----------------------------------|----------------------------------|
//! | false, false     | `matmul(G, B)` trans_b           | `matmul(A, G)` trans_a           |
//! | false, true      | `matmul(G, B)`                   | `matmul(G, A)` trans_a           |
//! | true,  false     | `matmul(B, G)` trans_b           | `matmul(A, G)`                   |
//! | true,  true      | `matmul(B, G)` trans_a, trans_b  | `matmul(G, A)` trans_a, trans_b  |

use crate::Float;
use gemm::Parallelism;
use rayon::prelude::*;

/// Batched GEMM: for each b < batch, C_b = alpha · op(A_b) · op(B_b) + beta · C_b.
/// op(A_b) is [m, k]: stored [m, k] row-major, or [k, m] when trans_a. op(B_b) is [k, n]: stored [k, n], or [n, k] when trans_b.
/// C_b is [m, n] row-major. Batch strides are in elements; a stride of 0 reuses one matrix for every batch entry.
/// beta == 0 means C is not read at all (NaN garbage in C must not leak).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f64,
    pub beta: f64,
}

impl Gemm {
    /// One [m, k]·[k, n] product, no transposes, alpha 1, beta 0, contiguous batch strides.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            batch: 1,
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    pub fn trans_a(self, t: bool) -> Self {
        Gemm { trans_a: t, ..self }
    }

    pub fn trans_b(self, t: bool) -> Self {
        Gemm { trans_b: t, ..self }
    }

    /// Sets `batch` and contiguous strides (m·k, k·n, m·n); a transpose does not change a matrix's size, so
    /// the order of `batched` and `trans_*` calls does not matter.
    pub fn batched(self, batch: usize) -> Self {
        Gemm { batch, stride_a: self.m * self.k, stride_b: self.k * self.n, stride_c: self.m * self.n, ..self }
    }

    pub fn alpha(self, a: f64) -> Self {
        Gemm { alpha: a, ..self }
    }

    pub fn beta(self, b: f64) -> Self {
        Gemm { beta: b, ..self }
    }
}

/// Below this many multiply-adds per rayon task, scheduling costs more than the arithmetic.
const MIN_TASK_FLOPS: usize = 1 << 16;

/// a: [batch, op(A) stored], b: [batch, op(B) stored], c: [batch, m, n] → c (see [`Gemm`]).
///
/// The C entries of different batch entries must not overlap (`stride_c ≥ m·n` when batch > 1). When
/// alpha == 0 or k == 0, A and B are not read (BLAS convention): C becomes beta·C, or zeros when beta == 0.
pub fn matmul<T: Float>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) {
    let (m, n, k) = (g.m, g.n, g.k);
    if g.batch == 0 {
        return;
    }
    let c_len = check_c(g, c.len());
    if m * n == 0 {
        return;
    }
    let stride_c = if g.batch == 1 { m * n } else { g.stride_c };
    let c = &mut c[..c_len];
    if k == 0 || g.alpha == 0.0 {
        for i in 0..g.batch {
            scale_in_place(&mut c[i * stride_c..i * stride_c + m * n], g.beta);
        }
        return;
    }
    check_ab(g, a.len(), b.len());
    let entry = |i: usize, c_b: &mut [T], par: Parallelism| {
        let a_b = &a[i * g.stride_a..i * g.stride_a + m * k];
        let b_b = &b[i * g.stride_b..i * g.stride_b + k * n];
        gemm_one(g, a_b, b_b, &mut c_b[..m * n], par);
    };
    if g.batch == 1 {
        entry(0, c, Parallelism::Rayon(0));
    } else {
        let flops = m.saturating_mul(n).saturating_mul(k);
        c.par_chunks_mut(stride_c)
            .enumerate()
            .with_min_len(MIN_TASK_FLOPS.div_ceil(flops))
            .for_each(|(i, c_b)| entry(i, c_b, Parallelism::None));
    }
}

/// The elements of C that a non-empty batch writes, after asserting that `c_len` holds them and that batch entries do
/// not overlap (the CUDA twin shares the contract).
pub(crate) fn check_c(g: &Gemm, c_len: usize) -> usize {
    let (m, n) = (g.m, g.n);
    let need = required_len("C", g.batch, g.stride_c, m.checked_mul(n), c_len);
    assert!(
        g.batch == 1 || g.stride_c >= m * n,
        "matmul: stride_c {} < m·n {} overlaps batch entries",
        g.stride_c,
        m * n
    );
    need
}

/// Asserts that A and B hold every batch entry: checked only where the product reads them (not when k == 0 or
/// alpha == 0), by both twins.
pub(crate) fn check_ab(g: &Gemm, a_len: usize, b_len: usize) {
    required_len("A", g.batch, g.stride_a, g.m.checked_mul(g.k), a_len);
    required_len("B", g.batch, g.stride_b, g.k.checked_mul(g.n), b_len);
}

/// `(batch − 1)·stride + size`, asserted to fit in `len` (and not to overflow).
fn required_len(what: &str, batch: usize, stride: usize, size: Option<usize>, len: usize) -> usize {
    let need = size.and_then(|s| stride.checked_mul(batch - 1).and_then(|o| o.checked_add(s)));
    match need {
        Some(need) if need <= len => need,
        _ => panic!("matmul: {what} has {len} elements, the last batch entry needs {need:?}"),
    }
}

fn scale_in_place<T: Float>(c: &mut [T], beta: f64) {
    if beta == 0.0 {
        // Overwrite rather than multiply so that NaN/inf garbage in an uninitialised C cannot survive.
        c.fill(T::zero());
    } else if beta != 1.0 {
        let beta = T::c(beta);
        c.iter_mut().for_each(|v| *v = *v * beta);
    }
}

/// One product on exactly-sized slices: a: op(A) stored, b: op(B) stored, c: [m, n].
fn gemm_one<T: Float>(g: &Gemm, a: &[T], b: &[T], c: &mut [T], par: Parallelism) {
    let (m, n, k) = (g.m, g.n, g.k);
    debug_assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
    // (row stride, column stride) of op(X) in elements: a transpose swaps which index walks contiguously.
    let (a_rs, a_cs) = if g.trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if g.trans_b { (1, k) } else { (n, 1) };
    // SAFETY: every index gemm touches is row·rs + col·cs over op(A) [m, k], op(B) [k, n] and C [m, n]; with the
    // strides above the largest is m·k − 1, k·n − 1 and m·n − 1, inside `a`, `b` and `c`, whose lengths are
    // exactly those products. Slice lengths never exceed isize::MAX, so the stride casts are lossless. `c` is a
    // `&mut` borrow, so it aliases neither input. read_dst is false when beta == 0, so gemm never reads
    // C's old contents then. gemm dispatches on TypeId and supports both Float types, f32 and f64.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            g.beta != 0.0,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            // gemm's naming is the reverse of BLAS: dst = alpha·dst + beta·lhs·rhs.
            T::c(g.beta),
            T::c(g.alpha),
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_gradient, dot, randn, Tolerance};
    use crate::Rng;

    /// The definition, in f64, reading A, B and C through the same stored layouts and strides as `matmul`.
    fn naive(g: &Gemm, a: &[f64], b: &[f64], c: &mut [f64]) {
        let (m, n, k) = (g.m, g.n, g.k);
        for bi in 0..g.batch {
            let (a, b) = (&a[bi * g.stride_a..], &b[bi * g.stride_b..]);
            let c = &mut c[bi * g.stride_c..];
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for p in 0..k {
                        let av = if g.trans_a { a[p * m + i] } else { a[i * k + p] };
                        let bv = if g.trans_b { b[j * k + p] } else { b[p * n + j] };
                        acc += av * bv;
                    }
                    let prev = if g.beta == 0.0 { 0.0 } else { g.beta * c[i * n + j] };
                    c[i * n + j] = g.alpha * acc + prev;
                }
            }
        }
    }

    fn len_of(batch: usize, stride: usize, size: usize) -> usize {
        if batch == 0 {
            0
        } else {
            (batch - 1) * stride + size
        }
    }

    /// Runs `matmul::<f64>` and the naive definition on the same random A, B, C and compares.
    fn check(g: Gemm, seed: u64) {
        let mut rng = Rng::new(seed);
        let a = randn(&mut rng, len_of(g.batch, g.stride_a, g.m * g.k));
        let b = randn(&mut rng, len_of(g.batch, g.stride_b, g.k * g.n));
        let c0 = randn(&mut rng, len_of(g.batch, g.stride_c, g.m * g.n));
        let mut got = c0.clone();
        matmul(&g, &a, &b, &mut got);
        let mut want = c0;
        naive(&g, &a, &b, &mut want);
        assert_close(&format!("{g:?}"), &got, &want, Tolerance { abs: 1e-12 * (g.k as f64 + 1.0), rel: 1e-12 });
    }

    const SIZES: [usize; 5] = [1, 3, 7, 17, 65];

    #[test]
    fn matches_definition_for_odd_shapes_and_all_transposes() {
        let mut seed = 0;
        for &m in &SIZES {
            for &n in &SIZES {
                for &k in &SIZES {
                    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                        seed += 1;
                        check(Gemm::new(m, n, k).trans_a(ta).trans_b(tb), seed);
                    }
                }
            }
        }
    }

    #[test]
    fn large_single_product_takes_the_threaded_path() {
        for (ta, tb) in [(false, false), (true, true)] {
            check(Gemm::new(129, 257, 300).trans_a(ta).trans_b(tb), 11);
        }
    }

    #[test]
    fn alpha_and_beta_scale_product_and_accumulator() {
        for (alpha, beta) in [(0.5, 1.0), (-2.0, 0.25), (1.0, -1.5), (3.0, 0.0)] {
            check(Gemm::new(7, 17, 3).trans_a(true).alpha(alpha).beta(beta), 21);
            check(Gemm::new(5, 9, 33).batched(3).trans_b(true).alpha(alpha).beta(beta), 22);
        }
    }

    #[test]
    fn batched_with_transposes_and_either_order_of_builder_calls() {
        let g = Gemm::new(7, 5, 3).batched(4).trans_a(true).trans_b(true);
        assert_eq!(g, Gemm::new(7, 5, 3).trans_a(true).trans_b(true).batched(4));
        assert_eq!((g.stride_a, g.stride_b, g.stride_c), (21, 15, 35));
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            check(Gemm::new(17, 3, 65).batched(5).trans_a(ta).trans_b(tb), 31);
            check(Gemm::new(1, 7, 17).trans_a(ta).trans_b(tb).batched(2), 32);
        }
        // Many small entries: exercises the minimum task size grouping several entries per rayon task.
        check(Gemm::new(3, 3, 3).batched(200), 33);
    }

    #[test]
    fn stride_zero_broadcasts_one_matrix_and_gaps_are_left_alone() {
        let shared_b = Gemm { stride_b: 0, ..Gemm::new(7, 17, 3).batched(6) };
        check(shared_b, 41);
        check(Gemm { stride_a: 0, ..Gemm::new(17, 7, 65).trans_a(true).batched(3) }, 42);

        // Broadcast entries must equal separate products with the shared operand.
        let mut rng = Rng::new(43);
        let a = randn(&mut rng, 6 * 7 * 3);
        let b = randn(&mut rng, 3 * 17);
        let mut c = vec![0.0; 6 * 7 * 17];
        matmul(&shared_b, &a, &b, &mut c);
        for bi in 0..6 {
            let mut one = vec![0.0; 7 * 17];
            matmul(&Gemm::new(7, 17, 3), &a[bi * 21..(bi + 1) * 21], &b, &mut one);
            assert_eq!(&c[bi * 119..(bi + 1) * 119], &one[..], "batch entry {bi}");
        }

        // stride_c > m·n: the elements between entries are not C and must keep their values.
        let gapped = Gemm { stride_c: 40, ..Gemm::new(5, 7, 3).batched(3) };
        check(gapped, 44);
        let mut c = vec![f64::NAN; 2 * 40 + 35];
        matmul(&gapped, &randn(&mut rng, 45), &randn(&mut rng, 63), &mut c);
        for bi in 0..3 {
            assert!(c[bi * 40..bi * 40 + 35].iter().all(|v| v.is_finite()));
        }
        assert!(c[35..40].iter().chain(&c[75..80]).all(|v| v.is_nan()));
    }

    #[test]
    fn beta_zero_never_reads_nan_in_c() {
        let mut rng = Rng::new(51);
        // m = 1 and n = 1 reach gemm's matrix-vector paths, the larger ones its blocked kernel.
        for (m, n, k) in [(1, 17, 7), (17, 1, 7), (1, 1, 65), (7, 17, 3), (65, 65, 65), (3, 5, 0)] {
            for (ta, tb) in [(false, false), (true, true)] {
                let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb).batched(2).alpha(0.5);
                let a = randn(&mut rng, 2 * m * k);
                let b = randn(&mut rng, 2 * k * n);
                let mut c = vec![f64::NAN; 2 * m * n];
                matmul(&g, &a, &b, &mut c);
                let mut want = vec![0.0; 2 * m * n];
                naive(&g, &a, &b, &mut want);
                assert_close(&format!("{g:?}"), &c, &want, Tolerance { abs: 1e-12 * 66.0, rel: 1e-12 });
            }
        }
        // The single-product path too (it passes gemm a different parallelism).
        let mut c = vec![f64::NAN; 9];
        matmul(&Gemm::new(3, 3, 2), &[1.0; 6], &[1.0; 6], &mut c);
        assert_eq!(c, vec![2.0; 9]);
    }

    #[test]
    fn k_zero_or_alpha_zero_leaves_beta_times_c() {
        let c0: Vec<f64> = (0..12).map(|i| i as f64 - 5.0).collect();
        let mut c = c0.clone();
        matmul(&Gemm::new(3, 4, 0).beta(2.0), &[], &[], &mut c);
        assert_eq!(c, c0.iter().map(|v| 2.0 * v).collect::<Vec<_>>());

        let mut c = vec![f64::NAN; 12];
        matmul(&Gemm::new(3, 2, 0).batched(2), &[], &[], &mut c);
        assert_eq!(c, vec![0.0; 12]);

        // alpha = 0 ignores A and B entirely, NaN included, as BLAS does.
        let mut c = c0.clone();
        matmul(&Gemm::new(3, 4, 2).alpha(0.0).beta(1.0), &[f64::NAN; 6], &[f64::NAN; 8], &mut c);
        assert_eq!(c, c0);
    }

    #[test]
    fn empty_shapes_touch_nothing() {
        let mut c = vec![7.0; 4];
        matmul(&Gemm::new(0, 4, 3).batched(5), &[], &[1.0; 12], &mut c);
        matmul(&Gemm::new(4, 0, 3), &[1.0; 12], &[], &mut c);
        matmul(&Gemm::new(2, 2, 3).batched(0), &[], &[], &mut c);
        assert_eq!(c, vec![7.0; 4]);
    }

    #[test]
    #[should_panic(expected = "last batch entry")]
    fn short_input_panics() {
        let mut c = vec![0.0; 2 * 6];
        matmul(&Gemm::new(2, 3, 4).batched(2), &[0.0; 15], &[0.0; 24], &mut c);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn overlapping_outputs_panic() {
        let mut c = vec![0.0; 6];
        matmul(&Gemm { stride_c: 0, ..Gemm::new(2, 3, 4).batched(2) }, &[0.0; 16], &[0.0; 24], &mut c);
    }

    #[test]
    fn f32_agrees_with_f64_reference_within_sqrt_k_scaled_tolerance() {
        let mut rng = Rng::new(61);
        for (m, n, k) in [(1, 1, 1), (7, 17, 3), (17, 65, 65), (65, 7, 300), (130, 140, 150)] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb).batched(2).alpha(0.75).beta(0.5);
                let (a, b, c0) = (randn(&mut rng, 2 * m * k), randn(&mut rng, 2 * k * n), randn(&mut rng, 2 * m * n));
                let mut want = c0.clone();
                naive(&g, &a, &b, &mut want);
                let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                let mut c = f32s(&c0);
                matmul(&g, &f32s(&a), &f32s(&b), &mut c);
                let got: Vec<f64> = c.iter().map(|v| v.f64()).collect();
                // Inputs are rounded to f32 too, so the error is a random walk of k roundings of O(1) terms.
                let s = (k as f64).sqrt();
                let tol = Tolerance { abs: Tolerance::F32.abs * s, rel: Tolerance::F32.rel * s };
                assert_close(&format!("f32 {g:?}"), &got, &want, tol);
            }
        }
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let mut rng = Rng::new(71);
        let (m, n, k) = (150, 170, 190);
        let a: Vec<f32> = randn(&mut rng, m * k).iter().map(|&v| v as f32).collect();
        let b: Vec<f32> = randn(&mut rng, k * n).iter().map(|&v| v as f32).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
            pool.install(|| {
                let mut c = vec![0.0f32; m * n];
                matmul(&Gemm::new(m, n, k), &a, &b, &mut c);
                c
            })
        };
        let one = run(1);
        assert_eq!(
            one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            run(4).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    /// The backward table in the module docs, checked by finite differences of L = Σ op(A)·op(B) ⊙ G.
    #[test]
    fn gradient_formulas_through_matmul() {
        let (m, n, k) = (3, 5, 4);
        let mut rng = Rng::new(81);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let fwd = Gemm::new(m, n, k).trans_a(ta).trans_b(tb);
            let (a, b, gr) = (randn(&mut rng, m * k), randn(&mut rng, k * n), randn(&mut rng, m * n));
            let loss = |a: &[f64], b: &[f64]| {
                let mut c = vec![0.0; m * n];
                matmul(&fwd, a, b, &mut c);
                dot(&c, &gr)
            };
            // dA has A's stored shape: [m, k], or [k, m] when trans_a.
            let mut da = vec![0.0; m * k];
            match ta {
                false => matmul(&Gemm::new(m, k, n).trans_b(!tb), &gr, &b, &mut da),
                true => matmul(&Gemm::new(k, m, n).trans_a(tb).trans_b(true), &b, &gr, &mut da),
            }
            check_gradient(&format!("dA ta={ta} tb={tb}"), &a, &da, |a| loss(a, &b));
            let mut db = vec![0.0; k * n];
            match tb {
                false => matmul(&Gemm::new(k, n, m).trans_a(!ta), &a, &gr, &mut db),
                true => matmul(&Gemm::new(n, k, m).trans_a(true).trans_b(ta), &gr, &a, &mut db),
            }
            check_gradient(&format!("dB ta={ta} tb={tb}"), &b, &db, |b| loss(&a, b));
        }
    }

    /// Batched backward with beta = 1: gradients accumulate into existing buffers, as autograd will use it.
    #[test]
    fn batched_gradient_accumulates_with_beta_one() {
        let (batch, m, n, k) = (3, 4, 2, 5);
        let mut rng = Rng::new(91);
        let fwd = Gemm::new(m, n, k).batched(batch);
        let (a, b, gr) =
            (randn(&mut rng, batch * m * k), randn(&mut rng, batch * k * n), randn(&mut rng, batch * m * n));
        let prior = randn(&mut rng, batch * m * k);
        let mut da = prior.clone();
        matmul(&Gemm::new(m, k, n).batched(batch).trans_b(true).beta(1.0), &gr, &b, &mut da);
        let grad: Vec<f64> = da.iter().zip(&prior).map(|(d, p)| d - p).collect();
        check_gradient("batched dA", &a, &grad, |a| {
            let mut c = vec![0.0; batch * m * n];
            matmul(&fwd, a, &b, &mut c);
            dot(&c, &gr)
        });
    }
}
