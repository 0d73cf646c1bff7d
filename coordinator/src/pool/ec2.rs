//! The EC2 pool: one instance per lease. RunInstances with the host type's AMI,
//! instance type, subnet and security groups, the boot script (see
//! [`super::provision`]) as user-data, and tags for the owning coordinator, the host type
//! and a deadline; DescribeInstances until it runs and has an address; then the buildlet
//! is dialled there until it answers. Release hands TerminateInstances to a task the pool
//! owns.
//!
//! vCPU quota: every instance holds `vcpus_per_instance` permits of a semaphore of
//! `vcpu_quota` (and one of `max_instances`) from before RunInstances until its
//! termination was accepted, so the pool never asks EC2 for more than the quota.
//! Throttling and `InsufficientInstanceCapacity` answers are retried with jittered
//! exponential backoff, then become a clear infrastructure failure of the attempt. A
//! sweeper lists the pool's instances by tag and terminates what
//! [`reconcile`](super::reconcile::reconcile) says (past deadline; held by no lease, as
//! after a crash); a leased instance that stops or vanishes cancels the lease's `lost`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, Instance, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
};
use base64::Engine as _;
use buildfarm_config::{Ec2Address, Ec2Pool as Ec2Config};
use buildlet::client::BuildletClient;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::provision::Provision;
use super::reconcile::{self, Action, MachineState, Observed, Tracked, labels};
use super::{Lease, Pool, PoolError, PoolStatus};

/// Pause between attempts to reach the buildlet on a running instance (it is still
/// fetching itself).
const DIAL_PAUSE: Duration = Duration::from_millis(500);

/// Timing knobs; the defaults suit AWS, tests shorten them.
#[derive(Debug, Clone)]
pub struct Ec2Timing {
    /// How often a starting instance is described.
    pub poll: Duration,
    /// How often the sweeper lists the pool's instances (and notices lost ones).
    pub sweep: Duration,
    /// First backoff after a throttled or capacity-refused call; doubled each time.
    pub retry_base: Duration,
    /// Largest backoff.
    pub retry_max: Duration,
    /// Calls per operation before giving up.
    pub retry_attempts: u32,
}

impl Default for Ec2Timing {
    fn default() -> Self {
        Ec2Timing {
            poll: Duration::from_secs(3),
            sweep: Duration::from_secs(30),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            retry_attempts: 6,
        }
    }
}

pub struct Ec2PoolOptions {
    pub host_type: String,
    pub config: Ec2Config,
    /// The owner tag's value (the config's `owner`, or the default from the master key).
    pub owner: String,
    pub client: aws_sdk_ec2::Client,
    pub provision: Arc<dyn Provision>,
    pub timing: Ec2Timing,
}

/// Builds the EC2 client for a pool's config: AWS's default credential chain
/// (environment, profile, instance role), the config's region and endpoint, rustls with
/// ring. The SDK's own retries are off: [`Ec2Pool`] retries with its own policy.
pub async fn client_from_config(config: &Ec2Config) -> aws_sdk_ec2::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(config.region.clone()))
        .http_client(http_client())
        .retry_config(aws_config::retry::RetryConfig::disabled());
    if let Some(url) = &config.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    aws_sdk_ec2::Client::new(&loader.load().await)
}

/// The SDK's HTTP client: rustls with ring (the one crypto provider of the workspace),
/// HTTPS or plain HTTP (an emulator on loopback).
pub fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// What to do with an EC2 error code. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Throttled: back off and retry.
    Throttled,
    /// No capacity for this instance type right now: back off and retry.
    NoCapacity,
    /// Retrying will not help (bad AMI, quota exceeded, auth...).
    Fatal,
}

pub fn classify(code: Option<&str>) -> ErrorClass {
    match code {
        Some(
            "RequestLimitExceeded"
            | "Throttling"
            | "ThrottlingException"
            | "RequestThrottled"
            | "SlowDown"
            | "ServiceUnavailable"
            | "Unavailable"
            | "InternalError",
        ) => ErrorClass::Throttled,
        Some("InsufficientInstanceCapacity" | "InsufficientHostCapacity") => ErrorClass::NoCapacity,
        // Transport errors (no code) are worth a retry too.
        None => ErrorClass::Throttled,
        Some(_) => ErrorClass::Fatal,
    }
}

/// Backoff before retry `attempt` (1-based): base·2^(attempt-1), capped, with full
/// jitter in its upper half so many coordinators do not retry in step.
pub fn backoff(timing: &Ec2Timing, attempt: u32, jitter: f64) -> Duration {
    let exp = timing
        .retry_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(timing.retry_max);
    capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// An EC2 call failed for good.
#[derive(Debug)]
struct CallError {
    class: ErrorClass,
    message: String,
    attempts: u32,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.class {
            ErrorClass::Fatal => write!(f, "{}", self.message),
            ErrorClass::NoCapacity => write!(
                f,
                "EC2 had no capacity after {} attempts: {}",
                self.attempts, self.message
            ),
            ErrorClass::Throttled => write!(
                f,
                "EC2 kept refusing after {} attempts: {}",
                self.attempts, self.message
            ),
        }
    }
}

/// Runs `call` with the pool's retry policy.
async fn with_retries<T, E, F, Fut>(
    timing: &Ec2Timing,
    what: &str,
    cancel: &CancellationToken,
    mut call: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, aws_sdk_ec2::error::SdkError<E>>>,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let err = match call().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let code = err.code().map(str::to_owned);
        let class = classify(code.as_deref());
        let message = match (&code, err.message()) {
            (Some(c), Some(m)) => format!("{what}: {c}: {m}"),
            (Some(c), None) => format!("{what}: {c}"),
            _ => format!("{what}: {}", aws_sdk_ec2::error::DisplayErrorContext(&err)),
        };
        if class == ErrorClass::Fatal || attempt >= timing.retry_attempts {
            return Err(CallError {
                class,
                message,
                attempts: attempt,
            });
        }
        let wait = backoff(timing, attempt, rand::random::<f64>());
        warn!(%message, attempt, wait = ?wait, "ec2 call refused; retrying");
        tokio::select! {
            _ = cancel.cancelled() => return Err(CallError { class: ErrorClass::Fatal, message: "cancelled".into(), attempts: attempt }),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

pub struct Ec2Pool {
    inner: Arc<Inner>,
}

struct Inner {
    opts: Ec2PoolOptions,
    /// Instances made by this process, by machine name.
    tracked: Mutex<HashMap<String, Entry>>,
    /// `vcpu_quota` permits; each instance holds its vCPU count of them.
    vcpus: Arc<Semaphore>,
    /// `max_instances` permits.
    instances: Arc<Semaphore>,
    /// vCPUs of one instance, once known.
    vcpus_per_instance: tokio::sync::OnceCell<u32>,
    in_use: AtomicUsize,
    starting: AtomicUsize,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

struct Entry {
    state: Tracked,
    instance_id: Option<String>,
    lost: CancellationToken,
}

/// Permits an instance holds until its termination was accepted.
struct Permits {
    _vcpus: OwnedSemaphorePermit,
    _instance: OwnedSemaphorePermit,
}

/// The tag value of `key` on an instance.
fn tag<'a>(i: &'a Instance, key: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// What an instance's state means to the pool. Pure.
pub fn machine_state(state: Option<&InstanceStateName>) -> MachineState {
    match state {
        Some(InstanceStateName::Pending | InstanceStateName::Running) | None => MachineState::Alive,
        Some(InstanceStateName::Stopping | InstanceStateName::Stopped) => MachineState::Dead,
        Some(_) => MachineState::Going,
    }
}

impl Ec2Pool {
    /// Creates the pool and starts its sweeper (first sweep at once: after a crash it
    /// terminates the instances the previous run left).
    pub fn new(opts: Ec2PoolOptions, tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        let once = tokio::sync::OnceCell::new();
        if let Some(v) = opts.config.vcpus_per_instance {
            let _ = once.set(v);
        }
        let inner = Arc::new(Inner {
            vcpus: Arc::new(Semaphore::new(opts.config.vcpu_quota as usize)),
            instances: Arc::new(Semaphore::new(opts.config.max_instances as usize)),
            vcpus_per_instance: once,
            opts,
            tracked: Mutex::new(HashMap::new()),
            in_use: AtomicUsize::new(0),
            starting: AtomicUsize::new(0),
            tasks: tasks.clone(),
            shutdown,
        });
        let sweeper = inner.clone();
        tasks.spawn(async move { sweeper.sweep_loop().await });
        Ec2Pool { inner }
    }

    /// Runs one sweep now (tests; the loop runs them on its own).
    pub async fn sweep(&self) -> anyhow::Result<Vec<Action>> {
        self.inner.sweep_once().await
    }
}

impl Inner {
    fn host_type(&self) -> &str {
        &self.opts.host_type
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPUs of one instance: the config's, else DescribeInstanceTypes'.
    async fn vcpus_per_instance(&self, cancel: &CancellationToken) -> Result<u32, String> {
        let c = &self.opts.config;
        self.vcpus_per_instance
            .get_or_try_init(|| async {
                let out = with_retries(&self.opts.timing, "DescribeInstanceTypes", cancel, || {
                    self.opts
                        .client
                        .describe_instance_types()
                        .instance_types(InstanceType::from(c.instance_type.as_str()))
                        .send()
                })
                .await
                .map_err(|e| e.to_string())?;
                out.instance_types()
                    .first()
                    .and_then(|t| t.v_cpu_info())
                    .and_then(|v| v.default_v_cpus())
                    .and_then(|v| u32::try_from(v).ok())
                    .filter(|v| *v > 0)
                    .ok_or_else(|| {
                        format!(
                            "EC2 does not know the vCPUs of instance type {} (set vcpus_per_instance)",
                            c.instance_type
                        )
                    })
            })
            .await
            .copied()
    }

    /// The pool's instances, as EC2 lists them.
    async fn describe_owned(&self) -> Result<Vec<Instance>, String> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let never = CancellationToken::new();
        loop {
            let page = with_retries(&self.opts.timing, "DescribeInstances", &never, || {
                self.opts
                    .client
                    .describe_instances()
                    .filters(
                        Filter::builder()
                            .name(format!("tag:{}", labels::OWNER))
                            .values(&self.opts.owner)
                            .build(),
                    )
                    .filters(
                        Filter::builder()
                            .name(format!("tag:{}", labels::HOST_TYPE))
                            .values(&self.opts.host_type)
                            .build(),
                    )
                    .set_next_token(token.clone())
                    .send()
            })
            .await
            .map_err(|e| e.to_string())?;
            out.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances().iter().cloned()),
            );
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    async fn sweep_loop(self: Arc<Self>) {
        loop {
            if let Err(error) = self.sweep_once().await {
                warn!(
                    host_type = self.host_type(),
                    error = format!("{error:#}"),
                    "ec2 pool sweep failed"
                );
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.opts.timing.sweep) => {}
            }
        }
    }

    async fn sweep_once(self: &Arc<Self>) -> anyhow::Result<Vec<Action>> {
        let instances = self.describe_owned().await.map_err(anyhow::Error::msg)?;
        let mut ids = HashMap::new();
        let observed: Vec<Observed> = instances
            .iter()
            .filter_map(|i| {
                let machine = tag(i, labels::MACHINE)?.to_owned();
                ids.insert(machine.clone(), i.instance_id()?.to_owned());
                Some(Observed {
                    deadline: tag(i, labels::DEADLINE).and_then(|d| d.parse().ok()),
                    state: machine_state(i.state().and_then(|s| s.name())),
                    machine,
                })
            })
            .collect();
        // A starting instance whose id is not known yet is not listed as tracked
        // "leased", so it can never be reported lost before it was handed out.
        let tracked: HashMap<String, Tracked> = self
            .tracked()
            .iter()
            .map(|(k, e)| (k.clone(), e.state))
            .collect();
        let actions =
            reconcile::reconcile(&observed, &tracked, reconcile::unix_secs(SystemTime::now()));
        for a in &actions {
            match a {
                Action::Delete { machine, why } => {
                    if let Some(id) = ids.get(machine) {
                        info!(host_type = self.host_type(), instance = %id, %machine, %why, "sweeping instance");
                        self.terminate(id).await;
                    }
                }
                Action::Lost { machine, why } => {
                    if let Some(e) = self.tracked().get(machine) {
                        warn!(host_type = self.host_type(), %machine, %why, "leased instance lost");
                        e.lost.cancel();
                    }
                }
            }
        }
        Ok(actions)
    }

    /// Terminates an instance; true once EC2 accepted it (or it is already gone).
    async fn terminate(&self, id: &str) -> bool {
        let never = CancellationToken::new();
        let r = with_retries(&self.opts.timing, "TerminateInstances", &never, || {
            self.opts
                .client
                .terminate_instances()
                .instance_ids(id)
                .send()
        })
        .await;
        match r {
            Ok(_) => true,
            Err(e) if e.message.contains("InvalidInstanceID.NotFound") => true,
            Err(error) => {
                warn!(host_type = self.host_type(), instance = %id, %error, "terminating instance failed; the sweeper retries");
                false
            }
        }
    }

    /// Terminates the machine in a task the pool owns, then frees its permits.
    fn discard(self: &Arc<Self>, machine: String, permits: Permits) {
        let id = self.tracked().remove(&machine).and_then(|e| e.instance_id);
        self.opts.provision.revoke(&machine);
        let me = self.clone();
        self.tasks.spawn(async move {
            let Some(id) = id else {
                // RunInstances never succeeded: nothing to terminate. (An instance it
                // made anyway, unseen, is found by the sweeper by its tags.)
                drop(permits);
                return;
            };
            if !me.terminate(&id).await {
                // Keep the quota taken until the sweeper had a go.
                tokio::time::sleep(me.opts.timing.sweep).await;
            }
            drop(permits);
        });
    }

    async fn start(
        self: &Arc<Self>,
        machine: &str,
        cancel: &CancellationToken,
    ) -> Result<(BuildletClient, String), String> {
        let c = &self.opts.config;
        let provisioned = self
            .opts
            .provision
            .provision(machine, self.host_type(), c.buildlet_port)
            .await
            .map_err(|e| format!("provisioning credentials: {e:#}"))?;
        let deadline = reconcile::unix_secs(SystemTime::now() + c.max_lifetime);
        let tags = [
            ("Name", machine.to_owned()),
            (labels::OWNER, self.opts.owner.clone()),
            (labels::HOST_TYPE, self.opts.host_type.clone()),
            (labels::DEADLINE, deadline.to_string()),
            (labels::MACHINE, machine.to_owned()),
        ];
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (k, v) in tags {
            spec = spec.tags(Tag::builder().key(k).value(v).build());
        }
        let spec = spec.build();
        let user_data = base64::engine::general_purpose::STANDARD.encode(&provisioned.script);
        let run = with_retries(&self.opts.timing, "RunInstances", cancel, || {
            self.opts
                .client
                .run_instances()
                .image_id(&c.ami)
                .instance_type(InstanceType::from(c.instance_type.as_str()))
                .min_count(1)
                .max_count(1)
                .set_subnet_id(c.subnet_id.clone())
                .set_security_group_ids(
                    (!c.security_group_ids.is_empty()).then(|| c.security_group_ids.clone()),
                )
                .user_data(user_data.clone())
                .tag_specifications(spec.clone())
                // Idempotent: a retried call after a lost answer makes no second instance.
                .client_token(machine)
                .send()
        })
        .await
        .map_err(|e| format!("{e} (instance type {} in {})", c.instance_type, c.region))?;
        let id = run
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or("RunInstances returned no instance")?
            .to_owned();
        if let Some(e) = self.tracked().get_mut(machine) {
            e.instance_id = Some(id.clone());
        }
        info!(host_type = self.host_type(), instance = %id, %machine, "ec2 instance launched");

        // Follow its state until it runs with an address.
        let ip = loop {
            let out = with_retries(&self.opts.timing, "DescribeInstances", cancel, || {
                self.opts
                    .client
                    .describe_instances()
                    .instance_ids(&id)
                    .send()
            })
            .await;
            match out {
                Ok(out) => {
                    let inst = out
                        .reservations()
                        .iter()
                        .flat_map(|r| r.instances())
                        .find(|i| i.instance_id() == Some(id.as_str()));
                    if let Some(inst) = inst {
                        let state = inst.state().and_then(|s| s.name());
                        if machine_state(state) != MachineState::Alive {
                            let reason = inst
                                .state_reason()
                                .and_then(|r| r.message())
                                .unwrap_or("no reason given");
                            return Err(format!(
                                "instance {id} is {state:?} while starting: {reason}"
                            ));
                        }
                        let addr = match c.address {
                            Ec2Address::Private => inst.private_ip_address(),
                            Ec2Address::Public => inst.public_ip_address(),
                        };
                        if state == Some(&InstanceStateName::Running)
                            && let Some(a) = addr.filter(|a| !a.is_empty())
                        {
                            break a.to_owned();
                        }
                    }
                    // Not listed yet (EC2 is eventually consistent) or still pending.
                }
                // A bad id right after launch is eventual consistency too.
                Err(e) if e.message.contains("InvalidInstanceID.NotFound") => {}
                Err(e) => return Err(e.to_string()),
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err("cancelled".into()),
                _ = tokio::time::sleep(self.opts.timing.poll) => {}
            }
        };
        let addr = format!("{ip}:{}", c.buildlet_port);
        let mut connect = provisioned.connect;
        connect.addr = addr.clone();
        let client = loop {
            let attempt = async {
                let client = BuildletClient::connect(connect.clone()).await?;
                client.status().await?;
                Ok::<_, buildlet::client::ClientError>(client)
            };
            if let Ok(client) = attempt.await {
                break client;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err("cancelled".into()),
                _ = tokio::time::sleep(DIAL_PAUSE) => {}
            }
        };
        Ok((client, addr))
    }
}

#[async_trait]
impl Pool for Ec2Pool {
    fn kind(&self) -> &'static str {
        "ec2"
    }

    fn host_type(&self) -> &str {
        &self.inner.opts.host_type
    }

    fn capacity(&self) -> usize {
        let c = &self.inner.opts.config;
        let per = self
            .inner
            .vcpus_per_instance
            .get()
            .copied()
            .unwrap_or(1)
            .max(1);
        (c.max_instances as usize).min((c.vcpu_quota / per) as usize)
    }

    fn status(&self) -> PoolStatus {
        PoolStatus {
            kind: "ec2",
            host_type: self.inner.opts.host_type.clone(),
            capacity: self.capacity(),
            in_use: self.inner.in_use.load(Ordering::SeqCst),
            idle: 0,
            starting: self.inner.starting.load(Ordering::SeqCst),
            expected: None,
        }
    }

    async fn acquire(&self, cancel: &CancellationToken) -> Result<Lease, PoolError> {
        let inner = &self.inner;
        let host_type = inner.opts.host_type.clone();
        let c = &inner.opts.config;
        let start_err = |message: String| PoolError::Start {
            host_type: host_type.clone(),
            message,
        };
        let per = inner.vcpus_per_instance(cancel).await.map_err(start_err)?;
        if per > c.vcpu_quota {
            return Err(start_err(format!(
                "one {} instance needs {per} vCPUs, more than the pool's vcpu_quota of {}",
                c.instance_type, c.vcpu_quota
            )));
        }
        // Wait for quota: never ask EC2 for more than it.
        let permits = tokio::select! {
            _ = cancel.cancelled() => return Err(PoolError::Cancelled),
            p = async {
                let i = inner.instances.clone().acquire_owned().await?;
                let v = inner.vcpus.clone().acquire_many_owned(per).await?;
                Ok::<_, tokio::sync::AcquireError>(Permits { _vcpus: v, _instance: i })
            } => p.map_err(|_| PoolError::Unavailable(host_type.clone()))?,
        };
        let machine = reconcile::machine_name(&host_type);
        inner.tracked().insert(
            machine.clone(),
            Entry {
                state: Tracked::Starting,
                instance_id: None,
                lost: CancellationToken::new(),
            },
        );
        inner.starting.fetch_add(1, Ordering::SeqCst);
        let timeout = c.start_timeout;
        let started = tokio::time::timeout(timeout, inner.start(&machine, cancel)).await;
        inner.starting.fetch_sub(1, Ordering::SeqCst);
        let (client, addr) = match started {
            Ok(Ok(ok)) => ok,
            Ok(Err(message)) => {
                inner.discard(machine, permits);
                if cancel.is_cancelled() {
                    return Err(PoolError::Cancelled);
                }
                return Err(start_err(message));
            }
            Err(_) => {
                inner.discard(machine.clone(), permits);
                return Err(start_err(format!(
                    "instance {machine} had no answering buildlet within {}",
                    humantime::format_duration(timeout)
                )));
            }
        };
        let lost = {
            let mut tracked = inner.tracked();
            match tracked.get_mut(&machine) {
                Some(e) => {
                    e.state = Tracked::Leased;
                    e.lost.clone()
                }
                None => {
                    drop(tracked);
                    inner.discard(machine.clone(), permits);
                    return Err(start_err(format!(
                        "instance {machine} was swept while starting"
                    )));
                }
            }
        };
        inner.in_use.fetch_add(1, Ordering::SeqCst);
        info!(host_type = %host_type, %machine, %addr, "ec2 buildlet ready");
        let me = inner.clone();
        let name = format!("ec2/{machine}");
        Ok(Lease::new(client, name, host_type, lost, move || {
            me.in_use.fetch_sub(1, Ordering::SeqCst);
            me.discard(machine, permits);
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        assert_eq!(
            classify(Some("RequestLimitExceeded")),
            ErrorClass::Throttled
        );
        assert_eq!(
            classify(Some("InsufficientInstanceCapacity")),
            ErrorClass::NoCapacity
        );
        assert_eq!(classify(Some("InvalidAMIID.NotFound")), ErrorClass::Fatal);
        assert_eq!(classify(Some("VcpuLimitExceeded")), ErrorClass::Fatal);
        assert_eq!(classify(None), ErrorClass::Throttled);
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let t = Ec2Timing {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(10),
            ..Ec2Timing::default()
        };
        assert_eq!(backoff(&t, 1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&t, 3, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(&t, 10, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(&t, 3, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(&t, 40, 1.0), Duration::from_secs(10));
    }

    #[test]
    fn instance_states() {
        use InstanceStateName as S;
        assert_eq!(machine_state(Some(&S::Pending)), MachineState::Alive);
        assert_eq!(machine_state(Some(&S::Running)), MachineState::Alive);
        assert_eq!(machine_state(Some(&S::Stopped)), MachineState::Dead);
        assert_eq!(machine_state(Some(&S::ShuttingDown)), MachineState::Going);
        assert_eq!(machine_state(Some(&S::Terminated)), MachineState::Going);
    }
}
