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

    #[error("{op} is not available on {device}: {why}")]
    Unsupported { op: &'static str, device: Device, why: &'static str },
}

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }

    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid { op, msg: msg.into() }
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
