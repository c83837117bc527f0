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
        let now = SystemTime::now();
        p.not_before = to_offset(now - BACKDATE);
        p.not_after = to_offset(now + lifetime);
        p.serial_number = Some(rand_serial()?);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| IdentityError::Tls(format!("signing certificate for {id}: {e}")))?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(cert.der().clone());
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedCert {
            id: id.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            issued_at: now,
            not_after: now + lifetime,
        })
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
