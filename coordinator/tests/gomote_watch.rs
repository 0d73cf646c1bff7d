//! `gomote watch` end to end: a real coordinator with a local buildlet, the real
//! `gomote` binary watching a real directory, edits made to it while it runs.

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

    // First run: everything but .git and the ignored file, with the builder's env.
    lines.wait_for("run 1 exited 0").await;
    let text = lines.text();
    assert!(
        text.contains("msg=one mark=from-the-builder"),
        "first run: {text}"
    );
    assert!(
        text.contains("files: .gitignore extra.txt msg.txt"),
        "first run: {text}"
    );
    assert!(text.contains("run 1: pushed 3 changed file(s)"), "{text}");

    // A burst of saves is one run, and only the changed file is sent; a deleted file
    // is removed on the instance.
    for i in 0..5 {
        std::fs::write(src.join("msg.txt"), format!("two {i}\n")).expect("write");
    }
    std::fs::remove_file(src.join("extra.txt")).expect("remove");
    lines.wait_for("run 2 exited 0").await;
    let text = lines.text();
    assert!(text.contains("msg=two 4 mark="), "second run: {text}");
    assert!(
        text.contains("run 2: pushed 1 changed file(s), removed 1"),
        "{text}"
    );
    assert!(text.contains("files: .gitignore msg.txt \n"), "{text}");

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
