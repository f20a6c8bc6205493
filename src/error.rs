//! The crate's error type: every variant names what was at fault.

use std::path::PathBuf;

/// Everything that can go wrong in edgetune, as a value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A malformed or unsupported GGUF file; the message names the offset or tensor.
    #[error("{}: {msg}", path.display())]
    Gguf {
        /// The file at fault (empty when reading from memory).
        path: PathBuf,
        /// What is wrong, with the byte offset or tensor name.
        msg: String,
    },
    /// A quantized-data problem (wrong length, unsupported type for an operation).
    #[error("quant: {0}")]
    Quant(String),
    /// The tokenizer metadata is missing or inconsistent, or text cannot be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// The model's metadata or tensors do not describe a runnable model.
    #[error("model: {0}")]
    Model(String),
    /// An argument or input is invalid; the message says which.
    #[error("{0}")]
    Invalid(String),
    /// The GPU could not be opened or failed to run a kernel.
    #[error("gpu: {0}")]
    Gpu(String),
    /// The caller cancelled the operation.
    #[error("cancelled")]
    Cancelled,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
