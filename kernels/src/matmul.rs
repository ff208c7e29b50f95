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
/// Each stored matrix starts `offset_*` elements into its buffer and steps `ld_*` elements from row to row (its
/// leading dimension, at least its row length; None: exactly its row length): a column block of a wider matrix is
/// read or written in place, as the LoRA branch reads its slice of the x·Aᵀ of a whole projection group.
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
    pub ld_a: Option<usize>,
    pub ld_b: Option<usize>,
    pub ld_c: Option<usize>,
    pub offset_a: usize,
    pub offset_b: usize,
    pub offset_c: usize,
    pub alpha: f64,
    pub beta: f64,
}

impl Gemm {
    /// One [m, k]·[k, n] product, no transposes, alpha 1, beta 0, contiguous batch strides, packed rows, no offsets.
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
            ld_a: None,
            ld_b: None,
            ld_c: None,
            offset_a: 0,
            offset_b: 0,
            offset_c: 0,
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

    /// (rows, columns) of A as stored.
    pub fn stored_a(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// (rows, columns) of B as stored.
    pub fn stored_b(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Leading dimensions (A, B, C) in elements, None resolved to the stored row length.
    pub fn lds(&self) -> (usize, usize, usize) {
        (self.ld_a.unwrap_or(self.stored_a().1), self.ld_b.unwrap_or(self.stored_b().1), self.ld_c.unwrap_or(self.n))
    }

    /// Elements of A's buffer that the product may read: up to the end of its last batch entry.
    pub fn len_a(&self) -> usize {
        let (rows, cols) = self.stored_a();
        extent(self.batch, self.offset_a, self.stride_a, span(rows, cols, self.lds().0))
    }

    /// Elements of B's buffer that the product may read.
    pub fn len_b(&self) -> usize {
        let (rows, cols) = self.stored_b();
        extent(self.batch, self.offset_b, self.stride_b, span(rows, cols, self.lds().1))
    }

    /// Elements of C's buffer that the product may touch.
    pub fn len_c(&self) -> usize {
        extent(self.batch, self.offset_c, self.stride_c_used(), self.span_c())
    }

    /// Elements one batch entry of C spans, gaps between its rows included.
    fn span_c(&self) -> usize {
        span(self.m, self.n, self.lds().2)
    }

    /// The C batch stride in effect (a single product ignores `stride_c`).
    pub(crate) fn stride_c_used(&self) -> usize {
        if self.batch == 1 {
            self.span_c()
        } else {
            self.stride_c
        }
    }
}

/// Elements a rows × cols matrix with leading dimension ld spans from its first element (0 when empty).
fn span(rows: usize, cols: usize, ld: usize) -> usize {
    checked_span(rows, cols, ld).expect("matmul: a matrix's span overflows usize")
}

/// offset + (batch − 1)·stride + size: the end of the last batch entry (0 when there is none or it is empty).
fn extent(batch: usize, offset: usize, stride: usize, size: usize) -> usize {
    checked_extent(batch, offset, stride, Some(size)).expect("matmul: an operand's extent overflows usize")
}

/// Below this many multiply-adds per rayon task, scheduling costs more than the arithmetic.
const MIN_TASK_FLOPS: usize = 1 << 16;

/// a: [batch, op(A) stored], b: [batch, op(B) stored], c: [batch, m, n] → c (see [`Gemm`]).
///
/// The C entries of different batch entries must not overlap (`stride_c` ≥ the span of one entry when batch > 1).
/// When alpha == 0 or k == 0, A and B are not read (BLAS convention): C becomes beta·C, or zeros when beta == 0.
/// Elements of the buffers outside the matrices (offsets, the gaps of a leading dimension) are never touched.
pub fn matmul<T: Float>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) {
    let (m, n, k) = (g.m, g.n, g.k);
    if g.batch == 0 {
        return;
    }
    let c_end = check_c(g, c.len());
    if m * n == 0 {
        return;
    }
    let (stride_c, span_c, ldc) = (g.stride_c_used(), g.span_c(), g.lds().2);
    let c = &mut c[g.offset_c..c_end];
    if k == 0 || g.alpha == 0.0 {
        for i in 0..g.batch {
            for row in c[i * stride_c..i * stride_c + span_c].chunks_mut(ldc) {
                scale_in_place(&mut row[..n], g.beta);
            }
        }
        return;
    }
    check_ab(g, a.len(), b.len());
    let entry = |i: usize, c_b: &mut [T], par: Parallelism| {
        let a_b = &a[g.offset_a + i * g.stride_a..];
        let b_b = &b[g.offset_b + i * g.stride_b..];
        gemm_one(g, a_b, b_b, &mut c_b[..span_c], par);
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

/// The end of what a non-empty batch writes in C, after asserting that `c_len` holds it, that rows fit their leading
/// dimension and that batch entries do not overlap (the CUDA twin shares the contract).
pub(crate) fn check_c(g: &Gemm, c_len: usize) -> usize {
    let ldc = g.lds().2;
    check_ld("C", g.m, g.n, ldc);
    let span = checked_span(g.m, g.n, ldc);
    assert!(
        g.batch == 1 || span.is_some_and(|s| g.stride_c >= s),
        "matmul: stride_c {} < the {span:?} elements of one entry of C: it overlaps batch entries",
        g.stride_c,
    );
    required_len("C", checked_extent(g.batch, g.offset_c, g.stride_c_used(), span), c_len)
}

/// Asserts that A and B hold every batch entry: checked only where the product reads them (not when k == 0 or
/// alpha == 0), by both twins.
pub(crate) fn check_ab(g: &Gemm, a_len: usize, b_len: usize) {
    let (lda, ldb, _) = g.lds();
    let ((ra, ca), (rb, cb)) = (g.stored_a(), g.stored_b());
    check_ld("A", ra, ca, lda);
    check_ld("B", rb, cb, ldb);
    required_len("A", checked_extent(g.batch, g.offset_a, g.stride_a, checked_span(ra, ca, lda)), a_len);
    required_len("B", checked_extent(g.batch, g.offset_b, g.stride_b, checked_span(rb, cb, ldb)), b_len);
}

/// A leading dimension shorter than the row would make rows overlap.
fn check_ld(what: &str, rows: usize, cols: usize, ld: usize) {
    assert!(rows <= 1 || ld >= cols, "matmul: the leading dimension {ld} of {what} is below its row length {cols}");
}

/// [`span`] without overflow.
fn checked_span(rows: usize, cols: usize, ld: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        Some(0)
    } else {
        (rows - 1).checked_mul(ld)?.checked_add(cols)
    }
}

/// [`extent`] without overflow.
fn checked_extent(batch: usize, offset: usize, stride: usize, size: Option<usize>) -> Option<usize> {
    match size? {
        _ if batch == 0 => Some(0),
        0 => Some(0),
        size => stride.checked_mul(batch - 1)?.checked_add(size)?.checked_add(offset),
    }
}

/// The extent, asserted to fit in `len` (and not to overflow).
fn required_len(what: &str, need: Option<usize>, len: usize) -> usize {
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

/// One product: a, b start at op(A)'s and op(B)'s first stored element, c at C's, each long enough for its span.
fn gemm_one<T: Float>(g: &Gemm, a: &[T], b: &[T], c: &mut [T], par: Parallelism) {
    let (m, n, k) = (g.m, g.n, g.k);
    let (lda, ldb, ldc) = g.lds();
    debug_assert!(a.len() >= span(g.stored_a().0, g.stored_a().1, lda));
    debug_assert!(b.len() >= span(g.stored_b().0, g.stored_b().1, ldb) && c.len() >= span(m, n, ldc));
    // (row stride, column stride) of op(X) in elements: a transpose swaps which index walks contiguously.
    let (a_rs, a_cs) = if g.trans_a { (1, lda) } else { (lda, 1) };
    let (b_rs, b_cs) = if g.trans_b { (1, ldb) } else { (ldb, 1) };
    // SAFETY: every index gemm touches is row·rs + col·cs over op(A) [m, k], op(B) [k, n] and C [m, n]; with the
    // strides above the largest is the span of the stored matrix minus one ((rows − 1)·ld + cols − 1), inside `a`,
    // `b` and `c`, which hold at least those spans (checked by `check_ab`/`check_c`). Slice lengths never exceed
    // isize::MAX, so the stride casts are lossless. `c` is a `&mut` borrow, so it aliases neither input. read_dst is
    // false when beta == 0, so gemm never reads C's old contents then. gemm dispatches on TypeId and supports both
    // Float types, f32 and f64.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
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

    /// The definition, in f64, reading A, B and C through the same stored layouts, strides, offsets and leading
    /// dimensions as `matmul`.
    fn naive(g: &Gemm, a: &[f64], b: &[f64], c: &mut [f64]) {
        let (m, n, k) = (g.m, g.n, g.k);
        let (lda, ldb, ldc) = g.lds();
        for bi in 0..g.batch {
            let (a, b) = (&a[g.offset_a + bi * g.stride_a..], &b[g.offset_b + bi * g.stride_b..]);
            let c = &mut c[g.offset_c + bi * g.stride_c..];
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for p in 0..k {
                        let av = if g.trans_a { a[p * lda + i] } else { a[i * lda + p] };
                        let bv = if g.trans_b { b[j * ldb + p] } else { b[p * ldb + j] };
                        acc += av * bv;
                    }
                    let prev = if g.beta == 0.0 { 0.0 } else { g.beta * c[i * ldc + j] };
                    c[i * ldc + j] = g.alpha * acc + prev;
                }
            }
        }
    }

    /// Runs `matmul::<f64>` and the naive definition on the same random A, B, C and compares.
    fn check(g: Gemm, seed: u64) {
        let mut rng = Rng::new(seed);
        let a = randn(&mut rng, g.len_a());
        let b = randn(&mut rng, g.len_b());
        let c0 = randn(&mut rng, g.len_c());
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

    /// Column blocks: each operand a block of a wider row-major matrix (leading dimension past its row length, an
    /// offset to its first column), every transpose, batched and not, alpha and beta; the columns outside C's block
    /// keep their values (`check` compares the whole buffer).
    #[test]
    fn leading_dimensions_and_offsets_read_and_write_column_blocks() {
        let mut seed = 100;
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 3, 65), (65, 17, 3)] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                for (pad, off) in [(0, 0), (3, 2), (11, 5)] {
                    let base = Gemm::new(m, n, k).trans_a(ta).trans_b(tb);
                    let ((_, ca), (_, cb)) = (base.stored_a(), base.stored_b());
                    let g = Gemm {
                        ld_a: Some(ca + pad),
                        ld_b: Some(cb + pad + 1),
                        ld_c: Some(n + pad),
                        offset_a: off,
                        offset_b: 2 * off,
                        offset_c: off + 1,
                        ..base.alpha(0.75).beta(0.5)
                    };
                    seed += 1;
                    check(g, seed);
                    check(g.beta(0.0), seed);
                    let spans = (g.len_a() - off, g.len_b() - 2 * off, g.len_c() - off - 1);
                    let batched =
                        Gemm { stride_a: spans.0 + 4, stride_b: spans.1, stride_c: spans.2 + 1, batch: 3, ..g };
                    check(batched, seed);
                }
            }
        }
        // k == 0 and alpha == 0 scale only the block's rows, never the gaps.
        for (k, alpha) in [(0, 1.0), (4, 0.0)] {
            for beta in [0.0, 2.0] {
                let g = Gemm { ld_c: Some(9), offset_c: 3, ..Gemm::new(4, 5, k).alpha(alpha).beta(beta) };
                let mut c = vec![f64::NAN; g.len_c() + 2];
                for i in 0..4 {
                    c[3 + i * 9..3 + i * 9 + 5].fill(1.5);
                }
                matmul(&g, &[f64::NAN; 40], &[f64::NAN; 40], &mut c);
                for (i, v) in c.iter().enumerate() {
                    let inside = i >= 3 && (i - 3) / 9 < 4 && (i - 3) % 9 < 5;
                    assert_eq!(inside, !v.is_nan(), "k {k} α {alpha} β {beta}: element {i} = {v}");
                    assert!(!inside || *v == 1.5 * beta, "k {k} α {alpha} β {beta}: element {i} = {v}");
                }
            }
        }
    }

    /// A product written into a column block with a leading dimension gives the bits of the same product written
    /// packed: the layout of C changes where results go, not how they are summed.
    #[test]
    fn column_block_of_c_equals_the_packed_product_bit_for_bit() {
        let mut rng = Rng::new(111);
        for (m, n, k, ta, tb) in [(37, 5, 300, false, true), (8, 16, 129, true, false), (200, 48, 64, false, false)] {
            let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb).alpha(0.375);
            let a: Vec<f32> = randn(&mut rng, g.len_a()).iter().map(|&v| v as f32).collect();
            let b: Vec<f32> = randn(&mut rng, g.len_b()).iter().map(|&v| v as f32).collect();
            let mut packed = vec![0f32; m * n];
            matmul(&g, &a, &b, &mut packed);
            let wide = Gemm { ld_c: Some(n + 7), offset_c: 4, ..g };
            let mut c = vec![0f32; wide.len_c()];
            matmul(&wide, &a, &b, &mut c);
            for i in 0..m {
                assert_eq!(&c[4 + i * (n + 7)..][..n], &packed[i * n..][..n], "{m}x{n}x{k} row {i}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "leading dimension")]
    fn leading_dimension_below_the_row_panics() {
        let g = Gemm { ld_a: Some(3), ..Gemm::new(2, 3, 4) };
        matmul(&g, &[0.0; 16], &[0.0; 12], &mut [0.0; 6]);
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
