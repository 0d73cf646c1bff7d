//! Source tarballs for builds: each (repo, rev, patch) is made once however many
//! builders ask at the same time (the others wait for it), kept on disk, and the cache
//! is bounded by size with least-recently-used eviction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use crate::git::Mirror;

/// Sizes and recency of cached files, and which to evict: pure bookkeeping.
#[derive(Debug, Default)]
pub struct Lru {
    entries: HashMap<PathBuf, (u64, u64)>,
    total: u64,
    tick: u64,
}

impl Lru {
    /// Marks `path` (of `size` bytes) as just used and returns the files to evict so the
    /// total fits `limit`, least recently used first. `path` itself is never evicted,
    /// even when it alone is over the limit: a build is using it.
    pub fn use_file(&mut self, path: &Path, size: u64, limit: u64) -> Vec<PathBuf> {
        self.tick += 1;
        match self.entries.get_mut(path) {
            Some(e) => {
                self.total = self.total - e.0 + size;
                *e = (size, self.tick);
            }
            None => {
                self.entries.insert(path.to_owned(), (size, self.tick));
                self.total += size;
            }
        }
        let mut evicted = Vec::new();
        while self.total > limit {
            let Some(oldest) = self
                .entries
                .iter()
                .filter(|(p, _)| p.as_path() != path)
                .min_by_key(|(_, (_, t))| *t)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            self.forget(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    pub fn forget(&mut self, path: &Path) {
        if let Some((size, _)) = self.entries.remove(path) {
            self.total -= size;
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

#[derive(Default)]
struct State {
    /// One cell per tarball: the first caller makes it, the rest wait on the cell.
    cells: HashMap<PathBuf, Arc<OnceCell<u64>>>,
    lru: Lru,
}

pub struct SourceCache {
    limit: u64,
    state: Mutex<State>,
    built: AtomicU64,
}

impl SourceCache {
    /// A cache of at most `limit` bytes, counting the tarballs already in each mirror's
    /// cache dir (oldest modified first), evicting at once if they are over it.
    pub fn new<'a>(limit: u64, mirrors: impl IntoIterator<Item = &'a Mirror>) -> SourceCache {
        let cache = SourceCache {
            limit,
            state: Mutex::new(State::default()),
            built: AtomicU64::new(0),
        };
        let mut found = Vec::new();
        for m in mirrors {
            let Ok(rd) = std::fs::read_dir(m.cache_dir()) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if !p.to_string_lossy().ends_with(".tar.gz") {
                    continue;
                }
                if let Ok(meta) = e.metadata() {
                    let mtime = meta.modified().ok();
                    found.push((mtime, p, meta.len()));
                }
            }
        }
        found.sort();
        for (_, path, size) in found {
            cache.account(&path, size);
        }
        cache
    }

    /// Tarballs made since start (not counting ones found on disk).
    pub fn built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    /// Bytes of tarballs on disk, as counted.
    pub fn total_bytes(&self) -> u64 {
        self.state().lru.total()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a use of `path` and deletes what no longer fits.
    fn account(&self, path: &Path, size: u64) {
        let evicted = {
            let mut st = self.state();
            let evicted = st.lru.use_file(path, size, self.limit);
            for p in &evicted {
                st.cells.remove(p);
            }
            evicted
        };
        for p in evicted {
            // A build that already opened it keeps reading (unlinked files live on).
            match std::fs::remove_file(&p) {
                Ok(()) => debug!(path = %p.display(), "evicted source tarball"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => warn!(path = %p.display(), %error, "cannot evict source tarball"),
            }
        }
    }

    /// The source of `rev` (plus `patch`) in `mirror`, opened for reading. Made once
    /// however many callers ask at once. Errors name no server path.
    pub async fn open(
        &self,
        mirror: &Mirror,
        rev: &str,
        patch: Option<&[u8]>,
    ) -> Result<tokio::fs::File> {
        let path = mirror.tarball_path(rev, patch)?;
        // A second round only when the file was evicted between being made and opened.
        for _ in 0..2 {
            let cell = self.state().cells.entry(path.clone()).or_default().clone();
            let size = *cell
                .get_or_try_init(|| async {
                    if let Ok(meta) = tokio::fs::metadata(&path).await {
                        return Ok::<u64, anyhow::Error>(meta.len());
                    }
                    mirror.build_tarball(rev, patch, &path).await?;
                    self.built.fetch_add(1, Ordering::Relaxed);
                    let size = tokio::fs::metadata(&path)
                        .await
                        .context("the new source tarball is missing")?
                        .len();
                    info!(repo = %mirror.name, rev, size, "made source tarball");
                    Ok(size)
                })
                .await?;
            self.account(&path, size);
            match tokio::fs::File::open(&path).await {
                Ok(f) => return Ok(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mut st = self.state();
                    st.cells.remove(&path);
                    st.lru.forget(&path);
                }
                Err(e) => return Err(e).context("opening the source tarball"),
            }
        }
        anyhow::bail!("the source tarball of {rev} was evicted twice while being opened")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first_and_the_file_in_use_never() {
        let mut lru = Lru::default();
        let (a, b, c) = (Path::new("a"), Path::new("b"), Path::new("c"));
        assert!(lru.use_file(a, 40, 100).is_empty());
        assert!(lru.use_file(b, 40, 100).is_empty());
        // a is used again, so b is now the oldest.
        assert!(lru.use_file(a, 40, 100).is_empty());
        assert_eq!(lru.use_file(c, 40, 100), vec![PathBuf::from("b")]);
        assert_eq!(lru.total(), 80);
        // One file bigger than the limit evicts everything else but stays.
        let big = Path::new("big");
        let mut out = lru.use_file(big, 500, 100);
        out.sort();
        assert_eq!(out, vec![PathBuf::from("a"), PathBuf::from("c")]);
        assert_eq!(lru.total(), 500);
        lru.forget(big);
        assert_eq!(lru.total(), 0);
    }
}
