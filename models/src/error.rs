//! The models crate's error: every variant names the file, and where it applies the tensor or field.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: invalid JSON at line {line}, column {column}: {msg}", path.display())]
    Json { path: PathBuf, line: usize, column: usize, msg: String },

    #[error("{}: {field}: {msg}", path.display())]
    Config { path: PathBuf, field: String, msg: String },

    #[error("{}: tensor {tensor}: {msg}", path.display())]
    Tensor { path: PathBuf, tensor: String, msg: String },

    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    #[error(transparent)]
    Runtime(#[from] qlora_runtime::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, e: &serde_json::Error) -> Self {
        Error::Json { path: path.into(), line: e.line(), column: e.column(), msg: e.to_string() }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, field: &str, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), field: field.into(), msg: msg.into() }
    }
}
