//! The built-in certificate authority (rcgen, P-256): `ca init` makes the root and the broker's
//! own certificate, `keygen` makes a site's key and CSR, `ca sign` issues a proxy certificate.
//! Nothing external is needed.
//!
//! Layout of a CA directory: `root.key` (0600), `root.crt`, `broker.key` (0600), `broker.crt`,
//! `certs/<proxy id>.crt` for every issued proxy certificate (the broker serves these), and
//! `crl.pem`, the root-signed revocation list (`ca revoke` adds to it; the broker serves it).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, DnValue, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration as TimeDuration, OffsetDateTime};

use super::CryptoError;
use crate::wire::ProxyId;

pub const ROOT_KEY: &str = "root.key";
pub const ROOT_CERT: &str = "root.crt";
pub const BROKER_KEY: &str = "broker.key";
pub const BROKER_CERT: &str = "broker.crt";
pub const CERTS_DIR: &str = "certs";
pub const CRL_FILE: &str = "crl.pem";
/// Every certificate the CA issued, as `certs/issued/<proxy id>.<serial>.crt` (serial in hex,
/// no colons): a renewed proxy's earlier certificates can still be revoked by serial.
pub const ISSUED_DIR: &str = "issued";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CryptoError + '_ {
    move |source| CryptoError::Io { path: path.display().to_string(), source }
}

fn rc(e: rcgen::Error) -> CryptoError {
    CryptoError::Certificate(e.to_string())
}

/// Writes a private key readable by its owner only.
pub fn write_private(path: &Path, pem: &str) -> Result<(), CryptoError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut file = opts.open(path).map_err(io_err(path))?;
    // The mode above applies only to a file it creates: an existing one gets it here.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io_err(path))?;
    file.write_all(pem.as_bytes()).map_err(io_err(path))
}

pub fn read_to_string(path: &Path) -> Result<String, CryptoError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&bytes)
}

/// A certificate's validity: from `not_before` to `not_after`.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From five minutes ago (clock skew) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { not_before: now - TimeDuration::minutes(5), not_after: now + TimeDuration::days(days.into()) }
    }
}

fn leaf_params(common_name: &str, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyAgreement];
    params
}

/// `photon-broker ca init`: a root key and self-signed certificate, plus the broker's own key
/// and certificate (CN = broker id). Refuses to overwrite an existing root.
pub fn init(dir: &Path, broker_id: &str, days: u32) -> Result<(), CryptoError> {
    let root_key_path = dir.join(ROOT_KEY);
    if root_key_path.exists() {
        return Err(CryptoError::Key(format!(
            "{} already exists; remove the directory to start a new CA",
            root_key_path.display()
        )));
    }
    fs::create_dir_all(dir.join(CERTS_DIR)).map_err(io_err(dir))?;
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc)?;
    let mut params = leaf_params(&format!("Photon root CA for {broker_id}"), Validity::days(days));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = params.self_signed(&root_key).map_err(rc)?;
    write_private(&root_key_path, &root_key.serialize_pem())?;
    fs::write(dir.join(ROOT_CERT), root_cert.pem()).map_err(io_err(dir))?;

    let issuer = Issuer::new(params, root_key);
    let broker_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc)?;
    let broker_cert = leaf_params(broker_id, Validity::days(days)).signed_by(&broker_key, &issuer).map_err(rc)?;
    write_private(&dir.join(BROKER_KEY), &broker_key.serialize_pem())?;
    fs::write(dir.join(BROKER_CERT), broker_cert.pem()).map_err(io_err(dir))?;
    write_crl(dir, &issuer, 1, Vec::new())
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CryptoError> {
    let root_key_pem = read_to_string(&dir.join(ROOT_KEY))?;
    let root_cert_pem = read_to_string(&dir.join(ROOT_CERT))?;
    let root_key = KeyPair::from_pem(&root_key_pem).map_err(|e| CryptoError::Key(e.to_string()))?;
    Issuer::from_ca_cert_pem(&root_cert_pem, root_key).map_err(rc)
}

/// `photon-proxy keygen`: a fresh P-256 private key (PKCS#8 PEM) and a CSR with CN = proxy id.
pub fn keygen(proxy_id: &ProxyId) -> Result<(String, String), CryptoError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, proxy_id.as_str());
    let csr = params.serialize_request(&key).map_err(rc)?;
    Ok((key.serialize_pem(), csr.pem().map_err(rc)?))
}

/// `photon-broker ca sign`: checks the CSR's signature and that its CN is a proxy of
/// `broker_id`, then issues a certificate with only the CA's own choice of extensions and
/// writes it to `certs/<proxy id>.crt`. Returns the proxy id and the certificate's path.
pub fn sign(dir: &Path, broker_id: &str, csr_pem: &str, days: u32) -> Result<(ProxyId, PathBuf), CryptoError> {
    sign_valid(dir, broker_id, csr_pem, Validity::days(days))
}

/// [`sign`] with an explicit validity (short-lived or already expired certificates in tests).
pub fn sign_valid(
    dir: &Path,
    broker_id: &str,
    csr_pem: &str,
    validity: Validity,
) -> Result<(ProxyId, PathBuf), CryptoError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CryptoError::Csr(e.to_string()))?;
    let cn = match csr.params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_owned(),
        _ => return Err(CryptoError::Csr("the CSR has no common name; it must be the proxy id".into())),
    };
    let proxy_id = ProxyId::parse(&cn).map_err(|e| CryptoError::Csr(e.to_string()))?;
    proxy_id.within(broker_id).map_err(|e| CryptoError::Csr(e.to_string()))?;

    let issuer = load_issuer(dir)?;
    let request = CertificateSigningRequestParams {
        params: leaf_params(proxy_id.as_str(), validity),
        public_key: csr.public_key,
    };
    let cert = request.signed_by(&issuer).map_err(rc)?;
    let certs = dir.join(CERTS_DIR);
    let issued = certs.join(ISSUED_DIR);
    fs::create_dir_all(&issued).map_err(io_err(&issued))?;
    let serial = super::cert::serial_of(&cert.pem())?;
    let kept = issued.join(format!("{proxy_id}.{}.crt", hex_serial(&serial).replace(':', "")));
    fs::write(&kept, cert.pem()).map_err(io_err(&kept))?;
    let path = certs.join(format!("{proxy_id}.crt"));
    fs::write(&path, cert.pem()).map_err(io_err(&path))?;
    Ok((proxy_id, path))
}

/// Writes `crl.pem`: the root-signed list of revoked serials, numbered `number`. Replaced
/// atomically (write, then rename) so a reader never sees half a list.
fn write_crl(dir: &Path, issuer: &Issuer<'_, KeyPair>, number: u64, serials: Vec<Vec<u8>>) -> Result<(), CryptoError> {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        // Proxies rely on the CRL number, not on dates, to refuse an older list.
        next_update: now + TimeDuration::days(3650),
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: serials
            .into_iter()
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let pem = params.signed_by(issuer).map_err(rc)?.pem().map_err(rc)?;
    let tmp = dir.join(format!("{CRL_FILE}.tmp"));
    fs::write(&tmp, pem).map_err(io_err(&tmp))?;
    let path = dir.join(CRL_FILE);
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// `photon-broker ca revoke`: adds the serial of `certs/<proxy id>.crt` to the revocation list
/// and signs a new list with the next number. Returns the revoked serial (hex).
pub fn revoke(dir: &Path, proxy_id: &ProxyId) -> Result<String, CryptoError> {
    let cert_path = dir.join(CERTS_DIR).join(format!("{proxy_id}.crt"));
    let serial = super::cert::serial_of(&read_to_string(&cert_path)?)?;
    revoke_serial(dir, &serial)?;
    Ok(hex_serial(&serial))
}

/// `photon-broker ca revoke --serial`: adds `serial` (one the CA issued, e.g. a renewed
/// proxy's earlier certificate kept in `certs/issued/`) to the revocation list.
pub fn revoke_serial(dir: &Path, serial: &[u8]) -> Result<(), CryptoError> {
    let issuer = load_issuer(dir)?;
    let root = super::RootCert::load(&dir.join(ROOT_CERT))?;
    let crl_path = dir.join(CRL_FILE);
    // Only a list that is not there yet starts at number 1. Any other failure to read it stops
    // here: a fresh list numbered 1 would be ignored by everyone holding a later one, and would
    // drop every earlier revocation on the broker's next start.
    let (number, mut serials) = match fs::read_to_string(&crl_path) {
        Ok(pem) => {
            let crl = root.verify_crl(&pem)?;
            (crl.number, crl.serials_der)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, Vec::new()),
        Err(e) => return Err(io_err(&crl_path)(e)),
    };
    if !serials.iter().any(|s| s == serial) {
        serials.push(serial.to_vec());
    }
    write_crl(dir, &issuer, number + 1, serials)
}

/// A serial written as hex, with or without `:` between the bytes (as `ca sign` and the file
/// names in `certs/issued/` spell it).
pub fn parse_serial(text: &str) -> Result<Vec<u8>, CryptoError> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let bad = || CryptoError::Certificate(format!("{text:?} is not a serial number in hex"));
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad())).collect()
}

/// A serial as `VerifiedCert::serial` and the CRL spell it: lowercase hex pairs joined by `:`.
pub fn hex_serial(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewed proxy's earlier certificate stays on file and can be revoked by its serial
    /// (its key may have leaked), leaving the current one valid.
    #[test]
    fn an_earlier_certificate_is_kept_and_revoked_by_serial() {
        let dir = std::env::temp_dir().join(format!("photon-ca-{}", uuid::Uuid::new_v4()));
        init(&dir, "broker", 30).unwrap();
        let id = ProxyId::parse("proxy1.broker").unwrap();
        let issue = || {
            let (_, csr) = keygen(&id).unwrap();
            let (_, path) = sign(&dir, "broker", &csr, 30).unwrap();
            super::super::cert::serial_of(&read_to_string(&path).unwrap()).unwrap()
        };
        let (first, second) = (issue(), issue());
        let kept =
            dir.join(CERTS_DIR).join(ISSUED_DIR).join(format!("{id}.{}.crt", hex_serial(&first).replace(':', "")));
        assert!(kept.exists(), "the first certificate is kept after the renewal");

        let root = crate::crypto::RootCert::load(&dir.join(ROOT_CERT)).unwrap();
        revoke_serial(&dir, &parse_serial(&hex_serial(&first)).unwrap()).unwrap();
        let crl = root.verify_crl(&read_to_string(&dir.join(CRL_FILE)).unwrap()).unwrap();
        assert_eq!((crl.number, crl.serials_der.clone()), (2, vec![first.clone()]), "init wrote list 1");
        // By the current certificate, as before; the list's number grows.
        assert_eq!(revoke(&dir, &id).unwrap(), hex_serial(&second));
        let crl = root.verify_crl(&read_to_string(&dir.join(CRL_FILE)).unwrap()).unwrap();
        assert_eq!((crl.number, crl.serials_der.len()), (3, 2));
        assert!(parse_serial("zz").is_err() && parse_serial("abc").is_err() && parse_serial("").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A revocation list that can't be read is an error, not a fresh list numbered 1 (which
    /// everyone holding a later one would ignore).
    #[test]
    fn an_unreadable_revocation_list_is_an_error() {
        let dir = std::env::temp_dir().join(format!("photon-ca-{}", uuid::Uuid::new_v4()));
        init(&dir, "broker", 30).unwrap();
        // A directory where the list should be: there, but not readable as a file.
        std::fs::remove_file(dir.join(CRL_FILE)).ok();
        std::fs::create_dir(dir.join(CRL_FILE)).unwrap();
        assert!(revoke_serial(&dir, &[1, 2, 3]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
