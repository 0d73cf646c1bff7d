//! A scripted Kubernetes API server for the pods of one namespace: it answers create,
//! get, list (label and field selectors), watch (chunked JSON lines, replay from a
//! resource version, `410 Gone` for a version it no longer holds, server-side timeout)
//! and delete the way a real API server shapes them, records every request for the test
//! to assert, and lets the test play the kubelet (`set_running`, `set_failed`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// One request the pool made.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Option<Value>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    pods: BTreeMap<String, Value>,
    /// Every event, for watches that resume from a resource version.
    history: Vec<(u64, &'static str, Value)>,
    /// Events older than this were compacted: a watch from before it gets 410.
    compacted_below: u64,
    requests: Vec<Recorded>,
}

#[derive(Clone)]
pub struct KubeApi {
    pub namespace: String,
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<(u64, &'static str, Value)>,
    created: mpsc::UnboundedSender<Value>,
    deleted: mpsc::UnboundedSender<String>,
}

/// What the test side receives: created pods and deleted pod names, in order.
pub struct KubeletFeed {
    pub created: mpsc::UnboundedReceiver<Value>,
    pub deleted: mpsc::UnboundedReceiver<String>,
}

pub struct Running {
    pub api: KubeApi,
    pub addr: SocketAddr,
    pub feed: KubeletFeed,
}

impl KubeApi {
    pub async fn start(namespace: &str) -> Running {
        let (events, _) = broadcast::channel(1024);
        let (ctx, crx) = mpsc::unbounded_channel();
        let (dtx, drx) = mpsc::unbounded_channel();
        let api = KubeApi {
            namespace: namespace.to_owned(),
            store: Arc::new(Mutex::new(Store {
                rv: 1000,
                ..Store::default()
            })),
            events,
            created: ctx,
            deleted: dtx,
        };
        let router = axum::Router::new().fallback(handle).with_state(api.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, router).await.ok();
        });
        Running {
            api,
            addr,
            feed: KubeletFeed {
                created: crx,
                deleted: drx,
            },
        }
    }

    /// A `kube::Client` talking to this server.
    pub fn client(addr: SocketAddr) -> kube::Client {
        let url: http::Uri = format!("http://{addr}").parse().expect("url");
        let mut config = kube::Config::new(url);
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("kube client")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn pods(&self) -> BTreeMap<String, Value> {
        self.lock().pods.clone()
    }

    pub fn pod(&self, name: &str) -> Option<Value> {
        self.lock().pods.get(name).cloned()
    }

    /// Forgets history up to now: older watches get `410 Gone`.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.compacted_below = s.rv + 1;
        s.history.clear();
    }

    fn emit(&self, s: &mut Store, kind: &'static str, pod: Value) {
        s.history.push((s.rv, kind, pod.clone()));
        let _ = self.events.send((s.rv, kind, pod));
    }

    /// Applies `change` to a pod as the kubelet would, bumping its version (MODIFIED).
    pub fn update(&self, name: &str, change: impl FnOnce(&mut Value)) -> bool {
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        let Some(pod) = s.pods.get_mut(name) else {
            return false;
        };
        change(pod);
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let pod = pod.clone();
        self.emit(&mut s, "MODIFIED", pod);
        true
    }

    pub fn set_running(&self, name: &str, ip: &str) -> bool {
        self.update(name, |p| {
            p["status"] = json!({
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{ "ip": ip }],
                "hostIP": "127.0.0.1",
                "startTime": "2026-01-01T00:00:00Z",
                "containerStatuses": [{
                    "name": "buildlet", "image": p["spec"]["containers"][0]["image"], "imageID": "",
                    "ready": true, "restartCount": 0, "started": true,
                    "state": { "running": { "startedAt": "2026-01-01T00:00:00Z" } },
                }],
            });
        })
    }

    /// The kubelet evicted the pod (phase Failed, reason Evicted).
    pub fn evict(&self, name: &str) -> bool {
        self.update(name, |p| {
            p["status"]["phase"] = json!("Failed");
            p["status"]["reason"] = json!("Evicted");
            p["status"]["message"] = json!("The node was low on resource: memory.");
        })
    }

    /// Puts a pod in the store as if another process had made it (e.g. a previous run).
    pub fn insert(&self, mut pod: Value) {
        let mut s = self.lock();
        s.rv += 1;
        let name = pod["metadata"]["name"].as_str().expect("name").to_owned();
        pod["metadata"]["namespace"] = json!(self.namespace);
        pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        pod["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        s.pods.insert(name, pod.clone());
        self.emit(&mut s, "ADDED", pod);
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

/// Equality-based selectors (`a=b,c=d`) against a map, as the API server evaluates them.
fn selector_matches(selector: Option<&String>, values: &dyn Fn(&str) -> Option<String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => values(k.trim_end_matches('=')).as_deref() == Some(v),
        None => false,
    })
}

fn matches(pod: &Value, q: &BTreeMap<String, String>) -> bool {
    let labels = |k: &str| pod["metadata"]["labels"][k].as_str().map(str::to_owned);
    let fields = |k: &str| match k {
        "metadata.name" => pod["metadata"]["name"].as_str().map(str::to_owned),
        "metadata.namespace" => pod["metadata"]["namespace"].as_str().map(str::to_owned),
        "status.phase" => pod["status"]["phase"].as_str().map(str::to_owned),
        _ => None,
    };
    selector_matches(q.get("labelSelector"), &labels)
        && selector_matches(q.get("fieldSelector"), &fields)
}

async fn handle(
    State(api): State<KubeApi>,
    Query(query): Query<BTreeMap<String, String>>,
    req: Request,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let bytes = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let body: Option<Value> = if bytes.is_empty() {
        None
    } else {
        serde_json::from_slice(&bytes).ok()
    };
    api.lock().requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
    });
    let prefix = format!("/api/v1/namespaces/{}/pods", api.namespace);
    let Some(rest) = path.strip_prefix(&prefix) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    let name = rest.strip_prefix('/').filter(|n| !n.is_empty());
    match (&method, name) {
        (&Method::POST, None) => create(&api, body),
        (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(&api, &query)
        }
        (&Method::GET, None) => {
            let s = api.lock();
            let items: Vec<&Value> = s.pods.values().filter(|p| matches(p, &query)).collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "kind": "PodList", "apiVersion": "v1",
                    "metadata": { "resourceVersion": s.rv.to_string() },
                    "items": items,
                }),
            )
        }
        (&Method::GET, Some(n)) => match api.pod(n) {
            Some(p) => json_response(StatusCode::OK, &p),
            None => status(404, "NotFound", &format!("pods \"{n}\" not found")),
        },
        (&Method::DELETE, Some(n)) => delete(&api, n),
        _ => status(405, "MethodNotAllowed", "not scripted"),
    }
}

fn create(api: &KubeApi, body: Option<Value>) -> Response {
    let Some(mut pod) = body else {
        return status(400, "BadRequest", "no body");
    };
    if pod["kind"] != "Pod" || pod["apiVersion"] != "v1" {
        return status(400, "BadRequest", "not a v1 Pod");
    }
    let Some(name) = pod["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(422, "Invalid", "metadata.name: Required value");
    };
    let mut s = api.lock();
    if s.pods.contains_key(&name) {
        return status(
            409,
            "AlreadyExists",
            &format!("pods \"{name}\" already exists"),
        );
    }
    s.rv += 1;
    pod["metadata"]["namespace"] = json!(api.namespace);
    pod["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
    pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    pod["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    pod["status"] = json!({ "phase": "Pending", "qosClass": "Guaranteed" });
    s.pods.insert(name, pod.clone());
    api.emit(&mut s, "ADDED", pod.clone());
    drop(s);
    let _ = api.created.send(pod.clone());
    json_response(StatusCode::CREATED, &pod)
}

fn delete(api: &KubeApi, name: &str) -> Response {
    let mut s = api.lock();
    let Some(mut pod) = s.pods.remove(name) else {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    // Graceful deletion: first marked, then gone once the kubelet stopped it (here at
    // once: the test's kubelet kills the process when it hears of the deletion).
    s.rv += 1;
    pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:05Z");
    pod["metadata"]["deletionGracePeriodSeconds"] = json!(5);
    pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    api.emit(&mut s, "MODIFIED", pod.clone());
    s.rv += 1;
    pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    api.emit(&mut s, "DELETED", pod.clone());
    drop(s);
    let _ = api.deleted.send(name.to_owned());
    json_response(StatusCode::OK, &pod)
}

fn watch(api: &KubeApi, q: &BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Subscribe before reading history so no event falls between the two.
    let mut live = api.events.subscribe();
    let (backlog, gone, current) = {
        let s = api.lock();
        let gone = from != 0 && from < s.compacted_below;
        let backlog: Vec<(u64, &'static str, Value)> = if from == 0 {
            // "0": start with the current state as ADDED events, as the server does.
            s.pods
                .values()
                .map(|p| (s.rv, "ADDED", p.clone()))
                .collect()
        } else {
            s.history
                .iter()
                .filter(|(rv, _, _)| *rv > from)
                .cloned()
                .collect()
        };
        (backlog, gone, s.rv)
    };
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290),
    );
    let q = q.clone();
    let stream = async_stream::stream! {
        if gone {
            let e = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410,
            }});
            yield Ok::<_, Infallible>(format!("{e}\n"));
            return;
        }
        let mut last = from;
        for (rv, kind, pod) in backlog {
            if matches(&pod, &q) {
                last = last.max(rv);
                yield Ok(format!("{}\n", json!({"type": kind, "object": pod})));
            }
        }
        last = last.max(current);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                ev = live.recv() => match ev {
                    Ok((rv, kind, pod)) => {
                        if rv > last && matches(&pod, &q) {
                            last = rv;
                            yield Ok(format!("{}\n", json!({"type": kind, "object": pod})));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
            }
        }
    };
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| status(500, "InternalError", "response"))
}
