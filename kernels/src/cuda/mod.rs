//! The CUDA backend: NVRTC-compiled twins of the CPU kernels, a device context, a caching allocator and typed
//! buffers. Everything that touches a raw device pointer lives here; callers see [`CudaDevice`], [`DeviceBuffer`] and
//! one safe launcher per kernel.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): a binary built without CUDA runs anywhere, and a machine
//! without a driver, a GPU or NVRTC gets an [`Error`] from [`CudaDevice::new`], never a panic.
//!
//! - [`source`]: the catalogue of `kernels/cuda/*.cu`, their entry points and `// qlora-rt: hot` markers.
//! - [`compile`]: NVRTC and the target per GPU (sm_90a on Hopper); `cache.rs` puts the on-disk cache of compiled
//!   images in front of it.
//! - [`device`]: [`CudaDevice`], one per GPU per process: context, stream, loaded modules, allocator.
//! - [`alloc`]: the caching allocator and its statistics.
//! - [`buffer`]: [`DeviceBuffer`], typed device memory, and host↔device copies.
//! - [`offload`]: buffers parked in pinned host memory and brought back, on the copy stream.
//! - [`park`]: what a closure left alive (a layer's saved activations) parked likewise until its backward.
//! - [`timing`]: CUDA events on a device's stream, for benchmarks and profiling.
//! - [`nccl`]: NCCL's collectives for data parallelism across processes, the library loaded at run time.
//! - one module per op (`elementwise`, `rms_norm`, `dora`, …): the launchers, each the twin of the CPU function of
//!   the same name in the crate root's module of the same name, and tested against it by `kernels/tests/cuda_*.rs`
//!   (the older ops in `kernels/tests/cuda_parity/<op>.rs`).
//!
//! Streams: each device has one compute stream and every launch and copy goes on it, so a buffer dropped by the host
//! can be handed to the next allocation at once (work for the new owner is queued after all work of the old one). The
//! exceptions are [`offload`]'s copy stream and [`nccl`]'s collectives stream: each waits for the compute stream
//! before it starts, and the compute stream waits for its event before the first use of what it wrote
//! ([`Arrival`]). A launch may overlap the end of the kernel before it (programmatic dependent launch, `launch!`)
//! only where its kernel waits for that one before it touches memory, so the order holds.

pub mod alloc;
mod arrival;
pub mod buffer;
mod cache;
pub mod compile;
pub mod device;
mod error;
mod library;
pub mod source;

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod copy;
pub mod cross_entropy;
pub mod dora;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod matmul;
pub mod nccl;
pub mod nf4;
pub mod offload;
pub mod park;
pub mod reduce;
pub mod rms_norm;
pub mod rope;
pub mod timing;

pub use alloc::{tagged, Category, MemoryStats};
pub use arrival::Arrival;
pub use buffer::{DeviceBuffer, DeviceCopy};
pub use device::{device_count, CudaDevice};
pub use error::{Error, Result};
pub use library::nvrtc_available;
pub use offload::{HostCopy, PinnedStats};

use cudarc::driver::{CudaFunction, LaunchConfig};
use half::bf16;

/// The element types CUDA kernels take as input and output (arithmetic is f32 inside every kernel).
pub trait GpuFloat: DeviceCopy + private::Sealed {
    /// The name of this type's instantiation of a kernel: each `.cu` defines `<op>_f32` and `<op>_bf16`.
    fn pick(f32_kernel: &'static str, bf16_kernel: &'static str) -> &'static str;
}

impl GpuFloat for f32 {
    fn pick(f32_kernel: &'static str, _: &'static str) -> &'static str {
        f32_kernel
    }
}

impl GpuFloat for bf16 {
    fn pick(_: &'static str, bf16_kernel: &'static str) -> &'static str {
        bf16_kernel
    }
}

mod private {
    use cudarc::cublaslt::sys::cudaDataType_t;

    pub trait Sealed {
        /// The type's cuBLASLt name.
        fn blas_type() -> cudaDataType_t;
    }
    impl Sealed for f32 {
        fn blas_type() -> cudaDataType_t {
            cudaDataType_t::CUDA_R_32F
        }
    }
    impl Sealed for half::bf16 {
        fn blas_type() -> cudaDataType_t {
            cudaDataType_t::CUDA_R_16BF
        }
    }
}

/// Threads per block of every launcher: a multiple of the warp for the block reductions, and low enough that no
/// kernel's register count limits it.
const BLOCK: u32 = 256;

/// Blocks for a grid-stride loop over `n` elements: enough to fill any GPU, capped so huge tensors loop instead.
fn grid_for(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32
}

/// Lets `kernel` take `bytes` of dynamic shared memory, past the 48 KiB a launch gets by default.
pub(crate) fn allow_smem(dev: &CudaDevice, module: source::Module, kernel: &'static str, bytes: u32) -> Result<()> {
    // The attribute stays on the function, which lives as long as its device (opened once per process): set once
    // per (device, kernel) and raised only if a launch asks for more, not by a driver call before every launch (a
    // decode step launches attention once per layer).
    type Key = (usize, &'static str);
    static ALLOWED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<Key, u32>>> =
        std::sync::LazyLock::new(Default::default);
    let mut allowed = ALLOWED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = (dev.ordinal(), kernel);
    if allowed.get(&key).is_some_and(|&set| set >= bytes) {
        return Ok(());
    }
    dev.function(module, kernel)?
        .set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(Error::driver("cuFuncSetAttribute"))?;
    allowed.insert(key, bytes);
    Ok(())
}

/// Blocks of `threads` threads of `kernel` that the GPU holds at once, its registers and shared memory permitting:
/// the grid of a kernel that loops over its work in one wave (a second, partial wave would double the time of the
/// blocks in it).
fn resident_blocks(dev: &CudaDevice, module: source::Module, kernel: &'static str, threads: u32) -> Result<u32> {
    resident_blocks_with_smem(dev, module, kernel, threads, 0)
}

/// [`resident_blocks`] of a kernel launched with `smem` bytes of dynamic shared memory (which its caller has allowed
/// past the 48 KiB default where it is more, or the driver counts none fitting).
fn resident_blocks_with_smem(
    dev: &CudaDevice,
    module: source::Module,
    kernel: &'static str,
    threads: u32,
    smem: u32,
) -> Result<u32> {
    // Asked of the driver once per (device, kernel, block size, shared memory): the answer never changes, and launches
    // are hot.
    type Key = (usize, &'static str, u32, u32);
    static KNOWN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<Key, u32>>> =
        std::sync::LazyLock::new(Default::default);
    let key = (dev.ordinal(), kernel, threads, smem);
    if let Some(&blocks) = KNOWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&key) {
        return Ok(blocks);
    }
    let per_multiprocessor = dev
        .function(module, kernel)?
        .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
        .map_err(Error::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
    let blocks = per_multiprocessor.max(1) * dev.multiprocessors().max(1) as u32;
    KNOWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key, blocks);
    Ok(blocks)
}

/// One wave of [`BLOCK`]-thread blocks of `kernel` for `work` items of a thread each (fewer blocks when there is less
/// work): the config of a grid-stride kernel.
fn wave_config(dev: &CudaDevice, module: source::Module, kernel: &'static str, work: usize) -> Result<LaunchConfig> {
    let wanted = work.div_ceil(BLOCK as usize).max(1);
    Ok(config(resident_blocks(dev, module, kernel, BLOCK)?.min(u32::try_from(wanted).unwrap_or(u32::MAX))))
}

/// Whether every address is 16-byte aligned, as the kernels' 16-byte vector paths need (buffers from the allocator
/// always are; the check keeps the scalar paths reachable for anything else).
fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

/// `v` as a 32-bit kernel argument (dimensions and row counts), asserting that it fits.
fn u32_arg(what: &str, v: usize) -> u32 {
    u32::try_from(v).unwrap_or_else(|_| panic!("{what} = {v} does not fit the kernel's 32-bit argument"))
}

/// A 1-D launch of `grid` blocks of [`BLOCK`] threads, no dynamic shared memory.
fn config(grid: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// A multi-tensor launch's table of device words (pointers and lengths) as the bytes to upload: the device reads
/// them as the kernel's little-endian 64-bit struct fields.
fn table_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A multi-tensor launch: a row of blocks (blockIdx.x) per tensor (blockIdx.y), as many as give each thread of the
/// longest tensor's row about 16 elements (at most 1024, so a huge tensor loops instead); the rows of shorter tensors
/// have blocks with nothing to do, which return at once.
fn multi_config(tensors: usize, longest: usize) -> LaunchConfig {
    let per_row = longest.div_ceil(BLOCK as usize * 16).clamp(1, 1024) as u32;
    LaunchConfig {
        grid_dim: (per_row, u32_arg("multi-tensor launch: tensors", tensors), 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The entry point of `$op` for the element type `$t`: every float kernel is defined as `<op>_f32` and `<op>_bf16`.
macro_rules! kernel {
    ($op:literal, $t:ty) => {
        <$t as $crate::cuda::GpuFloat>::pick(concat!($op, "_f32"), concat!($op, "_bf16"))
    };
}
pub(crate) use kernel;

/// Launches entry point `$kernel` of `$module` on `$dev` with `$cfg`, passing the arguments in the kernel's order
/// (device addresses as `u64`, scalars in the kernel's types, `repr(C)` structs by value): the one launch chain
/// every launcher shares. Evaluates to a [`Result`]. It is written inside the caller's `unsafe` block, whose
/// `// SAFETY:` comment states the kernel's signature and why no access leaves its buffers. A module whose kernels
/// wait for the previous one ([`source::Module::waits_for_previous`]) is launched overlapping it where
/// [`CudaDevice::overlapping_launches`] allows.
macro_rules! launch {
    ($dev:expr, $module:expr, $kernel:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {{
        let (dev, module, kernel): (&$crate::cuda::CudaDevice, $crate::cuda::source::Module, &'static str) =
            ($dev, $module, $kernel);
        match dev.function(module, kernel) {
            Err(e) => Err(e),
            Ok(f) => {
                let mut params: Vec<*mut std::ffi::c_void> = Vec::new();
                // Each argument lives in its own binding until the launch has copied it.
                $(let arg = $arg; params.push($crate::cuda::kernel_param(&arg));)+
                let overlap = module.waits_for_previous() && dev.overlapping_launches();
                $crate::cuda::launch_function(dev, kernel, f, $cfg, &mut params, overlap)
            }
        }
    }};
}
pub(crate) use launch;

/// A kernel argument as the driver's parameter array holds it: the address of a value laid out as the kernel reads it.
pub(crate) fn kernel_param<T: cudarc::driver::DeviceRepr>(value: &T) -> *mut std::ffi::c_void {
    (value as *const T).cast_mut().cast()
}

/// Launches `f` on `dev`'s stream. With `overlap`, programmatic stream serialization: the kernel may begin once the
/// previous kernel's blocks have all triggered (`griddepcontrol.launch_dependents`) or exited, so its launch and
/// prologue hide under that kernel's end (decoding runs a chain of small kernels per token), and it waits for that
/// kernel's completion and memory in `griddepcontrol.wait`.
///
/// # Safety
/// `params` holds one address per kernel parameter, of values of the kernel's parameter types, alive for the call;
/// with `overlap`, the kernel waits (`grid_dependency_wait`) in every block before any access to memory an earlier
/// kernel may touch.
pub(crate) unsafe fn launch_function(
    dev: &CudaDevice,
    kernel: &'static str,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
    overlap: bool,
) -> Result<()> {
    use cudarc::driver::sys;
    let stream = dev.stream();
    stream.context().bind_to_thread().map_err(|source| Error::Launch { kernel, source })?;
    // SAFETY: a plain-data union; the member the attribute's id selects is set below.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: u32::from(overlap),
    };
    // SAFETY: the caller's contract; `config` and `attribute` outlive the call, which copies them.
    unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(|source| Error::Launch { kernel, source })
}

/// The one device of an element-wise op's buffers, or None when they are empty (nothing to launch). They must hold as
/// many elements each and live on one device (else a panic: a caller bug).
fn elementwise_device<'a, T: DeviceCopy>(op: &str, buffers: &[&'a DeviceBuffer<T>]) -> Option<&'a CudaDevice> {
    let lens: Vec<usize> = buffers.iter().map(|b| b.len()).collect();
    assert!(lens.iter().all(|&n| n == lens[0]), "{op}: buffers of lengths {lens:?}");
    let devices: Vec<&CudaDevice> = buffers.iter().map(|b| b.device()).collect();
    let dev = same_device(op, &devices);
    (lens[0] > 0).then_some(dev)
}

/// The one device all of an op's buffers live on; panics when they differ (a caller bug, like a length mismatch).
fn same_device<'a>(op: &str, devices: &[&'a CudaDevice]) -> &'a CudaDevice {
    let first = devices[0];
    if let Some(other) = devices.iter().find(|d| !d.is(first)) {
        panic!("{op}: buffers on cuda:{} and cuda:{}", first.ordinal(), other.ordinal());
    }
    first
}
