//! TLS settings of a netfence process: the `[tls]` table (and `trust_host_cas`) turned into what
//! interception needs, checked once at start so that a bad setting stops `run` (exit 2) instead
//! of failing each guest handshake.
//!
//! Theory of operation: [`TlsSettings::from_config`] always yields the intercepted ports (the
//! ports whose ClientHello is read; default [443]). With interception enabled it also builds an
//! [`Interception`]: the CA (loaded from `ca_cert` + `ca_key`, else generated with `ca_cn`), the
//! `bypass` names, the upstream verifier (the host's trust store, read once with
//! `rustls-native-certs`, plus the `upstream_ca_certs` files; or, with `verify_upstream =
//! false`, [`AnyCertificate`], which checks the upstream's handshake signature but not its chain),
//! `block_quic` and `allow_no_sni`. An [`Interception`] then hands out the rustls configurations
//! of both sides: [`Interception::server_config`] (the guest side, one leaf from a
//! [`LeafCache`] and at most one ALPN protocol) and [`Interception::upstream_config`] (the host
//! side, cached per ALPN list). Both are clones of one template, so all of them share one
//! session cache per side (resumption works across connections and the caches stay bounded).
//!
//! Why `rustls-native-certs` and not `rustls-platform-verifier`: netfence needs the host's root
//! certificates themselves, to put them into one root store with `upstream_ca_certs`, to read
//! them once at start (a verifier that reads the trust store per connection makes a guest's
//! handshake depend on the host's files at that moment), and to ship them to the guest for
//! `trust_host_cas`. On Linux the platform verifier reads the same files anyway.
//!
//! `trust_host_cas` (the reference: "ship the host's extra CA bundles into the guest", opt-in,
//! for corporate TLS proxies the guest's stock bundle does not know): netfence has no agent in
//! the guest, so what it ships is the file `run --ca-out` writes, which the launcher installs
//! in the guest. With `trust_host_cas = true` that file holds the interception CA followed by
//! every root of the host's trust store ([`Interception::guest_trust_pem`]), so the guest also
//! trusts what the host trusts on connections netfence does not intercept (bypassed names,
//! other ports). Intercepted connections need nothing more: netfence verifies their upstreams
//! against the host's store in any case.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tracing::{info, warn};

use super::ca::{pem_certificate, InterceptionCa, DEFAULT_CA_CN};
use super::leaves::LeafCache;
use crate::config::{parse_domain, TlsConfig};
use crate::dns::names::DomainSet;
use crate::limits::Limits;

/// The ports intercepted when `tls.intercepted_ports` is not set.
pub const DEFAULT_INTERCEPTED_PORTS: [u16; 1] = [443];
/// Distinct ALPN lists whose upstream configuration is kept (the guest chooses the lists, so
/// the cache is bounded; a list beyond it gets a configuration built for the call).
pub const MAX_CACHED_ALPN_LISTS: usize = 16;

/// What the TLS side of the flows needs: the ports whose ClientHello is read, and the
/// interception, if enabled.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// TCP ports whose first flight is read for the SNI and, with interception, intercepted.
    pub intercepted_ports: Vec<u16>,
    /// `None` when `[tls]` is absent or `enabled = false`.
    pub interception: Option<Arc<Interception>>,
}

impl Default for TlsSettings {
    /// No interception; the default ports.
    fn default() -> Self {
        TlsSettings {
            intercepted_ports: DEFAULT_INTERCEPTED_PORTS.to_vec(),
            interception: None,
        }
    }
}

impl TlsSettings {
    /// Builds the settings from the `tls` table and the top-level `trust_host_cas`, reading the
    /// CA files, the `upstream_ca_certs` files and the host's trust store now. Errors name the
    /// field and the value (the caller exits 2).
    pub fn from_config(
        cfg: &TlsConfig,
        trust_host_cas: Option<bool>,
    ) -> Result<TlsSettings, String> {
        Self::build(cfg, trust_host_cas, load_host_roots)
    }

    /// [`Self::from_config`] with the host's trust store read by `host_roots` (tests).
    pub(crate) fn build(
        cfg: &TlsConfig,
        trust_host_cas: Option<bool>,
        host_roots: impl FnOnce() -> Vec<CertificateDer<'static>>,
    ) -> Result<TlsSettings, String> {
        let intercepted_ports = cfg
            .intercepted_ports
            .clone()
            .unwrap_or_else(|| DEFAULT_INTERCEPTED_PORTS.to_vec());
        if let Some(i) = intercepted_ports.iter().position(|p| *p == 0) {
            return Err(format!(
                "tls.intercepted_ports[{i}] = 0: port 0 is not allowed; expected 1-65535"
            ));
        }
        let ship_host_cas = trust_host_cas.unwrap_or(false);
        if !cfg.is_enabled() {
            if ship_host_cas {
                return Err(
                    "trust_host_cas = true: netfence ships the host's CAs to the guest \
                            in the file `run --ca-out` writes, which needs TLS interception; \
                            add a [tls] table (or remove trust_host_cas)"
                        .into(),
                );
            }
            let inert = cfg.interception_only_keys();
            if !inert.is_empty() {
                warn!(
                    keys = %inert.join(", "),
                    "tls.enabled = false: these [tls] keys take effect only with interception on"
                );
            }
            return Ok(TlsSettings {
                intercepted_ports,
                interception: None,
            });
        }
        let ca = Arc::new(ca_from_config(cfg)?);
        let bypass = bypass_from_config(&cfg.bypass)?;
        let verify_upstream = cfg.verify_upstream.unwrap_or(true);
        let mut extra_roots = Vec::new();
        for (i, path) in cfg.upstream_ca_certs.iter().enumerate() {
            let certs = read_certificates(path)
                .map_err(|e| format!("tls.upstream_ca_certs[{i}] = {:?}: {e}", path.display()))?;
            extra_roots.push((i, certs));
        }
        let host = if verify_upstream || ship_host_cas {
            host_roots()
        } else {
            Vec::new()
        };
        if host.is_empty() && verify_upstream {
            warn!(
                "the host's trust store has no certificates (install ca-certificates, or set \
                 SSL_CERT_FILE / SSL_CERT_DIR); upstream certificates are verified against \
                 tls.upstream_ca_certs only"
            );
        }
        if ship_host_cas && host.is_empty() {
            return Err(
                "trust_host_cas = true, but the host's trust store has no certificates \
                        to ship to the guest (install ca-certificates, or set SSL_CERT_FILE)"
                    .into(),
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = if verify_upstream {
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(host.iter().cloned());
            if ignored > 0 {
                warn!(
                    added,
                    ignored, "some certificates of the host's trust store cannot be used as roots"
                );
            }
            for (i, certs) in &extra_roots {
                for (j, cert) in certs.iter().enumerate() {
                    roots.add(cert.clone()).map_err(|e| {
                        format!(
                            "tls.upstream_ca_certs[{i}] = {:?}: certificate {} cannot be a \
                             trust anchor: {e}",
                            cfg.upstream_ca_certs[*i].display(),
                            j + 1
                        )
                    })?;
                }
            }
            if roots.is_empty() {
                return Err(
                    "tls.verify_upstream = true, but there is nothing to verify upstream \
                            certificates against: the host's trust store is empty and \
                            tls.upstream_ca_certs is not set; add tls.upstream_ca_certs, or set \
                            tls.verify_upstream = false to accept any upstream certificate"
                        .into(),
                );
            }
            info!(
                roots = roots.len(),
                "upstream certificates are verified against the host's trust store and \
                 tls.upstream_ca_certs"
            );
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("tls.upstream_ca_certs: {e}"))?
        } else {
            if !cfg.upstream_ca_certs.is_empty() {
                warn!(
                    "tls.verify_upstream = false accepts any upstream certificate, so \
                     tls.upstream_ca_certs is not used"
                );
            }
            warn!("tls.verify_upstream = false: any upstream certificate is accepted");
            Arc::new(AnyCertificate::new(&provider))
        };
        let interception = Interception::new(InterceptionParts {
            ca,
            bypass,
            verify_upstream,
            block_quic: cfg.block_quic.unwrap_or(true),
            allow_no_sni: cfg.allow_no_sni.unwrap_or(false),
            verifier,
            shipped_host_roots: if ship_host_cas { host } else { Vec::new() },
            provider,
        })?;
        Ok(TlsSettings {
            intercepted_ports,
            interception: Some(Arc::new(interception)),
        })
    }

    /// The interception, if enabled.
    pub fn interception(&self) -> Option<&Arc<Interception>> {
        self.interception.as_ref()
    }
}

/// The CA of an enabled `[tls]`: loaded from `ca_cert` + `ca_key`, else generated.
fn ca_from_config(cfg: &TlsConfig) -> Result<InterceptionCa, String> {
    match (&cfg.ca_cert, &cfg.ca_key) {
        (Some(cert), Some(key)) => {
            if let Some(cn) = &cfg.ca_cn {
                return Err(format!(
                    "tls.ca_cn = {cn:?}: names a generated CA, but tls.ca_cert loads one (whose \
                     name is in its certificate); remove tls.ca_cn"
                ));
            }
            let ca = InterceptionCa::load(cert, key)
                .map_err(|e| format!("tls.ca_cert / tls.ca_key: {e}"))?;
            info!(subject = %ca.subject(), cert = %cert.display(), "interception CA loaded");
            Ok(ca)
        }
        (None, None) => {
            let cn = cfg.ca_cn.as_deref().unwrap_or(DEFAULT_CA_CN);
            let ca = InterceptionCa::generate(cn).map_err(|e| match e {
                super::ca::CaError::BadCommonName { cn, problem } => {
                    format!("tls.ca_cn = {cn:?}: {problem}")
                }
                other => format!("tls: cannot generate the interception CA: {other}"),
            })?;
            info!(subject = %ca.subject(), "interception CA generated for this run (write it out with --ca-out)");
            Ok(ca)
        }
        (Some(_), None) => Err(
            "tls.ca_key: tls.ca_cert is set, so tls.ca_key must be set too \
                                (a CA needs its certificate and its key)"
                .into(),
        ),
        (None, Some(_)) => Err(
            "tls.ca_cert: tls.ca_key is set, so tls.ca_cert must be set too \
                                (a CA needs its certificate and its key)"
                .into(),
        ),
    }
}

/// `tls.bypass`: exact names, and `*.suffix` (or `.suffix`) patterns that cover the suffix
/// itself and every name below it, as the policy's domain suffixes do.
fn bypass_from_config(entries: &[String]) -> Result<DomainSet, String> {
    let mut set = DomainSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let suffix = entry.strip_prefix("*.").or_else(|| entry.strip_prefix('.'));
        let name = suffix.unwrap_or(entry);
        let name = parse_domain(name).map_err(|e| {
            format!("tls.bypass[{i}] = {entry:?}: {e}; expected a domain or *.suffix pattern")
        })?;
        match suffix {
            Some(_) => set.add_suffix(&name),
            None => set.add_exact(&name),
        }
    }
    Ok(set)
}

/// Every certificate of a PEM file (at least one).
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&text) {
        certs.push(item.map_err(|e| format!("bad PEM: {e}"))?);
    }
    if certs.is_empty() {
        return Err(
            "no `-----BEGIN CERTIFICATE-----` block; expected CA certificates in PEM form".into(),
        );
    }
    Ok(certs)
}

/// The host's trust store (rustls-native-certs: SSL_CERT_FILE / SSL_CERT_DIR, else the
/// system's bundle). Files it could not read are warned about.
fn load_host_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        warn!(error = %e, "cannot read part of the host's trust store");
    }
    found.certs
}

/// What [`Interception::new`] is made of.
struct InterceptionParts {
    ca: Arc<InterceptionCa>,
    bypass: DomainSet,
    verify_upstream: bool,
    block_quic: bool,
    allow_no_sni: bool,
    verifier: Arc<dyn ServerCertVerifier>,
    shipped_host_roots: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

/// TLS interception as configured: the CA, which names pass through, how upstreams are
/// verified, and the rustls configurations of both sides. Shared by every link (`Arc`); the
/// only lock is the one around the per-ALPN cache of upstream configurations, taken once per
/// intercepted connection.
pub struct Interception {
    ca: Arc<InterceptionCa>,
    bypass: DomainSet,
    /// Whether upstream certificates are verified (`tls.verify_upstream`, default true).
    pub verify_upstream: bool,
    /// Whether UDP to the intercepted ports is dropped (`tls.block_quic`, default true).
    pub block_quic: bool,
    /// Whether a connection without SNI (or not TLS) on an intercepted port is relayed
    /// unintercepted where the policy allows its address (`tls.allow_no_sni`, default false).
    pub allow_no_sni: bool,
    shipped_host_roots: Vec<CertificateDer<'static>>,
    server_template: ServerConfig,
    client_template: ClientConfig,
    client_configs: Mutex<HashMap<Vec<Vec<u8>>, Arc<ClientConfig>>>,
}

impl fmt::Debug for Interception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interception")
            .field("ca", &self.ca)
            .field("bypass", &self.bypass)
            .field("verify_upstream", &self.verify_upstream)
            .field("block_quic", &self.block_quic)
            .field("allow_no_sni", &self.allow_no_sni)
            .field("shipped_host_roots", &self.shipped_host_roots.len())
            .finish_non_exhaustive()
    }
}

/// The template's certificate resolver: never used (each connection's config gets its leaf).
#[derive(Debug)]
struct NoCertificate;

impl ResolvesServerCert for NoCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

impl Interception {
    fn new(parts: InterceptionParts) -> Result<Interception, String> {
        let server_template = ServerConfig::builder_with_provider(parts.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: the guest-side TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCertificate));
        let client_template = ClientConfig::builder_with_provider(parts.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: the upstream TLS configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(parts.verifier)
            .with_no_client_auth();
        Ok(Interception {
            ca: parts.ca,
            bypass: parts.bypass,
            verify_upstream: parts.verify_upstream,
            block_quic: parts.block_quic,
            allow_no_sni: parts.allow_no_sni,
            shipped_host_roots: parts.shipped_host_roots,
            server_template,
            client_template,
            client_configs: Mutex::new(HashMap::new()),
        })
    }

    /// The interception CA.
    pub fn ca(&self) -> &Arc<InterceptionCa> {
        &self.ca
    }

    /// A link's leaf cache, bounded by `tls-leaf-cache`.
    pub fn leaf_cache(&self, limits: &Limits) -> LeafCache {
        LeafCache::new(self.ca.clone(), limits.tls_leaf_cache)
    }

    /// The `tls.bypass` entry that covers `name` (`"example.com"` exact, `".example.com"` a
    /// suffix), if any: such a connection is passed through untouched.
    pub fn bypass_entry(&self, name: &str) -> Option<String> {
        self.bypass.matching_entry(name)
    }

    /// Whether `name` (any case) is passed through untouched.
    pub fn is_bypassed(&self, name: &str) -> bool {
        self.bypass.contains(name)
    }

    /// The PEM text `run --ca-out` writes: the CA certificate, followed with `trust_host_cas =
    /// true` by every certificate of the host's trust store.
    pub fn guest_trust_pem(&self) -> String {
        let mut out = self.ca.cert_pem();
        for cert in &self.shipped_host_roots {
            out.push_str(&pem_certificate(cert));
        }
        out
    }

    /// The upstream (client) configuration offering `alpn` (in order; empty: no ALPN), with
    /// the configured verifier. Cached per list, up to [`MAX_CACHED_ALPN_LISTS`] lists.
    pub fn upstream_config(&self, alpn: &[Vec<u8>]) -> Arc<ClientConfig> {
        let mut cache = match self.client_configs.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(cfg) = cache.get(alpn) {
            return cfg.clone();
        }
        let mut cfg = self.client_template.clone();
        cfg.alpn_protocols = alpn.to_vec();
        let cfg = Arc::new(cfg);
        if cache.len() < MAX_CACHED_ALPN_LISTS {
            cache.insert(alpn.to_vec(), cfg.clone());
        }
        cfg
    }

    /// The guest-side (server) configuration showing `key` and selecting `alpn` (the protocol
    /// the upstream accepted; `None`: no ALPN).
    pub fn server_config(
        &self,
        key: Arc<CertifiedKey>,
        alpn: Option<Vec<u8>>,
    ) -> Arc<ServerConfig> {
        let mut cfg = self.server_template.clone();
        cfg.cert_resolver = Arc::new(SingleCertAndKey::from(key));
        cfg.alpn_protocols = alpn.into_iter().collect();
        Arc::new(cfg)
    }
}

/// The verifier of `verify_upstream = false`: any certificate chain is accepted, but the
/// handshake signature must be made with the key of the certificate the upstream sent, so the
/// peer at least holds that key (a relay that cannot sign is still refused).
#[derive(Debug)]
pub struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnyCertificate {
    pub fn new(provider: &CryptoProvider) -> AnyCertificate {
        AnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::SystemTime;

    use rustls::{ClientConnection, ServerConnection};

    use super::super::ca::tests::{written_ca, Scratch};
    use super::*;

    fn enabled() -> TlsConfig {
        TlsConfig {
            enabled: Some(true),
            ..TlsConfig::default()
        }
    }

    fn no_host_roots() -> Vec<CertificateDer<'static>> {
        Vec::new()
    }

    /// Settings with `verify_upstream = false` (no trust store needed).
    fn unverified(mut cfg: TlsConfig) -> Result<TlsSettings, String> {
        cfg.verify_upstream = Some(false);
        TlsSettings::build(&cfg, None, no_host_roots)
    }

    fn err(r: Result<TlsSettings, String>) -> String {
        match r {
            Err(e) => e,
            Ok(s) => panic!("accepted: {s:?}"),
        }
    }

    #[test]
    fn disabled_tls_keeps_only_the_ports() {
        let s = TlsSettings::from_config(&TlsConfig::default(), None).unwrap();
        assert_eq!(s.intercepted_ports, vec![443]);
        assert!(s.interception.is_none());
        let cfg = TlsConfig {
            enabled: Some(false),
            intercepted_ports: Some(vec![443, 8443]),
            ..TlsConfig::default()
        };
        let s = TlsSettings::from_config(&cfg, Some(false)).unwrap();
        assert_eq!(s.intercepted_ports, vec![443, 8443]);
        assert!(s.interception().is_none());
    }

    #[test]
    fn defaults_of_an_enabled_table() {
        let s = unverified(enabled()).unwrap();
        assert_eq!(s.intercepted_ports, vec![443]);
        let i = s.interception().expect("enabled");
        assert!(i.block_quic, "block_quic defaults to true");
        assert!(!i.allow_no_sni, "allow_no_sni defaults to false");
        assert!(!i.verify_upstream);
        assert!(
            i.ca().subject().contains(DEFAULT_CA_CN),
            "{}",
            i.ca().subject()
        );
        assert_eq!(i.guest_trust_pem(), i.ca().cert_pem());
        let cfg = TlsConfig {
            block_quic: Some(false),
            allow_no_sni: Some(true),
            ca_cn: Some("Acme sandbox CA".into()),
            ..enabled()
        };
        let i = unverified(cfg).unwrap().interception.unwrap();
        assert!(!i.block_quic && i.allow_no_sni);
        assert!(i.ca().subject().contains("Acme sandbox CA"));
    }

    #[test]
    fn bypass_matches_exact_names_and_suffixes_in_any_case() {
        let cfg = TlsConfig {
            bypass: vec![
                "Pinned.Example.com".into(),
                "*.bank.example".into(),
                ".corp.example".into(),
            ],
            ..enabled()
        };
        let i = unverified(cfg).unwrap().interception.unwrap();
        for yes in [
            "pinned.example.com",
            "PINNED.example.COM.",
            "bank.example",
            "www.bank.example",
            "a.b.BANK.example",
            "git.corp.example",
        ] {
            assert!(i.is_bypassed(yes), "{yes}");
        }
        for no in [
            "www.pinned.example.com",
            "example.com",
            "notbank.example",
            "bank.example.org",
            "corp.example.net",
        ] {
            assert!(!i.is_bypassed(no), "{no}");
        }
        assert_eq!(
            i.bypass_entry("x.bank.example").as_deref(),
            Some(".bank.example")
        );
        assert_eq!(
            i.bypass_entry("pinned.example.com").as_deref(),
            Some("pinned.example.com")
        );
    }

    #[test]
    fn errors_name_the_field_and_the_value() {
        let e = err(unverified(TlsConfig {
            bypass: vec!["ok.example".into(), "*.".into()],
            ..enabled()
        }));
        assert!(e.starts_with("tls.bypass[1] = \"*.\""), "{e}");
        let e = err(unverified(TlsConfig {
            intercepted_ports: Some(vec![443, 0]),
            ..enabled()
        }));
        assert!(e.starts_with("tls.intercepted_ports[1] = 0"), "{e}");
        let e = err(unverified(TlsConfig {
            ca_cert: Some("/x.pem".into()),
            ..enabled()
        }));
        assert!(
            e.starts_with("tls.ca_key") && e.contains("tls.ca_cert is set"),
            "{e}"
        );
        let e = err(unverified(TlsConfig {
            ca_key: Some("/x.key".into()),
            ..enabled()
        }));
        assert!(
            e.starts_with("tls.ca_cert") && e.contains("tls.ca_key is set"),
            "{e}"
        );
        let e = err(unverified(TlsConfig {
            ca_cn: Some(String::new()),
            ..enabled()
        }));
        assert!(e.starts_with("tls.ca_cn = \"\""), "{e}");
        let e = err(unverified(TlsConfig {
            ca_cn: Some("x".repeat(65)),
            ..enabled()
        }));
        assert!(e.starts_with("tls.ca_cn") && e.contains("64"), "{e}");
        let e = err(unverified(TlsConfig {
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ca_key: Some("/nonexistent/ca.key".into()),
            ..enabled()
        }));
        assert!(
            e.starts_with("tls.ca_cert / tls.ca_key: /nonexistent/ca.pem: cannot read"),
            "{e}"
        );
        let e = err(TlsSettings::build(
            &TlsConfig {
                upstream_ca_certs: vec!["/nonexistent/up.pem".into()],
                ..enabled()
            },
            None,
            no_host_roots,
        ));
        assert!(
            e.starts_with("tls.upstream_ca_certs[0] = \"/nonexistent/up.pem\": cannot read"),
            "{e}"
        );
    }

    #[test]
    fn a_loaded_ca_is_used_and_a_bad_pair_is_refused() {
        let dir = Scratch::new("settings-ca");
        let (ca, cert, key) = written_ca(&dir);
        let cfg = TlsConfig {
            ca_cert: Some(cert.clone()),
            ca_key: Some(key.clone()),
            ..enabled()
        };
        let i = unverified(cfg.clone()).unwrap().interception.unwrap();
        assert_eq!(i.ca().cert_der(), ca.cert_der());
        // ca_cn names a generated CA: with a loaded one it is an error, not ignored.
        let e = err(unverified(TlsConfig {
            ca_cn: Some("x".into()),
            ..cfg.clone()
        }));
        assert!(e.starts_with("tls.ca_cn = \"x\""), "{e}");
        // A key of another CA.
        let other = InterceptionCa::generate("other").unwrap();
        let other_key = dir.write("other.key", other.key_pem());
        let e = err(unverified(TlsConfig {
            ca_key: Some(other_key),
            ..cfg
        }));
        assert!(e.contains("does not belong"), "{e}");
    }

    #[test]
    fn verification_needs_something_to_verify_against() {
        let e = err(TlsSettings::build(&enabled(), None, no_host_roots));
        assert!(e.starts_with("tls.verify_upstream = true"), "{e}");
        assert!(e.contains("tls.upstream_ca_certs"), "{e}");
        // A file without certificates is named.
        let dir = Scratch::new("settings-up");
        let empty = dir.write("empty.pem", "nothing here\n");
        let e = err(TlsSettings::build(
            &TlsConfig {
                upstream_ca_certs: vec![empty.clone()],
                ..enabled()
            },
            None,
            no_host_roots,
        ));
        assert!(
            e.starts_with("tls.upstream_ca_certs[0]") && e.contains("no `-----BEGIN CERTIFICATE"),
            "{e}"
        );
    }

    #[test]
    fn trust_host_cas_ships_the_host_roots_in_the_ca_out_file() {
        let host_ca = InterceptionCa::generate("host corporate proxy CA").unwrap();
        let host_roots = vec![host_ca.cert_der().clone()];
        let s = TlsSettings::build(&enabled(), Some(true), || host_roots.clone()).unwrap();
        let i = s.interception.unwrap();
        let pem = i.guest_trust_pem();
        assert!(
            pem.starts_with(&i.ca().cert_pem()),
            "the interception CA comes first"
        );
        assert!(pem.ends_with(&host_ca.cert_pem()));
        let parsed: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(parsed.len(), 2);
        // Without it (unset or false), only the CA.
        for t in [None, Some(false)] {
            let s = TlsSettings::build(&enabled(), t, || host_roots.clone()).unwrap();
            let i = s.interception.unwrap();
            assert_eq!(i.guest_trust_pem(), i.ca().cert_pem(), "{t:?}");
        }
        // Nothing to ship, or no interception to ship it with: errors, not silence.
        let e = err(unverified_with_trust(enabled(), Some(true)));
        assert!(e.starts_with("trust_host_cas = true"), "{e}");
        let e = err(TlsSettings::build(
            &TlsConfig::default(),
            Some(true),
            || host_roots.clone(),
        ));
        assert!(
            e.starts_with("trust_host_cas = true") && e.contains("[tls]"),
            "{e}"
        );
    }

    fn unverified_with_trust(
        mut cfg: TlsConfig,
        trust: Option<bool>,
    ) -> Result<TlsSettings, String> {
        cfg.verify_upstream = Some(false);
        TlsSettings::build(&cfg, trust, no_host_roots)
    }

    // ---- both sides' configurations in real (in-memory) handshakes ----------------------

    /// Runs a handshake between `client` and `server` over in-memory buffers.
    fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..20 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
            }
            let server_result = server.process_new_packets().map(|_| ());
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
            }
            client.process_new_packets()?;
            server_result?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    /// A plain server showing `chain` signed with `key_of`'s key (a leaf of `ca` by default).
    fn upstream_server(certified: Arc<CertifiedKey>, alpn: &[&[u8]]) -> ServerConnection {
        let mut cfg =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        ServerConnection::new(Arc::new(cfg)).unwrap()
    }

    fn client(cfg: Arc<ClientConfig>, name: &str) -> ClientConnection {
        ClientConnection::new(cfg, ServerName::try_from(name.to_string()).unwrap()).unwrap()
    }

    fn upstream_ca_file(dir: &Scratch) -> (InterceptionCa, PathBuf) {
        let ca = InterceptionCa::generate("upstream private PKI").unwrap();
        let path = dir.write("upstream-ca.pem", ca.cert_pem());
        (ca, path)
    }

    #[test]
    fn upstream_verification_uses_the_configured_roots() {
        let dir = Scratch::new("verify");
        let (upstream_ca, path) = upstream_ca_file(&dir);
        let now = SystemTime::now();
        let leaf = upstream_ca.issue_leaf("api.internal.example", now).unwrap();
        let cfg = TlsConfig {
            upstream_ca_certs: vec![path],
            ..enabled()
        };
        let i = TlsSettings::build(&cfg, None, no_host_roots)
            .unwrap()
            .interception
            .unwrap();
        assert!(i.verify_upstream);
        let up = i.upstream_config(&[]);
        handshake(
            &mut client(up.clone(), "api.internal.example"),
            &mut upstream_server(leaf.certified.clone(), &[]),
        )
        .expect("an upstream under tls.upstream_ca_certs is trusted");
        // The wrong name, or a CA nobody configured, fails the handshake.
        let e = handshake(
            &mut client(up.clone(), "other.example"),
            &mut upstream_server(leaf.certified.clone(), &[]),
        )
        .unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e}");
        let stranger = InterceptionCa::generate("stranger").unwrap();
        let stranger_leaf = stranger.issue_leaf("api.internal.example", now).unwrap();
        let e = handshake(
            &mut client(up, "api.internal.example"),
            &mut upstream_server(stranger_leaf.certified, &[]),
        )
        .unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e}");
        // The host's trust store counts as well.
        let i = TlsSettings::build(&enabled(), None, || vec![stranger.cert_der().clone()])
            .unwrap()
            .interception
            .unwrap();
        let ok_leaf = stranger.issue_leaf("h.example", now).unwrap();
        handshake(
            &mut client(i.upstream_config(&[]), "h.example"),
            &mut upstream_server(ok_leaf.certified, &[]),
        )
        .expect("an upstream under the host's trust store is trusted");
    }

    #[test]
    fn without_verification_any_chain_passes_but_the_signature_must_hold() {
        let i = unverified(enabled()).unwrap().interception.unwrap();
        let stranger = InterceptionCa::generate("self-signed server").unwrap();
        let now = SystemTime::now();
        let leaf = stranger.issue_leaf("self.example", now).unwrap();
        handshake(
            &mut client(i.upstream_config(&[]), "wrong.name.example"),
            &mut upstream_server(leaf.certified.clone(), &[]),
        )
        .expect("any certificate is accepted");
        // A server that shows one certificate but signs with another key is refused.
        let other = stranger.issue_leaf("self.example", now).unwrap();
        let forged = Arc::new(CertifiedKey::new(
            leaf.certified.cert.clone(),
            other.certified.key.clone(),
        ));
        let e = handshake(
            &mut client(i.upstream_config(&[]), "self.example"),
            &mut upstream_server(forged, &[]),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
            ),
            "{e:?}"
        );
    }

    #[test]
    fn the_guest_side_shows_the_leaf_and_the_upstreams_alpn() {
        let i = unverified(enabled()).unwrap().interception.unwrap();
        let mut leaves = i.leaf_cache(&Limits::default());
        let now = SystemTime::now();
        let key = leaves.certified_key("api.example.com", now).unwrap();
        // The guest trusts only netfence's CA.
        let mut roots = RootCertStore::empty();
        roots.add(i.ca().cert_der().clone()).unwrap();
        let mut guest_cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        guest_cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let guest_cfg = Arc::new(guest_cfg);
        for (chosen, expect) in [
            (Some(b"h2".to_vec()), Some(&b"h2"[..])),
            (Some(b"http/1.1".to_vec()), Some(&b"http/1.1"[..])),
            (None, None),
        ] {
            let mut g = client(guest_cfg.clone(), "api.example.com");
            let mut s = ServerConnection::new(i.server_config(key.clone(), chosen)).unwrap();
            handshake(&mut g, &mut s).expect("the guest accepts netfence's leaf");
            assert_eq!(g.alpn_protocol(), expect);
            assert_eq!(s.server_name(), Some("api.example.com"));
        }
        // Another name's connection with this leaf is refused by the guest.
        let mut g = client(guest_cfg, "other.example.com");
        let mut s = ServerConnection::new(i.server_config(key, None)).unwrap();
        assert!(handshake(&mut g, &mut s).is_err());
    }

    #[test]
    fn a_links_leaf_cache_is_bounded_by_the_tls_leaf_cache_limit() {
        let i = unverified(enabled()).unwrap().interception.unwrap();
        assert_eq!(i.leaf_cache(&Limits::default()).capacity(), 1024);
        let mut limits = Limits::default();
        limits.apply("tls-leaf-cache=2").unwrap();
        let mut leaves = i.leaf_cache(&limits);
        let now = SystemTime::now();
        for n in 0..5 {
            leaves.certified_key(&format!("n{n}.example"), now).unwrap();
        }
        assert_eq!((leaves.len(), leaves.capacity()), (2, 2));
    }

    #[test]
    fn upstream_configs_offer_the_alpn_list_and_are_cached_within_a_bound() {
        let i = unverified(enabled()).unwrap().interception.unwrap();
        let h2 = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let a = i.upstream_config(&h2);
        assert_eq!(a.alpn_protocols, h2);
        assert!(Arc::ptr_eq(&a, &i.upstream_config(&h2)));
        assert!(i.upstream_config(&[]).alpn_protocols.is_empty());
        for n in 0..(MAX_CACHED_ALPN_LISTS * 2) {
            let list = vec![format!("p{n}").into_bytes()];
            assert_eq!(i.upstream_config(&list).alpn_protocols, list);
        }
        assert!(i.client_configs.lock().unwrap().len() <= MAX_CACHED_ALPN_LISTS);
        // The upstream picks from the offer.
        let stranger = InterceptionCa::generate("s").unwrap();
        let leaf = stranger
            .issue_leaf("alpn.example", SystemTime::now())
            .unwrap();
        let mut c = client(a, "alpn.example");
        let mut s = upstream_server(leaf.certified, &[b"http/1.1"]);
        handshake(&mut c, &mut s).unwrap();
        assert_eq!(c.alpn_protocol(), Some(&b"http/1.1"[..]));
    }
}
