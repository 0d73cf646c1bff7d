//! Helpers shared by the tarball tests: a sandbox with a destination, a sentinel dir beside
//! it and a staging root, raw tarball builders that can write hostile names, and snapshots
//! of a directory tree to compare before and after.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use buildlet::tarball::{ExtractStats, Limits, TarError, extract_tar_gz};
use tar::{EntryType, Header};

/// One node of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: PathBuf },
}

/// Every path under `root` (relative), without following symlinks.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    for item in walkdir::WalkDir::new(root).follow_links(false) {
        let item = item.unwrap();
        let rel = item.path().strip_prefix(root).unwrap().to_path_buf();
        let meta = fs::symlink_metadata(item.path()).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let node = if meta.file_type().is_symlink() {
            Node::Symlink {
                target: fs::read_link(item.path()).unwrap(),
            }
        } else if meta.is_dir() {
            Node::Dir { mode }
        } else {
            Node::File {
                mode,
                data: fs::read(item.path()).unwrap(),
            }
        };
        out.insert(rel, node);
    }
    out
}

/// A temp dir laid out as `work/dest` (with some existing content), `work/.staging`, and a
/// `sentinel` dir beside `work` that nothing may ever touch.
pub struct Sandbox {
    pub tmp: tempfile::TempDir,
    pub dest: PathBuf,
    pub staging: PathBuf,
    pub sentinel: PathBuf,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("work/dest");
        let staging = tmp.path().join("work/.staging");
        let sentinel = tmp.path().join("sentinel");
        fs::create_dir_all(dest.join("sub")).unwrap();
        fs::create_dir_all(&staging).unwrap();
        fs::create_dir_all(&sentinel).unwrap();
        fs::write(dest.join("existing.txt"), b"existing").unwrap();
        fs::write(dest.join("sub/keep"), b"keep").unwrap();
        fs::write(sentinel.join("secret"), b"secret").unwrap();
        Sandbox {
            tmp,
            dest,
            staging,
            sentinel,
        }
    }

    pub fn snapshot_all(&self) -> BTreeMap<PathBuf, Node> {
        snapshot(self.tmp.path())
    }

    pub fn extract(&self, tgz: &[u8], limits: &Limits) -> Result<ExtractStats, TarError> {
        extract_tar_gz(tgz, &self.dest, &self.staging, limits)
    }

    /// Extracts and asserts the whole sandbox is unchanged afterwards; returns the error.
    pub fn extract_refused(&self, tgz: &[u8], limits: &Limits) -> TarError {
        let before = self.snapshot_all();
        let result = self.extract(tgz, limits);
        let after = self.snapshot_all();
        assert_eq!(before, after, "a refused tarball changed the sandbox");
        match result {
            Ok(stats) => panic!("expected a refusal, extracted {stats:?}"),
            Err(e) => e,
        }
    }

    /// Asserts nothing outside `work/dest` changed between `before` and now, and the staging
    /// root is empty.
    pub fn assert_outside_unchanged(&self, before: &BTreeMap<PathBuf, Node>) {
        let after = self.snapshot_all();
        let outside = |m: &BTreeMap<PathBuf, Node>| -> BTreeMap<PathBuf, Node> {
            m.iter()
                .filter(|(p, _)| !p.starts_with("work/dest/"))
                .filter(|(p, _)| p.as_path() != Path::new("work/dest"))
                .map(|(p, n)| (p.clone(), n.clone()))
                .collect()
        };
        assert_eq!(
            outside(before),
            outside(&after),
            "something outside dest changed"
        );
    }
}

/// One raw tar entry; names are written into the header bytes as given, so `..` and
/// absolute paths are possible.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub name: Vec<u8>,
    pub kind: EntryType,
    pub link: Vec<u8>,
    pub data: Vec<u8>,
    pub mode: u32,
    /// Size written in the header; `None` means `data.len()`.
    pub declared_size: Option<u64>,
}

impl RawEntry {
    pub fn file(name: &str, data: &[u8]) -> RawEntry {
        RawEntry {
            name: name.as_bytes().to_vec(),
            kind: EntryType::Regular,
            link: Vec::new(),
            data: data.to_vec(),
            mode: 0o644,
            declared_size: None,
        }
    }

    pub fn dir(name: &str) -> RawEntry {
        RawEntry {
            kind: EntryType::Directory,
            mode: 0o755,
            ..RawEntry::file(name, b"")
        }
    }

    pub fn symlink(name: &str, target: &str) -> RawEntry {
        RawEntry {
            kind: EntryType::Symlink,
            link: target.as_bytes().to_vec(),
            mode: 0o777,
            ..RawEntry::file(name, b"")
        }
    }

    pub fn hardlink(name: &str, target: &str) -> RawEntry {
        RawEntry {
            kind: EntryType::Link,
            link: target.as_bytes().to_vec(),
            ..RawEntry::file(name, b"")
        }
    }

    pub fn special(name: &str, kind: EntryType) -> RawEntry {
        RawEntry {
            kind,
            ..RawEntry::file(name, b"")
        }
    }

    pub fn with_mode(mut self, mode: u32) -> RawEntry {
        self.mode = mode;
        self
    }
}

/// An uncompressed tar of `entries` (names up to 100 bytes, written raw).
pub fn raw_tar(entries: &[RawEntry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut header = Header::new_gnu();
        {
            let gnu = header.as_gnu_mut().unwrap();
            let n = e.name.len().min(gnu.name.len());
            gnu.name[..n].copy_from_slice(&e.name[..n]);
            let l = e.link.len().min(gnu.linkname.len());
            gnu.linkname[..l].copy_from_slice(&e.link[..l]);
        }
        header.set_entry_type(e.kind);
        header.set_mode(e.mode);
        header.set_mtime(1_600_000_000);
        header.set_size(e.declared_size.unwrap_or(e.data.len() as u64));
        header.set_cksum();
        builder.append(&header, e.data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub fn raw_tgz(entries: &[RawEntry]) -> Vec<u8> {
    gzip(&raw_tar(entries))
}

/// Limits small enough for fast tests.
pub fn small_limits() -> Limits {
    Limits {
        max_bytes: 10 << 20,
        max_entries: 1000,
        max_ratio: 100,
    }
}

pub fn inode(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().ino()
}
