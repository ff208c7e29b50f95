//! Softmax cross-entropy per row with ignore index −100 (torch's `F.cross_entropy(..., reduction="none")`, REFERENCE.md
//! §7.3).
//!
//! The kernel stops at per-row losses: the mean over trained tokens belongs to the caller, which under gradient
//! accumulation divides by the trained-token count of the whole step, not of one micro-batch. The log-sum-exp is
//! saved so the backward needs one pass over the logits and no max.

use crate::Float;
use rayon::prelude::*;

/// The label of positions that take no part in the loss (prompt tokens, padding, packed-sequence boundaries).
pub const IGNORE_INDEX: i32 = -100;

/// Below this many logits a task costs more to schedule than to run.
const MIN_PAR_ELEMS: usize = 1 << 14;

/// logits: [rows, vocab], targets: \[rows\] → loss: \[rows\] (0 for ignored rows), lse: \[rows\] (log-sum-exp, saved for backward; for ignored rows still computed)
pub fn cross_entropy_forward<T: Float>(logits: &[T], targets: &[i32], vocab: usize, loss: &mut [T], lse: &mut [T]) {
    check_shapes("cross_entropy_forward", logits, targets, vocab);
    assert_eq!(loss.len(), targets.len(), "cross_entropy_forward: loss length");
    assert_eq!(lse.len(), targets.len(), "cross_entropy_forward: lse length");
    loss.par_iter_mut()
        .zip(lse.par_iter_mut())
        .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
        .with_min_len(MIN_PAR_ELEMS.div_ceil(vocab))
        .for_each(|((loss, lse), (row, &target))| {
            let max = row.iter().copied().fold(T::neg_infinity(), T::max);
            let log_sum = row.iter().map(|&v| (v - max).exp()).sum::<T>().ln();
            *lse = max + log_sum;
            // From the shifted logit rather than `lse − logit`: at logits ~1e4 the f32 `lse` has already lost the
            // low bits of `log_sum` (ulp(1e4) ≈ 1e-3), while `logit − max` is exact. This is torch's
            // `−((x_t − max) − log_sum)`.
            *loss = match target {
                IGNORE_INDEX => T::zero(),
                t => log_sum - (row[t as usize] - max),
            };
        });
}

/// d_loss: \[rows\] upstream gradient per row → d_logits: [rows, vocab] = d_loss\[r\]·(softmax(logits\[r\]) − onehot(target\[r\])); all-zero rows where ignored
pub fn cross_entropy_backward<T: Float>(
    logits: &[T],
    targets: &[i32],
    lse: &[T],
    d_loss: &[T],
    vocab: usize,
    d_logits: &mut [T],
) {
    check_shapes("cross_entropy_backward", logits, targets, vocab);
    assert_eq!(lse.len(), targets.len(), "cross_entropy_backward: lse length");
    assert_eq!(d_loss.len(), targets.len(), "cross_entropy_backward: d_loss length");
    assert_eq!(d_logits.len(), logits.len(), "cross_entropy_backward: d_logits length");
    d_logits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter().zip(lse.par_iter()).zip(d_loss.par_iter()))
        .with_min_len(MIN_PAR_ELEMS.div_ceil(vocab))
        .for_each(|((d, row), ((&target, &lse), &g))| {
            if target == IGNORE_INDEX {
                d.fill(T::zero());
                return;
            }
            for (d, &v) in d.iter_mut().zip(row) {
                *d = g * (v - lse).exp();
            }
            let t = target as usize;
            d[t] = g * ((row[t] - lse).exp() - T::one());
        });
}

fn check_shapes<T: Float>(what: &str, logits: &[T], targets: &[i32], vocab: usize) {
    assert!(vocab > 0, "{what}: vocab must be positive");
    assert_eq!(logits.len(), targets.len() * vocab, "{what}: logits length is not rows·vocab");
    let bad = targets.iter().position(|&t| t != IGNORE_INDEX && !(0..vocab as i64).contains(&(t as i64)));
    if let Some(r) = bad {
        panic!("{what}: target {} at row {r} is neither IGNORE_INDEX nor in 0..{vocab}", targets[r]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_gradient, dot, randn, Tolerance};
    use crate::Rng;

    const ROWS: [usize; 3] = [1, 3, 7];
    const VOCABS: [usize; 3] = [2, 11, 37];
    /// Two f64 evaluations of the same formula in different orders.
    const F64: Tolerance = Tolerance { abs: 1e-12, rel: 1e-12 };

    /// Outputs start as NaN so that an element the kernel forgot to write fails every comparison.
    fn forward<T: Float>(logits: &[T], targets: &[i32], vocab: usize) -> (Vec<T>, Vec<T>) {
        let mut loss = vec![T::nan(); targets.len()];
        let mut lse = vec![T::nan(); targets.len()];
        cross_entropy_forward(logits, targets, vocab, &mut loss, &mut lse);
        (loss, lse)
    }

    fn backward<T: Float>(logits: &[T], targets: &[i32], lse: &[T], d_loss: &[T], vocab: usize) -> Vec<T> {
        let mut d_logits = vec![T::nan(); logits.len()];
        cross_entropy_backward(logits, targets, lse, d_loss, vocab, &mut d_logits);
        d_logits
    }

    /// Random targets with about a third of the rows ignored, and the first row always trained.
    fn targets(rng: &mut Rng, rows: usize, vocab: usize) -> Vec<i32> {
        (0..rows)
            .map(|r| if r > 0 && rng.below(3) == 0 { IGNORE_INDEX } else { rng.below(vocab as u64) as i32 })
            .collect()
    }

    /// `−log softmax(x)[t]` by the textbook formula, without max subtraction (fine for logits of order 1).
    fn reference(logits: &[f64], targets: &[i32], vocab: usize) -> (Vec<f64>, Vec<f64>) {
        let mut loss = Vec::new();
        let mut lse = Vec::new();
        for (row, &t) in logits.chunks(vocab).zip(targets) {
            let sum: f64 = row.iter().map(|v| v.exp()).sum();
            lse.push(sum.ln());
            loss.push(if t == IGNORE_INDEX { 0.0 } else { -(row[t as usize].exp() / sum).ln() });
        }
        (loss, lse)
    }

    fn scaled(rng: &mut Rng, n: usize, scale: f64, shift: f64) -> Vec<f64> {
        randn(rng, n).iter().map(|v| shift + scale * v).collect()
    }

    /// Runs `check` on every (rows, vocab) of the sweep with random logits and targets, drawn from a generator seeded
    /// `seed` that `check` may draw more from.
    fn each_case(seed: u64, mut check: impl FnMut(&mut Rng, usize, usize, Vec<f64>, Vec<i32>)) {
        let mut rng = Rng::new(seed);
        for rows in ROWS {
            for vocab in VOCABS {
                let logits = scaled(&mut rng, rows * vocab, 3.0, 0.0);
                let t = targets(&mut rng, rows, vocab);
                check(&mut rng, rows, vocab, logits, t);
            }
        }
    }

    #[test]
    fn forward_matches_log_softmax() {
        each_case(1, |_, rows, vocab, logits, t| {
            let (loss, lse) = forward(&logits, &t, vocab);
            let (want_loss, want_lse) = reference(&logits, &t, vocab);
            assert_close(&format!("loss {rows}x{vocab}"), &loss, &want_loss, F64);
            assert_close(&format!("lse {rows}x{vocab}"), &lse, &want_lse, F64);
        });
    }

    #[test]
    fn backward_matches_finite_differences() {
        each_case(2, |rng, rows, vocab, logits, t| {
            let g = randn(rng, rows);
            let (_, lse) = forward(&logits, &t, vocab);
            let d = backward(&logits, &t, &lse, &g, vocab);
            check_gradient(&format!("{rows}x{vocab} targets {t:?}"), &logits, &d, |x| {
                dot(&forward(x, &t, vocab).0, &g)
            });
        });
    }

    #[test]
    fn ignored_rows_give_zero_loss_and_zero_gradient() {
        let mut rng = Rng::new(3);
        let (rows, vocab) = (4, 11);
        let logits = scaled(&mut rng, rows * vocab, 3.0, 0.0);
        let t = [3, IGNORE_INDEX, 0, IGNORE_INDEX];
        let (loss, lse) = forward(&logits, &t, vocab);
        let (_, want_lse) = reference(&logits, &t, vocab);
        assert_eq!((loss[1], loss[3]), (0.0, 0.0));
        assert!(loss[0] > 0.0 && loss[2] > 0.0);
        assert_close("lse of ignored rows too", &lse, &want_lse, F64);
        // A non-zero upstream gradient on an ignored row must still not leak into its logits.
        let d = backward(&logits, &t, &lse, &[1.0; 4], vocab);
        assert!(d[vocab..2 * vocab].iter().chain(&d[3 * vocab..]).all(|&v| v == 0.0));
        assert!(d[..vocab].iter().any(|&v| v != 0.0));
        let all_ignored = [IGNORE_INDEX; 4];
        let (loss, _) = forward(&logits, &all_ignored, vocab);
        assert_eq!(loss, [0.0; 4]);
        assert!(backward(&logits, &all_ignored, &lse, &[1.0; 4], vocab).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn huge_logits_are_stable() {
        let mut rng = Rng::new(4);
        let (rows, vocab) = (5, 37);
        let t = targets(&mut rng, rows, vocab);
        let g = randn(&mut rng, rows);
        // Shift invariance in f64: logits around 1e4 give the loss and gradient of the same logits around 0.
        let small = scaled(&mut rng, rows * vocab, 3.0, 0.0);
        let big: Vec<f64> = small.iter().map(|v| v + 1e4).collect();
        let (loss_small, lse_small) = forward(&small, &t, vocab);
        let (loss_big, lse_big) = forward(&big, &t, vocab);
        assert_close("loss", &loss_big, &loss_small, Tolerance { abs: 1e-10, rel: 1e-10 });
        assert_close("lse", &lse_big, &lse_small.iter().map(|v| v + 1e4).collect::<Vec<_>>(), F64);
        let d_small = backward(&small, &t, &lse_small, &g, vocab);
        assert_close(
            "d_logits",
            &backward(&big, &t, &lse_big, &g, vocab),
            &d_small,
            Tolerance { abs: 1e-10, rel: 1e-8 },
        );

        // f32 against f64 on the same f32-representable logits near 1e4.
        let big32: Vec<f32> = big.iter().map(|&v| v as f32).collect();
        let bigw: Vec<f64> = big32.iter().map(|&v| v as f64).collect();
        let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        let (loss32, lse32) = forward(&big32, &t, vocab);
        let (loss64, lse64) = forward(&bigw, &t, vocab);
        let widen = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        assert_close("f32 loss", &widen(&loss32), &loss64, Tolerance::F32);
        // lse is one f32 rounding of a number near 1e4; the softmax built from it inherits that absolute error
        // (≤ ulp(1e4)/2 ≈ 5e-4) as a relative one.
        assert_close("f32 lse", &widen(&lse32), &lse64, Tolerance { abs: 0.0, rel: 1e-7 });
        let d32 = backward(&big32, &t, &lse32, &g32, vocab);
        let d64 = backward(&bigw, &t, &lse64, &g.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>(), vocab);
        assert_close("f32 d_logits", &widen(&d32), &d64, Tolerance { abs: 1e-6, rel: 1e-3 });

        // Logits at ±1e30 (f32's range reaches 3.4e38): the spread overflows no intermediate.
        let extreme = [1e30f32, -1e30, 0.0, 1e30, -1e30, 0.0];
        let (loss, lse) = forward(&extreme, &[0, 1], 3);
        assert_eq!(loss, [0.0, 2e30]);
        assert!(lse.iter().all(|v| v.is_finite()));
        let d = backward(&extreme, &[0, 1], &lse, &[1.0, 1.0], 3);
        assert_eq!(d, [0.0, 0.0, 0.0, 1.0, -1.0, 0.0]);
    }

    #[test]
    fn f32_agrees_with_f64() {
        let mut rng = Rng::new(5);
        let (rows, vocab) = (7, 37);
        let logits32: Vec<f32> = scaled(&mut rng, rows * vocab, 3.0, 0.0).iter().map(|&v| v as f32).collect();
        let g32: Vec<f32> = randn(&mut rng, rows).iter().map(|&v| v as f32).collect();
        let t = targets(&mut rng, rows, vocab);
        let widen = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let (loss32, lse32) = forward(&logits32, &t, vocab);
        let (loss64, lse64) = forward(&widen(&logits32), &t, vocab);
        assert_close("loss", &widen(&loss32), &loss64, Tolerance::F32);
        assert_close("lse", &widen(&lse32), &lse64, Tolerance::F32);
        let d32 = backward(&logits32, &t, &lse32, &g32, vocab);
        let d64 = backward(&widen(&logits32), &t, &lse64, &widen(&g32), vocab);
        assert_close("d_logits", &widen(&d32), &d64, Tolerance::F32);
    }

    #[test]
    fn many_rows_split_across_tasks_match_reference() {
        let mut rng = Rng::new(6);
        let (rows, vocab) = (300, 257);
        let logits = scaled(&mut rng, rows * vocab, 3.0, 0.0);
        let t = targets(&mut rng, rows, vocab);
        let (loss, lse) = forward(&logits, &t, vocab);
        let (want_loss, want_lse) = reference(&logits, &t, vocab);
        assert_close("loss", &loss, &want_loss, F64);
        assert_close("lse", &lse, &want_lse, F64);
        let d = backward(&logits, &t, &lse, &vec![1.0; rows], vocab);
        for (row, &target) in d.chunks(vocab).zip(&t) {
            let sum: f64 = row.iter().sum();
            assert!(sum.abs() < 1e-12, "a softmax minus a one-hot sums to zero, got {sum} (target {target})");
        }
    }

    #[test]
    #[should_panic(expected = "target 11 at row 1")]
    fn target_past_vocab_panics() {
        forward(&[0.0; 22], &[0, 11], 11);
    }

    #[test]
    #[should_panic(expected = "target -1 at row 0")]
    fn negative_target_other_than_ignore_panics() {
        backward(&[0.0; 11], &[-1], &[0.0], &[1.0], 11);
    }
}
