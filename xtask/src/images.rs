//! `cargo xtask images [filter]`: builds the local Docker images of `env/`. Each
//! `env/<host type>/make-image.sh` assembles a root filesystem and loads it with
//! `docker import` as `buildfarm/<host type>:local` (no registry is assumed). Images
//! never contain the buildlet: containers fetch it from the coordinator at start.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The script in an env folder that builds its image.
pub const SCRIPT: &str = "make-image.sh";

/// The tag `cargo xtask images` gives the image of `host_type`.
pub fn tag(host_type: &str) -> String {
    format!("buildfarm/{host_type}:local")
}

/// Env folders that have an image script, sorted by name.
fn image_dirs(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let env = root.join("env");
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(&env).with_context(|| format!("reading {}", env.display()))? {
        let entry = entry?;
        let script = entry.path().join(SCRIPT);
        if script.is_file() {
            dirs.push((entry.file_name().to_string_lossy().into_owned(), script));
        }
    }
    dirs.sort();
    Ok(dirs)
}

pub fn run(root: &Path, filter: Option<&str>) -> Result<()> {
    if !engine_answers() {
        bail!("no Docker engine answers `docker version`: install docker.io and start it");
    }
    let dirs = image_dirs(root)?;
    let mut built = 0;
    for (host_type, script) in dirs {
        if filter.is_some_and(|f| !host_type.contains(f)) {
            continue;
        }
        let mut cmd = Command::new("sh");
        cmd.arg(&script).arg(tag(&host_type)).current_dir(root);
        crate::run(&format!("image {}", tag(&host_type)), cmd)?;
        built += 1;
    }
    if built == 0 {
        bail!("no env/*/{SCRIPT} matched");
    }
    Ok(())
}

/// Whether a Docker engine is reachable with the CLI's defaults.
pub fn engine_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
