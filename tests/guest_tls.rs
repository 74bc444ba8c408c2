//! Real-guest TLS interception and secrets: one QEMU (TCG) boot of the test guest attached to
//! netfence with `[tls]` interception and one secret, API_KEY, allowed for api.example.com.
//!
//! - The guest resolves names through the gateway (a fake upstream DNS in this test) and fetches
//!   netfence's CA (written by `--ca-out`) from a plain HTTP server in this test;
//! - its curl, with `--cacert` that CA, fetches `https://api.example.com/` through interception
//!   from a loopback HTTPS server (whose own CA netfence trusts through
//!   `tls.upstream_ca_certs`), with `Authorization: Bearer $API_KEY`, where the guest's API_KEY is
//!   the placeholder: the server receives the real value;
//! - the same request to other.example.com (same address, same server) is reset: the server
//!   never sees it, and netfence logs the violation;
//! - nothing the guest received contains the real value.
//!
//! Without the guest image this test fails with a message saying how to build it; it never
//! skips. Nothing leaves the host: every address is documentation space mapped to loopback.

mod common;
mod dnsfake;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::real_guest::{assert_checks, boot_guest, require_guest_image};
use common::tls::{HttpsServer, TestCa};
use common::{Netfence, TempDir};
use dnsfake::{write_config, Answer, FakeDns};
use netfence::config::default_placeholder;

const API_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const CA_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 8);
const KEY: &str = "sk-guest-real-value-77aa";

/// The guest's script: every check prints `CHECK-OK name` or `CHECK-FAIL name why`.
fn guest_script(placeholder: &str) -> String {
    format!(
        r#"ok() {{ echo "CHECK-OK $1"; }}
bad() {{ echo "CHECK-FAIL $1 $2"; }}
export API_KEY={placeholder}
udhcpc -i eth0 -n -q -t 5 -T 2 && ok dhcp || bad dhcp "udhcpc failed"
curl -sS --max-time 30 -o /tmp/ca.pem http://ca.example/ca.pem && ok ca || bad ca "rc=$?"
grep -q 'BEGIN CERTIFICATE' /tmp/ca.pem && ok ca-pem || bad ca-pem "not a PEM certificate"
curl -sS --max-time 60 --cacert /tmp/ca.pem -H "Authorization: Bearer $API_KEY" -o /tmp/r https://api.example.com/v1 && ok https || bad https "rc=$?"
echo "RESPONSE [$(cat /tmp/r)]"
grep -q 'received' /tmp/r && ok response || bad response "unexpected body"
curl -sS --max-time 30 --cacert /tmp/ca.pem -H "Authorization: Bearer $API_KEY" -o /tmp/o https://other.example.com/v1; rc=$?
echo "OTHER rc=$rc"
[ $rc -ne 0 ] && ok other-blocked || bad other-blocked "a placeholder for another host went through"
grep -rq '{KEY}' /tmp/r /tmp/o 2>/dev/null && bad no-value "the real value reached the guest" || ok no-value
exit 0
"#
    )
}

/// A plain HTTP server on loopback that answers every request with the file at `path`, read
/// then; returns its port.
fn file_server(path: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            let mut request = Vec::new();
            let mut buf = [0u8; 2048];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 32 * 1024 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = std::fs::read(&path).unwrap_or_default();
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    port
}

#[test]
fn real_guest_curl_through_interception_gets_the_secret_substituted() {
    require_guest_image();
    let up_ca = TestCa::new("guest test upstream CA");
    let api = HttpsServer::start_with(
        &up_ca,
        &["api.example.com", "other.example.com"],
        &[b"h2", b"http/1.1"],
        Some(b"received\n"),
    );
    let upstream = FakeDns::start(&[
        ("api.example.com", Answer::A(vec![API_IP])),
        ("other.example.com", Answer::A(vec![API_IP])),
        ("ca.example", Answer::A(vec![CA_IP])),
    ]);
    let tmp = TempDir::new("netfence-guest-tls");
    let up_ca_file = tmp.path().join("upstream-ca.pem");
    std::fs::write(&up_ca_file, &up_ca.cert_pem).unwrap();
    let ca_out = tmp.path().join("netfence-ca.pem");
    let config = write_config(
        tmp.path(),
        &format!(
            r#"[[secrets]]
env_var = "API_KEY"
value = "{KEY}"
allowed_hosts = ["api.example.com"]
[dns]
nameservers = ["{}"]
[tls]
upstream_ca_certs = [{:?}]
"#,
            upstream.nameserver(),
            up_ca_file.to_str().unwrap()
        ),
    );
    // netfence writes its CA (`--ca-out`) before it listens; this server reads that file at
    // each request, so the guest gets the CA of the netfence it talks to.
    let ca_port = file_server(ca_out.clone());
    let mut nf = Netfence::builder()
        .args(&[
            "--once".to_string(),
            "--config".to_string(),
            config.display().to_string(),
            "--ca-out".to_string(),
            ca_out.display().to_string(),
            "--map".to_string(),
            format!("{API_IP}:443=127.0.0.1:{}", api.port),
            "--map".to_string(),
            format!("{CA_IP}:80=127.0.0.1:{ca_port}"),
        ])
        .spawn();
    let script = tmp.path().join("guest.sh");
    std::fs::write(&script, guest_script(&default_placeholder("API_KEY"))).unwrap();
    let started = Instant::now();
    let (console, rc) = boot_guest(nf.socket_path(), &script);
    let secs = started.elapsed().as_secs_f64();
    let _ = nf.wait_exit(Duration::from_secs(10));
    let report = format!(
        "--- guest console ({secs:.1}s, run-guest.sh exit {rc:?}) ---\n{console}\n{}",
        nf.log_text()
    );
    println!("{report}");
    assert_checks(
        &console,
        &[
            "dhcp",
            "ca",
            "ca-pem",
            "https",
            "response",
            "other-blocked",
            "no-value",
        ],
        &report,
    );
    let got = String::from_utf8_lossy(&api.all_bytes()).into_owned();
    assert!(
        got.contains(&format!("Bearer {KEY}")),
        "the server did not get the real value:\n{got}\n{report}"
    );
    assert!(
        !got.contains(&default_placeholder("API_KEY")),
        "a placeholder reached the server"
    );
    assert!(
        !got.to_ascii_lowercase().contains("host: other.example.com"),
        "the request to other.example.com reached the server"
    );
    let log = nf.log_lines();
    assert!(
        log.iter()
            .any(|l| l.contains("secret violation") && l.contains("other.example.com")),
        "no violation logged\n{report}"
    );
    assert!(
        !log.iter().any(|l| l.contains(KEY)),
        "the value is in netfence's log"
    );
}
