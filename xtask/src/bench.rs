//! Benchmarks: each prints a ratio against a limit measured in the same run (raw TCP,
//! local exec, local tar) and writes its figures to `target/bench/<name>.json`.

use std::path::Path;

use anyhow::Result;

pub fn run(_root: &Path, _filter: Option<&str>) -> Result<()> {
    anyhow::bail!("no benchmarks yet")
}
