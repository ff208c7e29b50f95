//! The on-disk cache of compiled kernels: one file per (module, target), named by a hash of everything that decides
//! the image and holding that whole key, source included, so a hash collision or a stale file is a miss, never a
//! wrong kernel. Writes go to a temporary file renamed into place, so readers never see half a file.
//!
//! Folder: `$QLORA_KERNEL_CACHE_DIR`, else `$XDG_CACHE_HOME/qlora-rt/kernels`, else `~/.cache/qlora-rt/kernels`.
//! A cache that cannot be read is a miss; one that cannot be written costs a compile per process and one warning.
//! [`load_or_compile`] puts the cache in front of NVRTC (`compile.rs`), so a process compiles a module only the
//! first time its source, options, target or NVRTC version are seen on this machine.

use super::compile::{compile, nvrtc_version, Image, Output, Target};
use super::source::Module;
use super::Result;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// [`compile`] behind the on-disk cache: a hit needs no NVRTC call beyond the version query.
pub(crate) fn load_or_compile(module: Module, target: Target) -> Result<Image> {
    let source = module.source();
    let options = target.options();
    let key = Key { module: module.name(), target, options: &options, nvrtc: nvrtc_version()?, source: &source };
    let dir = dir();
    if let Some(image) = dir.as_deref().and_then(|d| read(d, &key)) {
        return Ok(image);
    }
    let image = compile(module, target)?.image;
    if let Some(d) = dir.as_deref() {
        write(d, &key, &image);
    }
    Ok(image)
}

/// Everything the compiled image depends on.
pub(crate) struct Key<'a> {
    pub module: &'static str,
    pub target: Target,
    pub options: &'a [String],
    pub nvrtc: (i32, i32),
    pub source: &'a str,
}

impl Key<'_> {
    /// The file's leading bytes: a readable header, then the source.
    fn prefix(&self) -> Vec<u8> {
        let header = format!(
            "qlora-rt kernel cache 1\nmodule {}\ntarget {}\nnvrtc {}.{}\noptions {}\nsource bytes {}\n",
            self.module,
            self.target,
            self.nvrtc.0,
            self.nvrtc.1,
            self.options.join(" "),
            self.source.len()
        );
        [header.as_bytes(), self.source.as_bytes()].concat()
    }

    fn file_name(&self, prefix: &[u8]) -> String {
        let ext = match self.target.output {
            Output::Cubin => "cubin",
            Output::Ptx => "ptx",
        };
        format!("{}-{}-{:016x}.{ext}", self.module, self.target, fnv1a(prefix))
    }
}

pub(crate) fn dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("QLORA_KERNEL_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("qlora-rt/kernels")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/qlora-rt/kernels")))
}

pub(crate) fn read(dir: &Path, key: &Key) -> Option<Image> {
    let prefix = key.prefix();
    let bytes = std::fs::read(dir.join(key.file_name(&prefix))).ok()?;
    let image = bytes.strip_prefix(prefix.as_slice()).filter(|image| !image.is_empty())?;
    match key.target.output {
        Output::Cubin => Some(Image::Cubin(image.to_vec())),
        Output::Ptx => String::from_utf8(image.to_vec()).ok().map(Image::Ptx),
    }
}

/// Stores `image`; on failure warns once per process and carries on (the kernel is compiled and works regardless).
pub(crate) fn write(dir: &Path, key: &Key, image: &Image) {
    if let Err(e) = try_write(dir, key, image) {
        static WARN: Once = Once::new();
        WARN.call_once(|| {
            eprintln!("qlora-rt: warning: cannot write the kernel cache in {}: {e}", dir.display());
        });
    }
}

fn try_write(dir: &Path, key: &Key, image: &Image) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let prefix = key.prefix();
    let path = dir.join(key.file_name(&prefix));
    let body = match image {
        Image::Cubin(bytes) => bytes.as_slice(),
        Image::Ptx(text) => text.as_bytes(),
    };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_extension(format!("tmp{}-{nanos}", std::process::id()));
    std::fs::write(&tmp, [prefix.as_slice(), body].concat())?;
    std::fs::rename(&tmp, &path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// 64-bit FNV-1a: a file name, not a checksum (the file holds the whole key).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qlora-kernel-cache-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn key<'a>(options: &'a [String], source: &'a str) -> Key<'a> {
        let target = Target { arch: 90, arch_specific: true, output: Output::Cubin };
        Key { module: "rms_norm", target, options, nvrtc: (13, 0), source }
    }

    #[test]
    fn round_trip_and_misses() {
        let dir = temp_dir("round-trip");
        let options = vec!["--gpu-architecture=sm_90a".to_string()];
        let k = key(&options, "__global__ void f() {}");
        assert_eq!(read(&dir, &k), None, "empty cache");
        let image = Image::Cubin(vec![0x7f, b'E', b'L', b'F', 0, 1]);
        try_write(&dir, &k, &image).unwrap();
        assert_eq!(read(&dir, &k), Some(image.clone()));

        // Any change of the key misses, also when it lands on the same file name.
        let other = key(&options, "__global__ void g() {}");
        assert_eq!(read(&dir, &other), None);
        let stale = other.file_name(&other.prefix());
        std::fs::copy(dir.join(k.file_name(&k.prefix())), dir.join(&stale)).unwrap();
        assert_eq!(read(&dir, &other), None, "a file holding another key's source is a miss");

        // A truncated file is a miss.
        let path = dir.join(k.file_name(&k.prefix()));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - image_len(&image)]).unwrap();
        assert_eq!(read(&dir, &k), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn image_len(image: &Image) -> usize {
        match image {
            Image::Cubin(b) => b.len(),
            Image::Ptx(t) => t.len(),
        }
    }

    #[test]
    fn ptx_round_trips_as_text() {
        let dir = temp_dir("ptx");
        let options = vec![];
        let mut k = key(&options, "src");
        k.target = Target { arch: 80, arch_specific: false, output: Output::Ptx };
        let image = Image::Ptx(".version 9.0\n.target sm_80\n".into());
        try_write(&dir, &k, &image).unwrap();
        assert_eq!(read(&dir, &k), Some(image));
        assert!(k.file_name(&k.prefix()).starts_with("rms_norm-compute_80-"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_cache_is_not_an_error() {
        let options = vec![];
        let k = key(&options, "src");
        write(Path::new("/proc/qlora-rt-cannot-write-here"), &k, &Image::Ptx("x".into()));
    }
}
