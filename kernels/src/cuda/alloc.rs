//! The caching device allocator: device memory is requested from the driver in size classes and kept for reuse when
//! its buffer is dropped, so a training step's allocations, identical from step to step, stop reaching the driver
//! after the first step.
//!
//! - Size classes: 512 B minimum; up to 16 MiB, four classes per power of two (at most 25 % rounding waste); above,
//!   multiples of 2 MiB. A request is served by a cached block of exactly its class, else by a new driver allocation.
//! - Stream-ordered reuse: a dropped buffer's block goes straight back to its class's free list. Every launch and
//!   copy of a device goes on its one stream, so work queued for the block's next owner runs after all work queued
//!   for the previous one; no event is needed. The copy stream of `offload` is the one other user of device blocks,
//!   and it fences its copies with events on the compute stream (see there), so reuse stays compute-ordered.
//! - Out of memory: the cache is returned to the driver (after the stream drains) and the allocation tried once more;
//!   if it still fails, [`Error::OutOfMemory`] reports the request, the free and total memory and what this process
//!   holds.
//!
//! The policy is generic over `Backing` so that its tests run on CPU against a fake device.

use super::{Error, Result};
use std::collections::BTreeMap;
use std::sync::Mutex;

const MIN_BLOCK: usize = 512;
/// Above this, classes are multiples of [`LARGE_STEP`] (weights and activations: large and of few distinct sizes).
const LARGE: usize = 16 << 20;
const LARGE_STEP: usize = 2 << 20;

/// The bytes actually reserved for a request of `bytes`.
pub fn size_class(bytes: usize) -> usize {
    if bytes <= MIN_BLOCK {
        MIN_BLOCK
    } else if bytes > LARGE {
        bytes.div_ceil(LARGE_STEP) * LARGE_STEP
    } else {
        // 2^k < bytes ≤ 2^(k+1): classes 2^k·{1.25, 1.5, 1.75, 2}.
        let k = usize::BITS - 1 - (bytes - 1).leading_zeros();
        let step = 1usize << (k - 2);
        bytes.div_ceil(step) * step
    }
}

/// Memory accounting of one device's allocator, in bytes of size classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held by live buffers.
    pub current: usize,
    /// The largest `current` since the device was opened.
    pub peak: usize,
    /// Obtained from the driver and not given back: `current` plus the cache.
    pub reserved: usize,
    /// Requests that reached the driver.
    pub device_allocs: u64,
    /// Requests served from the cache.
    pub cache_hits: u64,
}

/// A block of device memory: its address and its size class.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Block {
    pub ptr: u64,
    pub size: usize,
}

/// Where blocks come from.
pub(crate) trait Backing {
    /// A fresh block of `bytes`, or `Ok(None)` when the device is out of memory.
    fn alloc(&self, bytes: usize) -> Result<Option<u64>>;
    /// Returns a block to the device. Called only after [`Backing::synchronize`], so no queued work still uses it.
    fn free(&self, ptr: u64) -> Result<()>;
    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;
    /// (free, total) device memory.
    fn mem_info(&self) -> Result<(usize, usize)>;
    fn ordinal(&self) -> usize;
}

pub(crate) struct CachingAllocator<B: Backing> {
    backing: B,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Cached blocks per size class.
    free: BTreeMap<usize, Vec<u64>>,
    stats: MemoryStats,
}

impl<B: Backing> CachingAllocator<B> {
    pub fn new(backing: B) -> Self {
        CachingAllocator { backing, state: Mutex::new(State::default()) }
    }

    pub fn backing(&self) -> &B {
        &self.backing
    }

    /// A block of at least `bytes` (> 0); its contents are whatever its last owner left.
    pub fn allocate(&self, bytes: usize) -> Result<Block> {
        assert!(bytes > 0, "allocate: zero bytes (empty buffers hold no block)");
        let size = size_class(bytes);
        let mut state = self.lock();
        if let Some(ptr) = state.free.get_mut(&size).and_then(Vec::pop) {
            state.stats.cache_hits += 1;
            state.take(size);
            return Ok(Block { ptr, size });
        }
        let ptr = match self.backing.alloc(size)? {
            Some(ptr) => ptr,
            None => {
                self.release_cached(&mut state)?;
                match self.backing.alloc(size)? {
                    Some(ptr) => ptr,
                    None => {
                        let (free, total) = self.backing.mem_info()?;
                        return Err(Error::OutOfMemory {
                            ordinal: self.backing.ordinal(),
                            requested: bytes,
                            free,
                            total,
                            reserved: state.stats.reserved,
                            in_use: state.stats.current,
                        });
                    }
                }
            }
        };
        state.stats.device_allocs += 1;
        state.stats.reserved += size;
        state.take(size);
        Ok(Block { ptr, size })
    }

    /// Puts a block back in its class's free list (stream-ordered: see the module docs).
    pub fn release(&self, block: Block) {
        let mut state = self.lock();
        state.stats.current -= block.size;
        state.free.entry(block.size).or_default().push(block.ptr);
    }

    /// Returns every cached block to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        let mut state = self.lock();
        self.release_cached(&mut state)
    }

    pub fn stats(&self) -> MemoryStats {
        self.lock().stats
    }

    fn release_cached(&self, state: &mut State) -> Result<()> {
        if state.free.values().all(Vec::is_empty) {
            return Ok(());
        }
        self.backing.synchronize()?;
        while let Some((size, mut ptrs)) = state.free.pop_first() {
            while let Some(ptr) = ptrs.pop() {
                if let Err(e) = self.backing.free(ptr) {
                    // Keep what is still cached accounted for.
                    ptrs.push(ptr);
                    state.free.insert(size, ptrs);
                    return Err(e);
                }
                state.stats.reserved -= size;
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the free lists or counters half-updated (each update is a
        // push, a pop or an addition after the fallible calls), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn take(&mut self, size: usize) {
        self.stats.current += size;
        self.stats.peak = self.stats.peak.max(self.stats.current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn size_classes() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 640);
        assert_eq!(size_class(1024), 1024);
        assert_eq!(size_class(1025), 1280);
        assert_eq!(size_class(1537), 1792);
        assert_eq!(size_class(16 << 20), 16 << 20);
        assert_eq!(size_class((16 << 20) + 1), 18 << 20);
        assert_eq!(size_class(1 << 30), 1 << 30);
        let mut last = 0;
        for bytes in (1..1 << 16).chain((1 << 24) - 4096..(1 << 24) + 4096) {
            let c = size_class(bytes);
            assert!(c >= bytes && c >= last, "{bytes} → {c}");
            assert!(
                c <= MIN_BLOCK || (c as f64) < 1.25 * bytes as f64 + 1.0 || c - bytes < LARGE_STEP,
                "{bytes} → {c}"
            );
            last = c;
        }
    }

    /// A device of `capacity` bytes whose addresses count up; records frees and synchronizations.
    struct Fake {
        capacity: usize,
        used: RefCell<BTreeMap<u64, usize>>,
        next: RefCell<u64>,
        log: RefCell<Vec<String>>,
    }

    impl Fake {
        fn new(capacity: usize) -> Self {
            Fake { capacity, used: RefCell::default(), next: RefCell::new(1 << 20), log: RefCell::default() }
        }
    }

    impl Backing for Fake {
        fn alloc(&self, bytes: usize) -> Result<Option<u64>> {
            let used: usize = self.used.borrow().values().sum();
            if used + bytes > self.capacity {
                return Ok(None);
            }
            let ptr = *self.next.borrow();
            *self.next.borrow_mut() += bytes as u64;
            self.used.borrow_mut().insert(ptr, bytes);
            Ok(Some(ptr))
        }
        fn free(&self, ptr: u64) -> Result<()> {
            self.used.borrow_mut().remove(&ptr).expect("double free");
            self.log.borrow_mut().push(format!("free {ptr}"));
            Ok(())
        }
        fn synchronize(&self) -> Result<()> {
            self.log.borrow_mut().push("sync".into());
            Ok(())
        }
        fn mem_info(&self) -> Result<(usize, usize)> {
            Ok((self.capacity - self.used.borrow().values().sum::<usize>(), self.capacity))
        }
        fn ordinal(&self) -> usize {
            3
        }
    }

    #[test]
    fn reuses_blocks_of_the_same_class_and_counts() {
        let a = CachingAllocator::new(Fake::new(1 << 30));
        let b1 = a.allocate(1000).unwrap();
        assert_eq!(b1.size, 1024);
        let p1 = b1.ptr;
        a.release(b1);
        let b2 = a.allocate(1000).unwrap();
        assert_eq!(b2.ptr, p1, "same class: the cached block");
        let b3 = a.allocate(1000).unwrap();
        assert_ne!(b3.ptr, p1, "the cached block is taken: a new one");
        let b4 = a.allocate(5000).unwrap();
        assert_eq!(
            a.stats(),
            MemoryStats {
                current: 2048 + 5120,
                peak: 2048 + 5120,
                reserved: 2048 + 5120,
                device_allocs: 3,
                cache_hits: 1
            }
        );
        a.release(b4);
        a.release(b3);
        let s = a.stats();
        assert_eq!((s.current, s.peak, s.reserved), (1024, 2048 + 5120, 2048 + 5120));
        a.release(b2);
        a.empty_cache().unwrap();
        assert_eq!(a.stats().reserved, 0);
        assert_eq!(a.backing().log.borrow()[0], "sync", "the stream drains before memory goes back");
        assert!(a.backing().used.borrow().is_empty());
    }

    #[test]
    fn out_of_memory_releases_the_cache_then_reports() {
        let a = CachingAllocator::new(Fake::new(10 << 20));
        let small = a.allocate(3 << 20).unwrap();
        let other = a.allocate(4 << 20).unwrap();
        a.release(other);
        // 3 + 4 MiB reserved: 5 MiB more fits only once the cached 4 MiB block is returned.
        let big = a.allocate(5 << 20).unwrap();
        assert_eq!(a.stats().reserved, (3 << 20) + (5 << 20));
        assert!(a.backing().log.borrow().contains(&"sync".to_string()));
        let err = a.allocate(4 << 20).unwrap_err();
        match err {
            Error::OutOfMemory { ordinal, requested, free, total, reserved, in_use } => {
                assert_eq!((ordinal, requested, free, total), (3, 4 << 20, 2 << 20, 10 << 20));
                assert_eq!((reserved, in_use), (8 << 20, 8 << 20));
            }
            e => panic!("{e}"),
        }
        a.release(small);
        a.release(big);
        assert_eq!(a.stats().current, 0);
    }
}
