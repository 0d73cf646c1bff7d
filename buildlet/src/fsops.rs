//! File operations on the workdir for WriteFile, Remove and List. Every caller path
//! goes through `paths` first; these functions are blocking (run them in
//! `spawn_blocking`) and never follow a symlink out of the workdir.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::paths::{self, PathError};

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{path:?} does not exist")]
    NotFound { path: String },
    #[error("{path:?} is not a directory")]
    NotADirectory { path: String },
    #[error(
        "refusing to remove {path:?}: it names the workdir itself; ask explicitly to empty the workdir (gomote rm --all)"
    )]
    RemoveRoot { path: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FsError + 'a {
    move |source| FsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Writes `contents` to `rel` inside `root`, creating parent directories. `mode` 0
/// means 0644. An existing symlink at `rel` is replaced, not followed.
pub fn write_file(root: &Path, rel: &str, mode: u32, contents: &[u8]) -> Result<(), FsError> {
    let path = resolve_leaf(root, rel)?;
    if path == root {
        return Err(FsError::NotADirectory { path: rel.into() });
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    }
    // Re-check now that the parents exist: one of them may have been a symlink.
    let path = resolve_leaf(root, rel)?;
    if let Ok(meta) = std::fs::symlink_metadata(&path)
        && meta.file_type().is_symlink()
    {
        std::fs::remove_file(&path).map_err(io("replacing symlink", &path))?;
    }
    let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io("opening", &path))?;
    f.write_all(contents).map_err(io("writing", &path))?;
    // `mode` on open only applies to new files (and is masked by the umask).
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io("setting mode of", &path))?;
    Ok(())
}

/// Removes each path (file, symlink or tree) under `root`. Missing paths are fine.
/// A path naming the workdir itself ("", ".", "a/..") empties it, keeping the directory,
/// but only with `allow_root`; without it the whole call is refused and nothing removed.
pub fn remove(root: &Path, rels: &[String], allow_root: bool) -> Result<(), FsError> {
    // Resolve everything first so that one bad path refuses the whole call.
    let mut targets = Vec::with_capacity(rels.len());
    for rel in rels {
        let path = resolve_leaf(root, rel)?;
        if path == root && !allow_root {
            return Err(FsError::RemoveRoot { path: rel.clone() });
        }
        targets.push(path);
    }
    for path in targets {
        if path == root {
            for entry in std::fs::read_dir(root).map_err(io("reading", root))? {
                let entry = entry.map_err(io("reading", root))?;
                remove_one(&entry.path())?;
            }
        } else {
            remove_one(&path)?;
        }
    }
    Ok(())
}

/// The last component is acted on itself (replaced or removed), never followed; only
/// its parents are checked for symlinks leaving `root`.
fn resolve_leaf(root: &Path, rel: &str) -> Result<PathBuf, FsError> {
    Ok(paths::resolve_parent_safe(root, rel)?)
}

fn remove_one(path: &Path) -> Result<(), FsError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("inspecting", path)(e)),
    };
    // remove_dir_all does not follow symlinks, and a symlink is removed as a file.
    if meta.is_dir() {
        std::fs::remove_dir_all(path).map_err(io("removing", path))
    } else {
        std::fs::remove_file(path).map_err(io("removing", path))
    }
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub dir: String,
    pub recursive: bool,
    pub digest: bool,
    /// Slash-separated paths, relative to `dir`, of directories not to descend into
    /// (they are still listed themselves).
    pub skip: Vec<String>,
}

/// One listed entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the listed dir, slash-separated; directories end with '/'.
    pub name: String,
    /// Permission bits (`mode & 0o7777`); the type is in `is_dir` / `is_symlink`.
    pub mode: u32,
    pub size: u64,
    pub mtime_unix: i64,
    /// Hex SHA-256 of a regular file's contents, when asked for.
    pub sha256: Option<String>,
    pub is_dir: bool,
    pub is_symlink: bool,
}

/// Lists `opts.dir` under `root`, calling `emit` with batches of at most `batch`
/// entries; stops early (returning Ok) when `emit` returns false.
pub fn list(
    root: &Path,
    opts: &ListOptions,
    batch: usize,
    mut emit: impl FnMut(Vec<Entry>) -> bool,
) -> Result<(), FsError> {
    let dir = paths::resolve_existing_safe(root, &opts.dir)?;
    let meta = std::fs::metadata(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            FsError::NotFound {
                path: opts.dir.clone(),
            }
        } else {
            io("inspecting", &dir)(e)
        }
    })?;
    if !meta.is_dir() {
        return Err(FsError::NotADirectory {
            path: opts.dir.clone(),
        });
    }
    let skip: Vec<&str> = opts.skip.iter().map(|s| s.trim_end_matches('/')).collect();
    let max_depth = if opts.recursive { usize::MAX } else { 1 };
    let walk = walkdir::WalkDir::new(&dir)
        .min_depth(1)
        .max_depth(max_depth)
        .follow_links(false)
        .sort_by_file_name();
    let mut out = Vec::with_capacity(batch);
    let mut it = walk.into_iter();
    while let Some(entry) = it.next() {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(&dir).to_owned();
            FsError::Io {
                op: "walking",
                path,
                source: e.into(),
            }
        })?;
        let rel = entry
            .path()
            .strip_prefix(&dir)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .into_owned();
        let meta = entry.metadata().map_err(|e| FsError::Io {
            op: "inspecting",
            path: entry.path().to_owned(),
            source: e.into(),
        })?;
        let ft = meta.file_type();
        if ft.is_dir() && skip.contains(&rel.as_str()) {
            it.skip_current_dir();
        }
        let sha256 = if opts.digest && ft.is_file() {
            Some(sha256_file(entry.path())?)
        } else {
            None
        };
        out.push(Entry {
            name: if ft.is_dir() { format!("{rel}/") } else { rel },
            mode: meta.mode() & 0o7777,
            size: meta.len(),
            mtime_unix: meta.mtime(),
            sha256,
            is_dir: ft.is_dir(),
            is_symlink: ft.is_symlink(),
        });
        if out.len() >= batch && !emit(std::mem::replace(&mut out, Vec::with_capacity(batch))) {
            return Ok(());
        }
    }
    if !out.is_empty() {
        emit(out);
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String, FsError> {
    let mut f = std::fs::File::open(path).map_err(io("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_batches_digests_and_skips() {
        let root = tempfile::tempdir().unwrap();
        write_file(root.path(), "a/b.txt", 0o600, b"hello").unwrap();
        write_file(root.path(), "skip/inner.txt", 0, b"x").unwrap();
        write_file(root.path(), "top", 0o755, b"").unwrap();
        let mut batches = Vec::new();
        let opts = ListOptions {
            recursive: true,
            digest: true,
            skip: vec!["skip".into()],
            ..Default::default()
        };
        list(root.path(), &opts, 2, |b| {
            batches.push(b);
            true
        })
        .unwrap();
        assert!(batches.iter().all(|b| b.len() <= 2));
        let all: Vec<Entry> = batches.into_iter().flatten().collect();
        let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a/", "a/b.txt", "skip/", "top"]);
        let b = &all[1];
        assert_eq!(b.mode, 0o600);
        assert_eq!(b.size, 5);
        assert_eq!(
            b.sha256.as_deref(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
        assert_eq!(all[3].mode, 0o755);
    }

    #[test]
    fn remove_dot_empties_but_keeps_root_only_when_allowed() {
        let root = tempfile::tempdir().unwrap();
        write_file(root.path(), "a/b", 0, b"1").unwrap();
        write_file(root.path(), "c", 0, b"2").unwrap();
        for rel in ["", ".", "./", "./."] {
            let err = remove(root.path(), &["c".into(), rel.into()], false).expect_err(rel);
            assert!(matches!(err, FsError::RemoveRoot { .. }), "{rel}: {err}");
            assert!(err.to_string().contains("--all"), "{err}");
        }
        // ".." is refused by the path policy before the root check.
        let err = remove(root.path(), &["c".into(), "a/..".into()], false).expect_err("a/..");
        assert!(matches!(err, FsError::Path(_)), "{err}");
        assert!(
            root.path().join("c").exists(),
            "nothing removed by a refused call"
        );
        remove(root.path(), &[".".into()], true).unwrap();
        assert!(root.path().is_dir());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        // Missing paths are not an error.
        remove(root.path(), &["nope".into()], false).unwrap();
    }

    #[test]
    fn remove_symlink_removes_link_not_target() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        remove(root.path(), &["link".into()], false).unwrap();
        assert!(outside.path().join("keep").exists());
        assert!(std::fs::symlink_metadata(root.path().join("link")).is_err());
    }
}
