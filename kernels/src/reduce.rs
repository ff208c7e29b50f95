//! Reductions: full sums (loss, global gradient norm), column sums (bias gradients) and max |x| (overflow checks).
//!
//! Training must be bit-reproducible on CPU whatever the thread count, so no result may depend on where rayon's
//! work stealing splits the input: sums are cut into fixed-size chunks, each chunk is reduced serially, and the
//! chunk partials are combined in index order. Sums accumulate in f64 (exact widening for f32), so an f32 result
//! is rounded once at the end and a million-element global norm does not drift with the summation order.
//!
//! Backward (the tests check them by finite differences): ∂sum/∂x = 1; ∂sum_squares/∂x = 2x; sum_rows broadcasts
//! the upstream \[cols\] gradient over rows (`elementwise::add_bias` onto zeros).

use crate::Float;
use rayon::prelude::*;

/// Elements per chunk. Fixed, never derived from the thread count: it decides the summation order.
const CHUNK: usize = 1 << 14;

/// Independent accumulators per chunk: they break the serial add dependency so the loop vectorises, and being a
/// constant they keep the summation order fixed.
const LANES: usize = 8;

/// Columns per sum_rows task: each task owns a column block, so every column is summed over rows in row order.
const COL_BLOCK: usize = 256;

/// x: \[len\] → Σ x, bit-identical for any rayon thread count
pub fn sum<T: Float>(x: &[T]) -> T {
    T::c(chunked_sum(x, |v| v.f64()))
}

/// x: \[len\] → Σ x², bit-identical for any rayon thread count
pub fn sum_squares<T: Float>(x: &[T]) -> T {
    T::c(chunked_sum(x, |v| v.f64() * v.f64()))
}

/// x: [rows, cols] → out: \[cols\] = Σ over rows, bit-identical for any rayon thread count
pub fn sum_rows<T: Float>(x: &[T], cols: usize, out: &mut [T]) {
    column_sums("sum_rows", x, None, cols, out);
}

/// [x, y]: [rows, cols] each → out: \[cols\] = Σ over rows of x⊙y, the products never rounded to T (DoRA's magnitude
/// gradient Σ_rows dy⊙y without a [rows, cols] product), bit-identical for any rayon thread count
pub fn sum_rows_product<T: Float>([x, y]: [&[T]; 2], cols: usize, out: &mut [T]) {
    assert_eq!(x.len(), y.len(), "sum_rows_product: x and y lengths");
    column_sums("sum_rows_product", x, Some(y), cols, out);
}

/// Σ over the rows of x (of x⊙y with `y`) in f64, each column rounded once.
fn column_sums<T: Float>(op: &str, x: &[T], y: Option<&[T]>, cols: usize, out: &mut [T]) {
    assert_eq!(out.len(), cols, "{op}: out length vs cols");
    if cols == 0 {
        assert!(x.is_empty(), "{op}: {} elements with zero columns", x.len());
        return;
    }
    assert!(x.len() % cols == 0, "{op}: {} elements are not rows of {cols}", x.len());
    let rows = x.len() / cols;
    let blocks_per_task = CHUNK.div_ceil(rows.max(1) * COL_BLOCK);
    out.par_chunks_mut(COL_BLOCK).enumerate().with_min_len(blocks_per_task).for_each(|(block, out)| {
        let c0 = block * COL_BLOCK;
        let mut acc = [0.0f64; COL_BLOCK];
        let acc = &mut acc[..out.len()];
        for (r, row) in x.chunks_exact(cols).enumerate() {
            let xs = &row[c0..c0 + out.len()];
            match y {
                None => acc.iter_mut().zip(xs).for_each(|(a, &v)| *a += v.f64()),
                Some(y) => {
                    let ys = &y[r * cols + c0..r * cols + c0 + out.len()];
                    acc.iter_mut().zip(xs).zip(ys).for_each(|((a, &v), &w)| *a += v.f64() * w.f64());
                }
            }
        }
        out.iter_mut().zip(acc.iter()).for_each(|(o, &a)| *o = T::c(a));
    });
}

/// x: \[len\] → max |x|; 0 for empty, NaN when any element is NaN
pub fn max_abs<T: Float>(x: &[T]) -> T {
    // Max is exact, so unlike the sums its combine order cannot change the result.
    x.par_chunks(CHUNK).map(|c| c.iter().fold(T::zero(), |m, &v| nan_max(m, v.abs()))).reduce(T::zero, nan_max)
}

/// `max` that returns NaN when either side is NaN (`Float::max` drops NaN, which would hide a diverged step).
fn nan_max<T: Float>(a: T, b: T) -> T {
    if a.is_nan() || b.is_nan() {
        T::nan()
    } else {
        a.max(b)
    }
}

fn chunked_sum<T: Float>(x: &[T], f: impl Fn(T) -> f64 + Sync) -> f64 {
    let chunk_sum = |c: &[T]| {
        let mut lanes = [0.0f64; LANES];
        let mut it = c.chunks_exact(LANES);
        for group in &mut it {
            lanes.iter_mut().zip(group).for_each(|(l, &v)| *l += f(v));
        }
        let tail: f64 = it.remainder().iter().map(|&v| f(v)).sum();
        lanes.iter().sum::<f64>() + tail
    };
    // One chunk needs no pool; whether this shortcut is taken depends only on the length, never on threads.
    if x.len() <= CHUNK {
        return chunk_sum(x);
    }
    // collect() keeps chunk order, so the serial combine below sees the same partials in the same order.
    let partials: Vec<f64> = x.par_chunks(CHUNK).map(chunk_sum).collect();
    partials.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elementwise::add_bias;
    use crate::testing::{assert_close, check_gradient, dot, f32s, randn, Tolerance};
    use crate::Rng;

    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(f)
    }

    #[test]
    fn sums_match_reference_at_chunk_boundaries() {
        let mut rng = Rng::new(1);
        for n in [0, 1, 7, 8, 9, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 3] {
            let x = randn(&mut rng, n);
            let want: f64 = x.iter().sum();
            let want_sq: f64 = x.iter().map(|v| v * v).sum();
            let tol = Tolerance { abs: 1e-12 * (n as f64).sqrt(), rel: 1e-12 };
            assert_close(&format!("sum n={n}"), &[sum(&x)], &[want], tol);
            assert_close(&format!("sum_squares n={n}"), &[sum_squares(&x)], &[want_sq], tol);
            // f64 accumulation: an f32 result is the f64 sum of the same (f32) values rounded once.
            let xf = f32s(&x);
            let exact: f64 = xf.iter().map(|&v| v as f64).sum();
            let exact_sq: f64 = xf.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let one_rounding = Tolerance { abs: 1e-12 * (n as f64).sqrt(), rel: 1e-7 };
            assert_close(&format!("f32 sum n={n}"), &[sum(&xf).f64()], &[exact], one_rounding);
            assert_close(&format!("f32 sum_squares n={n}"), &[sum_squares(&xf).f64()], &[exact_sq], one_rounding);
        }
        assert_eq!(sum::<f32>(&[]), 0.0);
        assert_eq!(sum(&[1.0f32, 2.0, 3.0]), 6.0);
        assert_eq!(sum_squares(&[1.0f32, -2.0, 3.0]), 14.0);
    }

    #[test]
    fn reductions_are_bit_identical_across_thread_counts() {
        let mut rng = Rng::new(2);
        // Magnitudes spanning 10^6 make the last bits depend on the summation order. The f64 results are the
        // sharp check: an f32 result is one rounding of an f64 accumulator and would mask most reorderings.
        let x: Vec<f64> =
            randn(&mut rng, 40 * CHUNK + 77).iter().enumerate().map(|(i, v)| v * 10f64.powi((i % 7) as i32)).collect();
        let xf = f32s(&x);
        let (rows, cols) = (3000, 700);
        let m = randn(&mut rng, rows * cols);
        let mf = f32s(&m);
        let run = |threads| {
            in_pool(threads, || {
                let (mut col, mut colf) = (vec![0.0; cols], vec![0.0f32; cols]);
                sum_rows(&m, cols, &mut col);
                sum_rows(&mf, cols, &mut colf);
                let f64s = [sum(&x), sum_squares(&x), max_abs(&x)].into_iter().chain(col).map(f64::to_bits);
                let f32s = [sum(&xf), sum_squares(&xf), max_abs(&xf)].into_iter().chain(colf).map(f32::to_bits);
                (f64s.collect::<Vec<_>>(), f32s.collect::<Vec<_>>())
            })
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert_eq!(run(threads), one, "{threads} threads vs 1");
        }
    }

    #[test]
    fn sum_rows_matches_reference_loop() {
        let mut rng = Rng::new(3);
        // Narrow, one full block, ragged blocks, many rows per task, one row.
        for (rows, cols) in
            [(1, 1), (5, 3), (7, COL_BLOCK), (33, 2 * COL_BLOCK + 17), (3 * CHUNK, 2), (1, 1000), (0, 4)]
        {
            let x = randn(&mut rng, rows * cols);
            let mut want = vec![0.0; cols];
            for r in 0..rows {
                for c in 0..cols {
                    want[c] += x[r * cols + c];
                }
            }
            let mut got = vec![f64::NAN; cols];
            sum_rows(&x, cols, &mut got);
            assert_close(&format!("sum_rows {rows}x{cols}"), &got, &want, Tolerance { abs: 1e-12, rel: 1e-12 });
        }
        sum_rows::<f32>(&[], 0, &mut []);
    }

    /// Σ_rows x⊙y: the same blocks and rows as sum_rows, each product exact in f64 (f32 inputs), rounded once per
    /// column: equal to the f64 loop to the bit after that rounding; x and y of different lengths are an error.
    #[test]
    fn sum_rows_product_matches_reference_loop() {
        let mut rng = Rng::new(4);
        for (rows, cols) in [(1, 1), (5, 3), (33, 2 * COL_BLOCK + 17), (3 * CHUNK / 2, 2), (0, 4)] {
            let x: Vec<f32> = randn(&mut rng, rows * cols).iter().map(|&v| v as f32).collect();
            let y: Vec<f32> = randn(&mut rng, rows * cols).iter().map(|&v| v as f32).collect();
            let mut want = vec![0.0f64; cols];
            for r in 0..rows {
                for c in 0..cols {
                    want[c] += x[r * cols + c] as f64 * y[r * cols + c] as f64;
                }
            }
            let mut got = vec![f32::NAN; cols];
            sum_rows_product([&x, &y], cols, &mut got);
            let want: Vec<f32> = want.iter().map(|&w| w as f32).collect();
            assert_eq!(got, want, "sum_rows_product {rows}x{cols}");
        }
    }

    #[test]
    #[should_panic(expected = "x and y lengths")]
    fn sum_rows_product_rejects_unequal_inputs() {
        sum_rows_product([&[0.0f64; 6], &[0.0; 3]], 3, &mut [0.0; 3]);
    }

    #[test]
    #[should_panic(expected = "not rows of 3")]
    fn sum_rows_rejects_ragged_rows() {
        sum_rows(&[0.0f64; 7], 3, &mut [0.0; 3]);
    }

    #[test]
    fn max_abs_finds_largest_magnitude_and_never_hides_nan() {
        assert_eq!(max_abs::<f32>(&[]), 0.0);
        assert_eq!(max_abs(&[1.0f32, -3.5, 2.0]), 3.5);
        assert_eq!(max_abs(&[-0.0f64]), 0.0);
        assert_eq!(max_abs(&[f32::NEG_INFINITY, 1.0]), f32::INFINITY);
        let mut rng = Rng::new(4);
        let mut x = f32s(&randn(&mut rng, 6 * CHUNK + 5));
        let want = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(max_abs(&x), want);
        // NaN at the start, in the middle of a chunk, and last: every position must surface it.
        for at in [0, 3 * CHUNK + 17, x.len() - 1] {
            let keep = x[at];
            x[at] = f32::NAN;
            assert!(max_abs(&x).is_nan(), "NaN at {at}");
            x[at] = keep;
        }
        assert!(max_abs(&[f64::NAN]).is_nan());
        assert!(max_abs(&[1.0, f64::NAN]).is_nan());
    }

    #[test]
    fn gradients() {
        let mut rng = Rng::new(5);
        let x = randn(&mut rng, 7);
        check_gradient("sum", &x, &[1.0; 7], sum::<f64>);
        let twice: Vec<f64> = x.iter().map(|v| 2.0 * v).collect();
        check_gradient("sum_squares", &x, &twice, sum_squares::<f64>);

        // max_abs: sign(x) at the argmax, zero elsewhere (x has no ties, so it is differentiable there).
        let arg = (0..7).max_by(|&i, &j| x[i].abs().total_cmp(&x[j].abs())).expect("non-empty");
        let mut dmax = vec![0.0; 7];
        dmax[arg] = x[arg].signum();
        check_gradient("max_abs", &x, &dmax, max_abs::<f64>);

        let (rows, cols) = (4, 3);
        let m = randn(&mut rng, rows * cols);
        let g = randn(&mut rng, cols);
        let mut dm = vec![0.0; rows * cols];
        add_bias(&mut dm, &g);
        check_gradient("sum_rows", &m, &dm, |m| {
            let mut out = vec![0.0; cols];
            sum_rows(m, cols, &mut out);
            dot(&out, &g)
        });
    }
}
