//! [`Offloaded`]: a tensor parked in pinned host memory between the forward that made it and the backward that
//! reads it, so that the GPU holds it only while it is used. A checkpointed layer's input is the case it is for:
//! copied out while the next layer computes, copied back one layer ahead in backward.
//!
//! Owns the lifecycle of one parked tensor (park, release the device copy, prefetch, restore); the copies and their
//! stream ordering are `qlora_kernels::cuda::offload`'s. On the CPU nothing moves: host memory is where the tensor
//! already is, so the handle just holds it.

use crate::cuda::{contiguous, copy_to_host};
use crate::storage::{CudaElement, CudaStorage, Storage};
use crate::{DType, Error, Result, Tensor};
use half::{bf16, f16};
use qlora_kernels::cuda::HostCopy;
use std::cell::RefCell;

/// A tensor whose values wait in host memory until [`Offloaded::restore`].
pub struct Offloaded {
    shape: Vec<usize>,
    state: RefCell<State>,
}

enum State {
    /// A CPU tensor, held as it is.
    Host(Tensor),
    Parked {
        copy: HostCopy,
        dtype: DType,
        /// The device tensor, until [`Offloaded::release`] fences the copy and lets it go (before that, restoring
        /// returns it without a copy).
        source: Option<Tensor>,
        /// The copy back, once [`Offloaded::prefetch`] started it.
        arriving: Option<Box<dyn FnOnce() -> Result<CudaStorage>>>,
    },
}

impl Offloaded {
    /// Starts parking `t`'s values in host memory (a CUDA tensor; a CPU one is just held). The device copy stays
    /// alive until [`Offloaded::release`].
    pub fn new(t: &Tensor) -> Result<Offloaded> {
        let shape = t.shape().to_vec();
        if !matches!(t.storage(), Storage::Cuda(_)) {
            return Ok(Offloaded { shape, state: RefCell::new(State::Host(t.clone())) });
        }
        let whole = contiguous(t)?;
        let copy = copy_to_host(&whole)?;
        let state = State::Parked { copy, dtype: t.dtype(), source: Some(whole), arriving: None };
        Ok(Offloaded { shape, state: RefCell::new(state) })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Bytes parked in pinned host memory (0 for a CPU tensor, which did not move).
    pub fn host_bytes(&self) -> usize {
        match &*self.state.borrow() {
            State::Host(_) => 0,
            State::Parked { copy, .. } => copy.bytes(),
        }
    }

    /// Bytes this handle keeps where the tensor computes until it is restored: all of a CPU tensor (nothing moved),
    /// none of a parked one (its device copy is let go by [`Offloaded::release`]).
    pub fn resident_bytes(&self) -> usize {
        match &*self.state.borrow() {
            State::Host(t) => t.size_in_bytes(),
            State::Parked { .. } => 0,
        }
    }

    /// Lets the device copy go: the compute stream waits for the copy out (on the device, not the host), so its
    /// memory is reused only after it has been read. Call it once the work that overlaps the copy is queued (the
    /// scope's forward), so the wait costs nothing.
    pub fn release(&self) -> Result<()> {
        if let State::Parked { copy, source, .. } = &mut *self.state.borrow_mut() {
            if source.is_some() {
                copy.fence().map_err(Error::cuda("offload"))?;
                *source = None;
            }
        }
        Ok(())
    }

    /// Starts the copy back to the device (on the copy stream) unless the device copy is still held or the copy
    /// back has already started: call it one step before [`Offloaded::restore`] so that it runs under that step.
    pub fn prefetch(&self) -> Result<()> {
        if let State::Parked { copy, dtype, source: None, arriving: arriving @ None } = &mut *self.state.borrow_mut() {
            let len = self.shape.iter().product();
            *arriving = Some(match dtype {
                DType::F32 => arrive::<f32>(copy, len)?,
                DType::BF16 => arrive::<bf16>(copy, len)?,
                DType::F16 => arrive::<f16>(copy, len)?,
                DType::I32 => arrive::<i32>(copy, len)?,
                DType::U8 => arrive::<u8>(copy, len)?,
                DType::F64 => unreachable!("no CUDA tensor is f64"),
            });
        }
        Ok(())
    }

    /// The tensor on its device again (the compute stream waits for the copy back; the host does not).
    pub fn restore(&self) -> Result<Tensor> {
        self.prefetch()?;
        let mut state = self.state.borrow_mut();
        match &mut *state {
            State::Host(t) => Ok(t.clone()),
            State::Parked { source: Some(t), .. } => Ok(t.clone()),
            State::Parked { arriving, .. } => {
                // prefetch above started the copy back unless the device copy was still held.
                let arrive = arriving.take().ok_or_else(|| Error::invalid("offload", "no copy back in flight"))?;
                Tensor::from_cuda(arrive()?, &self.shape)
            }
        }
    }
}

impl Drop for Offloaded {
    fn drop(&mut self) {
        // Dropped before release (an error, or a forward whose backward never ran): the source must still outlive
        // the copy that reads it. An error here resurfaces at the next driver call.
        let _ = self.release();
    }
}

/// Starts the copy of `copy` back into a new buffer of `len` elements of `T`; the closure hands it out as storage.
fn arrive<T: CudaElement>(copy: &HostCopy, len: usize) -> Result<Box<dyn FnOnce() -> Result<CudaStorage>>> {
    let arrival = copy.upload::<T>(len).map_err(Error::cuda("offload"))?;
    Ok(Box::new(move || Ok(T::wrap_device(arrival.ready().map_err(Error::cuda("offload"))?))))
}
