//! TLS helpers shared by every binary of the farm: the crypto provider, PEM loading,
//! rustls configs for servers and clients, and a small certificate authority (rcgen)
//! used by the coordinator to issue buildlet certificates and by tests and
//! `cargo xtask certs` to make certificates on the fly.
//!
//! One way to do TLS everywhere: `tokio-rustls` streams built from these configs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN protocol id of a reverse dial-in.
pub const ALPN_REVDIAL: &[u8] = b"buildfarm-revdial/1";
/// ALPN protocol id of a buildlet's bulk transfers on a connection of their own
/// (listen mode; see `buildlet::bulk`).
pub const ALPN_BULK: &[u8] = b"buildfarm-bulk/1";
/// ALPN protocol id of plain HTTP/2 (gRPC).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1 (browsers on the status page).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing PEM in {what}: {source}")]
    Pem {
        what: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificates found in {0}")]
    NoCertificates(String),
    #[error("building TLS config: {0}")]
    Config(#[from] rustls::Error),
    #[error("building client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// Installs the process-wide rustls crypto provider (ring). Idempotent; call it first
/// thing in `main` and in tests.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate chain and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads a certificate chain and key from PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Identity {
            cert_pem: read_to_string(cert)?,
            key_pem: read_to_string(key)?,
        })
    }

    /// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` (the key with mode 0600).
    pub fn write_files(&self, dir: &Path, stem: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        write_private(&key, self.key_pem.as_bytes())?;
        Ok((cert, key))
    }

    pub fn certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        parse_certs(&self.cert_pem, "certificate")
    }

    pub fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|source| TlsError::Pem {
            what: "private key".into(),
            source,
        })
    }
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)
}

fn read_to_string(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates(what.into()));
    }
    Ok(certs)
}

/// A root store holding the CA certificates in `pem`.
pub fn root_store(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Loads a CA bundle from a PEM file.
pub fn load_ca_file(path: &Path) -> Result<String, TlsError> {
    let pem = read_to_string(path)?;
    parse_certs(&pem, &path.display().to_string())?;
    Ok(pem)
}

/// Server config presenting `identity`. With `client_ca`, clients may present a
/// certificate, which must then chain to that CA; clients without one are still
/// accepted at the TLS layer so that bearer-key callers can be told `Unauthenticated`
/// by the service instead of seeing a handshake failure.
pub fn server_config(
    identity: &Identity,
    client_ca: Option<&str>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(root_store(ca)?))
                .allow_unauthenticated()
                .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(identity.certs()?, identity.key()?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Client config trusting `ca_pem`, optionally presenting a client certificate.
pub fn client_config(
    ca_pem: &str,
    client_identity: Option<&Identity>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder().with_root_certificates(root_store(ca_pem)?);
    let mut config = match client_identity {
        Some(id) => builder.with_client_auth_cert(id.certs()?, id.key()?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Parses a host name or IP address for SNI and certificate verification.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))
}

/// A certificate authority that issues server and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl CertificateAuthority {
    /// Makes a new self-signed CA.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(CertificateAuthority {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM-encoded (what peers put in their trust store).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's own certificate and key, for saving it.
    pub fn identity(&self) -> Identity {
        Identity {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.issuer.key().serialize_pem(),
        }
    }

    /// Issues a server certificate valid for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[&str]) -> Result<Identity, TlsError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name = dn(names.first().map(String::as_str).unwrap_or("server"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// Issues a client certificate whose common name is `name`.
    pub fn issue_client(&self, name: &str) -> Result<Identity, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<Identity, TlsError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "buildfarm");
    dn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_load_into_configs() {
        install_crypto_provider();
        let ca = CertificateAuthority::generate("test ca").expect("ca");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server");
        let client = ca.issue_client("coordinator").expect("client");
        server_config(&server, Some(ca.cert_pem()), &[ALPN_H2]).expect("server config");
        client_config(ca.cert_pem(), Some(&client), &[ALPN_H2]).expect("client config");
        // A CA reloaded from PEM issues certificates that chain to the same root.
        let ident = ca.identity();
        let reloaded =
            CertificateAuthority::from_pem(&ident.cert_pem, &ident.key_pem).expect("reload");
        reloaded.issue_client("again").expect("issue from reloaded");
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let err = root_store("not a certificate").expect_err("must fail");
        assert!(err.to_string().contains("no certificates"), "{err}");
    }
}
