//! A local CA in Istio's plug-in CA layout (`ca-cert.pem`, `ca-key.pem`,
//! `root-cert.pem`, `cert-chain.pem`), issuing short-lived SPIFFE workload
//! certificates.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::RootCertStore;
use x509_parser::prelude::FromDer as _;

use super::{IdentityError, SpiffeId};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// Lifetimes of the certificates `Ca::init` makes.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Workload certs start a little in the past so peers with a slightly slow
/// clock accept them.
const BACKDATE: Duration = Duration::from_secs(60);

/// The signing CA (an intermediate under the mesh root) plus what a peer
/// needs to verify what it signs.
pub struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// Sent after a leaf: the signing cert, then any intermediates up to (not
    /// including) the root.
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    root_store: Arc<RootCertStore>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A freshly issued workload certificate with its private key.
pub struct IssuedCert {
    pub id: SpiffeId,
    /// Leaf first, then the CA chain (without the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// When it was issued (renewal is scheduled from here).
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("id", &self.id)
            .field("issued_at", &self.issued_at)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// PEM of the leaf and chain (for tools such as python's ssl module).
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect()
    }
    pub fn key_pem(&self) -> String {
        pem("PRIVATE KEY", self.key.secret_pkcs8_der())
    }
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.issued_at)
            .unwrap_or_default()
    }
    /// The rustls form, ready for a cert resolver.
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, IdentityError> {
        let key = PrivateKeyDer::Pkcs8(self.key.clone_key());
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key)
            .map_err(|e| IdentityError::Tls(format!("workload key for {}: {e}", self.id)))?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            self.chain.clone(),
            signer,
        )))
    }
}

/// Istio workload certificate parameters: no subject, one URI SAN, both
/// TLS usages, backdated a little.
fn workload_params(
    id: &SpiffeId,
    now: SystemTime,
    lifetime: Duration,
) -> Result<CertificateParams, IdentityError> {
    let mut p = CertificateParams::default();
    // Istio workload certs carry no subject; the identity is the SAN.
    p.distinguished_name = DistinguishedName::new();
    let uri = id
        .uri()
        .try_into()
        .map_err(|e| IdentityError::BadSpiffeId(format!("{id}: {e}")))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = to_offset(now - BACKDATE);
    p.not_after = to_offset(now + lifetime);
    p.serial_number = Some(rand_serial()?);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Why a CSR cannot be signed (the caller's fault unless `Sign`).
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("csr is not a PEM \"CERTIFICATE REQUEST\"")]
    NotPem,
    #[error("csr: {0}")]
    Malformed(String),
    #[error("csr key: {0}")]
    Key(String),
    #[error("csr must carry exactly one SAN, the URI {want}; it has {got:?}")]
    San { want: String, got: Vec<String> },
    #[error("signing: {0}")]
    Sign(String),
}

/// Keys peers accept: ECDSA P-256/P-384, RSA of 2048 bits or more.
fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), CsrError> {
    use x509_parser::public_key::PublicKey;
    match spki.parsed() {
        // Other curves fail the signature check already (ring verifies
        // P-256 and P-384 only).
        Ok(PublicKey::EC(k)) if matches!(k.key_size(), 256 | 384) => Ok(()),
        Ok(PublicKey::EC(_)) => Err(CsrError::Key("EC keys must be on P-256 or P-384".into())),
        Ok(PublicKey::RSA(k)) if k.key_size() >= 2048 => Ok(()),
        Ok(PublicKey::RSA(k)) => Err(CsrError::Key(format!(
            "RSA key of {} bits, want at least 2048",
            k.key_size()
        ))),
        Ok(_) => Err(CsrError::Key("want an ECDSA or RSA key".into())),
        Err(e) => Err(CsrError::Key(e.to_string())),
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(label, der.to_vec()))
}

fn rand_serial() -> Result<SerialNumber, IdentityError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| IdentityError::Tls("system random source failed".into()))?;
    b[0] &= 0x7f; // positive INTEGER
    Ok(SerialNumber::from_slice(&b))
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let data = fs::read(path).map_err(|e| IdentityError::Io(path.to_owned(), e))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadFile(path.to_owned(), format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(IdentityError::BadFile(
            path.to_owned(),
            "no CERTIFICATE in file".into(),
        ));
    }
    Ok(certs)
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), IdentityError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| IdentityError::Io(path.to_owned(), e))?;
    if secret {
        // `mode` only applies when creating; an overwritten file keeps its bits.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| IdentityError::Io(path.to_owned(), e))?;
    }
    f.write_all(contents.as_bytes())
        .map_err(|e| IdentityError::Io(path.to_owned(), e))
}

fn ca_params(
    cn: &str,
    org: &str,
    lifetime: Duration,
    path_len: Option<u8>,
) -> Result<CertificateParams, IdentityError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = to_offset(now - BACKDATE);
    p.not_after = to_offset(now + lifetime);
    p.serial_number = Some(rand_serial()?);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

impl Ca {
    /// Creates a new root and a signing intermediate in `dir` (Istio's plug-in
    /// layout; `cert-chain.pem` = intermediate + root as Istio's tooling
    /// writes it). The root's key is not kept: this CA only ever signs
    /// through the intermediate. Refuses to replace an existing CA unless
    /// `overwrite`.
    pub fn init(dir: &Path, org: &str, overwrite: bool) -> Result<Ca, IdentityError> {
        fs::create_dir_all(dir).map_err(|e| IdentityError::Io(dir.to_owned(), e))?;
        if !overwrite {
            for f in [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN] {
                let p = dir.join(f);
                if p.exists() {
                    return Err(IdentityError::CaExists(p));
                }
            }
        }
        let gen_err =
            |what: &str, e: rcgen::Error| IdentityError::Tls(format!("generating {what}: {e}"));
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| gen_err("root key", e))?;
        let root_params = ca_params("shunt root CA", org, ROOT_LIFETIME, None)?;
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(|e| gen_err("root certificate", e))?;
        let root_issuer = Issuer::new(root_params, root_key);

        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| gen_err("CA key", e))?;
        let ca_cert = ca_params("shunt intermediate CA", org, INTERMEDIATE_LIFETIME, Some(0))?
            .signed_by(&ca_key, &root_issuer)
            .map_err(|e| gen_err("CA certificate", e))?;

        write_file(&dir.join(CA_KEY), &ca_key.serialize_pem(), true)?;
        write_file(&dir.join(CA_CERT), &ca_cert.pem(), false)?;
        write_file(&dir.join(ROOT_CERT), &root_cert.pem(), false)?;
        write_file(
            &dir.join(CERT_CHAIN),
            &(ca_cert.pem() + &root_cert.pem()),
            false,
        )?;
        Ca::load(dir)
    }

    /// Loads an existing plug-in CA directory (shunt's own or a mesh
    /// intermediate from Istio).
    pub fn load(dir: &Path) -> Result<Ca, IdentityError> {
        let ca_cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let ca_cert = read_certs(&ca_cert_path)?.remove(0);
        let key_pem =
            fs::read_to_string(&key_path).map_err(|e| IdentityError::Io(key_path.clone(), e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            IdentityError::BadFile(
                key_path.clone(),
                format!("not a usable PKCS#8 \"PRIVATE KEY\" (ECDSA or RSA): {e}"),
            )
        })?;

        let (_, parsed) = x509_parser::parse_x509_certificate(&ca_cert).map_err(|e| {
            IdentityError::BadFile(ca_cert_path.clone(), format!("invalid certificate: {e}"))
        })?;
        let is_ca = parsed
            .basic_constraints()
            .ok()
            .flatten()
            .map(|bc| bc.value.ca)
            .unwrap_or(false);
        if !is_ca {
            return Err(IdentityError::BadFile(
                ca_cert_path,
                "not a CA certificate (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(IdentityError::BadFile(
                key_path,
                format!("key does not match the certificate in {CA_CERT}"),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| {
            IdentityError::BadFile(ca_cert_path.clone(), format!("cannot sign with it: {e}"))
        })?;

        let roots = read_certs(&dir.join(ROOT_CERT))?;
        let mut root_store = RootCertStore::empty();
        for r in &roots {
            root_store.add(r.clone()).map_err(|e| {
                IdentityError::BadFile(dir.join(ROOT_CERT), format!("unusable root: {e}"))
            })?;
        }
        let mut chain = vec![ca_cert.clone()];
        for c in read_certs(&dir.join(CERT_CHAIN))? {
            if c != ca_cert && !roots.contains(&c) {
                chain.push(c);
            }
        }
        Ok(Ca {
            dir: dir.to_owned(),
            issuer,
            chain,
            roots,
            root_store: Arc::new(root_store),
        })
    }

    /// Issues a workload certificate with exactly one URI SAN (the SPIFFE
    /// ID), ECDSA P-256, valid for `lifetime`.
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<IssuedCert, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Tls(format!("generating key for {id}: {e}")))?;
        let now = SystemTime::now();
        let cert = workload_params(id, now, lifetime)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| IdentityError::Tls(format!("signing certificate for {id}: {e}")))?;
        Ok(IssuedCert {
            id: id.clone(),
            chain: self.with_chain(cert.der().clone()),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            issued_at: now,
            not_after: now + lifetime,
        })
    }

    /// Signs a PKCS#10 request (PEM) for `id`: the request's signature must
    /// verify (the caller holds the key) and its only SAN must be the URI
    /// `id`. Nothing else of the request is used: the certificate is built
    /// exactly as [`issue`](Self::issue) builds one. Returns the leaf and the
    /// CA chain (without the root).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CsrError> {
        let der = ::pem::parse(csr_pem)
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE REQUEST")
            .ok_or(CsrError::NotPem)?;
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.contents())
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
        check_key(&req.certification_request_info.subject_pki)?;
        let parsed =
            rcgen::CertificateSigningRequestParams::from_der(&der.contents().to_vec().into())
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
        let want = id.uri();
        match parsed.params.subject_alt_names.as_slice() {
            [SanType::URI(u)] if u.as_str() == want => {}
            sans => {
                return Err(CsrError::San {
                    want,
                    got: sans.iter().map(|s| format!("{s:?}")).collect(),
                })
            }
        }
        let cert = workload_params(id, SystemTime::now(), lifetime)
            .map_err(|e| CsrError::Malformed(e.to_string()))?
            .signed_by(&parsed.public_key, &self.issuer)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        Ok(self.with_chain(cert.der().clone()))
    }

    /// A serving certificate for the CSR endpoint: DNS SANs `names`, server
    /// auth only, with a fresh key.
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>), IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Tls(format!("generating server key: {e}")))?;
        let mut p = CertificateParams::new(names.to_vec())
            .map_err(|e| IdentityError::Tls(format!("server names {names:?}: {e}")))?;
        p.distinguished_name = DistinguishedName::new();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        p.not_before = to_offset(now - BACKDATE);
        p.not_after = to_offset(now + lifetime);
        p.serial_number = Some(rand_serial()?);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| IdentityError::Tls(format!("signing server certificate: {e}")))?;
        Ok((
            self.with_chain(cert.der().clone()),
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
    }

    /// `leaf` followed by the CA chain.
    fn with_chain(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(leaf);
        chain.extend(self.chain.iter().cloned());
        chain
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The mesh roots peers are verified against.
    pub fn root_store(&self) -> Arc<RootCertStore> {
        self.root_store.clone()
    }
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(|c| pem("CERTIFICATE", c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(sans: Vec<SanType>, key: &KeyPair) -> String {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    const CURL: &str = "spiffe://cluster.local/ns/default/sa/curl";

    #[test]
    fn a_csr_is_signed_only_when_its_one_san_is_exactly_the_granted_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), "cluster.local", false).unwrap();
        let id: SpiffeId = CURL.parse().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let life = Duration::from_secs(3600);

        let chain = ca.sign_csr(&csr(vec![uri(CURL)], &key), &id, life).unwrap();
        assert_eq!(chain.len(), 2, "leaf and the signing CA");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert_eq!(
            leaf.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        assert_eq!(super::super::peer_identity(Some(&chain[..1])).unwrap(), id);
        let v = leaf.validity();
        let secs = v.not_after.timestamp() - v.not_before.timestamp();
        assert_eq!(secs as u64, life.as_secs() + BACKDATE.as_secs());

        let refused = |sans: Vec<SanType>| {
            let e = ca.sign_csr(&csr(sans, &key), &id, life).unwrap_err();
            assert!(matches!(e, CsrError::San { .. }), "{e}");
        };
        refused(vec![uri("spiffe://cluster.local/ns/default/sa/admin")]);
        refused(vec![
            uri(CURL),
            uri("spiffe://cluster.local/ns/default/sa/admin"),
        ]);
        refused(vec![
            uri(CURL),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ]);
        refused(vec![]);
    }

    #[test]
    fn a_csr_whose_signature_does_not_verify_or_that_is_not_a_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), "cluster.local", false).unwrap();
        let id: SpiffeId = CURL.parse().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let good = csr(vec![uri(CURL)], &key);
        let mut der = ::pem::parse(&good).unwrap().into_contents();
        // Flip a bit in the signature (the last bytes of the request).
        let n = der.len();
        der[n - 2] ^= 0x01;
        let tampered = pem("CERTIFICATE REQUEST", &der);
        let life = Duration::from_secs(60);
        assert!(matches!(
            ca.sign_csr(&tampered, &id, life).unwrap_err(),
            CsrError::Malformed(_)
        ));
        assert!(matches!(
            ca.sign_csr(&ca.roots_pem(), &id, life).unwrap_err(),
            CsrError::NotPem
        ));
        assert!(matches!(
            ca.sign_csr("garbage", &id, life).unwrap_err(),
            CsrError::NotPem
        ));
    }
}
