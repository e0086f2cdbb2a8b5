//! Who the builder believes it talks to, when no cluster CA vouches for the workers:
//! certificate fingerprints pinned per worker endpoint, SSH `known_hosts` style, in
//! `/etc/distcc-builder/known_workers` (`builderctl trust` records them).
//!
//! [`PinnedVerifier`] is the rustls verifier of every later connection: the worker's
//! certificate must be exactly the pinned one (its SHA-256 over the DER bytes), and the
//! handshake must be signed by that certificate's key. Names and dates are not checked,
//! as with SSH host keys: the pin identifies the key, whatever address or name it is
//! reached by. An unknown worker or a changed certificate is refused, never accepted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use thiserror::Error;

pub const DEFAULT_KNOWN_WORKERS: &str = "/etc/distcc-builder/known_workers";

#[derive(Debug, Error)]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
}

/// Why a worker's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PinError {
    #[error(
        "{endpoint} is not trusted yet (no [tls] ca, no pin in {file}): check the worker's \
         fingerprint (`distcc-agent --fingerprint` on it) and run `builderctl trust {endpoint}`"
    )]
    Unknown { endpoint: String, file: String },
    #[error(
        "{endpoint} presented a CHANGED certificate {presented}, but {pinned} is pinned in \
         {file}: refusing it (someone may be impersonating the worker). If the worker's \
         certificate was replaced on purpose, run `builderctl trust {endpoint}` again"
    )]
    Changed {
        endpoint: String,
        pinned: String,
        presented: String,
        file: String,
    },
}

/// `SHA256:` and 64 lowercase hex digits, as [`distcc_proto::certificate_fingerprint`]
/// writes them.
fn is_fingerprint(text: &str) -> bool {
    text.strip_prefix("SHA256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Pin {
        endpoint: String,
        fingerprint: String,
    },
    /// Comments and blank lines, kept as written.
    Other(String),
}

/// The pins file: `ENDPOINT SHA256:HEX` per line, `#` comments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownWorkers {
    path: PathBuf,
    lines: Vec<Line>,
}

impl KnownWorkers {
    /// A missing file is an empty one: nothing trusted yet.
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                path: path.to_owned(),
                lines: Vec::new(),
            }),
            Err(source) => Err(TrustError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, TrustError> {
        let mut lines = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                lines.push(Line::Other(line.to_owned()));
                continue;
            }
            let invalid = |message: String| TrustError::Invalid {
                path: path.display().to_string(),
                line: index + 1,
                message,
            };
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            let [endpoint, fingerprint] = fields[..] else {
                return Err(invalid(format!(
                    "{trimmed:?} is not `ENDPOINT SHA256:HEX` (builderctl trust writes this file)"
                )));
            };
            if !is_fingerprint(fingerprint) {
                return Err(invalid(format!(
                    "{fingerprint:?} is not a fingerprint like SHA256:<64 lowercase hex digits>"
                )));
            }
            lines.push(Line::Pin {
                endpoint: endpoint.to_owned(),
                fingerprint: fingerprint.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            lines,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fingerprint pinned for `endpoint` (as configured in `workers`).
    pub fn get(&self, endpoint: &str) -> Option<&str> {
        self.lines.iter().find_map(|line| match line {
            Line::Pin {
                endpoint: e,
                fingerprint,
            } if e == endpoint => Some(fingerprint.as_str()),
            _ => None,
        })
    }

    /// Pin `fingerprint` for `endpoint`, replacing its old pin in place.
    pub fn set(&mut self, endpoint: &str, fingerprint: &str) {
        let pin = Line::Pin {
            endpoint: endpoint.to_owned(),
            fingerprint: fingerprint.to_owned(),
        };
        match self
            .lines
            .iter_mut()
            .find(|line| matches!(line, Line::Pin { endpoint: e, .. } if e == endpoint))
        {
            Some(line) => *line = pin,
            None => self.lines.push(pin),
        }
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        if !self
            .lines
            .iter()
            .any(|l| matches!(l, Line::Other(c) if c.starts_with('#')))
        {
            text.push_str("# Workers' TLS certificates pinned by `builderctl trust`.\n");
        }
        for line in &self.lines {
            match line {
                Line::Pin {
                    endpoint,
                    fingerprint,
                } => text.push_str(&format!("{endpoint} {fingerprint}\n")),
                Line::Other(other) => {
                    text.push_str(other);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// Replace the file atomically (readers see the old or the new file, never a part).
    pub fn save(&self) -> Result<(), TrustError> {
        crate::host_list::write_atomically(&self.path, &self.render()).map_err(|source| {
            TrustError::Write {
                path: self.path.display().to_string(),
                source,
            }
        })
    }

    /// The verifier for a connection to `endpoint`.
    pub fn verifier(&self, endpoint: &str) -> PinnedVerifier {
        PinnedVerifier::new(endpoint, self.get(endpoint).map(str::to_owned), &self.path)
    }
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn verify_signature(
    provider: &CryptoProvider,
    tls13: bool,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let algorithms = &provider.signature_verification_algorithms;
    if tls13 {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    } else {
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }
}

/// Accepts exactly the pinned certificate of one endpoint.
#[derive(Debug)]
pub struct PinnedVerifier {
    endpoint: String,
    pinned: Option<String>,
    file: PathBuf,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub fn new(endpoint: &str, pinned: Option<String>, file: &Path) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            pinned,
            file: file.to_owned(),
            provider: provider(),
        }
    }

    /// The decision alone: is a certificate with these DER bytes the pinned one?
    pub fn check(&self, end_entity: &[u8]) -> Result<(), PinError> {
        let presented = distcc_proto::certificate_fingerprint(end_entity);
        match &self.pinned {
            None => Err(PinError::Unknown {
                endpoint: self.endpoint.clone(),
                file: self.file.display().to_string(),
            }),
            Some(pinned) if *pinned == presented => Ok(()),
            Some(pinned) => Err(PinError::Changed {
                endpoint: self.endpoint.clone(),
                pinned: pinned.clone(),
                presented,
                file: self.file.display().to_string(),
            }),
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(e))))
    }

    // The pin names the certificate; these prove the peer holds its key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, false, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, true, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// For `builderctl trust` only: records the certificate a worker presents and then ends
/// the handshake with an error, so that no connection is ever made to an unverified peer
/// (no token, no request crosses it).
#[derive(Debug)]
pub struct CertificateCapture {
    presented: Mutex<Option<Vec<u8>>>,
    provider: Arc<CryptoProvider>,
}

/// The error [`CertificateCapture`] ends every handshake with.
#[derive(Debug, Error)]
#[error("certificate recorded; handshake ended before anything was sent")]
pub struct Captured;

impl Default for CertificateCapture {
    fn default() -> Self {
        Self::new()
    }
}

impl CertificateCapture {
    pub fn new() -> Self {
        Self {
            presented: Mutex::new(None),
            provider: provider(),
        }
    }

    /// The DER bytes of the certificate presented, once a handshake got that far.
    pub fn presented(&self) -> Option<Vec<u8>> {
        self.presented.lock().ok().and_then(|p| p.clone())
    }
}

impl ServerCertVerifier for CertificateCapture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut slot) = self.presented.lock() {
            *slot = Some(end_entity.as_ref().to_vec());
        }
        Err(rustls::Error::Other(rustls::OtherError(Arc::new(Captured))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, false, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, true, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const CERT_A: &[u8] = b"certificate A (DER bytes in real life)";
    const CERT_B: &[u8] = b"certificate B";

    fn fp(der: &[u8]) -> String {
        distcc_proto::certificate_fingerprint(der)
    }

    fn pins(text: &str) -> KnownWorkers {
        KnownWorkers::parse(Path::new("/etc/distcc-builder/known_workers"), text).unwrap()
    }

    #[test]
    fn pinned_certificate_is_accepted() {
        let known = pins(&format!("# comment\n198.18.3.11:3634 {}\n", fp(CERT_A)));
        known.verifier("198.18.3.11:3634").check(CERT_A).unwrap();
        let rustls_view = known.verifier("198.18.3.11:3634").verify_server_cert(
            &CertificateDer::from(CERT_A),
            &[],
            &ServerName::try_from("198.18.3.11").unwrap(),
            &[],
            UnixTime::now(),
        );
        assert!(rustls_view.is_ok());
    }

    #[test]
    fn changed_certificate_is_refused_naming_both_fingerprints() {
        let known = pins(&format!("198.18.3.11:3634 {}\n", fp(CERT_A)));
        let err = known
            .verifier("198.18.3.11:3634")
            .check(CERT_B)
            .unwrap_err();
        assert_eq!(
            err,
            PinError::Changed {
                endpoint: "198.18.3.11:3634".into(),
                pinned: fp(CERT_A),
                presented: fp(CERT_B),
                file: "/etc/distcc-builder/known_workers".into(),
            }
        );
        let text = err.to_string();
        assert!(
            text.contains(&fp(CERT_A)) && text.contains(&fp(CERT_B)),
            "{text}"
        );
        // And through rustls, as a connection reports it.
        let rustls_error = known
            .verifier("198.18.3.11:3634")
            .verify_server_cert(
                &CertificateDer::from(CERT_B),
                &[],
                &ServerName::try_from("198.18.3.11").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err()
            .to_string();
        assert!(rustls_error.contains(&fp(CERT_B)), "{rustls_error}");
    }

    #[test]
    fn unknown_worker_is_refused_with_the_command_to_trust_it() {
        let known = pins(&format!("198.18.3.11:3634 {}\n", fp(CERT_A)));
        // Another port on the same host is another worker.
        let err = known
            .verifier("198.18.3.11:3635")
            .check(CERT_A)
            .unwrap_err();
        assert!(matches!(err, PinError::Unknown { .. }));
        assert!(
            err.to_string()
                .contains("run `builderctl trust 198.18.3.11:3635`"),
            "{err}"
        );
    }

    #[test]
    fn pins_file_round_trip_keeps_comments_and_replaces_in_place() {
        let mut known = pins(&format!(
            "# ours\nw1:3634 {}\n\nw2:3634 {}\n",
            fp(CERT_A),
            fp(CERT_A)
        ));
        known.set("w1:3634", &fp(CERT_B));
        known.set("w3:3634", &fp(CERT_B));
        assert_eq!(
            known.render(),
            format!(
                "# ours\nw1:3634 {}\n\nw2:3634 {}\nw3:3634 {}\n",
                fp(CERT_B),
                fp(CERT_A),
                fp(CERT_B)
            )
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_workers");
        let mut fresh = KnownWorkers::load(&path).unwrap();
        assert_eq!(fresh.get("w1:3634"), None, "a missing file trusts nobody");
        fresh.set("w1:3634", &fp(CERT_A));
        fresh.save().unwrap();
        assert_eq!(
            KnownWorkers::load(&path).unwrap().get("w1:3634"),
            Some(fp(CERT_A).as_str())
        );
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let path = Path::new("/k");
        for text in ["w1:3634\n", "# ok\nw1:3634 SHA256:abc\n", "w1 x y\n"] {
            match KnownWorkers::parse(path, text).unwrap_err() {
                TrustError::Invalid { line, .. } => {
                    assert_eq!(line, text.lines().count(), "{text}")
                }
                e => panic!("{e}"),
            }
        }
        let upper = format!("w1 {}", fp(CERT_A).to_uppercase());
        assert!(KnownWorkers::parse(path, &upper).is_err());
    }
}
