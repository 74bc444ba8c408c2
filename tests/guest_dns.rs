//! Real-guest DNS test: one QEMU (TCG) boot of the test guest (`scripts/build-guest.sh`,
//! booted by `scripts/run-guest.sh`) attached to netfence, whose gateway DNS service forwards to
//! a fake upstream nameserver inside this test on 127.0.0.1. The guest's own tools check:
//!
//! - DHCP hands out the gateway as resolver: udhcpc's hook writes `nameserver 172.16.0.1` to
//!   /etc/resolv.conf, and busybox `nslookup` and curl (glibc's resolver) use it;
//! - `nslookup allowed.example` answers 203.0.113.7 (the fake upstream's answer), and
//!   `curl http://allowed.example/` fetches a body byte-exact from an HTTP server in this test
//!   behind `--map 203.0.113.7:80=127.0.0.1:PORT`. The policy denies egress by default and
//!   allows only DNS to the gateway and the name `allowed.example`, so that flow is allowed only
//!   through the names the guest resolved (`domain_source="dns-cache"` in the log);
//! - `denied.example` (`deny_domains`) gets NXDOMAIN and is never asked upstream;
//! - `private.example`, which the upstream answers with 10.0.0.7, gets NXDOMAIN from rebind
//!   protection (it was asked upstream, the answer was removed), and curl cannot resolve it;
//! - the same service answers on the gateway's IPv6 address fd42:6d73:62::1 (what the router
//!   advertisement's RDNSS option names), once SLAAC has configured the guest.
//!
//! Without the guest image this test fails with a message saying how to build it; it never
//! skips. Nothing leaves the host: every address is documentation space mapped to loopback.

mod common;
mod dnsfake;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::process::field;
use common::{Netfence, TempDir};
use dnsfake::{write_config, Answer, FakeDns};

/// run-guest.sh kills QEMU after this many seconds.
const GUEST_TIMEOUT_SECS: u64 = 180;
/// HTTP body size: many segments, still quick under TCG.
const BODY_LEN: usize = 150_000;
const ALLOWED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const PRIVATE_ANSWER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 7);

fn guest_dir() -> PathBuf {
    std::env::var_os("NETFENCE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"))
}

/// CRC-32 as busybox `crc32` prints it (reflected, polynomial 0xedb88320).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A printable body that differs on every run.
fn body_for(marker: &str) -> Vec<u8> {
    let mut body = format!("netfence dns guest test {marker}\n").into_bytes();
    let mut rng = common::frames::Rng::new(u64::from(crc32(marker.as_bytes())));
    while body.len() < BODY_LEN {
        let v = rng.next_u64();
        body.push(if body.len() % 80 == 79 {
            b'\n'
        } else {
            b'0' + (v % 75) as u8
        });
    }
    body
}

/// An HTTP/1.0 server on 127.0.0.1 serving `body` to every request; records the requests.
fn http_server(body: Arc<Vec<u8>>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind HTTP server");
    let port = l.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let reqs = requests.clone();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let (body, reqs) = (body.clone(), reqs.clone());
            thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let mut req = Vec::new();
                let mut buf = [0u8; 2048];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 32 * 1024 {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                reqs.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&req).into_owned());
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(&body);
            });
        }
    });
    (port, requests)
}

/// The guest's script: every check prints `CHECK-OK name` or `CHECK-FAIL name why`.
fn guest_script() -> String {
    r#"ok() { echo "CHECK-OK $1"; }
bad() { echo "CHECK-FAIL $1 $2"; }
udhcpc -i eth0 -n -q -t 5 -T 2 && ok dhcp || bad dhcp "udhcpc failed"
echo "RESOLV [$(tr '\n' ' ' </etc/resolv.conf)]"
grep -qx 'nameserver 172.16.0.1' /etc/resolv.conf && ok resolv || bad resolv "gateway not in resolv.conf"
nslookup allowed.example >/tmp/a 2>&1; echo "NS-ALLOWED rc=$?"; cat /tmp/a
grep -q 'Address:.*203\.0\.113\.7' /tmp/a && ok ns-allowed || bad ns-allowed "no 203.0.113.7"
curl -sS --max-time 30 -o /tmp/body -w 'REMOTE %{remote_ip}\n' http://allowed.example/ && ok http || bad http "curl rc=$?"
echo "BODY crc32=$(crc32 </tmp/body) len=$(wc -c </tmp/body)"
nslookup denied.example >/tmp/d 2>&1; echo "NS-DENIED rc=$?"; cat /tmp/d
grep -q NXDOMAIN /tmp/d && ok ns-denied || bad ns-denied "no NXDOMAIN"
nslookup private.example >/tmp/p 2>&1; echo "NS-PRIVATE rc=$?"; cat /tmp/p
grep -q NXDOMAIN /tmp/p && ok ns-private || bad ns-private "no NXDOMAIN"
grep -q '10\.0\.0\.7' /tmp/p && bad ns-private-addr "private address leaked" || ok ns-private-addr
for n in denied private; do
curl -sS --max-time 15 -o /dev/null http://$n.example/; rc=$?; echo "CURL-$n rc=$rc"
[ $rc -eq 6 ] && ok curl-$n || bad curl-$n "rc=$rc, expected 6 (could not resolve host)"
done
# The same service on the gateway's IPv6 address (RDNSS), once SLAAC is done (bounded wait).
for i in $(seq 1 40); do
  ip -6 addr show dev eth0 | grep 'scope global' | grep -qv tentative && break
  sleep 0.25
done
nslookup allowed.example fd42:6d73:62::1 >/tmp/a6 2>&1; echo "NS6-ALLOWED rc=$?"; cat /tmp/a6
grep -q 'Address:.*203\.0\.113\.7' /tmp/a6 && ok ns6-allowed || bad ns6-allowed "no 203.0.113.7 over IPv6"
nslookup denied.example fd42:6d73:62::1 >/tmp/d6 2>&1; echo "NS6-DENIED rc=$?"; cat /tmp/d6
grep -q NXDOMAIN /tmp/d6 && ok ns6-denied || bad ns6-denied "no NXDOMAIN over IPv6"
exit 0
"#
    .to_string()
}

/// Boots the guest on `socket` with `script`; returns its console (stdout + stderr of
/// run-guest.sh) and run-guest.sh's exit code.
fn boot_guest(socket: &std::path::Path, script: &std::path::Path) -> (String, Option<i32>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("bash")
        .arg(root.join("scripts/run-guest.sh"))
        .arg("--vhost-user")
        .arg(socket)
        .arg("--script")
        .arg(script)
        .arg("--timeout")
        .arg(GUEST_TIMEOUT_SECS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scripts/run-guest.sh");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        let _ = tx.send(v);
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    // run-guest.sh bounds QEMU itself; this guards against the script hanging.
    let limit = Duration::from_secs(GUEST_TIMEOUT_SECS + 30);
    let Ok(out) = rx.recv_timeout(limit) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("scripts/run-guest.sh still running after {limit:?}; killed");
    };
    let status = child.wait().expect("wait for run-guest.sh");
    let err = err_reader.join().unwrap_or_default();
    let mut console = String::from_utf8_lossy(&out).replace('\r', "");
    console.push_str(&String::from_utf8_lossy(&err));
    (console, status.code())
}

#[test]
fn real_guest_resolves_through_the_gateway_with_blocking_and_rebind_protection() {
    let gdir = guest_dir();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        assert!(
            gdir.join(f).is_file(),
            "guest image {} is missing: run scripts/build-guest.sh (scripts/test.sh does it)",
            gdir.join(f).display()
        );
    }

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let marker = format!("dns{:x}x{:x}", std::process::id(), nanos & 0xffff_ffff);
    let body = Arc::new(body_for(&marker));
    let (http_port, requests) = http_server(body.clone());
    let upstream = FakeDns::start(&[
        ("allowed.example", Answer::A(vec![ALLOWED_IP])),
        ("denied.example", Answer::A(vec![ALLOWED_IP])),
        ("private.example", Answer::A(vec![PRIVATE_ANSWER])),
    ]);

    let tmp = TempDir::new("netfence-guest-dns");
    let config = write_config(
        tmp.path(),
        &format!(
            r#"deny_domains = ["denied.example"]
[policy]
default_egress = "deny"
rules = [
  {{ action = "allow", destination = "host", protocols = ["udp", "tcp"], ports = [53] }},
  {{ action = "allow", destination = "allowed.example" }},
]
[dns]
nameservers = ["{}"]
"#,
            upstream.nameserver()
        ),
    );
    let script = tmp.path().join("guest.sh");
    std::fs::write(&script, guest_script()).expect("write guest script");

    let mut nf = Netfence::builder()
        .args(&[
            "--once".to_string(),
            "--config".to_string(),
            config.display().to_string(),
            "--map".to_string(),
            format!("{ALLOWED_IP}:80=127.0.0.1:{http_port}"),
        ])
        .spawn();
    let started = Instant::now();
    let (console, rc) = boot_guest(nf.socket_path(), &script);
    let secs = started.elapsed().as_secs_f64();
    // --once: netfence exits when the VMM goes away; give it a moment, then it is killed.
    let _ = nf.wait_exit(Duration::from_secs(10));
    let log = nf.log_lines();
    let report = format!(
        "--- guest console ({secs:.1}s, run-guest.sh exit {rc:?}) ---\n{console}\n{}\n\
         --- upstream asked: {:?}",
        nf.log_text(),
        upstream.asked()
    );
    println!("{report}");

    assert!(
        console.contains("NETFENCE-GUEST-END rc=0"),
        "guest did not finish its script (timeout or crash?)\n{report}"
    );
    let failed: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("CHECK-FAIL"))
        .collect();
    assert!(
        failed.is_empty(),
        "guest checks failed: {failed:?}\n{report}"
    );
    for check in [
        "dhcp",
        "resolv",
        "ns-allowed",
        "http",
        "ns-denied",
        "ns-private",
        "ns-private-addr",
        "curl-denied",
        "curl-private",
        "ns6-allowed",
        "ns6-denied",
    ] {
        assert!(
            console
                .lines()
                .any(|l| l.trim() == format!("CHECK-OK {check}")),
            "guest check `{check}` did not pass\n{report}"
        );
    }

    // The HTTP flow: byte-exact, to the resolved address, with the name in the request.
    let expected = format!("BODY crc32={:08x} len={}", crc32(&body), body.len());
    assert!(
        console.lines().any(|l| l.trim() == expected),
        "body through netfence is not byte-exact: expected `{expected}`\n{report}"
    );
    assert!(
        console
            .lines()
            .any(|l| l.trim() == format!("REMOTE {ALLOWED_IP}")),
        "curl did not connect to {ALLOWED_IP}\n{report}"
    );
    let reqs = requests.lock().unwrap().clone();
    assert_eq!(
        reqs.len(),
        1,
        "HTTP requests at the loopback server: {reqs:?}\n{report}"
    );
    assert!(
        reqs[0]
            .to_ascii_lowercase()
            .contains("host: allowed.example"),
        "request without Host: allowed.example: {:?}",
        reqs[0]
    );

    // Upstream: allowed and private names were asked, the denied one never.
    assert!(upstream.times_asked("allowed.example") >= 1, "{report}");
    assert!(upstream.times_asked("private.example") >= 1, "{report}");
    assert_eq!(
        upstream.times_asked("denied.example"),
        0,
        "a denied name was forwarded upstream\n{report}"
    );

    // netfence's log: the flow was allowed by the name rule through the cache.
    let flow = log
        .iter()
        .find(|l| {
            l.contains("decision")
                && field(l, "dst").as_deref() == Some(&format!("{ALLOWED_IP}:80"))
        })
        .unwrap_or_else(|| panic!("no decision for {ALLOWED_IP}:80\n{report}"));
    assert_eq!(field(flow, "action").as_deref(), Some("allow"), "{flow}");
    assert_eq!(
        field(flow, "domains").as_deref(),
        Some("allowed.example"),
        "{flow}"
    );
    assert_eq!(
        field(flow, "domain_source").as_deref(),
        Some("dns-cache"),
        "{flow}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("dns: blocked, NXDOMAIN") && l.contains("denied.example")),
        "no NXDOMAIN log line for denied.example\n{report}"
    );
}

#[test]
fn crc32_is_the_busybox_one() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32(b""), 0);
}
