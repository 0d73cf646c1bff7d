//! Buildlets that fetch themselves. Machine images (containers, pods, EC2 instances) do not
//! bake the buildlet in: the coordinator serves its buildlet binaries at
//! `GET /buildlet/{os}-{arch}` (see [`BuildletBinaries`]), and each new machine runs a
//! small POSIX `sh` script ([`bootstrap_script`]) that fetches the binary over HTTPS
//! trusting only the coordinator's CA, refuses it unless its SHA-256 is the one the
//! coordinator baked into the script, writes the credentials the coordinator issued for
//! that one machine ([`MachineCredentials`]), and execs the buildlet in listen mode.
//! Changing the buildlet therefore never needs a new image.
//!
//! How a cloud pool uses it:
//!
//! ```ignore
//! let bin = binaries.get("linux-amd64").await?;               // path + digest
//! let creds = MachineCredentials::issue(&ca, &[&machine_name])?;  // one machine only
//! let script = bootstrap_script(&BootstrapParams {
//!     coordinator_url: "https://coordinator.example:8119".into(),
//!     connect_to: None,
//!     coordinator_ca_pem: ca_pem.clone(),
//!     platform: bin.platform.clone(),
//!     sha256: bin.sha256.clone(),
//!     credentials: &creds,
//!     host_type: "linux-amd64".into(),
//!     listen: "0.0.0.0:5936".into(),
//!     dir: "/var/lib/buildlet".into(),
//!     extra_args: vec![],
//! });
//! // ... user-data / container command / pod command = ["/bin/sh", "-c", script] ...
//! let client = BuildletClient::connect(creds.connect_options(addr, &ca_pem)).await?;
//! ```
//!
//! The script needs `sh`, `curl`, `mkdir`, `mv`, `chmod`, `cut` and `sha256sum` (or
//! `shasum`) in the image; nothing else.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use buildfarm_tls::{CertificateAuthority, Identity, TlsError};
use buildlet::client::ConnectOptions;

/// Response header carrying the hex SHA-256 of the served binary.
pub const SHA256_HEADER: &str = "x-buildlet-sha256";

/// The file name of a platform's binary in the configured binaries directory.
pub fn binary_file_name(platform: &str) -> String {
    format!("buildlet.{platform}")
}

/// The `GOOS-GOARCH` of the machine this coordinator runs on, if Go has a name for it.
pub fn local_platform() -> Option<String> {
    buildfarm_config::host_platform().map(|(os, arch)| format!("{os}-{arch}"))
}

/// `GOOS-GOARCH`: two runs of lowercase letters and digits joined by one dash. Anything
/// else (dots, slashes, more dashes) never reaches the file system.
pub fn valid_platform(p: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    matches!(p.split_once('-'), Some((os, arch)) if ok(os) && ok(arch))
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{0:?} is not a platform name (want GOOS-GOARCH, e.g. linux-amd64)")]
    BadPlatform(String),
    #[error("no buildlet binary for {0}")]
    NoBinary(String),
    #[error("reading the buildlet binary {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("issuing a machine certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("a machine certificate needs at least one name")]
    NoNames,
}

/// One servable binary: where it is and what its digest is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryInfo {
    pub platform: String,
    pub path: PathBuf,
    /// Lowercase hex SHA-256 of the file's contents.
    pub sha256: String,
    pub len: u64,
}

/// What a file looked like when its digest was computed; a rebuilt binary has a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

/// The buildlet binaries the coordinator serves: the one it runs its local pool with
/// (for its own platform) and, optionally, `buildlet.<os>-<arch>` files of a directory
/// (cross-built for other platforms; a file there wins over the local one). Digests are
/// computed on first use and again whenever a file's size or mtime changes.
pub struct BuildletBinaries {
    local: Option<(String, PathBuf)>,
    dir: Option<PathBuf>,
    digests: Mutex<HashMap<PathBuf, (Stamp, String)>>,
}

impl BuildletBinaries {
    /// `local`: the coordinator's own buildlet binary, served as [`local_platform`].
    /// `dir`: a directory of `buildlet.<os>-<arch>` files.
    pub fn new(local: Option<PathBuf>, dir: Option<PathBuf>) -> Self {
        let local = local.and_then(|p| Some((local_platform()?, p)));
        BuildletBinaries {
            local,
            dir,
            digests: Mutex::new(HashMap::new()),
        }
    }

    fn path_for(&self, platform: &str) -> Option<PathBuf> {
        if let Some(dir) = &self.dir {
            let p = dir.join(binary_file_name(platform));
            if p.is_file() {
                return Some(p);
            }
        }
        match &self.local {
            Some((p, path)) if p == platform => Some(path.clone()),
            _ => None,
        }
    }

    /// The binary for `platform` (`GOOS-GOARCH`) and its digest.
    pub async fn get(&self, platform: &str) -> Result<BinaryInfo, BootstrapError> {
        if !valid_platform(platform) {
            return Err(BootstrapError::BadPlatform(platform.to_owned()));
        }
        let path = self
            .path_for(platform)
            .ok_or_else(|| BootstrapError::NoBinary(platform.to_owned()))?;
        let io = |source| BootstrapError::Io {
            path: path.clone(),
            source,
        };
        let meta = tokio::fs::metadata(&path).await.map_err(io)?;
        let stamp = Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        };
        let cached = self
            .digests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&path)
            .filter(|(s, _)| *s == stamp)
            .map(|(_, d)| d.clone());
        let sha256 = match cached {
            Some(d) => d,
            None => {
                let d = sha256_file(&path).await.map_err(io)?;
                self.digests
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(path.clone(), (stamp.clone(), d.clone()));
                d
            }
        };
        Ok(BinaryInfo {
            platform: platform.to_owned(),
            path,
            sha256,
            len: stamp.len,
        })
    }
}

/// Hex SHA-256 of a file, read off the async threads.
pub async fn sha256_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        let mut f = std::fs::File::open(&path)?;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Credentials for exactly one machine: a server certificate from the farm CA for the
/// machine's names (DNS names or IP addresses), and a random bearer key for that lease.
/// Neither opens any other buildlet, and the master key is never involved.
#[derive(Clone)]
pub struct MachineCredentials {
    pub identity: Identity,
    /// The names on the certificate; the first is the one the coordinator verifies.
    pub names: Vec<String>,
    /// 32 random bytes, hex: what the coordinator sends as `authorization: Bearer`.
    pub bearer_key: String,
}

impl std::fmt::Debug for MachineCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("MachineCredentials")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl MachineCredentials {
    /// Issues a certificate for `names` and a fresh bearer key.
    pub fn issue(ca: &CertificateAuthority, names: &[&str]) -> Result<Self, BootstrapError> {
        if names.is_empty() {
            return Err(BootstrapError::NoNames);
        }
        let identity = ca.issue_server(names)?;
        let key: [u8; 32] = rand::random();
        Ok(MachineCredentials {
            identity,
            names: names.iter().map(|s| s.to_string()).collect(),
            bearer_key: hex::encode(key),
        })
    }

    /// How the coordinator reaches the machine's buildlet at `addr` (`host:port`): the
    /// certificate checked against the machine's first name, whatever address is
    /// dialled, and the lease's bearer key.
    pub fn connect_options(&self, addr: impl Into<String>, ca_pem: &str) -> ConnectOptions {
        let mut o = ConnectOptions::new(addr, ca_pem);
        o.server_name = self.names.first().cloned();
        o.bearer_key = Some(self.bearer_key.clone());
        o
    }
}

/// Everything [`bootstrap_script`] bakes into a machine's script.
pub struct BootstrapParams<'a> {
    /// Base URL of the coordinator as the machine sees it, `https://host:port`; `host`
    /// must be a name on the coordinator's certificate.
    pub coordinator_url: String,
    /// `host:port` to dial instead of the URL's host and port (curl `--connect-to`),
    /// when the machine reaches the coordinator at an address its certificate does not
    /// name (e.g. a Docker network's gateway). IPv6 addresses in brackets.
    pub connect_to: Option<String>,
    /// CA certificates (PEM) the fetch trusts, and nothing else.
    pub coordinator_ca_pem: String,
    /// `GOOS-GOARCH` of the binary to fetch.
    pub platform: String,
    /// Hex SHA-256 the binary must have ([`BuildletBinaries::get`]).
    pub sha256: String,
    pub credentials: &'a MachineCredentials,
    /// Host type the buildlet reports.
    pub host_type: String,
    /// Address the buildlet listens on, e.g. `0.0.0.0:5936`.
    pub listen: String,
    /// Directory for the binary, the credentials and the workdir (`<dir>/work`).
    pub dir: String,
    /// More buildlet flags, e.g. `--cgroup none`.
    pub extra_args: Vec<String>,
}

/// Quotes `s` as one POSIX `sh` word.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r#"'\''"#))
}

/// The heredoc delimiter for PEM blocks; PEM never has a line like it.
const PEM_END: &str = "BUILDFARM_PEM_END";

fn heredoc(out: &mut String, target: &str, body: &str) {
    debug_assert!(!body.lines().any(|l| l == PEM_END));
    let _ = writeln!(out, "cat > {target} <<'{PEM_END}'");
    out.push_str(body.trim_end());
    out.push('\n');
    let _ = writeln!(out, "{PEM_END}");
}

/// Renders the machine's bootstrap: a POSIX `sh` script (EC2 user-data, or the
/// argument of `sh -c` in a container or pod) that writes the credentials, fetches
/// `<coordinator_url>/buildlet/<platform>` over HTTPS trusting only
/// `coordinator_ca_pem` (retrying while the coordinator is unreachable), refuses to run
/// it unless its SHA-256 is `sha256`, and execs it in listen mode. Every value is
/// quoted; the script fails (exit 1, reason on stderr) rather than run anything else.
pub fn bootstrap_script(p: &BootstrapParams<'_>) -> String {
    let url = format!(
        "{}/buildlet/{}",
        p.coordinator_url.trim_end_matches('/'),
        p.platform
    );
    let mut s = String::new();
    s.push_str(
        "#!/bin/sh\n\
         # buildfarm bootstrap: fetch the coordinator's buildlet, check its SHA-256,\n\
         # write this machine's credentials and run the buildlet in listen mode.\n\
         set -eu\n\
         umask 077\n",
    );
    let _ = writeln!(s, "dir={}", sh_quote(&p.dir));
    let _ = writeln!(s, "url={}", sh_quote(&url));
    let _ = writeln!(s, "want={}", sh_quote(&p.sha256));
    s.push_str("say() { echo \"buildfarm bootstrap: $*\" >&2; }\n");
    s.push_str("mkdir -p \"$dir/work\"\n");
    heredoc(&mut s, "\"$dir/coordinator-ca.pem\"", &p.coordinator_ca_pem);
    heredoc(
        &mut s,
        "\"$dir/server.crt\"",
        &p.credentials.identity.cert_pem,
    );
    heredoc(
        &mut s,
        "\"$dir/server.key\"",
        &p.credentials.identity.key_pem,
    );
    let _ = writeln!(
        s,
        "printf '%s\\n' {} > \"$dir/auth.key\"",
        sh_quote(&p.credentials.bearer_key)
    );
    let connect_to = match &p.connect_to {
        Some(to) => {
            // curl's --connect-to HOST1:PORT1:HOST2:PORT2, from the URL's host and port.
            let authority = p
                .coordinator_url
                .split_once("://")
                .map_or(p.coordinator_url.as_str(), |(_, rest)| rest)
                .split('/')
                .next()
                .unwrap_or("");
            format!(" --connect-to {}", sh_quote(&format!("{authority}:{to}")))
        }
        None => String::new(),
    };
    let _ = writeln!(
        s,
        "rm -f \"$dir/buildlet.download\"\n\
         say \"fetching $url\"\n\
         curl --fail --silent --show-error --proto =https --retry 30 --retry-connrefused \\\n  \
         --retry-delay 1 --connect-timeout 10 --max-time 900 \\\n  \
         --cacert \"$dir/coordinator-ca.pem\"{connect_to} -o \"$dir/buildlet.download\" \"$url\""
    );
    s.push_str(
        "if command -v sha256sum >/dev/null 2>&1; then\n  \
         got=$(sha256sum \"$dir/buildlet.download\" | cut -d' ' -f1)\n\
         elif command -v shasum >/dev/null 2>&1; then\n  \
         got=$(shasum -a 256 \"$dir/buildlet.download\" | cut -d' ' -f1)\n\
         else\n  \
         say \"neither sha256sum nor shasum is installed: cannot check the buildlet\"; exit 1\n\
         fi\n\
         if [ \"$got\" != \"$want\" ]; then\n  \
         say \"digest mismatch for $url: got sha256 $got, want $want; not running it\"\n  \
         rm -f \"$dir/buildlet.download\"\n  \
         exit 1\n\
         fi\n\
         chmod 0700 \"$dir/buildlet.download\"\n\
         mv -f \"$dir/buildlet.download\" \"$dir/buildlet\"\n\
         say \"buildlet sha256 $want verified; starting it\"\n",
    );
    let _ = write!(
        s,
        "exec \"$dir/buildlet\" --listen {} --workdir \"$dir/work\" \\\n  \
         --tls-cert \"$dir/server.crt\" --tls-key \"$dir/server.key\" \\\n  \
         --auth-key-file \"$dir/auth.key\" --host-type {}",
        sh_quote(&p.listen),
        sh_quote(&p.host_type)
    );
    for a in &p.extra_args {
        let _ = write!(s, " {}", sh_quote(a));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_names_are_strict() {
        for ok in ["linux-amd64", "darwin-arm64", "plan9-386", "linux-ppc64le"] {
            assert!(valid_platform(ok), "{ok}");
        }
        for bad in [
            "",
            "linux",
            "linux-",
            "-amd64",
            "linux-amd64-x",
            "../etc",
            "linux/amd64",
            "Linux-amd64",
            "linux-amd64.exe",
            "linux-amd 64",
        ] {
            assert!(!valid_platform(bad), "{bad:?}");
        }
        let local = local_platform().expect("the test machine has a Go platform name");
        assert!(valid_platform(&local));
    }

    #[tokio::test]
    async fn binaries_come_from_the_dir_first_and_digests_follow_changes() {
        use sha2::Digest;
        let dir = tempfile::tempdir().expect("tempdir");
        let local = dir.path().join("own-buildlet");
        std::fs::write(&local, b"local build").expect("write");
        let cross = dir.path().join("cross");
        std::fs::create_dir(&cross).expect("mkdir");
        std::fs::write(cross.join("buildlet.linux-arm64"), b"arm64 build").expect("write");
        let b = BuildletBinaries::new(Some(local.clone()), Some(cross.clone()));
        let me = local_platform().expect("platform");

        let own = b.get(&me).await.expect("own platform");
        assert_eq!(own.path, local);
        assert_eq!(
            own.sha256,
            hex::encode(sha2::Sha256::digest(b"local build"))
        );
        let arm = b.get("linux-arm64").await.expect("from the dir");
        assert_eq!(
            arm.sha256,
            hex::encode(sha2::Sha256::digest(b"arm64 build"))
        );
        assert_eq!(arm.len, 11);
        assert!(matches!(
            b.get("plan9-386").await,
            Err(BootstrapError::NoBinary(_))
        ));
        assert!(matches!(
            b.get("../x").await,
            Err(BootstrapError::BadPlatform(_))
        ));

        // A rebuilt binary gets its new digest, not the cached one.
        std::fs::write(cross.join("buildlet.linux-arm64"), b"arm64 build, v2").expect("write");
        let arm2 = b.get("linux-arm64").await.expect("again");
        assert_eq!(
            arm2.sha256,
            hex::encode(sha2::Sha256::digest(b"arm64 build, v2"))
        );
        // A file in the dir wins over the coordinator's own.
        std::fs::write(cross.join(binary_file_name(&me)), b"cross own").expect("write");
        assert_ne!(b.get(&me).await.expect("own").path, local);
    }

    #[test]
    fn sh_quote_survives_sh() {
        for s in [
            "plain",
            "it's",
            "a b\tc",
            "$(touch /x) `y` \"z\" \\",
            "'",
            "",
            "\n",
        ] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", sh_quote(s)))
                .output()
                .expect("running sh");
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }

    #[test]
    fn credentials_are_per_machine_and_never_printed() {
        buildfarm_tls::install_crypto_provider();
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        let a = MachineCredentials::issue(&ca, &["bl-a", "10.0.0.7"]).expect("issue");
        let b = MachineCredentials::issue(&ca, &["bl-b"]).expect("issue");
        assert_ne!(a.bearer_key, b.bearer_key);
        assert_eq!(a.bearer_key.len(), 64);
        assert_ne!(a.identity.key_pem, b.identity.key_pem);
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains(&a.bearer_key) && !dbg.contains("PRIVATE"),
            "{dbg}"
        );
        let o = a.connect_options("172.18.0.5:5936", ca.cert_pem());
        assert_eq!(o.server_name.as_deref(), Some("bl-a"));
        assert_eq!(o.bearer_key.as_deref(), Some(a.bearer_key.as_str()));
        assert!(matches!(
            MachineCredentials::issue(&ca, &[]),
            Err(BootstrapError::NoNames)
        ));
    }

    #[test]
    fn script_quotes_values_and_names_connect_to() {
        buildfarm_tls::install_crypto_provider();
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        let creds = MachineCredentials::issue(&ca, &["bl"]).expect("issue");
        let script = bootstrap_script(&BootstrapParams {
            coordinator_url: "https://localhost:8119/".into(),
            connect_to: Some("172.18.0.1:8119".into()),
            coordinator_ca_pem: ca.cert_pem().into(),
            platform: "linux-amd64".into(),
            sha256: "ab".repeat(32),
            credentials: &creds,
            host_type: "evil'; rm -rf /; '".into(),
            listen: "0.0.0.0:5936".into(),
            dir: "/var/lib/build let".into(),
            extra_args: vec!["--cgroup".into(), "none".into()],
        });
        assert!(script.contains("url='https://localhost:8119/buildlet/linux-amd64'"));
        assert!(script.contains("--connect-to 'localhost:8119:172.18.0.1:8119'"));
        assert!(script.contains(r#"--host-type 'evil'\''; rm -rf /; '\''' '--cgroup' 'none'"#));
        assert!(script.contains("dir='/var/lib/build let'"));
        // The script parses as sh.
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("sh -n");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
