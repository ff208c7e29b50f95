//! Parking a layer's saved activations in pinned host memory between its forward and its backward, so that a layer
//! that keeps its activations (nothing recomputed) holds device memory only around the time it runs: what a memory
//! plan's parked layers are (`CausalLm::park_layers`). Where [`offload`](super::offload) moves one tensor a caller
//! names, this moves whatever a closure left alive: the tensors an op's backward keeps are private to the op.
//!
//! Every non-empty [`DeviceBuffer`](super::DeviceBuffer) holds its block through a `Slot`, shared by the tensors
//! and views over it, whose block can change while they hold it:
//! - [`recording`] notes the activation buffers a closure allocates on this thread;
//! - [`ParkedSet::park`] starts copying those still alive (less the ones the caller names, its outputs) to pinned host
//!   memory on the copy stream; they stay readable meanwhile;
//! - [`ParkedSet::release`] gives their device blocks back to the allocator once the compute stream has waited for the
//!   copies (call it a layer later, and the wait costs nothing when a copy took less than that layer's compute);
//! - [`ParkedSet::prefetch`] starts copying them back into fresh blocks, [`ParkedSet::restore`] makes the compute
//!   stream wait for that before their first use.
//!
//! A kernel's address comes from `Slot::ptr`; a buffer read while it is away is brought back on the spot (a restore
//! the compute stream waits for, counted by [`faults`]): correct whatever touches it, and a plan that parks what it
//! should never takes one. The streams' ordering is `offload`'s (see there).

use super::alloc::{tagged, Block, Category};
use super::offload::HostCopy;
use super::{CudaDevice, Error, Result};
use cudarc::driver::CudaEvent;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Where a non-empty buffer's values are, and the address kernels get.
pub(crate) struct Slot {
    /// The address of the block holding the values; 0 while they are away.
    ptr: AtomicU64,
    bytes: usize,
    device: CudaDevice,
    state: Mutex<State>,
}

enum State {
    Resident(Block),
    /// Being copied to the host; the block still holds the values and may be read.
    Leaving {
        block: Block,
        copy: HostCopy,
    },
    /// In host memory only; `category` is what the block was counted under, for the one that brings it back.
    Away {
        copy: HostCopy,
        category: Category,
    },
    /// Being copied back into `block`; usable once the compute stream waits for `done`.
    Arriving {
        block: Block,
        done: CudaEvent,
    },
    /// Between two states while a transition runs (never seen outside one: the lock is held).
    Moving,
}

static FAULTS: AtomicU64 = AtomicU64::new(0);

/// Buffers read while parked, since the process started (each brought back on the spot; see the module docs).
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

impl Slot {
    pub(crate) fn new(block: Block, bytes: usize, device: &CudaDevice) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            ptr: AtomicU64::new(block.ptr),
            bytes,
            device: device.clone(),
            state: Mutex::new(State::Resident(block)),
        });
        note(&slot);
        slot
    }

    /// The address of the values for a kernel queued now on the compute stream.
    pub(crate) fn ptr(&self) -> u64 {
        match self.ptr.load(Ordering::Acquire) {
            0 => self.fault(),
            ptr => ptr,
        }
    }

    /// Read while away: brought back now, the compute stream waiting for the copy.
    #[cold]
    fn fault(&self) -> u64 {
        FAULTS.fetch_add(1, Ordering::Relaxed);
        // The launcher asking for the address has no error path; failing to bring values back (out of device memory
        // here, where the plan expected none) leaves nothing correct to launch on.
        self.restore().expect("bringing a parked buffer back to the device for a kernel that reads it");
        self.ptr.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_activation(&self) -> bool {
        match &*self.lock() {
            State::Resident(block) => block.category() == Category::Activations,
            _ => false,
        }
    }

    pub(crate) fn retag(&self, category: Category) {
        match &mut *self.lock() {
            State::Resident(block) | State::Leaving { block, .. } | State::Arriving { block, .. } => {
                self.device.allocator().retag(block, category)
            }
            State::Away { category: c, .. } => *c = category,
            State::Moving => {}
        }
    }

    /// Resident → leaving: the copy to the host starts (queued after the compute stream's work so far).
    fn leave(&self) -> Result<()> {
        let mut state = self.lock();
        match std::mem::replace(&mut *state, State::Moving) {
            State::Resident(block) => match HostCopy::start(&self.device, block.ptr, self.bytes) {
                Ok(copy) => *state = State::Leaving { block, copy },
                Err(e) => {
                    *state = State::Resident(block);
                    return Err(e);
                }
            },
            other => *state = other,
        }
        Ok(())
    }

    /// Leaving → away: the compute stream waits for the copy, then the block goes back to the allocator.
    fn release(&self) -> Result<()> {
        let mut state = self.lock();
        match std::mem::replace(&mut *state, State::Moving) {
            State::Leaving { block, copy } => {
                let fenced = copy.fence();
                if let Err(e) = fenced {
                    *state = State::Leaving { block, copy };
                    return Err(e);
                }
                self.ptr.store(0, Ordering::Release);
                let category = block.category();
                self.device.allocator().release(block);
                *state = State::Away { copy, category };
            }
            other => *state = other,
        }
        Ok(())
    }

    /// Away → arriving: a fresh block, and the copy back into it on the copy stream.
    fn prefetch(&self) -> Result<()> {
        let mut state = self.lock();
        self.prefetch_locked(&mut state)
    }

    fn prefetch_locked(&self, state: &mut State) -> Result<()> {
        if let State::Away { copy, category } = state {
            let block = tagged(*category, || self.device.allocator().allocate(self.bytes))?;
            let done = match copy.upload_to(block.ptr) {
                Ok(done) => done,
                Err(e) => {
                    self.device.allocator().release(block);
                    return Err(e);
                }
            };
            *state = State::Arriving { block, done };
        }
        Ok(())
    }

    /// Any state → resident, the compute stream waiting for a copy back where one runs.
    fn restore(&self) -> Result<()> {
        let mut state = self.lock();
        self.prefetch_locked(&mut state)?;
        match std::mem::replace(&mut *state, State::Moving) {
            // The copy to the host may still be reading the block: it stays this slot's, so nothing else writes it.
            State::Leaving { block, .. } => *state = State::Resident(block),
            State::Arriving { block, done } => {
                if let Err(e) = self.device.stream().wait(&done).map_err(Error::driver("cuStreamWaitEvent")) {
                    *state = State::Arriving { block, done };
                    return Err(e);
                }
                self.ptr.store(block.ptr, Ordering::Release);
                *state = State::Resident(block);
            }
            other => *state = other,
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let allocator = self.device.allocator();
        // A block a side-stream copy still reads or writes goes back only after the compute stream waits for that
        // copy, since the allocator's next owner runs on the compute stream. A failed wait has nowhere to go but the
        // next driver call, which reports the context's error.
        match std::mem::replace(&mut *self.lock(), State::Moving) {
            State::Resident(block) => allocator.release(block),
            State::Leaving { block, copy } => {
                let _ = copy.fence();
                allocator.release(block);
            }
            State::Arriving { block, done } => {
                let _ = self.device.stream().wait(&done);
                allocator.release(block);
            }
            State::Away { .. } | State::Moving => {}
        }
    }
}

thread_local! {
    /// The open [`recording`]s of this thread, innermost last.
    static RECORDINGS: RefCell<Vec<Vec<Weak<Slot>>>> = const { RefCell::new(Vec::new()) };
}

/// Notes a new slot in the innermost open recording, if it holds activations.
fn note(slot: &Arc<Slot>) {
    RECORDINGS.with_borrow_mut(|open| {
        if let Some(innermost) = open.last_mut() {
            if slot.is_activation() {
                innermost.push(Arc::downgrade(slot));
            }
        }
    });
}

/// The activation buffers a [`recording`] saw allocated.
#[derive(Default)]
pub struct Recorded(Vec<Weak<Slot>>);

/// Runs `f`, noting the activation buffers ([`Category::Activations`]) it allocates on this thread on any device.
pub fn recording<R>(f: impl FnOnce() -> R) -> (R, Recorded) {
    struct Close;
    impl Drop for Close {
        fn drop(&mut self) {
            RECORDINGS.with_borrow_mut(|open| open.pop());
        }
    }
    RECORDINGS.with_borrow_mut(|open| open.push(Vec::new()));
    let close = Close;
    let out = f();
    let seen = RECORDINGS.with_borrow_mut(|open| std::mem::take(open.last_mut().expect("opened above")));
    drop(close);
    (out, Recorded(seen))
}

/// The identity of a buffer's slot, for [`ParkedSet::park`]'s `keep` (0 for an empty buffer, which has none).
pub(crate) fn slot_id(slot: &Arc<Slot>) -> usize {
    Arc::as_ptr(slot) as usize
}

/// Buffers a [`recording`] saw that are on their way to, in, or back from host memory.
pub struct ParkedSet {
    slots: Vec<Weak<Slot>>,
}

impl ParkedSet {
    /// Starts copying to the host every buffer of `recorded` still alive except those whose ids are in `keep`.
    pub fn park(recorded: Recorded, keep: &[usize]) -> Result<ParkedSet> {
        let mut slots = Vec::new();
        for weak in recorded.0 {
            let Some(slot) = weak.upgrade() else { continue };
            if keep.contains(&slot_id(&slot)) || !slot.is_activation() {
                continue;
            }
            slot.leave()?;
            slots.push(weak);
        }
        Ok(ParkedSet { slots })
    }

    fn each(&self, f: impl Fn(&Slot) -> Result<()>) -> Result<()> {
        self.slots.iter().filter_map(Weak::upgrade).try_for_each(|slot| f(&slot))
    }

    /// Bytes of the buffers still alive.
    pub fn bytes(&self) -> usize {
        self.slots.iter().filter_map(Weak::upgrade).map(|slot| slot.bytes).sum()
    }

    /// Gives the device blocks back (the compute stream waits for the copies to the host first).
    pub fn release(&self) -> Result<()> {
        self.each(Slot::release)
    }

    /// Starts bringing the values back into fresh device blocks.
    pub fn prefetch(&self) -> Result<()> {
        self.each(Slot::prefetch)
    }

    /// Every buffer resident again, the compute stream waiting for the copies back (started here if
    /// [`ParkedSet::prefetch`] did not).
    pub fn restore(&self) -> Result<()> {
        self.each(Slot::restore)
    }
}
