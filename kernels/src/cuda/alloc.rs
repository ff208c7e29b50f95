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
//! - Categories: each block is counted under what it holds ([`Category`]: the thread's current one when it was
//!   taken, set by [`tagged`] scopes, or changed later by `DeviceBuffer::retag`), and the split at the overall peak
//!   is kept, so that a peak can be explained (weights, adapters and optimizer, activations, scratch, loss).
//!
//! The policy is generic over `Backing` so that its tests run on CPU against a fake device.

use super::{Error, Result};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// What a block of device memory holds, for the peak report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// What a step computes and keeps for backward (the default).
    Activations,
    /// Frozen base weights, embeddings, norms and head.
    Weights,
    /// Trainable adapter values, their gradients and the optimizer's state.
    Adapters,
    /// Reused buffers of materialized weights (NF4 dequantized for a product).
    Scratch,
    /// The loss's logits chunks and their gradients.
    Loss,
}

impl Category {
    pub const ALL: [Category; 5] =
        [Category::Weights, Category::Adapters, Category::Activations, Category::Scratch, Category::Loss];

    pub fn name(self) -> &'static str {
        match self {
            Category::Activations => "activations",
            Category::Weights => "weights",
            Category::Adapters => "adapters + optimizer",
            Category::Scratch => "scratch",
            Category::Loss => "loss",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_index(i: u8) -> Category {
        Category::ALL.into_iter().find(|c| c.index() == i as usize).unwrap_or(Category::Activations)
    }
}

thread_local! {
    static CURRENT: Cell<Category> = const { Cell::new(Category::Activations) };
}

/// Runs `f` with the device blocks it takes on this thread counted under `category`.
pub fn tagged<R>(category: Category, f: impl FnOnce() -> R) -> R {
    struct Restore(Category);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.set(self.0);
        }
    }
    let _restore = Restore(CURRENT.replace(category));
    f()
}

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
    /// `current` split by [`Category`] (indexed by `Category as usize`; [`MemoryStats::by`] reads it).
    pub by_category: [usize; 5],
    /// The split of `current` when it last reached `peak`.
    pub at_peak: [usize; 5],
}

impl MemoryStats {
    /// (category, bytes) of `split` (`by_category` or `at_peak`), in [`Category::ALL`]'s order.
    pub fn by(split: &[usize; 5]) -> impl Iterator<Item = (Category, usize)> + '_ {
        Category::ALL.into_iter().map(move |c| (c, split[c.index()]))
    }
}

/// A block of device memory: its address, its size class and what it is counted under.
#[derive(Debug)]
pub(crate) struct Block {
    pub ptr: u64,
    pub size: usize,
    category: AtomicU8,
}

impl Block {
    fn new(ptr: u64, size: usize, category: Category) -> Block {
        Block { ptr, size, category: AtomicU8::new(category.index() as u8) }
    }

    pub(crate) fn category(&self) -> Category {
        Category::from_index(self.category.load(Ordering::Relaxed))
    }
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
        let category = CURRENT.get();
        let mut state = self.lock();
        if let Some(ptr) = state.free.get_mut(&size).and_then(Vec::pop) {
            state.stats.cache_hits += 1;
            state.take(size, category);
            return Ok(Block::new(ptr, size, category));
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
        state.take(size, category);
        Ok(Block::new(ptr, size, category))
    }

    /// Puts a block back in its class's free list (stream-ordered: see the module docs).
    pub fn release(&self, block: Block) {
        let mut state = self.lock();
        state.stats.current -= block.size;
        state.stats.by_category[block.category().index()] -= block.size;
        state.free.entry(block.size).or_default().push(block.ptr);
    }

    /// Counts `block` under `category` from now on.
    pub fn retag(&self, block: &Block, category: Category) {
        let mut state = self.lock();
        let before = Category::from_index(block.category.swap(category.index() as u8, Ordering::Relaxed));
        state.stats.by_category[before.index()] -= block.size;
        state.stats.by_category[category.index()] += block.size;
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
    fn take(&mut self, size: usize, category: Category) {
        self.stats.current += size;
        self.stats.by_category[category.index()] += size;
        if self.stats.current > self.stats.peak {
            self.stats.peak = self.stats.current;
            self.stats.at_peak = self.stats.by_category;
        }
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
        let s = a.stats();
        assert_eq!((s.current, s.peak, s.reserved), (2048 + 5120, 2048 + 5120, 2048 + 5120));
        assert_eq!((s.device_allocs, s.cache_hits), (3, 1));
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
    fn blocks_are_counted_by_category_and_the_split_at_the_peak_is_kept() {
        let a = CachingAllocator::new(Fake::new(1 << 30));
        let index = |c: Category| c.index();
        let w = tagged(Category::Weights, || a.allocate(4096).unwrap());
        let act = a.allocate(1024).unwrap();
        assert_eq!(CURRENT.get(), Category::Activations, "the scope restored the default");
        let loss = tagged(Category::Loss, || a.allocate(2048).unwrap());
        let s = a.stats();
        assert_eq!((s.by_category[index(Category::Weights)], s.by_category[index(Category::Loss)]), (4096, 2048));
        assert_eq!(s.at_peak, s.by_category);
        a.release(loss);
        // A gradient made in backward becomes an adapter's: it moves category without moving memory.
        a.retag(&act, Category::Adapters);
        let s = a.stats();
        assert_eq!(s.by_category[index(Category::Activations)], 0);
        assert_eq!(s.by_category[index(Category::Adapters)], 1024);
        assert_eq!(s.at_peak[index(Category::Loss)], 2048, "the split at the peak stays the peak's");
        assert_eq!(MemoryStats::by(&s.by_category).map(|(_, b)| b).sum::<usize>(), s.current);
        a.release(act);
        a.release(w);
        assert_eq!(a.stats().by_category, [0; 5]);
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
