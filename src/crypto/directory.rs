//! The broker's directory of proxy certificates: those the CA issued (`certs/<id>.crt`, read
//! on first use so a certificate signed while the broker runs is picked up) and those proxies
//! presented in handshakes. Every entry was verified against the root.

use std::path::PathBuf;

use dashmap::DashMap;

use super::{ca, unix_millis, RootCert, VerifiedCert};
use crate::wire::ProxyId;

pub struct CertDirectory {
    certs_dir: PathBuf,
    root: RootCert,
    known: DashMap<ProxyId, VerifiedCert>,
}

impl CertDirectory {
    pub fn new(pki_dir: PathBuf, root: RootCert) -> Self {
        Self { certs_dir: pki_dir.join(ca::CERTS_DIR), root, known: DashMap::new() }
    }

    fn now() -> i64 {
        (unix_millis() / 1000) as i64
    }

    /// Adds a certificate a proxy presented (already verified).
    pub fn learn(&self, proxy: ProxyId, cert: VerifiedCert) {
        self.known.insert(proxy, cert);
    }

    /// The proxy's currently valid certificate, if any.
    pub fn get(&self, proxy: &ProxyId) -> Option<VerifiedCert> {
        let now = Self::now();
        if let Some(cert) = self.known.get(proxy).filter(|c| c.is_valid_at(now)) {
            return Some(cert.clone());
        }
        let pem = std::fs::read_to_string(self.certs_dir.join(format!("{proxy}.crt"))).ok()?;
        let cert = self.root.verify(&pem, now).ok().filter(|c| c.subject == proxy.as_str())?;
        self.known.insert(proxy.clone(), cert.clone());
        Some(cert)
    }

    /// Those of `proxies` without a valid certificate, in order, without repeats.
    pub fn missing<'a>(&self, proxies: impl IntoIterator<Item = &'a ProxyId>) -> Vec<ProxyId> {
        let mut out: Vec<ProxyId> = Vec::new();
        for p in proxies {
            if !out.contains(p) && self.get(p).is_none() {
                out.push(p.clone());
            }
        }
        out
    }
}
