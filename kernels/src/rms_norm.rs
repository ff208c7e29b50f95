//! RMSNorm over the last axis: `y = x · rstd · (offset + w)`, `rstd = 1/√(mean(x²) + eps)` (REFERENCE.md §5.1, §6.1).
//!
//! `offset = 0` is `LlamaRMSNorm`, `offset = 1` is Gemma's `(1 + w)` with the checkpoint's `w` passed unchanged. Where
//! the bf16 cast sits (Llama casts before the weight multiply, Gemma after) is `runtime`'s business: in f32/f64 the
//! two orders are the same computation. The product is evaluated as `(x · rstd) · (offset + w)`, transformers' order.

use crate::Float;
use rayon::prelude::*;

/// Below this many elements a task costs more to schedule than to run.
const MIN_PAR_ELEMS: usize = 1 << 14;
/// The weight gradient is reduced over at most this many row blocks, which bounds its scratch to this many rows.
const MAX_DW_BLOCKS: usize = 64;

/// x: [rows, dim], weight: \[dim\] → y: [rows, dim], rstd: \[rows\] (saved for backward)
pub fn rms_norm_forward<T: Float>(x: &[T], weight: &[T], dim: usize, eps: T, offset: T, y: &mut [T], rstd: &mut [T]) {
    let rows = check_shapes(x.len(), weight.len(), dim, rstd.len());
    assert_eq!(y.len(), rows * dim, "rms_norm_forward: y length");
    let n = T::c(dim as f64);
    y.par_chunks_mut(dim)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(dim))
        .with_min_len(MIN_PAR_ELEMS.div_ceil(dim))
        .for_each(|((y, rstd), x)| {
            let sum_sq: T = x.iter().map(|&v| v * v).sum();
            let r = T::one() / (sum_sq / n + eps).sqrt();
            *rstd = r;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                *y = x * r * (offset + w);
            }
        });
}

/// x, dy: [rows, dim], rstd: \[rows\] → dx: [rows, dim] (written), dw: \[dim\] when wanted (written: Σ over rows,
/// deterministic order; None for a frozen weight).
///
/// After [`add_rms_norm_forward`], x is h and `d_residual` [rows, dim] what reached h from its other readers: dx
/// is then d_residual + the norm's dx, the gradient of both x and residual (h = x + residual).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward<T: Float>(
    x: &[T],
    weight: &[T],
    rstd: &[T],
    dy: &[T],
    d_residual: Option<&[T]>,
    dim: usize,
    offset: T,
    dx: &mut [T],
    dw: Option<&mut [T]>,
) {
    let rows = check_shapes(x.len(), weight.len(), dim, rstd.len());
    assert_eq!(dy.len(), rows * dim, "rms_norm_backward: dy length");
    assert_eq!(dx.len(), rows * dim, "rms_norm_backward: dx length");
    if let Some(d_residual) = d_residual {
        assert_eq!(d_residual.len(), rows * dim, "rms_norm_backward: d_residual length");
    }
    let mut unwanted = Vec::new();
    let dw = dw.unwrap_or_else(|| {
        unwanted = vec![T::zero(); dim];
        &mut unwanted
    });
    assert_eq!(dw.len(), dim, "rms_norm_backward: dw length");
    let n = T::c(dim as f64);

    // dw is a sum over rows. Each block of rows sums its own rows in order into a private partial, and the partials are
    // added in block order; block boundaries depend only on the shape, so dw is bitwise the same on any thread count.
    let block_rows = rows.div_ceil(MAX_DW_BLOCKS).max(MIN_PAR_ELEMS.div_ceil(dim));
    let mut partial = vec![T::zero(); rows.div_ceil(block_rows) * dim];
    dx.par_chunks_mut(block_rows * dim)
        .zip(partial.par_chunks_mut(dim))
        .zip(x.par_chunks(block_rows * dim))
        .zip(dy.par_chunks(block_rows * dim))
        .zip(rstd.par_chunks(block_rows))
        .for_each(|((((dx, dw), x), dy), rstd)| {
            for (((dx, x), dy), &r) in dx.chunks_mut(dim).zip(x.chunks(dim)).zip(dy.chunks(dim)).zip(rstd) {
                // With g = dy ⊙ (offset + w): ∂rstd/∂x_j = −rstd³·x_j/dim, so dx = rstd·(g − x·rstd²·Σ(g ⊙ x)/dim).
                let g_dot_x: T = x.iter().zip(dy).zip(weight).map(|((&x, &dy), &w)| dy * (offset + w) * x).sum();
                let c = g_dot_x * r * r / n;
                for ((((dx, dw), &x), &dy), &w) in dx.iter_mut().zip(dw.iter_mut()).zip(x).zip(dy).zip(weight) {
                    *dx = r * (dy * (offset + w) - x * c);
                    *dw = *dw + dy * (x * r);
                }
            }
        });
    dw.fill(T::zero());
    for block in partial.chunks(dim) {
        for (dw, &p) in dw.iter_mut().zip(block) {
            *dw = *dw + p;
        }
    }
    let Some(d_residual) = d_residual else { return };
    dx.par_chunks_mut(MIN_PAR_ELEMS).zip(d_residual.par_chunks(MIN_PAR_ELEMS)).for_each(|(dx, dr)| {
        for (dx, &dr) in dx.iter_mut().zip(dr) {
            *dx = dr + *dx;
        }
    });
}

/// x, residual: [rows, dim], weight: \[dim\] → h = x + residual: [rows, dim], y = rms_norm(h): [rows, dim], rstd: \[rows\]
/// (the residual stream's add fused with the norm that follows it; y is the norm of h as stored)
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_forward<T: Float>(
    x: &[T],
    residual: &[T],
    weight: &[T],
    dim: usize,
    eps: T,
    offset: T,
    h: &mut [T],
    y: &mut [T],
    rstd: &mut [T],
) {
    assert_eq!(residual.len(), x.len(), "add_rms_norm_forward: residual length");
    assert_eq!(h.len(), x.len(), "add_rms_norm_forward: h length");
    h.par_chunks_mut(MIN_PAR_ELEMS).zip(x.par_chunks(MIN_PAR_ELEMS)).zip(residual.par_chunks(MIN_PAR_ELEMS)).for_each(
        |((h, x), r)| {
            for ((h, &x), &r) in h.iter_mut().zip(x).zip(r) {
                *h = x + r;
            }
        },
    );
    rms_norm_forward(h, weight, dim, eps, offset, y, rstd);
}

/// The row count, after asserting the shapes shared by forward and backward (the CUDA launchers share the contract).
pub(crate) fn check_shapes(x_len: usize, weight_len: usize, dim: usize, rstd_len: usize) -> usize {
    assert!(dim > 0, "rms_norm: dim must be positive");
    assert_eq!(x_len % dim, 0, "rms_norm: x length {x_len} is not a multiple of dim {dim}");
    assert_eq!(weight_len, dim, "rms_norm: weight length");
    let rows = x_len / dim;
    assert_eq!(rstd_len, rows, "rms_norm: rstd length");
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_gradient, dot, f32s, f64s, randn, Tolerance};
    use crate::Rng;

    const EPS: f64 = 1e-6;
    /// Two f64 evaluations of the same formula in different orders.
    const F64: Tolerance = Tolerance { abs: 1e-12, rel: 1e-12 };
    const SHAPES: [(usize, usize); 9] = [(1, 5), (1, 17), (1, 64), (3, 5), (3, 17), (3, 64), (7, 5), (7, 17), (7, 64)];

    /// Outputs start as NaN so that an element the kernel forgot to write fails every comparison.
    fn forward<T: Float>(x: &[T], w: &[T], dim: usize, offset: f64) -> (Vec<T>, Vec<T>) {
        let mut y = vec![T::nan(); x.len()];
        let mut rstd = vec![T::nan(); x.len() / dim];
        rms_norm_forward(x, w, dim, T::c(EPS), T::c(offset), &mut y, &mut rstd);
        (y, rstd)
    }

    fn backward<T: Float>(x: &[T], w: &[T], rstd: &[T], dy: &[T], dim: usize, offset: f64) -> (Vec<T>, Vec<T>) {
        let mut dx = vec![T::nan(); x.len()];
        let mut dw = vec![T::nan(); dim];
        rms_norm_backward(x, w, rstd, dy, None, dim, T::c(offset), &mut dx, Some(&mut dw));
        (dx, dw)
    }

    /// Runs `check` on every shape and both offsets with random x and w, drawn from a generator seeded `seed` that
    /// `check` may draw more from.
    fn each_case(seed: u64, mut check: impl FnMut(&mut Rng, usize, usize, f64, Vec<f64>, Vec<f64>)) {
        let mut rng = Rng::new(seed);
        for (rows, dim) in SHAPES {
            for offset in [0.0, 1.0] {
                let x = randn(&mut rng, rows * dim);
                let w = randn(&mut rng, dim);
                check(&mut rng, rows, dim, offset, x, w);
            }
        }
    }

    #[test]
    fn forward_matches_direct_formula() {
        each_case(1, |_, rows, dim, offset, x, w| {
            let (y, rstd) = forward(&x, &w, dim, offset);
            let mut want_y = Vec::new();
            let mut want_rstd = Vec::new();
            for row in x.chunks(dim) {
                let mean_sq = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
                let r = 1.0 / (mean_sq + EPS).sqrt();
                want_rstd.push(r);
                want_y.extend(row.iter().zip(&w).map(|(v, w)| v * r * (offset + w)));
            }
            assert_close(&format!("y {rows}x{dim} offset {offset}"), &y, &want_y, F64);
            assert_close(&format!("rstd {rows}x{dim}"), &rstd, &want_rstd, F64);
        });
    }

    #[test]
    fn gemma_offset_is_llama_with_one_plus_w() {
        let mut rng = Rng::new(2);
        let (rows, dim) = (3, 17);
        let x = randn(&mut rng, rows * dim);
        let w = randn(&mut rng, dim);
        let one_plus_w: Vec<f64> = w.iter().map(|w| 1.0 + w).collect();
        assert_eq!(forward(&x, &w, dim, 1.0), forward(&x, &one_plus_w, dim, 0.0));
        // Gemma initialises w to zeros: the layer starts as a pure normalisation, each row with mean square ≈ 1.
        let (y, _) = forward(&x, &vec![0.0; dim], dim, 1.0);
        for row in y.chunks(dim) {
            let mean_sq = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
            assert!((mean_sq - 1.0).abs() < 1e-5, "mean square {mean_sq}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        each_case(3, |rng, rows, dim, offset, x, w| {
            let g = randn(rng, rows * dim);
            let (_, rstd) = forward(&x, &w, dim, offset);
            let (dx, dw) = backward(&x, &w, &rstd, &g, dim, offset);
            let what = format!("{rows}x{dim} offset {offset}");
            check_gradient(&format!("dx {what}"), &x, &dx, |x| dot(&forward(x, &w, dim, offset).0, &g));
            check_gradient(&format!("dw {what}"), &w, &dw, |w| dot(&forward(&x, w, dim, offset).0, &g));
        });
    }

    #[test]
    fn f32_agrees_with_f64() {
        let mut rng = Rng::new(4);
        let (rows, dim) = (7, 64);
        for offset in [0.0, 1.0] {
            // Both precisions see the same f32-representable inputs, so only the arithmetic differs.
            let x = f64s(&f32s(&randn(&mut rng, rows * dim)));
            let w = f64s(&f32s(&randn(&mut rng, dim)));
            let g = f64s(&f32s(&randn(&mut rng, rows * dim)));
            let (y64, r64) = forward(&x, &w, dim, offset);
            let (dx64, dw64) = backward(&x, &w, &r64, &g, dim, offset);
            let (y32, r32) = forward(&f32s(&x), &f32s(&w), dim, offset);
            let (dx32, dw32) = backward(&f32s(&x), &f32s(&w), &r32, &f32s(&g), dim, offset);
            assert_close("y", &f64s(&y32), &y64, Tolerance::F32);
            assert_close("rstd", &f64s(&r32), &r64, Tolerance::F32);
            assert_close("dx", &f64s(&dx32), &dx64, Tolerance::F32);
            assert_close("dw", &f64s(&dw32), &dw64, Tolerance::F32);
        }
    }

    /// Enough rows for several dw blocks and several forward tasks.
    const MANY_ROWS: (usize, usize) = (2000, 64);

    #[test]
    fn weight_gradient_over_many_blocks_is_the_row_sum() {
        let mut rng = Rng::new(5);
        let (rows, dim) = MANY_ROWS;
        assert!(rows.div_ceil(rows.div_ceil(MAX_DW_BLOCKS).max(MIN_PAR_ELEMS.div_ceil(dim))) > 1, "one block only");
        let x = randn(&mut rng, rows * dim);
        let w = randn(&mut rng, dim);
        let g = randn(&mut rng, rows * dim);
        let (_, rstd) = forward(&x, &w, dim, 0.0);
        let (_, dw) = backward(&x, &w, &rstd, &g, dim, 0.0);
        let want: Vec<f64> =
            (0..dim).map(|j| (0..rows).map(|r| g[r * dim + j] * x[r * dim + j] * rstd[r]).sum()).collect();
        assert_close("dw", &dw, &want, Tolerance { abs: 1e-10, rel: 1e-10 });
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let mut rng = Rng::new(6);
        let (rows, dim) = MANY_ROWS;
        let x = f32s(&randn(&mut rng, rows * dim));
        let w = f32s(&randn(&mut rng, dim));
        let g = f32s(&randn(&mut rng, rows * dim));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (y, rstd) = forward(&x, &w, dim, 1.0);
                let (dx, dw) = backward(&x, &w, &rstd, &g, dim, 1.0);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                (bits(&y), bits(&rstd), bits(&dx), bits(&dw))
            })
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert!(run(threads) == one, "{threads} threads differ from 1");
        }
    }

    #[test]
    fn fused_residual_add_is_the_add_then_the_norm() {
        let mut rng = Rng::new(7);
        let (rows, dim) = (5, 17);
        for offset in [0.0, 1.0] {
            let (x, r, w, g, dh) = (
                randn(&mut rng, rows * dim),
                randn(&mut rng, rows * dim),
                randn(&mut rng, dim),
                randn(&mut rng, rows * dim),
                randn(&mut rng, rows * dim),
            );
            let (mut h, mut y, mut rstd) =
                (vec![f64::NAN; rows * dim], vec![f64::NAN; rows * dim], vec![f64::NAN; rows]);
            add_rms_norm_forward(&x, &r, &w, dim, EPS, offset, &mut h, &mut y, &mut rstd);
            let want_h: Vec<f64> = x.iter().zip(&r).map(|(x, r)| x + r).collect();
            assert_eq!(h, want_h);
            assert_eq!((y.clone(), rstd.clone()), forward(&want_h, &w, dim, offset));
            // h feeds the norm and the residual stream, whose gradient dh arrives beside the norm's dy.
            let (mut dx, mut dw) = (vec![f64::NAN; rows * dim], vec![f64::NAN; dim]);
            rms_norm_backward(&h, &w, &rstd, &g, Some(&dh), dim, offset, &mut dx, Some(&mut dw));
            let (norm_dx, want_dw) = backward(&h, &w, &rstd, &g, dim, offset);
            let want_dx: Vec<f64> = norm_dx.iter().zip(&dh).map(|(a, b)| a + b).collect();
            assert_eq!((dx.clone(), dw), (want_dx, want_dw));
            let loss = |x: &[f64], r: &[f64]| {
                let (mut h, mut y, mut s) = (vec![0.0; rows * dim], vec![0.0; rows * dim], vec![0.0; rows]);
                add_rms_norm_forward(x, r, &w, dim, EPS, offset, &mut h, &mut y, &mut s);
                dot(&y, &g) + dot(&h, &dh)
            };
            check_gradient(&format!("dx offset {offset}"), &x, &dx, |x| loss(x, &r));
            check_gradient(&format!("d_residual offset {offset}"), &r, &dx, |r| loss(&x, r));
        }
    }

    #[test]
    #[should_panic(expected = "weight length")]
    fn weight_length_mismatch_panics() {
        forward(&[1.0; 6], &[1.0; 2], 3, 0.0);
    }

    #[test]
    #[should_panic(expected = "not a multiple of dim")]
    fn ragged_rows_panic() {
        forward(&[1.0; 7], &[1.0; 3], 3, 0.0);
    }
}
