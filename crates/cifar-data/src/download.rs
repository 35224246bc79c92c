//! Fetching the official binary archive (feature `download`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use crate::error::{DataError, OFFICIAL_BINARY_URL};
use crate::split::{TEST_BINARY_FILE, TRAIN_BINARY_FILES};

/// Published md5 of [`OFFICIAL_BINARY_URL`].
pub const OFFICIAL_BINARY_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// Downloads the official CIFAR-10 binary archive, checks its md5 and unpacks
/// `data_batch_1..5.bin`, `test_batch.bin` (and `batches.meta.txt`) into `dir`.
///
/// Without network access this fails with a message saying where to put the files by hand.
pub fn download(dir: &Path) -> Result<(), DataError> {
    download_from_url(OFFICIAL_BINARY_URL, OFFICIAL_BINARY_MD5, dir)
}

/// [`download`] from another address (a mirror) with the md5 that archive must have.
pub fn download_from_url(url: &str, expected_md5: &str, dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let archive = dir.join(".cifar-10-binary.tar.gz.part");
    let fail = |message: String| DataError::Download {
        url: url.to_string(),
        message,
        dir: dir.to_path_buf(),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let mut body = response.into_body().into_reader();
    let mut copy = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&archive)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = body.read(&mut buf)?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])?;
        }
        file.sync_all()
    };
    if let Err(e) = copy() {
        let _ = std::fs::remove_file(&archive);
        return Err(fail(format!("transfer interrupted: {e}")));
    }
    let result = install_archive(&archive, expected_md5, dir);
    let _ = std::fs::remove_file(&archive);
    result
}

/// md5 of a file as lowercase hex.
pub fn md5_hex(path: &Path) -> Result<String, DataError> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks a locally available `cifar-10-binary.tar.gz` against `expected_md5` and unpacks its
/// batch files into `dir`. Files are first extracted into a temporary directory inside `dir` and
/// renamed into place only once all six `.bin` files are present, so an interrupted or bad
/// archive never leaves a partial dataset behind.
pub fn install_archive(archive: &Path, expected_md5: &str, dir: &Path) -> Result<(), DataError> {
    let actual = md5_hex(archive)?;
    if !actual.eq_ignore_ascii_case(expected_md5) {
        return Err(DataError::Checksum {
            path: archive.to_path_buf(),
            actual,
            expected: expected_md5.to_ascii_lowercase(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let staging = dir.join(".cifar-10-unpack.tmp");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| DataError::io(&staging, e))?;
    let result = unpack_into(archive, &staging).and_then(|extracted| {
        for name in extracted {
            std::fs::rename(staging.join(&name), dir.join(&name))
                .map_err(|e| DataError::io(dir.join(&name), e))?;
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Extracts the wanted files (by file name, wherever they sit in the archive) into `staging`;
/// returns their names once all required ones are there.
fn unpack_into(archive: &Path, staging: &Path) -> Result<Vec<String>, DataError> {
    let bad = |message: String| DataError::Archive {
        path: archive.to_path_buf(),
        message,
    };
    let required: Vec<&str> = TRAIN_BINARY_FILES
        .iter()
        .copied()
        .chain([TEST_BINARY_FILE])
        .collect();
    let wanted = |name: &str| required.contains(&name) || name == "batches.meta.txt";
    let file = std::fs::File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut extracted: Vec<String> = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("not a readable tar.gz: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a readable tar.gz: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path: PathBuf = entry
            .path()
            .map_err(|e| bad(format!("bad entry name: {e}")))?
            .into_owned();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if !wanted(&name) || extracted.contains(&name) {
            continue;
        }
        let target = staging.join(&name);
        let mut out = std::fs::File::create(&target).map_err(|e| DataError::io(&target, e))?;
        std::io::copy(&mut entry, &mut out)
            .map_err(|e| bad(format!("cannot extract {}: {e}", path.display())))?;
        out.sync_all().map_err(|e| DataError::io(&target, e))?;
        extracted.push(name);
    }
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|r| !extracted.iter().any(|e| e == r))
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "archive lacks {} (not the CIFAR-10 binary archive?)",
            missing.join(", ")
        )));
    }
    Ok(extracted)
}
