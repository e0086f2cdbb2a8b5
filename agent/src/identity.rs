//! The agent's own TLS identity: a key pair and a self-signed certificate made on the
//! worker at its first start (rcgen), kept in the agent's state directory. The private key
//! never leaves the worker: it is written once, mode 0600, in a 0700 directory owned by
//! the agent's user, and only its certificate's fingerprint is shown to anyone.
//!
//! Builders either pin the certificate's fingerprint (`builderctl trust`) or the operator
//! replaces it with a CA-signed one (`[tls] cert`, `key`); see docs/SECURITY.md.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use thiserror::Error;

/// Subdirectory of the state directory that holds the generated identity.
pub const IDENTITY_DIR: &str = "tls";

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("generating the agent's certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: no PEM certificate in it ({reason})")]
    NotACertificate { path: String, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where the certificate and key of the generated identity live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl IdentityFiles {
    /// The generated identity's files under the agent's state directory.
    pub fn generated(state_dir: &Path) -> Self {
        let dir = state_dir.join(IDENTITY_DIR);
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

/// The names a builder may connect by, for the certificate's subject alternative names:
/// with a cluster CA the builder checks the name it dialled against them (the endpoint's
/// host, or `[tls] domain`). A pinned certificate is compared whole, names aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectNames {
    pub hostname: String,
    pub addresses: Vec<IpAddr>,
}

impl SubjectNames {
    /// This machine's hostname and every address of its interfaces (loopback included:
    /// a builder on the worker itself dials 127.0.0.1).
    pub fn of_this_machine() -> Self {
        let hostname = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".to_owned());
        let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map(|interfaces| {
                interfaces
                    .filter_map(|i| i.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .collect()
            })
            .unwrap_or_default();
        addresses.sort();
        addresses.dedup();
        Self {
            hostname,
            addresses,
        }
    }
}

/// A new key pair and a self-signed certificate for `names`, both PEM, and the
/// certificate's fingerprint.
pub fn generate(names: &SubjectNames) -> Result<(String, String, String), IdentityError> {
    let key = KeyPair::generate()?;
    let mut dns = vec!["localhost".to_owned()];
    // A hostname that is not a DNS name (rcgen refuses it) is left out, not fatal.
    if names.hostname != "localhost"
        && rcgen::string::Ia5String::try_from(names.hostname.clone()).is_ok()
    {
        dns.insert(0, names.hostname.clone());
    }
    let mut params = CertificateParams::new(dns)?;
    let mut subject = DistinguishedName::new();
    subject.push(
        DnType::CommonName,
        format!("distcc-agent on {}", names.hostname),
    );
    params.distinguished_name = subject;
    params
        .subject_alt_names
        .extend(names.addresses.iter().map(|ip| SanType::IpAddress(*ip)));
    let cert = params.self_signed(&key)?;
    let fingerprint = distcc_proto::certificate_fingerprint(cert.der());
    Ok((cert.pem(), key.serialize_pem(), fingerprint))
}

/// What [`ensure`] found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    pub fingerprint: String,
    /// True when this call generated the identity (first start, or files deleted).
    pub generated: bool,
}

/// The generated identity under `state_dir`: kept when both files exist, otherwise made
/// anew (a half-written pair from a crash is replaced whole).
pub fn ensure(state_dir: &Path, names: &SubjectNames) -> Result<Ensured, IdentityError> {
    let files = IdentityFiles::generated(state_dir);
    if files.cert.is_file() && files.key.is_file() {
        return Ok(Ensured {
            fingerprint: fingerprint_of(&files.cert)?,
            generated: false,
        });
    }
    let dir = files.cert.parent().unwrap_or(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))?;
    // An existing directory keeps the mode it had: force it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_error(dir))?;
    let (cert, key, fingerprint) = generate(names)?;
    // The key first: a certificate never names a key that is not on disk.
    write_atomically(&files.key, key.as_bytes(), 0o600)?;
    write_atomically(&files.cert, cert.as_bytes(), 0o644)?;
    Ok(Ensured {
        fingerprint,
        generated: true,
    })
}

/// The fingerprint of the first certificate in a PEM file.
pub fn fingerprint_of(cert_pem: &Path) -> Result<String, IdentityError> {
    let pem = std::fs::read(cert_pem).map_err(io_error(cert_pem))?;
    let der = CertificateDer::from_pem_slice(&pem).map_err(|e| IdentityError::NotACertificate {
        path: cert_pem.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(distcc_proto::certificate_fingerprint(&der))
}

/// Temp file in the same directory, mode set before any byte is written, fsync, rename.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io_error(dir))?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_error(path))?;
    file.write_all(bytes).map_err(io_error(path))?;
    file.as_file().sync_all().map_err(io_error(path))?;
    file.persist(path).map_err(|e| IdentityError::Io {
        path: path.display().to_string(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn names() -> SubjectNames {
        SubjectNames {
            hostname: "w1".to_owned(),
            addresses: vec!["198.18.3.11".parse().unwrap(), "::1".parse().unwrap()],
        }
    }

    #[test]
    fn first_call_generates_later_calls_keep() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path(), &names()).unwrap();
        assert!(first.generated);
        assert!(first.fingerprint.starts_with("SHA256:"), "{first:?}");
        assert_eq!(first.fingerprint.len(), "SHA256:".len() + 64);
        let files = IdentityFiles::generated(dir.path());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files.key), 0o600, "the key is for the agent alone");
        assert_eq!(mode(files.key.parent().unwrap()), 0o700);
        let again = ensure(dir.path(), &names()).unwrap();
        assert_eq!(again.fingerprint, first.fingerprint);
        assert!(!again.generated);
        assert_eq!(fingerprint_of(&files.cert).unwrap(), first.fingerprint);
    }

    #[test]
    fn a_missing_half_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path(), &names()).unwrap();
        std::fs::remove_file(IdentityFiles::generated(dir.path()).key).unwrap();
        let second = ensure(dir.path(), &names()).unwrap();
        assert!(second.generated);
        assert_ne!(second.fingerprint, first.fingerprint);
    }

    #[test]
    fn certificate_names_the_host_and_its_addresses() {
        let (cert, _, _) = generate(&names()).unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        // The SANs a CA-style client checks: the DNS name as text, the addresses as bytes.
        let bytes = der.as_ref();
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"w1") && contains(b"localhost"));
        assert!(contains(&[198, 18, 3, 11]));
    }
}
