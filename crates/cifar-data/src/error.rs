//! The single error type of this crate.

use std::path::PathBuf;

/// Official archive of the binary CIFAR-10 layout, named in every "file not found" message.
pub const OFFICIAL_BINARY_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

/// Everything that can go wrong while reading, validating or downloading CIFAR-10.
///
/// Every variant displays as one line that names the file (and the record, where one is at
/// fault), so the message alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying operating-system error.
        source: std::io::Error,
    },
    /// A dataset file that the chosen layout needs is absent.
    #[error(
        "CIFAR-10 file not found: {path} ({detail}). Put data_batch_1.bin..data_batch_5.bin and \
         test_batch.bin (binary layout) or data_batch_1..data_batch_5 and test_batch (python \
         pickle layout) in that directory or in its cifar-10-batches-bin / cifar-10-batches-py \
         subdirectory, e.g. by unpacking {OFFICIAL_BINARY_URL} there, or use the download option \
         to fetch it", path = path.display()
    )]
    Missing {
        /// The file (or directory) that was looked for.
        path: PathBuf,
        /// What was searched, e.g. the candidate directories.
        detail: String,
    },
    /// A path that must be a directory (the data dir) or a regular file (a batch) is not.
    #[error("{path}: {what}", path = path.display())]
    WrongKind {
        /// The offending path.
        path: PathBuf,
        /// What it is and what was expected, e.g. "is a directory, not a CIFAR-10 batch file".
        what: String,
    },
    /// A binary batch file whose length is not a whole number of 3073-byte records.
    #[error(
        "{path}: size {size} bytes is not a positive multiple of the 3073-byte CIFAR-10 record \
         (1 label byte + 3072 pixel bytes); the file is truncated or not a CIFAR-10 binary batch",
        path = path.display()
    )]
    BadSize {
        /// The offending file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// A batch file that holds a number of images other than the 10,000 every official file has.
    #[error("{path}: holds {found} records, expected {expected}", path = path.display())]
    RecordCount {
        /// The offending file.
        path: PathBuf,
        /// Records found.
        found: usize,
        /// Records required.
        expected: usize,
    },
    /// A record whose class label is outside 0..=9.
    #[error(
        "{path}: record {record} has label {label}, but CIFAR-10 labels must be 0..=9",
        path = path.display()
    )]
    BadLabel {
        /// The offending file.
        path: PathBuf,
        /// 0-based record index within the file.
        record: usize,
        /// The label value found.
        label: i64,
    },
    /// A python-pickle batch that could not be decoded or does not have the CIFAR-10 structure.
    #[error("{path}: not a CIFAR-10 python batch: {message}", path = path.display())]
    Pickle {
        /// The offending file.
        path: PathBuf,
        /// What was wrong (with the byte offset for decoding errors).
        message: String,
    },
    /// The archive could not be fetched.
    #[error(
        "could not download {url}: {message}. Without network access, download \
         {OFFICIAL_BINARY_URL} elsewhere and unpack its data_batch_1..5.bin and test_batch.bin \
         into {dir}", dir = dir.display()
    )]
    Download {
        /// The address that was tried.
        url: String,
        /// Why it failed.
        message: String,
        /// Where the files are expected.
        dir: PathBuf,
    },
    /// A downloaded archive whose md5 digest is not the published one.
    #[error(
        "{path}: md5 {actual} does not match the expected {expected} (corrupt or incomplete download)",
        path = path.display()
    )]
    Checksum {
        /// The downloaded file.
        path: PathBuf,
        /// Digest of the bytes received.
        actual: String,
        /// Digest required.
        expected: String,
    },
    /// An archive that lacks a file the binary layout needs, or is not a readable tar.gz.
    #[error("{path}: {message}", path = path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A loader option that cannot work (e.g. a batch size of 0).
    #[error("invalid loader configuration: {0}")]
    Config(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
