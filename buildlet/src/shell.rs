//! The interactive shell behind `gomote ssh`: a command on a fresh PTY in its own
//! session, PTY output streamed out, caller input written in, window resizes applied,
//! and one exit event at the end. The session's process group is killed (and the PTY
//! closed, which hangs up the session) when the call ends for any reason, and so is
//! everything that left the group, through the session's containment [`Scope`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::pty::{Winsize, openpty};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::contain::Scope;
use crate::exec::{GroupKiller, Outcome, look_path};

/// How long to keep reading output the PTY still holds once the command has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What to run on the PTY.
#[derive(Debug, Clone, Default)]
pub struct ShellSpec {
    /// Empty means `$SHELL`, or `/bin/sh`.
    pub argv: Vec<String>,
    pub rows: u16,
    pub cols: u16,
    /// TERM for the command; empty means "xterm".
    pub term: String,
}

/// Input from the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellInput {
    Stdin(Bytes),
    Resize { rows: u16, cols: u16 },
}

/// Output to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    Data(Bytes),
    Exit(Outcome),
}

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: if rows == 0 { 24 } else { rows },
        ws_col: if cols == 0 { 80 } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_winsize(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn spawn(
    workdir: &Path,
    spec: &ShellSpec,
    mut env: Vec<(String, String)>,
    scope: &mut Scope,
) -> io::Result<(tokio::process::Child, AsyncFd<OwnedFd>)> {
    let pty = openpty(&winsize(spec.rows, spec.cols), None).map_err(io::Error::from)?;
    let term = if spec.term.is_empty() {
        "xterm"
    } else {
        &spec.term
    };
    env.retain(|(k, _)| k != "TERM");
    env.push(("TERM".into(), term.into()));
    let mut argv = spec.argv.clone();
    if argv.is_empty() {
        let shell = env
            .iter()
            .find(|(k, _)| k == "SHELL")
            .map(|(_, v)| v.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/bin/sh".into());
        argv.push(shell);
    }
    let program = if argv[0].contains('/') {
        PathBuf::from(&argv[0])
    } else {
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("/usr/bin:/bin");
        look_path(&argv[0], path, workdir).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("executable file not found in $PATH: {:?}", argv[0]),
            )
        })?
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&argv[1..])
        .current_dir(workdir)
        .env_clear()
        .envs(env)
        .stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave))
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls (setsid, ioctl) run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // A new session makes the PTY its controlling terminal and the child the
            // leader of its own process group.
            nix::unistd::setsid().map_err(io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // `cmd` holds the slave ends; dropping it after spawn leaves only the child's, so
    // reading the master reports EIO once the session is gone.
    let child = scope.spawn(&mut cmd)?;
    drop(cmd);
    let flags = fcntl(pty.master.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(pty.master.as_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    // SAFETY: `OwnedFd` keeps the descriptor open and returns the same one until the
    // `AsyncFd` that owns it is dropped.
    let master = unsafe { AsyncFd::register(pty.master)? };
    Ok((child, master))
}

async fn read_master(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| nix::unistd::read(inner.get_ref(), buf).map_err(io::Error::from))
        {
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn write_master(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Runs `spec` on a new PTY in `workdir` with environment `env` until it exits, the
/// caller goes away (`tx` closed) or `shutdown` fires. Sends exactly one
/// [`ShellEvent::Exit`] unless the caller is gone.
pub async fn run(
    workdir: PathBuf,
    spec: ShellSpec,
    env: Vec<(String, String)>,
    mut input: impl Stream<Item = ShellInput> + Unpin,
    tx: mpsc::Sender<ShellEvent>,
    shutdown: CancellationToken,
    mut scope: Scope,
) {
    let start = Instant::now();
    let (mut child, master) = match spawn(&workdir, &spec, env, &mut scope) {
        Ok(x) => x,
        Err(e) => {
            scope.finish().await;
            let _ = tx
                .send(ShellEvent::Exit(Outcome::failed(format!(
                    "starting shell: {e}"
                ))))
                .await;
            return;
        }
    };
    let group = GroupKiller::new(child.id());
    let mut buf = vec![0u8; 32 * 1024];
    let mut input_open = true;
    let mut output_open = true;
    let status = loop {
        tokio::select! {
            r = read_master(&master, &mut buf), if output_open => match r {
                Ok(0) => output_open = false,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if tx.send(ShellEvent::Data(data)).await.is_err() {
                        break None; // caller gone
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading pty");
                    output_open = false;
                }
            },
            msg = input.next(), if input_open => match msg {
                Some(ShellInput::Stdin(data)) => {
                    if let Err(e) = write_master(&master, &data).await {
                        tracing::debug!(error = %e, "writing pty");
                    }
                }
                Some(ShellInput::Resize { rows, cols }) => {
                    if let Err(e) = set_winsize(master.get_ref(), rows, cols) {
                        tracing::debug!(error = %e, "resizing pty");
                    }
                }
                None => input_open = false,
            },
            st = child.wait() => break Some(st),
            _ = shutdown.cancelled() => {
                group.kill();
                break Some(child.wait().await);
            }
            _ = tx.closed() => break None,
        }
    };
    group.kill();
    let Some(status) = status else {
        let _ = child.wait().await;
        scope.finish().await;
        return;
    };
    scope.finish().await;
    // Output the command wrote just before exiting may still sit in the PTY.
    let drain = async {
        while output_open {
            match read_master(&master, &mut buf).await {
                Ok(0) | Err(_) => output_open = false,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if tx.send(ShellEvent::Data(data)).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    let duration = start.elapsed();
    let outcome = match status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            Outcome {
                code: st.code(),
                signal: st.signal(),
                duration,
                timed_out: false,
                error: None,
            }
        }
        Err(e) => Outcome {
            duration,
            ..Outcome::failed(format!("waiting for shell: {e}"))
        },
    };
    let _ = tx.send(ShellEvent::Exit(outcome)).await;
}
