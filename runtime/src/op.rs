//! What an op hands a tape: its backward, holding exactly what that backward reads. Every op file under `ops/`
//! writes its backward as a closure in its `_op` function ([`backward_fn`]), right under the forward call: what the
//! closure captures is the saved state, so one function holds all of an op; `autograd` only decides when a backward
//! runs.

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

/// A backward written as a closure over what it saves. `saved_bytes` is what [`Backward::saved_bytes`] reports: the
/// tensors the closure holds that would otherwise be freed (a frozen weight, alive anyway, need not count).
pub fn backward_fn<F>(name: &'static str, saved_bytes: usize, f: F) -> Box<dyn Backward>
where
    F: FnOnce(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + 'static,
{
    Box::new(FnBackward { name, saved_bytes, f })
}

struct FnBackward<F> {
    name: &'static str,
    saved_bytes: usize,
    f: F,
}

impl<F> Backward for FnBackward<F>
where
    F: FnOnce(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        (self.f)(grads)
    }
    fn saved_bytes(&self) -> usize {
        self.saved_bytes
    }
}

/// Bytes of the tensors that are kept.
pub fn bytes_of<'a>(ts: impl IntoIterator<Item = &'a Option<Tensor>>) -> usize {
    ts.into_iter().flatten().map(Tensor::size_in_bytes).sum()
}

/// Bytes of these tensors.
pub fn bytes<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> usize {
    ts.into_iter().map(Tensor::size_in_bytes).sum()
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
