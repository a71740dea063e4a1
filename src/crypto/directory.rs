//! The broker's directory of proxy certificates: those the CA issued (`certs/<id>.crt`, re-read
//! when the file changes, so a certificate signed or renewed while the broker runs is picked up)
//! and those proxies presented in handshakes; plus the revocation list (`crl.pem`, re-read when
//! it changes). Every entry was verified against the root; revoked and expired ones are never
//! handed out.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use super::{ca, cert::Crl, unix_millis, RootCert, VerifiedCert};
use crate::wire::ProxyId;

/// How often a cached entry's file is looked at again (one `stat`).
const RECHECK: Duration = Duration::from_secs(1);

struct Entry {
    cert: VerifiedCert,
    /// The modification time of `certs/<id>.crt` when last read (`None`: not read from a file).
    file_mtime: Option<SystemTime>,
    checked_at: Instant,
}

pub struct CertDirectory {
    certs_dir: PathBuf,
    crl_path: PathBuf,
    root: RootCert,
    known: DashMap<ProxyId, Entry>,
    crl: RwLock<Option<Arc<Crl>>>,
    crl_mtime: Mutex<Option<SystemTime>>,
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl CertDirectory {
    pub fn new(pki_dir: PathBuf, root: RootCert) -> Self {
        let dir = Self {
            certs_dir: pki_dir.join(ca::CERTS_DIR),
            crl_path: pki_dir.join(ca::CRL_FILE),
            root,
            known: DashMap::new(),
            crl: RwLock::new(None),
            crl_mtime: Mutex::new(None),
        };
        dir.reload_crl();
        dir
    }

    fn now() -> i64 {
        (unix_millis() / 1000) as i64
    }

    /// Re-reads `crl.pem` if it changed. Returns the new list when it did (and verified and is
    /// not older than the one held). A bad list is logged and ignored; the last good one stays.
    pub fn reload_crl(&self) -> Option<Arc<Crl>> {
        let modified = mtime(&self.crl_path);
        {
            let mut seen = self.crl_mtime.lock();
            if modified.is_none() || *seen == modified {
                return None;
            }
            *seen = modified;
        }
        let loaded = ca::read_to_string(&self.crl_path).and_then(|pem| self.root.verify_crl(&pem));
        match loaded {
            Ok(crl) => {
                let mut held = self.crl.write();
                if held.as_ref().is_some_and(|h| h.number > crl.number) {
                    tracing::warn!(number = crl.number, "ignored an older revocation list");
                    return None;
                }
                tracing::info!(number = crl.number, revoked = crl.serials.len(), "revocation list loaded");
                let crl = Arc::new(crl);
                *held = Some(crl.clone());
                drop(held);
                self.known.retain(|_, e| !crl.revokes(&e.cert));
                Some(crl)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot use the revocation list; keeping the last good one");
                None
            }
        }
    }

    /// The revocation list as the CA signed it (served to proxies).
    pub fn crl(&self) -> Option<Arc<Crl>> {
        self.crl.read().clone()
    }

    pub fn is_revoked(&self, cert: &VerifiedCert) -> bool {
        self.crl.read().as_ref().is_some_and(|crl| crl.revokes(cert))
    }

    fn usable(&self, cert: &VerifiedCert, now: i64) -> bool {
        cert.is_valid_at(now) && !self.is_revoked(cert)
    }

    /// Adds a certificate a proxy presented (already verified), unless a newer one is known.
    pub fn learn(&self, proxy: ProxyId, cert: VerifiedCert) {
        let mut entry = self.known.entry(proxy).or_insert_with(|| Entry {
            cert: cert.clone(),
            file_mtime: None,
            checked_at: Instant::now(),
        });
        if cert.not_before_unix >= entry.cert.not_before_unix {
            entry.cert = cert;
        }
    }

    /// The proxy's newest currently valid, unrevoked certificate, if any.
    pub fn get(&self, proxy: &ProxyId) -> Option<VerifiedCert> {
        let now = Self::now();
        if let Some(entry) = self.known.get(proxy) {
            if entry.checked_at.elapsed() < RECHECK && self.usable(&entry.cert, now) {
                return Some(entry.cert.clone());
            }
        }
        let path = self.certs_dir.join(format!("{proxy}.crt"));
        let file_mtime = mtime(&path);
        let cached = self.known.get(proxy).map(|e| (e.cert.clone(), e.file_mtime));
        let from_file = match &cached {
            Some((_, seen)) if seen.is_some() && *seen == file_mtime => None,
            _ => std::fs::read_to_string(&path)
                .ok()
                .and_then(|pem| self.root.verify(&pem, now).ok())
                .filter(|c| c.subject == proxy.as_str() && !self.is_revoked(c)),
        };
        let best = match (cached, from_file) {
            (Some((old, _)), Some(new)) if old.not_before_unix > new.not_before_unix && self.usable(&old, now) => old,
            (_, Some(new)) => new,
            (Some((old, _)), None) => old,
            (None, None) => return None,
        };
        let usable = self.usable(&best, now);
        self.known.insert(proxy.clone(), Entry { cert: best.clone(), file_mtime, checked_at: Instant::now() });
        usable.then_some(best)
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
