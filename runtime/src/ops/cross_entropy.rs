//! Cross-entropy over the last dimension with ignored targets (−100), returning the per-row log-sum-exp for the
//! backward. The op a tape records sums the row losses and divides by a normalizer the caller picks (the trained
//! tokens of the whole accumulated batch).
//!
//! Targets on a GPU are not read back to check them: the kernels mark a row whose target is out of range with NaN
//! (the loss then says so), and the data pipeline checks targets on the host where it builds a batch.

use super::elementwise::{broadcast_scaled, scale};
use super::reduce::sum;
use super::{indices, rows_cols, tensor, with_compute};
use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes, first_grad, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cross_entropy as ce;
use qlora_kernels::cuda::cross_entropy as gce;

pub use qlora_kernels::cross_entropy::IGNORE_INDEX;

fn check_targets(logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    let (rows, vocab) = rows_cols("cross_entropy", logits)?;
    if targets.elem_count() != rows {
        return Err(Error::shape(
            "cross_entropy",
            format!("{} targets for logits {:?}", targets.elem_count(), logits.shape()),
        ));
    }
    Ok((rows, vocab))
}

/// logits: [..., vocab], targets: [...] (I32; IGNORE_INDEX = −100 skipped) → (loss per row, lse per row).
/// On CUDA both are f32 whatever the logits' dtype.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, vocab) = check_targets(logits, targets)?;
    if let Some(g) = Gpu::of("cross_entropy", &[logits])? {
        return with_gpu!(g, |T| {
            let (x, t) = (g.input(logits)?, g.index("targets", targets)?);
            let (mut loss, mut lse) = (g.alloc::<f32>(rows)?, g.alloc::<f32>(rows)?);
            g.run(gce::cross_entropy_forward(buf::<T>(&x), buf(&t), vocab, &mut loss, &mut lse))?;
            Ok((output(loss, &[rows]), output(lse, &[rows])))
        });
    }
    let t = indices("cross_entropy", "targets", targets)?;
    if let Some(&bad) = t.iter().find(|&&x| x != IGNORE_INDEX && (x < 0 || x as usize >= vocab)) {
        return Err(Error::Index { op: "cross_entropy", what: "target", value: bad as i64, bound: vocab });
    }
    with_compute!("cross_entropy", [logits], |T| {
        let (mut loss, mut lse) = (vec![T::default(); rows], vec![T::default(); rows]);
        ce::cross_entropy_forward(&logits.values::<T>(), &t, vocab, &mut loss, &mut lse);
        Ok((tensor(loss, &[rows]), tensor(lse, &[rows])))
    })
}

/// d_logits of [`cross_entropy`] given the per-row upstream gradient d_loss: \[rows\].
pub fn cross_entropy_backward(logits: &Tensor, targets: &Tensor, lse: &Tensor, d_loss: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = check_targets(logits, targets)?;
    if d_loss.elem_count() != rows || lse.elem_count() != rows {
        return Err(Error::shape("cross_entropy_backward", format!("d_loss/lse must have {rows} rows")));
    }
    if let Some(g) = Gpu::of("cross_entropy_backward", &[logits, lse, d_loss])? {
        return with_gpu!(g, |T| {
            let (x, t) = (g.input(logits)?, g.index("targets", targets)?);
            let (l, d) = (g.input_as(lse, DType::F32)?, g.input_as(d_loss, DType::F32)?);
            let mut dx = g.alloc::<T>(logits.elem_count())?;
            g.run(gce::cross_entropy_backward(buf::<T>(&x), buf(&t), buf(&l), buf(&d), vocab, &mut dx))?;
            Ok(output(dx, logits.shape()))
        });
    }
    let t = indices("cross_entropy_backward", "targets", targets)?;
    with_compute!("cross_entropy_backward", [logits, lse, d_loss], |T| {
        let mut d = vec![T::default(); logits.elem_count()];
        ce::cross_entropy_backward(&logits.values::<T>(), &t, &lse.values::<T>(), &d_loss.values::<T>(), vocab, &mut d);
        Ok(tensor(d, logits.shape()))
    })
}

/// Σ over rows of −log softmax(logits)\[target\] ÷ `normalizer` as a scalar (f32 on CUDA), skipping targets of
/// −100, for a tape: the loss, and a backward for the logits (reading the logits, targets and per-row log-sum-exp).
pub fn cross_entropy_op(logits: &Tensor, targets: &Tensor, normalizer: f64) -> Result<Recorded> {
    if normalizer.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(Error::invalid("cross_entropy", format!("normalizer must be > 0, got {normalizer}")));
    }
    let (losses, lse) = cross_entropy(logits, targets)?;
    let total = scale(&sum(&losses)?, 1.0 / normalizer)?;
    let (logits, targets) = (logits.clone(), targets.clone());
    let grad = backward_fn("cross_entropy", bytes([&logits, &targets, &lse]), move |g| {
        // The scalar loss's gradient spread over the rows on the device: no trip to the host.
        let d_loss = broadcast_scaled(first_grad(g)?, 1.0 / normalizer, &[lse.elem_count()], DType::F32)?;
        Ok(vec![Some(cross_entropy_backward(&logits, &targets, &lse, &d_loss)?)])
    });
    Ok((total, grad))
}
