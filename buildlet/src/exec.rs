//! Running one command for the Exec call: building its environment and PATH, finding
//! the program, and running it in its own process group with stdout and stderr streamed
//! as they are produced, ending with exactly one exit event.
//!
//! Every exit path (normal end, timeout, cancellation, shutdown, panic) goes through
//! [`GroupKiller`], whose `Drop` sends SIGKILL to the whole process group, and through
//! the command's containment [`Scope`], which kills what left the group (its cgroup,
//! and processes carrying its marker; see `contain`), so grandchildren never outlive
//! their call. A command's background processes that are still running when it exits
//! are killed too: a build step must not leave work behind.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::contain::Scope;
use crate::paths::{self, PathError};

/// How long to wait for output still buffered in the pipes after the command's processes
/// are gone. Only a process that escaped containment can hold a pipe open that long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of one read from stdout or stderr (and so the largest output event).
const READ_CHUNK: usize = 32 * 1024;

/// Whether the command's environment starts from the buildlet's own or from nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvMode {
    Add,
    Replace,
}

/// What the caller asked to run, in our own terms.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub cmd: String,
    pub args: Vec<String>,
    /// Working directory relative to the workdir; empty means the workdir.
    pub dir: String,
    /// KEY=VALUE pairs.
    pub env: Vec<String>,
    pub env_mode: EnvMode,
    /// PATH elements; may use $PATH, $WORKDIR and $EMPTY.
    pub path: Vec<String>,
    pub timeout: Option<Duration>,
}

/// A command ready to start: every path resolved, the environment complete.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub timeout: Option<Duration>,
}

/// Why a command could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("bad path: {0}")]
    Path(#[from] PathError),
    #[error("env entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    #[error("empty command")]
    EmptyCommand,
    /// Not a caller error: reported as the exit status's `error`, not as a gRPC failure.
    #[error("executable file not found in $PATH: {cmd:?}")]
    NotFound { cmd: String },
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One event of a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Output {
        stderr: bool,
        data: Bytes,
    },
    Exit(Outcome),
    /// The buildlet is shutting down and killed the command. Not an exit status: the
    /// command did not fail, its host went away, so callers treat it as a lost buildlet.
    Shutdown,
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub duration: Duration,
    pub timed_out: bool,
    /// Set when the command could not be started; code and signal are then unset.
    pub error: Option<String>,
}

impl Outcome {
    pub fn failed(error: impl Into<String>) -> Self {
        Outcome {
            error: Some(error.into()),
            ..Outcome::default()
        }
    }
}

/// Builds the child's environment. Pure: `base` is the buildlet's own environment.
///
/// Order: the base (ADD) or nothing (REPLACE); then TMPDIR=<workdir>/tmp and
/// GOCACHE=<workdir>/gocache, and HOME=<workdir> if unset; then the caller's entries;
/// then PATH from `path_elems` if any, with `$PATH` the PATH so far, `$WORKDIR` the
/// workdir and `$EMPTY` nothing.
pub fn build_env(
    base: impl IntoIterator<Item = (String, String)>,
    mode: EnvMode,
    overrides: &[String],
    path_elems: &[String],
    workdir: &Path,
) -> Result<Vec<(String, String)>, PrepareError> {
    let mut env: Vec<(String, String)> = match mode {
        EnvMode::Add => base.into_iter().collect(),
        EnvMode::Replace => Vec::new(),
    };
    let wd = workdir.to_string_lossy().into_owned();
    set(&mut env, "TMPDIR", format!("{wd}/tmp"));
    set(&mut env, "GOCACHE", format!("{wd}/gocache"));
    if get(&env, "HOME").is_none() {
        set(&mut env, "HOME", wd.clone());
    }
    for kv in overrides {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(PrepareError::BadEnv(kv.clone()));
        };
        if k.is_empty() {
            return Err(PrepareError::BadEnv(kv.clone()));
        }
        set(&mut env, k, v.to_owned());
    }
    if !path_elems.is_empty() {
        let previous = get(&env, "PATH").unwrap_or_default().to_owned();
        let joined = path_elems
            .iter()
            .map(|e| {
                e.replace("$PATH", &previous)
                    .replace("$WORKDIR", &wd)
                    .replace("$EMPTY", "")
            })
            .collect::<Vec<_>>()
            .join(":");
        set(&mut env, "PATH", joined);
    }
    Ok(env)
}

fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: String) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value));
}

/// Resolves everything a command needs inside `workdir` and creates the TMPDIR and
/// GOCACHE directories. `base_env` is the buildlet's own environment.
pub fn prepare(
    workdir: &Path,
    spec: &CommandSpec,
    base_env: impl IntoIterator<Item = (String, String)>,
) -> Result<Prepared, PrepareError> {
    if spec.cmd.is_empty() {
        return Err(PrepareError::EmptyCommand);
    }
    let base: Vec<(String, String)> = base_env.into_iter().collect();
    let own_path = get(&base, "PATH").map(str::to_owned);
    let env = build_env(base, spec.env_mode, &spec.env, &spec.path, workdir)?;
    let dir = paths::resolve_existing_safe(workdir, &spec.dir)?;
    for sub in ["tmp", "gocache"] {
        let p = workdir.join(sub);
        std::fs::create_dir_all(&p).map_err(|source| PrepareError::Io { path: p, source })?;
    }
    let program = if spec.cmd.starts_with('/') {
        PathBuf::from(&spec.cmd)
    } else if spec.cmd.contains('/') {
        paths::resolve_existing_safe(workdir, &spec.cmd)?
    } else {
        // Search the child's PATH; without one (REPLACE mode), the buildlet's own.
        let search = get(&env, "PATH").map(str::to_owned).or(own_path);
        look_path(&spec.cmd, search.as_deref().unwrap_or(""), &dir).ok_or_else(|| {
            PrepareError::NotFound {
                cmd: spec.cmd.clone(),
            }
        })?
    };
    Ok(Prepared {
        program,
        args: spec.args.clone(),
        dir,
        env,
        timeout: spec.timeout,
    })
}

/// Finds `name` in the colon-separated `path`; an empty element means `cwd`.
pub fn look_path(name: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    path.split(':').find_map(|elem| {
        let dir = if elem.is_empty() {
            cwd.to_path_buf()
        } else {
            PathBuf::from(elem)
        };
        let candidate = dir.join(name);
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

/// Kills a process group with SIGKILL when dropped (or earlier, with `kill`).
pub struct GroupKiller {
    pgid: Option<Pid>,
}

impl GroupKiller {
    /// `pid` is the group leader, started with `process_group(0)`.
    pub fn new(pid: Option<u32>) -> Self {
        let pgid = pid
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 0)
            .map(Pid::from_raw);
        GroupKiller { pgid }
    }

    pub fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // ESRCH (group already gone) is the normal case after a clean exit.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Shutdown,
    CallerGone,
}

/// Runs a prepared command to its end inside `scope`, sending output events and then
/// exactly one [`Event::Exit`] (or [`Event::Shutdown`]) into `tx` (unless the receiver
/// is gone, which counts as cancellation and kills the command). `tx` is bounded: a slow
/// receiver slows the readers, and a full pipe then blocks the command, which is the
/// backpressure we want.
pub async fn run(
    prepared: Prepared,
    tx: mpsc::Sender<Event>,
    shutdown: CancellationToken,
    mut scope: Scope,
) {
    let start = Instant::now();
    let mut cmd = tokio::process::Command::new(&prepared.program);
    cmd.args(&prepared.args)
        .current_dir(&prepared.dir)
        .env_clear()
        .envs(
            prepared
                .env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match scope.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("starting {}: {e}", prepared.program.display());
            scope.finish().await;
            let _ = tx.send(Event::Exit(Outcome::failed(msg))).await;
            return;
        }
    };
    let group = GroupKiller::new(child.id());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let pumps = async {
        tokio::join!(pump(stdout, false, &tx), pump(stderr, true, &tx));
    };
    tokio::pin!(pumps);
    let deadline = prepared.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut pumps_done = false;
    let ended = {
        let wait = child.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                status = &mut wait => break Ended::Exited(status),
                _ = &mut pumps, if !pumps_done => pumps_done = true,
                _ = sleep_until(deadline), if deadline.is_some() => break Ended::TimedOut,
                _ = shutdown.cancelled() => break Ended::Shutdown,
                _ = tx.closed() => break Ended::CallerGone,
            }
        }
    };
    // Whatever happened, nothing of the command may survive the call: first its group,
    // then (once the leader is waited for) whatever escaped the group.
    group.kill();
    let (status, timed_out) = match ended {
        Ended::Exited(status) => (status, false),
        Ended::TimedOut => (child.wait().await, true),
        Ended::Shutdown => {
            let _ = child.wait().await;
            scope.finish().await;
            let _ = tx.send(Event::Shutdown).await;
            return;
        }
        Ended::CallerGone => {
            let _ = child.wait().await;
            scope.finish().await;
            tracing::debug!(program = %prepared.program.display(), "exec cancelled by caller");
            return;
        }
    };
    // Escaped processes may hold the pipes open; once they are dead the pumps see EOF.
    scope.finish().await;
    if !pumps_done
        && tokio::time::timeout(DRAIN_TIMEOUT, &mut pumps)
            .await
            .is_err()
    {
        tracing::warn!(program = %prepared.program.display(), "output still open after the command's processes were killed");
    }
    let duration = start.elapsed();
    let outcome = match status {
        Ok(st) => Outcome {
            code: st.code(),
            signal: st.signal(),
            duration,
            timed_out,
            error: None,
        },
        Err(e) => Outcome {
            duration,
            timed_out,
            ..Outcome::failed(format!("waiting for {}: {e}", prepared.program.display()))
        },
    };
    let _ = tx.send(Event::Exit(outcome)).await;
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Forwards one pipe into `tx`, a chunk per read, until EOF or the receiver is gone.
async fn pump<R: AsyncRead + Unpin>(reader: Option<R>, stderr: bool, tx: &mpsc::Sender<Event>) {
    let Some(mut reader) = reader else { return };
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {
                let data = buf.split().freeze();
                if tx.send(Event::Output { stderr, data }).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, stderr, "reading command output");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("USER".into(), "gopher".into()),
        ]
    }

    #[test]
    fn add_mode_inherits_and_overrides() {
        let env = build_env(
            base(),
            EnvMode::Add,
            &["USER=other".into(), "GOOS=linux".into()],
            &[],
            Path::new("/w"),
        )
        .unwrap();
        assert_eq!(get(&env, "USER"), Some("other"));
        assert_eq!(get(&env, "GOOS"), Some("linux"));
        assert_eq!(get(&env, "PATH"), Some("/usr/bin:/bin"));
        assert_eq!(get(&env, "TMPDIR"), Some("/w/tmp"));
        assert_eq!(get(&env, "GOCACHE"), Some("/w/gocache"));
        assert_eq!(get(&env, "HOME"), Some("/w"));
    }

    #[test]
    fn replace_mode_starts_empty() {
        let env = build_env(
            base(),
            EnvMode::Replace,
            &["A=1".into()],
            &[],
            Path::new("/w"),
        )
        .unwrap();
        assert_eq!(get(&env, "USER"), None);
        assert_eq!(get(&env, "PATH"), None);
        assert_eq!(get(&env, "A"), Some("1"));
        assert_eq!(get(&env, "TMPDIR"), Some("/w/tmp"));
    }

    #[test]
    fn path_substitution() {
        let env = build_env(
            base(),
            EnvMode::Add,
            &[],
            &["$WORKDIR/go/bin".into(), "$PATH".into(), "$EMPTY".into()],
            Path::new("/w"),
        )
        .unwrap();
        assert_eq!(get(&env, "PATH"), Some("/w/go/bin:/usr/bin:/bin:"));
    }

    #[test]
    fn bad_env_entry_is_refused() {
        let err = build_env(
            base(),
            EnvMode::Add,
            &["NOEQUALS".into()],
            &[],
            Path::new("/w"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("NOEQUALS"), "{err}");
    }

    #[test]
    fn look_path_finds_executables_only() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("data");
        std::fs::write(&plain, "x").unwrap();
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(look_path("tool", &path, Path::new("/")), Some(exe));
        assert_eq!(look_path("data", &path, Path::new("/")), None);
        assert_eq!(look_path("missing", &path, Path::new("/")), None);
    }
}
