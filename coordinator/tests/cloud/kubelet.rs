//! The test's kubelet for the scripted API server: runs each created pod's command as a
//! local process on a loopback address of its own, reports the pod Running, kills the
//! process when the pod is deleted, and reports the pod Failed when its process exits by
//! itself (as `restartPolicy: Never` does).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::json;

use super::Machines;
use super::kube_api::{KubeApi, KubeletFeed};

/// How the test kubelet treats a new pod.
#[derive(Clone, Copy)]
pub enum Kubelet {
    /// Runs the pod's command and reports it Running.
    Run,
    /// Reports the image cannot be pulled.
    PullFails,
}

/// Where each pod's buildlet listens: its own 127.x address (`net` distinct per test).
static NEXT_IP: AtomicU32 = AtomicU32::new(1);

pub fn next_ip(net: u8) -> String {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    format!("127.{net}.{}.{}", n / 250, n % 250 + 1)
}

/// Plays the kubelet until the feed closes.
pub fn kubelet(api: KubeApi, mut feed: KubeletFeed, machines: Machines, mode: Kubelet, net: u8) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                Some(pod) = feed.created.recv() => {
                    let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                    match mode {
                        Kubelet::Run => {
                            let c = &pod["spec"]["containers"][0];
                            assert_eq!(c["command"][0], "/bin/sh");
                            let script = c["command"][2].as_str().expect("script");
                            let ip = next_ip(net);
                            machines.boot(&name, script, &ip);
                            api.set_running(&name, &ip);
                        }
                        Kubelet::PullFails => {
                            api.update(&name, |p| {
                                p["status"]["containerStatuses"] = json!([{
                                    "name": "buildlet", "image": "x", "imageID": "", "ready": false,
                                    "restartCount": 0,
                                    "state": { "waiting": {
                                        "reason": "ImagePullBackOff",
                                        "message": "Back-off pulling image",
                                    }},
                                }]);
                            });
                        }
                    }
                }
                Some(name) = feed.deleted.recv() => { machines.kill(&name); }
                _ = tick.tick() => {
                    for (name, code) in machines.reap() {
                        api.update(&name, |p| {
                            p["status"]["phase"] = json!("Failed");
                            p["status"]["containerStatuses"][0]["state"] = json!({
                                "terminated": { "exitCode": code, "reason": "Error" },
                            });
                        });
                    }
                }
                else => return,
            }
        }
    });
}
