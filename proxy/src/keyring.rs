//! The proxy's keys: its own certified key (current and, after a rotation, the previous one),
//! the peers' certificates with the pairwise keys derived from them, and the revocation list.
//! No I/O here: [`crate::upstream::Upstream`] fetches certificates and lists from the broker and
//! hands them in; everything is verified against the pinned root before it is used.
//!
//! Public-key work happens only when a peer's certificate is first seen or changes (one ECDH,
//! two HKDFs); sealing and opening then look keys up in a `DashMap`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use dashmap::DashMap;
use parking_lot::RwLock;
use photon::{
    crypto::{
        cert::Crl,
        e2e::{pair_keys, KeyId, PairKey, Party},
        session::Identity,
        unix_millis, CryptoError, RootCert, VerifiedCert,
    },
    wire::ProxyId,
};

/// Why a peer's certificate can't be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("no certificate for {0}")]
    NoCertificate(ProxyId),
    #[error("the certificate of {0} expired")]
    Expired(ProxyId),
    #[error("the certificate of {0} is revoked")]
    Revoked(ProxyId),
    #[error("the certificate of {0} is invalid: {1}")]
    Invalid(ProxyId, String),
    #[error("{0} sealed with a key it has no valid certificate for")]
    UnknownKey(ProxyId),
    #[error("cannot fetch the certificate of {0}: {1}")]
    Unreachable(ProxyId, String),
}

impl PeerError {
    /// A task or result can't be sealed for this proxy (`424`), as opposed to broker trouble.
    pub fn proxy_without_certificate(&self) -> Option<&ProxyId> {
        match self {
            Self::NoCertificate(p) | Self::Expired(p) | Self::Revoked(p) | Self::Invalid(p, _) => Some(p),
            Self::UnknownKey(_) | Self::Unreachable(..) => None,
        }
    }
}

fn now_unix() -> i64 {
    (unix_millis() / 1000) as i64
}

/// This proxy's certified key.
pub struct Own {
    pub identity: Arc<Identity>,
    pub cert: VerifiedCert,
    pub kid: KeyId,
}

impl Own {
    pub fn new(identity: Identity, cert: VerifiedCert) -> Self {
        Self { kid: KeyId::of(&cert.public_key), identity: Arc::new(identity), cert }
    }
}

/// A peer proxy's certificate and the two directional keys with it, derived under `my_kid`.
pub struct Peer {
    pub proxy: ProxyId,
    pub cert: VerifiedCert,
    pub kid: KeyId,
    pub my_kid: KeyId,
    /// This proxy → the peer (sealing).
    pub to_peer: PairKey,
    /// The peer → this proxy (opening).
    pub from_peer: PairKey,
    /// When the broker last served this certificate (refreshed without re-deriving if unchanged).
    fetched_at: parking_lot::Mutex<Instant>,
}

struct Slot {
    current: Arc<Peer>,
    /// The peer's certificate before its last change: messages sealed just before a rotation
    /// still open while that certificate is valid.
    previous: Option<Arc<Peer>>,
}

pub struct Keyring {
    me: ProxyId,
    root: RootCert,
    /// Current and previous own keys.
    own: RwLock<(Arc<Own>, Option<Arc<Own>>)>,
    peers: DashMap<ProxyId, Slot>,
    crl: RwLock<Option<Arc<Crl>>>,
    /// Peer certificates older than this are fetched again (rotation and revocation pick-up).
    max_age: Duration,
}

impl Keyring {
    pub fn new(me: ProxyId, root: RootCert, own: Own, max_age: Duration) -> Self {
        let keys = Self {
            me,
            root,
            own: RwLock::new((Arc::new(own), None)),
            peers: DashMap::new(),
            crl: RwLock::new(None),
            max_age,
        };
        keys.install_self();
        keys
    }

    /// This proxy is a peer of itself (it reads its own tasks back): keys from its own cert.
    fn install_self(&self) {
        let own = self.own();
        let me = Arc::new(self.derive(&own, &self.me, own.cert.clone()));
        let mut slot =
            self.peers.entry(self.me.clone()).or_insert_with(|| Slot { current: me.clone(), previous: None });
        if slot.current.kid != me.kid {
            slot.previous = Some(std::mem::replace(&mut slot.current, me));
        } else {
            slot.current = me;
        }
    }

    pub fn me(&self) -> &ProxyId {
        &self.me
    }

    pub fn root(&self) -> &RootCert {
        &self.root
    }

    /// The broker this proxy belongs to: its own id without its first label.
    pub fn broker_id(&self) -> &str {
        self.me.as_str().split_once('.').map_or("", |(_, broker)| broker)
    }

    pub fn own(&self) -> Arc<Own> {
        self.own.read().0.clone()
    }

    /// Why the own key `own` must not open anything now: its certificate expired or was
    /// revoked (a revoked key may be in someone else's hands, who could then seal messages for
    /// it as if from any proxy).
    pub fn check_own(&self, own: &Own) -> Result<(), PeerError> {
        self.check(&self.me, &own.cert)
    }

    /// The own key named `kid`: the current one or the one before the last rotation.
    pub fn own_by_kid(&self, kid: &KeyId) -> Option<Arc<Own>> {
        let own = self.own.read();
        if &own.0.kid == kid {
            return Some(own.0.clone());
        }
        own.1.as_ref().filter(|o| &o.kid == kid).cloned()
    }

    /// Switches to a renewed or rotated own certificate; the old key stays for opening.
    pub fn rotate(&self, new: Own) {
        let mut own = self.own.write();
        let old = std::mem::replace(&mut own.0, Arc::new(new));
        if old.kid != own.0.kid {
            own.1 = Some(old);
        }
        drop(own);
        self.install_self();
    }

    pub fn revoked(&self, cert: &VerifiedCert) -> bool {
        self.crl.read().as_ref().is_some_and(|crl| crl.revokes(cert))
    }

    /// Takes a verified revocation list unless it is older than the one held. Returns whether
    /// it was taken. Revoked peers stay cached (every use checks the list) so that refusals can
    /// say why.
    pub fn set_crl(&self, crl: Crl) -> bool {
        let mut held = self.crl.write();
        if held.as_ref().is_some_and(|h| h.number >= crl.number) {
            return false;
        }
        *held = Some(Arc::new(crl));
        true
    }

    /// Why the broker has no certificate for `proxy`, as far as this proxy knows: the one it had
    /// was revoked or expired, or it never had one.
    pub fn why_missing(&self, proxy: &ProxyId) -> PeerError {
        match self.peers.get(proxy) {
            Some(slot) => {
                self.check(proxy, &slot.current.cert).err().unwrap_or(PeerError::NoCertificate(proxy.clone()))
            }
            None => PeerError::NoCertificate(proxy.clone()),
        }
    }

    /// Why this proxy's own certificate can't be used right now, if it can't.
    pub fn own_problem(&self) -> Option<PeerError> {
        let own = self.own();
        self.check(&self.me, &own.cert).err()
    }

    fn check(&self, proxy: &ProxyId, cert: &VerifiedCert) -> Result<(), PeerError> {
        if !cert.is_valid_at(now_unix()) {
            return Err(PeerError::Expired(proxy.clone()));
        }
        if self.revoked(cert) {
            return Err(PeerError::Revoked(proxy.clone()));
        }
        Ok(())
    }

    fn usable(&self, peer: &Peer) -> bool {
        self.check(&peer.proxy, &peer.cert).is_ok()
    }

    /// A cached peer key usable now: certificate valid and unrevoked, derived under the
    /// current own key, fetched within `max_age`, and (if `want` is given) with that key id.
    pub fn fresh(&self, proxy: &ProxyId, want: Option<KeyId>) -> Option<Arc<Peer>> {
        let my_kid = self.own().kid;
        let slot = self.peers.get(proxy)?;
        let ok = |peer: &&Arc<Peer>| peer.my_kid == my_kid && self.usable(peer);
        match want {
            // Sealing: the current certificate, fetched recently (this proxy's own never ages).
            None => Some(&slot.current)
                .filter(|p| proxy == &self.me || p.fetched_at.lock().elapsed() < self.max_age)
                .filter(ok)
                .cloned(),
            // Opening: whichever known certificate carries the named key, at any age. The one
            // before the last rotation may have been derived under an earlier own key (this
            // proxy's own previous certificate always is); `open_key` derives again then.
            Some(kid) => std::iter::once(&slot.current)
                .filter(ok)
                .chain(slot.previous.iter().filter(|p| self.usable(p)))
                .find(|p| p.kid == kid)
                .cloned(),
        }
    }

    /// The cached peer even if older than `max_age` (used when the broker can't be reached),
    /// as long as its certificate is still valid and unrevoked.
    pub fn stale(&self, proxy: &ProxyId) -> Option<Arc<Peer>> {
        let slot = self.peers.get(proxy)?;
        (self.usable(&slot.current) && slot.current.my_kid == self.own().kid).then(|| slot.current.clone())
    }

    /// Checks a certificate fetched for `proxy` and installs it (derives the pairwise keys). The
    /// certificate already held, served again, costs no public-key operation: only its validity
    /// and revocation are checked again.
    pub fn install(&self, proxy: &ProxyId, pem: &str) -> Result<Arc<Peer>, PeerError> {
        // Only a proxy of this broker is a peer. The broker's own certificate comes from the same
        // root, and a broker id of two labels or more (`broker.example.org`) parses as a ProxyId:
        // without this, the broker could serve its certificate as that "proxy's" and then seal
        // messages from, and open results for, a made-up app `x.broker.example.org`.
        let broker_id = self.broker_id();
        if proxy.within(broker_id).is_err() {
            return Err(PeerError::Invalid(proxy.clone(), format!("not a proxy of broker {broker_id}")));
        }
        if let Some(slot) = self.peers.get(proxy) {
            let held = &slot.current;
            if *held.cert.pem == *pem && held.my_kid == self.own().kid {
                self.check(proxy, &held.cert)?;
                *held.fetched_at.lock() = Instant::now();
                return Ok(held.clone());
            }
        }
        let cert = self.root.verify(pem, now_unix()).map_err(|e| match e {
            CryptoError::CertificateExpired { .. } => PeerError::Expired(proxy.clone()),
            other => PeerError::Invalid(proxy.clone(), other.to_string()),
        })?;
        if cert.subject != proxy.as_str() {
            return Err(PeerError::Invalid(proxy.clone(), format!("it names {:?}", cert.subject)));
        }
        self.check(proxy, &cert)?;
        let own = self.own();
        let peer = Arc::new(self.derive(&own, proxy, cert));
        let mut slot =
            self.peers.entry(proxy.clone()).or_insert_with(|| Slot { current: peer.clone(), previous: None });
        if slot.current.kid != peer.kid {
            let old = std::mem::replace(&mut slot.current, peer.clone());
            slot.previous = Some(old);
        } else {
            slot.current = peer.clone();
        }
        Ok(peer)
    }

    fn derive(&self, own: &Own, proxy: &ProxyId, cert: VerifiedCert) -> Peer {
        let (to_peer, from_peer) = pair_keys(
            &own.identity.secret,
            &Party { proxy: &self.me, key: &own.cert.public_key },
            &Party { proxy, key: &cert.public_key },
        );
        Peer {
            proxy: proxy.clone(),
            kid: KeyId::of(&cert.public_key),
            my_kid: own.kid,
            cert,
            to_peer,
            from_peer,
            fetched_at: parking_lot::Mutex::new(Instant::now()),
        }
    }

    /// The key that opens a message from `sender` sealed for the own key `mine`: the cached one,
    /// or, for a message sealed just before this proxy rotated its key, one derived again under
    /// the previous key (one ECDH; rare).
    pub fn open_key(&self, mine: &Own, sender: Arc<Peer>) -> OpenKey {
        let rederived = (sender.my_kid != mine.kid).then(|| self.derive(mine, &sender.proxy, sender.cert.clone()));
        OpenKey { me: self.me.clone(), sender, rederived }
    }
}

/// See [`Keyring::open_key`]; owned, so opening can move to the blocking pool.
pub struct OpenKey {
    pub me: ProxyId,
    sender: Arc<Peer>,
    rederived: Option<Peer>,
}

impl OpenKey {
    pub fn key(&self) -> &PairKey {
        self.rederived.as_ref().map_or(&self.sender.from_peer, |p| &p.from_peer)
    }
}

#[cfg(test)]
mod tests {
    use photon::crypto::ca;

    use super::*;

    /// A CA in a directory of its own (removed when dropped) that issues proxy keys.
    struct TestCa {
        dir: std::path::PathBuf,
        broker_id: &'static str,
        root: RootCert,
    }

    impl TestCa {
        fn new(broker_id: &'static str) -> Self {
            let dir = std::env::temp_dir().join(format!("photon-keyring-{}", uuid::Uuid::new_v4()));
            ca::init(&dir, broker_id, 30).unwrap();
            let root = RootCert::load(&dir.join(ca::ROOT_CERT)).unwrap();
            Self { dir, broker_id, root }
        }

        fn id(&self, name: &str) -> ProxyId {
            ProxyId::from_parts(name, self.broker_id).unwrap()
        }

        /// A new key for `id`, certified (its certificate is now the one on file for `id`).
        fn issue(&self, id: &ProxyId) -> Own {
            let (key, csr) = ca::keygen(id).unwrap();
            let (_, cert_file) = ca::sign(&self.dir, self.broker_id, &csr, 30).unwrap();
            let pem = std::fs::read_to_string(cert_file).unwrap();
            let cert = self.root.verify(&pem, (unix_millis() / 1000) as i64).unwrap();
            Own::new(Identity::new(&key, pem, &cert).unwrap(), cert)
        }
    }

    impl Drop for TestCa {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// With a broker id of several labels, the broker's own certificate (from the same root,
    /// named by that id) parses as a proxy's; it is refused as a peer all the same, and only
    /// `<proxy>.<broker id>` certificates are taken.
    #[test]
    fn only_proxies_of_this_broker_are_peers() {
        let ca = TestCa::new("broker.example.org");
        let (me, peer_id) = (ca.id("proxy1"), ca.id("proxy2"));
        let peer = ca.issue(&peer_id);
        let keys = Keyring::new(me.clone(), ca.root.clone(), ca.issue(&me), Duration::from_secs(60));
        assert_eq!(keys.broker_id(), ca.broker_id);

        let broker_as_proxy = ProxyId::parse(ca.broker_id).expect("a broker id of three labels parses as a ProxyId");
        let broker_pem = std::fs::read_to_string(ca.dir.join(ca::BROKER_CERT)).unwrap();
        let refused = keys.install(&broker_as_proxy, &broker_pem).err().expect("the broker is no peer");
        assert!(refused.to_string().contains("not a proxy of broker"), "{refused}");
        assert!(keys.install(&peer_id, &peer.cert.pem).is_ok());
    }

    /// The own key before a rotation opens messages only while its certificate is valid and
    /// unrevoked: a key revoked because it leaked may be in hands that seal for it.
    #[test]
    fn a_revoked_previous_own_key_opens_nothing() {
        let ca = TestCa::new("broker");
        let me = ca.id("proxy1");
        let old = ca.issue(&me);
        ca::revoke(&ca.dir, &me).unwrap(); // the certificate on file: the old one
        let crl = ca.root.verify_crl(&std::fs::read_to_string(ca.dir.join(ca::CRL_FILE)).unwrap()).unwrap();
        let new = ca.issue(&me);
        let keys = Keyring::new(me.clone(), ca.root.clone(), old, Duration::from_secs(60));
        let old_kid = keys.own().kid;
        keys.rotate(new);
        assert!(keys.set_crl(crl));
        let previous = keys.own_by_kid(&old_kid).expect("kept for opening");
        assert!(matches!(keys.check_own(&previous), Err(PeerError::Revoked(_))));
        assert!(keys.check_own(&keys.own()).is_ok());
    }
}
