//! Data parallelism's seam: a [`Communicator`] is one rank of a group of processes (or threads) that train the same
//! model on different micro-batches and combine what they computed through collectives.
//!
//! It lives in the runtime because a collective moves tensors' memory on the devices this crate drives; everything
//! above (the trainer in `cli`) sees only this trait. Owns: the trait, the in-process group ([`local_group`], threads
//! as ranks, what CI proves data parallelism with), the NCCL group ([`nccl`], one process per GPU), torchrun's launch
//! environment ([`launch`]) and the TCP rendezvous that hands NCCL's unique id from rank 0 to the others
//! ([`rendezvous`]). Must not know about models or optimizers.
//!
//! Every collective is called by every rank of the group, in the same order, with matching arguments; a rank
//! that calls another collective, or leaves the group, makes the others' calls fail instead of hang.

pub mod launch;
mod local;
pub mod nccl;
pub mod rendezvous;

pub use local::{local_group, LocalRank};

use crate::{DType, Error, Result, Tensor};

/// A buffer reduced in place: f32 for gradients, f64 for counts and sums that must stay exact (integers to 2⁵³).
#[derive(Debug)]
pub enum Buffer<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

/// One rank of a group. Ranks are numbered 0..world_size; rank 0 is the one that writes files.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// How the ranks are connected, for people: "in-process" (threads of one process) or "NCCL".
    fn backend(&self) -> &'static str;

    /// Element-wise sum over the ranks, in place; every rank ends with the same values. The buffers must have the
    /// same dtype and length on every rank. The order of the additions is the backend's: the in-process group adds
    /// in rank order, ((x₀ + x₁) + x₂)…, so its results are bit-reproducible.
    fn all_reduce_sum(&self, buf: Buffer<'_>) -> Result<()>;

    /// Every rank's `local` (the same length on every rank) concatenated in rank order, on every rank.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>>;

    /// [`Communicator::all_gather`] of bytes.
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<u8>>;

    /// [`Communicator::all_gather`] of a tensor: every rank's `local` (f32 or u8 \[n\], the same n and dtype
    /// everywhere, on this rank's device) in rank order, as \[world_size · n\] of that dtype on the same device.
    /// Through the host unless the backend's ranks own GPUs, where it gathers device memory directly.
    fn all_gather_tensor(&self, local: &Tensor) -> Result<Tensor> {
        gather_through_host(self, local)
    }

    /// [`Communicator::all_gather_tensor`] started, to be finished by [`Pending::finish`]: where the ranks own GPUs
    /// the gather runs on a stream of its own while the caller queues other work (what a sharded model prefetches
    /// the next layer with); elsewhere it is done at once. Every rank starts the same gathers in the same order.
    fn start_all_gather_tensor(&self, local: &Tensor) -> Result<Pending> {
        Ok(Pending::done(self.all_gather_tensor(local)?))
    }

    /// Rank `root`'s bytes copied into every rank's `buf` (the same length on every rank).
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// A collective's result on its way ([`Communicator::start_all_gather_tensor`]). Dropped unfinished, it still lets
/// the collective complete before its memory is reused.
pub struct Pending(Box<dyn FnOnce() -> Result<Tensor>>);

impl Pending {
    /// A result that is already here.
    pub fn done(t: Tensor) -> Pending {
        Pending(Box::new(move || Ok(t)))
    }

    /// A result that `finish` produces (ordering the device's later work after the collective).
    pub fn new(finish: impl FnOnce() -> Result<Tensor> + 'static) -> Pending {
        Pending(Box::new(finish))
    }

    /// The result, on the device the gather ran on; later work there runs after the collective.
    pub fn finish(self) -> Result<Tensor> {
        (self.0)()
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

/// [`Communicator::all_gather_tensor`] by way of the host: `local` read back, gathered, and put where it was.
pub fn gather_through_host<C: Communicator + ?Sized>(group: &C, local: &Tensor) -> Result<Tensor> {
    let all = match (local.dtype(), local.rank()) {
        (DType::F32, 1) => {
            let all = group.all_gather(&local.try_to_vec::<f32>()?)?;
            let n = all.len();
            Tensor::from_vec(all, &[n])?
        }
        (DType::U8, 1) => {
            let all = group.all_gather_bytes(&local.try_to_vec::<u8>()?)?;
            let n = all.len();
            Tensor::from_vec(all, &[n])?
        }
        _ => {
            let what = format!("expects f32 or u8 [n], got {:?} {:?}", local.dtype(), local.shape());
            return Err(Error::invalid("all_gather_tensor", what));
        }
    };
    all.to_device(local.device())
}
