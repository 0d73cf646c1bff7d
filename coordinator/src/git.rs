//! Source fetching with real `git`: one bare mirror per watched repo under the data dir,
//! new-commit discovery on branches, and source tarballs of a commit (optionally with a
//! patch applied), each made once and cached on disk.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tracing::debug;

/// A commit as `git log` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub hash: String,
    pub parents: Vec<String>,
    pub author: String,
    /// Unix seconds.
    pub commit_time: i64,
    pub subject: String,
}

/// A bare mirror of one repository.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub name: String,
    pub url: String,
    dir: PathBuf,
    cache_dir: PathBuf,
    /// Server paths to hide from messages users see, with what stands in for each,
    /// longest first (see [`Mirror::scrub`]).
    hidden: Vec<(String, &'static str)>,
    /// One fetch at a time into the mirror (the poller, a webhook and a try submit may
    /// ask at once); clones of a mirror share it.
    fetch_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Why a try patch was refused at submit time.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch is not a patch, or does not apply to the revision; `message` is git's,
    /// with server paths removed.
    #[error("the patch does not apply to {rev}: {message}")]
    DoesNotApply { rev: String, message: String },
    /// The check itself could not run (git missing, disk full); not the patch's fault.
    #[error("checking the patch: {0:#}")]
    Check(anyhow::Error),
}

/// Runs git with `input` on its stdin and returns its output whatever the exit status;
/// `env` adds variables (e.g. a private `GIT_INDEX_FILE`).
async fn git_with_input(
    args: &[&str],
    cwd: Option<&Path>,
    env: &[(&str, &Path)],
    input: &[u8],
) -> Result<std::process::Output> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = Command::new("git");
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("GIT_TERMINAL_PROMPT", "0")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .spawn()
        .context("running git (is it installed? apt-get install git)")?;
    let mut stdin = child.stdin.take().context("git stdin")?;
    // Written while the output is read, so a large patch cannot deadlock against a
    // full stderr pipe; a write error (git exited early) shows in the exit status.
    let write = async move {
        let _ = stdin.write_all(input).await;
        drop(stdin);
    };
    let (_, out) = tokio::join!(write, child.wait_with_output());
    out.context("waiting for git")
}

async fn git(args: &[&str], cwd: Option<&Path>) -> Result<Vec<u8>> {
    let mut cmd = Command::new("git");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("GIT_TERMINAL_PROMPT", "0")
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd
        .output()
        .await
        .context("running git (is it installed? apt-get install git)")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Refuses revisions and branch names that git could read as options.
fn check_ref(what: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && !value.starts_with('-')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-~^".contains(c));
    if !ok {
        bail!("invalid {what} {value:?}");
    }
    Ok(())
}

impl Mirror {
    /// Opens the mirror of `url` under `data_dir/git`, cloning it first if needed.
    pub async fn open(name: &str, url: &str, data_dir: &Path) -> Result<Mirror> {
        let dir = data_dir.join("git").join(format!("{name}.git"));
        let cache_dir = data_dir.join("src-cache").join(name);
        tokio::fs::create_dir_all(&cache_dir)
            .await
            .with_context(|| format!("creating {}", cache_dir.display()))?;
        if !dir.join("HEAD").exists() {
            let parent = dir.parent().context("mirror dir has no parent")?;
            tokio::fs::create_dir_all(parent).await?;
            let dir_s = dir.to_string_lossy().into_owned();
            git(&["clone", "--quiet", "--mirror", "--", url, &dir_s], None)
                .await
                .with_context(|| format!("cloning repo {name} from {url}"))?;
        }
        let hidden = hidden_paths(&[
            (dir.clone(), "<mirror>"),
            (cache_dir.clone(), "<cache>"),
            (data_dir.to_owned(), "<data>"),
        ]);
        Ok(Mirror {
            name: name.to_owned(),
            url: url.to_owned(),
            dir,
            cache_dir,
            hidden,
            fetch_lock: Default::default(),
        })
    }

    /// `text` with the coordinator's own paths (mirror, caches, data dir)
    /// replaced by placeholders, for messages that reach users and public build logs.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (path, stand_in) in &self.hidden {
            out = out.replace(path.as_str(), stand_in);
        }
        out
    }

    /// Checks that `patch` applies to `rev` with `git apply --check`, against the
    /// commit's tree in a private index (no checkout), before a try run is stored.
    pub async fn check_patch(&self, rev: &str, patch: &[u8]) -> Result<(), PatchError> {
        check_ref("revision", rev).map_err(PatchError::Check)?;
        let tmp = tempfile::Builder::new()
            .prefix(".patch-check-")
            .tempdir_in(&self.cache_dir)
            .context("creating patch check dir")
            .map_err(PatchError::Check)?;
        let index = tmp.path().join("index");
        let env = [("GIT_INDEX_FILE", index.as_path())];
        let git_dir = self.git_dir_arg();
        let out = git_with_input(&[&git_dir, "read-tree", rev], None, &env, b"")
            .await
            .map_err(PatchError::Check)?;
        if !out.status.success() {
            return Err(PatchError::Check(anyhow::anyhow!(
                "git read-tree {rev}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let out = git_with_input(
            &[
                &git_dir,
                "apply",
                "--check",
                "--cached",
                "--whitespace=nowarn",
                "-",
            ],
            None,
            &env,
            patch,
        )
        .await
        .map_err(PatchError::Check)?;
        if out.status.success() {
            return Ok(());
        }
        let mut message = self.scrub(String::from_utf8_lossy(&out.stderr).trim());
        if message.is_empty() {
            message = format!("git apply exited with {}", out.status);
        }
        // git speaks of its index, which here is the revision's tree.
        let message = message
            .replace(
                ": does not exist in index",
                ": does not exist in that revision",
            )
            .replace('\n', "; ");
        Err(PatchError::DoesNotApply {
            rev: rev.to_owned(),
            message,
        })
    }

    fn git_dir_arg(&self) -> String {
        format!("--git-dir={}", self.dir.display())
    }

    /// Fetches every branch and tag from the origin. Concurrent callers wait for each other:
    /// two fetches into one repository would race on its refs.
    pub async fn fetch(&self) -> Result<()> {
        let _one_at_a_time = self.fetch_lock.lock().await;
        git(
            &[
                &self.git_dir_arg(),
                "fetch",
                "--quiet",
                "--prune",
                "origin",
                "+refs/heads/*:refs/heads/*",
                // Tags too: artifacts are asked for by tag.
                "+refs/tags/*:refs/tags/*",
            ],
            None,
        )
        .await
        .with_context(|| format!("fetching repo {}", self.name))?;
        Ok(())
    }

    /// The commit a branch points at, if the branch exists.
    pub async fn branch_head(&self, branch: &str) -> Result<Option<String>> {
        check_ref("branch", branch)?;
        let spec = format!("refs/heads/{branch}^{{commit}}");
        match git(
            &[
                &self.git_dir_arg(),
                "rev-parse",
                "--verify",
                "--quiet",
                &spec,
            ],
            None,
        )
        .await
        {
            Ok(out) => Ok(Some(String::from_utf8_lossy(&out).trim().to_owned())),
            Err(_) => Ok(None),
        }
    }

    /// Resolves a revision (hash, branch, tag) to a full commit hash.
    pub async fn resolve(&self, rev: &str) -> Result<String> {
        check_ref("revision", rev)?;
        let spec = format!("{rev}^{{commit}}");
        let out = git(&[&self.git_dir_arg(), "rev-parse", "--verify", &spec], None)
            .await
            .with_context(|| format!("unknown revision {rev:?} in repo {}", self.name))?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    }

    /// Up to `limit` commits of `branch`, newest first.
    pub async fn log(&self, branch: &str, limit: usize) -> Result<Vec<CommitInfo>> {
        check_ref("branch", branch)?;
        let n = format!("-n{limit}");
        let spec = format!("refs/heads/{branch}");
        let out = git(
            &[
                &self.git_dir_arg(),
                "log",
                &n,
                "--format=%H%x1f%P%x1f%an%x1f%ct%x1f%s%x1e",
                &spec,
                "--",
            ],
            None,
        )
        .await
        .with_context(|| format!("listing commits of {}:{branch}", self.name))?;
        parse_log(&String::from_utf8_lossy(&out))
    }

    /// The source of `rev` (plus `patch`, if any) as a tar.gz, made once and cached.
    /// Errors name no server path: they end up in public build logs. The farm goes
    /// through `sources::SourceCache`, which also makes it once when many ask at once.
    pub async fn source_tarball(&self, rev: &str, patch: Option<&[u8]>) -> Result<PathBuf> {
        let path = self.tarball_path(rev, patch)?;
        if !path.exists() {
            self.build_tarball(rev, patch, &path).await?;
        }
        Ok(path)
    }

    /// Where the tarball of `rev` (plus `patch`) is cached: one file per rev and patch
    /// digest.
    pub fn tarball_path(&self, rev: &str, patch: Option<&[u8]>) -> Result<PathBuf> {
        check_ref("revision", rev)?;
        let key = match patch {
            None => rev.to_owned(),
            Some(p) => format!("{rev}-{}", hex::encode(&Sha256::digest(p)[..8])),
        };
        Ok(self.cache_dir.join(format!("{key}.tar.gz")))
    }

    /// The directory holding this mirror's cached tarballs.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Checks out `rev`, applies `patch`, and writes the tar.gz to `path` (atomically,
    /// by rename). Errors name no server path.
    pub async fn build_tarball(&self, rev: &str, patch: Option<&[u8]>, path: &Path) -> Result<()> {
        self.make_source_tarball(rev, patch, path)
            .await
            .map_err(|e| anyhow::anyhow!(self.scrub(&format!("{e:#}"))))
    }

    async fn make_source_tarball(
        &self,
        rev: &str,
        patch: Option<&[u8]>,
        path: &Path,
    ) -> Result<()> {
        check_ref("revision", rev)?;
        let tmp = tempfile::Builder::new()
            .prefix(".checkout-")
            .tempdir_in(&self.cache_dir)
            .context("creating checkout dir")?;
        let work = tmp.path().join("src");
        tokio::fs::create_dir_all(&work).await?;
        let work_arg = format!("--work-tree={}", work.display());
        // A private index keeps concurrent checkouts from sharing the mirror's index.
        let index = tmp.path().join("index");
        let mut checkout = Command::new("git");
        checkout
            .args([
                &self.git_dir_arg(),
                &work_arg,
                "checkout",
                "--quiet",
                "--force",
                rev,
                "--",
                ".",
            ])
            .env("GIT_INDEX_FILE", &index)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = checkout.output().await.context("running git checkout")?;
        if !out.status.success() {
            bail!(
                "checking out {rev} of {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if let Some(patch) = patch {
            // On stdin, so git's messages name no file of ours.
            let out = git_with_input(
                &["apply", "--whitespace=nowarn", "-"],
                Some(&work),
                &[],
                patch,
            )
            .await?;
            if !out.status.success() {
                bail!(
                    "applying the patch on {rev}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let staged = tmp.path().join("out.tar.gz");
        let (src, dst) = (work.clone(), staged.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let file = std::fs::File::create(&dst)?;
            buildlet::tarball::write_tar_gz(&src, std::io::BufWriter::new(file))?;
            Ok(())
        })
        .await
        .context("tarball task panicked")??;
        tokio::fs::rename(&staged, path).await?;
        debug!(repo = %self.name, rev, "made source tarball");
        Ok(())
    }
}

/// Each path in its given and canonical form (deduplicated), longest first so a longer
/// path is replaced before a prefix of it.
fn hidden_paths(paths: &[(PathBuf, &'static str)]) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = Vec::new();
    for (path, stand_in) in paths {
        let canonical = std::fs::canonicalize(path).ok();
        for p in std::iter::once(path.clone()).chain(canonical) {
            let s = p.to_string_lossy().trim_end_matches('/').to_owned();
            // A bare relative name ("data") would also match words in git's messages.
            let specific = p.is_absolute() || s.contains('/');
            if specific && s.len() > 1 && !out.iter().any(|(seen, _)| *seen == s) {
                out.push((s, stand_in));
            }
        }
    }
    out.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    out
}

fn parse_log(text: &str) -> Result<Vec<CommitInfo>> {
    let mut commits = Vec::new();
    for record in text.split('\u{1e}') {
        let record = record.trim_start_matches('\n');
        if record.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = record.split('\u{1f}').collect();
        let [hash, parents, author, time, subject] = fields[..] else {
            bail!("unexpected git log record {record:?}");
        };
        commits.push(CommitInfo {
            hash: hash.to_owned(),
            parents: parents.split_whitespace().map(str::to_owned).collect(),
            author: author.to_owned(),
            commit_time: time.trim().parse().context("commit time")?,
            subject: subject.trim_end().to_owned(),
        });
    }
    Ok(commits)
}

/// Makes (or refreshes) a git repository at `repo_dir` holding a copy of `src_dir`, with
/// a new commit on `main` whenever the copy changed. The main job uses this to build the
/// example module shipped under `env/examples/` as a real repository.
pub async fn import_dir_as_repo(src_dir: &Path, repo_dir: &Path) -> Result<()> {
    if !repo_dir.join(".git").exists() {
        tokio::fs::create_dir_all(repo_dir).await?;
        git(
            &["init", "--quiet", "--initial-branch=main"],
            Some(repo_dir),
        )
        .await?;
    }
    let (src, dst) = (src_dir.to_owned(), repo_dir.to_owned());
    tokio::task::spawn_blocking(move || copy_tree(&src, &dst))
        .await
        .context("copy task panicked")??;
    git(&["add", "--all"], Some(repo_dir)).await?;
    let status = git(&["status", "--porcelain"], Some(repo_dir)).await?;
    if !status.is_empty() {
        git(
            &[
                "-c",
                "user.name=buildfarm",
                "-c",
                "user.email=buildfarm@localhost",
                "commit",
                "--quiet",
                "-m",
                "import example module",
            ],
            Some(repo_dir),
        )
        .await?;
    }
    Ok(())
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    for entry in walkdir::WalkDir::new(src).min_depth(1) {
        let entry = entry?;
        let rel = entry.path().strip_prefix(src)?;
        let target = dst.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target)?;
        } else if entry.file_type().is_file() {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_git_log_records() {
        let text = "abc\u{1f}p1 p2\u{1f}Ann\u{1f}1700000000\u{1f}fix: thing\u{1e}\n\
                    def\u{1f}\u{1f}Bob\u{1f}1600000000\u{1f}root\u{1e}\n";
        let commits = parse_log(text).expect("parse");
        assert_eq!(commits.len(), 2);
        assert_eq!(commits[0].parents, vec!["p1", "p2"]);
        assert_eq!(commits[0].subject, "fix: thing");
        assert!(commits[1].parents.is_empty());
        assert_eq!(commits[1].commit_time, 1_600_000_000);
    }

    fn sh_git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[tokio::test]
    async fn patches_are_checked_against_the_revision_and_errors_name_no_server_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("repo");
        std::fs::create_dir_all(&repo).expect("mkdir");
        sh_git(&repo, &["init", "--quiet", "--initial-branch=main"]);
        std::fs::write(repo.join("a.txt"), "one\ntwo\n").expect("write");
        sh_git(&repo, &["add", "-A"]);
        sh_git(&repo, &["commit", "--quiet", "-m", "first"]);
        let rev = sh_git(&repo, &["rev-parse", "HEAD"]);
        std::fs::write(repo.join("a.txt"), "one\n2\n").expect("write");
        std::fs::write(repo.join("new.txt"), "new\n").expect("write");
        sh_git(&repo, &["add", "-A"]);
        let good = format!("{}\n", sh_git(&repo, &["diff", "--cached", "--binary"]));
        let data = tmp.path().join("data");
        let mirror = Mirror::open("r", &repo.to_string_lossy(), &data)
            .await
            .expect("mirror");

        mirror
            .check_patch(&rev, good.as_bytes())
            .await
            .expect("good patch");
        let bad = good.replace("-two", "-zwei");
        let err = mirror
            .check_patch(&rev, bad.as_bytes())
            .await
            .expect_err("conflicting patch accepted");
        let msg = err.to_string();
        assert!(matches!(err, PatchError::DoesNotApply { .. }), "{msg}");
        assert!(msg.contains("a.txt"), "{msg}");
        let err = mirror
            .check_patch(&rev, b"garbage\n")
            .await
            .expect_err("garbage accepted");
        assert!(err.to_string().contains("No valid patches"), "{err}");
        for msg in [msg, err.to_string()] {
            assert!(!msg.contains(&*tmp.path().to_string_lossy()), "{msg}");
        }

        // The runner's path: the same refusal, scrubbed, from source_tarball.
        let err = mirror
            .source_tarball(&rev, Some(bad.as_bytes()))
            .await
            .expect_err("conflicting patch applied");
        let msg = format!("{err:#}");
        assert!(msg.contains("a.txt"), "{msg}");
        assert!(!msg.contains(&*tmp.path().to_string_lossy()), "{msg}");
        mirror
            .source_tarball(&rev, Some(good.as_bytes()))
            .await
            .expect("good patch applies");
        let err = mirror.resolve("nope").await.expect_err("unknown rev");
        let scrubbed = mirror.scrub(&format!("{err:#}"));
        assert!(scrubbed.contains("<mirror>"), "{scrubbed}");
        assert!(
            !scrubbed.contains(&*tmp.path().to_string_lossy()),
            "{scrubbed}"
        );
    }

    #[test]
    fn scrub_replaces_longer_paths_first_and_skips_bare_names() {
        let hidden = hidden_paths(&[
            (PathBuf::from("/srv/bf"), "<data>"),
            (PathBuf::from("/srv/bf/git/x.git"), "<mirror>"),
            (PathBuf::from("data"), "<data>"),
        ]);
        let names: Vec<&str> = hidden.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["/srv/bf/git/x.git", "/srv/bf"]);
    }

    #[test]
    fn refs_that_look_like_options_are_refused() {
        assert!(check_ref("revision", "--upload-pack=x").is_err());
        assert!(check_ref("revision", "").is_err());
        assert!(check_ref("revision", "main").is_ok());
        assert!(check_ref("revision", "0123abcd").is_ok());
    }
}
