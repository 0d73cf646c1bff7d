//! Tarball safety policy: extraction of client-supplied tar.gz streams into the workdir and
//! writing a directory out as tar.gz.
//!
//! Extraction is all-or-nothing. Entries are written into a fresh staging directory, each one
//! checked before anything is written for it: no absolute names, no `..`, no symlink target or
//! hard link leaving the destination, no devices or fifos, never writing through a symlink
//! (every parent in the staging dir must be a real directory), and bounded entry count,
//! uncompressed size and compression ratio. Only when the whole stream (including the gzip
//! trailer) has been accepted are the staged entries renamed into the destination.

use std::cell::Cell;
use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tar::EntryType;

/// The compression ratio is only enforced once this many bytes were decompressed, so that
/// small, very regular tarballs (a few empty files) are not refused.
pub const RATIO_GRACE_BYTES: u64 = 1 << 20;

/// Bounds on one extraction.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Maximum uncompressed bytes: both the sum of the sizes declared by entries and the
    /// bytes actually produced by the decompressor (headers included). Default 4 GiB.
    pub max_bytes: u64,
    /// Maximum number of tar entries (files, dirs, links). Default 1,000,000.
    pub max_entries: u64,
    /// Maximum ratio of decompressed to compressed bytes, checked as the stream is read once
    /// more than [`RATIO_GRACE_BYTES`] were decompressed. Default 200: deflate tops out near
    /// 1032:1 (all zeros) and source trees compress 3-10x, so 200 leaves room for repetitive
    /// test data while refusing streams that are essentially padding.
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 << 30,
            max_entries: 1_000_000,
            max_ratio: 200,
        }
    }
}

/// What an accepted extraction wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtractStats {
    /// Tar entries processed (files, directories, links).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Why a tarball was refused or could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("not a gzip stream")]
    NotGzip,
    #[error("corrupt or truncated tarball: {0}")]
    Corrupt(#[source] io::Error),
    #[error("entry {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("entry {0:?} has an empty name")]
    EmptyName(String),
    #[error("entry {0:?} contains a NUL byte")]
    NulByte(String),
    #[error("entry {0:?} has an absolute path")]
    Absolute(String),
    #[error("entry {0:?} escapes the target directory")]
    Escapes(String),
    #[error("symlink {path:?} -> {target:?} points outside")]
    SymlinkOutside { path: String, target: String },
    #[error("symlink {path:?} -> {target:?} has \"..\" after a name (only leading \"..\" allowed)")]
    SymlinkDotDotAfterName { path: String, target: String },
    #[error("hard link {path:?} -> {target:?} points outside")]
    HardLinkOutside { path: String, target: String },
    #[error("hard link {path:?} -> {target:?} does not name a file earlier in the tarball")]
    HardLinkUnknown { path: String, target: String },
    #[error("entry {path:?} would be written through symlink {link:?}")]
    ThroughSymlink { path: String, link: String },
    #[error("entry {path:?} conflicts with earlier entry {existing:?}")]
    Conflict { path: String, existing: String },
    #[error("{kind} {path:?} refused")]
    Special { kind: &'static str, path: String },
    #[error("entry {path:?} has unsupported type {kind}")]
    Unsupported { path: String, kind: String },
    #[error("tarball exceeds {} uncompressed limit", fmt_size(*limit))]
    TooLarge { limit: u64 },
    #[error("too many entries (limit {limit})")]
    TooManyEntries { limit: u64 },
    #[error("compression ratio above {limit}")]
    RatioTooHigh { limit: u64 },
    #[error("destination {0:?} is not a directory")]
    DestNotDir(PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn fmt_size(n: u64) -> String {
    const MIB: u64 = 1 << 20;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else {
        format!("{n} bytes")
    }
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> TarError {
    let context = context.into();
    move |source| TarError::Io { context, source }
}

/// Counts bytes read from the compressed input.
struct CountingReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get().saturating_add(n as u64));
        Ok(n)
    }
}

/// Which limit the decompressed stream tripped. Kept outside the io::Error because the tar
/// crate rewraps errors.
#[derive(Debug, Clone, Copy)]
enum Trip {
    Size,
    Ratio,
}

/// Counts decompressed bytes, enforcing `max_bytes` and `max_ratio` as they are produced.
struct LimitReader<R> {
    inner: R,
    read: u64,
    compressed: Rc<Cell<u64>>,
    tripped: Rc<Cell<Option<Trip>>>,
    max_bytes: u64,
    max_ratio: u64,
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tripped.get().is_some() {
            return Err(io::Error::other("tarball limit exceeded"));
        }
        let n = self.inner.read(buf)?;
        self.read = self.read.saturating_add(n as u64);
        let trip = if self.read > self.max_bytes {
            Some(Trip::Size)
        } else if self.read > RATIO_GRACE_BYTES
            && self.read > self.compressed.get().max(1).saturating_mul(self.max_ratio)
        {
            Some(Trip::Ratio)
        } else {
            None
        };
        if let Some(trip) = trip {
            self.tripped.set(Some(trip));
            return Err(io::Error::other("tarball limit exceeded"));
        }
        Ok(n)
    }
}

/// Removes the staging directory on drop, whatever happened.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.0)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), %error, "removing tar staging dir");
        }
    }
}

fn create_staging(staging_root: &Path) -> Result<StagingDir, TarError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    fs::create_dir_all(staging_root).map_err(io_ctx(format!(
        "creating staging root {}",
        staging_root.display()
    )))?;
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            ".tar-staging-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = staging_root.join(name);
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(StagingDir(path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_ctx(format!("creating {}", path.display()))(e)),
        }
    }
}

/// Splits an entry name into its components by the same rule as every other
/// client-supplied path ([`crate::paths::components`]), naming the entry in the error.
fn entry_components<'a>(name: &'a str, display: &str) -> Result<Vec<&'a str>, TarError> {
    use crate::paths::PathError;
    crate::paths::components(name).map_err(|e| match e {
        PathError::NulByte(_) => TarError::NulByte(display.to_owned()),
        PathError::Absolute(_) => TarError::Absolute(display.to_owned()),
        _ => TarError::Escapes(display.to_owned()),
    })
}

/// Checks a symlink target, relative to the link's own directory, stays inside the root.
/// `..` may only lead the target: after a name, `..` would be resolved by the kernel relative
/// to wherever that name (maybe itself a symlink) leads, which a lexical check cannot see.
fn check_symlink_target(parts: &[&str], path: &str, target: &str) -> Result<(), TarError> {
    let outside = || TarError::SymlinkOutside {
        path: path.to_owned(),
        target: target.to_owned(),
    };
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return Err(outside());
    }
    let mut depth = parts.len().saturating_sub(1);
    let mut seen_name = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if seen_name => {
                return Err(TarError::SymlinkDotDotAfterName {
                    path: path.to_owned(),
                    target: target.to_owned(),
                });
            }
            ".." => depth = depth.checked_sub(1).ok_or_else(outside)?,
            _ => seen_name = true,
        }
    }
    Ok(())
}

/// State of one extraction into the staging dir.
struct Extractor<'a> {
    staging: &'a Path,
    /// Regular files extracted so far (normalized names), the only valid hard link targets.
    files: HashSet<String>,
    /// Directories and the modes to give them once everything is written.
    dir_modes: Vec<(PathBuf, u32)>,
    stats: ExtractStats,
    declared: u64,
    limits: &'a Limits,
}

impl Extractor<'_> {
    /// Makes sure every parent of `parts` exists in staging as a real directory, never
    /// following a symlink.
    fn ensure_parents(&mut self, parts: &[&str], display: &str) -> Result<PathBuf, TarError> {
        let mut cur = self.staging.to_path_buf();
        let Some((_, parents)) = parts.split_last() else {
            return Ok(cur);
        };
        for (i, part) in parents.iter().enumerate() {
            cur.push(part);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(TarError::ThroughSymlink {
                        path: display.to_owned(),
                        link: parts[..=i].join("/"),
                    });
                }
                Ok(_) => {
                    return Err(TarError::Conflict {
                        path: display.to_owned(),
                        existing: parts[..=i].join("/"),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&cur)
                        .map_err(io_ctx(format!("creating directory for {display:?}")))?;
                }
                Err(e) => return Err(io_ctx(format!("checking parent of {display:?}"))(e)),
            }
        }
        Ok(cur)
    }

    /// Clears the final component for a non-directory entry: an earlier file or symlink is
    /// replaced, an earlier directory is a conflict.
    fn clear_for_file(&mut self, target: &Path, name: &str, display: &str) -> Result<(), TarError> {
        match fs::symlink_metadata(target) {
            Ok(m) if m.file_type().is_dir() => Err(TarError::Conflict {
                path: display.to_owned(),
                existing: name.to_owned(),
            }),
            Ok(_) => {
                self.files.remove(name);
                fs::remove_file(target).map_err(io_ctx(format!("replacing {display:?}")))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_ctx(format!("checking {display:?}"))(e)),
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), TarError> {
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(TarError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        self.declared = self.declared.saturating_add(entry.size());
        if self.declared > self.limits.max_bytes {
            return Err(TarError::TooLarge {
                limit: self.limits.max_bytes,
            });
        }
        if entry.header().entry_type().is_pax_global_extensions() {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let display = String::from_utf8_lossy(&raw).into_owned();
        let name = std::str::from_utf8(&raw).map_err(|_| TarError::NotUtf8(display.clone()))?;
        let parts = entry_components(name, &display)?;
        let kind = entry.header().entry_type();
        let header_mode = entry.header().mode().unwrap_or(0o644);

        if parts.is_empty() {
            // "./" as a directory is the destination itself.
            return if kind.is_dir() {
                Ok(())
            } else {
                Err(TarError::EmptyName(display))
            };
        }
        let norm = parts.join("/");
        let special = |kind| {
            Err(TarError::Special {
                kind,
                path: display.clone(),
            })
        };
        match kind {
            EntryType::Char => return special("device file"),
            EntryType::Block => return special("device file"),
            EntryType::Fifo => return special("fifo"),
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link => {}
            other => {
                return Err(TarError::Unsupported {
                    path: display,
                    kind: format!("{other:?}"),
                });
            }
        }

        // Validate link targets before touching the filesystem for this entry.
        let link_target = match kind {
            EntryType::Symlink | EntryType::Link => {
                let raw = entry.link_name_bytes().unwrap_or_default().into_owned();
                let target = String::from_utf8(raw)
                    .map_err(|e| TarError::NotUtf8(String::from_utf8_lossy(e.as_bytes()).into()))?;
                Some(target)
            }
            _ => None,
        };
        if kind == EntryType::Symlink {
            check_symlink_target(&parts, &display, link_target.as_deref().unwrap_or(""))?;
        }
        let hard_source = if kind == EntryType::Link {
            let target = link_target.clone().unwrap_or_default();
            let tparts = match entry_components(&target, &target) {
                Ok(p) if !p.is_empty() => p,
                _ => {
                    return Err(TarError::HardLinkOutside {
                        path: display,
                        target,
                    });
                }
            };
            let tnorm = tparts.join("/");
            if !self.files.contains(&tnorm) {
                return Err(TarError::HardLinkUnknown {
                    path: display,
                    target,
                });
            }
            Some(self.staging.join(tnorm))
        } else {
            None
        };

        let parent = self.ensure_parents(&parts, &display)?;
        let last = parts.last().copied().unwrap_or_default();
        let target = parent.join(last);
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => {
                        return Err(TarError::Conflict {
                            path: display,
                            existing: norm,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::DirBuilder::new()
                            .mode(0o755)
                            .create(&target)
                            .map_err(io_ctx(format!("creating directory {display:?}")))?;
                    }
                    Err(e) => return Err(io_ctx(format!("checking {display:?}"))(e)),
                }
                // Owner keeps full access so the workdir can always be cleaned up.
                self.dir_modes.push((target, (header_mode & 0o777) | 0o700));
            }
            EntryType::Symlink => {
                self.clear_for_file(&target, &norm, &display)?;
                std::os::unix::fs::symlink(link_target.unwrap_or_default(), &target)
                    .map_err(io_ctx(format!("creating symlink {display:?}")))?;
            }
            EntryType::Link => {
                self.clear_for_file(&target, &norm, &display)?;
                let source = hard_source.unwrap_or_default();
                fs::hard_link(&source, &target)
                    .map_err(io_ctx(format!("creating hard link {display:?}")))?;
                self.files.insert(norm);
            }
            _ => {
                self.clear_for_file(&target, &norm, &display)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_ctx(format!("creating {display:?}")))?;
                let n = io::copy(entry, &mut file).map_err(TarError::Corrupt)?;
                self.stats.bytes += n;
                // Never setuid, setgid or sticky.
                file.set_permissions(fs::Permissions::from_mode(header_mode & 0o777))
                    .map_err(io_ctx(format!("setting mode of {display:?}")))?;
                if let Ok(mtime) = entry.header().mtime() {
                    let _ = file.set_modified(UNIX_EPOCH + Duration::from_secs(mtime));
                }
                self.files.insert(norm);
            }
        }
        Ok(())
    }
}

/// Extract a gzip-compressed tar stream into `dest` (which must be inside the workdir; the
/// caller resolves it with [`crate::paths::resolve_existing_safe`]; created if missing).
/// Everything is first extracted into a fresh dir under `staging_root` (same filesystem),
/// validated entry by entry (before writing anything for that entry), and only when the
/// whole tarball is accepted are its entries moved into `dest`: existing directories are
/// merged into (and keep their own mode); anything else in the way (file, symlink, or a
/// directory where the tarball has a file) is replaced, and a symlink in `dest` is never
/// followed. `staging_root` should not be inside `dest`. On any error before the move, the
/// staging dir is removed and `dest` is
/// untouched; an I/O error during the final move can leave `dest` partly updated.
/// Blocking: callers run it in `spawn_blocking`.
pub fn extract_tar_gz<R: Read>(
    reader: R,
    dest: &Path,
    staging_root: &Path,
    limits: &Limits,
) -> Result<ExtractStats, TarError> {
    let mut reader = reader;
    // Peek the gzip magic so garbage gets a clear error rather than a decoder message.
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match reader.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_ctx("reading tarball")(e)),
        }
    }
    if magic[..got] != [0x1f, 0x8b] {
        return Err(TarError::NotGzip);
    }

    let staging = create_staging(staging_root)?;
    let compressed = Rc::new(Cell::new(0u64));
    let tripped = Rc::new(Cell::new(None));
    let counting = CountingReader {
        inner: io::Cursor::new(magic).chain(reader),
        count: compressed.clone(),
    };
    let limited = LimitReader {
        inner: flate2::read::MultiGzDecoder::new(counting),
        read: 0,
        compressed,
        tripped: tripped.clone(),
        max_bytes: limits.max_bytes,
        max_ratio: limits.max_ratio,
    };
    let mut archive = tar::Archive::new(limited);
    let mut ex = Extractor {
        staging: &staging.0,
        files: HashSet::new(),
        dir_modes: Vec::new(),
        stats: ExtractStats::default(),
        declared: 0,
        limits,
    };
    // A limit tripped while reading surfaces as whatever error the tar crate makes of it.
    let trip_err = |err: TarError| match tripped.get() {
        Some(Trip::Size) => TarError::TooLarge {
            limit: limits.max_bytes,
        },
        Some(Trip::Ratio) => TarError::RatioTooHigh {
            limit: limits.max_ratio,
        },
        None => err,
    };
    let result = (|| {
        for entry in archive.entries().map_err(TarError::Corrupt)? {
            let mut entry = entry.map_err(TarError::Corrupt)?;
            ex.entry(&mut entry)?;
        }
        Ok(())
    })();
    result
        .and_then(|()| {
            // Read to the end so a truncated or corrupt gzip trailer is noticed.
            io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(TarError::Corrupt)
        })
        .map_err(trip_err)?;

    for (dir, mode) in &ex.dir_modes {
        fs::set_permissions(dir, fs::Permissions::from_mode(*mode))
            .map_err(io_ctx(format!("setting mode of {}", dir.display())))?;
    }
    fs::create_dir_all(dest).map_err(io_ctx(format!("creating {}", dest.display())))?;
    let meta =
        fs::symlink_metadata(dest).map_err(io_ctx(format!("checking {}", dest.display())))?;
    if !meta.is_dir() {
        return Err(TarError::DestNotDir(dest.to_path_buf()));
    }
    merge_into(&staging.0, dest)?;
    Ok(ex.stats)
}

/// Moves the contents of staging dir `from` into `to` (a real directory): missing entries are
/// renamed in whole, directories present on both sides are merged, anything else in `to` is
/// replaced.
fn merge_into(from: &Path, to: &Path) -> Result<(), TarError> {
    let mut names: Vec<_> = fs::read_dir(from)
        .map_err(io_ctx(format!("reading {}", from.display())))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_ctx(format!("reading {}", from.display())))?;
    names.sort();
    for name in names {
        let src = from.join(&name);
        let dst = to.join(&name);
        let src_is_dir = fs::symlink_metadata(&src)
            .map_err(io_ctx(format!("checking {}", src.display())))?
            .is_dir();
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() && src_is_dir => {
                merge_into(&src, &dst)?;
                continue;
            }
            Ok(m) if m.is_dir() => {
                // std's remove_dir_all does not follow symlinks.
                fs::remove_dir_all(&dst).map_err(io_ctx(format!("replacing {}", dst.display())))?;
            }
            Ok(_) if src_is_dir => {
                fs::remove_file(&dst).map_err(io_ctx(format!("replacing {}", dst.display())))?;
            }
            // A file or symlink over a file or symlink: rename replaces it atomically.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_ctx(format!("checking {}", dst.display()))(e)),
        }
        fs::rename(&src, &dst).map_err(io_ctx(format!(
            "moving {} to {}",
            src.display(),
            dst.display()
        )))?;
    }
    Ok(())
}

/// Counts bytes written through it.
struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Write `src` (a dir) as a tar.gz to `writer`, paths relative to `src`, preserving modes and
/// symlinks (not following them), in sorted order. Sockets, fifos and devices are skipped.
/// Returns bytes of tar content written (before compression). Blocking.
pub fn write_tar_gz<W: Write>(src: &Path, writer: W) -> Result<u64, TarError> {
    let gz = flate2::write::GzEncoder::new(writer, flate2::Compression::default());
    let mut builder = tar::Builder::new(CountingWriter {
        inner: gz,
        count: 0,
    });
    builder.follow_symlinks(false);
    // Sparse entries are a GNU extension our own extractor refuses.
    builder.sparse(false);
    let walk = walkdir::WalkDir::new(src)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for item in walk {
        let item = item.map_err(|e| {
            let context = format!("walking {}", src.display());
            TarError::Io {
                context,
                source: e.into(),
            }
        })?;
        let ft = item.file_type();
        if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
            tracing::debug!(path = %item.path().display(), "skipping special file in tarball");
            continue;
        }
        let rel = item
            .path()
            .strip_prefix(src)
            .map_err(|_| TarError::Io {
                context: format!("walking {}", src.display()),
                source: io::Error::other("walked path outside source dir"),
            })?
            .to_path_buf();
        builder
            .append_path_with_name(item.path(), &rel)
            .map_err(io_ctx(format!("adding {} to tarball", rel.display())))?;
    }
    let counting = builder.into_inner().map_err(io_ctx("finishing tarball"))?;
    let count = counting.count;
    let mut out = counting
        .inner
        .finish()
        .map_err(io_ctx("finishing gzip stream"))?;
    out.flush().map_err(io_ctx("flushing tarball"))?;
    Ok(count)
}

/// What [`fuzz_extract`] saw: the input extracted as given, and wrapped in gzip.
#[derive(Debug)]
pub struct FuzzExtractOutcome {
    /// The input read as a tar.gz stream (mostly exercises the gzip layer).
    pub as_given: Result<ExtractStats, TarError>,
    /// The input gzip-compressed first, so raw tar bytes reach the tar layer.
    pub wrapped: Result<ExtractStats, TarError>,
}

/// Fuzz body of the extraction policy (the `tar_extract` cargo-fuzz target, and
/// `buildlet/tests/fuzz_bodies.rs` on stable). Extracts `data` as given and gzip-wrapped,
/// each into a fresh sandbox under the system temp dir, and panics when the policy broke:
/// anything outside the destination changed, a refused tarball changed anything, the
/// staging dir was left behind, or an accepted tarball left a symlink that resolves
/// outside the destination or a special file in it.
pub fn fuzz_extract(data: &[u8]) -> FuzzExtractOutcome {
    let as_given = fuzz_extract_one(data);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let wrapped_bytes = gz
        .write_all(data)
        .and_then(|()| gz.finish())
        .expect("gzip into memory");
    let wrapped = fuzz_extract_one(&wrapped_bytes);
    FuzzExtractOutcome { as_given, wrapped }
}

/// Limits small enough that a fuzzer input cannot fill the disk.
fn fuzz_limits() -> Limits {
    Limits {
        max_bytes: 8 << 20,
        max_entries: 10_000,
        max_ratio: 1000,
    }
}

fn fuzz_extract_one(input: &[u8]) -> Result<ExtractStats, TarError> {
    static SANDBOXES: AtomicU64 = AtomicU64::new(0);
    let root = std::env::temp_dir().join(format!(
        "buildlet-fuzz-{}-{}",
        std::process::id(),
        SANDBOXES.fetch_add(1, Ordering::Relaxed)
    ));
    // A leftover from an aborted run with the same pid would make snapshots differ.
    let _ = fs::remove_dir_all(&root);
    let dest = root.join("work/dest");
    let staging = root.join("work/staging");
    let sentinel = root.join("sentinel");
    for dir in [dest.join("sub"), staging.clone(), sentinel.clone()] {
        fs::create_dir_all(&dir).expect("creating fuzz sandbox");
    }
    fs::write(sentinel.join("secret"), b"secret").expect("writing fuzz sandbox");
    fs::write(dest.join("existing"), b"existing").expect("writing fuzz sandbox");
    fs::write(dest.join("sub/keep"), b"keep").expect("writing fuzz sandbox");

    let before = fuzz_snapshot(&root);
    let result = extract_tar_gz(input, &dest, &staging, &fuzz_limits());
    let after = fuzz_snapshot(&root);
    let outside = |snap: &[(PathBuf, Vec<u8>)]| -> Vec<(PathBuf, Vec<u8>)> {
        snap.iter()
            .filter(|(p, _)| !p.starts_with(&dest))
            .cloned()
            .collect()
    };
    match &result {
        Err(e) => assert!(before == after, "refused tarball ({e}) changed the sandbox"),
        Ok(_) => {
            assert!(
                outside(&before) == outside(&after),
                "accepted tarball changed something outside the destination"
            );
            fuzz_check_dest(&dest);
        }
    }
    let left = fs::read_dir(&staging)
        .expect("reading staging root")
        .count();
    assert_eq!(left, 0, "staging dir left behind");
    fs::remove_dir_all(&root).expect("removing fuzz sandbox");
    result
}

/// Every path under `root` with its content (file bytes, link target, or a dir marker and
/// mode), without following links, sorted.
fn fuzz_snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for item in walkdir::WalkDir::new(root).follow_links(false) {
        let item = item.expect("walking fuzz sandbox");
        let meta = item
            .path()
            .symlink_metadata()
            .expect("stat in fuzz sandbox");
        let content = if meta.file_type().is_symlink() {
            let target = fs::read_link(item.path()).expect("reading link in fuzz sandbox");
            [b"link:".as_slice(), target.as_os_str().as_encoded_bytes()].concat()
        } else if meta.is_dir() {
            format!("dir:{:o}", meta.permissions().mode()).into_bytes()
        } else if meta.is_file() {
            let mut data = format!("file:{:o}:", meta.permissions().mode()).into_bytes();
            data.extend(fs::read(item.path()).expect("reading file in fuzz sandbox"));
            data
        } else {
            b"special".to_vec()
        };
        out.push((item.path().to_path_buf(), content));
    }
    out.sort();
    out
}

/// After an accepted extraction: only dirs, files and symlinks that stay inside `dest`.
fn fuzz_check_dest(dest: &Path) {
    for item in walkdir::WalkDir::new(dest).follow_links(false) {
        let item = item.expect("walking fuzz destination");
        let path = item.path();
        let ft = item.file_type();
        assert!(
            ft.is_dir() || ft.is_file() || ft.is_symlink(),
            "special file {} extracted",
            path.display()
        );
        if !ft.is_symlink() {
            continue;
        }
        let target = fs::read_link(path).expect("reading extracted link");
        assert!(
            !target.is_absolute(),
            "symlink {} -> {} is absolute",
            path.display(),
            target.display()
        );
        if let Ok(resolved) = fs::canonicalize(path) {
            let dest = fs::canonicalize(dest).expect("resolving fuzz destination");
            assert!(
                resolved.starts_with(&dest),
                "symlink {} resolves to {} outside the destination",
                path.display(),
                resolved.display()
            );
        }
        // Dangling links too: resolved lexically from the link's dir, the target must never
        // climb above `dest`.
        let rel_dir = path
            .parent()
            .and_then(|p| p.strip_prefix(dest).ok())
            .unwrap_or(Path::new(""));
        let mut depth: i64 = rel_dir.components().count() as i64;
        for c in target.components() {
            match c {
                std::path::Component::ParentDir => depth -= 1,
                std::path::Component::Normal(_) => depth += 1,
                _ => {}
            }
            assert!(
                depth >= 0,
                "symlink {} -> {} leaves the destination",
                path.display(),
                target.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_target_policy() {
        let ok = |parts: &[&str], t: &str| check_symlink_target(parts, "p", t).is_ok();
        assert!(ok(&["a"], "b"));
        assert!(ok(&["d", "a"], "../b"));
        assert!(ok(&["d", "e", "a"], "../../b/c"));
        assert!(!ok(&["a"], "../b"));
        assert!(!ok(&["d", "a"], "../../b"));
        assert!(!ok(&["a"], "/etc"));
        assert!(!ok(&["a"], ""));
        assert!(!ok(&["d", "a"], "x/../../y"));
        assert!(!ok(&["d", "e", "a"], "x/../y"));
    }

    #[test]
    fn entry_names() {
        assert_eq!(entry_components("./a//b/", "x").unwrap(), vec!["a", "b"]);
        assert!(matches!(
            entry_components("/a", "x"),
            Err(TarError::Absolute(_))
        ));
        assert!(matches!(
            entry_components("a/../b", "x"),
            Err(TarError::Escapes(_))
        ));
        let msg = entry_components("../x", "../x").unwrap_err().to_string();
        assert_eq!(msg, "entry \"../x\" escapes the target directory");
    }

    #[test]
    fn sizes_are_readable() {
        assert_eq!(fmt_size(100 << 20), "100 MiB");
        assert_eq!(fmt_size(1000), "1000 bytes");
    }
}
