//! The download path, without internet: a refused connection, a local one-shot HTTP server,
//! and md5 checking + unpacking of archives built here.
#![cfg(feature = "download")]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use cifar_data::{
    download_from_url, install_archive, load_test, load_train, md5_hex, write_binary_batch,
    DataError, OFFICIAL_BINARY_URL,
};
use common::{synthetic, TempDir};

/// A tar.gz shaped like the official archive (files under `cifar-10-batches-bin/`), with small
/// batch files; `skip` leaves one file out.
fn build_archive(path: &Path, skip: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let scratch = TempDir::new("archive-src");
    let mut files = Vec::new();
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (k, name) in names.iter().enumerate() {
        let (images, labels) = synthetic(3, k as u32);
        let p = scratch.path().join(name);
        write_binary_batch(&p, &images, &labels).unwrap();
        files.push((name.to_string(), std::fs::read(&p).unwrap()));
    }
    files.push((
        "batches.meta.txt".into(),
        b"airplane\nautomobile\n".to_vec(),
    ));
    files.push(("readme.html".into(), b"<html></html>".to_vec()));
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in &files {
        if Some(name.as_str()) == skip {
            continue;
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("cifar-10-batches-bin/{name}"),
            bytes.as_slice(),
        )
        .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    files
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

const INSTALLED: [&str; 7] = [
    "batches.meta.txt",
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

#[test]
fn offline_download_fails_with_manual_instructions() {
    let tmp = TempDir::new("offline");
    let dest = tmp.path().join("cifar");
    let err = download_from_url(
        "http://127.0.0.1:1/cifar-10-binary.tar.gz",
        "c32a1d4ab5d03f1284b67883e8d87530",
        &dest,
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Download { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("127.0.0.1:1"), "{msg}");
    assert!(msg.contains(OFFICIAL_BINARY_URL), "{msg}");
    assert!(msg.contains(&dest.display().to_string()), "{msg}");
    assert!(dir_names(&dest).is_empty(), "nothing is left behind");
}

#[test]
fn install_checks_md5_and_unpacks_only_batch_files() {
    let tmp = TempDir::new("install");
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    let files = build_archive(&archive, None);
    let md5 = md5_hex(&archive).unwrap();
    assert_eq!(md5.len(), 32);

    let dest = tmp.path().join("data");
    let err = install_archive(&archive, "00000000000000000000000000000000", &dest).unwrap_err();
    assert!(matches!(err, DataError::Checksum { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&md5) && msg.contains("cifar-10-binary.tar.gz"),
        "{msg}"
    );
    assert!(!dest.exists() || dir_names(&dest).is_empty());

    install_archive(&archive, &md5.to_uppercase(), &dest).unwrap();
    assert_eq!(dir_names(&dest), INSTALLED);
    for (name, bytes) in &files {
        if name != "readme.html" {
            assert!(&std::fs::read(dest.join(name)).unwrap() == bytes, "{name}");
        }
    }
    // the unpacked files are real batches (3 records each, so only the record-count check fails)
    let err = load_test(&dest).unwrap_err();
    assert!(
        matches!(err, DataError::RecordCount { found: 3, .. }),
        "{err:?}"
    );
}

#[test]
fn incomplete_archive_installs_nothing() {
    let tmp = TempDir::new("incomplete");
    let archive = tmp.path().join("partial.tar.gz");
    build_archive(&archive, Some("test_batch.bin"));
    let md5 = md5_hex(&archive).unwrap();
    let dest = tmp.path().join("data");
    let err = install_archive(&archive, &md5, &dest).unwrap_err();
    assert!(matches!(err, DataError::Archive { .. }), "{err:?}");
    assert!(err.to_string().contains("test_batch.bin"), "{err}");
    assert!(dir_names(&dest).is_empty(), "{:?}", dir_names(&dest));
    assert!(load_train(&dest).is_err());
}

/// Serves `body` with the given status line to one HTTP request on a local port.
fn serve_once(status: &'static str, body: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/x-gzip\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
    });
    (format!("http://{addr}/cifar-10-binary.tar.gz"), handle)
}

#[test]
fn download_from_a_local_server() {
    let tmp = TempDir::new("http");
    let archive = tmp.path().join("served.tar.gz");
    build_archive(&archive, None);
    let md5 = md5_hex(&archive).unwrap();
    let bytes = std::fs::read(&archive).unwrap();

    let dest = tmp.path().join("data");
    let (url, server) = serve_once("200 OK", bytes.clone());
    download_from_url(&url, &md5, &dest).unwrap();
    server.join().unwrap();
    assert_eq!(
        dir_names(&dest),
        INSTALLED,
        "the downloaded archive is removed"
    );

    // a corrupted transfer is caught by the md5 check and leaves nothing behind
    let dest2 = tmp.path().join("data2");
    let mut corrupted = bytes.clone();
    let mid = corrupted.len() / 2;
    corrupted[mid] ^= 0xff;
    let (url, server) = serve_once("200 OK", corrupted);
    let err = download_from_url(&url, &md5, &dest2).unwrap_err();
    server.join().unwrap();
    assert!(matches!(err, DataError::Checksum { .. }), "{err:?}");
    assert!(dir_names(&dest2).is_empty(), "{:?}", dir_names(&dest2));

    // an HTTP error status is a download error
    let (url, server) = serve_once("404 Not Found", b"gone".to_vec());
    let err = download_from_url(&url, &md5, &dest2).unwrap_err();
    server.join().unwrap();
    assert!(matches!(err, DataError::Download { .. }), "{err:?}");
    assert!(err.to_string().contains("404"), "{err}");
}
