//! Errors of the file-facing parts (checkpoints, logs, optimizer state) of this crate.

use std::path::PathBuf;

/// An error that names the file (and, where relevant, the key) it is about.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file exists but its content is not what was expected.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor or state entry is missing, unexpected, or has the wrong shape/dtype.
    #[error("{}: key `{key}`: {msg}", path.display())]
    Key {
        /// The file the tensors came from (or a description of the source).
        path: PathBuf,
        /// The offending key.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with a [`TrainError`].
pub type TrainResult<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        TrainError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn key(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        TrainError::Key {
            path: path.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
}
