//! A test farm: a real `coordinator` process with a config written per test, real
//! local `buildlet` processes, a real git repository holding a small Go module, and
//! helpers to read results over the coordinator's HTTP JSON.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Generous: these run several processes and Go builds on a shared two-core machine.
pub const WAIT: Duration = Duration::from_secs(240);

pub fn bin_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_coordinator"));
    exe.parent().expect("bin dir").to_path_buf()
}

pub fn buildlet_bin() -> PathBuf {
    let p = bin_dir().join("buildlet");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build --bin buildlet`; `cargo nextest run --workspace` does)",
        p.display()
    );
    p
}

pub fn gomote_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gomote"))
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A git repo with a Go module whose test fails when HELLO_FAIL is set.
pub fn make_go_repo(dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("mkdir repo");
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(dir.join("go.mod"), "module example.com/t\n\ngo 1.19\n").expect("write");
    std::fs::write(
        dir.join("hello.go"),
        "package t\n\n// Hello greets.\nfunc Hello() string { return \"hello\" }\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("hello_test.go"),
        "package t\n\nimport (\n\t\"os\"\n\t\"testing\"\n)\n\n\
         func TestHello(t *testing.T) {\n\
         \tif os.Getenv(\"HELLO_FAIL\") != \"\" {\n\t\tt.Fatal(\"intentional failure for the farm's test\")\n\t}\n\
         \tif Hello() != \"hello\" {\n\t\tt.Fatalf(\"got %q\", Hello())\n\t}\n}\n",
    )
    .expect("write");
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "--quiet", "-m", "first commit"]);
    git(dir, &["rev-parse", "HEAD"])
}

pub struct TestFarm {
    pub child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub http: reqwest::Client,
}

impl TestFarm {
    /// Starts `coordinator --config <config>` (the config's data dir must be set) and
    /// waits for its status-page line.
    pub async fn start(config_path: &Path, data_dir: &Path) -> TestFarm {
        Self::start_with_env(config_path, data_dir, &[]).await
    }

    pub async fn start_with_env(
        config_path: &Path,
        data_dir: &Path,
        env: &[(&str, &str)],
    ) -> TestFarm {
        Self::start_with_buildlet(config_path, data_dir, env, &buildlet_bin()).await
    }

    /// Like [`TestFarm::start_with_env`], running local buildlets from `buildlet`.
    pub async fn start_with_buildlet(
        config_path: &Path,
        data_dir: &Path,
        env: &[(&str, &str)],
        buildlet: &Path,
    ) -> TestFarm {
        // reqwest is built without a default crypto provider.
        buildfarm_tls::install_crypto_provider();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        cmd.arg("--config")
            .arg(config_path)
            .arg("--buildlet")
            .arg(buildlet)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn coordinator");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(rest) = line.trim().strip_prefix("status page: http://") {
                    return rest.trim_end_matches('/').to_owned();
                }
            }
            panic!("coordinator exited before printing its address");
        })
        .await
        .expect("coordinator start timed out");
        // Keep draining stdout so the coordinator never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        TestFarm {
            child,
            addr,
            data_dir: data_dir.to_owned(),
            config_path: config_path.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let url = format!("http://{}{path}", self.addr);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
        resp.json().await.expect("json")
    }

    pub async fn get_text(&self, path: &str) -> String {
        let url = format!("http://{}{path}", self.addr);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        resp.text().await.expect("text")
    }

    /// Builds of `rev`, waiting until `n` of them are final.
    pub async fn wait_final_builds(&self, repo: &str, rev: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self
                .get_json(&format!("/api/builds?repo={repo}&rev={rev}"))
                .await;
            let builds = v.as_array().cloned().unwrap_or_default();
            let finals: Vec<Value> = builds
                .into_iter()
                .filter(|b| !matches!(b["state"].as_str(), Some("queued" | "running")))
                .collect();
            if finals.len() >= n {
                return finals;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} final builds of {rev}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until the build of `rev` on `builder` is running and returns it.
    pub async fn wait_running(&self, repo: &str, rev: &str, builder: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self
                .get_json(&format!("/api/builds?repo={repo}&rev={rev}"))
                .await;
            if let Some(b) = v.as_array().and_then(|a| {
                a.iter()
                    .find(|b| b["state"] == "running" && b["builder"] == builder)
            }) {
                return b.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a running build of {rev}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A developer token for `user`, issued by the coordinator's CLI into this farm's
    /// store.
    pub fn issue_token(&self, user: &str) -> String {
        self.issue_token_with_role(user, "developer")
    }

    /// A token for `user` with `role`, issued by the coordinator's CLI.
    pub fn issue_token_with_role(&self, user: &str, role: &str) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .arg("--config")
            .arg(&self.config_path)
            .args(["token", "issue", user, "--role", role])
            .output()
            .expect("issue token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn gomote(&self) -> std::process::Command {
        let mut c = std::process::Command::new(gomote_bin());
        c.env("BUILDFARM_GOMOTE_CONFIG", self.data_dir.join("gomote.json"));
        c
    }

    /// Starts `gomote try REPO REV --builders BUILDERS`, which watches the run until it
    /// ends; returns the watcher and the try run's id (its first line on stderr).
    pub fn watch_try(
        &self,
        repo: &str,
        rev: &str,
        builders: &str,
    ) -> (std::process::Child, String) {
        let mut watcher = self
            .gomote()
            .args(["try", repo, rev, "--builders", builders])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("gomote try");
        let stderr = watcher.stderr.take().expect("stderr");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
        let first = lines.next().expect("a line").expect("read");
        let try_id = first
            .strip_prefix("gomote: try run ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        // Keep draining so gomote never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        (watcher, try_id)
    }

    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Waits (polling) until `f` returns Some.
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// PIDs of buildlet processes whose command line mentions `needle`.
pub fn buildlet_pids(needle: &str) -> Vec<i32> {
    let mut pids = vec![];
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("buildlet") && cmdline.contains(needle) && cmdline.contains("--listen")
        {
            pids.push(pid);
        }
    }
    pids
}

/// True if `pid` or one of its descendants has `needle` in its command line.
pub fn process_tree_contains(pid: i32, needle: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline)
        .replace('\0', " ")
        .contains(needle)
    {
        return true;
    }
    // Children are listed per thread, and a tokio process spawns from any thread.
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        children
            .push_str(&std::fs::read_to_string(task.path().join("children")).unwrap_or_default());
        children.push(' ');
    }
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .any(|c| process_tree_contains(c, needle))
}
