//! NVRTC: compiling a [`Module`] for a [`Target`], and the choice of target for a GPU. The on-disk cache in front of
//! it is `cache.rs`'s, which calls into this file and never the other way.

use super::library::nvrtc_available;
use super::source::Module;
use super::{Error, Result};
use cudarc::nvrtc::{result, sys};
use std::ffi::{c_char, CString};
use std::fmt;

/// What NVRTC produces: machine code for one GPU generation, or PTX that the driver compiles at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    Cubin,
    Ptx,
}

/// An NVRTC `--gpu-architecture`: `sm_90a` (cubin, Hopper's arch-specific features), `compute_80` (PTX).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// Compute capability as major·10 + minor (90 for 9.0).
    pub arch: u32,
    /// The `a` variant: instructions of this generation only (wgmma, setmaxnreg on sm_90a); runs on no other.
    pub arch_specific: bool,
    pub output: Output,
}

impl Target {
    /// Whether NVRTC can compile `module` for this target (PTX or cubin).
    pub fn compiles(self, module: Module) -> bool {
        module.arch_specific_only().is_none_or(|arch| self.arch == arch && self.arch_specific)
    }

    /// The target a GPU of compute capability `major.minor` loads, given the archs this NVRTC knows
    /// ([`supported_archs`]): sm_90a on Hopper, the GPU's own sm_XY elsewhere, and for a GPU newer than NVRTC, PTX for
    /// compute_80 that the driver compiles. None below 8.0 (the kernels' bf16 conversions need sm_80).
    pub fn for_gpu(major: u32, minor: u32, supported: &[u32]) -> Option<Target> {
        let arch = major * 10 + minor;
        if arch < 80 {
            return None;
        }
        Some(if supported.contains(&arch) {
            Target { arch, arch_specific: arch == 90, output: Output::Cubin }
        } else {
            Target { arch: 80, arch_specific: false, output: Output::Ptx }
        })
    }

    /// NVRTC's options for this target. Precise division and square root and no flush-to-zero (NVRTC's defaults,
    /// written out): the kernels are twins of IEEE CPU code. Contraction into fused multiply-adds stays on; kernels
    /// whose contract is bit-equality with the CPU round each operation explicitly (`__fmul_rn`).
    pub fn options(self) -> Vec<String> {
        vec![
            format!("--gpu-architecture={self}"),
            "--std=c++17".into(),
            "--ftz=false".into(),
            "--prec-div=true".into(),
            "--prec-sqrt=true".into(),
            "-lineinfo".into(),
        ]
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.output {
            Output::Cubin => "sm",
            Output::Ptx => "compute",
        };
        write!(f, "{kind}_{}{}", self.arch, if self.arch_specific { "a" } else { "" })
    }
}

/// A compiled module, ready for `cuModuleLoadData`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Image {
    Cubin(Vec<u8>),
    Ptx(String),
}

/// [`compile`]'s result: the image and NVRTC's log (warnings; empty for a clean compile).
#[derive(Debug)]
pub struct Compiled {
    pub image: Image,
    pub log: String,
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the call writes the two ints it is given.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(nvrtc_error("nvrtcVersion"))?;
    Ok((major, minor))
}

/// The real architectures this NVRTC compiles for (75, 80, …, 90, 100, …).
pub fn supported_archs() -> Result<Vec<u32>> {
    nvrtc_available()?;
    let mut n = 0;
    // SAFETY: NVRTC is loaded; the call writes the count.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }.result().map_err(nvrtc_error("nvrtcGetNumSupportedArchs"))?;
    let mut archs = vec![0i32; n.max(0) as usize];
    // SAFETY: `archs` holds the `n` ints the call writes.
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(nvrtc_error("nvrtcGetSupportedArchs"))?;
    Ok(archs.into_iter().map(|a| a as u32).collect())
}

/// Compiles `module` for `target` with NVRTC (no cache).
pub fn compile(module: Module, target: Target) -> Result<Compiled> {
    nvrtc_available()?;
    let source = CString::new(module.source()).expect("a .cu source has no NUL byte");
    let name = CString::new(format!("{}.cu", module.name())).expect("module names have no NUL byte");
    let program = Program(result::create_program(&source, Some(&name)).map_err(nvrtc_error("nvrtcCreateProgram"))?);
    // SAFETY: `program` was created above and is destroyed only by its Drop, after these calls.
    let compiled = unsafe { result::compile_program(program.0, &target.options()) };
    // SAFETY: as above; the log exists whether or not compilation succeeded.
    let log = unsafe { result::get_program_log(program.0) }.map_err(nvrtc_error("nvrtcGetProgramLog"))?;
    let log = c_text(&log);
    if compiled.is_err() {
        return Err(Error::Compile { module: module.name(), target: target.to_string(), log });
    }
    let image = match target.output {
        Output::Ptx => {
            // SAFETY: as above; compiled successfully.
            let ptx = unsafe { result::get_ptx(program.0) }.map_err(nvrtc_error("nvrtcGetPTX"))?;
            Image::Ptx(c_text(&ptx))
        }
        Output::Cubin => {
            let mut size = 0usize;
            // SAFETY: as above; compiled for a real architecture, so a cubin exists; the call writes `size`.
            unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }
                .result()
                .map_err(nvrtc_error("nvrtcGetCUBINSize"))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` holds the `size` bytes the call writes.
            unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast::<c_char>()) }
                .result()
                .map_err(nvrtc_error("nvrtcGetCUBIN"))?;
            Image::Cubin(cubin)
        }
    };
    Ok(Compiled { image, log })
}

/// Destroys the NVRTC program when dropped.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here. A failure leaks one program; nothing to do.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn nvrtc_error(op: &'static str) -> impl FnOnce(result::NvrtcError) -> Error {
    move |e| Error::Nvrtc { op, detail: format!("{e:?}") }
}

/// NVRTC's NUL-terminated text as a String.
fn c_text(bytes: &[c_char]) -> String {
    let bytes: Vec<u8> = bytes.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_modules_compile_for_sm_90a_only() {
        let target = |arch, arch_specific| Target { arch, arch_specific, output: Output::Ptx };
        for m in Module::ALL {
            let hopper = m.arch_specific_only() == Some(90);
            assert_eq!(hopper, m.source().contains("wgmma.mma_async"), "{}", m.name());
            assert!(target(90, true).compiles(m), "{}", m.name());
            assert_eq!(target(90, false).compiles(m), !hopper, "{}", m.name());
            assert_eq!(target(80, false).compiles(m), !hopper, "{}", m.name());
        }
    }

    /// NVRTC 13.0's list.
    const SUPPORTED: [u32; 11] = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120];

    #[test]
    fn target_per_gpu() {
        let t = |major, minor| Target::for_gpu(major, minor, &SUPPORTED).map(|t| t.to_string());
        assert_eq!(t(9, 0).as_deref(), Some("sm_90a"), "Hopper gets its arch-specific features");
        assert_eq!(t(8, 0).as_deref(), Some("sm_80"));
        assert_eq!(t(8, 6).as_deref(), Some("sm_86"));
        assert_eq!(t(12, 0).as_deref(), Some("sm_120"));
        assert_eq!(t(13, 5).as_deref(), Some("compute_80"), "newer than NVRTC: PTX the driver compiles");
        assert_eq!(t(7, 5), None, "no bf16 conversions before sm_80");
    }

    #[test]
    fn options_name_the_target() {
        let t = Target { arch: 90, arch_specific: true, output: Output::Ptx };
        assert_eq!(t.options()[0], "--gpu-architecture=compute_90a");
    }

    #[test]
    fn nvrtc_text_stops_at_nul() {
        let raw: Vec<c_char> = b"ok\n\0junk".iter().map(|&b| b as c_char).collect();
        assert_eq!(c_text(&raw), "ok");
    }
}
