//! TLS for the interception tests: a test CA, a loopback HTTPS server signed by it, and a
//! rustls client that runs in the harness guest (over its smoltcp TCP socket).
//!
//! The server answers each HTTP/1.1 request with `200 OK` and the request itself (head and
//! body) as the response body, and keeps what it received, so a test can check what reached
//! the upstream (a substituted secret, the exact bytes).

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use smoltcp::iface::SocketHandle;

use super::{Guest, Netfence, TempDir};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA of the test's own (the "public" CA of the upstream servers).
pub struct TestCa {
    pub cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(cn: &str) -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names`, signed by this CA: (chain, key).
    pub fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (
            vec![cert.der().clone(), self.cert_der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// What a test server received on one connection.
#[derive(Clone, Debug, Default)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub alpn: Option<Vec<u8>>,
}

/// A loopback HTTPS server for `name`, signed by `ca`, offering `alpn`.
pub struct HttpsServer {
    pub port: u16,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl HttpsServer {
    /// A server for `name` that answers each request with the request itself.
    pub fn start(ca: &TestCa, name: &str, alpn: &[&[u8]]) -> HttpsServer {
        Self::start_with(ca, &[name], alpn, None)
    }

    /// A server for `names`; with `body`, each request is answered with that body instead of
    /// itself (so nothing the client sent comes back).
    pub fn start_with(
        ca: &TestCa,
        names: &[&str],
        alpn: &[&[u8]],
        body: Option<&'static [u8]>,
    ) -> HttpsServer {
        let (chain, key) = ca.issue(names);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let config = config.clone();
                let log = log.clone();
                thread::spawn(move || serve_one(stream, config, log, body));
            }
        });
        HttpsServer { port, received }
    }

    /// Everything received on all connections so far, joined.
    pub fn all_bytes(&self) -> Vec<u8> {
        let r = self.received.lock().unwrap();
        r.iter().flat_map(|c| c.bytes.clone()).collect()
    }
}

/// One connection: answers each request (a head up to an empty line, then `Content-Length`
/// bytes) with itself as the body, or with `body`.
fn serve_one(
    stream: std::net::TcpStream,
    config: Arc<ServerConfig>,
    log: Arc<Mutex<Vec<Received>>>,
    body: Option<&'static [u8]>,
) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let Ok(conn) = ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let index = {
        let mut l = log.lock().unwrap();
        l.push(Received::default());
        l.len() - 1
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        {
            let mut l = log.lock().unwrap();
            l[index].bytes.extend_from_slice(&chunk[..n]);
            l[index].alpn = tls.conn.alpn_protocol().map(|p| p.to_vec());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = request_end(&buf) {
            let request: Vec<u8> = buf.drain(..end).collect();
            let answer = body.map(<[u8]>::to_vec).unwrap_or(request);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                answer.len()
            );
            if tls.write_all(head.as_bytes()).is_err() || tls.write_all(&answer).is_err() {
                return;
            }
            let _ = tls.flush();
        }
    }
}

/// Where the first whole request in `buf` ends (head, then Content-Length bytes).
pub fn request_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some(head_end + len)
}

/// A client configuration trusting only `roots_pem`, offering `alpn`.
pub fn client_config(roots_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(roots_pem.as_bytes()) {
        let cert: CertificateDer<'static> = cert.expect("PEM certificate");
        roots.add(cert).expect("root");
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS session in the harness guest over one of its TCP sockets.
#[derive(Debug)]
pub struct GuestTls {
    pub handle: SocketHandle,
    pub conn: ClientConnection,
}

impl GuestTls {
    /// Connects TCP to `dst:port`, then runs the TLS handshake for `name`. The error says
    /// where it failed (TCP, or the TLS error rustls reported).
    pub fn connect(
        g: &mut Guest,
        dst: IpAddr,
        port: u16,
        name: &str,
        config: Arc<ClientConfig>,
        deadline: Instant,
    ) -> Result<GuestTls, String> {
        let handle = g
            .tcp_connect(
                dst,
                port,
                deadline.saturating_duration_since(Instant::now()),
            )
            .map_err(|e| format!("TCP: {e:?}"))?;
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(config, server_name).map_err(|e| e.to_string())?;
        let mut s = GuestTls { handle, conn };
        s.pump_until(g, deadline, |c| !c.conn.is_handshaking())?;
        Ok(s)
    }

    /// Moves ciphertext both ways until `done` says so, the connection closes or `deadline`.
    pub fn pump_until(
        &mut self,
        g: &mut Guest,
        deadline: Instant,
        mut done: impl FnMut(&mut GuestTls) -> bool,
    ) -> Result<(), String> {
        loop {
            while self.conn.wants_write() {
                let mut out = Vec::new();
                self.conn.write_tls(&mut out).map_err(|e| e.to_string())?;
                g.tcp_send_all(self.handle, &out, deadline)?;
            }
            if done(self) {
                return Ok(());
            }
            let h = self.handle;
            let conn = &mut self.conn;
            // Only what rustls takes leaves the socket (it may take less than is there).
            let got = g.poll_until(deadline, |g| {
                let s = g.tcp(h);
                if s.can_recv() {
                    let taken = s.recv(|buf| match conn.read_tls(&mut &buf[..]) {
                        Ok(n) => (n, Ok(n)),
                        Err(e) => (0, Err(e.to_string())),
                    });
                    Some(Some(taken.map_err(|e| e.to_string()).and_then(|r| r)))
                } else if !s.may_recv() {
                    Some(None)
                } else {
                    None
                }
            });
            match got {
                Some(Some(taken)) => {
                    taken?;
                    self.conn
                        .process_new_packets()
                        .map_err(|e| format!("TLS: {e}"))?;
                }
                Some(None) => {
                    return if done(self) {
                        Ok(())
                    } else {
                        Err(format!(
                            "the connection closed (TCP state {})",
                            g.tcp(h).state()
                        ))
                    }
                }
                None => return Err("timed out".to_string()),
            }
        }
    }

    /// Sends `request` and reads one response (head, then Content-Length bytes).
    pub fn request(
        &mut self,
        g: &mut Guest,
        request: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, String> {
        self.conn
            .writer()
            .write_all(request)
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        self.pump_until(g, deadline, |c| {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = c.conn.reader().read(&mut buf) {
                if n == 0 {
                    break;
                }
                response.extend_from_slice(&buf[..n]);
            }
            request_end(&response).is_some()
        })?;
        Ok(response)
    }

    /// The server's leaf certificate as the guest saw it.
    pub fn peer_leaf(&self) -> Option<CertificateDer<'static>> {
        self.conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned())
    }
}

/// The DNS names (SAN) of a DER certificate.
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("X.509");
    parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The issuer's common name of a DER certificate.
pub fn issuer_cn(cert: &CertificateDer<'_>) -> String {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("X.509");
    let cn = parsed
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    cn
}

/// netfence intercepting TLS with `up_ca` trusted upstream (`tls.upstream_ca_certs`): `toml`
/// goes ahead of the config's `[tls]` table and `tls_extra` lines into it; then `args` and the
/// environment `env`. Returns it, the PEM of its CA (written by `--ca-out`) and the scratch
/// directory that holds both files.
pub fn spawn_intercepting(
    up_ca: &TestCa,
    toml: &str,
    tls_extra: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> (Netfence, String, TempDir) {
    let dir = TempDir::new("nf-tls");
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, &up_ca.cert_pem).unwrap();
    let cfg = dir.path().join("netfence.toml");
    std::fs::write(
        &cfg,
        format!(
            "{toml}\n[tls]\nupstream_ca_certs = [{:?}]\n{tls_extra}\n",
            ca_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let ca_out = dir.path().join("netfence-ca.pem");
    let mut b = Netfence::builder()
        .args(&[
            "--config",
            cfg.to_str().unwrap(),
            "--ca-out",
            ca_out.to_str().unwrap(),
        ])
        .args(args);
    for (k, v) in env {
        b = b.env(*k, *v);
    }
    let nf = b.spawn();
    let pem =
        std::fs::read_to_string(&ca_out).unwrap_or_else(|e| panic!("{}: {e}", ca_out.display()));
    (nf, pem, dir)
}
