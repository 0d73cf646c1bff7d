//! Where plan steps' snapshots and caches live on the coordinator: tar.gz files under
//! `<data_dir>/workspaces`, content-addressed by SHA-256 (`blobs/<hex>.tar.gz`, checked
//! again whenever one is read, so a corrupt file is found and removed), caches as small
//! named pointers to blobs (`caches/<key>`, one `<hex> <path>` line per saved directory).
//! Retention: blobs unused for `max_age` go, then the least recently used until the total
//! fits `max_bytes`; a blob a running build holds ([`Pin`]) is never removed. The decision
//! is the pure [`to_remove`]; this file's I/O runs in `spawn_blocking`.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The coordinator's snapshots and caches.
pub struct Workspaces {
    root: PathBuf,
    max_bytes: u64,
    max_age: Duration,
    pins: Mutex<HashMap<String, usize>>,
}

/// Keeps a blob from being pruned while held; carries its digest.
pub struct Pin {
    ws: Arc<Workspaces>,
    pub digest: String,
    pub size: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = lock(&self.ws.pins);
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

/// Why a blob could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("blob {0} is missing")]
    Missing(String),
    #[error("blob {digest} is corrupt (its content hashes to {actual})")]
    Corrupt { digest: String, actual: String },
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// One cache's saved directories: (blob digest, path in the workdir).
pub type CacheEntry = Vec<(String, String)>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn is_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), size))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("workspace task panicked")?
}

impl Workspaces {
    pub fn new(root: PathBuf, max_bytes: u64, max_age: Duration) -> Arc<Workspaces> {
        Arc::new(Workspaces {
            root,
            max_bytes,
            max_age,
            pins: Mutex::new(HashMap::new()),
        })
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{digest}.tar.gz"))
    }

    fn cache_path(&self, key: &str) -> PathBuf {
        self.root.join("caches").join(key)
    }

    /// A fresh file to download into; [`Workspaces::adopt`] moves it in by digest.
    pub async fn temp_file(&self) -> Result<(tempfile::TempPath, tokio::fs::File)> {
        let dir = self.root.join("tmp");
        blocking(move || {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let f = tempfile::NamedTempFile::new_in(&dir)
                .with_context(|| format!("creating a file in {}", dir.display()))?;
            let (file, path) = f.into_parts();
            Ok((path, tokio::fs::File::from_std(file)))
        })
        .await
    }

    fn pin(self: &Arc<Self>, digest: &str, size: u64) -> Pin {
        *lock(&self.pins).entry(digest.to_owned()).or_default() += 1;
        Pin {
            ws: self.clone(),
            digest: digest.to_owned(),
            size,
        }
    }

    /// Moves a downloaded file in under its content digest (an identical blob already
    /// there is kept and marked used) and pins it.
    pub async fn adopt(self: &Arc<Self>, tmp: tempfile::TempPath) -> Result<Pin> {
        let blobs = self.root.join("blobs");
        let this = self.clone();
        let (digest, size) = blocking(move || {
            let (digest, size) =
                hash_file(&tmp).with_context(|| format!("hashing {}", tmp.display()))?;
            std::fs::create_dir_all(&blobs)
                .with_context(|| format!("creating {}", blobs.display()))?;
            let dest = this.blob_path(&digest);
            if dest.exists() {
                touch(&dest);
            } else {
                tmp.persist(&dest)
                    .with_context(|| format!("moving a blob to {}", dest.display()))?;
            }
            Ok((digest, size))
        })
        .await?;
        Ok(self.pin(&digest, size))
    }

    /// Opens a blob after checking its content still has its digest (a corrupt one is
    /// removed), marks it used and pins it.
    pub async fn open(self: &Arc<Self>, digest: &str) -> Result<(Pin, tokio::fs::File), ReadError> {
        if !is_digest(digest) {
            return Err(ReadError::Io(anyhow::anyhow!("bad blob digest {digest:?}")));
        }
        let path = self.blob_path(digest);
        // Pinned before reading, so a prune between the check and the use cannot remove it.
        let pin = self.pin(digest, 0);
        let (want, p) = (digest.to_owned(), path.clone());
        let checked = tokio::task::spawn_blocking(move || -> Result<(), ReadError> {
            let (actual, _) = match hash_file(&p) {
                Ok(v) => v,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ReadError::Missing(want));
                }
                Err(e) => {
                    return Err(ReadError::Io(
                        anyhow::Error::new(e).context(format!("reading {}", p.display())),
                    ));
                }
            };
            if actual != want {
                let _ = std::fs::remove_file(&p);
                return Err(ReadError::Corrupt {
                    digest: want,
                    actual,
                });
            }
            touch(&p);
            Ok(())
        })
        .await
        .map_err(|e| ReadError::Io(anyhow::anyhow!("workspace task panicked: {e}")))?;
        checked?;
        let file = tokio::fs::File::open(&path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        Ok((pin, file))
    }

    /// The cache saved under `key`, if any.
    pub async fn cache_get(&self, key: &str) -> Result<Option<CacheEntry>> {
        if !is_key(key) {
            bail!("bad cache key {key:?}");
        }
        let path = self.cache_path(key);
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut out = Vec::new();
        for line in text.lines() {
            match line.split_once(' ') {
                Some((d, p)) if is_digest(d) && !p.is_empty() => {
                    out.push((d.to_owned(), p.to_owned()))
                }
                // A damaged pointer is a corrupt cache: the caller discards it.
                _ => bail!("cache {key}: bad line {line:?}"),
            }
        }
        Ok(Some(out))
    }

    /// Saves (replaces) the cache `key`.
    pub async fn cache_put(&self, key: &str, entry: &CacheEntry) -> Result<()> {
        if !is_key(key) {
            bail!("bad cache key {key:?}");
        }
        let text: String = entry.iter().map(|(d, p)| format!("{d} {p}\n")).collect();
        let (dir, path) = (self.root.join("caches"), self.cache_path(key));
        blocking(move || {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut f = tempfile::NamedTempFile::new_in(&dir)
                .with_context(|| format!("creating a file in {}", dir.display()))?;
            std::io::Write::write_all(&mut f, text.as_bytes())
                .context("writing a cache pointer")?;
            f.persist(&path)
                .with_context(|| format!("saving {}", path.display()))?;
            Ok(())
        })
        .await
    }

    /// Forgets the cache `key` (its blobs go by retention).
    pub async fn cache_discard(&self, key: &str) {
        if is_key(key) {
            let _ = tokio::fs::remove_file(self.cache_path(key)).await;
        }
    }

    /// Applies the retention policy at `now`; returns the digests removed.
    pub async fn prune(self: &Arc<Self>, now: SystemTime) -> Result<Vec<String>> {
        let this = self.clone();
        blocking(move || {
            let dir = this.root.join("blobs");
            let mut blobs = Vec::new();
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(digest) = name.strip_suffix(".tar.gz").filter(|d| is_digest(d)) else {
                    continue;
                };
                let Ok(meta) = e.metadata() else { continue };
                blobs.push(BlobInfo {
                    digest: digest.to_owned(),
                    size: meta.len(),
                    last_used: meta.modified().unwrap_or(now),
                });
            }
            let pinned: HashSet<String> = lock(&this.pins).keys().cloned().collect();
            let gone = to_remove(&blobs, &pinned, this.max_bytes, this.max_age, now);
            for d in &gone {
                let _ = std::fs::remove_file(this.blob_path(d));
            }
            // Cache pointers unused as long are dropped too (their blobs went above).
            if let Ok(rd) = std::fs::read_dir(this.root.join("caches")) {
                for e in rd.flatten() {
                    let old = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| now.duration_since(t).ok())
                        .is_some_and(|age| age > this.max_age);
                    if old {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            Ok(gone)
        })
        .await
    }
}

/// Marks a file used now (its mtime is the retention clock).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// A stored blob as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
    pub last_used: SystemTime,
}

/// Which blobs to remove: unpinned ones unused for longer than `max_age`, then unpinned
/// ones least recently used first until the rest fit in `max_bytes`.
pub fn to_remove(
    blobs: &[BlobInfo],
    pinned: &HashSet<String>,
    max_bytes: u64,
    max_age: Duration,
    now: SystemTime,
) -> Vec<String> {
    let mut by_age: Vec<&BlobInfo> = blobs.iter().collect();
    by_age.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.digest.cmp(&b.digest)));
    let mut total: u64 = blobs.iter().map(|b| b.size).sum();
    let mut out = Vec::new();
    for b in by_age {
        if pinned.contains(&b.digest) {
            continue;
        }
        let too_old = now
            .duration_since(b.last_used)
            .is_ok_and(|age| age > max_age);
        if too_old || total > max_bytes {
            total -= b.size;
            out.push(b.digest.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(d: char, size: u64, secs_ago: u64, now: SystemTime) -> BlobInfo {
        BlobInfo {
            digest: d.to_string().repeat(64),
            size,
            last_used: now - Duration::from_secs(secs_ago),
        }
    }

    #[test]
    fn old_blobs_go_then_least_recently_used_until_they_fit() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let blobs = [
            blob('a', 10, 500, now), // too old
            blob('b', 40, 300, now),
            blob('c', 40, 200, now),
            blob('d', 40, 100, now),
        ];
        let none = HashSet::new();
        let gone = to_remove(&blobs, &none, 100, Duration::from_secs(400), now);
        assert_eq!(gone, ["a".repeat(64), "b".repeat(64)]);
        // Everything fits and nothing is old: nothing goes.
        assert!(to_remove(&blobs, &none, 1000, Duration::from_secs(1000), now).is_empty());
    }

    #[test]
    fn pinned_blobs_stay_even_when_old_or_over_budget() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let blobs = [blob('a', 50, 900, now), blob('b', 50, 10, now)];
        let pinned: HashSet<String> = ["a".repeat(64)].into();
        let gone = to_remove(&blobs, &pinned, 60, Duration::from_secs(100), now);
        assert_eq!(gone, ["b".repeat(64)]);
    }

    #[tokio::test]
    async fn blobs_round_trip_and_corruption_is_found_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspaces::new(dir.path().to_owned(), 1 << 30, Duration::from_secs(3600));
        let (tmp, mut f) = ws.temp_file().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut f, b"snapshot bytes")
            .await
            .unwrap();
        drop(f);
        let pin = ws.adopt(tmp).await.unwrap();
        assert_eq!(pin.digest, hex::encode(Sha256::digest(b"snapshot bytes")));
        let (_p, _f) = ws.open(&pin.digest).await.unwrap();

        ws.cache_put("k1", &vec![(pin.digest.clone(), "gocache".into())])
            .await
            .unwrap();
        assert_eq!(
            ws.cache_get("k1").await.unwrap(),
            Some(vec![(pin.digest.clone(), "gocache".to_owned())])
        );
        assert_eq!(ws.cache_get("k2").await.unwrap(), None);
        assert!(ws.cache_get("../x").await.is_err());

        std::fs::write(ws.blob_path(&pin.digest), b"flipped bytes").unwrap();
        match ws.open(&pin.digest).await {
            Err(ReadError::Corrupt { .. }) => {}
            other => panic!("want corrupt, got {:?}", other.map(|_| ())),
        }
        assert!(matches!(
            ws.open(&pin.digest).await,
            Err(ReadError::Missing(_))
        ));
    }

    #[tokio::test]
    async fn prune_keeps_pinned_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspaces::new(dir.path().to_owned(), 0, Duration::from_secs(3600));
        let mut pins = Vec::new();
        for body in [b"one".as_slice(), b"two".as_slice()] {
            let (tmp, mut f) = ws.temp_file().await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut f, body)
                .await
                .unwrap();
            drop(f);
            pins.push(ws.adopt(tmp).await.unwrap());
        }
        let kept = pins.remove(0);
        drop(pins);
        let gone = ws.prune(SystemTime::now()).await.unwrap();
        assert_eq!(gone.len(), 1, "the unpinned blob goes over a zero budget");
        assert!(ws.open(&kept.digest).await.is_ok());
    }
}
