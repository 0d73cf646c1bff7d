//! Path policy for client-supplied paths: every path the buildlet touches on behalf of a
//! caller is resolved inside the workdir here. [`resolve`] is purely lexical (no `..`, not
//! absolute, no NUL); [`resolve_existing_safe`] and [`resolve_parent_safe`] additionally walk
//! the filesystem so that a symlink planted by an earlier command cannot redirect a write
//! outside the root.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// How many symlinks one resolution may follow before giving up (Linux's ELOOP limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Why a client-supplied path was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} is absolute")]
    Absolute(String),
    #[error("path {0:?} contains a \"..\" component")]
    ParentDir(String),
    #[error("path {0:?} contains a NUL byte")]
    NulByte(String),
    /// Used by callers that get paths as bytes (e.g. [`resolve_bytes`]).
    #[error("path {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("path {path:?} goes through symlink {link:?} that leads outside the root")]
    SymlinkEscape { path: String, link: PathBuf },
    #[error("path {0:?} goes through too many levels of symlinks")]
    SymlinkLoop(String),
    #[error("checking path {path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The components of a client-supplied relative path, after dropping empty and `.` parts.
/// Refuses absolute paths, `..` and NUL bytes. Tar entry names go through it too.
pub(crate) fn components(rel: &str) -> Result<Vec<&str>, PathError> {
    if rel.contains('\0') {
        return Err(PathError::NulByte(rel.to_owned()));
    }
    if rel.starts_with('/') {
        return Err(PathError::Absolute(rel.to_owned()));
    }
    let mut out = Vec::new();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(PathError::ParentDir(rel.to_owned())),
            name => out.push(name),
        }
    }
    Ok(out)
}

/// Resolve a client-supplied relative path (slash-separated, "" or "." = the root) inside
/// `root`; refuses absolute paths, `..` components, NUL bytes. Pure: lexical only.
pub fn resolve(root: &Path, rel: &str) -> Result<PathBuf, PathError> {
    let mut out = root.to_path_buf();
    for name in components(rel)? {
        out.push(name);
    }
    Ok(out)
}

/// [`resolve`] for a path received as raw bytes: refuses non-UTF-8 names.
pub fn resolve_bytes(root: &Path, rel: &[u8]) -> Result<PathBuf, PathError> {
    let rel = std::str::from_utf8(rel)
        .map_err(|_| PathError::NotUtf8(String::from_utf8_lossy(rel).into_owned()))?;
    resolve(root, rel)
}

/// Like [`resolve`], and additionally checks (I/O) that following the path the way the kernel
/// would, through every existing component including the last one, stays inside `root`. So
/// a symlink planted by a previous command cannot be used to write outside. Symlinks that stay
/// inside `root` are allowed; a dangling symlink is judged by where it would lead.
///
/// Use this for paths that will be written or read through; to remove or `lstat` a path
/// that may itself be a symlink, use [`resolve_parent_safe`]. Like any check-then-use this
/// races with a concurrent process changing the tree; it guards against what earlier
/// commands left behind.
pub fn resolve_existing_safe(root: &Path, rel: &str) -> Result<PathBuf, PathError> {
    let parts = components(rel)?;
    check_no_escape(root, rel, &parts)?;
    resolve(root, rel)
}

/// Like [`resolve_existing_safe`] but the last component is not followed: only the parent
/// directories are checked. For operations that act on a link itself (remove, lstat, list).
pub fn resolve_parent_safe(root: &Path, rel: &str) -> Result<PathBuf, PathError> {
    let parts = components(rel)?;
    if let Some((_, parents)) = parts.split_last() {
        check_no_escape(root, rel, parents)?;
    }
    resolve(root, rel)
}

/// Emulates path resolution from `root` through `parts`, following symlinks, and fails if
/// the location reached is outside `root`. Stops at the first component that does not exist
/// (the rest are plain names and so stay below it).
fn check_no_escape(root: &Path, rel: &str, parts: &[&str]) -> Result<(), PathError> {
    let io_err = |source| PathError::Io {
        path: rel.to_owned(),
        source,
    };
    let real_root = root.canonicalize().map_err(io_err)?;
    // `cur` is always a path without symlinks, so popping it is a real "..".
    let mut cur = real_root.clone();
    // Components still to walk, in reverse order so we can push a symlink's target in front.
    let mut todo: Vec<Vec<u8>> = parts.iter().rev().map(|p| p.as_bytes().to_vec()).collect();
    let mut hops = 0;
    // The first symlink we went through, for the error message.
    let mut first_link: Option<PathBuf> = None;
    while let Some(part) = todo.pop() {
        match part.as_slice() {
            b"" | b"." => continue,
            b".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let next = cur.join(OsStr::from_bytes(&part));
        let meta = match std::fs::symlink_metadata(&next) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Nothing below exists; what is left only matters lexically.
                cur = next;
                while let Some(rest) = todo.pop() {
                    match rest.as_slice() {
                        b"" | b"." => {}
                        b".." => {
                            cur.pop();
                        }
                        name => cur.push(OsStr::from_bytes(name)),
                    }
                }
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                // A file in the middle of the path: the kernel refuses, nothing can escape.
                return Ok(());
            }
            Err(e) => return Err(io_err(e)),
        };
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(PathError::SymlinkLoop(rel.to_owned()));
        }
        let target = std::fs::read_link(&next).map_err(io_err)?;
        if first_link.is_none() {
            first_link = Some(next.strip_prefix(&real_root).unwrap_or(&next).to_path_buf());
        }
        if target.is_absolute() {
            cur = PathBuf::from("/");
        }
        for comp in target.components().rev() {
            match comp {
                Component::RootDir | Component::Prefix(_) => {}
                Component::CurDir => {}
                Component::ParentDir => todo.push(b"..".to_vec()),
                Component::Normal(name) => todo.push(name.as_bytes().to_vec()),
            }
        }
    }
    if cur.starts_with(&real_root) {
        Ok(())
    } else {
        Err(PathError::SymlinkEscape {
            path: rel.to_owned(),
            link: first_link.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolve_plain_paths() {
        let root = Path::new("/w");
        assert_eq!(resolve(root, "").unwrap(), PathBuf::from("/w"));
        assert_eq!(resolve(root, ".").unwrap(), PathBuf::from("/w"));
        assert_eq!(resolve(root, "a/b").unwrap(), PathBuf::from("/w/a/b"));
        assert_eq!(resolve(root, "./a//b/./").unwrap(), PathBuf::from("/w/a/b"));
        assert_eq!(
            resolve(root, "a..b/..c").unwrap(),
            PathBuf::from("/w/a..b/..c")
        );
    }

    #[test]
    fn resolve_refuses_hostile_paths() {
        let root = Path::new("/w");
        assert!(matches!(resolve(root, "/etc"), Err(PathError::Absolute(p)) if p == "/etc"));
        assert!(matches!(resolve(root, ".."), Err(PathError::ParentDir(_))));
        assert!(matches!(
            resolve(root, "a/../b"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            resolve(root, "a/.."),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(resolve(root, "a\0b"), Err(PathError::NulByte(_))));
        assert!(matches!(
            resolve_bytes(root, b"a\xffb"),
            Err(PathError::NotUtf8(_))
        ));
        let msg = resolve(root, "../x").unwrap_err().to_string();
        assert_eq!(msg, "path \"../x\" contains a \"..\" component");
    }

    #[test]
    fn existing_safe_allows_inside_symlinks_and_missing_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        symlink("real", root.join("in")).unwrap();
        symlink("../real/sub", root.join("real/up")).unwrap();
        assert_eq!(
            resolve_existing_safe(&root, "in/sub/new/file").unwrap(),
            root.join("in/sub/new/file")
        );
        resolve_existing_safe(&root, "real/up/x").unwrap();
        resolve_existing_safe(&root, "does/not/exist").unwrap();
        resolve_existing_safe(&root, "").unwrap();
    }

    #[test]
    fn existing_safe_refuses_symlinks_leading_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
        symlink(tmp.path().join("outside"), root.join("abs")).unwrap();
        symlink("../../outside", root.join("d/rel")).unwrap();
        symlink("/nonexistent-dir-for-test/x", root.join("dangling")).unwrap();
        symlink("d/rel", root.join("chain")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        for rel in ["abs/file", "d/rel/file", "dangling", "chain/x", "abs"] {
            match resolve_existing_safe(&root, rel) {
                Err(PathError::SymlinkEscape { path, .. }) => assert_eq!(path, rel),
                other => panic!("{rel}: expected escape, got {other:?}"),
            }
        }
        assert!(matches!(
            resolve_existing_safe(&root, "loop/x"),
            Err(PathError::SymlinkLoop(_))
        ));
        // The link itself may be removed: only its parents are checked.
        assert_eq!(resolve_parent_safe(&root, "abs").unwrap(), root.join("abs"));
        assert!(resolve_parent_safe(&root, "abs/file").is_err());
    }

    proptest! {
        #[test]
        fn resolve_stays_under_root(rel in "[a-z./\\\\\0 ]{0,24}") {
            let root = Path::new("/work/root");
            if let Ok(p) = resolve(root, &rel) {
                prop_assert!(p.starts_with(root));
                prop_assert!(!p.components().any(|c| c == Component::ParentDir));
            }
        }

        #[test]
        fn resolve_any_string_stays_under_root(rel in any::<String>()) {
            let root = Path::new("/work/root");
            if let Ok(p) = resolve(root, &rel) {
                prop_assert!(p.starts_with(root));
                prop_assert!(!p.components().any(|c| c == Component::ParentDir));
            }
        }
    }
}
