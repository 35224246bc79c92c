//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("cifar-data-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random images and labels (labels cycle so every class appears).
pub fn synthetic(n: usize, salt: u32) -> (Vec<u8>, Vec<u8>) {
    let mut state = 0x9e37_79b9u32 ^ salt.wrapping_mul(0x85eb_ca6b);
    let images = (0..n * 3072)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    let labels = (0..n).map(|i| ((i as u32 + salt) % 10) as u8).collect();
    (images, labels)
}

/// A CIFAR-10 python batch exactly as the official `cifar-10-batches-py` files are laid out:
/// python 2 `cPickle` protocol 2, byte-string keys, a numpy array rebuilt through
/// `numpy.core.multiarray._reconstruct` + BUILD with the raw pixels as a BINSTRING, labels as a
/// list appended in chunks of 1000, plus the `batch_label` and `filenames` entries.
pub fn py2_numpy_pickle(images: &[u8], labels: &[i64]) -> Vec<u8> {
    // the array's row count comes from the pixels, so tests can make it disagree with labels
    let n = images.len() / 3072;
    let mut p = Vec::new();
    let mut memo = 0u8;
    let mut put = |p: &mut Vec<u8>| {
        memo = memo.wrapping_add(1);
        p.extend_from_slice(&[b'q', memo]);
    };
    let short_str = |p: &mut Vec<u8>, s: &[u8]| {
        p.push(b'U');
        p.push(s.len() as u8);
        p.extend_from_slice(s);
    };
    let int = |p: &mut Vec<u8>, v: i64| {
        if (0..256).contains(&v) {
            p.extend_from_slice(&[b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            p.push(b'M');
            p.extend_from_slice(&(v as u16).to_le_bytes());
        } else {
            p.push(b'J');
            p.extend_from_slice(&(v as i32).to_le_bytes());
        }
    };
    p.extend_from_slice(b"\x80\x02}");
    put(&mut p);
    p.push(b'(');
    // data
    short_str(&mut p, b"data");
    put(&mut p);
    p.extend_from_slice(b"cnumpy.core.multiarray\n_reconstruct\n");
    put(&mut p);
    p.extend_from_slice(b"cnumpy\nndarray\n");
    put(&mut p);
    p.extend_from_slice(b"K\x00\x85");
    put(&mut p);
    short_str(&mut p, b"b");
    put(&mut p);
    p.push(0x87); // TUPLE3
    put(&mut p);
    p.push(b'R');
    put(&mut p);
    p.push(b'('); // state tuple
    int(&mut p, 1);
    int(&mut p, n as i64);
    int(&mut p, 3072);
    p.push(0x86);
    put(&mut p);
    p.extend_from_slice(b"cnumpy\ndtype\n");
    put(&mut p);
    short_str(&mut p, b"u1");
    put(&mut p);
    int(&mut p, 0);
    int(&mut p, 1);
    p.push(0x87);
    put(&mut p);
    p.push(b'R');
    put(&mut p);
    p.push(b'(');
    int(&mut p, 3);
    short_str(&mut p, b"|");
    put(&mut p);
    p.extend_from_slice(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb");
    p.push(0x89); // False: C order
    p.push(b'T');
    p.extend_from_slice(&(images.len() as u32).to_le_bytes());
    p.extend_from_slice(images);
    put(&mut p);
    p.extend_from_slice(b"tb");
    put(&mut p);
    // labels
    short_str(&mut p, b"labels");
    put(&mut p);
    p.push(b']');
    put(&mut p);
    for chunk in labels.chunks(1000) {
        p.push(b'(');
        for &l in chunk {
            int(&mut p, l);
        }
        p.push(b'e');
    }
    short_str(&mut p, b"batch_label");
    put(&mut p);
    short_str(&mut p, b"training batch 1 of 5");
    put(&mut p);
    short_str(&mut p, b"filenames");
    put(&mut p);
    p.push(b']');
    put(&mut p);
    p.push(b'(');
    for i in 0..n.min(3) {
        short_str(&mut p, format!("img_{i}.png").as_bytes());
        put(&mut p);
    }
    p.push(b'e');
    p.extend_from_slice(b"u.");
    p
}

/// The workplace's shared test data (`shared/` beside the repository root), which a user's
/// clone does not have: `None` after a `SKIPPED` line, except under `CI=true` (where CI has
/// it), where its absence fails the test.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {} is missing but CI=true: CI must run this test",
        dir.display()
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs the workplace's shared data at {}",
        dir.display()
    );
    None
}
