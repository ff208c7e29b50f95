//! [`CudaDevice`]: one GPU as this process uses it: its primary context, its compute stream (and a copy stream for
//! offloading, made on first use), the kernel modules loaded on it, its caching allocator and its pinned host pool.
//! Opened once per process per ordinal; clones share it.

use super::alloc::{Backing, CachingAllocator, MemoryStats};
use super::buffer::{DeviceBuffer, DeviceCopy};
use super::cache::load_or_compile;
use super::compile::{self, Image, Target};
use super::matmul::BlasLt;
use super::offload::{new_copy_stream, PinnedMemory, PinnedPool, PinnedStats};
use super::source::Module;
use super::{library, Error, Result};
use cudarc::driver::{result as driver, sys, CudaContext, CudaFunction, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// Number of CUDA devices visible to this process; an error when no usable driver is installed.
pub fn device_count() -> Result<usize> {
    library::driver()?;
    match driver::init() {
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => return Ok(0),
        r => r.map_err(Error::driver("cuInit"))?,
    }
    let count = CudaContext::device_count().map_err(Error::driver("cuDeviceGetCount"))?;
    Ok(count.max(0) as usize)
}

#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

struct Inner {
    ordinal: usize,
    name: String,
    capability: (u32, u32),
    /// Threads resident at once: multiprocessors × threads per multiprocessor.
    resident_threads: usize,
    /// Streaming multiprocessors.
    multiprocessors: usize,
    target: Target,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: [OnceLock<LoadedModule>; Module::ALL.len()],
    /// Serialises module loading, so a module is compiled and loaded once even when threads race for it.
    loading: Mutex<()>,
    allocator: CachingAllocator<DriverMemory>,
    /// Made by the first GEMM (under `loading`, like the modules).
    blas: OnceLock<BlasLt>,
    /// The second stream, for copies to and from pinned host memory (`offload`), made by the first one.
    copies: OnceLock<Arc<CudaStream>>,
    pinned: PinnedPool,
    /// Host waits for the stream so far (synchronize and every device-to-host read): the execution contract of a
    /// training step bounds them, and tests count them.
    syncs: std::sync::atomic::AtomicU64,
}

struct LoadedModule {
    /// Every entry point of the source; each function keeps its module loaded.
    functions: HashMap<&'static str, CudaFunction>,
}

/// Devices opened so far, by ordinal.
static DEVICES: Mutex<Vec<Option<CudaDevice>>> = Mutex::new(Vec::new());

impl CudaDevice {
    /// The device `cuda:{ordinal}`, opened on first use: checks the driver, the GPU and NVRTC, so that a missing
    /// piece is reported here (for `--device cuda`) rather than at the first kernel.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let mut devices = DEVICES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(Some(device)) = devices.get(ordinal) {
            return Ok(device.clone());
        }
        let device = Self::open(ordinal)?;
        if devices.len() <= ordinal {
            devices.resize(ordinal + 1, None);
        }
        devices[ordinal] = Some(device.clone());
        Ok(device)
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::driver("cuDevicePrimaryCtxRetain"))?;
        let name = ctx.name().map_err(Error::driver("cuDeviceGetName"))?;
        let (major, minor) = ctx.compute_capability().map_err(Error::driver("cuDeviceGetAttribute"))?;
        let (major, minor) = (major as u32, minor as u32);
        let attribute = |a| ctx.attribute(a).map_err(Error::driver("cuDeviceGetAttribute"));
        let multiprocessors = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let resident_threads = multiprocessors
            * attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)? as usize;
        let target = Target::for_gpu(major, minor, &compile::supported_archs()?)
            .ok_or_else(|| Error::UnsupportedGpu { ordinal, name: name.clone(), major, minor })?;
        let stream = ctx.new_stream().map_err(Error::driver("cuStreamCreate"))?;
        let allocator = CachingAllocator::new(DriverMemory { ordinal, ctx: ctx.clone(), stream: stream.clone() });
        let pinned = CachingAllocator::new(PinnedMemory { ordinal, ctx: ctx.clone() });
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                ordinal,
                name,
                capability: (major, minor),
                resident_threads,
                multiprocessors,
                target,
                ctx,
                stream,
                modules: std::array::from_fn(|_| OnceLock::new()),
                loading: Mutex::new(()),
                allocator,
                blas: OnceLock::new(),
                copies: OnceLock::new(),
                pinned,
                syncs: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// The product name (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn compute_capability(&self) -> (u32, u32) {
        self.inner.capability
    }

    /// Threads the GPU holds at once (132 multiprocessors × 2048 on an H100 SXM or H200): one wave of a grid-stride
    /// kernel whose blocks all fit.
    pub fn resident_threads(&self) -> usize {
        self.inner.resident_threads
    }

    /// Streaming multiprocessors (132 on an H100 SXM or H200).
    pub fn multiprocessors(&self) -> usize {
        self.inner.multiprocessors
    }

    /// What the kernels are compiled for on this device (`sm_90a` on Hopper).
    pub fn target(&self) -> Target {
        self.inner.target
    }

    /// Whether launches of kernels that wait for the previous one ([`Module::waits_for_previous`]) overlap it
    /// (programmatic dependent launch): where the kernels are compiled for sm_90 or newer, so that they carry
    /// `griddepcontrol`. `QLORA_PDL=0` turns it off, to measure what it gains or to rule it out.
    pub fn overlapping_launches(&self) -> bool {
        static ENABLED: std::sync::LazyLock<bool> =
            std::sync::LazyLock::new(|| std::env::var("QLORA_PDL").map_or(true, |v| v.trim() != "0"));
        *ENABLED && self.inner.target.arch >= 90
    }

    /// `len` elements with unspecified values (every element must be written before it is read as data).
    pub fn alloc<T: DeviceCopy>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        DeviceBuffer::uninit(self, len)
    }

    pub fn zeros<T: DeviceCopy>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(len)?;
        buf.zero()?;
        Ok(buf)
    }

    /// A buffer holding a copy of `values`.
    pub fn upload<T: DeviceCopy>(&self, values: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(values.len())?;
        buf.copy_from_host(values)?;
        Ok(buf)
    }

    /// Waits until all work queued on this device has finished; reports a fault of any earlier kernel.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.stream.synchronize().map_err(Error::driver("cuStreamSynchronize"))
    }

    /// How many times the host has waited for this device's stream (explicit synchronisations and reads back)
    /// since it was opened.
    pub fn synchronizations(&self) -> u64 {
        self.inner.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn memory_stats(&self) -> MemoryStats {
        self.inner.allocator.stats()
    }

    /// Pinned host memory held by offloaded buffers and cached for more.
    pub fn pinned_stats(&self) -> PinnedStats {
        let s = self.inner.pinned.stats();
        PinnedStats { in_use: s.current, reserved: s.reserved }
    }

    /// Returns the allocator's cached blocks, device and pinned host, to the driver (for other processes, or before
    /// measuring).
    pub fn empty_cache(&self) -> Result<()> {
        self.inner.allocator.empty_cache()?;
        self.inner.pinned.empty_cache()
    }

    /// (free, total) bytes of device memory, as the driver sees it.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.inner.allocator.backing().mem_info()
    }

    /// The kernel `name` of `module`, compiling and loading the module on first use.
    pub(crate) fn function(&self, module: Module, name: &'static str) -> Result<&CudaFunction> {
        self.module(module)?.functions.get(name).ok_or(Error::MissingKernel { module: module.name(), name })
    }

    /// This device's cuBLASLt handle and workspace, made on first use.
    pub(crate) fn blas_lt(&self) -> Result<&BlasLt> {
        if let Some(blas) = self.inner.blas.get() {
            return Ok(blas);
        }
        let _guard = self.inner.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(blas) = self.inner.blas.get() {
            return Ok(blas);
        }
        let blas = BlasLt::new(self)?;
        Ok(self.inner.blas.get_or_init(|| blas))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The copy stream, made on first use (under `loading`, like the modules).
    pub(crate) fn copy_stream(&self) -> Result<&Arc<CudaStream>> {
        if let Some(stream) = self.inner.copies.get() {
            return Ok(stream);
        }
        let _guard = self.inner.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(stream) = self.inner.copies.get() {
            return Ok(stream);
        }
        let stream = new_copy_stream(self)?;
        Ok(self.inner.copies.get_or_init(|| stream))
    }

    pub(crate) fn pinned_pool(&self) -> &PinnedPool {
        &self.inner.pinned
    }

    pub(crate) fn cu_stream(&self) -> sys::CUstream {
        self.inner.stream.cu_stream()
    }

    pub(crate) fn allocator(&self) -> &CachingAllocator<DriverMemory> {
        &self.inner.allocator
    }

    /// Makes this device's context current on the calling thread (raw driver calls need it).
    pub(crate) fn bind(&self) -> Result<()> {
        self.inner.ctx.bind_to_thread().map_err(Error::driver("cuCtxSetCurrent"))
    }

    /// True when both handles are the same device.
    pub(crate) fn is(&self, other: &CudaDevice) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn module(&self, module: Module) -> Result<&LoadedModule> {
        let slot = &self.inner.modules[module as usize];
        if let Some(loaded) = slot.get() {
            return Ok(loaded);
        }
        let _guard = self.inner.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(loaded) = slot.get() {
            return Ok(loaded);
        }
        let loaded = self.load(module)?;
        Ok(slot.get_or_init(|| loaded))
    }

    fn load(&self, module: Module) -> Result<LoadedModule> {
        let image = match load_or_compile(module, self.inner.target)? {
            Image::Cubin(bytes) => Ptx::from_binary(bytes),
            Image::Ptx(text) => Ptx::from_src(text),
        };
        let loaded = self.inner.ctx.load_module(image).map_err(Error::driver("cuModuleLoadData"))?;
        let functions = module
            .entry_points()
            .into_iter()
            .map(|name| Ok((name, loaded.load_function(name).map_err(Error::driver("cuModuleGetFunction"))?)))
            .collect::<Result<_>>()?;
        Ok(LoadedModule { functions })
    }
}

impl fmt::Display for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda:{} ({}, {})", self.inner.ordinal, self.inner.name, self.inner.target)
    }
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaDevice({self})")
    }
}

/// The allocator's backing: plain `cuMemAlloc` / `cuMemFree` on the device's context.
pub(crate) struct DriverMemory {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Backing for DriverMemory {
    fn alloc(&self, bytes: usize) -> Result<Option<u64>> {
        self.ctx.bind_to_thread().map_err(Error::driver("cuCtxSetCurrent"))?;
        // SAFETY: a plain allocation in the current context; the memory is handed out as uninitialised bytes, which
        // every DeviceCopy type may hold.
        match unsafe { driver::malloc_sync(bytes) } {
            Ok(ptr) => Ok(Some(ptr)),
            Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => Ok(None),
            Err(e) => Err(Error::Driver { op: "cuMemAlloc", source: e }),
        }
    }

    fn free(&self, ptr: u64) -> Result<()> {
        self.ctx.bind_to_thread().map_err(Error::driver("cuCtxSetCurrent"))?;
        // SAFETY: `ptr` came from malloc_sync above and is freed once (the allocator drops it from its lists); the
        // allocator synchronized the stream first, so no queued work uses it.
        unsafe { driver::free_sync(ptr) }.map_err(Error::driver("cuMemFree"))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(Error::driver("cuStreamSynchronize"))
    }

    fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(Error::driver("cuMemGetInfo"))
    }

    fn ordinal(&self) -> usize {
        self.ordinal
    }
}
