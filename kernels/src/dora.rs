//! DoRA's per-row and broadcast pieces (peft 0.21 `tuners/lora/dora.py`), the CPU reference of `kernels/cuda/dora.cu`:
//! the row norms n = ‖W + s·B·A‖ of the adapted weight, the magnitude ratio g = m/n, scaling a matrix by a vector
//! along its rows or columns, and the combined output y = z + (g − 1)⊙z_d + g⊙sv with what its backward reads.
//! Everything else DoRA needs is GEMMs and the elementwise ops.

use crate::float::Float;
use rayon::prelude::*;

/// Which index of `t[i, j]` a vector scales by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// By the row index i: c has one entry per row.
    Rows,
    /// By the column index j: c has one entry per column.
    Cols,
}

/// t: [rows, cols] → out: \[rows\] of ‖t_i‖₂, the squares summed in f64 in the GPU twin's order and the root rounded
/// once (peft takes the norm of the weight in its dtype; the f64 sum keeps a 14336-wide row exact to the last bit of
/// f32, and the shared order makes a merged DoRA weight the same bytes on either device).
pub fn row_norms<T: Float>(t: &[T], cols: usize, out: &mut [T]) {
    assert!(cols > 0 && t.len() == out.len() * cols, "row_norms: {} values for {} rows of {cols}", t.len(), out.len());
    out.par_iter_mut().zip(t.par_chunks_exact(cols)).for_each(|(n, row)| *n = T::c(sum_of_squares(row).sqrt()));
}

/// Threads per row in `dora_row_norms`: the launcher's block, asserted equal there at compile time.
pub(crate) const NORM_THREADS: usize = 256;

/// Σ x² in f64 as `dora_row_norms` adds it: thread i sums columns i, i + 256, … in turn; each warp of 32 folds its
/// partials by the butterfly (lane l adds lane l ^ o for o = 16, 8, 4, 2, 1); the 8 warp sums fold the same way
/// (padded with zeros to 32). The squares are exact in f64, so only the order of the sums could differ.
fn sum_of_squares<T: Float>(row: &[T]) -> f64 {
    let mut partial = [0.0f64; NORM_THREADS];
    for chunk in row.chunks(NORM_THREADS) {
        for (p, x) in partial.iter_mut().zip(chunk) {
            *p += x.f64() * x.f64();
        }
    }
    let mut warps = [0.0f64; 32];
    for (w, lanes) in warps.iter_mut().zip(partial.chunks_exact(32)) {
        *w = butterfly(lanes.try_into().expect("32 lanes"));
    }
    butterfly(warps)
}

/// Lane 0 of a warp's xor-shuffle sum (`block_sum_f64` in dora.cu).
fn butterfly(mut v: [f64; 32]) -> f64 {
    for o in [16, 8, 4, 2, 1] {
        let before = v;
        for (l, x) in v.iter_mut().enumerate() {
            *x = before[l] + before[l ^ o];
        }
    }
    v[0]
}

/// out = a / b elementwise (g = m / n).
pub fn ratio<T: Float>(a: &[T], b: &[T], out: &mut [T]) {
    assert!(a.len() == b.len() && a.len() == out.len(), "ratio: lengths {}, {}, {}", a.len(), b.len(), out.len());
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a / b;
    }
}

/// t: [rows, cols] → out_ij = t_ij·(c_k + offset), k = i along [`Axis::Rows`], j along [`Axis::Cols`].
pub fn scale_by<T: Float>(t: &[T], cols: usize, c: &[T], offset: T, axis: Axis, out: &mut [T]) {
    assert!(cols > 0 && t.len() % cols == 0 && out.len() == t.len(), "scale_by: {} values of rows of {cols}", t.len());
    let want = if axis == Axis::Rows { t.len() / cols } else { cols };
    assert_eq!(c.len(), want, "scale_by: the vector along {axis:?}");
    for (i, (o, row)) in out.chunks_exact_mut(cols).zip(t.chunks_exact(cols)).enumerate() {
        for (j, (o, &v)) in o.iter_mut().zip(row).enumerate() {
            let k = if axis == Axis::Rows { i } else { j };
            *o = v * (c[k] + offset);
        }
    }
}

/// z, z_d, sv: [rows, cols], g: \[cols\] → y = z + (g − 1)⊙z_d + g⊙sv (peft's order of terms) and, when given,
/// h = z_d + sv = ∂y/∂g.
pub fn combine<T: Float>(z: &[T], zd: &[T], sv: &[T], g: &[T], y: &mut [T], h: Option<&mut [T]>) {
    let cols = g.len();
    assert!(cols > 0 && z.len() % cols == 0, "combine: {} values for columns of {cols}", z.len());
    assert!(zd.len() == z.len() && sv.len() == z.len() && y.len() == z.len(), "combine: operand lengths");
    for (i, y) in y.iter_mut().enumerate() {
        let j = i % cols;
        *y = z[i] + (g[j] - T::c(1.0)) * zd[i] + g[j] * sv[i];
    }
    if let Some(h) = h {
        assert_eq!(h.len(), z.len(), "combine: h length");
        for ((h, &a), &b) in h.iter_mut().zip(zd).zip(sv) {
            *h = a + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_sum_in_the_gpu_order() {
        // 2^54 + 1 is 2^54 in f64: summed left to right the four ones vanish; in the block's order columns 1, 3, 5
        // and 7 (threads of one warp) meet first, and 2^54 + 4 is exact.
        let mut row = vec![0.0f64; 300];
        row[0] = 2f64.powi(27);
        for c in [1, 3, 5, 7] {
            row[c] = 1.0;
        }
        assert_eq!(row.iter().map(|x| x * x).sum::<f64>(), 2f64.powi(54));
        assert_eq!(sum_of_squares(&row), 2f64.powi(54) + 4.0);
        // Column 256 belongs to thread 0 and is added to its running sum: lost again.
        row[256] = 1.0;
        assert_eq!(sum_of_squares(&row), 2f64.powi(54) + 4.0);
    }

    #[test]
    fn norms_ratio_scales_and_combine_by_hand() {
        let t = [3.0f64, 4.0, 0.0, 1.0, 2.0, 2.0];
        let mut n = [0.0; 2];
        row_norms(&t, 3, &mut n);
        assert_eq!(n, [5.0, 3.0]);
        let mut g = [0.0; 2];
        ratio(&[10.0, 1.5], &n, &mut g);
        assert_eq!(g, [2.0, 0.5]);
        let mut out = [0.0; 6];
        scale_by(&t, 3, &g, 0.0, Axis::Rows, &mut out);
        assert_eq!(out, [6.0, 8.0, 0.0, 0.5, 1.0, 1.0]);
        scale_by(&t, 3, &[1.0, 2.0, 3.0], -1.0, Axis::Cols, &mut out);
        assert_eq!(out, [0.0, 4.0, 0.0, 0.0, 2.0, 4.0]);
        let (z, zd, sv) = ([1.0, 2.0], [10.0, 20.0], [100.0, 200.0]);
        let (mut y, mut h) = ([0.0; 2], [0.0; 2]);
        combine(&z, &zd, &sv, &[2.0, 0.5], &mut y, Some(&mut h));
        assert_eq!(y, [1.0 + 10.0 + 200.0, 2.0 - 10.0 + 100.0]);
        assert_eq!(h, [110.0, 220.0]);
    }
}
