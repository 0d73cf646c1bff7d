//! Parsing config files: the example configs, defaults, and the exact text of errors for
//! malformed files (file, line, column, field path).

use std::path::{Path, PathBuf};
use std::time::Duration;

use buildfarm_config::{Config, ErrorKind, LoadError, Pool, SandboxMode};

const FULL: &str = include_str!("../examples/full.toml");

fn errors(text: &str) -> Vec<String> {
    match Config::from_toml_str(text, "coordinator.toml") {
        Ok(c) => panic!("expected errors, parsed {c:?}"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

fn assert_has(errors: &[String], needle: &str) {
    assert!(
        errors.iter().any(|e| e.contains(needle)),
        "no error contains {needle:?} in:\n{}",
        errors.join("\n")
    );
}

/// A valid config that tests break one piece at a time; line numbers matter.
const BASE: &str = r#"[[host_types]]
name = "local"
pool = { kind = "local", count = 2 }

[[repos]]
name = "example"
url = "/srv/example"

[[builders]]
name = "linux-amd64"
host_type = "local"
steps = [{ name = "test", command = ["go", "test", "./..."] }]
"#;

#[test]
fn full_example_parses_with_every_pool_kind() {
    let c = Config::from_toml_str(FULL, "full.toml").unwrap();
    let kinds: Vec<&str> = c.host_types.iter().map(|h| h.pool.kind()).collect();
    assert_eq!(kinds, ["local", "reverse", "kube", "ec2", "docker"]);
    assert_eq!(c.coordinator.max_attempts, 4);
    assert_eq!(c.coordinator.source_cache_bytes.as_u64(), 5 << 30);
    assert_eq!(c.connections.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.connections.max_connections, Some(50000));
    assert_eq!(c.connections.max_header_bytes.as_u64(), 32 * 1024);
    assert_eq!(c.coordinator.repo_poll_interval, Duration::from_secs(30));
    assert_eq!(
        c.coordinator.store_url(),
        "postgres://buildfarm@db.internal/buildfarm"
    );
    let Pool::Kube(kube) = &c.host_type("linux-amd64-kube").unwrap().pool else {
        panic!("kube pool expected");
    };
    assert_eq!(kube.memory.as_u64(), 8 * 1024 * 1024 * 1024);
    let Pool::Ec2(ec2) = &c.host_type("linux-arm64-ec2").unwrap().pool else {
        panic!("ec2 pool expected");
    };
    assert_eq!(ec2.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
    let b = c.builder("linux-amd64").unwrap();
    assert_eq!(b.test_shards, 4);
    assert_eq!(b.build_timeout, Duration::from_secs(90 * 60));
    assert_eq!(b.steps[0].timeout, Duration::from_secs(600));
    assert_eq!(b.steps[1].timeout, Duration::from_secs(1200), "default");
    assert!(!c.builder("linux-amd64-race").unwrap().try_bot);
    assert_eq!(c.repo("tools").unwrap().branches, ["main"], "default");
    assert_eq!(
        c.repo("go")
            .unwrap()
            .webhook_secret
            .as_ref()
            .unwrap()
            .expose(),
        "s3cret"
    );
}

#[test]
fn section_by_section_parse_agrees_with_whole_document_serde() {
    // parse.rs deserializes sections one at a time; it must mean the same as the derive.
    let whole: Config = toml::from_str(FULL).unwrap();
    assert_eq!(Config::from_toml_str(FULL, "full.toml").unwrap(), whole);
}

#[test]
fn omitted_fields_take_their_documented_defaults() {
    let c = Config::from_toml_str(BASE, "base.toml").unwrap();
    let co = &c.coordinator;
    assert_eq!(co.listen.to_string(), "127.0.0.1:8119");
    assert_eq!(co.data_dir, Path::new("./.buildfarm"));
    assert_eq!(co.store_url(), "sqlite://./.buildfarm/buildfarm.db");
    assert_eq!(co.master_key_path(), Path::new("./.buildfarm/master.key"));
    assert_eq!(co.tls_paths().0, Path::new("./.buildfarm/tls/cert.pem"));
    assert_eq!(co.repo_poll_interval, Duration::from_secs(10));
    assert_eq!(co.max_attempts, 3);
    assert_eq!(co.gomote_idle_timeout, Duration::from_secs(30 * 60));
    assert_eq!(co.source_cache_bytes.as_u64(), 2 << 30);
    let b = &c.builders[0];
    assert!(b.try_bot);
    assert_eq!((b.repos.as_ref(), b.branches.as_ref()), (None, None));
    assert_eq!(b.build_timeout, Duration::from_secs(3600));
    assert_eq!(b.test_shards, 1);
    assert_eq!(c.repos[0].branches, ["main"]);
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_example_and_deploy_config_parses() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    toml_files(&crate_dir.join("examples"), &mut files);
    toml_files(&crate_dir.join("../../deploy"), &mut files);
    let mut parsed = Vec::new();
    for f in &files {
        // deploy/ may hold other TOML (e.g. tool settings); only coordinator configs are ours.
        let text = std::fs::read_to_string(f).unwrap();
        let is_config = ["[coordinator]", "[[host_types]]", "[[builders]]"]
            .iter()
            .any(|s| text.contains(s));
        if is_config {
            Config::from_file(f).unwrap_or_else(|e| panic!("{}:\n{e}", f.display()));
            parsed.push(f.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        parsed.contains(&"full.toml".to_owned()),
        "parsed {parsed:?}"
    );
}

#[test]
fn syntax_error_names_line_and_column() {
    let text = BASE.replace("count = 2", "count = ");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("coordinator.toml:3:"), "{e:?}");
}

#[test]
fn several_syntax_errors_are_reported_together() {
    let e = errors("a = \nb = = 1\n[x\n");
    assert!(e.len() >= 2, "{e:?}");
    assert_has(&e, "coordinator.toml:1:");
    assert_has(&e, "coordinator.toml:2:");
}

#[test]
fn unknown_field_names_its_line_and_path() {
    let text = BASE.replace("url = ", "uri = ");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_has(
        &e,
        "coordinator.toml:7:1: repos[0].uri: unknown field `uri`",
    );
}

#[test]
fn unknown_top_level_section_is_refused() {
    let text = format!("{BASE}\n[coordinater]\nlisten = \"127.0.0.1:1\"\n");
    assert_has(
        &errors(&text),
        "coordinator.toml:14:2: coordinater: unknown section `coordinater`",
    );
}

#[test]
fn unknown_host_type_reference_names_line_and_field() {
    let text = BASE.replace("host_type = \"local\"", "host_type = \"linux-arm\"");
    assert_eq!(
        errors(&text),
        ["coordinator.toml:11:1: builders[0].host_type: unknown host type \"linux-arm\""]
    );
}

#[test]
fn bad_builder_names_say_which_part_is_wrong() {
    for (name, why) in [
        ("linux", "expected GOOS-GOARCH[-suffix]"),
        ("linus-amd64", "unknown GOOS \"linus\""),
        ("linux-x86_64", "unknown GOARCH \"x86_64\""),
        ("linux-amd64-Race", "suffix \"Race\" must match [a-z0-9-]+"),
    ] {
        let text = BASE.replace("\"linux-amd64\"", &format!("\"{name}\""));
        assert_eq!(
            errors(&text),
            [format!(
                "coordinator.toml:10:1: builders[0].name: bad builder name \"{name}\": {why}"
            )]
        );
    }
}

#[test]
fn duplicate_names_point_at_the_second_and_name_the_first() {
    let text = format!(
        "{BASE}\n[[host_types]]\nname = \"local\"\npool = {{ kind = \"reverse\", expected = 1 }}\n\
         \n[[builders]]\nname = \"linux-amd64\"\nhost_type = \"local\"\nsteps = [{{ name = \"a\", command = [\"true\"] }}, {{ name = \"a\", command = [\"true\"] }}]\n"
    );
    let e = errors(&text);
    assert_has(
        &e,
        "coordinator.toml:15:1: host_types[1].name: duplicate host type name \"local\" (first defined at host_types[0].name)",
    );
    assert_has(
        &e,
        "coordinator.toml:19:1: builders[1].name: duplicate builder name \"linux-amd64\" (first defined at builders[0].name)",
    );
    assert_has(&e, "builders[1].steps[1].name: duplicate step name \"a\"");
}

#[test]
fn zero_counts_are_refused() {
    let text = BASE
        .replace("count = 2", "count = 0")
        .replace("steps = [", "test_shards = 0\nsteps = [");
    let e = errors(&text);
    assert_eq!(
        e,
        [
            "coordinator.toml:3:26: host_types[0].pool.count: must be at least 1",
            "coordinator.toml:12:1: builders[0].test_shards: must be at least 1",
        ]
    );
}

#[test]
fn zero_counts_in_every_pool_kind_are_refused() {
    let text = FULL
        .replace("expected = 3", "expected = 0")
        .replace("max_pods = 50", "max_pods = 0")
        .replace("vcpu_quota = 80", "vcpu_quota = 0")
        .replace("max = 4", "max = 0");
    let e = errors(&text);
    for field in [
        "host_types[1].pool.expected",
        "host_types[2].pool.max_pods",
        "host_types[3].pool.vcpu_quota",
        "host_types[4].pool.max",
    ] {
        assert_has(&e, &format!("{field}: must be at least 1"));
    }
    assert_eq!(e.len(), 4, "{e:?}");
}

#[test]
fn missing_required_fields_are_named() {
    let text = BASE.replace("url = \"/srv/example\"\n", "");
    assert_eq!(
        errors(&text),
        ["coordinator.toml:5:1: repos[0]: missing field `url`"]
    );
    let text = BASE.replace(
        "pool = { kind = \"local\", count = 2 }",
        "pool = { kind = \"local\" }",
    );
    assert_eq!(
        errors(&text),
        ["coordinator.toml:3:8: host_types[0].pool: missing field `count`"]
    );
}

#[test]
fn type_errors_in_several_entries_are_reported_together() {
    let text = format!(
        "{BASE}\n[[builders]]\nname = 3\nhost_type = \"local\"\nsteps = []\n\n[[repos]]\nname = \"x\"\nurl = \"y\"\nbranches = \"main\"\n"
    );
    let e = errors(&text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_has(
        &e,
        "coordinator.toml:15:8: builders[1].name: invalid type: integer `3`",
    );
    assert_has(
        &e,
        "coordinator.toml:22:12: repos[1].branches: invalid type: string \"main\"",
    );
}

#[test]
fn nested_value_errors_point_into_sub_tables() {
    let text = format!(
        "{BASE}\n[[builders]]\nname = \"linux-386\"\nhost_type = \"local\"\n[[builders.steps]]\nname = \"t\"\ncommand = [\"go\"]\ntimeout = \"5 parsecs\"\n"
    );
    assert_has(
        &errors(&text),
        "coordinator.toml:20:11: builders[1].steps[0].timeout: invalid value: string \"5 parsecs\", expected a duration",
    );
}

#[test]
fn semantic_errors_are_all_reported_at_once_in_file_order() {
    let text = r#"[coordinator]
max_attempts = 0
tls_cert = "/c.pem"

[[host_types]]
name = "kube"
[host_types.pool]
kind = "kube"
image = ""
cpu = "lots"
memory = "1 GiB"
max_pods = 2

[[builders]]
name = "plan9-arm-"
host_type = "nope"
repos = ["ghost"]
branches = ["dev"]
steps = [{ name = "x", command = [] }]

[[repos]]
name = "bad name"
url = "u"
branches = []
"#;
    let e = errors(text);
    assert_eq!(
        e,
        [
            "coordinator.toml:2:1: coordinator.max_attempts: must be at least 1",
            "coordinator.toml:3:1: coordinator.tls_cert: tls_cert is set without tls_key",
            "coordinator.toml:9:1: host_types[0].pool.image: must not be empty",
            "coordinator.toml:10:1: host_types[0].pool.cpu: cpu \"lots\" must be a positive quantity like \"2\", \"1.5\" or \"500m\"",
            "coordinator.toml:15:1: builders[0].name: bad builder name \"plan9-arm-\": suffix \"\" must match [a-z0-9-]+",
            "coordinator.toml:16:1: builders[0].host_type: unknown host type \"nope\"",
            "coordinator.toml:17:10: builders[0].repos[0]: unknown repo \"ghost\"",
            "coordinator.toml:18:13: builders[0].branches[0]: branch \"dev\" is not watched by any of the builder's repos",
            "coordinator.toml:19:24: builders[0].steps[0].command: must not be empty",
            "coordinator.toml:22:1: repos[0].name: name \"bad name\" must match [A-Za-z0-9._-]+",
            "coordinator.toml:24:1: repos[0].branches: must not be empty",
        ]
    );
}

#[test]
fn errors_carry_typed_kinds() {
    let text = BASE.replace("host_type = \"local\"", "host_type = \"gone\"");
    let err = Config::from_toml_str(&text, "c.toml").unwrap_err();
    assert_eq!(
        err.errors[0].kind,
        ErrorKind::UnknownHostType("gone".into())
    );
    assert_eq!(err.errors[0].location.map(|l| l.line), Some(11));
}

#[test]
fn from_file_names_the_file_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BASE.replace("count = 2", "count = 0")).unwrap();
    let err = Config::from_file(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:3:26: ", path.display())),
        "{err}"
    );
    let missing = dir.path().join("missing.toml");
    match Config::from_file(&missing) {
        Err(LoadError::Read { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected read error, got {other:?}"),
    }
}

#[test]
fn webhook_secrets_do_not_show_in_debug_output() {
    let c = Config::from_toml_str(FULL, "full.toml").unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cret"));
    assert!(debug.contains("<redacted>"));
}

#[test]
fn sandbox_defaults_to_auto_with_derived_root_and_uids() {
    let c = Config::from_toml_str(BASE, "base.toml").unwrap();
    assert_eq!(c.sandbox.mode, SandboxMode::Auto);
    assert_eq!(c.sandbox.workdir_root, None);
    assert_eq!(c.sandbox.uid_base, None);
    assert!(c.sandbox.writable_paths.is_empty());
    let full = Config::from_toml_str(FULL, "full.toml").unwrap();
    assert_eq!(full.sandbox.mode, SandboxMode::Bwrap);
    assert_eq!(full.sandbox.uid_base, Some(2_000_000));
}

#[test]
fn sandbox_paths_inside_the_data_dir_and_bad_values_are_refused() {
    let text = format!(
        "{BASE}\n[sandbox]\nmode = \"bwrap\"\nworkdir_root = \"/srv/bf/./work\"\nuid_base = 0\nwritable_paths = [\"cache\", \"/srv/bf/gocache\"]\n"
    )
    .replace("[[repos]]", "[coordinator]\ndata_dir = \"/srv/bf\"\n\n[[repos]]");
    let e = errors(&text);
    assert_has(
        &e,
        "sandbox.workdir_root: workdir root /srv/bf/work must be outside the data dir /srv/bf",
    );
    assert_has(&e, "sandbox.uid_base: uid_base 0 must be at least 1000");
    assert_has(
        &e,
        "sandbox.writable_paths[0]: cache must be an absolute path",
    );
    assert_has(
        &e,
        "sandbox.writable_paths[1]: /srv/bf/gocache must not be inside the data dir /srv/bf",
    );
    let e = errors(&format!("{BASE}\n[sandbox]\nmode = \"docker\"\n"));
    assert_has(&e, "unknown variant `docker`");
}

#[test]
fn a_data_dir_inside_the_workdir_root_is_refused_too() {
    let text = format!("{BASE}\n[sandbox]\nworkdir_root = \"/srv\"\n").replace(
        "[[repos]]",
        "[coordinator]\ndata_dir = \"/srv/bf\"\n\n[[repos]]",
    );
    assert_has(
        &errors(&text),
        "sandbox.workdir_root: workdir root /srv must be outside the data dir /srv/bf",
    );
}

#[test]
fn bad_notifications_and_commit_statuses_are_named() {
    let text = BASE.replace(
        "url = \"/srv/example\"",
        "url = \"/srv/example\"\ncommit_status = { api_url = \"api.github.com\", repo = \"golang\", token = \" \", target_url = \"ftp://x\" }",
    ) + "\n[[notifications]]\nurl = \"hooks.example.com\"\nsecret = \"\"\nrepos = [\"example\", \"nope\"]\n\n[[notifications]]\nurl = \"https://chat\"\nkind = \"irc\"\n";
    let e = errors(&text);
    assert_has(&e, "unknown variant `irc`");
    // Structural errors come first; the semantic ones show once the file parses.
    let e = errors(&text.replace("kind = \"irc\"", "kind = \"chat\"\non = \"always\""));
    assert_has(&e, "unknown variant `always`");
    let e = errors(&text.replace("kind = \"irc\"", "kind = \"chat\""));
    assert_has(
        &e,
        "repos[0].commit_status.api_url: \"api.github.com\" is not an http:// or https:// URL",
    );
    assert_has(
        &e,
        "repos[0].commit_status.repo: \"golang\" is not `owner/name`",
    );
    assert_has(&e, "repos[0].commit_status.token: the token is empty");
    assert_has(&e, "repos[0].commit_status.target_url");
    assert_has(&e, "notifications[0].url: \"hooks.example.com\" is not");
    assert_has(&e, "notifications[0].secret: an empty secret signs nothing");
    assert_has(
        &e,
        "notifications[0].repos: no repo named \"nope\" in [[repos]]",
    );
    let ok = Config::from_toml_str(
        &(BASE.to_owned() + "\n[[notifications]]\nurl = \"https://hooks.example.com/x\"\n"),
        "coordinator.toml",
    )
    .expect("a minimal notification parses");
    let n = &ok.notifications[0];
    assert_eq!(n.on, buildfarm_config::NotifyOn::Changes);
    assert_eq!(n.kind, buildfarm_config::NotificationKind::Webhook);
    assert!(n.try_runs && n.repos.is_empty() && n.secret.is_none());
}
