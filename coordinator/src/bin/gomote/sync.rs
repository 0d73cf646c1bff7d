//! Syncing a local tree to an instance: which files a tree holds (as git would see
//! them: `.git` and what `.gitignore` names are left out), what differs between two
//! views of it, and sending only that difference.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::{Client, put_tar, status_err};

/// Regular files of a tree by slash-separated relative path, with their SHA-256.
pub type TreeDigests = BTreeMap<String, String>;

/// Regular files under `dir` with their SHA-256, leaving out `.git` and whatever the
/// tree's `.gitignore` files name (whether or not `dir` is a git checkout).
pub fn tree_digests(dir: &Path) -> Result<TreeDigests> {
    let mut out = BTreeMap::new();
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .parents(false)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    for entry in walk {
        let entry = entry.with_context(|| format!("walking {}", dir.display()))?;
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = entry.path().strip_prefix(dir)?;
        let rel = rel
            .to_str()
            .with_context(|| format!("{} is not UTF-8", rel.display()))?
            .replace('\\', "/");
        let data = match std::fs::read(entry.path()) {
            Ok(data) => data,
            // Deleted between the listing and the read (an editor's temp file): the next
            // look at the tree sees it gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", entry.path().display())),
        };
        out.insert(rel, hex::encode(Sha256::digest(&data)));
    }
    Ok(out)
}

/// What to send to make `before` into `after`: files new or changed, and files gone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TreeChanges {
    pub changed: Vec<String>,
    pub gone: Vec<String>,
}

impl TreeChanges {
    pub fn between(before: &TreeDigests, after: &TreeDigests) -> TreeChanges {
        TreeChanges {
            changed: after
                .iter()
                .filter(|(name, digest)| before.get(*name) != Some(digest))
                .map(|(name, _)| name.clone())
                .collect(),
            gone: before
                .keys()
                .filter(|name| !after.contains_key(*name))
                .cloned()
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.gone.is_empty()
    }
}

/// The files of `dest` on the instance with their digests; a missing `dest` is empty.
pub async fn remote_digests(c: &mut Client, instance: &str, dest: &str) -> Result<TreeDigests> {
    let entries = match crate::list(c, instance, dest, true, true).await {
        Ok(entries) => entries,
        Err(e) if format!("{e:#}").contains("NotFound") => vec![],
        Err(e) => return Err(e),
    };
    Ok(entries
        .into_iter()
        .filter(|e| !e.is_dir && !e.is_symlink)
        .map(|e| (e.name, e.sha256.unwrap_or_default()))
        .collect())
}

/// Sends `changes` of the local tree `dir` to `dest` of the instance: changed files in
/// one tarball, then removal of the gone ones.
pub async fn send_changes(
    c: &mut Client,
    instance: &str,
    dir: &Path,
    dest: &str,
    changes: &TreeChanges,
) -> Result<()> {
    if !changes.changed.is_empty() {
        let total = changes
            .changed
            .iter()
            .filter_map(|name| std::fs::metadata(dir.join(name.as_str())).ok())
            .map(|m| m.len())
            .sum();
        let names = changes.changed.clone();
        let root = dir.to_owned();
        put_tar(c, instance, dest, total, move |w| {
            let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::fast(),
            ));
            for name in &names {
                builder
                    .append_path_with_name(root.join(name.as_str()), name.as_str())
                    .with_context(|| format!("adding {name} to the tarball"))?;
            }
            builder.into_inner()?.finish()?;
            Ok(())
        })
        .await
        .context("sending changed files")?;
    }
    if !changes.gone.is_empty() {
        let paths = changes
            .gone
            .iter()
            .map(|name| {
                if dest.is_empty() {
                    name.clone()
                } else {
                    format!("{}/{name}", dest.trim_end_matches('/'))
                }
            })
            .collect();
        c.remove(instance, paths, false)
            .await
            .map_err(|e| status_err("removing deleted files", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> TreeDigests {
        files
            .iter()
            .map(|(n, d)| ((*n).to_owned(), (*d).to_owned()))
            .collect()
    }

    #[test]
    fn changes_are_new_changed_and_gone_files_only() {
        let before = tree(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let after = tree(&[("a", "1"), ("b", "20"), ("d", "4")]);
        let ch = TreeChanges::between(&before, &after);
        assert_eq!(ch.changed, vec!["b", "d"]);
        assert_eq!(ch.gone, vec!["c"]);
        assert!(TreeChanges::between(&after, &after).is_empty());
    }

    #[test]
    fn the_tree_leaves_out_git_and_ignored_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join(".git/objects")).expect("mkdir");
        std::fs::create_dir_all(d.join("sub/out")).expect("mkdir");
        for (name, text) in [
            (".gitignore", "*.log\n/out\n"),
            (".git/HEAD", "ref"),
            (".git/objects/x", "obj"),
            ("main.go", "package main"),
            ("debug.log", "noise"),
            ("out", "top-level out is ignored"),
            ("sub/.gitignore", "local.txt\n"),
            ("sub/local.txt", "ignored by the nested file"),
            ("sub/kept.txt", "kept"),
            ("sub/out/x", "only /out at the top is ignored"),
            (".hidden", "hidden files are sent"),
        ] {
            std::fs::write(d.join(name), text).expect("write");
        }
        let names: Vec<String> = tree_digests(d).expect("digests").into_keys().collect();
        assert_eq!(
            names,
            vec![
                ".gitignore",
                ".hidden",
                "main.go",
                "sub/.gitignore",
                "sub/kept.txt",
                "sub/out/x"
            ]
        );
        let digests = tree_digests(d).expect("digests");
        assert_eq!(
            digests["main.go"],
            hex::encode(Sha256::digest(b"package main"))
        );
    }
}
