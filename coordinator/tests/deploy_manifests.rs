//! `deploy/`: every Kubernetes manifest parses into its k8s-openapi type and the pieces
//! fit together (names, namespace, mounts, RBAC limited to pods of one namespace); every
//! example config parses with the config crate and its kube pools use the namespace the
//! RBAC covers; `kubectl kustomize` (offline) renders the kustomization; `kubectl apply
//! --dry-run=client` runs too where kubectl can work without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use buildfarm_config::{Config, Pool};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read deploy dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    out.sort();
}

/// Every object of every manifest under deploy/kubernetes, by kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    secrets: Vec<Secret>,
    pvcs: Vec<PersistentVolumeClaim>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    /// (file, kind) of everything, to check namespaces.
    namespaced: Vec<(String, String, Option<String>)>,
}

fn typed<T: serde::de::DeserializeOwned>(doc: Value, file: &Path) -> T {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    serde_json::from_value(doc)
        .unwrap_or_else(|e| panic!("{}: {kind} does not parse as its type: {e}", file.display()))
}

fn load() -> Objects {
    let mut yamls = Vec::new();
    files(&deploy_dir().join("kubernetes"), "yaml", &mut yamls);
    assert!(!yamls.is_empty());
    let mut o = Objects::default();
    for f in yamls {
        if f.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read manifest");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", f.display()));
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let ns = doc["metadata"]["namespace"].as_str().map(str::to_owned);
            o.namespaced
                .push((format!("{kind}/{name}"), kind.clone(), ns));
            match kind.as_str() {
                "Namespace" => o.namespaces.push(typed(doc, &f)),
                "ServiceAccount" => o.service_accounts.push(typed(doc, &f)),
                "Role" => o.roles.push(typed(doc, &f)),
                "RoleBinding" => o.role_bindings.push(typed(doc, &f)),
                "Secret" => o.secrets.push(typed(doc, &f)),
                "PersistentVolumeClaim" => o.pvcs.push(typed(doc, &f)),
                "Deployment" => o.deployments.push(typed(doc, &f)),
                "Service" => o.services.push(typed(doc, &f)),
                other => panic!("{}: unexpected kind {other:?}", f.display()),
            }
        }
    }
    o
}

const NS: &str = "buildfarm";

#[test]
fn manifests_parse_and_fit_together() {
    let o = load();
    assert_eq!(o.namespaces.len(), 1);
    assert_eq!(o.namespaces[0].metadata.name.as_deref(), Some(NS));
    for (what, kind, ns) in &o.namespaced {
        if kind != "Namespace" {
            assert_eq!(ns.as_deref(), Some(NS), "{what} is not in namespace {NS}");
        }
    }

    // RBAC: pods in its own namespace, nothing else.
    assert_eq!(o.roles.len(), 1);
    let role = &o.roles[0];
    for rule in role.rules.iter().flatten() {
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        for v in ["create", "delete", "get", "list", "watch"] {
            assert!(verbs.contains(v), "the role lacks {v}");
        }
        assert!(!verbs.contains("*"));
    }
    let sa = o.service_accounts[0]
        .metadata
        .name
        .clone()
        .expect("sa name");
    let rb = &o.role_bindings[0];
    assert_eq!(rb.role_ref.kind, "Role");
    assert_eq!(Some(&rb.role_ref.name), role.metadata.name.as_ref());
    let subject = &rb.subjects.as_ref().expect("subjects")[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", sa.as_str())
    );
    assert_eq!(subject.namespace.as_deref(), Some(NS));

    // The Deployment: its service account, its volumes exist, its config path is mounted.
    assert_eq!(o.deployments.len(), 1);
    let d = &o.deployments[0];
    let spec = d.spec.as_ref().expect("deployment spec");
    assert_eq!(spec.replicas, Some(1), "one coordinator owns the queue");
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate"),
        "two coordinators never share the data volume"
    );
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(sa.as_str()));
    let secrets: BTreeSet<String> = o
        .secrets
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .chain(["buildfarm-config".to_owned()]) // made by the kustomization's generator
        .collect();
    let pvcs: BTreeSet<String> = o
        .pvcs
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let mut volumes = BTreeMap::new();
    for v in pod.volumes.iter().flatten() {
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().expect("secret name");
            assert!(
                secrets.contains(&name),
                "volume {} uses unknown secret {name}",
                v.name
            );
        }
        if let Some(c) = &v.persistent_volume_claim {
            assert!(
                pvcs.contains(&c.claim_name),
                "unknown claim {}",
                c.claim_name
            );
        }
        volumes.insert(v.name.clone(), v);
    }
    let c = &pod.containers[0];
    let mounts: BTreeMap<&str, &str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            assert!(
                volumes.contains_key(&m.name),
                "mount of unknown volume {}",
                m.name
            );
            (m.mount_path.as_str(), m.name.as_str())
        })
        .collect();
    let args = c.args.clone().unwrap_or_default();
    let config_at = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("--config argument");
    assert!(
        mounts.contains_key(config_at.as_str()),
        "{config_at} is not mounted"
    );

    // The config the kustomization puts there names files that are mounted too.
    let config = Config::from_file(&deploy_dir().join("kubernetes/config/coordinator.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mounted = |p: &Path| mounts.keys().any(|m| p.starts_with(m));
    assert!(
        mounted(&config.coordinator.data_dir),
        "data dir not on a volume"
    );
    for p in [
        config.coordinator.tls_cert.clone(),
        config.coordinator.tls_key.clone(),
        config.coordinator.master_key_file.clone(),
    ]
    .into_iter()
    .flatten()
    {
        assert!(mounted(&p), "{} is not mounted", p.display());
    }
    for key in ["master.key", "tls.crt", "tls.key"] {
        let keys = o.secrets[0].string_data.as_ref().expect("stringData");
        assert!(keys.contains_key(key), "the key Secret lacks {key}");
    }

    // The Service reaches the container's port by name.
    let port_names: BTreeSet<String> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    for p in o.services[0]
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
    {
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) =
            &p.target_port
        {
            assert!(port_names.contains(n), "service targets unknown port {n}");
        }
    }
}

#[test]
fn every_deploy_config_parses_and_kube_pools_use_the_rbac_namespace() {
    let mut tomls = Vec::new();
    files(&deploy_dir(), "toml", &mut tomls);
    let mut kinds = BTreeSet::new();
    for f in &tomls {
        let c = Config::from_file(f).unwrap_or_else(|e| panic!("{}:\n{e}", f.display()));
        for h in &c.host_types {
            kinds.insert(h.pool.kind());
            if let Pool::Kube(k) = &h.pool
                && f.starts_with(deploy_dir().join("kubernetes"))
            {
                assert_eq!(
                    k.namespace,
                    NS,
                    "{}: pods outside the namespace the RBAC covers",
                    f.display()
                );
            }
        }
    }
    for kind in ["local", "reverse", "kube", "ec2", "docker"] {
        assert!(
            kinds.contains(kind),
            "no example config for the {kind} pool"
        );
    }
}

fn kubectl_works() -> bool {
    std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn kubectl_renders_the_kustomization_and_dry_runs_where_it_can() {
    if !kubectl_works() {
        eprintln!("note: kubectl not installed; skipping the kubectl checks");
        return;
    }
    let dir = deploy_dir().join("kubernetes");
    // `kustomize` needs no cluster.
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).expect("rendered YAML");
    let config_secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "buildfarm-config")
        .expect("the generated config Secret");
    assert!(config_secret["data"]["coordinator.toml"].is_string());
    assert_eq!(config_secret["metadata"]["namespace"], NS);

    // `apply --dry-run=client` still asks a server for API discovery; with none (as
    // here) say so rather than fail.
    // A kubeconfig naming a loopback port nothing listens on (port 1): kubectl never
    // reaches anything, whatever else runs on this machine.
    let kubeconfig = tempfile::NamedTempFile::new().expect("temp kubeconfig");
    std::fs::write(
        kubeconfig.path(),
        "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster:\n    server: https://127.0.0.1:1\n\
         contexts:\n- name: none\n  context:\n    cluster: none\n    user: none\nusers:\n- name: none\n  user:\n    token: none\n\
         current-context: none\n",
    )
    .expect("write kubeconfig");
    let out = std::process::Command::new("kubectl")
        .args(["apply", "--dry-run=client", "--validate=false", "-k"])
        .arg(&dir)
        .env("KUBECONFIG", kubeconfig.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("kubectl apply");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("deployment.apps/buildfarm-coordinator"),
            "{stdout}"
        );
    } else if stderr.contains("connection refused")
        || stderr.contains("no configuration has been provided")
        || stderr.contains("couldn't get current server API group list")
    {
        eprintln!(
            "note: kubectl apply --dry-run=client needs a reachable API server for discovery; skipped ({})",
            stderr.lines().last().unwrap_or_default()
        );
    } else {
        panic!("kubectl apply --dry-run=client failed: {stderr}");
    }
}
