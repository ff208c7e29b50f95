//! NCCL, loaded at run time like the other CUDA libraries: the handful of entry points data parallelism needs
//! (unique id, communicator, all-reduce, all-gather, broadcast, error state), bound by hand from `libnccl.so.2`.
//!
//! Why not cudarc's `nccl` module: its loader looks for `libnccl.so` and versioned names NCCL does not use, never
//! `libnccl.so.2` (NCCL's SONAME, the one file a runtime package or PyTorch's `nvidia-nccl` wheel installs), and it
//! panics when the library is missing. Here the library is found as `open_library` says, and absence is an
//! [`Error::NoNccl`] naming where it looked.
//!
//! Every collective runs on the communicator's own stream (as PyTorch's NCCL groups do), after the work queued on the
//! device's compute stream so far (its inputs, and the previous owners of its output blocks). Most are waited for
//! with a deadline (`NcclComm::wait`): a rank that died or never called the same collective turns into an error on
//! the others (the communicator is aborted) instead of a hang. [`NcclComm::all_gather_start`] is not: its result
//! arrives under compute ([`Arrival::ready`] makes the compute stream, not the host, wait for it), and a broken
//! group surfaces at the next waited collective, whose deadline covers the stream's earlier work too.

use super::arrival::Arrival;
use super::buffer::{DeviceBuffer, DeviceCopy};
use super::{CudaDevice, Error, Result};
use cudarc::driver::CudaStream;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `ncclUniqueId`: what rank 0 draws and every rank passes to [`NcclComm::init`].
pub const UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

type Comm = *mut c_void;
type NcclResult = c_int;
const NCCL_SUCCESS: NcclResult = 0;
const NCCL_IN_PROGRESS: NcclResult = 7;
const NCCL_SUM: c_int = 0;

/// The element types the collectives move (`ncclDataType_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    U8 = 1,
    F32 = 7,
    F64 = 8,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::U8 => 1,
            Elem::F32 => 4,
            Elem::F64 => 8,
        }
    }
}

/// The entry points, resolved once per process from the library that [`library`] loaded.
struct Api {
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    #[allow(clippy::type_complexity)]
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> NcclResult,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> NcclResult,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> NcclResult,
}

/// Opens the library, looking in order at `QLORA_NCCL_LIB` (a path; nothing else is tried then), the dynamic
/// loader's search path (`libnccl.so.2`, then the development symlink `libnccl.so`), CUDA's folders
/// ([`super::library::cuda_lib_dirs`]), an active conda environment's `lib` (conda-forge's `nccl`), and the
/// `nvidia/nccl/lib` folder of Python installs (a virtualenv or conda prefix, the user's site-packages, the system's
/// site- and dist-packages), where PyTorch's wheels put it; the library and where it was found. The first found is
/// the one: another of the same soname could not be loaded beside it.
fn open_library() -> std::result::Result<(libloading::Library, PathBuf), String> {
    // SAFETY (every `Library::new` below): loads NVIDIA's NCCL, whose initialisers have no preconditions.
    let open = |path: PathBuf| match unsafe { libloading::Library::new(&path) } {
        Ok(lib) => Ok((lib, path)),
        Err(e) => Err(format!("{}: {e}", path.display())),
    };
    if let Some(path) = std::env::var_os("QLORA_NCCL_LIB") {
        return open(PathBuf::from(path));
    }
    for name in ["libnccl.so.2", "libnccl.so"] {
        if let Ok(found) = open(PathBuf::from(name)) {
            return Ok(found);
        }
    }
    let mut dirs = super::library::cuda_lib_dirs();
    dirs.extend(std::env::var_os("CONDA_PREFIX").map(|p| PathBuf::from(p).join("lib")));
    dirs.extend(python_nccl_dirs());
    if let Some(path) = dirs.iter().map(|dir| dir.join("libnccl.so.2")).find(|path| path.exists()) {
        return open(path);
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(format!("not on the dynamic loader's search path, nor in {}", looked.join(", ")))
}

/// `nvidia/nccl/lib` under every Python library folder of the usual prefixes.
fn python_nccl_dirs() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> =
        ["VIRTUAL_ENV", "CONDA_PREFIX"].into_iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    let mut dirs = Vec::new();
    for lib in prefixes.iter().map(|p| p.join("lib")) {
        let Ok(entries) = std::fs::read_dir(&lib) else { continue };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
            .collect();
        pythons.sort();
        for python in pythons {
            for packages in ["site-packages", "dist-packages"] {
                dirs.push(python.join(packages).join("nvidia/nccl/lib"));
            }
        }
    }
    dirs
}

/// The library, loaded once per process and kept for it.
fn library() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| open_library().and_then(|(lib, path)| load(lib, &path)))
        .as_ref()
        .map_err(|detail| Error::NoNccl { detail: detail.clone() })
}

/// Ok when the library can be found and loaded (what `finetune --gpus N` checks before launching its ranks).
pub fn available() -> Result<()> {
    library().map(|_| ())
}

/// The entry points of `lib` (found at `path`, for messages), once its version is known to be new enough.
fn load(lib: libloading::Library, path: &Path) -> std::result::Result<Api, String> {
    // Never unloaded: the function pointers below stay valid for the rest of the process.
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    macro_rules! symbol {
        ($name:literal) => {
            // SAFETY: the symbol's type is NCCL's C signature for it (nccl.h, stable since NCCL 2.0).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{}: no {} ({e})", path.display(), $name))?
        };
    }
    let api = Api {
        get_version: symbol!("ncclGetVersion"),
        get_unique_id: symbol!("ncclGetUniqueId"),
        comm_init_rank: symbol!("ncclCommInitRank"),
        comm_destroy: symbol!("ncclCommDestroy"),
        comm_abort: symbol!("ncclCommAbort"),
        comm_get_async_error: symbol!("ncclCommGetAsyncError"),
        get_error_string: symbol!("ncclGetErrorString"),
        all_reduce: symbol!("ncclAllReduce"),
        all_gather: symbol!("ncclAllGather"),
        broadcast: symbol!("ncclBroadcast"),
    };
    let mut version = 0;
    // SAFETY: writes one int.
    let status = unsafe { (api.get_version)(&mut version) };
    if status != NCCL_SUCCESS || version < 21800 {
        return Err(format!("{}: NCCL {version} is too old (2.18 or newer is needed)", path.display()));
    }
    Ok(api)
}

fn check(api: &Api, op: &'static str, status: NcclResult) -> Result<()> {
    if status == NCCL_SUCCESS {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
    let message = unsafe { CStr::from_ptr((api.get_error_string)(status)) }.to_string_lossy().into_owned();
    Err(Error::Nccl { op, detail: format!("{message} (code {status})") })
}

/// A new unique id (rank 0 draws it and hands it to the others through a rendezvous).
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    let api = library()?;
    let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: writes the 128-byte id.
    check(api, "ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's communicator on one GPU. Collectives are issued one at a time (a mutex): NCCL requires every rank to
/// issue them in the same order, which concurrent callers could not promise.
pub struct NcclComm {
    /// Null once aborted.
    comm: Mutex<Comm>,
    device: CudaDevice,
    /// Where the collectives run.
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    /// How long a collective may take before the group is declared broken.
    timeout: Duration,
}

// SAFETY: the communicator handle is used under the mutex only, one call at a time, with the device's context bound;
// NCCL allows a communicator to be used from any thread.
unsafe impl Send for NcclComm {}
// SAFETY: as above.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the group of `world_size` ranks that share `id`, as `rank`, on `device`. Blocks until every rank has
    /// called it. `NCCL_NVLS_ENABLE` is set to 0 unless the environment already says otherwise: NVLink multicast is
    /// forbidden on the machines this is run on, and buys nothing for the buffers data parallelism moves. (The
    /// `qlora-rt` binary sets it first thing, while it has one thread; here it covers a library's caller.)
    pub fn init(
        device: &CudaDevice,
        id: &[u8; UNIQUE_ID_BYTES],
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<NcclComm> {
        let api = library()?;
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        let bad = |what: String| Error::Nccl { op: "ncclCommInitRank", detail: what };
        let ranks = c_int::try_from(world_size).map_err(|_| bad(format!("{world_size} ranks")))?;
        let me = c_int::try_from(rank).ok().filter(|&r| r < ranks).ok_or_else(|| bad(format!("rank {rank}")))?;
        device.bind()?;
        let mut comm: Comm = std::ptr::null_mut();
        let id = UniqueId { internal: id.map(|b| b as c_char) };
        // SAFETY: `comm` receives the handle; the id is passed by value as nccl.h declares; the device's context is
        // current, so the communicator is made on its GPU.
        check(api, "ncclCommInitRank", unsafe { (api.comm_init_rank)(&mut comm, ranks, id, me) })?;
        let stream = device.stream().context().new_stream().map_err(Error::driver("cuStreamCreate"))?;
        Ok(NcclComm { comm: Mutex::new(comm), device: device.clone(), stream, rank, world_size, timeout })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// Leaves the group at once, for a rank that failed: ncclCommAbort, which does not wait for the queued
    /// collectives (the destroy on drop would, and those the other ranks never join would hold this process up to
    /// its end); the peers' collectives then fail rather than wait out their deadlines. Later calls fail.
    pub fn abort(&self) {
        let mut comm = self.comm.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let (false, Ok(api)) = (comm.is_null(), library()) {
            // SAFETY: the handle was made by ncclCommInitRank and not yet aborted; it is forgotten here, so that
            // neither a later call nor Drop uses it again.
            unsafe { (api.comm_abort)(*comm) };
            *comm = std::ptr::null_mut();
        }
    }

    /// Element-wise sum over the ranks, in place: `buf` holds `buf.len() / elem size` elements of `elem`.
    pub fn all_reduce_sum(&self, buf: &mut DeviceBuffer<u8>, elem: Elem) -> Result<()> {
        let count = self.elements(buf.len(), elem)?;
        let (ptr, stream) = (buf.ptr() as *mut c_void, self.stream.cu_stream() as *mut c_void);
        self.collective("ncclAllReduce", |api, comm| {
            // SAFETY: in-place reduction of `count` elements of `elem` in `buf`, a live buffer of this device, on
            // its stream.
            unsafe { (api.all_reduce)(ptr, ptr, count, elem as c_int, NCCL_SUM, comm, stream) }
        })
    }

    /// Every rank's `send` (the same length everywhere) into `recv` (world_size times as long), in rank order; the
    /// bytes move unchanged.
    pub fn all_gather<T: DeviceCopy>(&self, send: &DeviceBuffer<T>, recv: &mut DeviceBuffer<T>) -> Result<()> {
        let issue = self.gather_into(send, recv)?;
        self.collective("ncclAllGather", issue)
    }

    /// [`NcclComm::all_gather`] into a new buffer, started without waiting: the host goes on while the gather runs
    /// on the communicator's stream, and [`Arrival::ready`] hands the buffer out once the compute stream waits
    /// for it. `send` must stay allocated until then (its block's next owner could otherwise overwrite it first).
    pub fn all_gather_start<T: DeviceCopy>(&self, send: &DeviceBuffer<T>) -> Result<Arrival<T>> {
        let mut recv = self.device.alloc::<T>(send.len() * self.world_size)?;
        let issue = self.gather_into(send, &mut recv)?;
        self.issue("ncclAllGather", issue)?;
        let done = self.stream.record_event(None).map_err(Error::driver("cuEventRecord"))?;
        Ok(Arrival::new(recv, done))
    }

    /// The all-gather of `send` into `recv` (lengths checked), to be issued.
    fn gather_into<T: DeviceCopy>(
        &self,
        send: &DeviceBuffer<T>,
        recv: &mut DeviceBuffer<T>,
    ) -> Result<impl FnOnce(&Api, Comm) -> NcclResult> {
        if recv.len() != send.len() * self.world_size {
            return Err(Error::Nccl {
                op: "ncclAllGather",
                detail: format!("{} elements gathered into {} for {} ranks", send.len(), recv.len(), self.world_size),
            });
        }
        let (src, dst) = (send.ptr() as *const c_void, recv.ptr() as *mut c_void);
        let (count, stream) = (send.len() * std::mem::size_of::<T>(), self.stream.cu_stream() as *mut c_void);
        // SAFETY: `count` bytes from `send` and world_size · count bytes into `recv` (lengths checked above), both
        // live buffers of this device (the caller keeps them so until the gather is done), on the collectives'
        // stream.
        Ok(move |api: &Api, comm| unsafe { (api.all_gather)(src, dst, count, Elem::U8 as c_int, comm, stream) })
    }

    /// Rank `root`'s bytes into every rank's `buf`.
    pub fn broadcast(&self, buf: &mut DeviceBuffer<u8>, root: usize) -> Result<()> {
        let root = c_int::try_from(root).ok().filter(|&r| (r as usize) < self.world_size).ok_or_else(|| {
            Error::Nccl { op: "ncclBroadcast", detail: format!("root {root} of {} ranks", self.world_size) }
        })?;
        let (ptr, count, stream) = (buf.ptr() as *mut c_void, buf.len(), self.stream.cu_stream() as *mut c_void);
        self.collective("ncclBroadcast", |api, comm| {
            // SAFETY: in place, `count` bytes of a live buffer of this device, on its stream.
            unsafe { (api.broadcast)(ptr, ptr, count, Elem::U8 as c_int, root, comm, stream) }
        })
    }

    fn elements(&self, bytes: usize, elem: Elem) -> Result<usize> {
        if bytes % elem.size() != 0 {
            return Err(Error::Nccl { op: "ncclAllReduce", detail: format!("{bytes} bytes are not whole {elem:?}s") });
        }
        Ok(bytes / elem.size())
    }

    /// Issues one collective and waits for it with the deadline.
    fn collective(&self, op: &'static str, issue: impl FnOnce(&Api, Comm) -> NcclResult) -> Result<()> {
        let mut comm = self.issue_locked(op, issue)?;
        self.wait(library()?, &mut comm, op)
    }

    /// Issues one collective on the collectives' stream, after the compute stream's work so far.
    fn issue(&self, op: &'static str, issue: impl FnOnce(&Api, Comm) -> NcclResult) -> Result<()> {
        self.issue_locked(op, issue).map(drop)
    }

    fn issue_locked(
        &self,
        op: &'static str,
        issue: impl FnOnce(&Api, Comm) -> NcclResult,
    ) -> Result<std::sync::MutexGuard<'_, Comm>> {
        let api = library()?;
        let comm = self.comm.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if comm.is_null() {
            let detail = format!("rank {}: the group broke in an earlier collective", self.rank);
            return Err(Error::Nccl { op, detail });
        }
        self.device.bind()?;
        self.stream.join(self.device.stream()).map_err(Error::driver("cuStreamWaitEvent"))?;
        check(api, op, issue(api, *comm))?;
        Ok(comm)
    }

    /// Waits for the stream, checking NCCL's asynchronous error state as it goes; past the deadline, or on an
    /// error, the communicator is aborted (so that no later call hangs on it) and the error names the collective.
    fn wait(&self, api: &Api, comm: &mut Comm, op: &'static str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: a query of the collectives' live stream, its context bound by the caller. Everything queued there
            // before (gathers started without waiting) is covered by the same deadline.
            match unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) } {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => return self.device.synchronize(),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                failed => {
                    return Err(Error::Driver { op: "cuStreamQuery", source: cudarc::driver::DriverError(failed) })
                }
            }
            let mut state = NCCL_SUCCESS;
            // SAFETY: reads the communicator's error state into `state`.
            check(api, "ncclCommGetAsyncError", unsafe { (api.comm_get_async_error)(*comm, &mut state) })?;
            let broken = state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS;
            if broken || Instant::now() >= deadline {
                // SAFETY: aborts this communicator (which frees it); the handle is forgotten, so that later calls
                // fail at once and Drop does not destroy it again.
                unsafe { (api.comm_abort)(*comm) };
                *comm = std::ptr::null_mut();
                let why = if broken {
                    check(api, op, state).err().map_or_else(String::new, |e| e.to_string())
                } else {
                    format!(
                        "no answer from the other ranks within {:?} (a rank died or called another collective)",
                        self.timeout
                    )
                };
                return Err(Error::Nccl { op, detail: format!("rank {} of {}: {why}", self.rank, self.world_size) });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let comm = *self.comm.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let (false, Ok(api)) = (comm.is_null(), library()) {
            // SAFETY: the handle was made by ncclCommInitRank, was not aborted, and is destroyed once.
            unsafe { (api.comm_destroy)(comm) };
        }
    }
}
