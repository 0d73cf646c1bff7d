//! The `kind = "docker"` pool table: its optional fields, their defaults, and the errors
//! bad values get.

use std::time::Duration;

use buildfarm_config::{Config, Pool};

fn docker_config(pool: &str) -> Result<Config, Vec<String>> {
    let text = format!(
        "[[host_types]]\nname = \"linux-amd64-docker\"\npool = {{ kind = \"docker\", {pool} }}\n"
    );
    Config::from_toml_str(&text, "farm.toml")
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect())
}

fn docker(c: &Config) -> &buildfarm_config::DockerPool {
    match &c.host_types[0].pool {
        Pool::Docker(d) => d,
        other => panic!("not a docker pool: {other:?}"),
    }
}

#[test]
fn defaults_and_every_field() {
    let c = docker_config(r#"image = "buildfarm/linux-amd64:local", max = 2"#).expect("parses");
    let d = docker(&c);
    assert_eq!(d.engine, None);
    assert_eq!(d.network, None);
    assert_eq!(d.coordinator_url, None);
    assert_eq!(d.max_lifetime, Duration::from_secs(12 * 3600));

    let c = docker_config(
        r#"image = "i", max = 1, network = "bf", engine = "tcp://10.0.0.2:2375",
           coordinator_url = "https://farm.internal:8119", max_lifetime = "90m""#,
    )
    .expect("parses");
    let d = docker(&c);
    assert_eq!(d.engine.as_deref(), Some("tcp://10.0.0.2:2375"));
    assert_eq!(
        d.coordinator_url.as_deref(),
        Some("https://farm.internal:8119")
    );
    assert_eq!(d.max_lifetime, Duration::from_secs(90 * 60));
}

#[test]
fn bad_values_are_each_named() {
    let errors = docker_config(
        r#"image = "", max = 0, network = "", engine = "ssh://box",
           coordinator_url = "http://farm:8119", max_lifetime = "0s""#,
    )
    .expect_err("refused");
    let all = errors.join("\n");
    for needle in [
        "host_types[0].pool.image",
        "host_types[0].pool.max",
        "host_types[0].pool.network",
        "engine \"ssh://box\" must look like unix:///var/run/docker.sock or tcp://host:port",
        "coordinator URL \"http://farm:8119\" must start with https://",
        "host_types[0].pool.max_lifetime",
    ] {
        assert!(
            all.contains(needle),
            "no error mentions {needle:?} in:\n{all}"
        );
    }
    // Every error carries the file and line.
    assert!(errors.iter().all(|e| e.contains("farm.toml:")), "{all}");
    let unknown = docker_config(r#"image = "i", max = 1, registry = "x""#).expect_err("refused");
    assert!(unknown.join("\n").contains("registry"), "{unknown:?}");
}

#[test]
fn an_operator_certificate_needs_an_explicit_coordinator_url() {
    let text = "[coordinator]\ntls_cert = \"/etc/bf/cert.pem\"\ntls_key = \"/etc/bf/key.pem\"\n\n\
                [[host_types]]\nname = \"d\"\npool = { kind = \"docker\", image = \"i\", max = 1 }\n";
    let err = Config::from_toml_str(text, "farm.toml").expect_err("refused");
    let all: Vec<String> = err.errors.iter().map(ToString::to_string).collect();
    assert!(
        all.iter()
            .any(|e| e.contains("host_types[0].pool.coordinator_url") && e.contains("tls_cert")),
        "{all:?}"
    );
    let ok = text.replace(
        "max = 1 }",
        "max = 1, coordinator_url = \"https://farm.example:8119\" }",
    );
    Config::from_toml_str(&ok, "farm.toml").expect("an explicit URL is enough");
}
