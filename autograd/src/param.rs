//! Parameters: named tensors that live across steps, outside any tape.

use qlora_runtime::ops::elementwise::{accumulate, scale};
use qlora_runtime::{DType, Result, Tensor};
use std::sync::{Arc, Mutex, MutexGuard};

struct Inner {
    name: String,
    trainable: bool,
    value: Mutex<Tensor>,
    grad: Mutex<Option<Tensor>>,
}

/// A model weight. Trainable parameters accumulate gradients across backward passes (gradient accumulation)
/// until [`Param::zero_grad`]; frozen ones (the NF4 base, norms unless asked) never get a gradient buffer:
/// a tape treats them as constants and records nothing for them.
#[derive(Clone)]
pub struct Param(Arc<Inner>);

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Param({}, {:?}, trainable={})", self.0.name, self.value().shape(), self.0.trainable)
    }
}

// A poisoned lock means a panic happened mid-update elsewhere; the tensor inside is still a whole value
// (updates replace it atomically), so carrying on is sound.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Param {
    pub fn trainable(name: impl Into<String>, value: Tensor) -> Self {
        Self::new(name, value, true)
    }

    pub fn frozen(name: impl Into<String>, value: Tensor) -> Self {
        Self::new(name, value, false)
    }

    fn new(name: impl Into<String>, value: Tensor, trainable: bool) -> Self {
        Param(Arc::new(Inner { name: name.into(), trainable, value: Mutex::new(value), grad: Mutex::new(None) }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn is_trainable(&self) -> bool {
        self.0.trainable
    }

    /// The current value (a cheap handle; later updates do not change it).
    pub fn value(&self) -> Tensor {
        lock(&self.0.value).clone()
    }

    pub fn set_value(&self, value: Tensor) {
        *lock(&self.0.value) = value;
    }

    /// Runs `f` on the value in place (optimizer steps). Copy-on-write keeps tensors saved elsewhere intact.
    pub fn update(&self, f: impl FnOnce(&mut Tensor) -> Result<()>) -> Result<()> {
        f(&mut lock(&self.0.value))
    }

    /// The accumulated gradient, if any backward reached this parameter since the last `zero_grad`.
    pub fn grad(&self) -> Option<Tensor> {
        lock(&self.0.grad).clone()
    }

    /// Multiplies the accumulated gradient by `factor` (global-norm clipping).
    pub fn scale_grad(&self, factor: f64) -> Result<()> {
        let mut slot = lock(&self.0.grad);
        if let Some(g) = slot.as_mut() {
            *g = scale(g, factor)?.try_to_dtype(g.dtype())?;
        }
        Ok(())
    }

    pub fn zero_grad(&self) {
        *lock(&self.0.grad) = None;
    }

    /// Adds `g` into the gradient buffer, creating it on first use in master precision (f32; f64 for f64 values) on
    /// g's device.
    pub(crate) fn accumulate_grad(&self, g: &Tensor) -> Result<()> {
        debug_assert!(self.0.trainable, "a tape never routes gradients to a frozen parameter");
        let mut slot = lock(&self.0.grad);
        match slot.as_mut() {
            Some(buf) => accumulate(buf, 1.0, g),
            None => {
                let dtype = if self.value().dtype() == DType::F64 { DType::F64 } else { DType::F32 };
                // Shares g's storage when the dtype already matches; the next accumulate copies on write.
                *slot = Some(g.try_to_dtype(dtype)?);
                Ok(())
            }
        }
    }
}
