//! Elementwise arithmetic over equal-length slices, and the bias broadcast.
//!
//! Backward of each (the tests check them by finite differences): add passes the upstream gradient to both
//! operands; mul scales it by the other operand (`mul`); scale by `s` (`scale`), with ∂s = Σ x ⊙ g; axpy gives
//! ∂y = g, ∂x = alpha·g; add_bias gives ∂x = g and ∂bias = `reduce::sum_rows(g)`.

use crate::Float;
use rayon::prelude::*;

/// Elements per rayon task: below this, scheduling costs more than the arithmetic.
const MIN_CHUNK: usize = 1 << 14;

/// a: \[len\], b: \[len\] → out: \[len\] = a + b
pub fn add<T: Float>(a: &[T], b: &[T], out: &mut [T]) {
    binary("add", a, b, out, |a, b| a + b);
}

/// a: \[len\], b: \[len\] → out: \[len\] = a ⊙ b
pub fn mul<T: Float>(a: &[T], b: &[T], out: &mut [T]) {
    binary("mul", a, b, out, |a, b| a * b);
}

/// x: \[len\] → out: \[len\] = s·x
pub fn scale<T: Float>(x: &[T], s: T, out: &mut [T]) {
    assert_eq!(x.len(), out.len(), "scale: x vs out length");
    out.par_chunks_mut(MIN_CHUNK).zip(x.par_chunks(MIN_CHUNK)).for_each(|(out, x)| {
        out.iter_mut().zip(x).for_each(|(o, &x)| *o = s * x);
    });
}

/// s: one value → out: \[len\] = scale·s everywhere (a scalar's gradient spread over a tensor)
pub fn broadcast_scaled<T: Float>(s: T, scale: T, out: &mut [T]) {
    let v = scale * s;
    out.par_chunks_mut(MIN_CHUNK).for_each(|out| out.fill(v));
}

/// x: \[len\] → out: \[len\] = 0 where element i's draw `Rng::uniform_at(seed, i)` is < p, keep·x elsewhere (inverted
/// dropout, keep = 1/(1 − p) in T): the mask of drawing `Rng::new(seed).uniform()` once per element in order.
pub fn dropout<T: Float>(x: &[T], p: f64, seed: u64, keep: T, out: &mut [T]) {
    assert_eq!(x.len(), out.len(), "dropout: x vs out length");
    out.par_chunks_mut(MIN_CHUNK).zip(x.par_chunks(MIN_CHUNK)).enumerate().for_each(|(c, (out, x))| {
        let start = (c * MIN_CHUNK) as u64;
        for (i, (o, &x)) in out.iter_mut().zip(x).enumerate() {
            *o = if crate::Rng::uniform_at(seed, start + i as u64) < p { T::c(0.0) } else { x * keep };
        }
    });
}

/// x: \[len\], y: \[len\] → y += alpha·x (gradient accumulation)
pub fn axpy<T: Float>(alpha: T, x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "axpy: x vs y length");
    y.par_chunks_mut(MIN_CHUNK).zip(x.par_chunks(MIN_CHUNK)).for_each(|(y, x)| {
        // Plain multiply-add, not mul_add: without a target FMA feature mul_add is a libm call per element.
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = *y + alpha * x);
    });
}

/// x: [rows, cols], bias: \[cols\] → x += bias broadcast over rows
pub fn add_bias<T: Float>(x: &mut [T], bias: &[T]) {
    let cols = bias.len();
    if cols == 0 {
        assert!(x.is_empty(), "add_bias: {} elements with an empty bias", x.len());
        return;
    }
    assert!(x.len() % cols == 0, "add_bias: {} elements are not rows of {cols}", x.len());
    let rows_per_task = MIN_CHUNK.div_ceil(cols);
    x.par_chunks_mut(rows_per_task * cols).for_each(|rows| {
        for row in rows.chunks_exact_mut(cols) {
            row.iter_mut().zip(bias).for_each(|(v, &b)| *v = *v + b);
        }
    });
}

fn binary<T: Float>(what: &str, a: &[T], b: &[T], out: &mut [T], f: impl Fn(T, T) -> T + Sync) {
    assert!(a.len() == b.len() && a.len() == out.len(), "{what}: lengths {}, {}, out {}", a.len(), b.len(), out.len());
    out.par_chunks_mut(MIN_CHUNK).zip(a.par_chunks(MIN_CHUNK)).zip(b.par_chunks(MIN_CHUNK)).for_each(
        |((out, a), b)| {
            out.iter_mut().zip(a).zip(b).for_each(|((o, &a), &b)| *o = f(a, b));
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reduce::sum_rows;
    use crate::testing::{check_gradient, dot, f32s, randn};
    use crate::Rng;

    #[test]
    fn dropout_mask_is_the_sequential_stream() {
        // Spans several parallel chunks, so each chunk's draw offsets are exercised.
        let n = 3 * MIN_CHUNK + 5;
        let x: Vec<f32> = (0..n).map(|i| 1.0 + i as f32).collect();
        let (p, seed, keep) = (0.3, 12345, (1.0 / 0.7) as f32);
        let mut out = vec![0.0f32; n];
        dropout(&x, p, seed, keep, &mut out);
        let mut rng = Rng::new(seed);
        let want: Vec<f32> = x.iter().map(|&v| if rng.uniform() < p { 0.0 } else { v * keep }).collect();
        assert_eq!(out, want);
        let dropped = out.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - p).abs() < 0.02, "{dropped}");
    }

    /// Longer than several MIN_CHUNKs and not a multiple of one, so the parallel split and the ragged tail run.
    const N: usize = 3 * MIN_CHUNK + 101;

    #[test]
    fn values_match_reference_loops() {
        let mut rng = Rng::new(1);
        for n in [0, 1, 7, N] {
            let (a, b) = (f32s(&randn(&mut rng, n)), f32s(&randn(&mut rng, n)));
            // Garbage in every output first: each kernel must overwrite all of it.
            let mut out = vec![f32::NAN; n];
            add(&a, &b, &mut out);
            assert!(out.iter().enumerate().all(|(i, &o)| o == a[i] + b[i]), "add n={n}");
            out.fill(f32::NAN);
            mul(&a, &b, &mut out);
            assert!(out.iter().enumerate().all(|(i, &o)| o == a[i] * b[i]), "mul n={n}");
            out.fill(f32::NAN);
            scale(&a, -1.5, &mut out);
            assert!(out.iter().enumerate().all(|(i, &o)| o == -1.5 * a[i]), "scale n={n}");
            let mut y = b.clone();
            axpy(0.25, &a, &mut y);
            assert!(y.iter().enumerate().all(|(i, &y)| y == b[i] + 0.25 * a[i]), "axpy n={n}");
        }
    }

    #[test]
    fn add_bias_broadcasts_over_rows() {
        let mut rng = Rng::new(2);
        // 3 columns: several rows per task and a ragged last task; 5000 columns: tasks of whole rows.
        for (rows, cols) in [(1, 1), (4, 3), (MIN_CHUNK + 5, 3), (9, 5000)] {
            let x = f32s(&randn(&mut rng, rows * cols));
            let bias = f32s(&randn(&mut rng, cols));
            let mut y = x.clone();
            add_bias(&mut y, &bias);
            assert!(y.iter().enumerate().all(|(i, &v)| v == x[i] + bias[i % cols]), "{rows}x{cols}");
        }
        add_bias::<f32>(&mut [], &[]);
        add_bias::<f32>(&mut [], &[1.0, 2.0]);
    }

    #[test]
    #[should_panic(expected = "not rows of 3")]
    fn add_bias_rejects_ragged_rows() {
        add_bias(&mut [0.0f64; 7], &[1.0; 3]);
    }

    #[test]
    #[should_panic(expected = "mul: lengths")]
    fn length_mismatch_panics() {
        mul(&[1.0f64; 3], &[1.0; 2], &mut [0.0; 3]);
    }

    #[test]
    fn add_and_mul_gradients() {
        let mut rng = Rng::new(3);
        let n = 6;
        let (a, b, g) = (randn(&mut rng, n), randn(&mut rng, n), randn(&mut rng, n));
        let loss_add = |a: &[f64], b: &[f64]| {
            let mut out = vec![0.0; n];
            add(a, b, &mut out);
            dot(&out, &g)
        };
        check_gradient("add da", &a, &g, |a| loss_add(a, &b));
        check_gradient("add db", &b, &g, |b| loss_add(&a, b));

        let loss_mul = |a: &[f64], b: &[f64]| {
            let mut out = vec![0.0; n];
            mul(a, b, &mut out);
            dot(&out, &g)
        };
        let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
        mul(&g, &b, &mut da);
        mul(&g, &a, &mut db);
        check_gradient("mul da", &a, &da, |a| loss_mul(a, &b));
        check_gradient("mul db", &b, &db, |b| loss_mul(&a, b));
    }

    #[test]
    fn scale_and_axpy_gradients() {
        let mut rng = Rng::new(4);
        let n = 5;
        let (x, y, g) = (randn(&mut rng, n), randn(&mut rng, n), randn(&mut rng, n));
        let s = 0.7;
        let loss_scale = |x: &[f64], s: f64| {
            let mut out = vec![0.0; n];
            scale(x, s, &mut out);
            dot(&out, &g)
        };
        let mut dx = vec![0.0; n];
        scale(&g, s, &mut dx);
        check_gradient("scale dx", &x, &dx, |x| loss_scale(x, s));
        check_gradient("scale ds", &[s], &[dot(&x, &g)], |s| loss_scale(&x, s[0]));

        let alpha = -1.3;
        let loss_axpy = |alpha: f64, x: &[f64], y: &[f64]| {
            let mut y = y.to_vec();
            axpy(alpha, x, &mut y);
            dot(&y, &g)
        };
        let mut dx = vec![0.0; n];
        scale(&g, alpha, &mut dx);
        check_gradient("axpy dx", &x, &dx, |x| loss_axpy(alpha, x, &y));
        check_gradient("axpy dy", &y, &g, |y| loss_axpy(alpha, &x, y));
        check_gradient("axpy dalpha", &[alpha], &[dot(&x, &g)], |a| loss_axpy(a[0], &x, &y));
    }

    #[test]
    fn add_bias_gradient_is_sum_rows_of_upstream() {
        let mut rng = Rng::new(5);
        let (rows, cols) = (4, 3);
        let (x, bias, g) = (randn(&mut rng, rows * cols), randn(&mut rng, cols), randn(&mut rng, rows * cols));
        let loss = |x: &[f64], bias: &[f64]| {
            let mut y = x.to_vec();
            add_bias(&mut y, bias);
            dot(&y, &g)
        };
        let mut dbias = vec![0.0; cols];
        sum_rows(&g, cols, &mut dbias);
        check_gradient("add_bias dbias", &bias, &dbias, |b| loss(&x, b));
        check_gradient("add_bias dx", &x, &g, |x| loss(x, &bias));
    }
}
