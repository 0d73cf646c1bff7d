//! `gomote watch` and `gomote try --watch` end to end: a real coordinator with local
//! buildlets, the real `gomote` binary watching a real directory (or git checkout),
//! edits made to it while it runs, real Go builds for the try runs.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::*;

fn config(data_dir: &Path) -> String {
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"

[[host_types]]
name = "local"
pool = {{ kind = "local", count = 1 }}

[[builders]]
name = "linux-amd64"
host_type = "local"
env = {{ WATCH_MARK = "from-the-builder" }}
steps = [{{ name = "build", command = ["go", "build", "./..."] }}]
"#,
        data = data_dir.display(),
    )
}

/// What a running gomote has printed so far, line by line, from both streams.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn follow(&self, from: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        });
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().expect("lines").clone()
    }

    fn text(&self) -> String {
        self.all().join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.all().iter().filter(|l| l.contains(needle)).count()
    }

    async fn wait_for(&self, needle: &str) {
        eventually(&format!("{needle:?} in the output"), || {
            (self.count(needle) > 0).then_some(())
        })
        .await;
    }
}

/// Processes on this machine whose command line contains `needle`.
fn processes_with(needle: &str) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    rd.flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_pushes_changes_and_reruns_cancelling_a_run_in_progress() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, config(&data)).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    let out = farm
        .gomote()
        .args(["create", "linux-amd64"])
        .output()
        .expect("gomote create");
    assert!(out.status.success(), "{out:?}");
    let inst = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    // The tree: files to send, a .git dir and an ignored file that must not be sent.
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join(".git")).expect("mkdir");
    std::fs::write(src.join(".git/HEAD"), "ref: refs/heads/main\n").expect("write");
    std::fs::write(src.join(".gitignore"), "*.tmp\n").expect("write");
    std::fs::write(src.join("scratch.tmp"), "ignored").expect("write");
    std::fs::write(src.join("msg.txt"), "one\n").expect("write");
    std::fs::write(src.join("extra.txt"), "to be deleted\n").expect("write");
    // Prints what it was given; "slow" makes it sleep in a process we can look for (as
    // `sleep 3171`, which gomote's own command line, holding the script, does not say).
    let script = "printf 'msg=%s mark=%s\\n' \"$(cat msg.txt)\" \"$WATCH_MARK\"; \
                  ls -A | tr '\\n' ' ' | sed 's/^/files: /'; echo; \
                  if grep -q slow msg.txt; then sleep $((3000 + 171)); fi";
    let mut child = farm
        .gomote()
        .args([
            "watch",
            &inst,
            "--src",
            src.to_str().expect("utf-8"),
            "--dest",
            "tree",
            "--debounce",
            "1s",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gomote watch");
    let lines = Lines::default();
    lines.follow(child.stdout.take().expect("stdout"));
    lines.follow(child.stderr.take().expect("stderr"));

    // First run: everything but .git and the ignored file, with the builder's env. The
    // run's output arrives on stdout, read apart from the watch's own lines on stderr,
    // so each is waited for rather than expected in order.
    lines.wait_for("run 1 exited 0").await;
    lines.wait_for("msg=one mark=from-the-builder").await;
    lines.wait_for("files: .gitignore extra.txt msg.txt").await;
    let text = lines.text();
    assert!(text.contains("run 1: pushed 3 changed file(s)"), "{text}");

    // A burst of saves is one run, and only the changed file is sent; a deleted file
    // is removed on the instance.
    for i in 0..5 {
        std::fs::write(src.join("msg.txt"), format!("two {i}\n")).expect("write");
    }
    std::fs::remove_file(src.join("extra.txt")).expect("remove");
    lines.wait_for("run 2 exited 0").await;
    lines.wait_for("msg=two 4 mark=").await;
    // extra.txt is gone on the instance (with it, the line would name it between).
    lines.wait_for("files: .gitignore msg.txt").await;
    let text = lines.text();
    assert!(
        text.contains("run 2: pushed 1 changed file(s), removed 1"),
        "{text}"
    );

    // Saves that change nothing the instance sees run nothing: an ignored file, a file
    // under .git, and a file rewritten with the same bytes. The slow run below must be
    // run 3, so any run here would show as a wrong number.
    std::fs::write(src.join("scratch.tmp"), "still ignored").expect("write");
    std::fs::write(src.join(".git/HEAD"), "ref: refs/heads/other\n").expect("write");
    std::fs::write(src.join("msg.txt"), "two 4\n").expect("write");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    // A save during a run cancels it (its processes die on the buildlet) and starts
    // the next.
    std::fs::write(src.join("msg.txt"), "slow\n").expect("write");
    lines.wait_for("msg=slow").await;
    assert_eq!(
        lines.count("run 3: pushed 1 changed file(s)"),
        1,
        "{}",
        lines.text()
    );
    eventually("the slow command to run", || {
        (processes_with("sleep 3171") > 0).then_some(())
    })
    .await;
    std::fs::write(src.join("msg.txt"), "three\n").expect("write");
    lines.wait_for("run 3 cancelled").await;
    lines.wait_for("run 4 exited 0").await;
    assert!(lines.text().contains("msg=three"), "{}", lines.text());
    eventually("the cancelled command's processes to die", || {
        (processes_with("sleep 3171") == 0).then_some(())
    })
    .await;
    assert_eq!(lines.count("exited"), 3, "{}", lines.text());

    // Ctrl-C stops watching cleanly.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}\n{}", lines.text());
    farm.kill().await;
}

fn try_config(data_dir: &Path, repo: &Path, host_builder: &str) -> String {
    let gocache = data_dir.join("gocache");
    format!(
        r#"
[coordinator]
listen = "127.0.0.1:0"
data_dir = "{data}"
repo_poll_interval = "1h"

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
"#,
        data = data_dir.display(),
        repo = repo.display(),
        gocache = gocache.display(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn try_watch_starts_a_try_run_per_change_of_the_checkout() {
    let host_builder = match std::env::consts::ARCH {
        "aarch64" => "linux-arm64",
        _ => "linux-amd64",
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let repo = tmp.path().join("repo");
    make_go_repo(&repo);
    let cfg = tmp.path().join("coordinator.toml");
    std::fs::write(&cfg, try_config(&data, &repo, host_builder)).expect("write config");
    let farm = TestFarm::start(&cfg, &data).await;
    let work = tmp.path().join("work");
    git(
        tmp.path(),
        &["clone", "--quiet", repo.to_str().expect("utf-8"), "work"],
    );
    std::fs::write(work.join(".gitignore"), "*.tmp\n").expect("write");

    let mut child = farm
        .gomote()
        .args([
            "try",
            "t",
            "main",
            "--builders",
            host_builder,
            "--watch",
            "--src",
        ])
        .arg(&work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gomote try --watch");
    let lines = Lines::default();
    lines.follow(child.stdout.take().expect("stdout"));
    lines.follow(child.stderr.take().expect("stderr"));

    // The untracked .gitignore is a local change: the first run already has a patch.
    lines.wait_for("try 1 (").await;
    assert!(lines.text().contains("-byte patch"), "{}", lines.text());
    wait_verdict(&lines, 1, "ok").await;

    // A tracked change that breaks the test fails; fixing it with an untracked file
    // passes again. An ignored file alone starts nothing.
    std::fs::write(
        work.join("hello.go"),
        "package t\n\n// Hello greets.\nfunc Hello() string { return greeting }\n",
    )
    .expect("write");
    wait_verdict(&lines, 2, "failed").await;
    std::fs::write(work.join("scratch.tmp"), "ignored").expect("write");
    std::fs::write(
        work.join("greeting.go"),
        "package t\n\nconst greeting = \"hello\"\n",
    )
    .expect("write");
    wait_verdict(&lines, 3, "ok").await;

    // A change while a run is in progress cancels it and starts the next.
    std::fs::write(
        work.join("slow_test.go"),
        "package t\n\nimport (\n\t\"testing\"\n\t\"time\"\n)\n\n\
         func TestSlow(t *testing.T) { time.Sleep(300 * time.Second) }\n",
    )
    .expect("write");
    lines.wait_for("try 4 (").await;
    let try4 = lines
        .all()
        .iter()
        .find_map(|l| {
            l.split("try 4 (")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .map(str::to_owned)
        })
        .expect("try 4's id");
    let running = format!("{host_builder}: running");
    eventually("try 4 to be running", || {
        let all = lines.all();
        let start = all.iter().position(|l| l.contains("try 4 ("))?;
        all[start..].iter().any(|l| l == &running).then_some(())
    })
    .await;
    std::fs::remove_file(work.join("slow_test.go")).expect("remove");
    lines.wait_for(&format!("try 4 ({try4}) cancelled")).await;
    wait_verdict(&lines, 5, "ok").await;
    assert_eq!(lines.count("): verdict "), 4, "{}", lines.text());

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}\n{}", lines.text());
    farm.kill().await;
}

/// Waits for try run `n`'s verdict banner and checks the verdict.
async fn wait_verdict(lines: &Lines, n: u32, want: &str) {
    let prefix = format!("try {n} (");
    let verdict = eventually(&format!("a verdict for try {n}"), || {
        lines.all().iter().find_map(|l| {
            let rest = l.split(&prefix).nth(1)?;
            let v = rest.split("): verdict ").nth(1)?;
            Some(v.split_whitespace().next()?.to_owned())
        })
    })
    .await;
    assert_eq!(verdict, want, "try {n}: {}", lines.text());
}
