//! `gomote`: borrow buildlets from a coordinator and run try runs, from the command
//! line. Settings come from a JSON file (`BUILDFARM_GOMOTE_CONFIG`, or
//! `./.buildfarm/gomote.json`, which the main job writes): `coordinator` (URL),
//! `ca_file`, `token`; `BUILDFARM_TOKEN` overrides the token.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use coordinator::client::{
    ApiError, CreateEvent, ExecEvent, ExitStatus, FarmClient, ListEntry, OutputStream, PutTarStats,
    RunSpec, ShellEvent, ShellSpec, TryRequest, TryState,
};
use futures::StreamExt;
use serde::Deserialize;

mod artifact;
mod sync;
mod token;
mod watch;

#[derive(Parser)]
#[command(
    name = "gomote",
    version,
    about = "borrow buildfarm buildlets and run try runs"
)]
struct Cli {
    /// Settings file (default: $BUILDFARM_GOMOTE_CONFIG or ./.buildfarm/gomote.json).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print machine-readable JSON where a command has output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Borrow a buildlet for BUILDER; prints the instance name.
    Create { builder: String },
    /// List your instances.
    List,
    /// Give an instance back.
    Destroy { instance: String },
    /// Write one local file of any size to the instance (default: same base name in the
    /// workdir), keeping its permission bits; streamed in chunks.
    Put {
        instance: String,
        file: PathBuf,
        dest: Option<String>,
    },
    /// Extract a local .tar.gz into a directory of the instance.
    Puttar {
        instance: String,
        file: PathBuf,
        #[arg(long, default_value = "")]
        dir: String,
    },
    /// Sync a local directory to the instance, sending only files that changed.
    Push {
        instance: String,
        dir: PathBuf,
        #[arg(long, default_value = "")]
        dest: String,
    },
    /// Download a directory of the instance as .tar.gz (to stdout, or -o FILE).
    Gettar {
        instance: String,
        #[arg(long, default_value = "")]
        dir: String,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Run a command with the environment a build step of the instance's builder gets;
    /// output is streamed and its exit code becomes gomote's.
    Run {
        instance: String,
        /// Act like this builder instead (same host type): use its environment.
        #[arg(long = "builderenv", value_name = "BUILDER")]
        builder_env: Option<String>,
        /// Working directory relative to the workdir.
        #[arg(long, default_value = "")]
        dir: String,
        /// Extra environment, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Kill the command after this long (e.g. 10m).
        #[arg(long)]
        timeout: Option<humantime::Duration>,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// List files of the instance.
    Ls {
        instance: String,
        #[arg(default_value = "")]
        dir: String,
        #[arg(short = 'R', long)]
        recursive: bool,
        #[arg(long)]
        digest: bool,
    },
    /// Remove paths of the instance. A path naming the workdir itself ("", ".") is
    /// refused; empty the whole workdir with --all.
    Rm {
        instance: String,
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        paths: Vec<String>,
        /// Empty the whole workdir (keeping the directory).
        #[arg(long)]
        all: bool,
    },
    /// Interactive shell on the instance, with its builder's environment.
    Ssh {
        instance: String,
        /// Act like this builder instead (same host type): use its environment.
        #[arg(long = "builderenv", value_name = "BUILDER")]
        builder_env: Option<String>,
    },
    /// Watch a local tree: on every save push only what changed and re-run the command,
    /// cancelling a run still in progress. `.git` and what `.gitignore` names are left
    /// out. Ctrl-C stops watching.
    Watch {
        instance: String,
        /// Local tree to watch.
        #[arg(long, default_value = ".")]
        src: PathBuf,
        /// Directory of the instance the tree is synced into, relative to the workdir.
        #[arg(long, default_value = "")]
        dest: String,
        /// Working directory of the command, relative to the workdir (default: --dest).
        #[arg(long)]
        dir: Option<String>,
        /// Act like this builder instead (same host type): use its environment.
        #[arg(long = "builderenv", value_name = "BUILDER")]
        builder_env: Option<String>,
        /// Extra environment, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Quiet time after a save before pushing, so a burst of saves makes one run.
        #[arg(long, default_value = "300ms")]
        debounce: humantime::Duration,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Build REPO at VERSION (tag, branch or commit) for GOOS/GOARCH on the farm, wait
    /// showing progress, and download the result (checked against its SHA-256).
    Artifact {
        repo: String,
        goos: String,
        goarch: String,
        version: String,
        /// Where to save it (default: the name the coordinator suggests, here).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Which file, when the build makes several.
        #[arg(long)]
        file: Option<String>,
    },
    /// Cancel the unfinished builds of one of your try runs (an operator may cancel
    /// anyone's).
    Cancel { try_id: String },
    /// Manage user tokens (role admin).
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Submit a try run and watch it; exits non-zero unless every builder passes.
    Try {
        repo: String,
        rev: String,
        /// Only these try builders (comma-separated).
        #[arg(long, value_delimiter = ',')]
        builders: Vec<String>,
        /// A patch (`git diff --binary` output) applied on REV; `-` reads stdin.
        #[arg(long, conflicts_with = "watch")]
        patch: Option<PathBuf>,
        /// Watch the local checkout --src: on every save, cancel the try run in progress
        /// and start one with the local changes (tracked and untracked, not ignored)
        /// on top of REV. Ctrl-C stops.
        #[arg(long)]
        watch: bool,
        /// The local checkout --watch follows.
        #[arg(long, default_value = ".", requires = "watch")]
        src: PathBuf,
    },
}

/// Size of each data message of an upload, far below any message limit (at least 1 MiB).
const UPLOAD_CHUNK_BYTES: usize = 256 << 10;

/// Largest token gomote sends. Real tokens are `<id>.<secret>`, 81 bytes; the
/// room above that is for other token formats, far below any server's header limit.
const MAX_TOKEN_BYTES: usize = 1024;

#[derive(Deserialize)]
struct Settings {
    coordinator: String,
    ca_file: PathBuf,
    #[serde(default)]
    token: String,
}

type Client = FarmClient;

fn settings_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .or_else(|| std::env::var_os("BUILDFARM_GOMOTE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".buildfarm/gomote.json"))
}

/// The settings file and the token to send (from `BUILDFARM_TOKEN` or the file).
fn load_settings(cli: &Cli) -> Result<(Settings, String)> {
    let path = settings_path(cli);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading gomote settings {} (start the coordinator, or set BUILDFARM_GOMOTE_CONFIG)",
            path.display()
        )
    })?;
    let s: Settings =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let (token, source) = match std::env::var("BUILDFARM_TOKEN") {
        Ok(t) => (t, "BUILDFARM_TOKEN".to_owned()),
        Err(_) => (s.token.clone(), format!("`token` in {}", path.display())),
    };
    let token = token.trim();
    if token.is_empty() {
        bail!(
            "no token: set BUILDFARM_TOKEN or `token` in {}",
            path.display()
        );
    }
    // Checked here, before sending: an oversized header only gets a bare HTTP/2
    // protocol error back from the server.
    if token.len() > MAX_TOKEN_BYTES {
        bail!(
            "the token from {source} is {} bytes; the limit is {MAX_TOKEN_BYTES} bytes (a real token is `<16 hex digits>.<64 hex digits>`)",
            token.len()
        );
    }
    let token = token.to_owned();
    Ok((s, token))
}

async fn connect(cli: &Cli) -> Result<Client> {
    let (s, token) = load_settings(cli)?;
    let ca = buildfarm_tls::load_ca_file(&s.ca_file)?;
    FarmClient::connect(&s.coordinator, &ca, Some(&token), Duration::from_secs(10)).await
}

fn status_err(what: &str, e: ApiError) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", e.message(), e.code())
}

#[tokio::main]
async fn main() -> ExitCode {
    buildfarm_tls::install_crypto_provider();
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gomote: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> Result<ExitCode> {
    if let Cmd::Artifact {
        repo,
        goos,
        goarch,
        version,
        output,
        file,
    } = &cli.command
    {
        let (s, token) = load_settings(cli)?;
        let http = artifact::Http::new(&s.coordinator, &s.ca_file, token)?;
        artifact::run(
            &http,
            artifact::Request {
                repo,
                goos,
                goarch,
                version,
                file: file.as_deref(),
                output: output.as_deref(),
                json: cli.json,
            },
        )
        .await?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut c = connect(cli).await?;
    match &cli.command {
        Cmd::Token(t) => {
            token::run(&mut c, t, cli.json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Create { builder } => {
            let mut s = c
                .create_instance(builder)
                .await
                .map_err(|e| status_err("create", e))?;
            while let Some(msg) = s.next().await {
                let (waiters_ahead, waiting_for) = match msg.map_err(|e| status_err("create", e))? {
                    CreateEvent::Ready(inst) => {
                        if cli.json {
                            println!("{}", instance_json(&inst));
                        } else {
                            println!("{}", inst.name);
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                    CreateEvent::Queued {
                        waiters_ahead,
                        waiting_for,
                    } => (waiters_ahead, waiting_for),
                };
                let why = if waiting_for.is_empty() {
                    String::new()
                } else {
                    format!("; {waiting_for}")
                };
                eprintln!("gomote: waiting for a {builder} buildlet ({waiters_ahead} ahead){why}");
            }
            bail!("create: the coordinator ended the stream without an instance")
        }
        Cmd::List => {
            let instances = c
                .list_instances()
                .await
                .map_err(|e| status_err("list", e))?;
            if cli.json {
                let v: Vec<_> = instances.iter().map(instance_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                for i in instances {
                    println!(
                        "{}\t{}\t{}\t{}",
                        i.name,
                        i.builder,
                        i.host_type,
                        instance_times(now_ms, i.created_unix, i.expires_unix)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Destroy { instance } => {
            c.destroy_instance(instance)
                .await
                .map_err(|e| status_err("destroy", e))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Put {
            instance,
            file,
            dest,
        } => {
            let meta =
                std::fs::metadata(file).with_context(|| format!("stat {}", file.display()))?;
            if !meta.is_file() {
                bail!("put: {} is not a regular file", file.display());
            }
            let mode = file_mode(file)?;
            let dest = match dest {
                Some(d) => d.clone(),
                None => file
                    .file_name()
                    .context("file has no name")?
                    .to_string_lossy()
                    .into_owned(),
            };
            // As a one-file tarball through the streamed PutTar: a unary WriteFile would
            // have to fit the whole file in one message.
            let file = file.clone();
            put_tar(&mut c, instance, "", meta.len(), move |w| {
                single_file_tar(w, &file, &dest, mode, meta.len())
            })
            .await
            .context("put")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Puttar {
            instance,
            file,
            dir,
        } => {
            let size = std::fs::metadata(file)
                .with_context(|| format!("stat {}", file.display()))?
                .len();
            let path = file.clone();
            let resp = put_tar(&mut c, instance, dir, size, move |w| {
                let mut f = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                std::io::copy(&mut f, w).with_context(|| format!("reading {}", path.display()))?;
                Ok(())
            })
            .await
            .context("puttar")?;
            eprintln!(
                "gomote: extracted {} entries ({} bytes)",
                resp.entries, resp.bytes
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Push {
            instance,
            dir,
            dest,
        } => {
            push(&mut c, instance, dir, dest).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gettar {
            instance,
            dir,
            output,
        } => {
            let mut s = c
                .get_tar(instance, dir)
                .await
                .map_err(|e| status_err("gettar", e))?;
            let mut out: Box<dyn Write> = match output {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                ),
                None => {
                    if std::io::stdout().is_terminal() {
                        bail!("refusing to write a tarball to a terminal; use -o FILE or redirect");
                    }
                    Box::new(std::io::stdout().lock())
                }
            };
            while let Some(chunk) = s.next().await {
                out.write_all(&chunk.map_err(|e| status_err("gettar", e))?)?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            instance,
            builder_env,
            dir,
            env,
            timeout,
            cmd,
        } => {
            check_env(env)?;
            let request = exec_request(
                cmd,
                dir,
                env,
                builder_env.as_deref(),
                timeout.map(Duration::from),
            )?;
            let mut s = c
                .exec(instance, request)
                .await
                .map_err(|e| status_err("run", e))?;
            while let Some(ev) = s.next().await {
                match ev.map_err(|e| status_err("run", e))? {
                    ExecEvent::Output { stream, data } => write_output(stream, &data)?,
                    ExecEvent::Exit(x) => {
                        if let Some(error) = &x.error {
                            bail!("run: {error}");
                        }
                        let (code, how) = describe_exit(&x);
                        if x.timed_out || x.signal.is_some() {
                            eprintln!("gomote: command {how}");
                        }
                        return Ok(ExitCode::from(code));
                    }
                }
            }
            bail!("run: the stream ended without an exit status (buildlet lost?)")
        }
        Cmd::Watch {
            instance,
            src,
            dest,
            dir,
            builder_env,
            env,
            debounce,
            cmd,
        } => {
            check_env(env)?;
            let request = exec_request(
                cmd,
                dir.as_deref().unwrap_or(dest),
                env,
                builder_env.as_deref(),
                None,
            )?;
            watch::watch(
                &mut c,
                src,
                dest,
                instance,
                request,
                Duration::from(*debounce),
            )
            .await
        }
        Cmd::Ls {
            instance,
            dir,
            recursive,
            digest,
        } => {
            let entries = list(&mut c, instance, dir, *recursive, *digest).await?;
            if cli.json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| serde_json::json!({"name": e.name, "mode": e.mode, "size": e.size, "sha256": e.sha256.as_deref().unwrap_or_default()}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for e in entries {
                    let digest = match &e.sha256 {
                        Some(d) => format!("\t{d}"),
                        None => String::new(),
                    };
                    println!("{:o}\t{}\t{}{digest}", e.mode, e.size, e.name);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rm {
            instance,
            paths,
            all,
        } => {
            let paths = if *all {
                vec![".".to_owned()]
            } else {
                paths.clone()
            };
            c.remove(instance, paths, *all)
                .await
                .map_err(|e| status_err("rm", e))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ssh {
            instance,
            builder_env,
        } => ssh(&mut c, instance, builder_env.as_deref().unwrap_or_default()).await,
        // Answered over HTTP before connecting, above.
        Cmd::Artifact { .. } => bail!("artifact is not a gRPC command"),
        Cmd::Cancel { try_id } => {
            let cancelled = c
                .cancel_try(try_id)
                .await
                .map_err(|e| status_err("cancel", e))?;
            eprintln!("gomote: cancelled {cancelled} build(s)");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Try {
            repo,
            rev,
            builders,
            patch,
            watch: false,
            ..
        } => try_run(&mut c, cli.json, repo, rev, builders, patch.as_deref()).await,
        Cmd::Try {
            repo,
            rev,
            builders,
            src,
            watch: true,
            ..
        } => watch::watch_try(&mut c, src, repo, rev, builders).await,
    }
}

fn check_env(env: &[String]) -> Result<()> {
    for kv in env {
        if !kv.contains('=') {
            bail!("--env {kv:?}: expected KEY=VALUE");
        }
    }
    Ok(())
}

/// The request that runs `cmd` on an instance the way a build step of its builder (or
/// of `builder_env`) would, with `env` added.
fn exec_request(
    cmd: &[String],
    dir: &str,
    env: &[String],
    builder_env: Option<&str>,
    timeout: Option<Duration>,
) -> Result<RunSpec> {
    let (program, args) = cmd.split_first().context("missing command")?;
    Ok(RunSpec {
        cmd: program.clone(),
        args: args.to_vec(),
        dir: dir.to_owned(),
        env: env.to_vec(),
        builder_env: builder_env.unwrap_or_default().to_owned(),
        timeout,
    })
}

/// Writes a remote command's output to gomote's own stdout or stderr.
fn write_output(stream: OutputStream, data: &[u8]) -> std::io::Result<()> {
    if stream == OutputStream::Stderr {
        std::io::stderr().write_all(data)
    } else {
        let mut out = std::io::stdout();
        out.write_all(data)?;
        out.flush()
    }
}

/// The exit code gomote passes on for a remote command's exit status (a shell's
/// 128+signal for a killed one), and how the command ended in words.
fn describe_exit(x: &ExitStatus) -> (u8, String) {
    let (code, how) = match (x.code, x.signal) {
        (Some(code), _) => (code.clamp(0, 255) as u8, format!("exited {code}")),
        (None, Some(sig)) => (
            (128 + sig).clamp(0, 255) as u8,
            format!("killed by signal {sig}"),
        ),
        _ => (1, "ended without an exit status".to_owned()),
    };
    if x.timed_out {
        (code, format!("timed out ({how})"))
    } else {
        (code, how)
    }
}

fn instance_json(i: &coordinator::client::Instance) -> serde_json::Value {
    serde_json::json!({
        "name": i.name, "builder": i.builder, "host_type": i.host_type,
        "owner": i.owner, "created_unix": i.created_unix, "expires_unix": i.expires_unix,
    })
}

fn file_mode(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// Uploads a tar.gz to `dir` of the instance as it is produced: `produce` writes it (on a
/// blocking thread) into a writer whose chunks are sent while it runs, so memory stays
/// bounded whatever the size. `total` sizes the progress bar.
async fn put_tar(
    c: &mut Client,
    instance: &str,
    dir: &str,
    total: u64,
    produce: impl FnOnce(&mut ChunkWriter) -> Result<()> + Send + 'static,
) -> Result<PutTarStats> {
    // A few chunks in flight: the producer waits when the upload is slower.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let producer = tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter {
            tx,
            buf: Vec::with_capacity(UPLOAD_CHUNK_BYTES),
        };
        produce(&mut w)?;
        w.send_buffered()?;
        Ok::<(), anyhow::Error>(())
    });
    let bar = progress_bar(total);
    let bar2 = bar.clone();
    let data = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |chunk| {
        bar2.inc(chunk.len() as u64);
        bytes::Bytes::from(chunk)
    });
    let upload = c.put_tar(instance, dir, data).await;
    bar.finish_and_clear();
    let produced = producer.await.context("tarball writer task")?;
    match (produced, upload) {
        (_, Ok(stats)) => Ok(stats),
        // The producer failing ends the stream early, which the buildlet refuses as a
        // truncated tarball: the local error is the cause. A broken pipe is the producer
        // noticing that the upload failed, whose error is the cause then.
        (Err(e), Err(_)) if !is_broken_pipe(&e) => Err(e),
        (_, Err(status)) => Err(status_err("upload", status)),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A `Write` that hands out what is written in chunks of [`UPLOAD_CHUNK_BYTES`] to the
/// upload; used from a blocking thread.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send_buffered(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(UPLOAD_CHUNK_BYTES));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload ended"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(UPLOAD_CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == UPLOAD_CHUNK_BYTES {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes a tar.gz holding `file` as `dest` (a path relative to the workdir) with `mode`.
/// Stored without compression: the bytes go as they are (fast on a LAN), and a file of
/// zeros cannot trip the buildlet's bound on the compression ratio.
fn single_file_tar(
    w: &mut ChunkWriter,
    file: &Path,
    dest: &str,
    mode: u32,
    size: u64,
) -> Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(mode);
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    header.set_mtime(mtime);
    let gz = flate2::write::GzEncoder::new(w, flate2::Compression::none());
    let mut builder = tar::Builder::new(gz);
    // A file that changes size while being read would make a corrupt entry; `take` and
    // the size check below catch it.
    let mut reader = std::io::Read::take(f, size);
    builder
        .append_data(&mut header, dest, &mut reader)
        .with_context(|| format!("sending {} as {dest}", file.display()))?;
    if reader.limit() != 0 {
        bail!("{} shrank while it was being sent", file.display());
    }
    builder.into_inner()?.finish()?;
    Ok(())
}

/// "created 3m05s ago, expires in 29m05s" for `gomote list`.
fn instance_times(now_ms: i64, created_unix: i64, expires_unix: i64) -> String {
    let created = coordinator::http::fmt_ago(now_ms, created_unix * 1000);
    let left_ms = expires_unix * 1000 - now_ms;
    let expires = if left_ms <= 0 {
        "expires now".to_owned()
    } else {
        format!(
            "expires in {}",
            coordinator::http::fmt_duration_secs((left_ms / 1000) as u64)
        )
    };
    format!("created {created}\t{expires}")
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
    {
        bar.set_style(style);
    }
    bar
}

async fn list(
    c: &mut Client,
    instance: &str,
    dir: &str,
    recursive: bool,
    digest: bool,
) -> Result<Vec<ListEntry>> {
    c.list(instance, dir, recursive, digest)
        .await
        .map_err(|e| status_err("ls", e))
}

/// Makes `dest` of the instance hold what the local tree `dir` holds: sends changed and
/// new files in one tarball and removes remote files that are not in the tree.
async fn push(c: &mut Client, instance: &str, dir: &Path, dest: &str) -> Result<()> {
    let local = sync::tree_digests(dir)?;
    let remote = sync::remote_digests(c, instance, dest).await?;
    let changes = sync::TreeChanges::between(&remote, &local);
    sync::send_changes(c, instance, dir, dest, &changes)
        .await
        .context("push")?;
    eprintln!(
        "gomote: pushed {} changed file(s), removed {}, {} unchanged",
        changes.changed.len(),
        changes.gone.len(),
        local.len() - changes.changed.len()
    );
    Ok(())
}

async fn ssh(c: &mut Client, instance: &str, builder_env: &str) -> Result<ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (rows, cols) = terminal_size().unwrap_or((24, 80));
    let spec = ShellSpec {
        rows,
        cols,
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        builder_env: builder_env.to_owned(),
    };
    let (input, mut out) = c
        .shell(instance, spec)
        .await
        .map_err(|e| status_err("ssh", e))?;
    let raw = RawMode::enter();
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input.send_stdin(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut code = ExitCode::FAILURE;
    while let Some(msg) = out.next().await {
        match msg.map_err(|e| status_err("ssh", e))? {
            ShellEvent::Data(d) => {
                stdout.write_all(&d).await?;
                stdout.flush().await?;
            }
            ShellEvent::Exit(x) => {
                code = ExitCode::from(x.code.unwrap_or(1).clamp(0, 255) as u8);
                break;
            }
        }
    }
    stdin_task.abort();
    drop(raw);
    Ok(code)
}

fn terminal_size() -> Option<(u32, u32)> {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize struct through the pointer we pass.
    let r = unsafe { nix::libc::ioctl(0, nix::libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((u32::from(ws.ws_row), u32::from(ws.ws_col)))
}

/// Puts the terminal in raw mode while alive (only when stdin is a terminal).
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(orig) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = orig.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
        RawMode(Some(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(orig) = self.0.take() {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                &orig,
            );
        }
    }
}

async fn try_run(
    c: &mut Client,
    json: bool,
    repo: &str,
    rev: &str,
    builders: &[String],
    patch: Option<&Path>,
) -> Result<ExitCode> {
    let patch = match patch {
        None => vec![],
        Some(p) if p == Path::new("-") => {
            let mut buf = vec![];
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
            buf
        }
        Some(p) => std::fs::read(p).with_context(|| format!("reading patch {}", p.display()))?,
    };
    let id = submit_try(c, repo, rev, builders, patch).await?;
    if !json {
        eprintln!("gomote: try run {id}");
    }
    let mut s = c
        .watch_try(&id)
        .await
        .map_err(|e| status_err("try (watch)", e))?;
    let tty = std::io::stderr().is_terminal() && !json;
    let mut drawn = 0usize;
    let mut last: Option<TryState> = None;
    while let Some(state) = s.next().await {
        let state = state.map_err(|e| status_err("try (watch)", e))?;
        if tty {
            // Redraw the table in place.
            let table = render_try(&state);
            if drawn > 0 {
                eprint!("\x1b[{drawn}A\x1b[J");
            }
            eprint!("{table}");
            drawn = table.lines().count();
        } else if !json {
            print_state_changes(last.as_ref(), &state);
        }
        let done = state.done;
        last = Some(state);
        if done {
            break;
        }
    }
    if let (false, Some(state)) = (tty || json, &last) {
        eprint!("{}", render_try(state));
    }
    let state = last.context("the watch ended before any state")?;
    if json {
        let builders: Vec<_> = state
            .builders
            .iter()
            .map(|b| serde_json::json!({"builder": b.builder, "state": b.state, "log_url": b.log_url}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"try_id": state.try_id, "verdict": state.verdict, "builders": builders})
        );
    } else {
        println!("verdict: {}", state.verdict);
    }
    Ok(if state.verdict == "ok" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Submits a try run; returns its id.
async fn submit_try(
    c: &mut Client,
    repo: &str,
    rev: &str,
    builders: &[String],
    patch: Vec<u8>,
) -> Result<String> {
    c.submit_try(TryRequest {
        repo: repo.to_owned(),
        rev: rev.to_owned(),
        patch,
        builders: builders.to_vec(),
    })
    .await
    .map_err(|e| status_err("try", e))
}

/// One line on stderr per builder whose state differs from `last`.
fn print_state_changes(last: Option<&TryState>, state: &TryState) {
    for b in &state.builders {
        let before = last
            .and_then(|l| l.builders.iter().find(|x| x.builder == b.builder))
            .map(|x| x.state.as_str());
        if before != Some(b.state.as_str()) {
            eprintln!("{}: {}", b.builder, b.state);
        }
    }
}

fn render_try(state: &TryState) -> String {
    let mut out = String::new();
    let width = state
        .builders
        .iter()
        .map(|b| b.builder.len())
        .max()
        .unwrap_or(7)
        .max(7);
    for b in &state.builders {
        let secs = b.elapsed_ms / 1000;
        let link = if matches!(b.state.as_str(), "failed" | "infra-failure") {
            b.log_url.as_str()
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<width$}  {:<13} {:>4}s  {link}\n",
            b.builder, b.state, secs
        ));
    }
    out
}
