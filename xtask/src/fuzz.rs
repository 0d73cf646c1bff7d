//! `cargo xtask fuzz [--seconds N] [filter]`: runs each cargo-fuzz target of `fuzz/` for a
//! bounded time under libFuzzer, then prints executions, speed and coverage per target.
//!
//! Needs a nightly toolchain and cargo-fuzz; says how to get them rather than installing
//! anything. New inputs go to `fuzz/corpus-new/<target>/` (ignored by git); the committed
//! seeds in `fuzz/corpus/<target>/` are read only. A crash is saved by libFuzzer under
//! `fuzz/artifacts/<target>/` and fails the task: copy it into the corpus and fix the bug.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Every target in `fuzz/Cargo.toml`, each a thin wrapper around a body that also runs in
/// `cargo test`.
pub const TARGETS: &[&str] = &[
    "tar_extract",
    "revdial_handshake",
    "config_parse",
    "webhook",
    "try_patch",
];

/// What libFuzzer reported for one target.
#[derive(Debug, Default)]
struct Stats {
    execs: Option<u64>,
    execs_per_sec: Option<u64>,
    coverage: Option<u64>,
    features: Option<u64>,
    corpus: Option<String>,
}

pub fn run(root: &Path, seconds: u64, filter: Option<&str>) -> Result<()> {
    check_tools()?;
    let fuzz_dir = root.join("fuzz");
    // The fuzz crate is outside the workspace; start it from the workspace's versions.
    let lock = fuzz_dir.join("Cargo.lock");
    if !lock.exists() {
        std::fs::copy(root.join("Cargo.lock"), &lock).context("copying Cargo.lock into fuzz/")?;
    }
    let target_dir = crate::target_dir(root).join("fuzz");
    let targets: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| filter.is_none_or(|f| t.contains(f)))
        .collect();
    if targets.is_empty() {
        bail!("no fuzz target matches; targets: {}", TARGETS.join(", "));
    }

    let mut results = Vec::new();
    for target in &targets {
        let scratch = fuzz_dir.join("corpus-new").join(target);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let mut cmd = Command::new("rustup");
        cmd.current_dir(&fuzz_dir)
            .args(["run", "nightly", "cargo", "fuzz", "run", "--target-dir"])
            .arg(&target_dir)
            .arg(target)
            // libFuzzer adds new inputs to the first dir only.
            .arg(&scratch)
            .arg(Path::new("corpus").join(target))
            .args([
                "--".to_owned(),
                format!("-max_total_time={seconds}"),
                "-print_final_stats=1".to_owned(),
                "-max_len=65536".to_owned(),
            ])
            .stderr(Stdio::piped());
        eprintln!("xtask: fuzz {target} for {seconds}s: {cmd:?}");
        let (ok, stats) = run_and_read_stats(cmd).with_context(|| format!("fuzz {target}"))?;
        results.push((*target, ok, stats));
    }

    println!(
        "\n{:<18} {:>12} {:>9} {:>7} {:>7} {:>12}  result",
        "target", "execs", "execs/s", "cov", "ft", "corpus"
    );
    let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    for (target, ok, s) in &results {
        println!(
            "{:<18} {:>12} {:>9} {:>7} {:>7} {:>12}  {}",
            target,
            show(s.execs),
            show(s.execs_per_sec),
            show(s.coverage),
            show(s.features),
            s.corpus.as_deref().unwrap_or("-"),
            if *ok {
                "no crash".to_owned()
            } else {
                format!("CRASH (see fuzz/artifacts/{target}/)")
            }
        );
    }
    let crashed: Vec<&str> = results
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(t, _, _)| *t)
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {}; reproduce with `cargo +nightly fuzz run <target> <artifact>` in fuzz/, \
             then add the input to fuzz/corpus/<target>/ and fix the bug",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// Fails with instructions when nightly or cargo-fuzz is missing.
fn check_tools() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        bail!(
            "cargo xtask fuzz needs a nightly toolchain (libFuzzer's sanitizer flags are nightly-only): \
             rustup toolchain install nightly\n\
             (the fuzz bodies still run on stable in `cargo test`: the tests/fuzz_bodies.rs files)"
        );
    }
    let cargo_fuzz = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "--version"])
        .output();
    if !cargo_fuzz.is_ok_and(|o| o.status.success()) {
        bail!("cargo-fuzz is not installed: cargo install cargo-fuzz");
    }
    Ok(())
}

/// Runs `cmd`, echoing its stderr (libFuzzer's log) while picking the final stats out.
fn run_and_read_stats(mut cmd: Command) -> Result<(bool, Stats)> {
    let mut child = cmd.spawn().context("starting cargo fuzz")?;
    let mut stats = Stats::default();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading cargo fuzz output")?;
            eprintln!("{line}");
            read_stat_line(&line, &mut stats);
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    Ok((status.success(), stats))
}

fn read_stat_line(line: &str, stats: &mut Stats) {
    let number = |prefix: &str| -> Option<u64> { line.strip_prefix(prefix)?.trim().parse().ok() };
    if let Some(n) = number("stat::number_of_executed_units:") {
        stats.execs = Some(n);
    } else if let Some(n) = number("stat::average_exec_per_sec:") {
        stats.execs_per_sec = Some(n);
    } else if line.contains(" cov: ") {
        // e.g. `#1234  pulse  cov: 567 ft: 890 corp: 12/3456b lim: ...`
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            match w {
                "cov:" => stats.coverage = words.next().and_then(|v| v.parse().ok()),
                "ft:" => stats.features = words.next().and_then(|v| v.parse().ok()),
                "corp:" => stats.corpus = words.next().map(str::to_owned),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_stats_are_read() {
        let mut s = Stats::default();
        for line in [
            "#524288\tpulse  cov: 1520 ft: 4711 corp: 88/9120b lim: 4096 exec/s: 8738 rss: 90Mb",
            "stat::number_of_executed_units: 530001",
            "stat::average_exec_per_sec:     8833",
        ] {
            read_stat_line(line, &mut s);
        }
        assert_eq!(s.execs, Some(530_001));
        assert_eq!(s.execs_per_sec, Some(8833));
        assert_eq!(s.coverage, Some(1520));
        assert_eq!(s.features, Some(4711));
        assert_eq!(s.corpus.as_deref(), Some("88/9120b"));
    }

    /// Every target the xtask runs is declared in the fuzz crate and has seeds.
    #[test]
    fn targets_match_the_fuzz_crate_and_have_a_corpus() {
        let root = crate::workspace_root();
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} not in fuzz/Cargo.toml"
            );
            let seeds = std::fs::read_dir(root.join("fuzz/corpus").join(t))
                .unwrap()
                .count();
            assert!(seeds > 0, "fuzz/corpus/{t} is empty");
        }
        assert_eq!(manifest.matches("[[bin]]").count(), TARGETS.len());
    }
}
