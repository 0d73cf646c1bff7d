//! Containment of the process trees the buildlet starts (Exec commands, Shell
//! sessions): nothing a command starts may outlive it, however it detaches
//! (`setsid`, double fork, `nohup`).
//!
//! Two mechanisms, used together:
//!
//! - **cgroups** (when usable, see [`CgroupChoice`]): the buildlet makes one container
//!   cgroup named after its workdir ([`container_name`]), and one child of it per exec
//!   (`exec-N`) or shell (`shell-N`), which the command joins between fork and exec.
//!   When the command ends, everything in its cgroup is killed and the cgroup removed.
//!   A process cannot leave its cgroup unless it may write another cgroup's
//!   `cgroup.procs` (i.e. it runs as root in a writable cgroupfs): the exact answer.
//!   If the buildlet itself dies by SIGKILL, the container survives with whatever was
//!   running; a supervisor kills it by its path (reported at start-up and in Status),
//!   and a buildlet restarted on the same workdir kills it before serving.
//! - **child subreaper** (always on): orphans of a command are re-parented to the
//!   buildlet rather than to init, so they stay findable as its descendants, and the
//!   buildlet reaps them (it waits only for pids tokio does not own). Every command's
//!   environment carries `BUILDLET_EXEC_ID=<id>`; when the command ends, each
//!   descendant of the buildlet whose environment (`/proc/PID/environ`) carries that
//!   id is stopped, then killed with its own descendants. Precision limit: a process
//!   that exec'd with the marker erased from its environment is not attributed to its
//!   command; it is killed once no command is running any more, and on Halt or
//!   shutdown. Without cgroups, a SIGKILLed buildlet's orphans go to init; a restarted
//!   buildlet on the same workdir kills those whose marker names that workdir. Pids
//!   are signalled, not pidfds: a pid that exits and is reused between the scan and
//!   the signal (milliseconds) could be hit; v2 `cgroup.kill` has no such window.
//!
//! Every child process of the buildlet must be started through [`Scope::spawn`], since
//! the reaper waits for any other child of the buildlet.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

use crate::cgroup::{self, Cgroup, CgroupError, ProcsFile};

/// The environment variable that marks every process a command starts.
pub const EXEC_ID_ENV: &str = "BUILDLET_EXEC_ID";
/// How long killing one cgroup may take before it is reported as stuck.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds of "find, stop, kill" in a marker sweep: a process tree forking while being
/// killed needs a few; one that still grows after this many is reported.
const SWEEP_ROUNDS: usize = 50;

/// Which cgroup the buildlet contains its commands in (`--cgroup`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CgroupChoice {
    /// The buildlet's own cgroup (v2, else v1 pids, else v1 freezer) if it can make
    /// children there; otherwise none.
    #[default]
    Auto,
    /// No cgroup: the subreaper and the environment marker alone.
    None,
    /// This cgroup directory (any hierarchy); an error if it is not usable.
    Dir(PathBuf),
}

impl FromStr for CgroupChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(CgroupChoice::Auto),
            "none" => Ok(CgroupChoice::None),
            "" => Err("empty --cgroup: give a directory, auto or none".into()),
            dir if dir.starts_with('/') => Ok(CgroupChoice::Dir(PathBuf::from(dir))),
            other => Err(format!(
                "--cgroup {other:?}: give an absolute cgroup directory, auto or none"
            )),
        }
    }
}

/// Why containment could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ContainError {
    #[error("--cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: CgroupError,
    },
    #[error("making the exec cgroup: {0}")]
    ExecCgroup(#[source] CgroupError),
    #[error("the buildlet is shutting down")]
    ShuttingDown,
}

/// A short stable key for a workdir: the first 16 hex digits of the SHA-256 of its path.
pub fn workdir_key(workdir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let digest = Sha256::digest(workdir.as_os_str().as_bytes());
    hex::encode(&digest[..8])
}

/// The name of the container cgroup of a buildlet on `workdir` (its canonical path),
/// made under the cgroup `--cgroup` selects. A supervisor that knows the workdir and
/// that cgroup can find (and kill) it without asking the buildlet.
pub fn container_name(workdir: &Path) -> String {
    format!("buildlet-{}", workdir_key(workdir))
}

/// Kills what buildlets on `workdir` (the canonical path they were given) left behind
/// when they died without cleaning up: the container cgroup under `base` (the cgroup
/// their `--cgroup` selected), removed with everything in it, and every process whose
/// `BUILDLET_EXEC_ID` names that workdir (reading other users' environments needs
/// root). For a supervisor such as the coordinator, before it deletes stale workdirs.
/// Blocking. Returns how many processes were killed.
pub fn kill_leftovers(workdir: &Path, base: Option<&Cgroup>) -> Result<usize, CgroupError> {
    let mut killed = 0;
    if let Some(base) = base
        && let Some(container) = base.child(&container_name(workdir))?
    {
        killed += container.pids_recursive()?.len();
        container.remove(KILL_TIMEOUT)?;
    }
    let prefix = format!("{}.", workdir_key(workdir));
    killed += sweep(
        std::process::id() as i32,
        Domain::Everyone,
        &Match::Prefix(&prefix),
    );
    Ok(killed)
}

#[derive(Default)]
struct State {
    /// Pids tokio owns (live exec and shell leaders): the reaper never waits for them.
    leaders: HashSet<i32>,
    /// Scopes not finished yet.
    live: usize,
    shut_down: bool,
}

/// The buildlet's containment: its container cgroup (if any) and its bookkeeping of
/// running commands. Shared by every call.
pub struct Containment {
    container: Option<Cgroup>,
    /// Prefix of every exec id of this workdir: `<workdir key>.`
    id_prefix: String,
    pid: i32,
    next: AtomicU64,
    state: Mutex<State>,
    description: String,
}

impl Containment {
    /// Sets up containment for a buildlet on `workdir` (canonical): becomes a child
    /// subreaper, makes the container cgroup, and kills whatever a previous buildlet
    /// on the same workdir left behind. Starts the reaper if called inside a tokio
    /// runtime.
    pub fn new(choice: &CgroupChoice, workdir: &Path) -> Result<Arc<Self>, ContainError> {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot become a child subreaper");
        }
        let name = container_name(workdir);
        let base = match choice {
            CgroupChoice::None => Err("disabled by --cgroup none".to_owned()),
            CgroupChoice::Auto => cgroup::usable_own_cgroup().map_err(|r| r.join("; ")),
            CgroupChoice::Dir(dir) => {
                let cg = Cgroup::open(dir).and_then(|cg| cgroup::probe(&cg).map(|()| cg));
                Ok(cg.map_err(|source| ContainError::Cgroup {
                    path: dir.clone(),
                    source,
                })?)
            }
        };
        let container = match base {
            Ok(base) => match Self::open_container(&base, &name) {
                Ok(c) => Some(c),
                Err(source) if matches!(choice, CgroupChoice::Dir(_)) => {
                    return Err(ContainError::Cgroup {
                        path: base.path().to_owned(),
                        source,
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "no usable cgroup; containing commands without one");
                    None
                }
            },
            Err(reason) => {
                tracing::info!(reason, "no cgroup; containing commands without one");
                None
            }
        };
        let description = match &container {
            Some(cg) => format!("cgroup {} {}", cg.version(), cg.path().display()),
            None => "subreaper".to_owned(),
        };
        let this = Arc::new(Containment {
            container,
            id_prefix: format!("{}.", workdir_key(workdir)),
            pid: std::process::id() as i32,
            next: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            description,
        });
        let leftovers = sweep(this.pid, Domain::Everyone, &Match::Prefix(&this.id_prefix));
        if leftovers > 0 {
            tracing::warn!(
                killed = leftovers,
                "killed processes a previous buildlet on this workdir left behind"
            );
        }
        // Not owned by a task tracker on purpose: it lives as long as the containment
        // (it holds a weak reference and ends when that is gone), past any drain.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(reap_loop(Arc::downgrade(&this)));
        }
        Ok(this)
    }

    /// Makes (or takes over) the container and empties it: anything in it belongs to
    /// a dead predecessor on the same workdir.
    fn open_container(base: &Cgroup, name: &str) -> Result<Cgroup, CgroupError> {
        if let Some(old) = base.child(name)? {
            let left = old.pids_recursive()?.len();
            old.clear(KILL_TIMEOUT)?;
            if left > 0 {
                tracing::warn!(
                    cgroup = %old.path().display(),
                    killed = left,
                    "killed processes a previous buildlet on this workdir left behind"
                );
            }
            return Ok(old);
        }
        base.create_child(name)
    }

    /// What contains commands: `cgroup v2 /sys/fs/cgroup/...`, `cgroup v1 ...` or
    /// `subreaper`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The container cgroup, whose subtree holds every running command.
    pub fn cgroup_path(&self) -> Option<&Path> {
        self.container.as_ref().map(|c| c.path())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A scope for one command (`kind` is "exec" or "shell"): its id, and its cgroup
    /// when the buildlet has a container.
    pub fn scope(self: &Arc<Self>, kind: &str) -> Result<Scope, ContainError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.lock();
            if st.shut_down {
                return Err(ContainError::ShuttingDown);
            }
            st.live += 1;
        }
        let mut scope = Scope {
            contain: self.clone(),
            id: format!("{}{}.{n}", self.id_prefix, self.pid),
            cgroup: None,
            procs: None,
            leader: None,
            finished: false,
        };
        if let Some(container) = &self.container {
            // On error `scope` drops here and gives back its `live` count.
            let name = format!("{kind}-{n}");
            let cg = match container.create_child(&name) {
                Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    // Removed under us (by a supervisor's clean-up): make it again.
                    tracing::warn!(cgroup = %container.path().display(), "container cgroup vanished; recreating it");
                    match std::fs::create_dir(container.path()) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                            Err(CgroupError::Io {
                                op: "recreating cgroup",
                                path: container.path().to_owned(),
                                source: e,
                            })
                        }
                        _ => container.create_child(&name),
                    }
                }
                other => other,
            }
            .map_err(ContainError::ExecCgroup)?;
            scope.procs = Some(cg.procs_file().map_err(ContainError::ExecCgroup)?);
            scope.cgroup = Some(cg);
        }
        Ok(scope)
    }

    /// Waits for every exited child of the buildlet that tokio does not own.
    fn reap(&self) {
        let st = self.lock();
        for child in children_of(self.pid) {
            if st.leaders.contains(&child) {
                continue;
            }
            match waitpid(Pid::from_raw(child), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => {}
                Ok(status) => tracing::debug!(pid = child, ?status, "reaped an orphan"),
            }
        }
    }

    /// Kills every process the buildlet started and removes its container cgroup: for
    /// Halt and shutdown, after the commands were cancelled. Blocking.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shut_down = true;
        let killed = sweep(self.pid, Domain::Descendants, &Match::Any);
        if killed > 0 {
            tracing::info!(killed, "killed processes left at shutdown");
        }
        if let Some(cg) = &self.container
            && let Err(error) = cg.remove(KILL_TIMEOUT)
        {
            tracing::warn!(%error, "removing the container cgroup");
        }
        drop(st);
        self.reap();
    }
}

async fn reap_loop(contain: Weak<Containment>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => Some(s),
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGCHLD; reaping orphans every second");
            None
        }
    };
    // SIGCHLD can be coalesced and tokio's own process driver consumes it too: a
    // periodic pass makes sure no zombie stays for long.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = async { match &mut sigchld { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
            _ = tick.tick() => {}
        }
        let Some(c) = contain.upgrade() else { return };
        // The lock may be held by a sweep for a while: not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || c.reap()).await;
    }
}

/// One command's containment. Finish it with [`Scope::finish`] when the command is
/// over; dropping it unfinished (a cancelled task) cleans up in the background.
pub struct Scope {
    contain: Arc<Containment>,
    id: String,
    cgroup: Option<Cgroup>,
    procs: Option<ProcsFile>,
    leader: Option<i32>,
    finished: bool,
}

impl Scope {
    /// The marker every process of this command carries (`BUILDLET_EXEC_ID`'s value).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn cgroup_path(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(|c| c.path())
    }

    /// Starts `cmd` inside this scope: with the marker in its environment and, when
    /// there is a cgroup, joining it before exec. The child is registered as a leader
    /// (tokio waits for it, the reaper must not) in the same critical section as the
    /// fork, so the reaper never sees it unregistered.
    pub fn spawn(
        &mut self,
        cmd: &mut tokio::process::Command,
    ) -> io::Result<tokio::process::Child> {
        cmd.env(EXEC_ID_ENV, &self.id);
        if let Some(procs) = self.procs.clone() {
            // SAFETY: join_current only opens, writes and closes a file: no allocation
            // or locking between fork and exec.
            unsafe {
                cmd.pre_exec(move || procs.join_current());
            }
        }
        let mut st = self.contain.lock();
        let child = cmd.spawn()?;
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            st.leaders.insert(pid);
            self.leader = Some(pid);
        }
        Ok(child)
    }

    /// Kills everything left of the command and removes its cgroup. Call after the
    /// leader was waited for.
    pub async fn finish(mut self) {
        self.finished = true;
        let contain = self.contain.clone();
        let id = std::mem::take(&mut self.id);
        let cgroup = self.cgroup.take();
        let leader = self.leader.take();
        let done =
            tokio::task::spawn_blocking(move || cleanup(&contain, &id, cgroup, leader)).await;
        if let Err(error) = done {
            tracing::warn!(%error, "exec cleanup task failed");
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let contain = self.contain.clone();
        let id = std::mem::take(&mut self.id);
        let cgroup = self.cgroup.take();
        let leader = self.leader.take();
        let work = move || cleanup(&contain, &id, cgroup, leader);
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(work)),
            Err(_) => work(),
        }
    }
}

/// Kills a finished command's leftovers: its cgroup's subtree, then descendants of the
/// buildlet carrying its marker; and, when it was the last command running, every
/// descendant of the buildlet (those that erased their marker).
fn cleanup(contain: &Containment, id: &str, cgroup: Option<Cgroup>, leader: Option<i32>) {
    if let Some(cg) = &cgroup
        && let Err(error) = cg.remove(KILL_TIMEOUT)
    {
        tracing::warn!(%error, "removing an exec cgroup");
    }
    if !id.is_empty() {
        let killed = sweep(contain.pid, Domain::Descendants, &Match::Exact(id));
        if killed > 0 {
            tracing::info!(
                exec_id = id,
                killed,
                "killed processes the command left behind"
            );
        }
    }
    let mut st = contain.lock();
    if let Some(pid) = leader {
        st.leaders.remove(&pid);
    }
    st.live = st.live.saturating_sub(1);
    // Held locked: no command can start while "everything" is being killed.
    if st.live == 0 && !st.shut_down {
        let killed = sweep(contain.pid, Domain::Descendants, &Match::Any);
        if killed > 0 {
            tracing::info!(
                killed,
                "killed unmarked processes left when no command was running"
            );
        }
    }
    drop(st);
    contain.reap();
}

/// Where a sweep looks.
enum Domain {
    /// Descendants of the buildlet (with the subreaper, every process it started).
    Descendants,
    /// Every process on the machine we can see.
    Everyone,
}

/// Which processes a sweep kills (with their descendants).
enum Match<'a> {
    Any,
    Exact(&'a str),
    /// Marker values starting with this.
    Prefix(&'a str),
}

#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: i32,
    ppid: i32,
    zombie: bool,
}

/// Every process in /proc (pid, ppid, whether a zombie).
fn snapshot() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (ppid, state) = parse_stat(&stat)?;
            Some(Proc {
                pid,
                ppid,
                zombie: state == 'Z',
            })
        })
        .collect()
}

/// Parses `(ppid, state)` from `/proc/PID/stat`; the command name may hold spaces and
/// parentheses, so fields are counted after the last ')'.
fn parse_stat(stat: &str) -> Option<(i32, char)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// The direct children of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    // /proc/PID/task/TID/children is cheap but needs CONFIG_PROC_CHILDREN.
    let mut out = Vec::new();
    let mut found_file = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.filter_map(|t| t.ok()) {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                found_file = true;
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    if !found_file {
        out = snapshot()
            .into_iter()
            .filter(|p| p.ppid == pid)
            .map(|p| p.pid)
            .collect();
    }
    out
}

/// `roots` and all their descendants in `procs`.
fn with_descendants(procs: &[Proc], roots: impl IntoIterator<Item = i32>) -> HashSet<i32> {
    let mut kids: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in procs {
        kids.entry(p.ppid).or_default().push(p.pid);
    }
    let mut out = HashSet::new();
    let mut stack: Vec<i32> = roots.into_iter().collect();
    while let Some(p) = stack.pop() {
        if out.insert(p)
            && let Some(k) = kids.get(&p)
        {
            stack.extend(k);
        }
    }
    out
}

/// Whether `/proc/PID/environ` has `BUILDLET_EXEC_ID=<value>` matching `m`.
fn environ_matches(pid: i32, m: &Match<'_>) -> bool {
    let (value, exact) = match m {
        Match::Any => return true,
        Match::Exact(v) => (*v, true),
        Match::Prefix(v) => (*v, false),
    };
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut needle = Vec::with_capacity(EXEC_ID_ENV.len() + 1 + value.len());
    needle.extend_from_slice(EXEC_ID_ENV.as_bytes());
    needle.push(b'=');
    needle.extend_from_slice(value.as_bytes());
    env.split(|b| *b == 0).any(|entry| {
        if exact {
            entry == needle.as_slice()
        } else {
            entry.starts_with(&needle)
        }
    })
}

/// Kills (SIGSTOP first so they cannot fork, then SIGKILL) the processes in `domain`
/// matching `m`, with all their descendants, in rounds until none is found. Never
/// touches the buildlet itself. Returns how many processes were killed.
fn sweep(me: i32, domain: Domain, m: &Match<'_>) -> usize {
    let mut killed = HashSet::new();
    for _ in 0..SWEEP_ROUNDS {
        let procs = snapshot();
        let candidates: Vec<i32> = match domain {
            Domain::Descendants => {
                let mut d = with_descendants(&procs, [me]);
                d.remove(&me);
                d.into_iter().collect()
            }
            Domain::Everyone => procs.iter().map(|p| p.pid).filter(|p| *p != me).collect(),
        };
        let zombie: HashSet<i32> = procs.iter().filter(|p| p.zombie).map(|p| p.pid).collect();
        let roots: Vec<i32> = candidates
            .into_iter()
            .filter(|p| !zombie.contains(p) && environ_matches(*p, m))
            .collect();
        if roots.is_empty() {
            break;
        }
        // Stop the trees until no new process appears, so none forks past the kill.
        let mut targets = with_descendants(&procs, roots.iter().copied());
        targets.remove(&me);
        for _ in 0..10 {
            for p in &targets {
                let _ = kill(Pid::from_raw(*p), Signal::SIGSTOP);
            }
            let mut again = with_descendants(&snapshot(), targets.iter().copied());
            again.remove(&me);
            if again.len() == targets.len() {
                break;
            }
            targets = again;
        }
        for p in &targets {
            if !zombie.contains(p) {
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
                killed.insert(*p);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_choice_parses() {
        assert_eq!("auto".parse::<CgroupChoice>(), Ok(CgroupChoice::Auto));
        assert_eq!("none".parse::<CgroupChoice>(), Ok(CgroupChoice::None));
        assert_eq!(
            "/sys/fs/cgroup/pids".parse::<CgroupChoice>(),
            Ok(CgroupChoice::Dir(PathBuf::from("/sys/fs/cgroup/pids")))
        );
        let err = "relative/dir".parse::<CgroupChoice>().unwrap_err();
        assert!(err.contains("relative/dir"), "{err}");
        assert!("".parse::<CgroupChoice>().is_err());
    }

    #[test]
    fn container_name_is_stable_and_distinct() {
        let a = container_name(Path::new("/srv/work/a"));
        assert_eq!(a, container_name(Path::new("/srv/work/a")));
        assert_ne!(a, container_name(Path::new("/srv/work/b")));
        assert!(
            a.starts_with("buildlet-") && a.len() == "buildlet-".len() + 16,
            "{a}"
        );
    }

    #[test]
    fn stat_parsing_survives_odd_names() {
        assert_eq!(parse_stat("42 (a) b) c) S 7 42 42 0 -1"), Some((7, 'S')));
        assert_eq!(parse_stat("9 (sleep) Z 1 9"), Some((1, 'Z')));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants_follow_ppid_links() {
        let procs = [(1, 0), (10, 1), (11, 10), (12, 11), (20, 1)].map(|(pid, ppid)| Proc {
            pid,
            ppid,
            zombie: false,
        });
        let d = with_descendants(&procs, [10]);
        assert_eq!(d, HashSet::from([10, 11, 12]));
    }
}
