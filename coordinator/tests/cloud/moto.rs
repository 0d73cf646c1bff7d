//! A real EC2 API emulator (moto server, from PyPI) on a loopback port per test, the
//! harness that plays EC2's hosts (it boots a local process for every instance moto
//! reports running, from that instance's user-data, at the instance's private address,
//! which the test's VPC puts in 127.0.0.0/8), and a fault proxy that refuses calls the way
//! EC2 does when it is out of capacity.

#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::types::{InstanceAttributeName, InstanceStateName};
use base64::Engine as _;
use tokio::process::{Child, Command};

use super::Machines;

/// Where moto's server is: `BUILDFARM_MOTO_SERVER`, else the venv `.ci/run` makes, else
/// `moto_server` on PATH.
pub fn moto_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BUILDFARM_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let venv = PathBuf::from(home).join(".cache/buildfarm-moto/bin/moto_server");
        if venv.exists() {
            return venv;
        }
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("moto_server"))
        .find(|p| p.exists());
    on_path.unwrap_or_else(|| {
        panic!(
            "moto_server not found: run .ci/run (it installs moto[server] into ~/.cache/buildfarm-moto), \
             `pip install 'moto[server]'`, or set BUILDFARM_MOTO_SERVER"
        )
    })
}

pub struct Moto {
    pub url: String,
    _child: Child,
}

impl Moto {
    pub async fn start() -> Moto {
        let bin = moto_server_bin();
        for _ in 0..5 {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                l.local_addr().expect("addr").port()
            };
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Moto {
                        url: format!("http://127.0.0.1:{port}"),
                        _child: child,
                    };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("moto_server did not start")
    }
}

/// An EC2 client for `url` with static test credentials.
pub fn client(url: &str) -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .http_client(coordinator::pool::ec2::http_client())
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// A VPC subnet on this host's loopback, held for as long as the value lives.
pub struct LoopbackSubnet {
    pub id: String,
    /// A listener on `127.<net>.0.1` that reserves the /16 for this test process: tests
    /// run in parallel processes, each with its own moto, and two VPCs on one /16 would
    /// hand the same instance address to two buildlets. The kernel frees it if the
    /// process dies.
    _reservation: std::net::TcpListener,
}

/// Port of the reservation listener; instances' buildlets use other ports.
const RESERVATION_PORT: u16 = 18450;

/// A VPC and subnet in `127.<net>.0.0/16` for a `net` no other test process holds: moto
/// hands out private addresses from the subnet, so every instance's address is on this
/// host's loopback.
pub async fn loopback_subnet(ec2: &aws_sdk_ec2::Client) -> LoopbackSubnet {
    let (net, reservation) = (60u8..=250)
        .find_map(|net| {
            std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, net, 0, 1), RESERVATION_PORT))
                .ok()
                .map(|l| (net, l))
        })
        .expect("a free 127.N.0.0/16 for the test's VPC");
    let vpc = ec2
        .create_vpc()
        .cidr_block(format!("127.{net}.0.0/16"))
        .send()
        .await
        .expect("create vpc");
    let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).expect("vpc id");
    let subnet = ec2
        .create_subnet()
        .vpc_id(vpc_id)
        .cidr_block(format!("127.{net}.1.0/24"))
        .send()
        .await
        .expect("create subnet");
    let id = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("subnet id")
        .to_owned();
    LoopbackSubnet {
        id,
        _reservation: reservation,
    }
}

/// An AMI moto knows.
pub async fn some_ami(ec2: &aws_sdk_ec2::Client) -> String {
    let images = ec2.describe_images().send().await.expect("describe images");
    images
        .images()
        .iter()
        .filter_map(|i| i.image_id())
        .find(|id| id.starts_with("ami-"))
        .expect("an ami")
        .to_owned()
}

/// Every instance moto knows, with its state.
pub async fn all_instances(ec2: &aws_sdk_ec2::Client) -> Vec<(String, InstanceStateName)> {
    let out = ec2
        .describe_instances()
        .send()
        .await
        .expect("describe instances");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| {
            Some((
                i.instance_id()?.to_owned(),
                i.state().and_then(|s| s.name()).cloned()?,
            ))
        })
        .collect()
}

/// Instances pending or running.
pub async fn live_instances(ec2: &aws_sdk_ec2::Client) -> Vec<String> {
    all_instances(ec2)
        .await
        .into_iter()
        .filter(|(_, s)| matches!(s, InstanceStateName::Pending | InstanceStateName::Running))
        .map(|(id, _)| id)
        .collect()
}

/// Plays EC2's hosts: boots a local process for every running instance (from its
/// user-data, listening on its private address) and kills it when the instance stops
/// running. Stops when dropped.
pub struct Hosts {
    pub machines: Machines,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.task.abort();
        self.machines.kill_all();
    }
}

impl Hosts {
    pub fn start(ec2: aws_sdk_ec2::Client) -> Hosts {
        let machines = Machines::default();
        let m = machines.clone();
        let task = tokio::spawn(async move {
            let mut booted: HashSet<String> = HashSet::new();
            let mut at_ip: std::collections::HashMap<String, String> =
                std::collections::HashMap::new();
            loop {
                if let Ok(out) = ec2.describe_instances().send().await {
                    for i in out.reservations().iter().flat_map(|r| r.instances()) {
                        let (Some(id), Some(state)) =
                            (i.instance_id(), i.state().and_then(|s| s.name()))
                        else {
                            continue;
                        };
                        if *state == InstanceStateName::Running && !booted.contains(id) {
                            let Some(ip) = i.private_ip_address() else {
                                continue;
                            };
                            // Only instances in the test's loopback subnet are played.
                            if !ip.starts_with("127.") {
                                continue;
                            }
                            let attr = ec2
                                .describe_instance_attribute()
                                .instance_id(id)
                                .attribute(InstanceAttributeName::UserData)
                                .send()
                                .await;
                            let Some(data) = attr.ok().and_then(|a| {
                                a.user_data().and_then(|u| u.value()).map(str::to_owned)
                            }) else {
                                continue;
                            };
                            let script = base64::engine::general_purpose::STANDARD
                                .decode(data)
                                .expect("user-data is base64");
                            let script = String::from_utf8(script).expect("user-data is text");
                            // Moto hands a terminated instance's address to the next
                            // one; the old machine (maybe gone from the listing already)
                            // must be dead and its port free before the new one listens.
                            if let Some(old) = at_ip.insert(ip.to_owned(), id.to_owned())
                                && m.kill(&old)
                            {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            m.boot(id, &script, ip);
                            booted.insert(id.to_owned());
                        } else if *state != InstanceStateName::Running && booted.contains(id) {
                            m.kill(id);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Hosts { machines, task }
    }
}

/// A proxy in front of moto that answers the first `refuse` RunInstances calls with
/// `code` (as EC2 does when it has no capacity, or throttles) and forwards everything
/// else.
pub struct FaultProxy {
    pub url: String,
    pub run_instances_calls: Arc<AtomicU32>,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    pub async fn start(upstream: &str, refuse: u32, code: &'static str) -> FaultProxy {
        let calls = Arc::new(AtomicU32::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.to_owned();
        let http = reqwest::Client::new();
        let (c, sn) = (calls.clone(), seen.clone());
        let handler = move |req: axum::extract::Request| {
            let (calls, seen, upstream, http) =
                (c.clone(), sn.clone(), upstream.clone(), http.clone());
            async move {
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, 16 << 20)
                    .await
                    .unwrap_or_default();
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let action = text
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("Action="))
                    .unwrap_or("")
                    .to_owned();
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(action.clone());
                if action == "RunInstances" {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    if n < refuse {
                        let xml = format!(
                            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
                             <Message>We currently do not have sufficient capacity in the Availability Zone you requested.</Message>\
                             </Error></Errors><RequestID>fault-{n}</RequestID></Response>"
                        );
                        return axum::response::Response::builder()
                            .status(if code == "RequestLimitExceeded" {
                                503
                            } else {
                                500
                            })
                            .header("content-type", "text/xml")
                            .body(axum::body::Body::from(xml))
                            .unwrap_or_default();
                    }
                }
                let mut fwd =
                    http.request(parts.method.clone(), format!("{upstream}{}", parts.uri));
                for (k, v) in parts.headers.iter() {
                    if k != "host" && k != "content-length" {
                        fwd = fwd.header(k, v);
                    }
                }
                match fwd.body(bytes).send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        let ct = resp
                            .headers()
                            .get("content-type")
                            .cloned()
                            .unwrap_or(http::HeaderValue::from_static("text/xml"));
                        let body = resp.bytes().await.unwrap_or_default();
                        axum::response::Response::builder()
                            .status(status)
                            .header("content-type", ct)
                            .body(axum::body::Body::from(body))
                            .unwrap_or_default()
                    }
                    Err(_) => axum::response::Response::builder()
                        .status(502)
                        .body(axum::body::Body::empty())
                        .unwrap_or_default(),
                }
            }
        };
        let router = axum::Router::new().fallback(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, router).await.ok();
        });
        FaultProxy {
            url: format!("http://{addr}"),
            run_instances_calls: calls,
            seen,
        }
    }
}
