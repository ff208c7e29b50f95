//! The CUDA backend's error: every variant says what was missing or failed and what to do about it.

use cudarc::cublaslt::result::CublasError;
use cudarc::driver::DriverError;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no CUDA driver: {detail}. Install the NVIDIA driver (580 or newer, for CUDA 13.0), or run with --device cpu"
    )]
    NoDriver { detail: String },

    #[error("the NVIDIA driver supports CUDA {major}.{minor}; qlora-rt needs 13.0 or newer (driver 580 or newer)")]
    DriverTooOld { major: i32, minor: i32 },

    #[error("cuda:{ordinal} does not exist: {count} CUDA device(s) visible (check CUDA_VISIBLE_DEVICES)")]
    NoDevice { ordinal: usize, count: usize },

    #[error("{name} (cuda:{ordinal}) has compute capability {major}.{minor}; qlora-rt needs 8.0 or newer (bf16)")]
    UnsupportedGpu { ordinal: usize, name: String, major: u32, minor: u32 },

    #[error(
        "NVRTC (libnvrtc.so.13, CUDA 13) not found: {detail}. Add CUDA's lib64 folder to LD_LIBRARY_PATH, or set \
         QLORA_NVRTC_LIB to the library's path (scripts/cuda-tools.sh installs one from PyPI)"
    )]
    NoNvrtc { detail: String },

    #[error(
        "cuBLASLt (libcublasLt.so.13, CUDA 13) not found: add CUDA's lib64 folder to LD_LIBRARY_PATH, or run with \
         --device cpu"
    )]
    NoCublasLt,

    #[error(
        "NCCL (libnccl.so.2) not found: {detail}. Install it (the libnccl2 package, or pip's nvidia-nccl-cu13 as \
         PyTorch does), add its folder to LD_LIBRARY_PATH, or set QLORA_NCCL_LIB to the library's path"
    )]
    NoNccl { detail: String },

    #[error("NCCL: {op} failed: {detail}")]
    Nccl { op: &'static str, detail: String },

    #[error("cuBLASLt call {op} failed: {source}")]
    Cublas { op: &'static str, source: CublasError },

    #[error("CUDA driver call {op} failed: {source}")]
    Driver { op: &'static str, source: DriverError },

    #[error("launching CUDA kernel {kernel} failed: {source}")]
    Launch { kernel: &'static str, source: DriverError },

    #[error("NVRTC: {op} failed: {detail}")]
    Nvrtc { op: &'static str, detail: String },

    #[error("NVRTC could not compile kernels/cuda/{module}.cu for {target}:\n{log}")]
    Compile { module: &'static str, target: String, log: String },

    #[error("kernel {name} is not in kernels/cuda/{module}.cu")]
    MissingKernel { module: &'static str, name: &'static str },

    #[error(
        "cuda:{ordinal} out of memory: {requested} asked, {free} free of {total}; this process holds {reserved} \
         ({in_use} in live buffers, none left cached). Lower the micro-batch size or the sequence length, enable \
         activation checkpointing, or stop other processes on this GPU",
        requested = Bytes(*.requested), free = Bytes(*.free), total = Bytes(*.total),
        reserved = Bytes(*.reserved), in_use = Bytes(*.in_use)
    )]
    OutOfMemory { ordinal: usize, requested: usize, free: usize, total: usize, reserved: usize, in_use: usize },

    #[error(
        "pinned host memory: {requested} more could not be locked ({pinned} already pinned for offloaded \
         activations, none left cached). Lower the micro-batch size or the sequence length, or give a larger \
         --memory-budget so that fewer layers are offloaded",
        requested = Bytes(*.requested), pinned = Bytes(*.pinned)
    )]
    HostOutOfMemory { requested: usize, pinned: usize },
}

impl Error {
    pub(crate) fn driver(op: &'static str) -> impl FnOnce(DriverError) -> Error {
        move |source| Error::Driver { op, source }
    }

    pub(crate) fn cublas(op: &'static str) -> impl FnOnce(CublasError) -> Error {
        move |source| Error::Cublas { op, source }
    }
}

/// A byte count for people: `1.50 GiB`, `12.0 MiB`, `512 B`.
pub struct Bytes(pub usize);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        let precision = if v < 10.0 { 2 } else { 1 };
        write!(f, "{v:.precision$} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_binary_units() {
        let s = |b| Bytes(b).to_string();
        assert_eq!(
            (s(0), s(512), s(1536), s(12 << 20), s(3 << 30)),
            ("0 B".into(), "512 B".into(), "1.50 KiB".into(), "12.0 MiB".into(), "3.00 GiB".into())
        );
    }

    #[test]
    fn out_of_memory_says_what_was_asked_and_what_to_lower() {
        let e = Error::OutOfMemory {
            ordinal: 0,
            requested: 2 << 30,
            free: 1 << 30,
            total: 80 << 30,
            reserved: 70 << 30,
            in_use: 69 << 30,
        };
        let msg = e.to_string();
        for part in ["cuda:0", "2.00 GiB asked", "1.00 GiB free of 80.0 GiB", "holds 70.0 GiB", "micro-batch size"] {
            assert!(msg.contains(part), "{part:?} missing from {msg:?}");
        }
    }
}
