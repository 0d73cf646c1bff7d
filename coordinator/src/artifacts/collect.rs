//! Fetching a build's outputs from its buildlet into the blob store: list the
//! directories the patterns can match in, keep the matching regular files, download
//! each such directory once as a tarball and copy only the wanted files out of it
//! (hashing as they are copied). File names come from the buildlet's own listing and
//! are only compared, never used as local paths.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::sync::Arc;

use buildfarm_store::NewArtifact;
use buildlet::client::{BuildletClient, ErrorCode, ListOptions};

use super::blobs::BlobStore;
use super::glob;
use super::plan::CollectSpec;

/// Why collecting failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The buildlet or the coordinator's disk failed: another attempt may succeed.
    #[error("{0}")]
    Infra(String),
    /// The build's outputs are unacceptable (too big): the build fails.
    #[error("{0}")]
    Refused(String),
}

/// Directories (relative to the workdir) to list: each pattern's fixed prefix under
/// `base`, without those inside another one.
fn dirs_to_list(spec: &CollectSpec) -> Vec<(String, String)> {
    let prefixes: BTreeSet<String> = spec
        .patterns
        .iter()
        .map(|p| glob::fixed_prefix(p))
        .collect();
    let mut out: Vec<(String, String)> = Vec::new();
    for p in prefixes {
        let covered = out
            .iter()
            .any(|(_, q)| q.is_empty() || p == *q || p.starts_with(&format!("{q}/")));
        if !covered {
            let dir = if p.is_empty() {
                spec.base.clone()
            } else {
                format!("{}/{p}", spec.base)
            };
            out.push((dir, p));
        }
    }
    out
}

/// Copies the files matching `spec` from the buildlet into `blobs`; returns them named
/// relative to `spec.base`, sorted.
pub async fn collect(
    client: &BuildletClient,
    spec: &CollectSpec,
    blobs: Arc<BlobStore>,
    max_file_bytes: u64,
) -> Result<Vec<NewArtifact>, CollectError> {
    // Wanted files, grouped by the listed directory that holds them.
    let mut wanted: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for (dir, prefix) in dirs_to_list(spec) {
        let entries = match client
            .list(ListOptions {
                dir: dir.clone(),
                recursive: true,
                digest: false,
                skip: vec![],
            })
            .await
        {
            Ok(e) => e,
            Err(e) if e.code() == ErrorCode::NotFound => continue,
            Err(e) => return Err(CollectError::Infra(format!("listing {dir}: {e}"))),
        };
        for e in entries {
            if e.is_dir || e.is_symlink {
                continue;
            }
            let name = if prefix.is_empty() {
                e.name.clone()
            } else {
                format!("{prefix}/{}", e.name)
            };
            if !glob::matches_any(&spec.patterns, &name) {
                continue;
            }
            if e.size > max_file_bytes {
                return Err(CollectError::Refused(format!(
                    "output {name} is {} bytes, more than artifacts.max_file_bytes ({max_file_bytes})",
                    e.size
                )));
            }
            wanted
                .entry(dir.clone())
                .or_insert_with(|| (prefix.clone(), BTreeSet::new()))
                .1
                .insert(e.name);
        }
    }
    let mut out = Vec::new();
    for (dir, (prefix, names)) in wanted {
        let tmp = blobs
            .temp_file()
            .map_err(|e| CollectError::Infra(format!("{e:#}")))?;
        let mut file = tokio::fs::File::from_std(
            tmp.reopen()
                .map_err(|e| CollectError::Infra(format!("opening a temporary file: {e}")))?,
        );
        client
            .get_tar(&dir, &mut file, None)
            .await
            .map_err(|e| CollectError::Infra(format!("fetching {dir}: {e}")))?;
        drop(file);
        let blobs = blobs.clone();
        let found = tokio::task::spawn_blocking(move || {
            extract_wanted(&blobs, tmp, &names, max_file_bytes)
        })
        .await
        .map_err(|e| CollectError::Infra(format!("copying outputs: {e}")))??;
        for (name, stored) in found {
            let name = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            out.push(NewArtifact {
                name,
                sha256: stored.sha256,
                size: stored.size,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Copies the regular files of the tar.gz in `tar_file` named in `names` into the
/// blob store. Blocking.
fn extract_wanted(
    blobs: &BlobStore,
    tar_file: tempfile::NamedTempFile,
    names: &BTreeSet<String>,
    max_file_bytes: u64,
) -> Result<Vec<(String, super::blobs::Stored)>, CollectError> {
    let infra = |what: &str, e: &dyn std::fmt::Display| CollectError::Infra(format!("{what}: {e}"));
    let reader = tar_file
        .reopen()
        .map_err(|e| infra("reading the outputs tarball", &e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut found = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| infra("reading the outputs tarball", &e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| infra("reading the outputs tarball", &e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| infra("reading the outputs tarball", &e))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        if !names.contains(&path) {
            continue;
        }
        let stored = blobs
            .put(&mut entry as &mut dyn Read, max_file_bytes, &path)
            .map_err(|e| {
                let msg = format!("{e:#}");
                if msg.contains("max_file_bytes") {
                    CollectError::Refused(msg)
                } else {
                    CollectError::Infra(msg)
                }
            })?;
        found.push((path, stored));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(base: &str, patterns: &[&str]) -> CollectSpec {
        CollectSpec {
            base: base.into(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            required: false,
        }
    }

    #[test]
    fn listing_covers_each_prefix_once() {
        assert_eq!(
            dirs_to_list(&spec("out", &["**"])),
            [("out".to_string(), String::new())]
        );
        assert_eq!(
            dirs_to_list(&spec("src", &["bin/*", "bin/sub/*", "dist/*.zip"])),
            [
                ("src/bin".to_string(), "bin".to_string()),
                ("src/dist".to_string(), "dist".to_string())
            ]
        );
        assert_eq!(
            dirs_to_list(&spec("src", &["hello", "bin/*"])),
            [("src".to_string(), String::new())]
        );
    }

    #[test]
    fn only_wanted_regular_files_are_copied() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path());
        let tar_file = blobs.temp_file().unwrap();
        {
            let gz = flate2::write::GzEncoder::new(
                tar_file.reopen().unwrap(),
                flate2::Compression::fast(),
            );
            let mut b = tar::Builder::new(gz);
            for (name, data) in [("hello", &b"binary"[..]), ("notes.txt", &b"skip me"[..])] {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o755);
                h.set_cksum();
                b.append_data(&mut h, name, data).unwrap();
            }
            b.into_inner().unwrap().finish().unwrap();
        }
        let names = BTreeSet::from(["hello".to_string()]);
        let found = extract_wanted(&blobs, tar_file, &names, 1 << 20).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "hello");
        assert_eq!(found[0].1.size, 6);
        let path = blobs.path(&found[0].1.sha256).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"binary");
    }
}
