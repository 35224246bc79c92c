//! Reading, writing and validating CIFAR-10 files in both layouts.

mod common;

use std::path::Path;

use cifar_data::{
    load_binary_file, load_pickle_file, load_test, load_test_limited, load_train,
    load_train_limited, write_binary_batch, CifarSplit, DataError, Layout, OFFICIAL_BINARY_URL,
};
use common::{py2_numpy_pickle, shared_dir, synthetic, TempDir};

fn one_line(e: &DataError) -> String {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "error message is not one line: {msg}");
    msg
}

/// Writes one 10,000-record file and hard-links (or copies) it under the other names.
fn full_binary_dir(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let (images, labels) = synthetic(10_000, 7);
    let first = dir.join("data_batch_1.bin");
    write_binary_batch(&first, &images, &labels).unwrap();
    for name in [
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        if std::fs::hard_link(&first, dir.join(name)).is_err() {
            std::fs::copy(&first, dir.join(name)).unwrap();
        }
    }
    (images, labels)
}

#[test]
fn binary_round_trip_any_record_count() {
    let tmp = TempDir::new("bin-rt");
    let (images, labels) = synthetic(37, 1);
    let path = tmp.path().join("subset.bin");
    write_binary_batch(&path, &images, &labels).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 37 * 3073);
    let split = load_binary_file(&path).unwrap();
    assert_eq!(split, CifarSplit { images, labels });
    assert_eq!(split.len(), 37);
    assert_eq!(split.image(5), &split.images[5 * 3072..6 * 3072]);
    // no temporary file is left beside the output
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn truncate_keeps_prefix() {
    let (images, labels) = synthetic(10, 2);
    let mut split = CifarSplit {
        images: images.clone(),
        labels: labels.clone(),
    };
    split.truncate(20);
    assert_eq!(split.len(), 10);
    split.truncate(4);
    assert_eq!(split.len(), 4);
    assert_eq!(split.images, images[..4 * 3072]);
    assert_eq!(split.labels, labels[..4]);
    split.truncate(0);
    assert!(split.is_empty());
}

#[test]
fn load_train_and_test_binary_layout_in_dir_and_subdir() {
    let tmp = TempDir::new("bin-full");
    let (images, labels) = full_binary_dir(tmp.path());
    let train = load_train(tmp.path()).unwrap();
    assert_eq!(train.len(), 50_000);
    assert_eq!(train.images[..10_000 * 3072], images[..]);
    assert_eq!(train.images[40_000 * 3072..], images[..]);
    assert_eq!(train.labels[30_000..40_000], labels[..]);
    assert_eq!(train.class_counts(), [5_000; 10]);
    let test = load_test(tmp.path()).unwrap();
    assert_eq!(test, CifarSplit { images, labels });

    // the official archive unpacks into cifar-10-batches-bin/
    let outer = TempDir::new("bin-sub");
    let sub = outer.path().join("cifar-10-batches-bin");
    std::fs::rename(tmp.path(), &sub).unwrap();
    assert_eq!(
        cifar_data::detect_layout(outer.path()).unwrap(),
        (sub.clone(), Layout::Binary)
    );
    assert_eq!(load_test(outer.path()).unwrap(), test);
    std::fs::rename(&sub, tmp.path()).unwrap();
}

#[test]
fn pickle_round_trip_py2_layout() {
    let tmp = TempDir::new("pkl-rt");
    let (images, labels) = synthetic(25, 3);
    let labels_i64: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let path = tmp.path().join("data_batch_1");
    std::fs::write(&path, py2_numpy_pickle(&images, &labels_i64)).unwrap();
    let split = load_pickle_file(&path).unwrap();
    assert_eq!(split, CifarSplit { images, labels });
}

/// Pickles written by numpy 2.4 / python 3 (`tests/fixtures`, see the README there): protocol 2
/// (bytes as `_codecs.encode`), 4 (BINBYTES8 + STACK_GLOBAL), 5 (`_frombuffer` + BYTEARRAY8), a
/// Fortran-ordered array and text keys.
#[test]
fn pickles_written_by_numpy() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let expected_images: Vec<u8> = (0..3 * 3072u32).map(|i| ((i * 7) % 251) as u8).collect();
    for name in [
        "numpy_p2.pkl",
        "numpy_p4.pkl",
        "numpy_p5.pkl",
        "numpy_fortran_p4.pkl",
        "numpy_strkeys_p3.pkl",
    ] {
        let split =
            load_pickle_file(&fixtures.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(split.labels, vec![3, 9, 0], "{name}");
        assert!(split.images == expected_images, "{name}: pixels differ");
    }
}

#[test]
fn load_test_pickle_layout_in_subdir() {
    let tmp = TempDir::new("pkl-full");
    let sub = tmp.path().join("cifar-10-batches-py");
    std::fs::create_dir(&sub).unwrap();
    let (images, labels) = synthetic(10_000, 4);
    let labels_i64: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    std::fs::write(
        sub.join("test_batch"),
        py2_numpy_pickle(&images, &labels_i64),
    )
    .unwrap();
    for i in 1..=5 {
        std::fs::hard_link(sub.join("test_batch"), sub.join(format!("data_batch_{i}")))
            .or_else(|_| {
                std::fs::copy(sub.join("test_batch"), sub.join(format!("data_batch_{i}")))
                    .map(|_| ())
            })
            .unwrap();
    }
    assert_eq!(
        cifar_data::detect_layout(tmp.path()).unwrap(),
        (sub.clone(), Layout::Pickle)
    );
    let test = load_test(tmp.path()).unwrap();
    assert_eq!(test, CifarSplit { images, labels });
    assert_eq!(load_train(tmp.path()).unwrap().len(), 50_000);
}

#[test]
fn exact_partial_original_first_record() {
    let Some(shared) = shared_dir("exact_partial_original_first_record") else {
        return;
    };
    let path = shared.join("data/cifar-10-exact-partial/data_batch_1_exact.bin");
    let split = load_binary_file(&path)
        .unwrap_or_else(|e| panic!("the shared exact-partial data must be present: {e}"));
    assert_eq!(split.len(), 1102);
    let first = split.image(0);
    assert_eq!(&first[..3], &[59, 43, 50]);
    assert_eq!(&first[3069..], &[140, 84, 72]);
    assert_eq!(split.labels[0], 6, "the first training image is a frog");
    let second = split.image(1);
    assert_eq!(&second[..3], &[154, 126, 105]);
    assert_eq!(&second[3069..], &[139, 142, 144]);
}

#[test]
fn missing_directory_explains_where_files_go() {
    let tmp = TempDir::new("missing");
    let err = load_train(&tmp.path().join("nowhere")).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err:?}");
    let msg = one_line(&err);
    assert!(msg.contains("nowhere"), "{msg}");
    assert!(msg.contains("data_batch_1.bin"), "{msg}");
    assert!(msg.contains(OFFICIAL_BINARY_URL), "{msg}");
    assert!(msg.contains("download"), "{msg}");
}

#[test]
fn a_batch_that_is_a_directory_and_a_data_dir_that_is_a_file_are_named_as_such() {
    let tmp = TempDir::new("wrong-kind");
    full_binary_dir(tmp.path());
    let batch = tmp.path().join("data_batch_1.bin");
    std::fs::remove_file(&batch).unwrap();
    std::fs::create_dir(&batch).unwrap();
    let msg = one_line(&load_train(tmp.path()).unwrap_err());
    assert!(
        msg.contains("data_batch_1.bin")
            && msg.contains("is a directory, not a CIFAR-10 batch file"),
        "{msg}"
    );
    let file = tmp.path().join("test_batch.bin");
    let msg = one_line(&load_test(&file).unwrap_err());
    assert!(
        msg.contains("test_batch.bin: is a file; name the directory"),
        "{msg}"
    );
}

#[test]
fn a_prefix_of_the_files_serves_a_limited_run() {
    let tmp = TempDir::new("prefix");
    let (images, labels) = synthetic(300, 11);
    write_binary_batch(&tmp.path().join("data_batch_1.bin"), &images, &labels).unwrap();
    write_binary_batch(
        &tmp.path().join("test_batch.bin"),
        &images[..100 * 3072],
        &labels[..100],
    )
    .unwrap();
    let train = load_train_limited(tmp.path(), Some(250)).unwrap();
    assert_eq!(train.len(), 250);
    assert_eq!(train.image(249), &images[249 * 3072..250 * 3072]);
    assert_eq!(load_test_limited(tmp.path(), Some(100)).unwrap().len(), 100);
    // More than the prefix holds, or no limit at all: the short file is named.
    for result in [
        load_train_limited(tmp.path(), Some(301)),
        load_train(tmp.path()),
    ] {
        let msg = one_line(&result.unwrap_err());
        assert!(msg.contains("data_batch_1.bin: holds 300 records"), "{msg}");
    }
    // A full first file and a limit beyond it reads on into the (absent) second file.
    let full = TempDir::new("prefix-full");
    let (images, labels) = synthetic(10_000, 3);
    write_binary_batch(&full.path().join("data_batch_1.bin"), &images, &labels).unwrap();
    assert_eq!(
        load_train_limited(full.path(), Some(10_000)).unwrap().len(),
        10_000
    );
    let msg = one_line(&load_train_limited(full.path(), Some(10_001)).unwrap_err());
    assert!(msg.contains("data_batch_2.bin"), "{msg}");
}

#[test]
fn missing_single_file_is_named() {
    let tmp = TempDir::new("missing-one");
    full_binary_dir(tmp.path());
    std::fs::remove_file(tmp.path().join("data_batch_3.bin")).unwrap();
    let err = load_train(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err:?}");
    let msg = one_line(&err);
    assert!(msg.contains("data_batch_3.bin"), "{msg}");
    // the test split is still readable
    assert_eq!(load_test(tmp.path()).unwrap().len(), 10_000);
}

#[test]
fn size_not_a_record_multiple() {
    let tmp = TempDir::new("badsize");
    for (name, size) in [("odd.bin", 2 * 3073 + 5), ("empty.bin", 0)] {
        let path = tmp.path().join(name);
        std::fs::write(&path, vec![0u8; size]).unwrap();
        let err = load_binary_file(&path).unwrap_err();
        assert!(matches!(err, DataError::BadSize { .. }), "{err:?}");
        let msg = one_line(&err);
        assert!(
            msg.contains(name) && msg.contains(&size.to_string()),
            "{msg}"
        );
        assert!(msg.contains("3073"), "{msg}");
    }
}

#[test]
fn wrong_record_count_is_rejected_by_load_test() {
    let tmp = TempDir::new("count");
    let (images, labels) = synthetic(9_999, 5);
    write_binary_batch(&tmp.path().join("test_batch.bin"), &images, &labels).unwrap();
    let err = load_test(tmp.path()).unwrap_err();
    assert!(
        matches!(err, DataError::RecordCount { found: 9_999, .. }),
        "{err:?}"
    );
    let msg = one_line(&err);
    assert!(msg.contains("test_batch.bin") && msg.contains("9999") && msg.contains("10000"));
}

#[test]
fn label_above_nine_names_the_record() {
    let tmp = TempDir::new("label");
    let (images, labels) = synthetic(12, 6);
    let path = tmp.path().join("bad_label.bin");
    write_binary_batch(&path, &images, &labels).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[7 * 3073] = 10;
    std::fs::write(&path, &bytes).unwrap();
    let err = load_binary_file(&path).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::BadLabel {
                record: 7,
                label: 10,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = one_line(&err);
    assert!(
        msg.contains("bad_label.bin") && msg.contains("record 7"),
        "{msg}"
    );

    // writing such a label is refused too
    let mut bad = labels.clone();
    bad[3] = 200;
    let err = write_binary_batch(&tmp.path().join("w.bin"), &images, &bad).unwrap_err();
    assert!(
        matches!(err, DataError::BadLabel { record: 3, .. }),
        "{err:?}"
    );
    assert!(!tmp.path().join("w.bin").exists());
}

#[test]
fn malformed_pickles_are_rejected_clearly() {
    let tmp = TempDir::new("badpkl");
    let (images, labels) = synthetic(4, 8);
    let labels_i64: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let good = py2_numpy_pickle(&images, &labels_i64);
    let check = |name: &str, bytes: &[u8], expect: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = load_pickle_file(&path).unwrap_err();
        let msg = one_line(&err);
        assert!(msg.contains(name), "{name}: {msg}");
        assert!(msg.contains(expect), "{name}: expected {expect:?} in {msg}");
    };
    check(
        "truncated",
        &good[..good.len() / 2],
        "unexpected end of file",
    );
    check(
        "garbage",
        b"\x00\x01\x02",
        "unsupported pickle opcode 0x00 at byte 0",
    );
    // label 12 at record 2
    let mut bad_labels = labels_i64.clone();
    bad_labels[2] = 12;
    let err_path = tmp.path().join("label12");
    std::fs::write(&err_path, py2_numpy_pickle(&images, &bad_labels)).unwrap();
    let err = load_pickle_file(&err_path).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::BadLabel {
                record: 2,
                label: 12,
                ..
            }
        ),
        "{err:?}"
    );
    // fewer labels than rows
    check(
        "short_labels",
        &py2_numpy_pickle(&images, &labels_i64[..3]),
        "`data` has 4 rows but `labels` has 3 entries",
    );
    // a wrong dtype code
    let int8 = replace_once(&good, b"U\x02u1", b"U\x02i8");
    check("int8", &int8, "dtype");
    // a renamed key
    let renamed = replace_once(&good, b"U\x06labels", b"U\x06lables");
    check("nolabels", &renamed, "no `labels` entry");
    // not a dict at all
    check("list", b"\x80\x02]q\x00.", "expected dict");
}

fn replace_once(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = haystack[..at].to_vec();
    out.extend_from_slice(to);
    out.extend_from_slice(&haystack[at + from.len()..]);
    out
}

/// The full dataset from `CIFAR10_DIR` (skipped with a loud message when unset, outside CI).
#[test]
fn real_cifar10_directory() {
    let Some(dir) = cifar_data::cifar10_dir_for_tests() else {
        return;
    };
    let train = load_train(&dir).unwrap_or_else(|e| panic!("{e}"));
    let test = load_test(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(train.len(), 50_000);
    assert_eq!(test.len(), 10_000);
    assert_eq!(train.class_counts(), [5_000; 10]);
    assert_eq!(test.class_counts(), [1_000; 10]);
    assert_eq!(train.labels[0], 6);
}
