//! The NCCL group: one process per GPU, as torchrun (or `finetune --gpus N`) launches them. Rank 0 draws NCCL's
//! unique id and hands it out through the [`rendezvous`]; every rank then joins the communicator
//! on its GPU (`LOCAL_RANK`).
//!
//! The collectives take host buffers, as [`Communicator`] says: each is copied to the rank's GPU, reduced or gathered
//! there by NCCL, and copied back. NCCL adds in its own order (a ring or a tree, fixed for a given group and size),
//! so a sum is reproducible from run to run on the same machines but not the in-process group's rank-order sum; the
//! trainer gathers per-micro-batch gradients instead of summing them for that reason, and an all-gather moves bytes
//! unchanged.

use super::launch::Launch;
use super::rendezvous::{self, Host, ID_BYTES};
use super::{gather_through_host, Buffer, Communicator, Pending};
use crate::cuda::{buf, contiguous, output};
use crate::storage::CudaElement;
use crate::{DType, Device, Error, Result, Tensor};
use qlora_kernels::cuda::nccl::{self, Elem, NcclComm};
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer};
use std::time::Duration;

/// How long the rendezvous waits for every rank to arrive, and a collective for every rank to join it, unless
/// `QLORA_NCCL_TIMEOUT` gives another number of seconds: PyTorch's default for NCCL groups, long enough for the
/// slowest rank's model load and for rank 0's checkpoint writing, during which the others wait in the next step's
/// first collective.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// This process's rank of an NCCL group.
pub struct NcclRank {
    comm: NcclComm,
}

/// The deadline of the rendezvous and of each collective.
pub fn timeout() -> Result<Duration> {
    match std::env::var("QLORA_NCCL_TIMEOUT") {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(s) if s > 0 => Ok(Duration::from_secs(s)),
            _ => Err(Error::invalid("QLORA_NCCL_TIMEOUT", format!("{text:?} is not a positive number of seconds"))),
        },
    }
}

/// Ok when NCCL's library can be found and loaded; the error says where it was looked for.
pub fn available() -> Result<()> {
    nccl::available().map_err(Error::cuda("nccl"))
}

impl NcclRank {
    /// Joins the group `launch` describes on `device` (the GPU of its `LOCAL_RANK`): rank 0 listens at its rendezvous
    /// address ([`Launch::master`]) and hands out the id, the others connect there.
    pub fn connect(launch: &Launch, device: &CudaDevice) -> Result<NcclRank> {
        let timeout = timeout()?;
        let id: [u8; ID_BYTES] = if launch.world_size == 1 {
            nccl::unique_id().map_err(Error::cuda("nccl unique id"))?
        } else {
            let Some((addr, port)) = &launch.master else {
                return Err(Error::invalid("nccl", "a group of several ranks needs MASTER_ADDR and MASTER_PORT"));
            };
            if launch.rank == 0 {
                let id = nccl::unique_id().map_err(Error::cuda("nccl unique id"))?;
                // Rank 0 listens on every interface: MASTER_ADDR is how the others reach it, not necessarily an
                // address of its own that it could bind (a hostname behind NAT, a load balancer).
                Host::bind("0.0.0.0", *port)?.serve(&id, launch.world_size, timeout)?;
                id
            } else {
                rendezvous::join(addr, *port, launch.rank, launch.world_size, timeout)?
            }
        };
        let comm =
            NcclComm::init(device, &id, launch.rank, launch.world_size, timeout).map_err(Error::cuda("nccl init"))?;
        Ok(NcclRank { comm })
    }

    /// Leaves the group at once after this rank failed ([`NcclComm::abort`]): no wait for collectives that the
    /// other ranks will never join.
    pub fn abort(&self) {
        self.comm.abort();
    }

    fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer<u8>> {
        self.comm.device().upload(bytes).map_err(Error::cuda("nccl"))
    }

    /// `bytes` through the GPU: uploaded, changed in place there by `collective`, and copied back. An empty buffer
    /// needs no collective: every rank passes the same length (the trait's contract), so all skip it together.
    fn in_place(
        &self,
        op: &'static str,
        bytes: &mut [u8],
        collective: impl FnOnce(&mut DeviceBuffer<u8>) -> qlora_kernels::cuda::Result<()>,
    ) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut dev = self.upload(bytes)?;
        collective(&mut dev).map_err(Error::cuda(op))?;
        bytes.copy_from_slice(&dev.to_vec().map_err(Error::cuda(op))?);
        Ok(())
    }

    /// Whether `local` is gathered GPU to GPU: f32 or u8 \[n\], n > 0, on this rank's GPU (another GPU is an error);
    /// anything else goes through the host.
    fn gathers_on_gpu(&self, local: &Tensor) -> Result<bool> {
        let Device::Cuda(_) = local.device() else { return Ok(false) };
        if local.rank() != 1 || local.elem_count() == 0 || !matches!(local.dtype(), DType::F32 | DType::U8) {
            return Ok(false);
        }
        let mine = Device::Cuda(self.comm.device().ordinal());
        if local.device() != mine {
            return Err(Error::DeviceMismatch { op: GATHER, a: mine, b: local.device() });
        }
        Ok(true)
    }
}

/// The name device gathers' errors carry.
const GATHER: &str = "all_gather_tensor";

impl Communicator for NcclRank {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn backend(&self) -> &'static str {
        "NCCL"
    }

    fn all_reduce_sum(&self, buf: Buffer<'_>) -> Result<()> {
        let (bytes, elem): (&mut [u8], Elem) = match buf {
            Buffer::F32(v) => (bytemuck::cast_slice_mut(v), Elem::F32),
            Buffer::F64(v) => (bytemuck::cast_slice_mut(v), Elem::F64),
        };
        self.in_place("all_reduce_sum", bytes, |dev| self.comm.all_reduce_sum(dev, elem))
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.all_gather_bytes(bytemuck::cast_slice(local))?))
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<u8>> {
        if local.is_empty() {
            return Ok(Vec::new());
        }
        let send = self.upload(local)?;
        let mut recv =
            self.comm.device().alloc::<u8>(send.len() * self.world_size()).map_err(Error::cuda("all_gather"))?;
        self.comm.all_gather(&send, &mut recv).map_err(Error::cuda("all_gather"))?;
        recv.to_vec().map_err(Error::cuda("all_gather"))
    }

    fn all_gather_tensor(&self, local: &Tensor) -> Result<Tensor> {
        if !self.gathers_on_gpu(local)? {
            return gather_through_host(self, local);
        }
        // Device to device: a step's gradients and a sharded layer's weights never cross the host.
        fn go<T: CudaElement>(comm: &NcclComm, local: &Tensor) -> Result<Tensor> {
            let send = contiguous(local)?;
            let n = local.elem_count() * comm.world_size();
            let mut recv = comm.device().alloc::<T>(n).map_err(Error::cuda(GATHER))?;
            comm.all_gather(buf::<T>(&send), &mut recv).map_err(Error::cuda(GATHER))?;
            Ok(output(recv, &[n]))
        }
        match local.dtype() {
            DType::F32 => go::<f32>(&self.comm, local),
            _ => go::<u8>(&self.comm, local),
        }
    }

    fn start_all_gather_tensor(&self, local: &Tensor) -> Result<Pending> {
        if !self.gathers_on_gpu(local)? {
            return Ok(Pending::done(gather_through_host(self, local)?));
        }
        fn go<T: CudaElement>(comm: &NcclComm, local: &Tensor) -> Result<Pending> {
            let send = contiguous(local)?;
            let gathering = comm.all_gather_start(buf::<T>(&send)).map_err(Error::cuda(GATHER))?;
            // The send buffer lives until the compute stream waits for the gather: its block is not reused under it.
            // Finished, `ready` has made it wait; dropped unfinished, the fields drop in order, the arrival (which
            // makes it wait) before the buffer.
            struct InFlight<T: CudaElement> {
                gathering: qlora_kernels::cuda::Arrival<T>,
                send: Tensor,
            }
            let in_flight = InFlight { gathering, send };
            Ok(Pending::new(move || {
                let InFlight { gathering, send } = in_flight;
                let recv = gathering.ready().map_err(Error::cuda(GATHER))?;
                drop(send);
                let n = recv.len();
                Ok(output(recv, &[n]))
            }))
        }
        match local.dtype() {
            DType::F32 => go::<f32>(&self.comm, local),
            _ => go::<u8>(&self.comm, local),
        }
    }

    fn broadcast(&self, bytes: &mut [u8], root: usize) -> Result<()> {
        self.in_place("broadcast", bytes, |dev| self.comm.broadcast(dev, root))
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(Buffer::F32(&mut [0.0]))
    }
}
