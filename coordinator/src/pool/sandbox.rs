//! The sandbox local buildlets run in, and the workdir root they live under.
//!
//! With bubblewrap (`bwrap`) each buildlet gets its own mount, pid, IPC and UTS namespace:
//! the host filesystem read-only, a private `/tmp`, a fresh `/proc`, a minimal `/dev`,
//! tmpfs over the data dir and over the workdir root (so neither the coordinator's secrets
//! nor other buildlets' workdirs are visible), its own directory bound read-write and its
//! credentials read-only. The network is shared: the buildlet listens on loopback for the
//! coordinator. When the coordinator runs as root, each buildlet slot also has its own
//! uid/gid, set before bwrap runs, so bwrap makes an unprivileged user namespace.
//!
//! Containment: bwrap's `--die-with-parent` plus the coordinator's `PR_SET_PDEATHSIG` on
//! bwrap mean that when the coordinator dies the sandbox's pid 1 dies, and the kernel kills
//! every process of a pid namespace whose init exits; bwrap's init exits when the buildlet
//! does. So killing the buildlet, bwrap, or the coordinator ends the whole tree. A child
//! whose coordinator died before its `prctl` (it was reparented first) exits instead of
//! running bwrap. One window remains, inside bwrap 0.8: its sandbox init (the clone that
//! becomes pid 1) sets its own death signal only after the outer bwrap has released it
//! (an eventfd write) and the mounts are made. A coordinator killed in those milliseconds
//! takes the outer bwrap with it and leaves that init with ppid 1, either blocked on the
//! eventfd forever (no children) or running the buildlet; the next start with the same
//! data dir kills it (by uid and workdir root).
//!
//! Start-up: [`Sandbox::prepare`] kills processes left by a previous run (running as the
//! sandbox uids, or with their cwd in the workdir root), empties the root, and probes
//! bwrap once so a broken one is a start-up error rather than a failure of every build.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use buildfarm_config::SandboxMode;
use buildfarm_tls::Identity;
use tokio::process::Command;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Written into a workdir root we made; a non-empty directory without it is never emptied.
pub const ROOT_MARKER: &str = ".buildfarm-workdir-root";
/// Where the buildlet binary is linked (or copied) when buildlets run as other uids, which
/// may not be able to reach the original (e.g. under `/root`).
const BIN_DIR: &str = "bin";
/// Environment variables a buildlet inherits from the coordinator; everything else (tokens,
/// database passwords, cloud credentials) stays behind.
const KEPT_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ", "RUST_LOG", "RUST_BACKTRACE"];
/// Cap of each tmpfs in a sandbox (its `/tmp`, and what covers the data dir and the
/// workdir root): they live in memory, and a build must not fill the host's.
const TMPFS_BYTES: u64 = 1 << 30;
/// How long the start-up probe of bwrap may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`bwrap_args`] builds a command line from. Paths are absolute and canonical.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BwrapPlan {
    /// Directories covered by an empty tmpfs: invisible inside (data dir, workdir root).
    pub hidden_dirs: Vec<PathBuf>,
    /// Files covered by `/dev/null` (secrets kept outside the data dir).
    pub hidden_files: Vec<PathBuf>,
    /// Bound read-write at the same path, after the tmpfs mounts (the buildlet's own dir).
    pub writable: Vec<PathBuf>,
    /// Bound read-only at the same path, after the tmpfs mounts (credentials, binary).
    pub read_only: Vec<PathBuf>,
    /// Working directory inside the sandbox.
    pub chdir: PathBuf,
}

/// The bwrap options for `plan`, ending with `--`; the program and its arguments follow.
/// Pure, so the policy can be read and tested in one place.
pub fn bwrap_args(plan: &BwrapPlan) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&std::ffi::OsStr]| a.extend(items.iter().map(|s| s.to_os_string()));
    push(&["--ro-bind".as_ref(), "/".as_ref(), "/".as_ref()]);
    for flag in [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
    ] {
        push(&[flag.as_ref()]);
    }
    push(&["--proc".as_ref(), "/proc".as_ref()]);
    push(&["--dev".as_ref(), "/dev".as_ref()]);
    let size = TMPFS_BYTES.to_string();
    push(&[
        "--size".as_ref(),
        size.as_ref(),
        "--tmpfs".as_ref(),
        "/tmp".as_ref(),
    ]);
    for d in &plan.hidden_dirs {
        push(&[
            "--size".as_ref(),
            size.as_ref(),
            "--tmpfs".as_ref(),
            d.as_os_str(),
        ]);
    }
    for f in &plan.hidden_files {
        push(&["--ro-bind".as_ref(), "/dev/null".as_ref(), f.as_os_str()]);
    }
    for w in &plan.writable {
        push(&["--bind".as_ref(), w.as_os_str(), w.as_os_str()]);
    }
    for r in &plan.read_only {
        push(&["--ro-bind".as_ref(), r.as_os_str(), r.as_os_str()]);
    }
    push(&["--chdir".as_ref(), plan.chdir.as_os_str()]);
    push(&["--".as_ref()]);
    a
}

/// Settings for [`Sandbox::prepare`], resolved from the config.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub mode: SandboxMode,
    /// Canonical data dir.
    pub data_dir: PathBuf,
    /// The workdir root (created if missing).
    pub workdir_root: PathBuf,
    /// First uid/gid of the slots, used when the coordinator runs as root.
    pub uid_base: u32,
    /// How many buildlets may exist at once over every local pool.
    pub slots: usize,
    pub writable_paths: Vec<PathBuf>,
    /// Secret files that may live outside the data dir (master key, TLS key).
    pub secret_files: Vec<PathBuf>,
    pub buildlet_bin: PathBuf,
}

/// The directories of one buildlet.
#[derive(Debug, Clone)]
pub struct BuildletDirs {
    /// `<root>/<slug>`: owned by the buildlet's uid, bound read-write; holds the workdir
    /// and the buildlet's tarball staging dir.
    pub home: PathBuf,
    /// `<home>/work`, what `--workdir` names.
    pub workdir: PathBuf,
    /// `<root>/<slug>.creds`: its server certificate and key and the client CA, read-only.
    pub creds: PathBuf,
}

impl BuildletDirs {
    pub fn server_cert(&self) -> PathBuf {
        self.creds.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.creds.join("server.key")
    }
    pub fn client_ca(&self) -> PathBuf {
        self.creds.join("ca.crt")
    }
}

/// A buildlet slot: its uid (when switching) and its place in the count. Freed on drop.
pub struct Slot {
    index: usize,
    taken: Arc<Mutex<Vec<bool>>>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = taken.get_mut(self.index) {
            *t = false;
        }
    }
}

/// How local buildlets are started; shared by every local pool.
pub struct Sandbox {
    /// The bwrap program; none when buildlets run without a sandbox.
    bwrap: Option<PathBuf>,
    /// Why buildlets run without a sandbox (for the status page); none when sandboxed.
    unsandboxed_reason: Option<String>,
    /// First uid/gid when each slot runs as its own user (coordinator is root).
    uid_base: Option<u32>,
    root: PathBuf,
    data_dir: PathBuf,
    writable_paths: Vec<PathBuf>,
    secret_files: Vec<PathBuf>,
    buildlet_bin: PathBuf,
    permits: Arc<Semaphore>,
    taken: Arc<Mutex<Vec<bool>>>,
}

impl Sandbox {
    /// Resolves the mode, cleans up after a previous run, and probes bwrap.
    pub async fn prepare(opts: SandboxOptions) -> Result<Arc<Sandbox>> {
        let mut unsandboxed_reason = None;
        let bwrap = match opts.mode {
            SandboxMode::None => {
                unsandboxed_reason = Some("[sandbox] mode = \"none\"".to_owned());
                None
            }
            SandboxMode::Bwrap => Some(find_in_path("bwrap").with_context(|| {
                "sandbox mode \"bwrap\" needs bubblewrap, but no `bwrap` was found on PATH \
                 (install Debian's bubblewrap package, or set [sandbox] mode = \"none\" to run \
                 builds unsandboxed)"
            })?),
            SandboxMode::Auto => {
                let found = find_in_path("bwrap");
                if found.is_none() {
                    warn_unsandboxed("no `bwrap` found on PATH");
                    unsandboxed_reason = Some("no `bwrap` found on PATH".to_owned());
                }
                found
            }
        };
        let is_root = nix::unistd::geteuid().is_root();
        let uid_base = (bwrap.is_some() && is_root).then_some(opts.uid_base);
        if bwrap.is_none() && is_root {
            warn!(
                "local buildlets run as root without a sandbox: builds can do anything the coordinator can"
            );
        }

        let root = prepare_root(&opts.workdir_root, &opts.data_dir, uid_base.is_some())?;
        let uids = uid_base.map(|b| b..b.saturating_add(opts.slots as u32));
        kill_leftovers(&root, uids.clone()).await;
        remove_leftovers(&root)?;

        // Inside the sandbox /tmp and the data dir are empty, and other uids may not reach
        // the original (e.g. a target dir under /root): then run a link (or copy) of it.
        let bin = &opts.buildlet_bin;
        let visible = !bin.starts_with("/tmp") && !bin.starts_with(&opts.data_dir);
        let reachable = uid_base.is_none()
            || (others_can_reach(bin)
                && std::fs::metadata(bin).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
        let buildlet_bin = if bwrap.is_some() && !(visible && reachable) {
            let dir = root.join(BIN_DIR);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            let dest = dir.join("buildlet");
            let _ = std::fs::remove_file(&dest);
            if std::fs::hard_link(&opts.buildlet_bin, &dest).is_err() {
                std::fs::copy(&opts.buildlet_bin, &dest).with_context(|| {
                    format!(
                        "copying {} to {} (build it with `cargo build`)",
                        opts.buildlet_bin.display(),
                        dest.display()
                    )
                })?;
            }
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
            dest
        } else {
            opts.buildlet_bin.clone()
        };

        let slots = opts.slots.max(1);
        let mut sandbox = Sandbox {
            bwrap,
            unsandboxed_reason,
            uid_base,
            root,
            data_dir: opts.data_dir.clone(),
            writable_paths: opts.writable_paths.clone(),
            secret_files: opts.secret_files.clone(),
            buildlet_bin,
            permits: Arc::new(Semaphore::new(slots)),
            taken: Arc::new(Mutex::new(vec![false; slots])),
        };
        if sandbox.bwrap.is_some()
            && let Err(e) = sandbox.probe().await
        {
            let e = match &uids {
                Some(r) => e.context(format!(
                    "the sandbox uids {r:?} must be able to pass through (o+x) every directory \
                     above the workdir root {}",
                    sandbox.root.display()
                )),
                None => e,
            };
            if opts.mode == SandboxMode::Bwrap {
                return Err(e.context(
                    "sandbox mode \"bwrap\": bubblewrap does not work here (user namespaces may be \
                     disabled; set [sandbox] mode = \"none\" to run builds unsandboxed)",
                ));
            }
            let reason = format!("bwrap does not work here: {e:#}");
            warn_unsandboxed(&reason);
            sandbox.unsandboxed_reason = Some(reason);
            sandbox.bwrap = None;
            sandbox.uid_base = None;
            sandbox.buildlet_bin = opts.buildlet_bin.clone();
        }
        match &sandbox.bwrap {
            Some(b) => info!(
                bwrap = %b.display(),
                workdir_root = %sandbox.root.display(),
                uids = ?uids,
                "local buildlets run sandboxed"
            ),
            None => {
                info!(workdir_root = %sandbox.root.display(), "local buildlets run unsandboxed")
            }
        }
        Ok(Arc::new(sandbox))
    }

    /// Tidies the workdir root after an orderly stop: the linked binary, the marker, and
    /// the root itself when nothing else is left in it.
    pub fn remove_root_if_idle(&self) {
        let _ = force_remove(&self.root.join(BIN_DIR));
        let only_marker = std::fs::read_dir(&self.root)
            .map(|rd| rd.flatten().all(|e| e.file_name() == ROOT_MARKER))
            .unwrap_or(false);
        if only_marker {
            let _ = std::fs::remove_file(self.root.join(ROOT_MARKER));
            let _ = std::fs::remove_dir(&self.root);
        }
    }

    /// Whether buildlets run under bubblewrap.
    pub fn is_sandboxed(&self) -> bool {
        self.bwrap.is_some()
    }

    /// Why buildlets run without a sandbox (mode "none", or "auto" without a working
    /// bwrap); `None` when they run under bubblewrap.
    pub fn unsandboxed_reason(&self) -> Option<&str> {
        match &self.bwrap {
            Some(_) => None,
            None => Some(
                self.unsandboxed_reason
                    .as_deref()
                    .unwrap_or("no sandbox configured"),
            ),
        }
    }

    /// The workdir root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Waits for a free slot (a released buildlet frees its slot once its processes are
    /// gone and its directories removed).
    pub async fn acquire_slot(&self, cancel: &CancellationToken) -> Option<Slot> {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return None,
            p = self.permits.clone().acquire_owned() => p.ok()?,
        };
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let index = taken.iter().position(|t| !t)?;
        taken[index] = true;
        Some(Slot {
            index,
            taken: self.taken.clone(),
            _permit: permit,
        })
    }

    fn ids(&self, slot: usize) -> Option<(nix::unistd::Uid, nix::unistd::Gid)> {
        self.uid_base.map(|b| {
            let id = b + slot as u32;
            (
                nix::unistd::Uid::from_raw(id),
                nix::unistd::Gid::from_raw(id),
            )
        })
    }

    /// Makes the buildlet's home (owned by its uid) and credentials dir (its TLS
    /// identity and `ca_pem`, readable only by its uid).
    pub fn make_dirs(
        &self,
        slot: &Slot,
        slug: &str,
        identity: &Identity,
        ca_pem: &str,
    ) -> std::io::Result<BuildletDirs> {
        let home = self.root.join(slug);
        let dirs = BuildletDirs {
            workdir: home.join("work"),
            creds: self.root.join(format!("{slug}.creds")),
            home,
        };
        let ids = self.ids(slot.index);
        std::fs::create_dir(&dirs.home)?;
        std::fs::set_permissions(&dirs.home, std::fs::Permissions::from_mode(0o700))?;
        std::fs::create_dir(&dirs.creds)?;
        for (path, contents) in [
            (dirs.server_cert(), identity.cert_pem.as_str()),
            (dirs.server_key(), identity.key_pem.as_str()),
            (dirs.client_ca(), ca_pem),
        ] {
            buildfarm_tls::write_private(&path, contents.as_bytes())?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
            if let Some((u, g)) = ids {
                nix::unistd::chown(&path, Some(u), Some(g))?;
            }
        }
        std::fs::set_permissions(&dirs.creds, std::fs::Permissions::from_mode(0o500))?;
        if let Some((u, g)) = ids {
            nix::unistd::chown(&dirs.home, Some(u), Some(g))?;
            nix::unistd::chown(&dirs.creds, Some(u), Some(g))?;
        }
        Ok(dirs)
    }

    fn plan(&self, dirs: &BuildletDirs) -> BwrapPlan {
        let mut read_only = vec![dirs.creds.clone()];
        if self.buildlet_bin.starts_with(&self.root) {
            read_only.push(self.root.join(BIN_DIR));
        }
        let mut writable = vec![dirs.home.clone()];
        writable.extend(self.writable_paths.iter().cloned());
        // The data dir and /tmp are hidden whole. Another uid cannot reach a file in a
        // private directory (nor could bwrap, as that uid, mount over it): nothing to hide.
        let hidden_files = self
            .secret_files
            .iter()
            .filter(|f| !f.starts_with(&self.data_dir) && !f.starts_with("/tmp"))
            .filter(|f| f.exists() && (self.uid_base.is_none() || others_can_reach(f)))
            .cloned()
            .collect();
        BwrapPlan {
            hidden_dirs: vec![self.data_dir.clone(), self.root.clone()],
            hidden_files,
            writable,
            read_only,
            chdir: dirs.home.clone(),
        }
    }

    /// The command that starts `program args` for the buildlet in `slot` with `dirs`:
    /// inside bwrap (as the slot's uid when switching), else directly. Either way it gets
    /// SIGKILL when the coordinator dies and is killed when the handle is dropped.
    pub fn command(
        &self,
        slot: &Slot,
        dirs: &BuildletDirs,
        args: &[OsString],
    ) -> tokio::process::Command {
        let mut cmd = match &self.bwrap {
            Some(bwrap) => {
                let mut c = Command::new(bwrap);
                c.args(bwrap_args(&self.plan(dirs)));
                c.arg(&self.buildlet_bin);
                c
            }
            None => {
                let mut c = Command::new(&self.buildlet_bin);
                c.current_dir(&dirs.home);
                c
            }
        };
        cmd.args(args).env_clear();
        for k in KEPT_ENV {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        let ids = self.ids(slot.index);
        // Taken before the fork: the child compares its parent with it.
        let coordinator = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setgroups, setgid, setuid, prctl, getppid, umask).
        unsafe {
            cmd.pre_exec(move || {
                if let Some((uid, gid)) = ids {
                    nix::unistd::setgroups(&[]).map_err(std::io::Error::from)?;
                    nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
                    nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
                }
                // After setuid, which clears it. A buildlet must not outlive a coordinator
                // that crashed (kill_on_drop only covers orderly exits).
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)?;
                // A coordinator that died before the prctl never sends the signal: we were
                // already handed to another parent. Reproduced by SIGKILLing a coordinator
                // while it spawns: the bwrap was left running with ppid 1.
                // (ESRCH, not a message: no allocation between fork and exec.)
                if nix::unistd::getppid() != coordinator {
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
                Ok(())
            });
        }
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs `buildlet version` exactly as a buildlet would run (slot 0's uid, the real
    /// mounts), so a bwrap that cannot work here fails now, with its own message.
    async fn probe(&self) -> Result<()> {
        let ca = buildfarm_tls::CertificateAuthority::generate("buildfarm sandbox probe")?;
        let identity = ca.issue_server(&["localhost"])?;
        let permits = Arc::new(Semaphore::new(1));
        let slot = Slot {
            index: 0,
            taken: Arc::new(Mutex::new(vec![true])),
            _permit: permits.acquire_owned().await?,
        };
        let dirs = self
            .make_dirs(&slot, ".probe", &identity, ca.cert_pem())
            .with_context(|| format!("making probe dirs in {}", self.root.display()))?;
        let mut cmd = self.command(&slot, &dirs, &["version".into()]);
        cmd.stdin(Stdio::null());
        let result = tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await;
        let _ = force_remove(&dirs.home);
        let _ = force_remove(&dirs.creds);
        let out = result
            .map_err(|_| anyhow::anyhow!("bwrap probe did not finish within {PROBE_TIMEOUT:?}"))?
            .context("running bwrap")?;
        if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("buildlet") {
            bail!(
                "`bwrap ... buildlet version` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Whether every directory above `file` lets other users pass (o+x).
fn others_can_reach(file: &Path) -> bool {
    file.ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

fn warn_unsandboxed(why: &str) {
    warn!(
        reason = why,
        "LOCAL BUILDLETS ARE NOT SANDBOXED: builds run as the coordinator's user and can read \
         whatever it can (install bubblewrap, or set [sandbox] mode = \"bwrap\" to require it)"
    );
}

/// `name` in one of PATH's directories, if it is an executable file there.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Creates (or checks) the workdir root: canonical, outside the data dir, ours, marked.
fn prepare_root(root: &Path, data_dir: &Path, other_uids: bool) -> Result<PathBuf> {
    let absolute = std::env::current_dir()
        .map(|cwd| cwd.join(root))
        .unwrap_or_else(|_| root.to_owned());
    if absolute.starts_with(data_dir) {
        bail!(
            "workdir root {} must be outside the data dir {} (builds must not reach the coordinator's secrets)",
            root.display(),
            data_dir.display()
        );
    }
    let existed = root.exists();
    std::fs::create_dir_all(root)
        .with_context(|| format!("creating workdir root {}", root.display()))?;
    let meta = std::fs::symlink_metadata(root)
        .with_context(|| format!("reading workdir root {}", root.display()))?;
    if !meta.is_dir() {
        bail!("workdir root {} is not a directory", root.display());
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        bail!(
            "workdir root {} belongs to uid {}, not to the coordinator's user: refusing to use it",
            root.display(),
            meta.uid()
        );
    }
    let root = root.canonicalize()?;
    if root.starts_with(data_dir) || data_dir.starts_with(&root) {
        bail!(
            "workdir root {} must be outside the data dir {} (builds must not reach the coordinator's secrets)",
            root.display(),
            data_dir.display()
        );
    }
    let marker = root.join(ROOT_MARKER);
    if existed && !marker.exists() && std::fs::read_dir(&root)?.next().is_some() {
        bail!(
            "workdir root {} is not empty and was not made by buildfarm (no {ROOT_MARKER}); \
             everything in it would be deleted at start-up, so choose an empty or new directory",
            root.display()
        );
    }
    std::fs::write(
        &marker,
        "buildfarm keeps local buildlets' workdirs here; its contents are deleted at start-up\n",
    )
    .with_context(|| format!("writing {}", marker.display()))?;
    // Other uids must pass through to their own dirs but not list them.
    let mode = if other_uids { 0o711 } else { 0o700 };
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode))?;
    Ok(root)
}

/// SIGKILLs processes left by a previous run: running as one of `uids`, or with their
/// working directory inside `root`. Repeats until none is left (they may fork meanwhile).
async fn kill_leftovers(root: &Path, uids: Option<std::ops::Range<u32>>) {
    let me = std::process::id() as i32;
    for _ in 0..20 {
        let found = leftover_processes(root, uids.as_ref(), me);
        if found.is_empty() {
            return;
        }
        for (pid, cmdline) in found {
            warn!(
                pid,
                cmdline, "killing a process left by a previous run's buildlet"
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    warn!(root = %root.display(), "processes of a previous run's buildlets keep appearing");
}

fn leftover_processes(
    root: &Path,
    uids: Option<&std::ops::Range<u32>>,
    me: i32,
) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = e.path();
        let by_uid = uids.is_some_and(|r| {
            std::fs::read_to_string(dir.join("status"))
                .ok()
                .and_then(|s| real_uid(&s))
                .is_some_and(|u| r.contains(&u))
        });
        let by_cwd = std::fs::read_link(dir.join("cwd")).is_ok_and(|cwd| cwd.starts_with(root));
        // A zombie has no cwd and cannot be killed again; its parent reaps it.
        if by_uid || by_cwd {
            let cmdline = std::fs::read(dir.join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            if !cmdline.is_empty() {
                out.push((pid, cmdline.chars().take(200).collect()));
            }
        }
    }
    out
}

/// The real uid from a `/proc/<pid>/status` text.
fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// Removes everything in `root` but the marker (workdirs, credentials, the old binary).
fn remove_leftovers(root: &Path) -> Result<()> {
    for e in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let e = e?;
        if e.file_name() == ROOT_MARKER {
            continue;
        }
        let path = e.path();
        info!(path = %path.display(), "removing what a previous run's buildlet left");
        force_remove(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Removes a file or a directory tree, first making read-only directories writable (Go's
/// module cache and the credentials dirs are read-only, which stops a non-root owner).
pub fn force_remove(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    if std::fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(path)
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_dir() {
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o700));
        }
    }
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn bwrap_args_hide_then_bind_in_order() {
        let plan = BwrapPlan {
            hidden_dirs: vec!["/srv/data".into(), "/srv/work".into()],
            hidden_files: vec!["/etc/bf/master.key".into()],
            writable: vec!["/srv/work/b1".into()],
            read_only: vec!["/srv/work/b1.creds".into()],
            chdir: "/srv/work/b1".into(),
        };
        let a = strings(&bwrap_args(&plan));
        let pos = |needle: &[&str]| {
            a.windows(needle.len())
                .position(|w| w == needle)
                .unwrap_or_else(|| panic!("{needle:?} not in {a:?}"))
        };
        assert_eq!(&a[..3], ["--ro-bind", "/", "/"]);
        for flag in [
            "--unshare-user",
            "--unshare-pid",
            "--die-with-parent",
            "--new-session",
        ] {
            pos(&[flag]);
        }
        pos(&["--proc", "/proc"]);
        pos(&["--dev", "/dev"]);
        let tmp = pos(&["--size", "1073741824", "--tmpfs", "/tmp"]);
        pos(&["--size", "1073741824", "--tmpfs", "/srv/data"]);
        let data = pos(&["--tmpfs", "/srv/data"]);
        let root = pos(&["--tmpfs", "/srv/work"]);
        let key = pos(&["--ro-bind", "/dev/null", "/etc/bf/master.key"]);
        let own = pos(&["--bind", "/srv/work/b1", "/srv/work/b1"]);
        let creds = pos(&["--ro-bind", "/srv/work/b1.creds", "/srv/work/b1.creds"]);
        // Binds inside a hidden dir must come after the tmpfs that hides it.
        assert!(tmp < data && data < own && root < own && root < creds && key < own);
        assert_eq!(&a[a.len() - 3..], ["--chdir", "/srv/work/b1", "--"]);
        assert!(
            !a.contains(&"--unshare-net".to_owned()),
            "the buildlet listens on loopback"
        );
        assert!(!a.contains(&"--share-net".to_owned()));
    }

    #[test]
    fn bwrap_args_bind_nothing_writable_but_what_is_asked() {
        let plan = BwrapPlan {
            chdir: "/w".into(),
            ..Default::default()
        };
        let a = strings(&bwrap_args(&plan));
        assert!(!a.contains(&"--bind".to_owned()), "{a:?}");
        assert!(!a.contains(&"--dev-bind".to_owned()), "{a:?}");
    }

    fn sandbox_for_plan(uid_base: Option<u32>, secret: PathBuf) -> Sandbox {
        Sandbox {
            bwrap: Some("/usr/bin/bwrap".into()),
            unsandboxed_reason: None,
            uid_base,
            root: "/srv/work".into(),
            data_dir: "/srv/data".into(),
            writable_paths: vec!["/srv/gomodcache".into()],
            secret_files: vec![secret, "/srv/data/master.key".into()],
            buildlet_bin: "/srv/work/bin/buildlet".into(),
            permits: Arc::new(Semaphore::new(1)),
            taken: Arc::new(Mutex::new(vec![false])),
        }
    }

    #[test]
    fn plan_hides_data_dir_and_root_and_binds_only_its_own_dirs() {
        // Any existing file outside /tmp and the data dir, as an operator's
        // /etc/buildfarm/master.key would be.
        let secret = PathBuf::from("/etc/passwd");
        let dirs = BuildletDirs {
            home: "/srv/work/local-1-x".into(),
            workdir: "/srv/work/local-1-x/work".into(),
            creds: "/srv/work/local-1-x.creds".into(),
        };
        let same_uid = sandbox_for_plan(None, secret.clone()).plan(&dirs);
        assert_eq!(
            same_uid.hidden_dirs,
            [PathBuf::from("/srv/data"), PathBuf::from("/srv/work")]
        );
        assert_eq!(
            same_uid.writable,
            [
                PathBuf::from("/srv/work/local-1-x"),
                PathBuf::from("/srv/gomodcache")
            ]
        );
        assert_eq!(
            same_uid.read_only,
            [
                PathBuf::from("/srv/work/local-1-x.creds"),
                PathBuf::from("/srv/work/bin")
            ]
        );
        // Same uid: a secret outside the data dir is covered; one inside is hidden already.
        assert_eq!(same_uid.hidden_files, std::slice::from_ref(&secret));
        // Other uids: covered too when they can reach it.
        let other_uid = sandbox_for_plan(Some(1_500_000), secret.clone()).plan(&dirs);
        assert_eq!(other_uid.hidden_files, [secret]);
        assert_eq!(other_uid.chdir, PathBuf::from("/srv/work/local-1-x"));
    }

    #[test]
    fn files_in_private_directories_are_out_of_other_users_reach() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let private = tmp.path().join("private");
        std::fs::create_dir(&private).expect("mkdir");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        assert!(!others_can_reach(&private.join("master.key")));
        assert!(others_can_reach(&tmp.path().join("coordinator.toml")));
    }

    #[test]
    fn real_uid_is_the_first_uid_field() {
        let status = "Name:\tsleep\nUmask:\t0022\nUid:\t1500003\t1500003\t1500003\t1500003\nGid:\t0\t0\t0\t0\n";
        assert_eq!(real_uid(status), Some(1_500_003));
        assert_eq!(real_uid("Name:\tx\n"), None);
    }

    #[test]
    fn force_remove_handles_read_only_trees_and_missing_paths() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path().join("mod/cache");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("f"), "x").expect("write");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        force_remove(&tmp.path().join("mod")).expect("remove");
        assert!(!tmp.path().join("mod").exists());
        force_remove(&tmp.path().join("missing")).expect("missing is fine");
    }

    #[test]
    fn a_foreign_non_empty_root_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(root.join("precious.txt"), "x").expect("write");
        let err =
            prepare_root(&root, &data.canonicalize().expect("canon"), false).expect_err("refused");
        assert!(
            format!("{err:#}").contains("not made by buildfarm"),
            "{err:#}"
        );
        assert!(root.join("precious.txt").exists());
        let inside = data.join("work");
        let err = prepare_root(&inside, &data.canonicalize().expect("canon"), false)
            .expect_err("refused");
        assert!(
            format!("{err:#}").contains("outside the data dir"),
            "{err:#}"
        );
    }
}
