//! Control groups, v1 and v2, as far as containing process trees needs them: open a
//! cgroup directory, make children, join one from a `pre_exec` closure, list and kill
//! every process in a subtree, remove it, and hand it to another user (delegation).
//!
//! Works on one hierarchy at a time: a v1 hierarchy (e.g. `/sys/fs/cgroup/pids` or
//! `/sys/fs/cgroup/freezer`) or the v2 unified hierarchy (`/sys/fs/cgroup` on pure-v2
//! machines, `/sys/fs/cgroup/unified` on hybrid ones). No controller is enabled or
//! configured: membership alone is what contains a tree, since a process cannot leave
//! its cgroup without write access to another cgroup's `cgroup.procs`.
//!
//! Killing is race-free where the kernel helps (v2 `cgroup.kill`), and otherwise a
//! bounded loop: freeze (v2 `cgroup.freeze`, v1 `freezer.state`) when the hierarchy can,
//! SIGKILL every pid of the subtree, thaw, and repeat until it is empty. In a v1 pids
//! hierarchy (no freezer) `pids.max` is set to 0 meanwhile, so no fork outruns the
//! loop. A subtree that still holds processes at the deadline is reported.
//!
//! Everything here is blocking file I/O on a pseudo filesystem (fast, but it sleeps
//! while waiting for processes to die): call it from `spawn_blocking` in async code.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Which cgroup interface a directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a cgroup directory (no cgroup.procs)")]
    NotACgroup(PathBuf),
    #[error("bad cgroup name {0:?}: must be one non-empty path component")]
    BadName(String),
    #[error("{count} process(es) still in {path} after {waited:?}")]
    StillPopulated {
        path: PathBuf,
        count: usize,
        waited: Duration,
    },
    #[error("cgroup path {0} contains a NUL byte")]
    Nul(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One cgroup: a directory of a mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
    version: Version,
}

/// The `cgroup.procs` path of a cgroup, ready to be written from a `pre_exec` closure
/// (between fork and exec, where allocating is not allowed).
#[derive(Debug, Clone)]
pub struct ProcsFile {
    path: CString,
}

impl ProcsFile {
    /// Moves the calling process into the cgroup by writing "0" to its `cgroup.procs`
    /// (in v1 and v2 "0" means the writer). Only open, write and close: safe to call
    /// between fork and exec.
    pub fn join_current(&self) -> io::Result<()> {
        // SAFETY: `path` is a valid NUL-terminated string for the duration of the call;
        // the buffer passed to write is a static one-byte slice.
        unsafe {
            let fd = libc::open(self.path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let result = if written == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            };
            libc::close(fd);
            result
        }
    }
}

impl Cgroup {
    /// Opens an existing cgroup directory and detects its version (v2 directories have
    /// `cgroup.controllers`, v1 directories do not).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, CgroupError> {
        let path = path.into();
        if !path.join("cgroup.procs").is_file() {
            return Err(CgroupError::NotACgroup(path));
        }
        let version = if path.join("cgroup.controllers").is_file() {
            Version::V2
        } else {
            Version::V1
        };
        Ok(Cgroup { path, version })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The child cgroup `name`, created if missing.
    pub fn create_child(&self, name: &str) -> Result<Cgroup, CgroupError> {
        check_name(name)?;
        let path = self.path.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating cgroup", &path)(e)),
        }
        Ok(Cgroup {
            path,
            version: self.version,
        })
    }

    /// The existing child cgroup `name`, if there is one.
    pub fn child(&self, name: &str) -> Result<Option<Cgroup>, CgroupError> {
        check_name(name)?;
        let path = self.path.join(name);
        if path.is_dir() {
            Cgroup::open(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Child cgroups (one level).
    pub fn children(&self) -> Result<Vec<Cgroup>, CgroupError> {
        let entries = std::fs::read_dir(&self.path).map_err(io_err("listing", &self.path))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &self.path))?;
            let is_dir = entry
                .file_type()
                .map_err(io_err("listing", &self.path))?
                .is_dir();
            if is_dir {
                out.push(Cgroup {
                    path: entry.path(),
                    version: self.version,
                });
            }
        }
        Ok(out)
    }

    pub fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// The `cgroup.procs` file prepared for [`ProcsFile::join_current`].
    pub fn procs_file(&self) -> Result<ProcsFile, CgroupError> {
        let p = self.procs_path();
        let path =
            CString::new(p.as_os_str().as_bytes()).map_err(|_| CgroupError::Nul(p.clone()))?;
        Ok(ProcsFile { path })
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        let p = self.procs_path();
        std::fs::write(&p, pid.to_string()).map_err(io_err("writing", &p))
    }

    /// Processes directly in this cgroup (not in its children).
    pub fn pids(&self) -> Result<Vec<Pid>, CgroupError> {
        let p = self.procs_path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            // Removed meanwhile: nothing left in it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("reading", &p)(e)),
        };
        Ok(parse_pids(&text))
    }

    /// Processes in this cgroup and every descendant cgroup.
    pub fn pids_recursive(&self) -> Result<Vec<Pid>, CgroupError> {
        let mut out = self.pids()?;
        for child in self.children_if_present()? {
            out.extend(child.pids_recursive()?);
        }
        Ok(out)
    }

    fn children_if_present(&self) -> Result<Vec<Cgroup>, CgroupError> {
        match self.children() {
            Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(Vec::new())
            }
            other => other,
        }
    }

    /// Whether no process is left in the subtree.
    pub fn is_empty(&self) -> Result<bool, CgroupError> {
        Ok(self.pids_recursive()?.is_empty())
    }

    /// SIGKILLs every process in this cgroup and its descendants and waits (up to
    /// `timeout`) until none is left. A process is gone from `cgroup.procs` once it has
    /// exited; whether it is reaped is its parent's business.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let kill_file = self.path.join("cgroup.kill");
        if self.version == Version::V2 && kill_file.is_file() {
            // The kernel kills the whole subtree, new forks included.
            std::fs::write(&kill_file, "1").map_err(io_err("writing", &kill_file))?;
            return self.wait_empty(start, timeout);
        }
        // Where the pids controller is on (v1 pids hierarchy), no fork succeeds while
        // the limit is 0: the rounds below then cannot be outrun.
        let pids_max = self.path.join("pids.max");
        let old_limit = std::fs::read_to_string(&pids_max)
            .ok()
            .filter(|_| std::fs::write(&pids_max, "0").is_ok());
        let result = self.kill_rounds(start, timeout);
        if let Some(old) = old_limit
            && let Err(e) = std::fs::write(&pids_max, old.trim())
            // Gone (removed meanwhile) is fine; otherwise the cgroup is unusable.
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(io_err("restoring", &pids_max)(e));
        }
        result
    }

    fn kill_rounds(&self, start: Instant, timeout: Duration) -> Result<(), CgroupError> {
        let mut pause = Duration::from_millis(1);
        loop {
            let frozen = self.freeze(true);
            let pids = self.pids_recursive();
            if let Ok(pids) = &pids {
                for pid in pids {
                    // ESRCH: already gone.
                    let _ = kill(*pid, Signal::SIGKILL);
                }
            }
            // v1-frozen tasks only act on SIGKILL once thawed.
            if frozen {
                self.freeze(false);
            }
            if pids?.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return self.still_populated(start);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    fn wait_empty(&self, start: Instant, timeout: Duration) -> Result<(), CgroupError> {
        let mut pause = Duration::from_millis(1);
        while !self.is_empty()? {
            if start.elapsed() >= timeout {
                return self.still_populated(start);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }

    fn still_populated(&self, start: Instant) -> Result<(), CgroupError> {
        Err(CgroupError::StillPopulated {
            path: self.path.clone(),
            count: self.pids_recursive()?.len(),
            waited: start.elapsed(),
        })
    }

    /// Freezes (or thaws) the subtree if this hierarchy can. Returns whether it did.
    /// Freezing is best effort: killing works without it, only with more rounds.
    fn freeze(&self, frozen: bool) -> bool {
        let (file, value) = match self.version {
            Version::V2 => ("cgroup.freeze", if frozen { "1" } else { "0" }),
            Version::V1 => ("freezer.state", if frozen { "FROZEN" } else { "THAWED" }),
        };
        let p = self.path.join(file);
        if !p.is_file() || std::fs::write(&p, value).is_err() {
            return false;
        }
        if frozen && self.version == Version::V1 {
            // v1 freezes asynchronously (FREEZING, then FROZEN); wait briefly.
            for _ in 0..100 {
                match std::fs::read_to_string(&p) {
                    Ok(s) if s.trim() == "FROZEN" => break,
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                    Err(_) => break,
                }
            }
        }
        true
    }

    /// Kills everything in the subtree, then removes its cgroups bottom-up (this one
    /// included). A cgroup already gone counts as removed.
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        if !self.path.exists() {
            return Ok(());
        }
        self.kill_all(timeout)?;
        self.remove_tree(start, timeout)
    }

    /// Kills everything in the subtree and removes every child cgroup, keeping this one.
    pub fn clear(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        self.kill_all(timeout)?;
        for child in self.children_if_present()? {
            child.remove_tree(start, timeout)?;
        }
        Ok(())
    }

    fn remove_tree(&self, start: Instant, timeout: Duration) -> Result<(), CgroupError> {
        for child in self.children_if_present()? {
            child.remove_tree(start, timeout)?;
        }
        let mut pause = Duration::from_millis(1);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                // EBUSY: a process that was just killed may not have left yet.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < timeout => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) => return Err(io_err("removing cgroup", &self.path)(e)),
            }
        }
    }

    /// Hands the cgroup to `uid`/`gid` so that user can create children and move its
    /// processes between them (delegation): the directory and the files a delegatee
    /// writes (`cgroup.procs`, `cgroup.threads`, `cgroup.subtree_control` in v2; `tasks`
    /// and `cgroup.procs` in v1).
    pub fn chown(&self, uid: u32, gid: u32) -> Result<(), CgroupError> {
        let files: &[&str] = match self.version {
            Version::V2 => &["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"],
            Version::V1 => &["cgroup.procs", "tasks"],
        };
        std::os::unix::fs::chown(&self.path, Some(uid), Some(gid))
            .map_err(io_err("chown", &self.path))?;
        for f in files {
            let p = self.path.join(f);
            if p.exists() {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(io_err("chown", &p))?;
            }
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), CgroupError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(CgroupError::BadName(name.to_owned()));
    }
    Ok(())
}

fn parse_pids(text: &str) -> Vec<Pid> {
    text.lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
        .map(Pid::from_raw)
        .collect()
}

/// One line of `/proc/<pid>/cgroup`: the hierarchy (v2 when `controllers` is empty)
/// and the path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub controllers: Vec<String>,
    pub path: String,
}

/// Parses `/proc/<pid>/cgroup` (`ID:CONTROLLERS:PATH` per line).
pub fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(Membership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// A mounted cgroup hierarchy, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub version: Version,
    /// Controllers bound to a v1 hierarchy (from the super options); empty for v2.
    pub controllers: Vec<String>,
    /// The path inside the hierarchy that is mounted (`/` unless in a cgroup namespace
    /// or a bind mount).
    pub root: String,
    pub mount_point: PathBuf,
}

/// Parses the cgroup mounts out of `/proc/<pid>/mountinfo`.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let root = unescape_mount(fields.get(3)?);
            let mount_point = PathBuf::from(unescape_mount(fields.get(4)?));
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let super_opts = right.next().unwrap_or("");
            let (version, controllers) = match fstype {
                "cgroup2" => (Version::V2, Vec::new()),
                "cgroup" => (
                    Version::V1,
                    super_opts
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                        .map(str::to_owned)
                        .collect(),
                ),
                _ => return None,
            };
            Some(Mount {
                version,
                controllers,
                root,
                mount_point,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|oct| u8::from_str_radix(oct, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which hierarchy to look for a process's cgroup in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    V2,
    /// The v1 hierarchy that has this controller (e.g. "pids", "freezer").
    V1(&'static str),
}

/// The directory of a process's cgroup in `hierarchy`, given its `/proc/<pid>/cgroup`
/// and the mounts. Pure, so it is unit tested on text.
pub fn locate(
    hierarchy: Hierarchy,
    memberships: &[Membership],
    mounts: &[Mount],
) -> Option<PathBuf> {
    let (membership, mount) = match hierarchy {
        Hierarchy::V2 => (
            memberships.iter().find(|m| m.controllers.is_empty())?,
            mounts.iter().find(|m| m.version == Version::V2)?,
        ),
        Hierarchy::V1(ctl) => (
            memberships
                .iter()
                .find(|m| m.controllers.iter().any(|c| c == ctl))?,
            mounts
                .iter()
                .find(|m| m.version == Version::V1 && m.controllers.iter().any(|c| c == ctl))?,
        ),
    };
    // The process's path is relative to the hierarchy's root; the mount shows `root`.
    let rel = if mount.root == "/" {
        membership.path.as_str()
    } else {
        membership.path.strip_prefix(mount.root.as_str())?
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rel)
    })
}

/// The calling process's own cgroup in `hierarchy`, if that hierarchy is mounted.
pub fn own_cgroup(hierarchy: Hierarchy) -> Result<Option<Cgroup>, CgroupError> {
    let cg_path = Path::new("/proc/self/cgroup");
    let mi_path = Path::new("/proc/self/mountinfo");
    let cg = std::fs::read_to_string(cg_path).map_err(io_err("reading", cg_path))?;
    let mi = std::fs::read_to_string(mi_path).map_err(io_err("reading", mi_path))?;
    match locate(hierarchy, &parse_proc_cgroup(&cg), &parse_mountinfo(&mi)) {
        Some(dir) => match Cgroup::open(dir) {
            Ok(c) => Ok(Some(c)),
            Err(CgroupError::NotACgroup(_)) => Ok(None),
            Err(e) => Err(e),
        },
        None => Ok(None),
    }
}

/// The hierarchies `--cgroup auto` tries, best first: v2 kills a whole tree in one
/// write; v1 `pids` can stop forks while it kills; v1 `freezer` can stop the tree.
pub const AUTO_ORDER: [Hierarchy; 3] = [
    Hierarchy::V2,
    Hierarchy::V1("pids"),
    Hierarchy::V1("freezer"),
];

/// The first of the process's own cgroups, in [`AUTO_ORDER`], under
/// which it can create (and remove) a child: the cgroup `--cgroup auto` uses. `None`
/// with the reasons when none is usable.
pub fn usable_own_cgroup() -> Result<Cgroup, Vec<String>> {
    let mut reasons = Vec::new();
    for h in AUTO_ORDER {
        match own_cgroup(h) {
            Ok(Some(cg)) => match probe(&cg) {
                Ok(()) => return Ok(cg),
                Err(e) => reasons.push(format!("{h:?}: {e}")),
            },
            Ok(None) => reasons.push(format!("{h:?}: not mounted")),
            Err(e) => reasons.push(format!("{h:?}: {e}")),
        }
    }
    Err(reasons)
}

/// Checks that a child can be made and removed under `cg`.
pub fn probe(cg: &Cgroup) -> Result<(), CgroupError> {
    let name = format!("buildlet-probe-{}", std::process::id());
    let child = cg.create_child(&name)?;
    child.remove(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    #[test]
    fn parses_proc_cgroup_hybrid() {
        let text =
            "9:name=systemd:/\n8:pids:/a/b\n6:freezer:/\n4:memory:/x\n1:cpu,cpuacct:/\n0::/u\n";
        let m = parse_proc_cgroup(text);
        assert_eq!(m.len(), 6);
        assert_eq!(m[1].controllers, vec!["pids"]);
        assert_eq!(m[1].path, "/a/b");
        assert_eq!(m[4].controllers, vec!["cpu", "cpuacct"]);
        assert!(m[5].controllers.is_empty());
        assert_eq!(m[5].path, "/u");
    }

    #[test]
    fn parses_mountinfo_and_locates() {
        let text = "\
35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
36 24 0:31 / /sys/fs/cgroup/pids rw,nosuid shared:5 - cgroup cgroup rw,pids
37 24 0:32 /outer /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
38 24 0:33 / /mnt/with\\040space rw - cgroup cgroup rw,cpu,cpuacct
22 1 8:1 / / rw - ext4 /dev/sda1 rw
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[0].version, Version::V2);
        assert_eq!(mounts[1].controllers, vec!["pids"]);
        assert_eq!(mounts[3].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[3].controllers, vec!["cpu", "cpuacct"]);
        let memberships = parse_proc_cgroup("8:pids:/a/b\n6:freezer:/outer/job\n0::/\n");
        assert_eq!(
            locate(Hierarchy::V2, &memberships, &mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            locate(Hierarchy::V1("pids"), &memberships, &mounts),
            Some(PathBuf::from("/sys/fs/cgroup/pids/a/b"))
        );
        assert_eq!(
            locate(Hierarchy::V1("freezer"), &memberships, &mounts),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/job"))
        );
        assert_eq!(locate(Hierarchy::V1("memory"), &memberships, &mounts), None);
    }

    #[test]
    fn bad_names_are_refused() {
        let cg = Cgroup {
            path: PathBuf::from("/nonexistent"),
            version: Version::V2,
        };
        for bad in ["", ".", "..", "a/b"] {
            let err = cg.create_child(bad).unwrap_err();
            assert!(matches!(err, CgroupError::BadName(_)), "{bad:?}: {err}");
        }
        let err = Cgroup::open("/nonexistent/cg").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cg"), "{err}");
    }

    /// The hierarchies to test on: each writable one of v2, v1 pids, v1 freezer. When
    /// none is, the test prints why and passes, except under CI=true as root with a
    /// writable cgroup mount, where that is a failure.
    fn test_roots() -> Vec<Cgroup> {
        let mut roots = Vec::new();
        for h in AUTO_ORDER {
            match own_cgroup(h) {
                Ok(Some(cg)) => match probe(&cg) {
                    Ok(()) => roots.push(cg),
                    Err(e) => eprintln!("note: {h:?} cgroup not writable here: {e}"),
                },
                Ok(None) => eprintln!("note: {h:?} cgroup hierarchy not mounted"),
                Err(e) => eprintln!("note: {h:?}: {e}"),
            }
        }
        if roots.is_empty() {
            let ci = std::env::var("CI").as_deref() == Ok("true");
            let root = (unsafe { libc::geteuid() } == 0);
            let mounted = Path::new("/sys/fs/cgroup/cgroup.procs").exists()
                || Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
                || Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists();
            assert!(
                !(ci && root && mounted),
                "CI=true, root and cgroups mounted, yet no cgroup is writable"
            );
            eprintln!("note: skipping cgroup tests, no writable cgroup");
        }
        roots
    }

    fn unique(tag: &str) -> String {
        format!("buildlet-test-{tag}-{}", std::process::id())
    }

    /// Starts `sh -c script` in `cg` via a pre_exec join.
    fn spawn_in(cg: &Cgroup, script: &str) -> Child {
        use std::os::unix::process::CommandExt;
        let procs = cg.procs_file().unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        // SAFETY: join_current only opens, writes and closes.
        unsafe {
            cmd.pre_exec(move || procs.join_current());
        }
        cmd.spawn().unwrap()
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn join_list_kill_remove_on_every_hierarchy() {
        for root in test_roots() {
            let parent = root.create_child(&unique("tree")).unwrap();
            let child = parent.create_child("exec-1").unwrap();
            assert_eq!(child.version(), root.version());
            // A leader plus an escaped (setsid, reparented) grandchild.
            let mut leader = spawn_in(&child, "setsid sh -c 'sleep 300' & sleep 300");
            wait_until("two processes in the cgroup", || {
                parent.pids_recursive().unwrap().len() >= 3
            });
            assert!(
                parent.pids().unwrap().is_empty(),
                "{}",
                parent.path().display()
            );
            assert!(
                child
                    .pids()
                    .unwrap()
                    .iter()
                    .any(|p| p.as_raw() as u32 == leader.id()),
                "leader not in {}",
                child.path().display()
            );
            parent.kill_all(Duration::from_secs(10)).unwrap();
            assert!(parent.is_empty().unwrap());
            let status = leader.wait().unwrap();
            assert!(!status.success());
            parent.remove(Duration::from_secs(10)).unwrap();
            assert!(!parent.path().exists(), "{}", parent.path().display());
        }
    }

    #[test]
    fn kill_all_catches_a_fork_loop() {
        for root in test_roots() {
            let cg = root.create_child(&unique("forks")).unwrap();
            // Each process starts another before it dies: only killing the subtree at
            // once (or in rounds, frozen) stops it.
            let mut leader = spawn_in(&cg, "while :; do sh -c 'sleep 0.01' & sleep 0.005; done");
            wait_until("forks running", || cg.pids().unwrap().len() >= 2);
            cg.kill_all(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{}: {e}", root.path().display()));
            let _ = leader.wait();
            cg.remove(Duration::from_secs(10)).unwrap();
            assert!(!cg.path().exists());
        }
    }

    /// The freeze-and-kill rounds, which v2 skips when it has `cgroup.kill`: run them
    /// directly so every hierarchy exercises them.
    #[test]
    fn kill_rounds_alone_catch_a_fork_loop() {
        for root in test_roots() {
            let cg = root.create_child(&unique("rounds")).unwrap();
            let mut leader = spawn_in(&cg, "while :; do sh -c 'sleep 0.01' & sleep 0.005; done");
            wait_until("forks running", || cg.pids().unwrap().len() >= 2);
            cg.kill_rounds(Instant::now(), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{}: {e}", root.path().display()));
            assert!(cg.is_empty().unwrap());
            let _ = leader.wait();
            cg.remove(Duration::from_secs(10)).unwrap();
        }
    }

    #[test]
    fn clear_keeps_the_cgroup_and_removes_children() {
        for root in test_roots() {
            let cg = root.create_child(&unique("clear")).unwrap();
            let a = cg.create_child("a").unwrap();
            a.create_child("deeper").unwrap();
            let mut p = spawn_in(&a, "sleep 300");
            cg.clear(Duration::from_secs(10)).unwrap();
            let _ = p.wait();
            assert!(cg.path().exists());
            assert!(cg.children().unwrap().is_empty());
            assert!(cg.child("a").unwrap().is_none());
            // Still usable: forks work again in a new child (pids.max was restored).
            if let Ok(limit) = std::fs::read_to_string(cg.path().join("pids.max")) {
                assert_eq!(limit.trim(), "max", "{}", cg.path().display());
            }
            let b = cg.create_child("b").unwrap();
            let st = spawn_in(&b, "sh -c 'exit 0' & wait $!").wait().unwrap();
            assert!(
                st.success(),
                "fork in {} after clear: {st:?}",
                b.path().display()
            );
            cg.remove(Duration::from_secs(10)).unwrap();
        }
    }

    #[test]
    fn chown_hands_over_the_files() {
        use std::os::unix::fs::MetadataExt;
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("note: chown test needs root");
            return;
        }
        for root in test_roots() {
            let cg = root.create_child(&unique("chown")).unwrap();
            cg.chown(65534, 65534).unwrap();
            assert_eq!(std::fs::metadata(cg.path()).unwrap().uid(), 65534);
            assert_eq!(std::fs::metadata(cg.procs_path()).unwrap().uid(), 65534);
            cg.remove(Duration::from_secs(10)).unwrap();
        }
    }
}
