//! The interception CA: the certificate authority whose leaves netfence shows a guest when it
//! terminates the guest's TLS, so the guest must trust it (and only it needs to).
//!
//! Theory of operation: the CA is either generated at start ([`InterceptionCa::generate`]:
//! ECDSA P-256, `basicConstraints CA:TRUE, pathlen 0`, `keyCertSign`, valid from an hour ago for
//! [`CA_VALIDITY`]) and so new at every start, or loaded from a PEM certificate and key
//! ([`InterceptionCa::load`]) so that it stays the same across restarts and can be installed in
//! a guest image once. Loading checks everything that would otherwise surface later as a guest's
//! handshake failure: the files are readable PEM, the key is the certificate's, the certificate
//! is a CA that may sign certificates, and it is valid now. Every problem is a [`CaError`] that
//! names the file and says what is wrong.
//!
//! [`InterceptionCa::issue_leaf`] makes the certificate shown for one server name: a fresh
//! ECDSA P-256 key, SAN = that name only, `not_before` backdated by [`LEAF_BACKDATE`] (a guest
//! whose clock runs behind the host's must not see a certificate from the future), valid for
//! [`LEAF_VALIDITY`] (never past the CA's own end), signed by the CA. The leaf comes back as a
//! rustls [`CertifiedKey`] ready for a `ServerConfig`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// The common name of a generated CA unless `tls.ca_cn` or `--cn` says otherwise.
pub const DEFAULT_CA_CN: &str = "netfence interception CA";
/// The organisation of a generated CA (shown next to the CN in trust store listings).
const CA_ORGANISATION: &str = "netfence";
/// How long a generated CA is valid: ten years, so that a CA made once with `netfence ca
/// generate` and baked into a guest image does not expire under it.
pub const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// How far back a certificate's `not_before` is set, for guests whose clock runs behind.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// How long a leaf is valid after its issue: three days. Short, since a leaf is made on demand
/// in a second; the cache reissues it a day before it ends (`leaves::REISSUE_MARGIN`).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(3 * 24 * 3600);
use crate::config::check_ca_common_name;
/// The longest common name X.509 allows (RFC 5280 `ub-common-name`).
pub use crate::config::MAX_CA_CN_LEN as MAX_CN_LEN;

/// Why a CA could not be generated, loaded or used.
#[derive(Debug)]
pub enum CaError {
    /// A CA file is unusable; `problem` says how.
    File { path: PathBuf, problem: LoadProblem },
    /// The key file's key is not the certificate's.
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// A generated CA's common name is unusable.
    BadCommonName { cn: String, problem: String },
    /// A leaf could not be made for `name` (not a DNS name, or the signature failed).
    Leaf { name: String, problem: String },
    /// Key generation or signing failed (not expected with the ring provider).
    Crypto(String),
}

/// What is wrong with a CA certificate or key file.
#[derive(Debug)]
pub enum LoadProblem {
    Unreadable(std::io::Error),
    /// No PEM block at all.
    NotPem,
    /// PEM, but no `CERTIFICATE` block.
    NoCertificate,
    /// More than one certificate: which one is the CA would be a guess.
    ManyCertificates(usize),
    /// The certificate does not parse as X.509.
    BadCertificate(String),
    /// PEM, but no private key block (or only an encrypted one).
    NoKey {
        encrypted: bool,
    },
    /// A key in a form the ring-backed signer cannot use (SEC1 `EC PRIVATE KEY`, PKCS#1 `RSA
    /// PRIVATE KEY`): it must be PKCS#8.
    NotPkcs8 {
        form: &'static str,
    },
    /// A PKCS#8 key of an algorithm that cannot sign certificates here.
    UnsupportedKey,
    Expired {
        not_after: String,
    },
    NotYetValid {
        not_before: String,
    },
    /// No `basicConstraints CA:TRUE`.
    NotCa,
    /// A key usage extension without `keyCertSign`.
    NoCertSign,
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadProblem::Unreadable(e) => write!(f, "cannot read the file: {e}"),
            LoadProblem::NotPem => f.write_str(
                "not a PEM file (no `-----BEGIN ...-----` line); expected PEM text as written by \
                 `netfence ca generate` or `openssl`",
            ),
            LoadProblem::NoCertificate => f.write_str(
                "no `-----BEGIN CERTIFICATE-----` block; expected the CA certificate in PEM form",
            ),
            LoadProblem::ManyCertificates(n) => write!(
                f,
                "holds {n} certificates; expected exactly one, the interception CA's"
            ),
            LoadProblem::BadCertificate(e) => write!(f, "not a valid X.509 certificate: {e}"),
            LoadProblem::NoKey { encrypted: true } => f.write_str(
                "the private key is encrypted; netfence needs it in clear PKCS#8 form \
                 (`openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.plain`), readable only by \
                 netfence's user",
            ),
            LoadProblem::NoKey { encrypted: false } => f.write_str(
                "no private key block; expected `-----BEGIN PRIVATE KEY-----` (PKCS#8)",
            ),
            LoadProblem::NotPkcs8 { form } => write!(
                f,
                "the key is in {form} form; netfence reads PKCS#8 (`-----BEGIN PRIVATE KEY-----`): \
                 convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pkcs8`"
            ),
            LoadProblem::UnsupportedKey => f.write_str(
                "not a usable signing key; expected ECDSA P-256 or P-384, Ed25519 or RSA in PKCS#8 form",
            ),
            LoadProblem::Expired { not_after } => write!(
                f,
                "the certificate expired on {not_after}; make a new CA with `netfence ca generate` \
                 and install it in the guest"
            ),
            LoadProblem::NotYetValid { not_before } => write!(
                f,
                "the certificate is not valid before {not_before} (is this host's clock right?)"
            ),
            LoadProblem::NotCa => f.write_str(
                "not a CA certificate (no basicConstraints CA:TRUE), so it cannot sign the \
                 certificates netfence shows the guest; `netfence ca generate` makes one that can",
            ),
            LoadProblem::NoCertSign => f.write_str(
                "its key usage does not include keyCertSign, so it may not sign certificates",
            ),
        }
    }
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaError::File { path, problem } => write!(f, "{}: {problem}", path.display()),
            CaError::KeyMismatch { cert, key } => write!(
                f,
                "{}: this key does not belong to the certificate in {} (their public keys differ); \
                 give the key the certificate was made for",
                key.display(),
                cert.display()
            ),
            CaError::BadCommonName { cn, problem } => {
                write!(f, "CA common name {cn:?}: {problem}")
            }
            CaError::Leaf { name, problem } => {
                write!(f, "cannot issue a certificate for {name:?}: {problem}")
            }
            CaError::Crypto(e) => write!(f, "CA key or signature: {e}"),
        }
    }
}

impl std::error::Error for CaError {}

/// A certificate authority that signs the leaves shown to guests.
pub struct InterceptionCa {
    cert_der: CertificateDer<'static>,
    /// The CA's name, key identifier and signing key (rcgen's signer).
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
    /// Whether the certificate is its own issuer (a root). A loaded intermediate CA is sent
    /// after each leaf, since the guest trusts only the root above it.
    self_issued: bool,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for InterceptionCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterceptionCa")
            .field("subject", &self.subject())
            .field("not_after", &self.not_after)
            .field("self_issued", &self.self_issued)
            .finish_non_exhaustive()
    }
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn crypto(e: impl fmt::Display) -> CaError {
    CaError::Crypto(e.to_string())
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

impl InterceptionCa {
    /// A new CA (ECDSA P-256) named `cn`, valid from an hour ago for [`CA_VALIDITY`].
    pub fn generate(cn: &str) -> Result<InterceptionCa, CaError> {
        Self::generate_at(cn, SystemTime::now())
    }

    /// [`Self::generate`] as of `now`.
    pub fn generate_at(cn: &str, now: SystemTime) -> Result<InterceptionCa, CaError> {
        check_ca_common_name(cn).map_err(|problem| CaError::BadCommonName {
            cn: cn.to_string(),
            problem,
        })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, CA_ORGANISATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let not_before = now.checked_sub(LEAF_BACKDATE).unwrap_or(now);
        let not_after = now + CA_VALIDITY;
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        let cert = params.self_signed(&key).map_err(crypto)?;
        Ok(InterceptionCa {
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            not_after,
            self_issued: true,
            provider: ring_provider(),
        })
    }

    /// Loads a CA from a PEM certificate file and a PEM (PKCS#8) key file, checking that the
    /// key is the certificate's, that the certificate is a CA allowed to sign certificates and
    /// that it is valid now.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<InterceptionCa, CaError> {
        Self::load_at(cert_path, key_path, SystemTime::now())
    }

    /// [`Self::load`] with the validity judged at `now`.
    pub fn load_at(
        cert_path: &Path,
        key_path: &Path,
        now: SystemTime,
    ) -> Result<InterceptionCa, CaError> {
        let cert_err = |problem| CaError::File {
            path: cert_path.to_path_buf(),
            problem,
        };
        let key_err = |problem| CaError::File {
            path: key_path.to_path_buf(),
            problem,
        };
        let cert_text =
            std::fs::read(cert_path).map_err(|e| cert_err(LoadProblem::Unreadable(e)))?;
        let key_text = std::fs::read(key_path).map_err(|e| key_err(LoadProblem::Unreadable(e)))?;

        let cert_der = read_one_certificate(&cert_text).map_err(cert_err)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| cert_err(LoadProblem::BadCertificate(e.to_string())))?;
        let key = read_key(&key_text).map_err(key_err)?;

        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        let is_ca = matches!(x509.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(cert_err(LoadProblem::NotCa));
        }
        if let Ok(Some(usage)) = x509.key_usage() {
            if !usage.value.key_cert_sign() {
                return Err(cert_err(LoadProblem::NoCertSign));
            }
        }
        let now_secs = unix_secs(now);
        let validity = x509.validity();
        if now_secs < validity.not_before.timestamp() {
            return Err(cert_err(LoadProblem::NotYetValid {
                not_before: validity.not_before.to_string(),
            }));
        }
        if now_secs > validity.not_after.timestamp() {
            return Err(cert_err(LoadProblem::Expired {
                not_after: validity.not_after.to_string(),
            }));
        }
        let not_after = from_unix_secs(validity.not_after.timestamp());
        let self_issued = x509.subject().as_raw() == x509.issuer().as_raw();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| cert_err(LoadProblem::BadCertificate(e.to_string())))?;
        Ok(InterceptionCa {
            cert_der: cert_der.clone().into_owned(),
            issuer,
            not_after,
            self_issued,
            provider: ring_provider(),
        })
    }

    /// The CA certificate in PEM form (what a guest installs in its trust store).
    pub fn cert_pem(&self) -> String {
        pem_certificate(&self.cert_der)
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key in PEM (PKCS#8) form, for `netfence ca generate`. Never logged.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The end of the CA's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The CA's subject as text (for log lines).
    pub fn subject(&self) -> String {
        x509_parser::parse_x509_certificate(&self.cert_der)
            .map(|(_, c)| c.subject().to_string())
            .unwrap_or_default()
    }

    /// Issues the leaf for `name` as of `now` (see the module comment). `name` must be a DNS
    /// name (as the ClientHello's SNI is); it is lower-cased.
    pub fn issue_leaf(&self, name: &str, now: SystemTime) -> Result<Leaf, CaError> {
        let leaf_err = |problem: String| CaError::Leaf {
            name: name.to_string(),
            problem,
        };
        let name = name.to_ascii_lowercase();
        DnsName::try_from(name.as_str()).map_err(|_| leaf_err("not a DNS name".to_string()))?;
        if name.contains('*') {
            return Err(leaf_err("a wildcard is not a server name".into()));
        }
        let san = name
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| leaf_err(e.to_string()))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if name.len() <= MAX_CN_LEN {
            dn.push(DnType::CommonName, name.as_str());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(san)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let not_before = now.checked_sub(LEAF_BACKDATE).unwrap_or(now);
        let not_after = (now + LEAF_VALIDITY).min(self.not_after);
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| leaf_err(e.to_string()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(key_der)
            .map_err(crypto)?;
        let mut chain = vec![cert.der().clone()];
        if !self.self_issued {
            chain.push(self.cert_der.clone());
        }
        Ok(Leaf {
            certified: Arc::new(CertifiedKey::new(chain, signing_key)),
            not_before,
            not_after,
        })
    }
}

/// A leaf issued by [`InterceptionCa::issue_leaf`].
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The chain (leaf, then the CA if it is not a root) and the leaf's signing key.
    pub certified: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// One certificate as PEM text.
pub fn pem_certificate(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()))
}

fn has_pem_block(text: &[u8]) -> bool {
    text.windows(11).any(|w| w == b"-----BEGIN ")
}

/// The single certificate of a PEM file.
fn read_one_certificate(text: &[u8]) -> Result<CertificateDer<'static>, LoadProblem> {
    if !has_pem_block(text) {
        return Err(LoadProblem::NotPem);
    }
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(text) {
        certs.push(item.map_err(|e| LoadProblem::BadCertificate(format!("bad PEM: {e}")))?);
    }
    match certs.len() {
        0 => Err(LoadProblem::NoCertificate),
        1 => Ok(certs.remove(0)),
        n => Err(LoadProblem::ManyCertificates(n)),
    }
}

/// The private key of a PEM file, as rcgen's signer.
fn read_key(text: &[u8]) -> Result<KeyPair, LoadProblem> {
    if !has_pem_block(text) {
        return Err(LoadProblem::NotPem);
    }
    let key = match PrivateKeyDer::from_pem_slice(text) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            let encrypted = text.windows(9).any(|w| w == b"ENCRYPTED");
            return Err(LoadProblem::NoKey { encrypted });
        }
        Err(e) => return Err(LoadProblem::BadCertificate(format!("bad PEM: {e}"))),
    };
    match &key {
        PrivateKeyDer::Pkcs8(_) => {}
        PrivateKeyDer::Sec1(_) => {
            return Err(LoadProblem::NotPkcs8 {
                form: "SEC1 (`EC PRIVATE KEY`)",
            })
        }
        PrivateKeyDer::Pkcs1(_) => {
            return Err(LoadProblem::NotPkcs8 {
                form: "PKCS#1 (`RSA PRIVATE KEY`)",
            })
        }
        _ => return Err(LoadProblem::UnsupportedKey),
    }
    KeyPair::try_from(&key).map_err(|_| LoadProblem::UnsupportedKey)
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn from_unix_secs(s: i64) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::from_secs(s.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::RootCertStore;
    use x509_parser::extensions::GeneralName;

    use super::*;

    /// A scratch directory removed on drop.
    pub(crate) struct Scratch(PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Scratch {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "nf-tls-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }

        pub(crate) fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, content).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA generated now, written to `ca.pem` / `ca.key` in `dir`.
    pub(crate) fn written_ca(dir: &Scratch) -> (InterceptionCa, PathBuf, PathBuf) {
        let ca = InterceptionCa::generate("test CA").unwrap();
        let cert = dir.write("ca.pem", ca.cert_pem());
        let key = dir.write("ca.key", ca.key_pem());
        (ca, cert, key)
    }

    fn hours(h: u64) -> Duration {
        Duration::from_secs(h * 3600)
    }

    /// A certificate made with rcgen directly (for the cases `generate` never makes).
    fn custom_cert(
        is_ca: IsCa,
        usages: Vec<KeyUsagePurpose>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = is_ca;
        p.key_usages = usages;
        p.not_before = to_offset(not_before);
        p.not_after = to_offset(not_after);
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn load_problem(r: Result<InterceptionCa, CaError>) -> (PathBuf, LoadProblem, String) {
        match r {
            Err(e @ CaError::File { .. }) => {
                let msg = e.to_string();
                let CaError::File { path, problem } = e else {
                    unreachable!()
                };
                (path, problem, msg)
            }
            Err(e) => panic!("expected a file problem, got {e}"),
            Ok(ca) => panic!("loaded {ca:?}"),
        }
    }

    #[test]
    fn generated_ca_is_a_p256_ca_that_may_sign_certificates() {
        let now = SystemTime::now();
        let ca = InterceptionCa::generate_at(DEFAULT_CA_CN, now).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let bc = x.basic_constraints().unwrap().expect("basicConstraints");
        assert!(bc.critical && bc.value.ca, "{bc:?}");
        assert_eq!(bc.value.path_len_constraint, Some(0));
        assert!(x.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(
            x.public_key()
                .algorithm
                .parameters
                .as_ref()
                .map(|p| p.as_oid().unwrap().to_id_string()),
            Some("1.2.840.10045.3.1.7".to_string()),
            "P-256"
        );
        let cn = x.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), DEFAULT_CA_CN);
        let v = x.validity();
        assert_eq!(v.not_before.timestamp(), unix_secs(now - hours(1)));
        assert_eq!(v.not_after.timestamp(), unix_secs(now + CA_VALIDITY));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn bad_common_names_are_refused() {
        for cn in ["", "  ", "a\nb", &"x".repeat(65)] {
            let e = InterceptionCa::generate(cn).unwrap_err();
            assert!(matches!(e, CaError::BadCommonName { .. }), "{cn:?}: {e}");
        }
        InterceptionCa::generate(&"x".repeat(64)).unwrap();
    }

    #[test]
    fn a_generated_ca_loads_back_and_keeps_its_identity() {
        let dir = Scratch::new("load");
        let (ca, cert, key) = written_ca(&dir);
        let loaded = InterceptionCa::load(&cert, &key).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert!(loaded.self_issued);
        // A leaf of the loaded CA chains to the original certificate.
        let now = SystemTime::now();
        let leaf = loaded.issue_leaf("api.example.com", now).unwrap();
        verify_chain(&ca, &leaf, "api.example.com", now).unwrap();
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = Scratch::new("unreadable");
        let (_, cert, key) = written_ca(&dir);
        let missing = dir.0.join("nope.pem");
        let (path, problem, msg) = load_problem(InterceptionCa::load(&missing, &key));
        assert_eq!(path, missing);
        assert!(matches!(problem, LoadProblem::Unreadable(_)), "{msg}");
        assert!(
            msg.contains("nope.pem") && msg.contains("cannot read"),
            "{msg}"
        );
        let (path, problem, _) = load_problem(InterceptionCa::load(&cert, &missing));
        assert_eq!(path, missing);
        assert!(matches!(problem, LoadProblem::Unreadable(_)));
    }

    #[test]
    fn files_that_are_not_pem_are_named() {
        let dir = Scratch::new("notpem");
        let (ca, cert, key) = written_ca(&dir);
        let der = dir.write("ca.der", ca.cert_der().as_ref());
        let (path, problem, msg) = load_problem(InterceptionCa::load(&der, &key));
        assert_eq!(path, der);
        assert!(matches!(problem, LoadProblem::NotPem), "{msg}");
        assert!(
            msg.contains("ca.der") && msg.contains("not a PEM file"),
            "{msg}"
        );
        let junk = dir.write("junk.key", "hello");
        let (path, problem, _) = load_problem(InterceptionCa::load(&cert, &junk));
        assert_eq!(path, junk);
        assert!(matches!(problem, LoadProblem::NotPem));
        // The two files swapped: PEM, but the wrong blocks.
        let (path, problem, msg) = load_problem(InterceptionCa::load(&key, &cert));
        assert_eq!(path, key);
        assert!(matches!(problem, LoadProblem::NoCertificate), "{msg}");
        let (path, problem, msg) = load_problem(InterceptionCa::load(&cert, &cert));
        assert_eq!(path, cert);
        assert!(
            matches!(problem, LoadProblem::NoKey { encrypted: false }),
            "{msg}"
        );
        // Two certificates: which is the CA would be a guess.
        let two = dir.write("two.pem", format!("{}{}", ca.cert_pem(), ca.cert_pem()));
        let (_, problem, msg) = load_problem(InterceptionCa::load(&two, &key));
        assert!(matches!(problem, LoadProblem::ManyCertificates(2)), "{msg}");
        // A PEM block whose body is not a certificate.
        let bad = dir.write(
            "bad.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        let (_, problem, msg) = load_problem(InterceptionCa::load(&bad, &key));
        assert!(matches!(problem, LoadProblem::BadCertificate(_)), "{msg}");
    }

    #[test]
    fn keys_in_other_forms_are_explained() {
        let dir = Scratch::new("keyforms");
        let (_, cert, _) = written_ca(&dir);
        let sec1 = dir.write(
            "sec1.key",
            pem::encode(&pem::Pem::new("EC PRIVATE KEY", vec![0x30, 0x00])),
        );
        let (_, problem, msg) = load_problem(InterceptionCa::load(&cert, &sec1));
        assert!(matches!(problem, LoadProblem::NotPkcs8 { .. }), "{msg}");
        assert!(msg.contains("openssl pkcs8"), "{msg}");
        let enc = dir.write(
            "enc.key",
            pem::encode(&pem::Pem::new("ENCRYPTED PRIVATE KEY", vec![0x30, 0x00])),
        );
        let (_, problem, msg) = load_problem(InterceptionCa::load(&cert, &enc));
        assert!(
            matches!(problem, LoadProblem::NoKey { encrypted: true }),
            "{msg}"
        );
        let junk = dir.write(
            "junk.key",
            pem::encode(&pem::Pem::new("PRIVATE KEY", vec![0x30, 0x03, 1, 2, 3])),
        );
        let (_, problem, msg) = load_problem(InterceptionCa::load(&cert, &junk));
        assert!(matches!(problem, LoadProblem::UnsupportedKey), "{msg}");
    }

    #[test]
    fn a_key_of_another_ca_is_a_mismatch() {
        let dir = Scratch::new("mismatch");
        let (_, cert, _) = written_ca(&dir);
        let other = InterceptionCa::generate("other").unwrap();
        let other_key = dir.write("other.key", other.key_pem());
        let e = InterceptionCa::load(&cert, &other_key).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CaError::KeyMismatch { .. }), "{msg}");
        assert!(
            msg.contains("other.key") && msg.contains("ca.pem") && msg.contains("does not belong"),
            "{msg}"
        );
    }

    #[test]
    fn expired_and_future_certificates_are_refused() {
        let dir = Scratch::new("validity");
        let now = SystemTime::now();
        let ca_usage = vec![KeyUsagePurpose::KeyCertSign];
        let is_ca = || IsCa::Ca(BasicConstraints::Unconstrained);
        let (c, k) = custom_cert(is_ca(), ca_usage.clone(), now - hours(48), now - hours(24));
        let (cert, key) = (dir.write("old.pem", c), dir.write("old.key", k));
        let (path, problem, msg) = load_problem(InterceptionCa::load(&cert, &key));
        assert_eq!(path, cert);
        assert!(matches!(problem, LoadProblem::Expired { .. }), "{msg}");
        assert!(msg.contains("expired on"), "{msg}");

        let (c, k) = custom_cert(is_ca(), ca_usage, now + hours(24), now + hours(48));
        let (cert, key) = (dir.write("new.pem", c), dir.write("new.key", k));
        let (_, problem, msg) = load_problem(InterceptionCa::load(&cert, &key));
        assert!(matches!(problem, LoadProblem::NotYetValid { .. }), "{msg}");
        // The same pair loads once its time has come.
        InterceptionCa::load_at(&cert, &key, now + hours(25)).unwrap();
    }

    #[test]
    fn certificates_that_are_not_cas_are_refused() {
        let dir = Scratch::new("notca");
        let now = SystemTime::now();
        for (name, is_ca, usages) in [
            ("none", IsCa::NoCa, vec![]),
            ("explicit", IsCa::ExplicitNoCa, vec![]),
        ] {
            let (c, k) = custom_cert(is_ca, usages, now - hours(1), now + hours(1));
            let cert = dir.write(&format!("{name}.pem"), c);
            let key = dir.write(&format!("{name}.key"), k);
            let (path, problem, msg) = load_problem(InterceptionCa::load(&cert, &key));
            assert_eq!(path, cert);
            assert!(matches!(problem, LoadProblem::NotCa), "{name}: {msg}");
            assert!(msg.contains("not a CA certificate"), "{msg}");
        }
        let (c, k) = custom_cert(
            IsCa::Ca(BasicConstraints::Unconstrained),
            vec![KeyUsagePurpose::DigitalSignature],
            now - hours(1),
            now + hours(1),
        );
        let (cert, key) = (dir.write("nosign.pem", c), dir.write("nosign.key", k));
        let (_, problem, msg) = load_problem(InterceptionCa::load(&cert, &key));
        assert!(matches!(problem, LoadProblem::NoCertSign), "{msg}");
    }

    /// Verifies `leaf` for `name` at `now` with rustls's WebPKI verifier and a root store that
    /// holds only `ca`.
    pub(crate) fn verify_chain(
        ca: &InterceptionCa,
        leaf: &Leaf,
        name: &str,
        now: SystemTime,
    ) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ring_provider())
                .build()
                .unwrap();
        let chain = &leaf.certified.cert;
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap()),
            )
            .map(|_| ())
    }

    #[test]
    fn a_leaf_carries_only_its_name_is_backdated_and_chains_to_the_ca() {
        let ca = InterceptionCa::generate(DEFAULT_CA_CN).unwrap();
        let now = SystemTime::now();
        let leaf = ca.issue_leaf("API.Example.com", now).unwrap();
        assert_eq!(leaf.certified.cert.len(), 1, "a root CA is not sent");
        let (_, x) = x509_parser::parse_x509_certificate(&leaf.certified.cert[0]).unwrap();
        let san = x.subject_alternative_name().unwrap().expect("SAN");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::DNSName("api.example.com")]
        );
        assert_eq!(x.validity().not_before.timestamp(), unix_secs(now) - 3600);
        assert_eq!(
            x.validity().not_after.timestamp(),
            unix_secs(now + LEAF_VALIDITY)
        );
        assert!(!x.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(
            x.issuer().as_raw(),
            x509_parser::parse_x509_certificate(ca.cert_der())
                .unwrap()
                .1
                .subject()
                .as_raw()
        );
        // The key in the CertifiedKey is the leaf's.
        leaf.certified.keys_match().unwrap();
        // Valid for its name, at once and until its end; not for another name, nor under
        // another CA.
        verify_chain(&ca, &leaf, "api.example.com", now).unwrap();
        // A guest whose clock is half an hour behind still accepts it (the backdating).
        verify_chain(
            &ca,
            &leaf,
            "api.example.com",
            now - Duration::from_secs(1800),
        )
        .unwrap();
        assert!(verify_chain(&ca, &leaf, "other.example.com", now).is_err());
        assert!(verify_chain(
            &ca,
            &leaf,
            "api.example.com",
            now + LEAF_VALIDITY + hours(1)
        )
        .is_err());
        let other = InterceptionCa::generate("other").unwrap();
        assert!(verify_chain(&other, &leaf, "api.example.com", now).is_err());
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let now = SystemTime::now();
        let ca = InterceptionCa::generate_at("short", now - CA_VALIDITY + hours(5)).unwrap();
        let leaf = ca.issue_leaf("a.example", now).unwrap();
        assert_eq!(unix_secs(leaf.not_after), unix_secs(ca.not_after()));
        assert!(leaf.not_after < now + LEAF_VALIDITY);
    }

    #[test]
    fn leaves_are_refused_for_names_that_are_not_dns_names() {
        let ca = InterceptionCa::generate("t").unwrap();
        for bad in [
            "",
            "a b.example",
            "*.example.com",
            "exa mple",
            "a..b",
            "x\0y",
        ] {
            let e = ca.issue_leaf(bad, SystemTime::now()).unwrap_err();
            assert!(matches!(e, CaError::Leaf { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn an_intermediate_ca_is_sent_after_the_leaf() {
        let dir = Scratch::new("intermediate");
        let root = InterceptionCa::generate("root").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "intermediate");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        p.not_before = to_offset(now - hours(1));
        p.not_after = to_offset(now + hours(24 * 30));
        let cert = p.signed_by(&key, &root.issuer).unwrap();
        let cert_path = dir.write("int.pem", cert.pem());
        let key_path = dir.write("int.key", key.serialize_pem());
        let int = InterceptionCa::load(&cert_path, &key_path).unwrap();
        assert!(!int.self_issued);
        let leaf = int.issue_leaf("svc.example", now).unwrap();
        assert_eq!(leaf.certified.cert.len(), 2);
        // The guest trusts only the root; the chain still verifies.
        verify_chain(&root, &leaf, "svc.example", now).unwrap();
    }
}
