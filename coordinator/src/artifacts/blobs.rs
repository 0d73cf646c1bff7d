//! The content-addressed file store of artifacts: each distinct content is one file
//! under `<data dir>/artifacts/sha256/<first two hex digits>/<sha256>`, written to a
//! temporary file first and renamed into place once complete (so a reader never sees
//! half a file, and identical outputs of many builds take the space once). Which builds
//! point at which digest is the store's `artifacts` table. Blocking: call from
//! `spawn_blocking`.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

pub struct BlobStore {
    root: PathBuf,
}

/// A file copied into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub sha256: String,
    pub size: u64,
}

/// Whether `s` is a digest this store names files by (64 lowercase hex digits).
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl BlobStore {
    /// The store under `<data_dir>/artifacts`; directories are made when first needed.
    pub fn new(data_dir: &Path) -> BlobStore {
        BlobStore {
            root: data_dir.join("artifacts"),
        }
    }

    /// Removes temporary files a previous run left (at start-up).
    pub fn clear_tmp(&self) -> Result<()> {
        let tmp = self.tmp_dir();
        match std::fs::remove_dir_all(&tmp) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("emptying {}", tmp.display())),
        }
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the content with this digest lives (whether or not it is there).
    pub fn path(&self, sha256: &str) -> Result<PathBuf> {
        if !is_digest(sha256) {
            bail!("{sha256:?} is not a sha256 digest");
        }
        Ok(self.root.join("sha256").join(&sha256[..2]).join(sha256))
    }

    /// A temporary file in the store's own directory (same filesystem, so the final
    /// rename is atomic).
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile> {
        let tmp = self.tmp_dir();
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        tempfile::NamedTempFile::new_in(&tmp).context("creating a temporary artifact file")
    }

    /// Copies `reader` into the store, hashing as it goes; more than `max_bytes` is
    /// refused (`what` names the file in that error) and nothing is kept.
    pub fn put(&self, reader: &mut dyn Read, max_bytes: u64, what: &str) -> Result<Stored> {
        let mut tmp = self.temp_file()?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .with_context(|| format!("reading {what}"))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > max_bytes {
                bail!("{what} is larger than artifacts.max_file_bytes ({max_bytes} bytes)");
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .context("writing a temporary artifact file")?;
        }
        tmp.flush().context("flushing a temporary artifact file")?;
        let sha256 = hex::encode(hasher.finalize());
        let dest = self.path(&sha256)?;
        if dest.exists() {
            // Same content already stored: the temporary copy goes away on drop.
            return Ok(Stored { sha256, size });
        }
        let parent = dest.parent().context("blob path has no parent")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        tmp.as_file()
            .sync_all()
            .context("syncing an artifact file")?;
        tmp.persist(&dest)
            .map_err(|e| e.error)
            .with_context(|| format!("moving an artifact into {}", dest.display()))?;
        Ok(Stored { sha256, size })
    }

    /// Removes every stored content whose digest is not in `keep`; returns the files and
    /// bytes removed.
    pub fn remove_unreferenced(&self, keep: &HashSet<String>) -> Result<(u64, u64)> {
        let (mut files, mut bytes) = (0u64, 0u64);
        let top = self.root.join("sha256");
        if !top.exists() {
            return Ok((0, 0));
        }
        for entry in walkdir::WalkDir::new(&top).min_depth(2).max_depth(2) {
            let entry = entry.with_context(|| format!("walking {}", top.display()))?;
            let name = entry.file_name().to_string_lossy();
            if !entry.file_type().is_file() || keep.contains(name.as_ref()) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    files += 1;
                    bytes += size;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", entry.path().display()));
                }
            }
        }
        Ok((files, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_addressed_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let a = store.put(&mut &b"hello"[..], 100, "a").unwrap();
        assert_eq!(
            a.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(a.size, 5);
        let b = store.put(&mut &b"hello"[..], 100, "b").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            std::fs::read(store.path(&a.sha256).unwrap()).unwrap(),
            b"hello"
        );
        // Nothing left behind in tmp.
        assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn too_big_is_refused_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let err = store
            .put(&mut &[7u8; 1000][..], 999, "bin/tool")
            .unwrap_err();
        assert!(err.to_string().contains("bin/tool"), "{err}");
        assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
        let removed = store.remove_unreferenced(&HashSet::new()).unwrap();
        assert_eq!(removed, (0, 0));
    }

    #[test]
    fn unreferenced_content_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let keep = store.put(&mut &b"keep"[..], 100, "k").unwrap();
        let drop = store.put(&mut &b"drop!"[..], 100, "d").unwrap();
        let removed = store
            .remove_unreferenced(&HashSet::from([keep.sha256.clone()]))
            .unwrap();
        assert_eq!(removed, (1, 5));
        assert!(store.path(&keep.sha256).unwrap().exists());
        assert!(!store.path(&drop.sha256).unwrap().exists());
        assert!(store.path("../../etc").is_err());
    }
}
