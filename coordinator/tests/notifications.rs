//! Notifications and commit statuses end to end: a real coordinator building a real Go
//! module, sending to receivers that run in this test on loopback (one of them down for
//! a while), which check signatures, bodies and how often each event arrives.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// One request a receiver got, and whether it accepted it.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    headers: HeaderMap,
    body: Value,
    accepted: bool,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    /// Paths answered 503 while listed here.
    down: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let r = Receiver::default();
        let app = axum::Router::new()
            .fallback(axum::routing::post(receive))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (r, addr)
    }

    fn at(&self, path: &str) -> Vec<Got> {
        self.got
            .lock()
            .expect("got")
            .iter()
            .filter(|g| g.path == path)
            .cloned()
            .collect()
    }

    fn accepted(&self, path: &str) -> Vec<Got> {
        self.at(path).into_iter().filter(|g| g.accepted).collect()
    }

    fn set_down(&self, path: &str, down: bool) {
        let mut d = self.down.lock().expect("down");
        d.retain(|p| p != path);
        if down {
            d.push(path.to_owned());
        }
    }
}

async fn receive(
    State(r): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let path = uri.path().to_owned();
    let accepted = !r.down.lock().expect("down").contains(&path);
    // Signed receivers check the signature over the bytes, as a real one would.
    if let Some(sig) = headers.get("x-buildfarm-signature-256") {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"s3cret").expect("hmac");
        mac.update(&body);
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            sig.to_str().expect("ascii"),
            want,
            "bad signature on {path}"
        );
    }
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    r.got.lock().expect("got").push(Got {
        path,
        headers,
        body,
        accepted,
    });
    if accepted {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn config(data: &Path, repo: &Path, recv: SocketAddr) -> String {
    let host_builder = match std::env::consts::ARCH {
        "aarch64" => "linux-arm64",
        _ => "linux-amd64",
    };
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 1 }}
env = {{ GOCACHE = "{gocache}", GOFLAGS = "-mod=mod" }}

[[builders]]
name = "{host_builder}"
host_type = "local"
steps = [{{ name = "test", command = ["go", "test", "./..."] }}]

[[repos]]
name = "t"
url = "{repo}"
branches = ["main"]
commit_status = {{ api_url = "http://{recv}/api", repo = "acme/t", token = "tok", target_url = "https://farm.example" }}

[[notifications]]
url = "http://{recv}/hook"
secret = "s3cret"
repos = ["t"]

[[notifications]]
url = "http://{recv}/chat"
kind = "chat"
on = "every"
try_runs = false
"#,
        data = data.display(),
        gocache = data.join("gocache").display(),
        repo = repo.display(),
    )
}

fn header(g: &Got, name: &str) -> String {
    g.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn results_reach_webhooks_chat_and_commit_statuses_once_even_after_a_receiver_was_down() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let repo = tmp.path().join("repo");
    let rev1 = make_go_repo(&repo);
    let (recv, addr) = Receiver::start().await;
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data, &repo, addr)).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    let builder = match std::env::consts::ARCH {
        "aarch64" => "linux-arm64",
        _ => "linux-amd64",
    };

    // The first commit passes: the chat room (every result) hears it, the webhook (only
    // changes) does not, and the forge gets pending then success.
    let status_path = format!("/api/repos/acme/t/statuses/{rev1}");
    eventually("a success status for the first commit", || {
        recv.accepted(&status_path)
            .iter()
            .any(|g| g.body["state"] == "success")
            .then_some(())
    })
    .await;
    let statuses = recv.accepted(&status_path);
    assert_eq!(statuses[0].body["state"], "pending", "{statuses:#?}");
    let success = statuses.last().expect("status");
    assert_eq!(success.body["context"], format!("buildfarm/{builder}"));
    assert!(
        success.body["target_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://farm.example/log/")),
        "{success:#?}"
    );
    assert_eq!(header(success, "authorization"), "Bearer tok");
    let chat = eventually("the chat message for the first commit", || {
        recv.accepted("/chat").into_iter().next()
    })
    .await;
    let text = chat.body["text"].as_str().expect("text").to_owned();
    assert!(
        text.starts_with(&format!("{builder} on t/main at {}: ok", &rev1[..12])),
        "{text}"
    );

    // The webhook receiver goes down; a commit breaks the test. The failure is retried
    // until the receiver is back, then delivered once.
    recv.set_down("/hook", true);
    std::fs::write(
        repo.join("hello.go"),
        "package t\n\n// Hello greets.\nfunc Hello() string { return \"bye\" }\n",
    )
    .expect("write");
    git(&repo, &["commit", "--quiet", "-am", "break the test"]);
    let rev2 = git(&repo, &["rev-parse", "HEAD"]);
    eventually("two refused tries of the failure event", || {
        (recv.at("/hook").len() >= 2).then_some(())
    })
    .await;
    assert!(recv.accepted("/hook").is_empty());
    recv.set_down("/hook", false);
    let delivered = eventually("the failure event delivered", || {
        recv.accepted("/hook").into_iter().next()
    })
    .await;
    let ev = &delivered.body;
    assert_eq!(ev["type"], "build", "{ev:#}");
    assert_eq!(ev["rev"], rev2.as_str());
    assert_eq!(ev["state"], "failed");
    assert_eq!(ev["previous_state"], "ok");
    assert_eq!(header(&delivered, "x-buildfarm-event"), "build");
    assert!(
        !header(&delivered, "x-buildfarm-signature-256").is_empty(),
        "signed"
    );
    let id = header(&delivered, "x-buildfarm-delivery");
    assert!(
        recv.at("/hook")
            .iter()
            .all(|g| header(g, "x-buildfarm-delivery") == id),
        "every try of one event carries one delivery id"
    );
    let failure = eventually("a failure status for the second commit", || {
        recv.accepted(&format!("/api/repos/acme/t/statuses/{rev2}"))
            .into_iter()
            .find(|g| g.body["state"] == "failure")
    })
    .await;
    assert_eq!(failure.body["context"], format!("buildfarm/{builder}"));

    // A try run's verdict goes to the webhook (try_runs defaults to true), once, and
    // not to the chat room (try_runs = false).
    let out = farm
        .gomote()
        .args(["try", "t", &rev1, "--builders", builder])
        .output()
        .expect("gomote try");
    assert!(out.status.success(), "{out:?}");
    let try_event = eventually("the try verdict", || {
        recv.accepted("/hook")
            .into_iter()
            .find(|g| g.body["type"] == "try")
    })
    .await;
    assert_eq!(try_event.body["verdict"], "ok");
    assert_eq!(try_event.body["builders"][0]["builder"], builder);

    // Let any duplicate arrive before counting.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let hook = recv.accepted("/hook");
    assert_eq!(hook.len(), 2, "one failure, one verdict: {hook:#?}");
    assert!(
        recv.accepted("/chat").iter().all(|g| g.body["text"]
            .as_str()
            .is_some_and(|t| !t.starts_with("try run"))),
        "the chat room asked for no try runs"
    );
    assert_eq!(
        recv.accepted("/chat").len(),
        2,
        "one message per post-submit result: {:#?}",
        recv.accepted("/chat")
    );
    farm.kill().await;
}
