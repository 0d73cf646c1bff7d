//! Artifacts on request, end to end: a real coordinator with local buildlets builds real
//! Go modules (natively and cross-compiled for windows), serves the files with their
//! digest, ranges and names, shares identical requests, resolves branches and tags,
//! reports failed builds with their logs, keeps builders' declared artifacts, forgets old
//! artifacts by the retention policy, and `gomote artifact` fetches one.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn host_platform() -> (&'static str, &'static str) {
    match std::env::consts::ARCH {
        "aarch64" => ("linux", "arm64"),
        _ => ("linux", "amd64"),
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A git repo holding the example module (`cmd/hello` is its main package), tagged v1.0.0.
fn hello_repo(dir: &Path) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../env/examples/hello");
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.expect("walk example");
        let rel = entry.path().strip_prefix(&src).expect("rel");
        let dest = dir.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).expect("mkdir");
        } else {
            std::fs::copy(entry.path(), &dest).expect("copy");
        }
    }
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "--quiet", "-m", "hello"]);
    git(dir, &["tag", "v1.0.0"]);
    git(dir, &["rev-parse", "HEAD"])
}

/// A repo with one file set, committed on main.
fn small_repo(dir: &Path, files: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir).expect("mkdir");
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write");
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "--quiet", "-m", "first"]);
    git(dir, &["rev-parse", "HEAD"])
}

fn config(data: &Path, builder_steps: &str, repos: &str, extra: &str) -> String {
    let (goos, goarch) = host_platform();
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1s"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 2 }}
env = {{ GOCACHE = "{gocache}", GOFLAGS = "-mod=mod" }}

[[builders]]
name = "{goos}-{goarch}"
host_type = "local"
{builder_steps}
{extra}
{repos}
"#,
        data = data.display(),
        gocache = data.join("gocache").display(),
    )
}

struct Farm {
    _tmp: tempfile::TempDir,
    farm: TestFarm,
    token: String,
}

impl Farm {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.farm.addr)
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        let resp = self
            .farm
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("POST");
        let code = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.farm
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("GET")
    }

    /// GETs `path` until it is no longer 202; returns that answer.
    async fn wait_done(&self, path: &str) -> reqwest::Response {
        let deadline = Instant::now() + WAIT;
        loop {
            let resp = self.get(path).await;
            if resp.status().as_u16() != 202 {
                return resp;
            }
            assert!(Instant::now() < deadline, "{path} still building");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Every artifact build in the store (read through a second store handle).
    async fn artifact_builds(&self) -> Vec<buildfarm_store::Build> {
        let url = format!(
            "sqlite://{}",
            self.farm.data_dir.join("buildfarm.db").display()
        );
        let store = buildfarm_store::open(&url).await.expect("open store");
        let mut builds: Vec<_> = store
            .recent_builds(1000)
            .await
            .expect("recent")
            .into_iter()
            .chain(store.list_unfinished_builds().await.expect("unfinished"))
            .filter(|b| b.kind == buildfarm_store::BuildKind::Artifact)
            .collect();
        builds.sort_by(|a, b| a.id.cmp(&b.id));
        store.close().await;
        builds
    }
}

async fn start(cfg: String, tmp: tempfile::TempDir) -> Farm {
    let data = tmp.path().join("data");
    let path = tmp.path().join("coordinator.toml");
    std::fs::write(&path, cfg).expect("write config");
    let farm = TestFarm::start(&path, &data).await;
    let token = farm.issue_token("gopher");
    Farm {
        _tmp: tmp,
        farm,
        token,
    }
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", resp.headers()))
        .to_str()
        .expect("header text")
}

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_are_built_shared_resolved_and_downloaded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("hello");
    let tagged = hello_repo(&repo);
    let data = tmp.path().join("data");
    let cfg = config(
        &data,
        r#"steps = [{ name = "vet", command = ["go", "vet", "./..."] }]"#,
        &format!(
            "[[repos]]\nname = \"hello\"\nurl = \"{}\"\n",
            repo.display()
        ),
        "",
    );
    let f = start(cfg, tmp).await;
    let (goos, goarch) = host_platform();
    let native = format!("/artifacts/hello/{goos}/{goarch}/v1.0.0");

    // Asking is a state change: it needs a user token.
    let resp = f.farm.http.post(f.url(&native)).send().await.expect("POST");
    assert_eq!(resp.status().as_u16(), 401);
    let resp = f
        .farm
        .http
        .post(f.url(&native))
        .bearer_auth("gopher.00")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 401, "an unknown token");
    // A viewer may download but not ask for a build.
    let viewer = f.farm.issue_token_with_role("watcher", "viewer");
    let resp = f
        .farm
        .http
        .post(f.url(&native))
        .bearer_auth(viewer)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 403, "a viewer's request");
    // Nothing asked yet: a GET says how to start one.
    let resp = f.get(&native).await;
    assert_eq!(resp.status().as_u16(), 404);
    assert!(resp.text().await.unwrap().contains("POST"));

    // The tag resolves to its commit; asking twice shares the build.
    let (code, first) = f.post(&native).await;
    assert!(code == 202 || code == 200, "{code} {first}");
    assert_eq!(first["commit"], tagged.as_str());
    assert_eq!(first["created"], true);
    assert_eq!(first["target"], format!("{goos}-{goarch}"));
    let (_, second) = f.post(&native).await;
    assert_eq!(second["build_id"], first["build_id"]);
    assert_eq!(second["created"], false);

    let resp = f.wait_done(&native).await;
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.headers());
    let sha = header(&resp, "x-checksum-sha256").to_owned();
    let etag = header(&resp, "etag").to_owned();
    let disposition = header(&resp, "content-disposition").to_owned();
    assert_eq!(header(&resp, "accept-ranges"), "bytes");
    assert!(header(&resp, "repr-digest").starts_with("sha-256=:"));
    let body = resp.bytes().await.expect("body").to_vec();
    assert_eq!(sha256_hex(&body), sha, "the body is what the header says");
    assert_eq!(etag, format!("\"{sha}\""));
    assert_eq!(
        disposition,
        format!("attachment; filename=\"hello-v1.0.0-{goos}-{goarch}\"")
    );
    assert!(body.starts_with(b"\x7fELF"), "a linux executable");
    // It is the example program, built for this machine: run it.
    let exe = f.farm.data_dir.join("downloaded-hello");
    std::fs::write(&exe, &body).expect("write exe");
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let out = std::process::Command::new(&exe)
        .output()
        .expect("run the artifact");
    assert!(out.status.success(), "{out:?}");
    assert!(!out.stdout.is_empty(), "the program printed its greeting");

    // Exactly one artifact build for both requests.
    let builds = f.artifact_builds().await;
    assert_eq!(builds.len(), 1, "{builds:#?}");
    assert_eq!(builds[0].rev, tagged);

    // A range is the right slice of the same bytes.
    let resp = f
        .farm
        .http
        .get(f.url(&native))
        .header("range", "bytes=100-1123")
        .send()
        .await
        .expect("range");
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(
        header(&resp, "content-range"),
        format!("bytes 100-1123/{}", body.len())
    );
    assert_eq!(header(&resp, "x-checksum-sha256"), sha);
    assert_eq!(
        resp.bytes().await.expect("slice").as_ref(),
        &body[100..1124]
    );
    // A client holding the file revalidates by its digest.
    let resp = f
        .farm
        .http
        .get(f.url(&native))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("revalidate");
    assert_eq!(resp.status().as_u16(), 304);

    // The same commit named by its hash is the same artifact (no new build).
    let (_, by_hash) = f
        .post(&format!("/artifacts/hello/{goos}/{goarch}/{tagged}"))
        .await;
    assert_eq!(by_hash["build_id"], first["build_id"]);

    // A branch resolves to its newest commit (fetched on request), cross-compiled for
    // windows on the linux buildlets.
    std::fs::write(repo.join("NEWS"), "second commit\n").expect("write");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "--quiet", "-m", "second"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let windows = "/artifacts/hello/windows/amd64/main";
    let (code, win) = f.post(windows).await;
    assert!(code == 202 || code == 200, "{code} {win}");
    assert_eq!(
        win["commit"],
        head.as_str(),
        "main resolved to its new head"
    );
    let win_url = win["url"].as_str().expect("url").to_owned();
    assert!(win_url.ends_with(&head), "{win_url}");
    let resp = f.wait_done(&win_url).await;
    assert_eq!(resp.status().as_u16(), 200);
    let win_sha = header(&resp, "x-checksum-sha256").to_owned();
    assert_eq!(
        header(&resp, "content-disposition"),
        format!("attachment; filename=\"hello-{head}-windows-amd64.exe\"")
    );
    let win_body = resp.bytes().await.expect("body");
    assert!(win_body.starts_with(b"MZ"), "a windows executable");
    assert_eq!(sha256_hex(&win_body), win_sha);
    // The log of a build is at the sibling URL.
    let log = f.get(&format!("{win_url}/log")).await.text().await.unwrap();
    assert!(log.contains("go build -trimpath"), "{log}");
    assert!(log.contains("hello.exe"), "{log}");

    // Bad requests say what is wrong.
    for (path, code, says) in [
        ("/artifacts/nope/linux/amd64/main", 404, "unknown repo"),
        ("/artifacts/hello/plan10/amd64/main", 400, "unknown GOOS"),
        ("/artifacts/hello/linux/amd65/main", 400, "unknown GOARCH"),
        ("/artifacts/hello/linux/amd64/a..b", 400, "bad version"),
        ("/artifacts/hello/linux/amd64/-n", 400, "bad version"),
        (
            "/artifacts/hello/linux/amd64/v9.9.9",
            404,
            "unknown version",
        ),
    ] {
        let (got, body) = f.post(path).await;
        assert_eq!(got, code, "{path}: {body}");
        assert!(body.to_string().contains(says), "{path}: {body}");
        let resp = f.get(path).await;
        assert_eq!(resp.status().as_u16(), code, "GET {path}");
    }

    // gomote asks, waits and downloads the same bytes (checked against the digest).
    let out_file = f.farm.data_dir.join("from-gomote");
    let out = f
        .farm
        .gomote()
        .args(["artifact", "hello", goos, goarch, "v1.0.0", "-o"])
        .arg(&out_file)
        .output()
        .expect("gomote artifact");
    assert!(
        out.status.success(),
        "stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&out_file).expect("read"), body);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(shared)"));
    let out = f
        .farm
        .gomote()
        .args(["artifact", "hello", "linux", "amd64", "no-such-branch"])
        .output()
        .expect("gomote artifact");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown version"));

    assert_eq!(f.artifact_builds().await.len(), 2, "linux and windows");
    f.farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn make_targets_progress_failures_and_declared_artifacts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let marker = shared.join("go-ahead");
    let makefile = format!(
        "dist:\n\t@echo waiting for the test to say go\n\t@while [ ! -e {m} ]; do sleep 0.2; done\n\tgo build -trimpath -o dist/ ./...\n\techo notes > dist/NOTES\n",
        m = marker.display()
    );
    let tool = tmp.path().join("tool");
    small_repo(
        &tool,
        &[
            ("go.mod", "module example.com/tool\n\ngo 1.19\n"),
            (
                "main.go",
                "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"tool\") }\n",
            ),
            ("Makefile", &makefile),
        ],
    );
    let broken = tmp.path().join("broken");
    small_repo(
        &broken,
        &[
            ("go.mod", "module example.com/broken\n\ngo 1.19\n"),
            (
                "main.go",
                "package main\n\nfunc main() { notDefinedAnywhere() }\n",
            ),
        ],
    );
    let hello = tmp.path().join("hello");
    let hello_rev = hello_repo(&hello);
    let data = tmp.path().join("data");
    let repos = format!(
        r#"
[sandbox]
writable_paths = ["{shared}"]

[[repos]]
name = "tool"
url = "{tool}"
artifacts = {{ make_target = "dist", outputs = ["dist/*"] }}

[[repos]]
name = "broken"
url = "{broken}"

[[repos]]
name = "hello"
url = "{hello}"
"#,
        shared = shared.display(),
        tool = tool.display(),
        broken = broken.display(),
        hello = hello.display(),
    );
    let cfg = config(
        &data,
        r#"steps = [{ name = "build", command = ["go", "build", "-o", "bin/", "./..."] }]
artifacts = ["bin/*"]
repos = ["hello"]"#,
        &repos,
        // The only builder of tool and broken: their artifacts are cross-built on its
        // host type.
        r#"
[[builders]]
name = "windows-amd64"
host_type = "local"
env = { GOOS = "windows", GOARCH = "amd64", CGO_ENABLED = "0" }
steps = [{ name = "vet", command = ["go", "vet", "./..."] }]
"#,
    );
    let f = start(cfg, tmp).await;

    // The make target runs; while it waits, GET answers 202 with its progress.
    let tool_url = "/artifacts/tool/windows/arm64/main";
    let (code, asked) = f.post(tool_url).await;
    assert_eq!(code, 202, "{asked}");
    let progress = eventually_async(|| async {
        let resp = f.get(tool_url).await;
        assert_eq!(resp.status().as_u16(), 202, "still waiting for the marker");
        let v: Value = resp.json().await.expect("json");
        let waiting = v["last_line"]
            .as_str()
            .is_some_and(|l| l.contains("waiting for the test to say go"));
        waiting.then_some(v)
    })
    .await;
    assert_eq!(progress["state"], "running");
    assert_eq!(progress["build_id"], asked["build_id"]);
    std::fs::write(&marker, "go").expect("marker");
    // Two outputs: the list, then each by name.
    let resp = f.wait_done(tool_url).await;
    assert_eq!(resp.status().as_u16(), 300);
    let list: Value = resp.json().await.expect("json");
    let names: Vec<&str> = list["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dist/NOTES", "dist/tool.exe"]);
    let resp = f.get(&format!("{tool_url}?file=dist/tool.exe")).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        header(&resp, "content-disposition"),
        "attachment; filename=\"tool.exe\""
    );
    let sha = header(&resp, "x-checksum-sha256").to_owned();
    let exe = resp.bytes().await.expect("body");
    assert!(exe.starts_with(b"MZ"));
    assert_eq!(sha256_hex(&exe), sha);
    assert_eq!(list["files"][1]["sha256"], sha.as_str());

    // A build command that fails: a clear failed state, and its log.
    let broken_url = "/artifacts/broken/linux/amd64/main";
    let (code, _) = f.post(broken_url).await;
    assert_eq!(code, 202);
    let resp = f.wait_done(broken_url).await;
    assert_eq!(resp.status().as_u16(), 409);
    let failed: Value = resp.json().await.expect("json");
    assert_eq!(failed["state"], "failed");
    let summary = failed["summary"].as_str().expect("summary");
    assert!(
        summary.starts_with("step build exited with status "),
        "{summary}"
    );
    let log = f
        .get(&format!("{broken_url}/log"))
        .await
        .text()
        .await
        .unwrap();
    assert!(log.contains("notDefinedAnywhere"), "{log}");
    let out = f
        .farm
        .gomote()
        .args(["artifact", "broken", "linux", "amd64", "main"])
        .output()
        .expect("gomote artifact");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed"), "{stderr}");
    assert!(stderr.contains("notDefinedAnywhere"), "{stderr}");

    // The post-submit build of hello keeps bin/hello, linked from its page.
    let builds = f.farm.wait_final_builds("hello", &hello_rev, 1).await;
    assert_eq!(builds[0]["state"], "ok", "{builds:#?}");
    let id = builds[0]["id"].as_str().expect("id");
    let page = f.farm.get_json(&format!("/api/builds/{id}")).await;
    let link = page["artifacts"][0]["url"].as_str().expect("artifact link");
    assert_eq!(link, format!("/build/{id}/artifacts/bin/hello"));
    assert!(
        page["summary"]
            .as_str()
            .unwrap()
            .contains("1 artifact kept")
    );
    let html = f.farm.get_text(&format!("/build/{id}")).await;
    assert!(html.contains(&format!("href=\"{link}\"")), "{html}");
    let resp = f.get(link).await;
    assert_eq!(resp.status().as_u16(), 200);
    let sha = header(&resp, "x-checksum-sha256").to_owned();
    assert_eq!(page["artifacts"][0]["sha256"], sha.as_str());
    let bin = resp.bytes().await.expect("bin");
    assert_eq!(sha256_hex(&bin), sha);
    assert_eq!(
        f.get(&format!("/build/{id}/artifacts/bin/nope"))
            .await
            .status()
            .as_u16(),
        404
    );
    f.farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_old_artifacts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("hello");
    hello_repo(&repo);
    let data = tmp.path().join("data");
    let cfg = config(
        &data,
        r#"steps = [{ name = "vet", command = ["go", "vet", "./..."] }]"#,
        &format!(
            "[[repos]]\nname = \"hello\"\nurl = \"{}\"\n",
            repo.display()
        ),
        "\n[artifacts]\nmax_age = \"3s\"\nsweep_interval = \"1s\"\n",
    );
    let f = start(cfg, tmp).await;
    let (goos, goarch) = host_platform();
    let url = format!("/artifacts/hello/{goos}/{goarch}/v1.0.0");
    let (_, first) = f.post(&url).await;
    let resp = f.wait_done(&url).await;
    assert_eq!(resp.status().as_u16(), 200);
    let sha = header(&resp, "x-checksum-sha256").to_owned();
    let blob: PathBuf = f
        .farm
        .data_dir
        .join("artifacts/sha256")
        .join(&sha[..2])
        .join(&sha);
    assert!(blob.is_file(), "stored by its digest at {}", blob.display());

    // Past max_age the sweep forgets it and removes the file.
    let gone = eventually_async(|| async {
        let resp = f.get(&url).await;
        (resp.status().as_u16() == 410).then_some(resp)
    })
    .await;
    assert!(gone.text().await.unwrap().contains("retention"));
    assert!(!blob.exists(), "the content is removed too");

    // Asking again builds again.
    let (_, again) = f.post(&url).await;
    assert_eq!(again["created"], true);
    assert_ne!(again["build_id"], first["build_id"]);
    let resp = f.wait_done(&url).await;
    assert_eq!(resp.status().as_u16(), 200);
    f.farm.kill().await;
}

/// Polls an async check until it returns Some (generous deadline).
async fn eventually_async<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
