//! Parameters: named tensors that live across steps, outside any tape.
//!
//! Compute copies: ops that multiply in another precision than the master value (bf16 products of f32 adapters on a
//! GPU), or that want several parameters as one operand (a LoRA group's stacked A's), ask for
//! [`Param::value_as`] / [`Param::stacked_with`] instead of casting per call. The rule that keeps such a copy from
//! going stale: a value changes only through [`Param::set_value`] and [`Param::update`] (an optimizer step uses
//! them), and every change gives the parameter a fresh stamp and drops its copy. A copy records the stamps of all the
//! values it was made from, so it is made once per optimizer step, however many forwards, recomputations and
//! micro-batches read it, and never outlives the values it came from.

use qlora_runtime::memory::{retag, tagged, Category};
use qlora_runtime::ops::concat::cat_rows;
use qlora_runtime::ops::elementwise::{accumulate, scale};
use qlora_runtime::{DType, Error, Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

struct Inner {
    name: String,
    trainable: bool,
    value: Mutex<Tensor>,
    /// Names the current value: see [`fresh_stamp`].
    stamp: AtomicU64,
    grad: Mutex<Option<Tensor>>,
    /// The compute copy last asked for (one per parameter: another dtype or group replaces it).
    shadow: Mutex<Option<Shadow>>,
    /// The tensor [`Param::derived`] last made (DoRA's weight norm on its magnitude).
    derived: Mutex<Option<Shadow>>,
}

/// [self; rest…] stacked in `dtype`, made from the values whose stamps are listed (self's first).
struct Shadow {
    dtype: DType,
    stamps: Vec<u64>,
    value: Tensor,
}

/// values: [rᵢ, d…] each (the same d…), on one device → [Σ rᵢ, d…] in `dtype`.
fn stack(values: &[Tensor], dtype: DType) -> Result<Tensor> {
    let first = &values[0];
    if let Some(v) = values.iter().find(|v| v.rank() == 0 || v.shape()[1..] != first.shape()[1..]) {
        return Err(Error::shape("stack", format!("{:?} beside {:?}", v.shape(), first.shape())));
    }
    let cast = values.iter().map(|v| v.try_to_dtype(dtype)).collect::<Result<Vec<_>>>()?;
    if let [one] = &cast[..] {
        return Ok(one.clone());
    }
    let mut shape = first.shape().to_vec();
    shape[0] = values.iter().map(|v| v.shape()[0]).sum();
    cat_rows(&cast, &shape, dtype, first.device())
}

/// A stamp never given out before, by any parameter: a list of stamps identifies the exact values a compute copy was
/// made from.
fn fresh_stamp() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A model weight. Trainable parameters accumulate gradients across backward passes (gradient accumulation)
/// until [`Param::zero_grad`]; frozen ones (the NF4 base, norms unless asked) never get a gradient buffer:
/// a tape treats them as constants and records nothing for them. Clones share the value and the gradient.
///
/// ```
/// use qlora_autograd::{Param, Tape};
/// use qlora_runtime::{DType, Tensor};
///
/// let frozen = Param::frozen("base", Tensor::ones(&[2], DType::F32));
/// let lora = Param::trainable("lora_B", Tensor::ones(&[2], DType::F32));
/// let tape = Tape::new();
/// let loss = tape.sum(&tape.mul(&tape.param(&frozen), &tape.param(&lora))?)?;
/// tape.backward(&loss)?;
/// assert!(frozen.grad().is_none(), "frozen weights never get a gradient buffer");
/// assert_eq!(lora.grad().unwrap().to_vec::<f32>(), vec![1.0, 1.0]);
/// lora.zero_grad();
/// assert!(lora.grad().is_none());
/// # Ok::<(), qlora_runtime::Error>(())
/// ```
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
        Param(Arc::new(Inner {
            name: name.into(),
            trainable,
            value: Mutex::new(value),
            stamp: AtomicU64::new(fresh_stamp()),
            grad: Mutex::new(None),
            shadow: Mutex::new(None),
            derived: Mutex::new(None),
        }))
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
        let mut slot = lock(&self.0.value);
        *slot = value;
        self.changed();
    }

    /// Runs `f` on the value in place (optimizer steps). Copy-on-write keeps tensors saved elsewhere intact.
    pub fn update(&self, f: impl FnOnce(&mut Tensor) -> Result<()>) -> Result<()> {
        let mut slot = lock(&self.0.value);
        let r = f(&mut slot);
        // Even a failed update may have written part of the value.
        self.changed();
        r
    }

    /// [`Param::update`] of several parameters at once, `f` seeing their values in order (an optimizer's update of
    /// all of them in one launch). A parameter given twice is an error: its value cannot be borrowed twice.
    pub fn update_all(params: &[&Param], f: impl FnOnce(&mut [&mut Tensor]) -> Result<()>) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        if let Some(p) = params.iter().find(|p| !seen.insert(Arc::as_ptr(&p.0))) {
            return Err(Error::invalid("Param::update_all", format!("{} is given twice", p.name())));
        }
        let mut slots: Vec<MutexGuard<'_, Tensor>> = params.iter().map(|p| lock(&p.0.value)).collect();
        let mut values: Vec<&mut Tensor> = slots.iter_mut().map(|s| &mut **s).collect();
        let r = f(&mut values);
        // Even a failed update may have written part of the values.
        params.iter().for_each(|p| p.changed());
        r
    }

    /// Called with the value locked, so that a reader sees the new value with the new stamp.
    fn changed(&self) {
        self.0.stamp.store(fresh_stamp(), Ordering::Relaxed);
        *lock(&self.0.shadow) = None;
        *lock(&self.0.derived) = None;
    }

    /// (value, stamp), read together.
    fn stamped_value(&self) -> (Tensor, u64) {
        let slot = lock(&self.0.value);
        (slot.clone(), self.0.stamp.load(Ordering::Relaxed))
    }

    /// The value in `dtype`, for products in another precision than the master (bf16 on a GPU): the value itself
    /// when it already is in `dtype`, else a copy cast once per value (see the module docs).
    pub fn value_as(&self, dtype: DType) -> Result<Tensor> {
        self.stacked_with(&[], dtype)
    }

    /// [self; rest…] stacked along dim 0 in `dtype`: a group of LoRA A matrices [rᵢ, in] as the one
    /// [Σ rᵢ, in] operand of their shared GEMM. Made once per set of values and kept on `self` (see the module docs);
    /// with no `rest` and the value already in `dtype`, the value itself.
    pub fn stacked_with(&self, rest: &[&Param], dtype: DType) -> Result<Tensor> {
        let (value, _) = self.stamped_value();
        if rest.is_empty() && value.dtype() == dtype {
            return Ok(value);
        }
        self.memo(&self.0.shadow, rest, dtype, |values| stack(values, dtype)).map_err(|e| {
            let names: Vec<&str> = std::iter::once(self).chain(rest.iter().copied()).map(Param::name).collect();
            Error::invalid("stacked_with", format!("stacking {names:?}: {e}"))
        })
    }

    /// A tensor computed from this parameter's value and those of `with` (what `make` reads), made once per set of
    /// values and kept like the compute copies: DoRA's weight norm ‖W + s·B·A‖, which the forward and its
    /// recomputation both read between two optimizer steps, kept on the magnitude with A and B as `with`.
    pub fn derived(&self, with: &[&Param], dtype: DType, make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        self.memo(&self.0.derived, with, dtype, |_| make())
    }

    /// The tensor in `slot` if it was made in `dtype` from the current values of self and `rest`, else `make` of
    /// those values, kept in `slot` unless self changed meanwhile (the copy would be stale already).
    fn memo(
        &self,
        slot: &Mutex<Option<Shadow>>,
        rest: &[&Param],
        dtype: DType,
        make: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (value, stamp) = self.stamped_value();
        let (mut values, mut stamps) = (vec![value], vec![stamp]);
        for p in rest {
            let (v, s) = p.stamped_value();
            values.push(v);
            stamps.push(s);
        }
        if let Some(s) = lock(slot).as_ref().filter(|s| s.dtype == dtype && s.stamps == stamps) {
            return Ok(s.value.clone());
        }
        let made = tagged(Category::Adapters, || make(&values))?;
        let mut kept = lock(slot);
        if self.0.stamp.load(Ordering::Relaxed) == stamp {
            *kept = Some(Shadow { dtype, stamps, value: made.clone() });
        }
        Ok(made)
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

    /// The accumulated gradient, leaving none: data-parallel training keeps each micro-batch's gradient apart.
    pub fn take_grad(&self) -> Option<Tensor> {
        lock(&self.0.grad).take()
    }

    /// Adds `g` into the gradient buffer, creating it on first use in master precision (f32; f64 for f64 values) on
    /// g's device. A backward adds each parameter's gradient through here; data-parallel training replays the
    /// ranks' micro-batch gradients through it, in the single process's order, to get its bits.
    pub fn accumulate_grad(&self, g: &Tensor) -> Result<()> {
        if !self.0.trainable {
            return Err(Error::invalid("accumulate_grad", format!("{} is frozen: it takes no gradient", self.0.name)));
        }
        let mut slot = lock(&self.0.grad);
        match slot.as_mut() {
            Some(buf) => accumulate(buf, 1.0, g),
            None => {
                let dtype = if self.value().dtype() == DType::F64 { DType::F64 } else { DType::F32 };
                // Shares g's storage when the dtype already matches; the next accumulate copies on write. Made in
                // backward, it is an adapter's gradient from now on.
                let grad = g.try_to_dtype(dtype)?;
                retag(&grad, Category::Adapters);
                *slot = Some(grad);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, v: &[f32], rows: usize) -> Param {
        Param::trainable(name, Tensor::from_slice(v, &[rows, v.len() / rows]).unwrap())
    }

    #[test]
    fn compute_copies_are_made_once_per_value() {
        let a = p("a", &[1.0, 2.0, 3.0, 4.0], 2);
        assert!(a.value_as(DType::F32).unwrap().shares_storage(&a.value()), "no copy in the master dtype");
        let c1 = a.value_as(DType::F64).unwrap();
        assert_eq!((c1.dtype(), c1.to_vec::<f64>()), (DType::F64, vec![1.0, 2.0, 3.0, 4.0]));
        assert!(a.value_as(DType::F64).unwrap().shares_storage(&c1), "the copy is reused");
        a.set_value(Tensor::from_slice(&[5.0f32, 6.0, 7.0, 8.0], &[2, 2]).unwrap());
        assert_eq!(a.value_as(DType::F64).unwrap().to_vec::<f64>(), vec![5.0, 6.0, 7.0, 8.0]);
        a.update(|v| v.update::<f32>(|x| x[0] = -1.0)).unwrap();
        let c2 = a.value_as(DType::BF16).unwrap();
        assert_eq!(c2.to_vec::<f32>(), vec![-1.0, 6.0, 7.0, 8.0]);
        assert_eq!(c1.to_vec::<f64>(), vec![1.0, 2.0, 3.0, 4.0], "a copy handed out keeps its values");
    }

    #[test]
    fn stacked_copies_follow_every_stacked_parameter() {
        let (a, b, c) = (p("a", &[1.0, 2.0], 1), p("b", &[3.0, 4.0, 5.0, 6.0], 2), p("c", &[7.0, 8.0], 1));
        let s1 = a.stacked_with(&[&b, &c], DType::F32).unwrap();
        assert_eq!((s1.shape(), s1.to_vec::<f32>()), (&[4, 2][..], (1..=8).map(|v| v as f32).collect::<Vec<_>>()));
        assert!(a.stacked_with(&[&b, &c], DType::F32).unwrap().shares_storage(&s1));
        // Another group, or a change of any member, makes a new copy.
        assert_eq!(a.stacked_with(&[&c], DType::F32).unwrap().shape(), &[2, 2]);
        let s2 = a.stacked_with(&[&b, &c], DType::F32).unwrap();
        assert!(!s2.shares_storage(&s1));
        c.set_value(Tensor::from_slice(&[0.0f32, 0.0], &[1, 2]).unwrap());
        assert_eq!(a.stacked_with(&[&b, &c], DType::F32).unwrap().to_vec::<f32>()[6..], [0.0, 0.0]);
        assert!(a.stacked_with(&[&b], DType::F32).is_ok());
        let e = a.stacked_with(&[&p("wide", &[1.0; 3], 1)], DType::F32).unwrap_err().to_string();
        assert!(e.contains("\"a\", \"wide\"") && e.contains("[1, 3]"), "{e}");
    }

    #[test]
    fn derived_tensors_are_made_once_per_set_of_values() {
        let (m, a, b) = (p("m", &[1.0, 2.0], 1), p("a", &[3.0, 4.0], 1), p("b", &[5.0, 6.0], 1));
        let made = std::cell::Cell::new(0);
        let norm = || {
            made.set(made.get() + 1);
            Ok(Tensor::from_slice(&[made.get() as f32], &[1]).unwrap())
        };
        let d1 = m.derived(&[&a, &b], DType::F32, norm).unwrap();
        assert!(m.derived(&[&a, &b], DType::F32, norm).unwrap().shares_storage(&d1), "kept while nothing changed");
        assert_eq!(made.get(), 1);
        // A change of any value it came from, or another dtype, makes it again; the stacked copies keep their slot.
        b.set_value(Tensor::from_slice(&[0.0f32, 0.0], &[1, 2]).unwrap());
        assert_eq!(m.derived(&[&a, &b], DType::F32, norm).unwrap().to_vec::<f32>(), vec![2.0]);
        let stacked = m.stacked_with(&[&a], DType::F32).unwrap();
        assert_eq!(m.derived(&[&a, &b], DType::BF16, norm).unwrap().to_vec::<f32>(), vec![3.0]);
        assert!(m.stacked_with(&[&a], DType::F32).unwrap().shares_storage(&stacked));
        m.update(|v| v.update::<f32>(|x| x[0] = -1.0)).unwrap();
        m.derived(&[&a, &b], DType::BF16, norm).unwrap();
        assert_eq!(made.get(), 4);
    }

    /// What data-parallel training relies on: a taken gradient leaves none, and replaying gradients through
    /// `accumulate_grad` adds them as backward passes would; a frozen weight refuses one.
    #[test]
    fn gradients_are_taken_and_replayed() {
        let w = p("w", &[1.0, 2.0], 1);
        let g = |v: [f32; 2]| Tensor::from_slice(&v, &[1, 2]).unwrap();
        w.accumulate_grad(&g([0.5, 1.0])).unwrap();
        w.accumulate_grad(&g([0.25, -3.0])).unwrap();
        assert_eq!(w.take_grad().unwrap().to_vec::<f32>(), vec![0.75, -2.0]);
        assert!(w.grad().is_none() && w.take_grad().is_none());
        let frozen = Param::frozen("base", g([1.0, 1.0]));
        let e = frozen.accumulate_grad(&g([1.0, 1.0])).unwrap_err().to_string();
        assert!(e.contains("base is frozen"), "{e}");
    }
}
