//! Real-guest DNS test: one QEMU (TCG) boot of the test guest (`common::real_guest`) attached
//! to netfence, whose gateway DNS service forwards to
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

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::field;
use common::real_guest::{
    assert_checks, boot_guest, crc32, http_server, make_body, require_guest_image, unique_marker,
};
use common::{Netfence, TempDir};
use dnsfake::{write_config, Answer, FakeDns};

/// HTTP body size: many segments, still quick under TCG.
const BODY_LEN: usize = 150_000;
const ALLOWED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const PRIVATE_ANSWER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 7);

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

#[test]
fn real_guest_resolves_through_the_gateway_with_blocking_and_rebind_protection() {
    require_guest_image();
    let marker = unique_marker("dns");
    let body = Arc::new(make_body("netfence dns guest test", &marker, BODY_LEN));
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

    assert_checks(
        &console,
        &[
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
        ],
        &report,
    );

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
