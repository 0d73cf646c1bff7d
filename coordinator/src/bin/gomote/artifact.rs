//! `gomote artifact REPO GOOS GOARCH VERSION`: asks the coordinator for a build of REPO
//! at VERSION for GOOS/GOARCH (`POST /artifacts/...`), waits while it builds showing its
//! progress, then downloads the file and checks it against the SHA-256 the coordinator
//! sends. A failed build prints its summary and the end of its log.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// Where and how to reach the coordinator's HTTP side.
pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
    pub token: String,
}

impl Http {
    /// A client trusting only the farm's CA (from the gomote settings).
    pub fn new(coordinator: &str, ca_file: &Path, token: String) -> Result<Http> {
        let base = if coordinator.starts_with("http://") || coordinator.starts_with("https://") {
            coordinator.trim_end_matches('/').to_owned()
        } else {
            format!("https://{}", coordinator.trim_end_matches('/'))
        };
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if base.starts_with("https://") {
            let ca = buildfarm_tls::load_ca_file(ca_file)?;
            let tls = buildfarm_tls::client_config(&ca, None, &[buildfarm_tls::ALPN_HTTP1])?;
            builder = builder.use_preconfigured_tls((*tls).clone());
        }
        Ok(Http {
            base,
            client: builder.build().context("making the HTTP client")?,
            token,
        })
    }
}

pub struct Request<'a> {
    pub repo: &'a str,
    pub goos: &'a str,
    pub goarch: &'a str,
    pub version: &'a str,
    pub file: Option<&'a str>,
    pub output: Option<&'a Path>,
    pub json: bool,
}

fn component(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The error text of a refused request: the coordinator's own message.
async fn refusal(what: &str, resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    anyhow::anyhow!("{what}: {} ({status})", body.trim())
}

pub async fn run(http: &Http, r: Request<'_>) -> Result<()> {
    let path = format!(
        "/artifacts/{}/{}/{}/{}",
        component(r.repo),
        component(r.goos),
        component(r.goarch),
        component(r.version)
    );
    let resp = http
        .client
        .post(format!("{}{path}", http.base))
        .bearer_auth(&http.token)
        .send()
        .await
        .with_context(|| format!("POST {}{path}", http.base))?;
    if !resp.status().is_success() {
        return Err(refusal("request", resp).await);
    }
    let status: serde_json::Value = resp.json().await.context("reading the answer")?;
    let commit = status["commit"].as_str().unwrap_or_default();
    let shared = status["created"] == false;
    eprintln!(
        "gomote: {} {} ({}) for {}/{}: build {}{}",
        r.repo,
        r.version,
        commit.get(..12).unwrap_or(commit),
        r.goos,
        r.goarch,
        status["build_id"].as_str().unwrap_or("?"),
        if shared { " (shared)" } else { "" }
    );
    // By commit from now on, so a branch that moves meanwhile does not change the answer.
    let url = match status["url"].as_str() {
        Some(u) => format!("{}{u}", http.base),
        None => format!("{}{path}", http.base),
    };
    let mut url = reqwest::Url::parse(&url).context("artifact url")?;
    if let Some(f) = r.file {
        url.query_pairs_mut().append_pair("file", f);
    }
    let mut last_progress = String::new();
    loop {
        let resp = http
            .client
            .get(url.clone())
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        match resp.status().as_u16() {
            200 => return save(resp, r.output, r.json).await,
            202 => {
                let v: serde_json::Value = resp.json().await.context("reading progress")?;
                let line = format!(
                    "{}{}",
                    v["state"].as_str().unwrap_or("?"),
                    v["last_line"]
                        .as_str()
                        .map(|l| format!(": {l}"))
                        .unwrap_or_default()
                );
                if line != last_progress && !r.json {
                    eprintln!("gomote: {line}");
                    last_progress = line;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            409 => {
                let v: serde_json::Value = resp.json().await.context("reading the result")?;
                let log_url = v["log_url"].as_str().unwrap_or_default();
                let log = http
                    .client
                    .get(format!("{}{log_url}", http.base))
                    .send()
                    .await
                    .ok();
                let tail = match log {
                    Some(l) => l.text().await.unwrap_or_default(),
                    None => String::new(),
                };
                let tail: Vec<&str> = tail.lines().rev().take(20).collect();
                for l in tail.iter().rev() {
                    eprintln!("  {l}");
                }
                bail!(
                    "build {} {}: {} (log: {}{log_url})",
                    v["build_id"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?"),
                    v["summary"].as_str().unwrap_or(""),
                    http.base
                );
            }
            300 => {
                let v: serde_json::Value = resp.json().await.context("reading the file list")?;
                let names: Vec<&str> = v["files"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|f| f["name"].as_str()).collect())
                    .unwrap_or_default();
                bail!(
                    "the build made several files; pick one with --file: {}",
                    names.join(", ")
                );
            }
            _ => return Err(refusal("download", resp).await),
        }
    }
}

/// The `filename` of a `Content-Disposition: attachment; filename="..."`.
fn disposition_name(resp: &reqwest::Response) -> Option<String> {
    let v = resp
        .headers()
        .get(reqwest::header::CONTENT_DISPOSITION)?
        .to_str()
        .ok()?;
    let name = v.split("filename=").nth(1)?.trim().trim_matches('"');
    // Only a plain file name goes on the local disk.
    let name = Path::new(name).file_name()?.to_str()?.to_owned();
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

async fn save(resp: reqwest::Response, output: Option<&Path>, json: bool) -> Result<()> {
    let want = resp
        .headers()
        .get("x-checksum-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .context("the coordinator sent no x-checksum-sha256 header")?;
    let out: PathBuf = match output {
        Some(p) => p.to_owned(),
        None => PathBuf::from(disposition_name(&resp).context("no file name: give -o FILE")?),
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("downloading")?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        tmp.write_all(&chunk).context("writing the download")?;
    }
    let got = hex::encode(hasher.finalize());
    if got != want {
        bail!("download corrupted: sha256 {got}, the coordinator says {want}; nothing saved");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o755));
    }
    tmp.persist(&out)
        .map_err(|e| e.error)
        .with_context(|| format!("saving {}", out.display()))?;
    if json {
        println!(
            "{}",
            serde_json::json!({"file": out.display().to_string(), "size": size, "sha256": got})
        );
    } else {
        let msg = format!("saved {} ({size} bytes, sha256 {got})", out.display());
        if std::io::stdout().is_terminal() {
            println!("{msg}");
        } else {
            println!("{}", out.display());
            eprintln!("gomote: {msg}");
        }
    }
    Ok(())
}
