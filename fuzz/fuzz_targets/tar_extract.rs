//! Fuzz target for the buildlet's tarball policy: arbitrary bytes (as a gzip stream, and
//! gzip-wrapped as a raw tar) are extracted into a sandbox; whatever happens, nothing
//! outside the destination may change and the staging dir must be gone.

#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use buildlet::tarball::{Limits, extract_tar_gz};
use libfuzzer_sys::fuzz_target;

/// Paths and contents (or link targets) of everything under `root`, without following links.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let content = if meta.file_type().is_symlink() {
                fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if meta.is_dir() {
                stack.push(path.clone());
                b"<dir>".to_vec()
            } else {
                fs::read(&path).unwrap()
            };
            out.insert(path, content);
        }
    }
    out
}

fn check(input: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("work/dest");
    let staging = tmp.path().join("work/staging");
    let sentinel = tmp.path().join("sentinel");
    fs::create_dir_all(&dest).unwrap();
    fs::create_dir_all(&staging).unwrap();
    fs::create_dir_all(&sentinel).unwrap();
    fs::write(sentinel.join("secret"), b"secret").unwrap();
    fs::write(dest.join("existing"), b"existing").unwrap();

    let outside = |snap: BTreeMap<PathBuf, Vec<u8>>| -> BTreeMap<PathBuf, Vec<u8>> {
        snap.into_iter()
            .filter(|(p, _)| !p.starts_with(&dest))
            .collect()
    };
    let before_all = snapshot(tmp.path());
    let limits = Limits {
        max_bytes: 8 << 20,
        max_entries: 10_000,
        max_ratio: 1000,
    };
    let result = extract_tar_gz(input, &dest, &staging, &limits);
    let after_all = snapshot(tmp.path());
    if result.is_err() {
        assert_eq!(
            before_all, after_all,
            "a refused tarball changed the sandbox"
        );
    } else {
        assert_eq!(
            outside(before_all),
            outside(after_all),
            "wrote outside dest"
        );
    }
    assert_eq!(
        fs::read_dir(&staging).unwrap().count(),
        0,
        "staging left behind"
    );
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes mostly exercise the gzip layer; wrapping them reaches the tar layer.
    check(data);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    if enc.write_all(data).is_ok()
        && let Ok(wrapped) = enc.finish()
    {
        check(&wrapped);
    }
});
