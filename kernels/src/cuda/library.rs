//! Finding the CUDA libraries before cudarc touches them: cudarc panics when a library it calls into is missing, so
//! every entry point asks here first and turns absence into an [`Error`].

use super::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The oldest driver API that the CUDA 13.0 bindings (cudarc's `cuda-13000`) and NVRTC 13 images need.
const MIN_DRIVER_VERSION: i32 = 13000;

/// Ok when the driver library loads and supports CUDA 13.0; checked on every call (it is cheap and nothing is kept).
pub(crate) fn driver() -> Result<()> {
    // SAFETY: dlopen and dlclose of the driver library by its names; none of its functions is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoDriver { detail: "libcuda.so is not on the dynamic loader's search path".into() });
    }
    let mut version = 0;
    // SAFETY: the library is present (above); cuDriverGetVersion needs no cuInit and writes only `version`.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(Error::driver("cuDriverGetVersion"))?;
    if version < MIN_DRIVER_VERSION {
        return Err(Error::DriverTooOld { major: version / 1000, minor: version % 1000 / 10 });
    }
    Ok(())
}

/// Ok when NVRTC can be used. Looks, in order, at `QLORA_NVRTC_LIB` (a path; then nothing else is tried), the dynamic
/// loader's search path, and `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`, `/usr/local/cuda/lib64`. A library found by path
/// is loaded and kept for the process, which is how cudarc, searching by name, then finds it (the loader matches
/// already-loaded libraries by their SONAME, `libnvrtc.so.13`). Decided once per process.
pub fn nvrtc_available() -> Result<()> {
    static STATUS: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATUS.get_or_init(probe_nvrtc).clone().map_err(|detail| Error::NoNvrtc { detail })
}

fn probe_nvrtc() -> std::result::Result<(), String> {
    if let Some(path) = std::env::var_os("QLORA_NVRTC_LIB") {
        let path = PathBuf::from(path);
        return preload(&path).map_err(|e| format!("QLORA_NVRTC_LIB={}: {e}", path.display()));
    }
    // SAFETY: dlopen and dlclose by name; no function is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    let mut tried = vec!["the dynamic loader's search path".to_string()];
    for dir in cuda_lib_dirs() {
        let path = dir.join("libnvrtc.so.13");
        if path.exists() {
            return preload(&path).map_err(|e| format!("{}: {e}", path.display()));
        }
        tried.push(dir.display().to_string());
    }
    Err(format!("looked in {}", tried.join(", ")))
}

/// CUDA's library folders outside the loader's search path: `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
/// `/usr/local/cuda/lib64`.
pub(crate) fn cuda_lib_dirs() -> Vec<PathBuf> {
    let homes = ["CUDA_HOME", "CUDA_PATH"].into_iter().filter_map(std::env::var_os).map(PathBuf::from);
    homes.chain([PathBuf::from("/usr/local/cuda")]).map(|home| home.join("lib64")).collect()
}

/// Loads NVRTC from `lib`, its builtins library first (NVRTC opens `libnvrtc-builtins.so.13.<minor>` by name when it
/// compiles, and finds this copy the same way), and keeps both loaded for the process.
fn preload(lib: &Path) -> std::result::Result<(), String> {
    let dir = lib.parent().ok_or("not a file path")?;
    let builtins = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc-builtins.so.")))
        .ok_or_else(|| format!("no libnvrtc-builtins.so.* beside it in {}", dir.display()))?;
    for path in [builtins.as_path(), lib] {
        // SAFETY: loads NVIDIA's NVRTC libraries, whose initialisers have no preconditions.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        // Never unloaded: cudarc resolves NVRTC's functions from this copy for the rest of the process.
        std::mem::forget(library);
    }
    // SAFETY: dlopen and dlclose by name, which resolves to the library loaded above.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("loaded by path, but its SONAME is not libnvrtc.so.13 (a CUDA 13 NVRTC is needed)".into())
    }
}
