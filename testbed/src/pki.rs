//! Certificates for TLS tests: a CA, a server certificate for a worker and a client
//! certificate, generated fresh (rcgen) so no key material lives in the repository.

use std::net::Ipv4Addr;

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct CertifiedKey {
    pub cert: String,
    pub key: String,
}

/// A test PKI, all PEM.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca: String,
    /// For the agent on worker `name` at `ip` (both in the subject alternative names).
    pub server: CertifiedKey,
    /// For the builder (mTLS).
    pub client: CertifiedKey,
}

impl TestPki {
    pub fn generate(name: &str, ip: Ipv4Addr) -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, ip: Option<Ipv4Addr>| -> Result<CertifiedKey> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            if let Some(ip) = ip {
                params.subject_alt_names.push(SanType::IpAddress(ip.into()));
            }
            let cert = params.signed_by(&key, &issuer)?;
            Ok(CertifiedKey {
                cert: cert.pem(),
                key: key.serialize_pem(),
            })
        };
        Ok(Self {
            ca,
            server: leaf(vec![name.to_owned()], Some(ip))?,
            client: leaf(vec!["builder".to_owned()], None)?,
        })
    }
}
