//! Certificate checks against the pinned root: signature, validity period, subject (the proxy
//! or broker id) and the P-256 public key inside; and the root-signed revocation list.

use std::{collections::HashSet, path::Path, sync::Arc};

use p256::PublicKey;
use x509_parser::{
    certificate::X509Certificate, pem::parse_x509_pem, prelude::FromDer, revocation_list::CertificateRevocationList,
    time::ASN1Time,
};

use super::CryptoError;

fn bad(msg: impl Into<String>) -> CryptoError {
    CryptoError::Certificate(msg.into())
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, CryptoError> {
    pem_of(pem, "CERTIFICATE")
}

fn pem_of(pem: &str, label: &str) -> Result<Vec<u8>, CryptoError> {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).map_err(|_| bad(format!("not a PEM {label}")))?;
    if pem.label != label {
        return Err(bad(format!("expected a {label}, found {}", pem.label)));
    }
    Ok(pem.contents)
}

/// A serial number without the leading zero bytes DER may add, so certificate and CRL agree.
fn normal_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    raw[start..].to_vec()
}

/// The serial number of a certificate (not verified; for the CA's own files).
pub fn serial_of(pem: &str) -> Result<Vec<u8>, CryptoError> {
    let der = pem_to_der(pem)?;
    Ok(normal_serial(parse(&der)?.raw_serial()))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CryptoError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(format!("unparsable: {e}")))?;
    Ok(cert)
}

fn common_name(cert: &X509Certificate<'_>) -> Result<String, CryptoError> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| bad("no common name"))
}

/// The federation's root certificate, pinned by every proxy and by the broker.
#[derive(Clone)]
pub struct RootCert {
    der: Arc<[u8]>,
}

impl RootCert {
    pub fn from_pem(pem: &str) -> Result<Self, CryptoError> {
        let der = pem_to_der(pem)?;
        let cert = parse(&der)?;
        cert.verify_signature(None).map_err(|_| bad("root certificate is not validly self-signed"))?;
        Ok(Self { der: der.into() })
    }

    pub fn load(path: &Path) -> Result<Self, CryptoError> {
        Self::from_pem(&super::ca::read_to_string(path)?)
    }

    /// Checks `pem` was issued by this root and is valid at `now` (Unix seconds).
    pub fn verify(&self, pem: &str, now_unix: i64) -> Result<VerifiedCert, CryptoError> {
        let root = parse(&self.der)?;
        let der = pem_to_der(pem)?;
        let cert = parse(&der)?;
        if cert.issuer().as_raw() != root.subject().as_raw() {
            return Err(bad("not issued by the pinned root"));
        }
        cert.verify_signature(Some(root.public_key())).map_err(|_| bad("signature by the root does not verify"))?;
        let subject = common_name(&cert)?;
        let now = ASN1Time::from_timestamp(now_unix).map_err(|_| bad("clock out of range"))?;
        if !cert.validity().is_valid_at(now) {
            return Err(CryptoError::CertificateExpired { subject });
        }
        let public_key = PublicKey::from_sec1_bytes(&cert.public_key().subject_public_key.data)
            .map_err(|_| bad("the key is not a P-256 public key"))?;
        Ok(VerifiedCert {
            subject,
            public_key,
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
            serial: super::ca::hex_serial(&normal_serial(cert.raw_serial())),
            pem: Arc::from(pem),
        })
    }

    /// Checks a revocation list was signed by this root and reads it.
    pub fn verify_crl(&self, pem: &str) -> Result<Crl, CryptoError> {
        let root = parse(&self.der)?;
        let der = pem_of(pem, "X509 CRL")?;
        let (_, crl) =
            CertificateRevocationList::from_der(&der).map_err(|e| bad(format!("unparsable revocation list: {e}")))?;
        if crl.issuer().as_raw() != root.subject().as_raw() {
            return Err(bad("revocation list not issued by the pinned root"));
        }
        crl.verify_signature(root.public_key()).map_err(|_| bad("revocation list signature does not verify"))?;
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| bad("revocation list without a usable CRL number"))?;
        let serials_der: Vec<Vec<u8>> =
            crl.iter_revoked_certificates().map(|r| normal_serial(r.raw_serial())).collect();
        let serials = serials_der.iter().map(|s| super::ca::hex_serial(s)).collect();
        Ok(Crl { number, serials, serials_der, pem: Arc::from(pem) })
    }
}

/// A verified revocation list: its number (only ever grows) and the revoked serials.
#[derive(Clone, Debug)]
pub struct Crl {
    pub number: u64,
    /// Serials as [`VerifiedCert::serial`] spells them.
    pub serials: HashSet<String>,
    pub serials_der: Vec<Vec<u8>>,
    pub pem: Arc<str>,
}

impl Crl {
    pub fn revokes(&self, cert: &VerifiedCert) -> bool {
        self.serials.contains(&cert.serial)
    }
}

/// A certificate that verified against the root: who it names and the key it certifies.
#[derive(Clone, Debug)]
pub struct VerifiedCert {
    pub subject: String,
    pub public_key: PublicKey,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub serial: String,
    pub pem: Arc<str>,
}

impl VerifiedCert {
    pub fn is_valid_at(&self, now_unix: i64) -> bool {
        self.not_before_unix <= now_unix && now_unix <= self.not_after_unix
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crypto::ca, wire::ProxyId};

    #[test]
    fn issue_and_verify() {
        let dir = std::env::temp_dir().join(format!("photon-ca-{}", uuid::Uuid::new_v4()));
        ca::init(&dir, "broker", 30).unwrap();
        let root = RootCert::load(&dir.join(ca::ROOT_CERT)).unwrap();
        let (key_pem, csr) = ca::keygen(&ProxyId::parse("proxy1.broker").unwrap()).unwrap();
        let (id, path) = ca::sign(&dir, "broker", &csr, 30).unwrap();
        assert_eq!(id.as_str(), "proxy1.broker");
        let pem = std::fs::read_to_string(path).unwrap();
        let now = crate::crypto::unix_millis() as i64 / 1000;
        let cert = root.verify(&pem, now).unwrap();
        assert_eq!(cert.subject, "proxy1.broker");
        let secret: p256::SecretKey = p256::pkcs8::DecodePrivateKey::from_pkcs8_pem(&key_pem).unwrap();
        assert_eq!(secret.public_key(), cert.public_key);
        // Expired: checked 31 days later.
        assert!(matches!(root.verify(&pem, now + 31 * 86_400), Err(CryptoError::CertificateExpired { .. })));
        // Another CA's root does not accept it.
        let other = std::env::temp_dir().join(format!("photon-ca-{}", uuid::Uuid::new_v4()));
        ca::init(&other, "broker", 30).unwrap();
        let other_root = RootCert::load(&other.join(ca::ROOT_CERT)).unwrap();
        assert!(other_root.verify(&pem, now).is_err());
        // A CSR for another federation is refused.
        let (_, csr) = ca::keygen(&ProxyId::parse("proxy1.elsewhere").unwrap()).unwrap();
        assert!(ca::sign(&dir, "broker", &csr, 30).is_err());
        // Revocation: the new list names the serial, has a higher number and verifies.
        let before = root.verify_crl(&std::fs::read_to_string(dir.join(ca::CRL_FILE)).unwrap()).unwrap();
        assert!(!before.revokes(&cert));
        ca::revoke(&dir, &id).unwrap();
        let after = root.verify_crl(&std::fs::read_to_string(dir.join(ca::CRL_FILE)).unwrap()).unwrap();
        assert!(after.revokes(&cert) && after.number == before.number + 1);
        assert!(other_root.verify_crl(&after.pem).is_err());
        // Garbage is an error, not a panic.
        assert!(root.verify("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", now).is_err());
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other);
    }
}
