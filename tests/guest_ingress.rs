//! Real-guest published ports: one QEMU (TCG) boot of the test guest attached to netfence with
//! five published ports, reached from this host.
//!
//! The guest takes its lease and its SLAAC address, serves a page with busybox `httpd` on port
//! 80 (and another on 8080), echoes UDP on 5353 with socat, then tells this test it is ready
//! (a request to a "public" address mapped to a server here) and waits on `nc -l -p 9000`. The
//! test then, from the host:
//!
//! - fetches the page through `127.0.0.1:HP` (IPv4) and `[::1]:HP6` (IPv6 bind: the guest's
//!   SLAAC address);
//! - gets its UDP datagram echoed through `127.0.0.1:UP`;
//! - is reset on the port published to the guest's 8080, which an ingress rule denies (the
//!   guest's server there never answers anything);
//! - releases the guest through the port published to its 9000.
//!
//! Without the guest image this test fails with a message saying how to build it; it never
//! skips. Nothing leaves the host: the guest's one outbound request goes to a documentation
//! address mapped to loopback.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::real_guest::{assert_checks, boot_guest, require_guest_image, unique_marker};
use common::{Netfence, TempDir};

/// How long the guest may take to boot and say it is ready (TCG, a loaded machine).
const READY_TIMEOUT: Duration = Duration::from_secs(150);

fn guest_script(marker: &str) -> String {
    format!(
        r#"ok() {{ echo "CHECK-OK $1"; }}
bad() {{ echo "CHECK-FAIL $1 $2"; }}
udhcpc -i eth0 -n -q -t 5 -T 2 && ok dhcp || bad dhcp "udhcpc failed"
for i in $(seq 1 60); do ip -6 addr show dev eth0 | grep 'scope global' | grep -qv tentative && break; sleep 0.25; done
ip -6 addr show dev eth0 | grep 'scope global' | grep -qv tentative && ok ipv6 || bad ipv6 "no SLAAC address"
mkdir -p /www /www2
echo "guest page {marker}" > /www/index.html
echo "never served" > /www2/index.html
httpd -p 80 -h /www && ok httpd || bad httpd "rc=$?"
httpd -p 8080 -h /www2 && ok httpd-denied || bad httpd-denied "rc=$?"
socat UDP4-RECVFROM:5353,fork EXEC:cat &
nc -l -p 9000 > /tmp/go &
release=$!
# The UDP echo (5353 = 0x14E9) and the release listener (9000 = 0x2328) are bound before the
# host hears "ready" and sends to them.
for i in $(seq 1 40); do
    grep -q ':14E9 00000000:0000 07' /proc/net/udp && grep -q ':2328 00000000:0000 0A' /proc/net/tcp && break
    sleep 0.25
done
curl -sS --max-time 30 -o /dev/null http://203.0.113.7/ready && ok ready || bad ready "rc=$?"
wait $release && ok released || bad released "rc=$?"
grep -q done /tmp/go && ok go || bad go "got [$(cat /tmp/go)]"
exit 0
"#
    )
}

fn free_tcp(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback HTTP server that answers anything with 200 and reports each request line.
fn ready_server() -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap_or(0);
            let line = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
            let _ = tx.send(line);
        }
    });
    (port, rx)
}

/// GET / through `addr`; the whole response.
fn http_get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn real_guest_services_are_reached_through_published_ports() {
    require_guest_image();
    let marker = unique_marker("ingress");
    let (ready_port, ready) = ready_server();
    let (hp, hp6, up, denied, control) = (
        free_tcp("127.0.0.1"),
        free_tcp("::1"),
        free_udp(),
        free_tcp("127.0.0.1"),
        free_tcp("127.0.0.1"),
    );
    let args: Vec<String> = [
        "--once".to_string(),
        "--net-rule".into(),
        "allow@public".into(),
        "--net-rule".into(),
        "deny:ingress@*:tcp:8080".into(),
        "--map".into(),
        format!("203.0.113.7:80=127.0.0.1:{ready_port}"),
        "-p".into(),
        format!("{hp}:80"),
        "-p".into(),
        format!("[::1]:{hp6}:80"),
        "-p".into(),
        format!("{up}:5353/udp"),
        "-p".into(),
        format!("{denied}:8080"),
        "-p".into(),
        format!("{control}:9000"),
    ]
    .to_vec();
    let mut nf = Netfence::builder().args(&args).spawn();
    let tmp = TempDir::new("netfence-guest-ingress");
    let script = tmp.path().join("guest.sh");
    std::fs::write(&script, guest_script(&marker)).unwrap();
    let socket = nf.socket_path().to_path_buf();
    let started = Instant::now();
    let guest = thread::spawn(move || boot_guest(&socket, &script));

    let line = ready.recv_timeout(READY_TIMEOUT);
    let mut results: Vec<(&str, Result<String, String>)> = Vec::new();
    if line.is_ok() {
        let v4 = http_get(SocketAddr::from(([127, 0, 0, 1], hp)));
        results.push(("ipv4", v4));
        let v6 = http_get(SocketAddr::new("::1".parse().unwrap(), hp6));
        results.push(("ipv6", v6));
        let udp = (|| {
            let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let msg = format!("ping {marker}");
            s.send_to(msg.as_bytes(), ("127.0.0.1", up))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 512];
            let (n, _) = s.recv_from(&mut buf).map_err(|e| format!("recv: {e}"))?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })();
        results.push(("udp", udp));
        let refused = (|| {
            let mut s = TcpStream::connect(("127.0.0.1", denied)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            match s.read(&mut [0u8; 64]) {
                Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok("reset".to_string()),
                other => Err(format!("{other:?}")),
            }
        })();
        results.push(("denied", refused));
    }
    // Release the guest (also after a failure above, so that it powers off).
    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", control)) {
        let _ = s.write_all(b"done\n");
    }
    let (console, rc) = guest.join().expect("the guest thread");
    let _ = nf.wait_exit(Duration::from_secs(10));
    let report = format!(
        "--- guest console ({:.1}s, run-guest.sh exit {rc:?}) ---\n{console}\n{}",
        started.elapsed().as_secs_f64(),
        nf.log_text()
    );
    println!("{report}");
    assert!(
        line.as_deref().is_ok_and(|l| l.contains("/ready")),
        "the guest never said it was ready\n{report}"
    );
    for (what, got) in &results {
        let got = got
            .as_ref()
            .unwrap_or_else(|e| panic!("{what}: {e}\n{report}"));
        match *what {
            "ipv4" | "ipv6" => assert!(
                got.contains(&format!("guest page {marker}")),
                "{what}: {got}\n{report}"
            ),
            "udp" => assert_eq!(got, &format!("ping {marker}"), "{report}"),
            _ => assert_eq!(got, "reset", "{report}"),
        }
    }
    assert_checks(
        &console,
        &[
            "dhcp",
            "ipv6",
            "httpd",
            "httpd-denied",
            "ready",
            "released",
            "go",
        ],
        &report,
    );
    let log = nf.log_text();
    assert!(
        log.lines().any(|l| l.contains("action=deny")
            && l.contains("direction=ingress")
            && l.contains(":8080")),
        "no ingress denial logged\n{report}"
    );
}
