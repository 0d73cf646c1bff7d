//! Checks a parsed config for what serde cannot: unique names, references between tables,
//! positive counts, builder names. Works on plain types and field paths only; turning a path
//! into a line and column is `parse.rs`'s job.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::dag::{Dag, DagError};
use crate::error::{ErrorKind, FieldPath};
use crate::limits::Limits;
use crate::model::{
    Builder, Config, CoordinatorConfig, Env, HostType, KubeToleration, Pool, Repo, SandboxConfig,
};
use crate::names::parse_builder_name;

/// One problem found, before it is given a location.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Issue {
    pub(crate) path: FieldPath,
    pub(crate) kind: ErrorKind,
}

#[derive(Default)]
struct Issues(Vec<Issue>);

impl Issues {
    fn push(&mut self, path: FieldPath, kind: ErrorKind) {
        self.0.push(Issue { path, kind });
    }

    fn non_empty(&mut self, path: FieldPath, value: &str) {
        if value.trim().is_empty() {
            self.push(path, ErrorKind::Empty);
        }
    }

    fn positive(&mut self, path: FieldPath, value: u32) {
        if value == 0 {
            self.push(path, ErrorKind::Zero);
        }
    }

    fn positive_port(&mut self, path: FieldPath, value: u16) {
        if value == 0 {
            self.push(path, ErrorKind::Zero);
        }
    }

    fn positive_duration(&mut self, path: FieldPath, value: Duration) {
        if value.is_zero() {
            self.push(path, ErrorKind::Invalid("must be longer than 0s".into()));
        }
    }

    /// Names are used in URLs, metric labels and file names, so keep them plain.
    fn name(&mut self, path: FieldPath, value: &str) {
        if value.is_empty() {
            self.push(path, ErrorKind::Empty);
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            self.push(
                path,
                ErrorKind::Invalid(format!("name \"{value}\" must match [A-Za-z0-9._-]+")),
            );
        }
    }

    fn env(&mut self, path: FieldPath, env: &Env) {
        for (k, v) in env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                self.push(
                    path.key(k),
                    ErrorKind::Invalid(format!(
                        "environment variable \"{k}\" must have a name without '=' and no NUL bytes"
                    )),
                );
            }
        }
    }

    /// Records a duplicate when `name` was already seen; remembers it otherwise.
    fn unique<'a>(
        &mut self,
        seen: &mut HashMap<&'a str, FieldPath>,
        what: &'static str,
        name: &'a str,
        path: FieldPath,
    ) {
        match seen.get(name) {
            Some(first) => self.push(
                path,
                ErrorKind::Duplicate {
                    what,
                    name: name.to_owned(),
                    first: first.clone(),
                },
            ),
            None => {
                seen.insert(name, path);
            }
        }
    }
}

/// Every problem in `config`, in file order of the fields concerned.
pub(crate) fn check(config: &Config) -> Vec<Issue> {
    let mut out = Issues::default();
    coordinator(&mut out, &config.coordinator);
    limits(&mut out, &config.limits);
    let a = &config.artifacts;
    let ap = FieldPath::root().key("artifacts");
    out.positive_duration(ap.key("max_age"), a.max_age);
    out.positive_duration(ap.key("sweep_interval"), a.sweep_interval);
    if a.max_bytes.as_u64() == 0 {
        out.push(ap.key("max_bytes"), ErrorKind::Zero);
    }
    if a.max_file_bytes.as_u64() == 0 {
        out.push(ap.key("max_file_bytes"), ErrorKind::Zero);
    }
    sandbox(&mut out, config, &config.sandbox);
    for (path, kind) in crate::connections::check(&config.connections) {
        out.push(path, kind);
    }
    let host_types: Vec<&str> = config.host_types.iter().map(|h| h.name.as_str()).collect();
    for (path, kind) in crate::access::check(&config.access, &host_types) {
        out.push(path, kind);
    }

    let mut seen = HashMap::new();
    for (i, h) in config.host_types.iter().enumerate() {
        let path = FieldPath::root().key("host_types").index(i);
        host_type(&mut out, &path, h);
        out.unique(&mut seen, "host type", &h.name, path.key("name"));
        // The default fetch URL names `localhost`, which only the generated certificate has.
        if let Pool::Docker(d) = &h.pool
            && d.coordinator_url.is_none()
            && config.coordinator.tls_cert.is_some()
        {
            out.push(
                path.key("pool").key("coordinator_url"),
                ErrorKind::Invalid(
                    "required when [coordinator] tls_cert is set: containers fetch the buildlet from a name on that certificate".into(),
                ),
            );
        }
    }

    let mut seen = HashMap::new();
    for (i, b) in config.builders.iter().enumerate() {
        let path = FieldPath::root().key("builders").index(i);
        builder(&mut out, &path, b, config);
        out.unique(&mut seen, "builder", &b.name, path.key("name"));
    }

    let mut seen = HashMap::new();
    for (i, r) in config.repos.iter().enumerate() {
        let path = FieldPath::root().key("repos").index(i);
        repo(&mut out, &path, r);
        go_pairing(&mut out, &path, r, config);
        out.unique(&mut seen, "repo", &r.name, path.key("name"));
    }

    let repo_names: Vec<&str> = config.repos.iter().map(|r| r.name.as_str()).collect();
    for (i, n) in config.notifications.iter().enumerate() {
        let path = FieldPath::root().key("notifications").index(i);
        for (field, msg) in crate::notifications::check_notification(n, &repo_names) {
            out.push(path.key(field), ErrorKind::Invalid(msg));
        }
    }
    out.0
}

fn coordinator(out: &mut Issues, c: &CoordinatorConfig) {
    let path = FieldPath::root().key("coordinator");
    if c.data_dir.as_os_str().is_empty() {
        out.push(path.key("data_dir"), ErrorKind::Empty);
    }
    if let Some(url) = &c.store_url {
        let known = ["sqlite:", "postgres:", "postgresql:"];
        if !known.iter().any(|s| url.starts_with(s)) {
            out.push(
                path.key("store_url"),
                ErrorKind::Invalid(format!(
                    "store URL \"{url}\" must start with sqlite:, postgres: or postgresql:"
                )),
            );
        }
    }
    match (&c.tls_cert, &c.tls_key) {
        (Some(_), None) => out.push(
            path.key("tls_cert"),
            ErrorKind::Invalid("tls_cert is set without tls_key".into()),
        ),
        (None, Some(_)) => out.push(
            path.key("tls_key"),
            ErrorKind::Invalid("tls_key is set without tls_cert".into()),
        ),
        _ => {}
    }
    out.positive_duration(path.key("repo_poll_interval"), c.repo_poll_interval);
    out.positive(path.key("max_attempts"), c.max_attempts);
    out.positive_duration(path.key("gomote_idle_timeout"), c.gomote_idle_timeout);
}

fn limits(out: &mut Issues, l: &Limits) {
    let path = FieldPath::root().key("limits");
    out.positive(
        path.key("gomote_instances_per_user"),
        l.gomote_instances_per_user,
    );
    if !(1..=100).contains(&l.interactive_share_percent) {
        out.push(
            path.key("interactive_share_percent"),
            ErrorKind::Invalid(format!(
                "interactive_share_percent {} must be between 1 and 100",
                l.interactive_share_percent
            )),
        );
    }
    if l.max_message_bytes.as_u64() < crate::limits::MIN_MAX_MESSAGE_BYTES {
        out.push(
            path.key("max_message_bytes"),
            ErrorKind::Invalid(format!(
                "{} is below the minimum of {}",
                l.max_message_bytes.display().iec(),
                bytesize::ByteSize::b(crate::limits::MIN_MAX_MESSAGE_BYTES)
                    .display()
                    .iec()
            )),
        );
    }
}

/// Lowest `uid_base`: below it are the system's own accounts.
const MIN_UID_BASE: u32 = 1000;

fn sandbox(out: &mut Issues, config: &Config, s: &SandboxConfig) {
    let path = FieldPath::root().key("sandbox");
    let data_dir = normalize(&config.coordinator.data_dir);
    // Only a lexical check is possible here; start-up repeats it on canonical paths.
    let overlaps = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
    if let Some(root) = &s.workdir_root {
        let root = normalize(root);
        if root.as_os_str().is_empty() {
            out.push(path.key("workdir_root"), ErrorKind::Empty);
        } else if overlaps(&root, &data_dir) {
            out.push(
                path.key("workdir_root"),
                ErrorKind::Invalid(format!(
                    "workdir root {} must be outside the data dir {} (builds must not reach the coordinator's secrets)",
                    root.display(),
                    data_dir.display()
                )),
            );
        }
    }
    if let Some(base) = s.uid_base {
        let slots: u64 = config
            .host_types
            .iter()
            .map(|h| match &h.pool {
                Pool::Local(l) => u64::from(l.count),
                _ => 0,
            })
            .sum();
        if base < MIN_UID_BASE {
            out.push(
                path.key("uid_base"),
                ErrorKind::Invalid(format!(
                    "uid_base {base} must be at least {MIN_UID_BASE} (lower uids are system accounts)"
                )),
            );
        } else if u64::from(base) + slots >= u64::from(u32::MAX) {
            out.push(
                path.key("uid_base"),
                ErrorKind::Invalid(format!(
                    "uid_base {base} plus {slots} local buildlet slots does not fit in a uid"
                )),
            );
        }
    }
    for (i, p) in s.writable_paths.iter().enumerate() {
        let at = path.key("writable_paths").index(i);
        let p = normalize(p);
        if !p.is_absolute() {
            out.push(
                at,
                ErrorKind::Invalid(format!("{} must be an absolute path", p.display())),
            );
        } else if overlaps(&p, &data_dir) && data_dir.is_absolute() {
            out.push(
                at,
                ErrorKind::Invalid(format!(
                    "{} must not be inside the data dir {} nor contain it",
                    p.display(),
                    data_dir.display()
                )),
            );
        } else if let Some(root) = s.workdir_root.as_deref().map(normalize)
            && overlaps(&p, &root)
        {
            out.push(
                at,
                ErrorKind::Invalid(format!(
                    "{} must not be inside the workdir root {} nor contain it",
                    p.display(),
                    root.display()
                )),
            );
        }
    }
}

/// `path` without `.` components and with `..` applied where it can be (lexically).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn host_type(out: &mut Issues, path: &FieldPath, h: &HostType) {
    out.name(path.key("name"), &h.name);
    out.env(path.key("env"), &h.env);
    let pool = path.key("pool");
    match &h.pool {
        Pool::Local(p) => out.positive(pool.key("count"), p.count),
        Pool::Reverse(p) => out.positive(pool.key("expected"), p.expected),
        Pool::Kube(p) => {
            out.non_empty(pool.key("image"), &p.image);
            out.non_empty(pool.key("namespace"), &p.namespace);
            if !is_kube_cpu(&p.cpu) {
                out.push(
                    pool.key("cpu"),
                    ErrorKind::Invalid(format!(
                        "cpu \"{}\" must be a positive quantity like \"2\", \"1.5\" or \"500m\"",
                        p.cpu
                    )),
                );
            }
            if p.memory.as_u64() == 0 {
                out.push(pool.key("memory"), ErrorKind::Zero);
            }
            out.positive(pool.key("max_pods"), p.max_pods);
            for (k, v) in &p.node_selector {
                if !is_label_key(k) || !is_label_value(v) {
                    out.push(
                        pool.key("node_selector").key(k),
                        ErrorKind::Invalid(format!(
                            "node selector \"{k}\" = \"{v}\" must be a Kubernetes label key and value"
                        )),
                    );
                }
            }
            for (i, t) in p.tolerations.iter().enumerate() {
                toleration(out, &pool.key("tolerations").index(i), t);
            }
            out.positive_port(pool.key("buildlet_port"), p.buildlet_port);
            out.positive_duration(pool.key("start_timeout"), p.start_timeout);
            out.positive_duration(pool.key("max_lifetime"), p.max_lifetime);
            if let Some(o) = &p.owner
                && !is_label_value(o)
            {
                out.push(pool.key("owner"), owner_error(o));
            }
            if let Some(u) = &p.coordinator_url {
                https_url(out, pool.key("coordinator_url"), u);
            }
            platform(out, pool.key("platform"), &p.platform);
        }
        Pool::Ec2(p) => {
            https_url(out, pool.key("coordinator_url"), &p.coordinator_url);
            platform(out, pool.key("platform"), &p.platform);
            if !p.ami.starts_with("ami-") || p.ami.len() == 4 {
                out.push(
                    pool.key("ami"),
                    ErrorKind::Invalid(format!("ami \"{}\" must look like ami-<id>", p.ami)),
                );
            }
            out.non_empty(pool.key("instance_type"), &p.instance_type);
            out.non_empty(pool.key("region"), &p.region);
            if let Some(url) = &p.endpoint_url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                out.push(
                    pool.key("endpoint_url"),
                    ErrorKind::Invalid(format!(
                        "endpoint URL \"{url}\" must start with http:// or https://"
                    )),
                );
            }
            out.positive(pool.key("max_instances"), p.max_instances);
            out.positive(pool.key("vcpu_quota"), p.vcpu_quota);
            if let Some(v) = p.vcpus_per_instance {
                out.positive(pool.key("vcpus_per_instance"), v);
                if v > p.vcpu_quota {
                    out.push(
                        pool.key("vcpus_per_instance"),
                        ErrorKind::Invalid(format!(
                            "one instance needs {v} vCPUs, more than the pool's vcpu_quota of {}",
                            p.vcpu_quota
                        )),
                    );
                }
            }
            if let Some(s) = &p.subnet_id
                && !s.starts_with("subnet-")
            {
                out.push(
                    pool.key("subnet_id"),
                    ErrorKind::Invalid(format!("subnet \"{s}\" must look like subnet-<id>")),
                );
            }
            for (i, g) in p.security_group_ids.iter().enumerate() {
                if !g.starts_with("sg-") {
                    out.push(
                        pool.key("security_group_ids").index(i),
                        ErrorKind::Invalid(format!(
                            "security group \"{g}\" must look like sg-<id>"
                        )),
                    );
                }
            }
            out.positive_port(pool.key("buildlet_port"), p.buildlet_port);
            out.positive_duration(pool.key("start_timeout"), p.start_timeout);
            out.positive_duration(pool.key("max_lifetime"), p.max_lifetime);
            if let Some(o) = &p.owner
                && !is_label_value(o)
            {
                out.push(pool.key("owner"), owner_error(o));
            }
        }
        Pool::Docker(p) => {
            out.non_empty(pool.key("image"), &p.image);
            if let Some(n) = &p.network {
                out.non_empty(pool.key("network"), n);
            }
            out.positive(pool.key("max"), p.max);
            if let Some(e) = &p.engine
                && !["unix://", "tcp://", "http://"]
                    .iter()
                    .any(|scheme| e.starts_with(scheme) && e.len() > scheme.len())
            {
                out.push(
                    pool.key("engine"),
                    ErrorKind::Invalid(format!(
                        "engine \"{e}\" must look like unix:///var/run/docker.sock or tcp://host:port"
                    )),
                );
            }
            if let Some(url) = &p.coordinator_url
                && !(url.starts_with("https://") && url.len() > "https://".len())
            {
                out.push(
                    pool.key("coordinator_url"),
                    ErrorKind::Invalid(format!(
                        "coordinator URL \"{url}\" must start with https:// (containers fetch the buildlet over TLS)"
                    )),
                );
            }
            if p.max_lifetime.is_zero() {
                out.push(pool.key("max_lifetime"), ErrorKind::Zero);
            }
        }
    }
}

fn toleration(out: &mut Issues, path: &FieldPath, t: &KubeToleration) {
    match t.operator.as_str() {
        "Equal" => {}
        "Exists" if t.value.is_empty() => {}
        "Exists" => out.push(
            path.key("value"),
            ErrorKind::Invalid("must be empty with operator \"Exists\"".into()),
        ),
        other => out.push(
            path.key("operator"),
            ErrorKind::Invalid(format!(
                "operator \"{other}\" must be \"Equal\" or \"Exists\""
            )),
        ),
    }
    if t.key.is_empty() && t.operator != "Exists" {
        out.push(
            path.key("key"),
            ErrorKind::Invalid("an empty key needs operator \"Exists\"".into()),
        );
    }
    if !t.key.is_empty() && !is_label_key(&t.key) {
        out.push(
            path.key("key"),
            ErrorKind::Invalid(format!("\"{}\" is not a Kubernetes label key", t.key)),
        );
    }
    if !matches!(
        t.effect.as_str(),
        "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute"
    ) {
        out.push(
            path.key("effect"),
            ErrorKind::Invalid(format!(
                "effect \"{}\" must be NoSchedule, PreferNoSchedule, NoExecute or empty",
                t.effect
            )),
        );
    }
}

/// `GOOS-GOARCH`, as the coordinator serves buildlets under.
fn platform(out: &mut Issues, path: FieldPath, p: &str) {
    let part = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    if !matches!(p.split_once('-'), Some((os, arch)) if part(os) && part(arch)) {
        out.push(
            path,
            ErrorKind::Invalid(format!(
                "platform \"{p}\" must be GOOS-GOARCH, e.g. linux-arm64"
            )),
        );
    }
}

/// Machines fetch the buildlet over HTTPS only.
fn https_url(out: &mut Issues, path: FieldPath, url: &str) {
    let host = url
        .strip_prefix("https://")
        .map(|r| r.split('/').next().unwrap_or(""));
    if host.is_none_or(str::is_empty) {
        out.push(
            path,
            ErrorKind::Invalid(format!(
                "coordinator URL \"{url}\" must look like https://host:port"
            )),
        );
    }
}

fn owner_error(owner: &str) -> ErrorKind {
    ErrorKind::Invalid(format!(
        "owner \"{owner}\" must be a Kubernetes label value and an EC2 tag value: 1 to 63 of [A-Za-z0-9._-], starting and ending alphanumeric"
    ))
}

/// A Kubernetes label value (non-empty here): at most 63 of `[A-Za-z0-9._-]`, starting
/// and ending with an alphanumeric.
fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name shaped
/// like a label value.
fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            })
    });
    prefix_ok && is_label_value(name)
}

/// A Kubernetes CPU quantity: decimal cores (`2`, `1.5`) or millicores (`500m`), above zero.
fn is_kube_cpu(s: &str) -> bool {
    let digits = s.strip_suffix('m').unwrap_or(s);
    let mut parts = digits.splitn(2, '.');
    let whole = parts.next().unwrap_or("");
    let frac = parts.next();
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let shape_ok = all_digits(whole) && frac.is_none_or(all_digits);
    shape_ok && digits.bytes().any(|b| (b'1'..=b'9').contains(&b))
}

fn builder(out: &mut Issues, path: &FieldPath, b: &Builder, config: &Config) {
    if let Err(reason) = parse_builder_name(&b.name) {
        out.push(
            path.key("name"),
            ErrorKind::BadBuilderName {
                name: b.name.clone(),
                reason,
            },
        );
    }
    if config.host_type(&b.host_type).is_none() {
        out.push(
            path.key("host_type"),
            ErrorKind::UnknownHostType(b.host_type.clone()),
        );
    }
    out.env(path.key("env"), &b.env);
    if let Some(repos) = &b.repos {
        if repos.is_empty() {
            out.push(
                path.key("repos"),
                ErrorKind::Invalid("must not be empty (omit it to build every repo)".into()),
            );
        }
        for (i, r) in repos.iter().enumerate() {
            if config.repo(r).is_none() {
                out.push(
                    path.key("repos").index(i),
                    ErrorKind::UnknownRepo(r.clone()),
                );
            }
        }
    }
    if let Some(branches) = &b.branches {
        if branches.is_empty() {
            out.push(
                path.key("branches"),
                ErrorKind::Invalid(
                    "must not be empty (omit it to build every watched branch)".into(),
                ),
            );
        }
        for (i, br) in branches.iter().enumerate() {
            let watched = config
                .repos
                .iter()
                .filter(|r| b.builds_repo(&r.name))
                .any(|r| r.branches.contains(br));
            if !watched {
                out.push(
                    path.key("branches").index(i),
                    ErrorKind::BranchNotWatched(br.clone()),
                );
            }
        }
    }
    if b.steps.is_empty() {
        out.push(
            path.key("steps"),
            ErrorKind::Invalid("must have at least one step".into()),
        );
    }
    let mut seen = HashMap::new();
    for (i, s) in b.steps.iter().enumerate() {
        let sp = path.key("steps").index(i);
        out.non_empty(sp.key("name"), &s.name);
        out.unique(&mut seen, "step", &s.name, sp.key("name"));
        if s.command.is_empty() {
            out.push(sp.key("command"), ErrorKind::Empty);
        } else if s.command[0].is_empty() {
            out.push(sp.key("command").index(0), ErrorKind::Empty);
        }
        out.env(sp.key("env"), &s.env);
        out.positive_duration(sp.key("timeout"), s.timeout);
    }
    out.positive_duration(path.key("build_timeout"), b.build_timeout);
    out.positive(path.key("test_shards"), b.test_shards);
    for (i, p) in b.artifacts.iter().enumerate() {
        if let Some(msg) = crate::artifacts::pattern_problem(p) {
            out.push(path.key("artifacts").index(i), ErrorKind::Invalid(msg));
        }
    }
    plan(out, path, b);
    toolchains(out, path, b, config);
}

/// Steps' `toolchain` references: the builder and its snapshot step exist, and every repo
/// this builder builds has a Go commit to pair with (built by that builder, or through
/// the repo's `go` pairing).
fn toolchains(out: &mut Issues, path: &FieldPath, b: &Builder, config: &Config) {
    for (i, s) in b.steps.iter().enumerate() {
        let Some(t) = &s.toolchain else { continue };
        let tp = path.key("steps").index(i).key("toolchain");
        if let Some(dir) = &t.dir {
            workdir_path(out, tp.key("dir"), dir);
        }
        if t.builder == b.name {
            out.push(
                tp.key("builder"),
                ErrorKind::Invalid(
                    "names this builder: restore its own step's snapshot with `restore`".into(),
                ),
            );
            continue;
        }
        let Some(producer) = config.builder(&t.builder) else {
            out.push(
                tp.key("builder"),
                ErrorKind::Invalid(format!("unknown builder \"{}\"", t.builder)),
            );
            continue;
        };
        match producer.steps.iter().find(|p| p.name == t.step) {
            None => out.push(
                tp.key("step"),
                ErrorKind::Invalid(format!(
                    "builder \"{}\" has no step \"{}\"",
                    t.builder, t.step
                )),
            ),
            Some(p) if p.snapshot.is_none() => out.push(
                tp.key("step"),
                ErrorKind::Invalid(format!(
                    "step \"{}\" of builder \"{}\" saves no snapshot (give it `snapshot = \"dir\"`)",
                    t.step, t.builder
                )),
            ),
            Some(_) => {}
        }
        for r in config.repos.iter().filter(|r| b.builds_repo(&r.name)) {
            let paired = producer.builds_repo(&r.name)
                || r.go.as_ref().is_some_and(|g| producer.builds_repo(&g.repo));
            if !paired {
                out.push(
                    tp.key("builder"),
                    ErrorKind::Invalid(format!(
                        "builder \"{}\" builds neither repo \"{}\" nor the repo of its `go` pairing: give that repo `go = {{ repo = \"...\", branch = \"...\" }}`",
                        t.builder, r.name
                    )),
                );
            }
        }
    }
}

/// A repo's `go` pairing names another repo and a branch it watches.
fn go_pairing(out: &mut Issues, path: &FieldPath, r: &Repo, config: &Config) {
    let Some(g) = &r.go else { return };
    let gp = path.key("go");
    if g.repo == r.name {
        out.push(
            gp.key("repo"),
            ErrorKind::Invalid("a repo cannot be paired with itself".into()),
        );
        return;
    }
    match config.repo(&g.repo) {
        None => out.push(gp.key("repo"), ErrorKind::UnknownRepo(g.repo.clone())),
        Some(go) if !go.branches.contains(&g.branch) => out.push(
            gp.key("branch"),
            ErrorKind::Invalid(format!(
                "branch \"{}\" is not watched by repo \"{}\"",
                g.branch, g.repo
            )),
        ),
        Some(_) => {}
    }
}

/// The plan fields of a builder's steps: the graph, relative paths, the cache, and
/// `test_shards` only beside a step with units.
fn plan(out: &mut Issues, path: &FieldPath, b: &Builder) {
    let steps = path.key("steps");
    for (i, s) in b.steps.iter().enumerate() {
        let sp = steps.index(i);
        if let Some(dir) = &s.snapshot {
            workdir_path(out, sp.key("snapshot"), dir);
        }
        if !s.only_units.is_empty() && s.units.is_none() {
            out.push(
                sp.key("only_units"),
                ErrorKind::Invalid("is set but the step has no `units` to choose from".into()),
            );
        }
        let mut seen_units = HashMap::new();
        for (k, u) in s.only_units.iter().enumerate() {
            let up = sp.key("only_units").index(k);
            if u.is_empty() || u.starts_with('-') || u.chars().any(char::is_whitespace) {
                out.push(up, ErrorKind::Invalid(format!("{u:?} is not a unit name")));
            } else {
                out.unique(&mut seen_units, "unit", u, up);
            }
        }
        for (k, e) in s.path.iter().enumerate() {
            out.non_empty(sp.key("path").index(k), e);
        }
        if let Some(cache) = &s.cache {
            let cp = sp.key("cache");
            if cache.paths.is_empty() {
                out.push(cp.key("paths"), ErrorKind::Empty);
            }
            for (k, p) in cache.paths.iter().enumerate() {
                workdir_path(out, cp.key("paths").index(k), p);
            }
            for (k, p) in cache.key_files.iter().enumerate() {
                workdir_path(out, cp.key("key_files").index(k), p);
            }
        }
    }
    if b.test_shards > 1 && !b.steps.iter().any(|s| s.units.is_some()) {
        out.push(
            path.key("test_shards"),
            ErrorKind::Invalid(format!(
                "is {} but no step has `units` to split (e.g. units = \"go-packages\")",
                b.test_shards
            )),
        );
    }
    if let Err(errors) = Dag::new(&b.steps) {
        for e in errors {
            let at = match &e {
                DagError::UnknownRequire { step, index, .. }
                | DagError::SelfRequire { step, index }
                | DagError::DuplicateRequire { step, index, .. } => {
                    steps.index(*step).key("requires").index(*index)
                }
                DagError::Cycle { step, .. } => steps.index(*step).key("requires"),
                DagError::UnknownRestore { step, .. }
                | DagError::RestoreNotRequired { step, .. }
                | DagError::RestoreWithoutSnapshot { step, .. } => {
                    steps.index(*step).key("restore")
                }
            };
            out.push(at, ErrorKind::Invalid(e.to_string()));
        }
    }
}

/// A path a step names inside the buildlet's workdir: relative, no `..`, not empty.
fn workdir_path(out: &mut Issues, path: FieldPath, value: &str) {
    let p = Path::new(value);
    let why = if value.is_empty() {
        Some("must not be empty")
    } else if p.is_absolute() {
        Some("must be relative to the buildlet's workdir")
    } else if p.components().any(|c| matches!(c, Component::ParentDir)) {
        Some("must not contain `..`")
    } else {
        None
    };
    if let Some(why) = why {
        out.push(path, ErrorKind::Invalid(format!("{value:?} {why}")));
    }
}

fn repo(out: &mut Issues, path: &FieldPath, r: &Repo) {
    out.name(path.key("name"), &r.name);
    out.non_empty(path.key("url"), &r.url);
    if r.branches.is_empty() {
        out.push(path.key("branches"), ErrorKind::Empty);
    }
    for (i, br) in r.branches.iter().enumerate() {
        out.non_empty(path.key("branches").index(i), br);
    }
    if let Some(s) = &r.webhook_secret {
        out.non_empty(path.key("webhook_secret"), s.expose());
        if r.danger_accept_unsigned_webhooks {
            out.push(
                path.key("danger_accept_unsigned_webhooks"),
                ErrorKind::Invalid(
                    "set together with webhook_secret: a repo with a secret only accepts signed webhooks; remove one of the two".into(),
                ),
            );
        }
    }
    if let Some(a) = &r.artifacts {
        let ap = path.key("artifacts");
        if let Some(msg) = crate::artifacts::make_target_problem(&a.make_target) {
            out.push(ap.key("make_target"), ErrorKind::Invalid(msg));
        }
        if a.outputs.is_empty() {
            out.push(ap.key("outputs"), ErrorKind::Empty);
        }
        for (i, p) in a.outputs.iter().enumerate() {
            if let Some(msg) = crate::artifacts::pattern_problem(p) {
                out.push(ap.key("outputs").index(i), ErrorKind::Invalid(msg));
            }
        }
    }
    if let Some(cs) = &r.commit_status {
        for (field, msg) in crate::notifications::check_commit_status(cs) {
            out.push(
                path.key("commit_status").key(field),
                ErrorKind::Invalid(msg),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPO_BASE: &str = r#"
[[host_types]]
name = "local"
pool = { kind = "local", count = 1 }

[[repos]]
name = "r"
url = "/srv/r"
"#;

    #[test]
    fn unsigned_webhooks_are_an_explicit_opt_in_and_never_beside_a_secret() {
        let c = crate::Config::from_toml_str(REPO_BASE, "c.toml").expect("parses");
        assert!(!c.repos[0].danger_accept_unsigned_webhooks);
        let c = crate::Config::from_toml_str(
            &format!("{REPO_BASE}danger_accept_unsigned_webhooks = true\n"),
            "c.toml",
        )
        .expect("parses");
        assert!(c.repos[0].danger_accept_unsigned_webhooks);
        let errors = crate::Config::from_toml_str(
            &format!("{REPO_BASE}webhook_secret = \"s\"\ndanger_accept_unsigned_webhooks = true\n"),
            "c.toml",
        )
        .expect_err("secret and unsigned opt-in together accepted")
        .to_string();
        assert!(
            errors.contains("c.toml:10:1: repos[0].danger_accept_unsigned_webhooks: set together with webhook_secret"),
            "{errors}"
        );
    }

    #[test]
    fn cloud_pool_fields_are_checked_with_their_paths() {
        let text = r#"
[[host_types]]
name = "k"
[host_types.pool]
kind = "kube"
image = "i"
cpu = "1"
memory = "1 GiB"
max_pods = 1
node_selector = { "bad key!" = "x" }
tolerations = [{ operator = "Sometimes" }, { key = "a", operator = "Exists", value = "v" }]
owner = "-bad-"
platform = "linux"
coordinator_url = "http://c:1"

[[host_types]]
name = "e"
[host_types.pool]
kind = "ec2"
ami = "ami-1"
instance_type = "c5.large"
region = "r"
max_instances = 1
vcpu_quota = 2
vcpus_per_instance = 4
subnet_id = "net-1"
security_group_ids = ["sg-1", "group"]
coordinator_url = "ftp://c"
start_timeout = "0s"
"#;
        let errors = crate::Config::from_toml_str(text, "c.toml")
            .expect_err("bad cloud fields accepted")
            .to_string();
        for needle in [
            "host_types[0].pool.node_selector.bad key!",
            "host_types[0].pool.tolerations[0].operator: operator \"Sometimes\"",
            "host_types[0].pool.tolerations[1].value: must be empty",
            "host_types[0].pool.owner:",
            "host_types[0].pool.platform: platform \"linux\" must be GOOS-GOARCH",
            "host_types[0].pool.coordinator_url:",
            "host_types[1].pool.vcpus_per_instance: one instance needs 4 vCPUs",
            "host_types[1].pool.subnet_id:",
            "host_types[1].pool.security_group_ids[1]:",
            "host_types[1].pool.coordinator_url:",
            "host_types[1].pool.start_timeout:",
        ] {
            assert!(errors.contains(needle), "no {needle:?} in:\n{errors}");
        }
    }

    #[test]
    fn kube_label_keys_and_values() {
        for ok in ["a", "node-pool", "kubernetes.io/arch", "x.y-z/A_b.c", "n1"] {
            assert!(is_label_key(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "/a", "A.B/c", "a/b/", &"x".repeat(64)] {
            assert!(!is_label_key(bad), "{bad}");
        }
        assert!(is_label_value("bf-0123456789"));
        assert!(!is_label_value("has space"));
    }

    #[test]
    fn kube_cpu_quantities() {
        for ok in ["1", "2", "1.5", "500m", "0.5", "0100m"] {
            assert!(is_kube_cpu(ok), "{ok}");
        }
        for bad in ["", "0", "0m", "m", "1.", ".5", "2 cores", "1e3", "-1"] {
            assert!(!is_kube_cpu(bad), "{bad}");
        }
    }
}
