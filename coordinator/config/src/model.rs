//! The config's plain data types, one per TOML table. Every field documents its default;
//! checks that span fields (references, counts, names) live in `validate.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::artifacts::{ArtifactsConfig, RepoArtifacts};
use crate::connections::ConnectionsConfig;
use crate::limits::Limits;
use crate::notifications::{CommitStatus, Notification};

/// Environment variables as written in the file, sorted by name.
pub type Env = BTreeMap<String, String>;

/// The whole coordinator config file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings. Default: every field at its own default.
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    /// Kinds of machine builds run on, each with the pool that provides them. Default: none.
    #[serde(default)]
    pub host_types: Vec<HostType>,
    /// What to build where. Default: none.
    #[serde(default)]
    pub builders: Vec<Builder>,
    /// Git repositories to watch. Default: none.
    #[serde(default)]
    pub repos: Vec<Repo>,
    /// Fair shares between users and classes of work. Default: every field at its own
    /// default.
    #[serde(default)]
    pub limits: Limits,
    /// How local buildlets are kept away from the coordinator's secrets and from each
    /// other. Default: every field at its own default.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// Time limits and caps on connections to the coordinator's port. Default: every
    /// field at its own default (see [`ConnectionsConfig`]).
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// Receivers of build and try results (webhooks, chat rooms). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<Notification>,
    /// How long built artifacts are kept. Default: every field at its own default (see
    /// [`ArtifactsConfig`]).
    #[serde(default)]
    pub artifacts: ArtifactsConfig,
    /// Who may do what: anonymous readers, per-user rate limits, the credentials reverse
    /// buildlets dial in with. Default: every field at its own default.
    #[serde(default)]
    pub access: crate::access::AccessConfig,
}

/// `[coordinator]`: settings of the coordinator process itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address the gRPC API, status page and metrics listen on. Default: `127.0.0.1:8119`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the database, logs, generated keys and certificates.
    /// Default: `./.buildfarm`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Store URL, `sqlite://...` or `postgres://...`.
    /// Default: none, meaning SQLite in the data dir (see [`CoordinatorConfig::store_url`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_url: Option<String>,
    /// PEM certificate chain for the listener; set together with `tls_key`.
    /// Default: none, meaning a certificate generated in the data dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`. Default: none (generated with the certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// File holding the master key that builder and gomote keys derive from.
    /// Default: none, meaning `master.key` in the data dir, generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key_file: Option<PathBuf>,
    /// How often watched repos are polled for new commits (webhooks also trigger a poll).
    /// Default: `10s`.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub repo_poll_interval: Duration,
    /// Attempts a build gets when it fails for infrastructure reasons (lost buildlet,
    /// coordinator restart) before it is recorded as failed; at least 1. Default: `3`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// A gomote instance unused this long is destroyed. Default: `30m`.
    #[serde(default = "default_gomote_idle", with = "humantime_serde")]
    pub gomote_idle_timeout: Duration,
    /// Most bytes of source tarballs (one per commit and try patch) kept on disk; the
    /// least recently used go first. Default: `2 GiB`.
    #[serde(default = "default_source_cache_bytes")]
    pub source_cache_bytes: ByteSize,
    /// Directory of cross-built buildlets, `buildlet.<os>-<arch>` (e.g.
    /// `buildlet.linux-arm64`), served at `/buildlet/<os>-<arch>` to machines that fetch
    /// themselves; a file here wins over the coordinator's own buildlet. Default: none
    /// (only the coordinator's own platform is served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buildlet_binaries: Option<PathBuf>,
    /// Most bytes of step snapshots and caches kept in `<data_dir>/workspaces`; the least
    /// recently used go first (never one a running build uses). Default: `10 GiB`.
    #[serde(default = "default_workspace_bytes")]
    pub workspace_bytes: ByteSize,
    /// Snapshots and caches unused this long are removed. Default: `7days`.
    #[serde(default = "default_workspace_max_age", with = "humantime_serde")]
    pub workspace_max_age: Duration,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8119))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./.buildfarm")
}
fn default_poll() -> Duration {
    Duration::from_secs(10)
}
fn default_max_attempts() -> u32 {
    3
}
fn default_gomote_idle() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_source_cache_bytes() -> ByteSize {
    ByteSize::gib(2)
}
fn default_workspace_bytes() -> ByteSize {
    ByteSize::gib(10)
}
fn default_workspace_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: default_listen(),
            data_dir: default_data_dir(),
            store_url: None,
            tls_cert: None,
            tls_key: None,
            master_key_file: None,
            repo_poll_interval: default_poll(),
            max_attempts: default_max_attempts(),
            gomote_idle_timeout: default_gomote_idle(),
            source_cache_bytes: default_source_cache_bytes(),
            buildlet_binaries: None,
            workspace_bytes: default_workspace_bytes(),
            workspace_max_age: default_workspace_max_age(),
        }
    }
}

impl CoordinatorConfig {
    /// The store URL to open: the configured one, else `sqlite://<data_dir>/buildfarm.db`.
    pub fn store_url(&self) -> String {
        match &self.store_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("buildfarm.db").display()),
        }
    }

    /// The master key file to read (or create): the configured one, else `<data_dir>/master.key`.
    pub fn master_key_path(&self) -> PathBuf {
        match &self.master_key_file {
            Some(p) => p.clone(),
            None => self.data_dir.join("master.key"),
        }
    }

    /// Certificate and key paths: the configured pair, else `tls/cert.pem` and `tls/key.pem`
    /// in the data dir (generated when absent).
    pub fn tls_paths(&self) -> (PathBuf, PathBuf) {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (
                self.data_dir.join("tls/cert.pem"),
                self.data_dir.join("tls/key.pem"),
            ),
        }
    }
}

/// `[sandbox]`: isolation of local buildlets (the `local` pool).
///
/// With bubblewrap, each local buildlet runs in its own mount, pid, IPC and UTS namespace:
/// the host's filesystem read-only, a private `/tmp`, a fresh `/proc` and a minimal `/dev`,
/// the data dir and every other buildlet's workdir not visible at all, its own workdir the
/// only writable place, and every process of it killed when the buildlet or the coordinator
/// dies. When the coordinator runs as root each buildlet also runs under its own uid/gid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// `auto`: bubblewrap when `bwrap` is on PATH and works, else no sandbox with a loud
    /// warning; `bwrap`: bubblewrap, and refuse to start without a working one; `none`:
    /// buildlets run as the coordinator's user and see what it sees. Default: `auto`.
    #[serde(default)]
    pub mode: SandboxMode,
    /// Directory holding the local buildlets' workdirs and credentials. It must not be
    /// inside the data dir (nor hold it); whatever a previous run left in it is removed at
    /// start-up, so give it a directory of its own.
    /// Default: none, meaning `<system temp dir>/buildfarm-<hash of the data dir's path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir_root: Option<PathBuf>,
    /// When the coordinator runs as root, buildlet slot `n` runs as uid and gid
    /// `uid_base + n` (slots: the sum of the local pools' counts). Processes still running
    /// under these uids at start-up are killed, so give each farm on a machine its own
    /// range; at least 1000. Default: none, meaning `1500000 + 1024 × (a number below 2^20
    /// derived from the data dir's path)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid_base: Option<u32>,
    /// Host directories bound read-write into every sandbox at the same path (for example
    /// a shared Go module cache). Every build can read and change them, so use them only
    /// for caches you accept builds sharing. Absolute, outside the data dir and the workdir
    /// root. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable_paths: Vec<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            mode: SandboxMode::Auto,
            workdir_root: None,
            uid_base: None,
            writable_paths: Vec::new(),
        }
    }
}

/// `[sandbox] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Bubblewrap when it is installed and works, else no sandbox (with a warning).
    #[default]
    Auto,
    /// Bubblewrap, required.
    Bwrap,
    /// No sandbox.
    None,
}

/// `[[host_types]]`: a kind of machine, and where machines of that kind come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostType {
    /// Unique name, `[A-Za-z0-9._-]+`, e.g. `linux-amd64-bookworm`. Required.
    pub name: String,
    /// The pool providing buildlets of this host type, e.g.
    /// `pool = { kind = "local", count = 2 }` or a `[host_types.pool]` table. Required.
    pub pool: Pool,
    /// Environment given to every command on these buildlets. Default: empty.
    #[serde(default)]
    pub env: Env,
}

/// Where buildlets of a host type come from; `kind` picks the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Pool {
    /// Buildlet processes spawned on the coordinator's machine.
    Local(LocalPool),
    /// Machines that dial in to the coordinator.
    Reverse(ReversePool),
    /// One Kubernetes pod per buildlet.
    Kube(KubePool),
    /// One EC2 instance per buildlet.
    Ec2(Ec2Pool),
    /// One Docker container per buildlet.
    Docker(DockerPool),
}

impl Pool {
    /// The `kind` string as written in TOML, for status pages and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Pool::Local(_) => "local",
            Pool::Reverse(_) => "reverse",
            Pool::Kube(_) => "kube",
            Pool::Ec2(_) => "ec2",
            Pool::Docker(_) => "docker",
        }
    }
}

/// `kind = "local"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPool {
    /// How many buildlets may run at once; at least 1. Required.
    pub count: u32,
}

/// `kind = "reverse"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReversePool {
    /// How many machines should be connected; fewer shows a health warning. At least 1.
    /// Required.
    pub expected: u32,
}

/// `kind = "kube"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubePool {
    /// Container image the pods run. It needs only `sh` and `curl` (or `wget`): the pod's
    /// command fetches the buildlet from the coordinator at start. Required.
    pub image: String,
    /// Namespace the pods are created in. Default: `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// CPU request and limit as a Kubernetes quantity, e.g. `"2"` or `"500m"`. Required.
    pub cpu: String,
    /// Memory request and limit, e.g. `"4 GiB"`. Required.
    pub memory: ByteSize,
    /// Most pods alive at once; at least 1. Required.
    pub max_pods: u32,
    /// Node labels a pod's node must have (the pod's `nodeSelector`). Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<KubeToleration>,
    /// Port the buildlet listens on inside the pod; the coordinator dials the pod IP
    /// there. Default: `8443`.
    #[serde(default = "default_buildlet_port")]
    pub buildlet_port: u16,
    /// How long a pod may take from creation to a buildlet answering (image pull
    /// included) before the attempt is an infrastructure failure. Default: `5m`.
    #[serde(default = "default_kube_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
    /// A pod is deleted this long after it was created, leased or not (its deadline
    /// label); a lease still holding it then is lost. Default: `6h`.
    #[serde(default = "default_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// `GOOS-GOARCH` of the machines: which buildlet binary they fetch. Default:
    /// `linux-amd64`.
    #[serde(default = "default_platform")]
    pub platform: String,
    /// `https://host:port` of the coordinator as pods see it: they fetch the buildlet
    /// there, trusting the coordinator's CA, so `host` must be a name on its certificate.
    /// Default: none, meaning `https://buildfarm-coordinator.<namespace>.svc:<the port
    /// of [coordinator] listen>` (the Service of `deploy/kubernetes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_url: Option<String>,
    /// Value of the owner label on this coordinator's pods; the sweeper only touches
    /// pods with this owner. Give every coordinator sharing a namespace its own.
    /// Default: none, meaning `bf-` and 10 hex digits derived from the master key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// One entry of a kube pool's `tolerations`, as in a pod spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeToleration {
    /// Taint key; empty with `operator = "Exists"` tolerates every taint. Default: empty.
    #[serde(default)]
    pub key: String,
    /// `Equal` or `Exists`. Default: `Equal`.
    #[serde(default = "default_toleration_operator")]
    pub operator: String,
    /// Taint value (with `Equal`; empty with `Exists`). Default: empty.
    #[serde(default)]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule`, `NoExecute`, or empty for all. Default: empty.
    #[serde(default)]
    pub effect: String,
}

fn default_namespace() -> String {
    "default".to_owned()
}
fn default_buildlet_port() -> u16 {
    8443
}
fn default_kube_start_timeout() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_ec2_start_timeout() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(6 * 60 * 60)
}
fn default_platform() -> String {
    "linux-amd64".to_owned()
}
fn default_toleration_operator() -> String {
    "Equal".to_owned()
}

/// `kind = "ec2"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Pool {
    /// Machine image, `ami-...`. It needs only `sh`, `curl` (or `wget`) and something that
    /// runs user-data (cloud-init): the user-data fetches the buildlet from the
    /// coordinator at boot. Required.
    pub ami: String,
    /// Instance type, e.g. `c6i.large`. Required.
    pub instance_type: String,
    /// AWS region, e.g. `us-east-2`. Required.
    pub region: String,
    /// EC2 API endpoint override (e.g. a local emulator), `http(s)://...`.
    /// Default: none, meaning AWS's endpoint for the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Most instances alive at once; at least 1. Required.
    pub max_instances: u32,
    /// On-demand vCPU quota shared by this pool's instances; at least 1. Required.
    pub vcpu_quota: u32,
    /// vCPUs of one instance, counted against `vcpu_quota`; at least 1. Default: none,
    /// meaning asked from EC2 (DescribeInstanceTypes) at the first acquire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus_per_instance: Option<u32>,
    /// Subnet the instances are launched in, `subnet-...`. Default: none (the default
    /// VPC's default subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// Security groups of the instances, `sg-...`; they must let the coordinator reach
    /// `buildlet_port`. Default: none (the VPC's default group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// Which address of an instance the coordinator dials: `private` (same VPC) or
    /// `public`. Default: `private`.
    #[serde(default)]
    pub address: Ec2Address,
    /// Port the buildlet listens on. Default: `8443`.
    #[serde(default = "default_buildlet_port")]
    pub buildlet_port: u16,
    /// How long an instance may take from RunInstances to a buildlet answering before
    /// the attempt is an infrastructure failure. Default: `10m`.
    #[serde(default = "default_ec2_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
    /// An instance is terminated this long after launch, leased or not (its deadline
    /// tag); a lease still holding it then is lost. Default: `6h`.
    #[serde(default = "default_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// `GOOS-GOARCH` of the machines: which buildlet binary they fetch. Default:
    /// `linux-amd64`.
    #[serde(default = "default_platform")]
    pub platform: String,
    /// `https://host:port` of the coordinator as instances see it: they fetch the
    /// buildlet there at boot, trusting the coordinator's CA, so `host` must be a name on
    /// its certificate. Required.
    pub coordinator_url: String,
    /// Value of the owner tag on this coordinator's instances; the sweeper only touches
    /// instances with this owner. Give every coordinator sharing an account its own.
    /// Default: none, meaning `bf-` and 10 hex digits derived from the master key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// `address` of an EC2 pool: which address of an instance the coordinator dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ec2Address {
    /// The instance's private IPv4 address.
    #[default]
    Private,
    /// The instance's public IPv4 address.
    Public,
}

/// `kind = "docker"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerPool {
    /// Image running the buildlet (built locally; no registry is assumed). Required.
    pub image: String,
    /// Docker network the containers join. Default: none (Docker's default bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Most containers alive at once; at least 1. Required.
    pub max: u32,
    /// The Docker engine: `unix:///path/to/docker.sock`, or `tcp://host:port` (plain
    /// HTTP; give such an engine only on a trusted network). The coordinator dials each
    /// container at its address on `network`, so that network must be routable from
    /// the coordinator. Default: none, meaning `DOCKER_HOST`, else the local socket
    /// `/var/run/docker.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Base URL containers fetch the buildlet from, `https://host:port`, with `host` a
    /// name on the coordinator's certificate. Default: none, meaning
    /// `https://localhost:<listen port>` dialled at the network's gateway address (the
    /// coordinator must then listen on `0.0.0.0` or on that gateway address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_url: Option<String>,
    /// Longest a container may live; its `buildfarm.dev/deadline` label says when that is,
    /// and the sweeper removes it then (the lease is lost). Default: `12h`.
    #[serde(default = "default_docker_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
}

fn default_docker_lifetime() -> Duration {
    Duration::from_secs(12 * 3600)
}

/// `[[builders]]`: one platform configuration that builds commits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Builder {
    /// Unique name `GOOS-GOARCH[-suffix]`, suffix `[a-z0-9-]+`, e.g. `linux-amd64-race`.
    /// Required.
    pub name: String,
    /// Name of the `[[host_types]]` entry whose buildlets run this builder. Required.
    pub host_type: String,
    /// Environment for every step (GOOS, GOARCH, CGO_ENABLED, GOFLAGS, ...), over the host
    /// type's. Default: empty.
    #[serde(default)]
    pub env: Env,
    /// Whether try runs use this builder. Default: `true`.
    #[serde(rename = "try", default = "default_true")]
    pub try_bot: bool,
    /// Repos this builder builds; omit for every repo. Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repos: Option<Vec<String>>,
    /// Branches this builder builds post-submit; omit for every watched branch.
    /// Default: all watched branches of its repos.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branches: Option<Vec<String>>,
    /// Commands run in order in the checked-out tree; at least one. Required.
    pub steps: Vec<Step>,
    /// Limit for the whole build, all steps and shards. Default: `1h`.
    #[serde(default = "default_build_timeout", with = "humantime_serde")]
    pub build_timeout: Duration,
    /// How many buildlets share a step with `units` (one leases the others as helpers);
    /// at least 1, and more than 1 only with such a step. Default: `1`.
    #[serde(default = "default_shards")]
    pub test_shards: u32,
    /// Files kept from each successful post-submit and try build: path patterns
    /// relative to the checkout (`*` and `?` within a segment, `**` across segments),
    /// e.g. `["bin/*"]`. The coordinator fetches each matching file's directory from the
    /// buildlet, so point them at an output directory rather than the checkout's root.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
}

fn default_true() -> bool {
    true
}
fn default_build_timeout() -> Duration {
    Duration::from_secs(60 * 60)
}
fn default_shards() -> u32 {
    1
}

impl Builder {
    /// Whether the builder runs as a plan (see [`Step::requires`]) rather than its steps
    /// in order on one buildlet.
    pub fn is_plan(&self) -> bool {
        self.steps.iter().any(Step::needs_plan)
    }

    /// Whether this builder builds `repo` (ignoring branches).
    pub fn builds_repo(&self, repo: &str) -> bool {
        self.repos
            .as_ref()
            .is_none_or(|repos| repos.iter().any(|r| r == repo))
    }
}

/// One command of a builder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Name shown in logs and results, unique within the builder. Required.
    pub name: String,
    /// Program and arguments, run without a shell; not empty. Required.
    pub command: Vec<String>,
    /// Environment for this step, over the builder's. Default: empty.
    #[serde(default)]
    pub env: Env,
    /// Limit for this step (for a step with `units`: for each unit). Default: `20m`.
    #[serde(default = "default_step_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Names of the steps that must pass before this one starts. A builder where any step
    /// uses `requires`, `snapshot`, `restore`, `cache` or `units` runs as a plan: each step
    /// on its own buildlet of the builder's host type, steps whose requirements have
    /// passed in parallel. Without any of these the steps run in order on one buildlet.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Directory, relative to the buildlet's workdir (the source is in `src`), saved as a
    /// snapshot once the step passes, for later steps on other buildlets to restore.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Step whose snapshot is restored (at the same place) before this step runs; it must
    /// be among this step's requirements, directly or through others. Default: none,
    /// meaning the snapshots of the steps named in `requires`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// A cache restored before the step and saved after it passes, keyed by the named
    /// files' contents and the Go version. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<StepCache>,
    /// Makes this a test step split into units (`"go-packages"`: the packages `go list
    /// ./...` prints; `"dist-test"`: the Go toolchain's tests, as `go tool dist test
    /// -list` prints them), run over the builder's `test_shards` buildlets: `command` runs
    /// once per unit with the unit appended (e.g. `["go", "test", "-short"]` or `["go",
    /// "tool", "dist", "test", "-no-rebuild"]`). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<Units>,
    /// With `units`: run only these units (names as the listing prints them), in listing
    /// order; a name the listing lacks fails the step. Default: none, meaning every
    /// listed unit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only_units: Vec<String>,
    /// PATH of this step's commands (its unit listing included), elements joined with
    /// `:`; `$WORKDIR` is the buildlet's workdir and `$PATH` the PATH so far, e.g.
    /// `["$WORKDIR/src/bin", "$PATH"]` to run the Go toolchain an earlier step built in
    /// the source tree. Default: none (PATH unchanged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<String>,
    /// A Go toolchain built by another builder's step, restored before this step runs:
    /// the snapshot that step saved for the Go commit this build pairs with (the build's
    /// own commit when that builder builds this repo, as misc-compile builders do; else
    /// the newest commit of the repo's `go` pairing that has one, as subrepo builders
    /// do). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toolchain: Option<ToolchainRef>,
}

/// `toolchain = { builder = "...", step = "...", dir = "..." }` of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolchainRef {
    /// The builder that builds the toolchain (e.g. runs `make.bash`). Required.
    pub builder: String,
    /// Its step whose `snapshot` is the built toolchain (GOROOT). Required.
    pub step: String,
    /// Where the toolchain goes, relative to the buildlet's workdir. Default: none,
    /// meaning where that step saved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// `cache = { key_files = [...], paths = [...] }` of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepCache {
    /// Files, relative to the source tree (`src`), whose contents key the cache (e.g.
    /// `go.sum`); a missing file keys as missing. Default: none (the key is then the
    /// builder, the step and the Go version).
    #[serde(default)]
    pub key_files: Vec<String>,
    /// Directories, relative to the buildlet's workdir, saved and restored (e.g.
    /// `gocache`, where buildlets point `GOCACHE`, and `go/pkg/mod`); at least one.
    /// Required.
    pub paths: Vec<String>,
}

/// How a test step lists its units. Adding a lister adds a variant here and its command
/// and parsing in the runner (`plan/units`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Units {
    /// The module's packages, from `go list ./...` in the source tree; each unit is an
    /// import path.
    GoPackages,
    /// The Go toolchain's tests, from `go tool dist test -list` (the `go` on the step's
    /// `path`); each unit is a dist test name such as `go_test:sort` or `runtime:cpu124`,
    /// run by naming it after the step's command.
    DistTest,
}

impl Step {
    /// Whether the step uses anything only a plan (a DAG of buildlets) can run.
    pub fn needs_plan(&self) -> bool {
        !self.requires.is_empty()
            || self.snapshot.is_some()
            || self.restore.is_some()
            || self.cache.is_some()
            || self.units.is_some()
            || self.toolchain.is_some()
    }
}

fn default_step_timeout() -> Duration {
    Duration::from_secs(20 * 60)
}

/// `[[repos]]`: a git repository to watch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repo {
    /// Unique short name, `[A-Za-z0-9._-]+`, e.g. `go`. Required.
    pub name: String,
    /// Where to fetch from: a git URL or a local path. Required.
    pub url: String,
    /// Branches whose new commits get post-submit builds. Default: `["main"]`.
    #[serde(default = "default_branches")]
    pub branches: Vec<String>,
    /// Shared secret that webhook calls for this repo must be signed with
    /// (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, as GitHub sends).
    /// Default: none (webhooks for this repo are refused with 403 unless
    /// `danger_accept_unsigned_webhooks` is set; polling still works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<Secret>,
    /// Accept unsigned webhook calls for this repo (a repo without `webhook_secret`):
    /// anyone who can reach the coordinator can then trigger polls of it. For a trusted
    /// network only; logged as a warning at start. Not allowed together with
    /// `webhook_secret`. Default: `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub danger_accept_unsigned_webhooks: bool,
    /// Post each post-submit build's state to the forge's commit-status API (see
    /// [`CommitStatus`]). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_status: Option<CommitStatus>,
    /// The Go toolchain this repo is tested against (a subrepo, as the Go farm tested
    /// golang.org/x repos against Go at tip): builds of its builders whose steps use
    /// `toolchain` restore the one built from the newest commit of `repo`'s `branch` that
    /// has one, waiting for a toolchain build still running, and record that Go commit.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub go: Option<GoPairing>,
    /// How artifacts on request (`POST /artifacts/<repo>/<GOOS>/<GOARCH>/<version>`)
    /// are built: a make target and its outputs. Default: none, meaning `go build
    /// -trimpath` of the module's main packages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<RepoArtifacts>,
}

/// `go = { repo = "go", branch = "master" }` of a repo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoPairing {
    /// The repo of the Go source. Required.
    pub repo: String,
    /// Its watched branch whose toolchain builds are used. Required.
    pub branch: String,
}

fn default_branches() -> Vec<String> {
    vec!["main".to_owned()]
}

/// A secret string; its `Debug` does not show it, so it cannot leak into logs by accident.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for computing signatures; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
