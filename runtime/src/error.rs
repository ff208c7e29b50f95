//! The runtime's error type. Every variant names the op, tensor or file it concerns, so a user sees *what* is
//! wrong without a backtrace.

use crate::{DType, Device};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType { op: &'static str, expected: DType, got: DType },

    #[error("{op}: tensors on different devices ({a} and {b})")]
    DeviceMismatch { op: &'static str, a: Device, b: Device },

    #[error("{op}: {what} {value} out of range 0..{bound}")]
    Index { op: &'static str, what: &'static str, value: i64, bound: usize },

    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },

    /// A rank of a data-parallel group stopped (it failed, or finished while others went on): the collective that
    /// needed it cannot complete. The departed rank's own error says why.
    #[error("{op}: rank {rank} left the group")]
    RankLeft { op: &'static str, rank: usize },

    #[error("{op} is not available on {device}: {why}")]
    Unsupported { op: &'static str, device: Device, why: &'static str },

    /// The CUDA backend failed (no driver or GPU, out of memory, a kernel fault): its message says what to do.
    #[error("{op}: {source}")]
    Cuda {
        op: &'static str,
        #[source]
        source: qlora_kernels::cuda::Error,
    },
}

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }

    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid { op, msg: msg.into() }
    }

    /// Whether this is the GPU running out of memory (what a memory plan's advice answers).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Cuda { source: qlora_kernels::cuda::Error::OutOfMemory { .. }, .. })
    }

    /// Maps a CUDA backend error to this crate's, naming the op: `launcher(..).map_err(Error::cuda("add"))?`.
    pub fn cuda(op: &'static str) -> impl FnOnce(qlora_kernels::cuda::Error) -> Error {
        move |source| Error::Cuda { op, source }
    }
}

/// Early return with a shape error: `ensure_shape!(cond, "matmul", "k {} vs {}", a, b)`.
#[macro_export]
macro_rules! ensure_shape {
    ($cond:expr, $op:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::shape($op, format!($($fmt)+)));
        }
    };
}
