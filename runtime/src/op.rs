//! What an op hands a tape: its backward, holding exactly what that backward reads. Every op file under `ops/`
//! defines its own saved state beside its forward and backward (`ops::rms_norm::RmsNormGrad`, …), so one file holds
//! all of an op; `autograd` only decides when a backward runs.

use crate::{Error, Result, Tensor};

/// One recorded op's backward: consumes what the op saved and maps output gradients to input gradients.
pub trait Backward {
    fn name(&self) -> &'static str;
    /// `grads[i]` is the gradient of output i (None when nothing reached it); returns one entry per input (None for
    /// inputs that need no gradient).
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>>;
    /// Bytes held for backward (tensors shared with the op's outputs counted too: they stay alive because of it).
    fn saved_bytes(&self) -> usize;
}

/// What a tape records for one op: its output and its backward.
pub type Recorded = (Tensor, Box<dyn Backward>);

/// Bytes of the tensors that are kept.
pub fn bytes_of<'a>(ts: impl IntoIterator<Item = &'a Option<Tensor>>) -> usize {
    ts.into_iter().flatten().map(Tensor::size_in_bytes).sum()
}

/// The gradient of output 0 (a backward runs only when some output gradient exists).
pub fn first_grad(grads: &[Option<Tensor>]) -> Result<&Tensor> {
    grads.first().and_then(Option::as_ref).ok_or_else(|| Error::invalid("backward", "missing output gradient"))
}

/// `t` when `keep`: what a backward saves only for a gradient that is wanted.
pub fn keep_if(keep: bool, t: &Tensor) -> Option<Tensor> {
    keep.then(|| t.clone())
}

/// A tensor a backward needed but its forward did not keep (a bug in the op's `needs` bookkeeping).
pub fn saved(t: &Option<Tensor>) -> Result<&Tensor> {
    t.as_ref().ok_or_else(|| Error::invalid("backward", "a tensor needed for this gradient was not saved"))
}
