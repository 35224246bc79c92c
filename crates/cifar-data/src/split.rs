//! Reading and writing CIFAR-10 batch files (official binary and python-pickle layouts).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::DataError;
use crate::pickle;

/// Bytes of one image: 3 planes (R, G, B) of 32×32.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;
/// Bytes of one record in the binary layout: 1 label byte followed by the image.
pub const RECORD_BYTES: usize = IMAGE_BYTES + 1;
/// Images in every official batch file.
pub const RECORDS_PER_FILE: usize = 10_000;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;

/// Training files of the binary layout, in the order their records are concatenated.
pub const TRAIN_BINARY_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// Test file of the binary layout.
pub const TEST_BINARY_FILE: &str = "test_batch.bin";
const TRAIN_PICKLE_FILES: [&str; 5] = [
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
];
const TEST_PICKLE_FILE: &str = "test_batch";

/// A set of CIFAR images with their labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CifarSplit {
    /// `len() × 3072` bytes: each image is CHW planar (the R plane, then G, then B, each 32×32
    /// row-major), exactly the binary record layout without its label byte.
    pub images: Vec<u8>,
    /// One class index (0..=9) per image.
    pub labels: Vec<u8>,
}

impl CifarSplit {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Keeps only the first `n` images (no-op when `n >= len()`); handy for quick runs.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.labels.truncate(n);
            self.images.truncate(n * IMAGE_BYTES);
        }
    }

    /// The 3072 CHW bytes of image `i`. Panics when `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Number of images of each class. Panics if a label is above 9 (the loaders never
    /// produce one).
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut counts = [0; NUM_CLASSES];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    fn extend(&mut self, other: CifarSplit) {
        self.images.extend_from_slice(&other.images);
        self.labels.extend_from_slice(&other.labels);
    }
}

/// Reads one binary batch file with any positive number of 3073-byte records.
///
/// `load_train` / `load_test` additionally insist on the official 10,000 records per file.
pub fn load_binary_file(path: &Path) -> Result<CifarSplit, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.is_empty() || bytes.len() % RECORD_BYTES != 0 {
        return Err(DataError::BadSize {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
        });
    }
    let n = bytes.len() / RECORD_BYTES;
    let mut split = CifarSplit {
        images: Vec::with_capacity(n * IMAGE_BYTES),
        labels: Vec::with_capacity(n),
    };
    for (record, chunk) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = chunk[0];
        if label as usize >= NUM_CLASSES {
            return Err(DataError::BadLabel {
                path: path.to_path_buf(),
                record,
                label: label as i64,
            });
        }
        split.labels.push(label);
        split.images.extend_from_slice(&chunk[1..]);
    }
    Ok(split)
}

/// Reads one python-pickle batch file (torchvision's `cifar-10-batches-py` format: a dict with
/// `data`, a uint8 numpy array of N×3072, and `labels`, a list of N ints) with any N > 0.
pub fn load_pickle_file(path: &Path) -> Result<CifarSplit, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let err = |message: String| DataError::Pickle {
        path: path.to_path_buf(),
        message,
    };
    let root = pickle::decode(&bytes).map_err(err)?;
    let data = pickle::dict_get(&root, "data")
        .map_err(err)?
        .ok_or_else(|| err("no `data` entry".into()))?;
    let labels = pickle::dict_get(&root, "labels")
        .map_err(err)?
        .ok_or_else(|| err("no `labels` entry".into()))?;
    let matrix = pickle::numpy_u8_matrix(&data).map_err(err)?;
    let labels = pickle::int_list(&labels).map_err(err)?;
    if matrix.cols != IMAGE_BYTES {
        return Err(err(format!(
            "`data` has {} columns, expected {IMAGE_BYTES}",
            matrix.cols
        )));
    }
    if matrix.rows == 0 || matrix.rows != labels.len() {
        return Err(err(format!(
            "`data` has {} rows but `labels` has {} entries",
            matrix.rows,
            labels.len()
        )));
    }
    let mut out = Vec::with_capacity(labels.len());
    for (record, &label) in labels.iter().enumerate() {
        if !(0..NUM_CLASSES as i64).contains(&label) {
            return Err(DataError::BadLabel {
                path: path.to_path_buf(),
                record,
                label,
            });
        }
        out.push(label as u8);
    }
    Ok(CifarSplit {
        images: matrix.data,
        labels: out,
    })
}

/// Writes images and labels as a binary batch file (3073-byte records), atomically: the data
/// goes to a temporary file beside `path` that is then renamed over it.
///
/// `images` must hold `labels.len() × 3072` CHW bytes; labels must be 0..=9. Useful for tests
/// and for making subsets of the dataset.
pub fn write_binary_batch(path: &Path, images: &[u8], labels: &[u8]) -> Result<(), DataError> {
    if images.len() != labels.len() * IMAGE_BYTES {
        return Err(DataError::Config(format!(
            "write_binary_batch({}): {} image bytes for {} labels, expected {}",
            path.display(),
            images.len(),
            labels.len(),
            labels.len() * IMAGE_BYTES
        )));
    }
    if let Some(record) = labels.iter().position(|&l| l as usize >= NUM_CLASSES) {
        return Err(DataError::BadLabel {
            path: path.to_path_buf(),
            record,
            label: labels[record] as i64,
        });
    }
    let mut bytes = Vec::with_capacity(labels.len() * RECORD_BYTES);
    for (label, image) in labels.iter().zip(images.chunks_exact(IMAGE_BYTES)) {
        bytes.push(*label);
        bytes.extend_from_slice(image);
    }
    write_atomically(path, &bytes)
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let file_name = path
        .file_name()
        .ok_or_else(|| DataError::Config(format!("{} is not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

/// Which on-disk layout a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `data_batch_N.bin` / `test_batch.bin`, 3073-byte records.
    Binary,
    /// `data_batch_N` / `test_batch` python pickles.
    Pickle,
}

/// Finds the directory holding CIFAR-10 and its layout: `dir` itself or its
/// `cifar-10-batches-bin` (binary) / `cifar-10-batches-py` (pickle) subdirectory. The binary
/// layout wins when both are present.
pub fn detect_layout(dir: &Path) -> Result<(PathBuf, Layout), DataError> {
    if dir.is_file() {
        return Err(DataError::WrongKind {
            path: dir.to_path_buf(),
            what: "is a file; name the directory holding the CIFAR-10 batches".into(),
        });
    }
    if !dir.exists() {
        return Err(DataError::Missing {
            path: dir.to_path_buf(),
            detail: "the data directory does not exist".into(),
        });
    }
    let candidates = [
        (dir.to_path_buf(), Layout::Binary),
        (dir.join("cifar-10-batches-bin"), Layout::Binary),
        (dir.to_path_buf(), Layout::Pickle),
        (dir.join("cifar-10-batches-py"), Layout::Pickle),
    ];
    for (base, layout) in &candidates {
        let probe = match layout {
            Layout::Binary => [TRAIN_BINARY_FILES[0], TEST_BINARY_FILE],
            Layout::Pickle => [TRAIN_PICKLE_FILES[0], TEST_PICKLE_FILE],
        };
        for f in probe {
            check_not_other_kind(&base.join(f))?;
        }
        if probe.iter().any(|f| base.join(f).is_file()) {
            return Ok((base.clone(), *layout));
        }
    }
    Err(DataError::Missing {
        path: dir.join(TRAIN_BINARY_FILES[0]),
        detail: format!(
            "looked for data_batch_1.bin / test_batch.bin and data_batch_1 / test_batch in {} \
             and its cifar-10-batches-bin and cifar-10-batches-py subdirectories",
            dir.display()
        ),
    })
}

/// A batch path that exists but is not a file (a directory, a FIFO …) is named as such, not
/// reported absent.
fn check_not_other_kind(path: &Path) -> Result<(), DataError> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(DataError::WrongKind {
            path: path.to_path_buf(),
            what: format!(
                "is {}, not a CIFAR-10 batch file",
                if m.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                }
            ),
        }),
        _ => Ok(()),
    }
}

/// Reads the files in order until `limit` records are in (all of them when `None`). Every file
/// read must hold 10,000 records, except that the file in which the limit ends may be shorter
/// if it holds the records needed: a prefix of the official files (records are fixed-size) is
/// a valid subset, and the files after it need not exist.
fn load_files(
    dir: &Path,
    binary: &[&str],
    pickled: &[&str],
    limit: Option<usize>,
) -> Result<CifarSplit, DataError> {
    let (base, layout) = detect_layout(dir)?;
    let names = match layout {
        Layout::Binary => binary,
        Layout::Pickle => pickled,
    };
    let mut split = CifarSplit::default();
    for name in names {
        if limit.is_some_and(|l| split.len() >= l) {
            break;
        }
        let path = base.join(name);
        check_not_other_kind(&path)?;
        if !path.is_file() {
            return Err(DataError::Missing {
                path,
                detail: format!(
                    "the {} layout was detected in {} but this file is absent",
                    match layout {
                        Layout::Binary => "binary",
                        Layout::Pickle => "python-pickle",
                    },
                    base.display()
                ),
            });
        }
        let part = match layout {
            Layout::Binary => load_binary_file(&path)?,
            Layout::Pickle => load_pickle_file(&path)?,
        };
        let needed = limit.map_or(RECORDS_PER_FILE, |l| {
            (l - split.len()).min(RECORDS_PER_FILE)
        });
        if part.len() != RECORDS_PER_FILE && part.len() < needed {
            return Err(DataError::RecordCount {
                path,
                found: part.len(),
                expected: RECORDS_PER_FILE,
            });
        }
        split.extend(part);
    }
    if let Some(l) = limit {
        split.truncate(l);
    }
    Ok(split)
}

/// Loads the 50,000 training images (batches 1..5 in order) from `dir`, auto-detecting the
/// layout (see [`detect_layout`]). Every file must hold exactly 10,000 valid records.
pub fn load_train(dir: &Path) -> Result<CifarSplit, DataError> {
    load_files(dir, &TRAIN_BINARY_FILES, &TRAIN_PICKLE_FILES, None)
}

/// Loads the 10,000 test images from `dir`, auto-detecting the layout like [`load_train`].
pub fn load_test(dir: &Path) -> Result<CifarSplit, DataError> {
    load_files(dir, &[TEST_BINARY_FILE], &[TEST_PICKLE_FILE], None)
}

/// The first `limit` training images (all 50,000 when `None`). Only the files holding them
/// are read, and a prefix of the official files is enough: `data_batch_1.bin` cut after 5,000
/// records serves `limit = Some(5000)` without the other four files.
pub fn load_train_limited(dir: &Path, limit: Option<usize>) -> Result<CifarSplit, DataError> {
    load_files(dir, &TRAIN_BINARY_FILES, &TRAIN_PICKLE_FILES, limit)
}

/// The first `limit` test images, like [`load_train_limited`].
pub fn load_test_limited(dir: &Path, limit: Option<usize>) -> Result<CifarSplit, DataError> {
    load_files(dir, &[TEST_BINARY_FILE], &[TEST_PICKLE_FILE], limit)
}
