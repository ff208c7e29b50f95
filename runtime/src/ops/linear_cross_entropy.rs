//! The LM head and the loss as one op, a chunk of rows at a time: logits = x·Wᵀ for CHUNK rows (a GEMM), the final
//! softcap where the model has one, the row losses and — when x needs a gradient — dlogits and dx = dlogits·W right
//! away. So the [tokens, vocab] logits never exist (a few hundred MB at a time instead of tokens × vocab × 4 bytes
//! twice), and backward is one scale of the kept dx by the loss's incoming gradient, as Liger Kernel's fused linear
//! cross-entropy does: the loss is the last op of the graph, so its gradient is known up to that scalar.
//!
//! The head W is frozen here (QLoRA trains adapters, not the head); a trainable head takes the unfused path
//! (`linear`, `softcap`, `cross_entropy`).

use super::activation::{softcap, softcap_backward};
use super::cross_entropy::{cross_entropy, cross_entropy_backward};
use super::elementwise::{add, broadcast_scaled, mul, scale};
use super::linalg::matmul;
use super::reduce::sum;
use super::rows_cols;
use crate::memory::{tagged, Category};
use crate::op::{backward_fn, first_grad, Recorded};
use crate::{DType, Error, Result, Tensor};

/// Logits (and, with a gradient, dlogits) are formed this many bytes of f32 at a time.
const CHUNK_BYTES: usize = 256 << 20;

/// Rows per chunk for a vocabulary of `vocab`: CHUNK_BYTES of f32 logits, at least one row (memory estimates read
/// it too).
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_BYTES / (4 * vocab.max(1))).max(1)
}

/// Σ over rows of −log softmax(cap(x·Wᵀ))\[target\] ÷ `normalizer` as a scalar (f32 on CUDA), skipping targets of
/// −100: x: [tokens, hidden], w: [vocab, hidden] (frozen), targets: \[tokens\] I32, `softcap` the final-logit cap. With
/// `need_dx`, a backward for x (dx computed here, chunk by chunk).
pub fn linear_cross_entropy_op(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    softcap_at: Option<f64>,
    normalizer: f64,
    need_dx: bool,
) -> Result<Recorded> {
    const OP: &str = "linear_cross_entropy";
    if normalizer.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(Error::invalid(OP, format!("normalizer must be > 0, got {normalizer}")));
    }
    let (tokens, hidden) = rows_cols(OP, x)?;
    let (vocab, w_hidden) = rows_cols(OP, w)?;
    if x.rank() != 2 || w.rank() != 2 || w_hidden != hidden || targets.shape() != [tokens] {
        return Err(Error::shape(OP, format!("x {:?}, w {:?}, targets {:?}", x.shape(), w.shape(), targets.shape())));
    }
    // The chunks' logits and their gradients, the loss and the kept dx: the loss's share of a peak.
    tagged(Category::Loss, || {
        let wt = w.t()?;
        let mut total: Option<Tensor> = None;
        let mut dx_parts = Vec::new();
        let rows = chunk_rows(vocab);
        for start in (0..tokens).step_by(rows) {
            let n = rows.min(tokens - start);
            let xc = x.narrow(0, start, n)?;
            let raw = matmul(&xc, &wt)?;
            let logits = match softcap_at {
                Some(cap) => softcap(&raw, cap)?,
                None => raw.clone(),
            };
            let tc = targets.narrow(0, start, n)?;
            let (losses, lse) = cross_entropy(&logits, &tc)?;
            let s = sum(&losses)?;
            total = Some(match total {
                Some(t) => add(&t, &s)?,
                None => s,
            });
            if need_dx {
                let d_loss = Tensor::full_on(&[n], 1.0 / normalizer, DType::F32, x.device())?;
                let dlogits = cross_entropy_backward(&logits, &tc, &lse, &d_loss)?;
                let dz = match softcap_at {
                    Some(cap) => softcap_backward(&raw, cap, &dlogits)?,
                    None => dlogits,
                };
                dx_parts.push(matmul(&dz, w)?);
            }
        }
        let total = match total {
            Some(t) => scale(&t, 1.0 / normalizer)?,
            // No tokens: a zero loss where x lives (f32, the loss's dtype on every device path).
            None => Tensor::zeros_on(&[], DType::F32, x.device())?,
        };
        let dx = if need_dx {
            super::concat::cat_rows(&dx_parts, &[tokens, hidden], x.dtype(), x.device())?
        } else {
            Tensor::zeros_on(&[0], x.dtype(), x.device())?
        };
        // The backward is dx computed here, scaled by the loss's gradient: a scalar on the device (1 from the tape's
        // seed), spread and multiplied there.
        let grad = backward_fn("linear_cross_entropy", dx.size_in_bytes(), move |g| {
            let g = broadcast_scaled(first_grad(g)?, 1.0, dx.shape(), dx.dtype())?;
            Ok(vec![Some(mul(&dx, &g)?)])
        });
        Ok((total, grad))
    })
}
