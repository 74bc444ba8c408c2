//! Real-guest test: one QEMU (TCG) boot of a Linux guest attached to netfence over vhost-user.
//!
//! The guest and its boot are `common::real_guest`'s. In that one boot the guest's own tools
//! check, through netfence:
//!
//! - DHCP: `udhcpc` gets 172.16.0.2/30 with router 172.16.0.1 (slot 0);
//! - ICMP: `ping` to the gateway is answered;
//! - TCP: `curl http://203.0.113.7/` fetches a body from an HTTP server inside this test on
//!   127.0.0.1 (`--map 203.0.113.7:80=127.0.0.1:PORT`), byte-exact (CRC-32 and length compared);
//! - UDP: `curl tftp://203.0.113.8/` reads a file from a one-packet TFTP server in this test on
//!   127.0.0.1 (`--map 203.0.113.8:69=127.0.0.1:PORT`);
//! - policy: `curl http://10.1.2.3/` (private, denied by the default public-only policy) fails;
//! - IPv6: the kernel configures fd42:6d73:62::/64 by SLAAC from netfence's router advertisement
//!   with a default route via fe80::1; `ping -6` reaches the gateway and 2001:db8::9 (mapped to
//!   ::1 through an unprivileged ICMPv6 socket); `curl http://[2001:db8::7]/` fetches the same
//!   body byte-exact; `curl http://[fd12::1]/` and `ping -6 fd12::1` (private) are denied.
//!
//! and the test checks netfence's log for the allow and deny decisions. Every address the guest
//! uses is a documentation or private range that netfence maps to loopback or denies, so nothing
//! leaves the host. Run `scripts/build-guest.sh` first (scripts/test.sh does): without the guest
//! image this test fails, it never skips.

mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::real_guest::{
    assert_checks, boot_guest, crc32, http_server, make_body, require_guest_image, unique_marker,
};
use common::{Netfence, TempDir};

/// Size of the HTTP body: several TCP segments and window updates, quick under TCG.
const BODY_LEN: usize = 200_000;

/// A TFTP server that answers any read request with one DATA packet (block 1, < 512 bytes, so
/// the transfer ends there), sent from the same socket so netfence's UDP flow carries it back.
fn start_tftp_server(content: Vec<u8>, hits: Arc<AtomicUsize>) -> u16 {
    assert!(content.len() < 512, "one TFTP block only");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind TFTP server on 127.0.0.1");
    let port = sock.local_addr().expect("TFTP server address").port();
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                return;
            };
            // opcode 1 = RRQ; anything else (the client's ACK) needs no answer.
            if n >= 2 && buf[..2] == [0, 1] {
                hits.fetch_add(1, Ordering::SeqCst);
                let mut data = vec![0, 3, 0, 1];
                data.extend_from_slice(&content);
                let _ = sock.send_to(&data, peer);
            }
        }
    });
    port
}

/// The shell script the guest runs. Each check prints `CHECK-OK name` or `CHECK-FAIL name`.
fn guest_script(marker: &str) -> String {
    format!(
        r#"ok() {{ echo "CHECK-OK $1"; }}
bad() {{ echo "CHECK-FAIL $1 $2"; }}
udhcpc -i eth0 -n -q -t 5 -T 2 && ok dhcp || bad dhcp "udhcpc failed"
ip -4 addr show eth0
ip route
ip -4 addr show eth0 | grep -q 'inet 172.16.0.2/30' && ok lease || bad lease "no 172.16.0.2/30 on eth0"
ip route | grep -q '^default via 172.16.0.1' && ok route || bad route "no default route via 172.16.0.1"
ping -c 1 -W 5 172.16.0.1 && ok ping || bad ping "gateway did not answer"
curl -sS --max-time 30 -o /tmp/body http://203.0.113.7/ && ok http || bad http "curl rc=$?"
echo "BODY crc32=$(crc32 < /tmp/body) len=$(wc -c < /tmp/body)"
grep -q '{marker}' /tmp/body && ok marker || bad marker "marker not in body"
curl -sS --max-time 15 --tftp-no-options -o /tmp/udp tftp://203.0.113.8/check && ok udp || bad udp "curl tftp rc=$?"
echo "UDP [$(cat /tmp/udp)]"
t0=$(date +%s)
curl -sS --connect-timeout 4 --max-time 6 -o /dev/null http://10.1.2.3/
rc=$?
echo "DENIED rc=$rc after $(($(date +%s) - t0))s"
[ $rc -ne 0 ] && ok denied || bad denied "curl to 10.1.2.3 succeeded"
# IPv6: wait (bounded) for SLAAC to finish duplicate address detection.
for i in $(seq 1 40); do
  ip -6 addr show dev eth0 | grep 'scope global' | grep -qv tentative && break
  sleep 0.25
done
ip -6 addr show dev eth0
ip -6 route
ip -6 addr show dev eth0 | grep -q 'inet6 fd42:6d73:62:0:.*/64 scope global' && ok slaac || bad slaac "no SLAAC address in fd42:6d73:62::/64"
ip -6 route | grep -q '^default via fe80::1' && ok route6 || bad route6 "no default route via fe80::1"
ping -6 -c 1 -W 5 fd42:6d73:62::1 && ok ping6-gateway || bad ping6-gateway "gateway did not answer"
ping -6 -c 2 -W 5 2001:db8::9 && ok ping6-mapped || bad ping6-mapped "mapped ICMPv6 echo failed"
curl -sS --max-time 30 -g -o /tmp/body6 'http://[2001:db8::7]/' && ok http6 || bad http6 "curl rc=$?"
echo "BODY6 crc32=$(crc32 < /tmp/body6) len=$(wc -c < /tmp/body6)"
curl -sS --connect-timeout 4 --max-time 6 -g -o /dev/null 'http://[fd12::1]/' && bad denied6 "curl to [fd12::1] succeeded" || ok denied6
ping -6 -c 1 -W 2 fd12::1 && bad ping6-denied "ping to fd12::1 answered" || ok ping6-denied
exit 0
"#
    )
}

#[test]
fn real_guest_dual_stack_gets_addresses_pings_fetches_mapped_tcp_udp_and_is_denied_private() {
    require_guest_image();
    let marker = unique_marker("nf");
    let body = Arc::new(make_body("netfence guest test body", &marker, BODY_LEN));
    let (http_port, http_requests) = http_server(Arc::clone(&body));
    let udp_content = format!("udp-ok-{marker}");
    let tftp_hits = Arc::new(AtomicUsize::new(0));
    let tftp_port = start_tftp_server(udp_content.clone().into_bytes(), Arc::clone(&tftp_hits));

    let tmp = TempDir::new("netfence-guest-test");
    let script_file = tmp.path().join("guest.sh");
    std::fs::write(&script_file, guest_script(&marker)).expect("write guest script");

    let mut nf = Netfence::spawn(&[
        "--once".to_string(),
        "--map".to_string(),
        format!("203.0.113.7:80=127.0.0.1:{http_port}"),
        "--map".to_string(),
        format!("203.0.113.8:69=127.0.0.1:{tftp_port}"),
        "--map".to_string(),
        format!("[2001:db8::7]:80=127.0.0.1:{http_port}"),
        "--map".to_string(),
        "2001:db8::9=::1".to_string(),
    ]);
    let started = Instant::now();
    let (console, rc) = boot_guest(nf.socket_path(), &script_file);
    let boot_secs = started.elapsed().as_secs_f64();
    // --once: netfence exits when the VMM goes away; give it a moment, then it is killed.
    let _ = nf.wait_exit(Duration::from_secs(10));
    let log = nf.log_text();

    let report = format!(
        "--- guest console ({boot_secs:.1}s, run-guest.sh exit {rc:?}) ---\n{console}\n--- netfence log ---\n{log}\n---"
    );
    println!("{report}");

    assert_checks(
        &console,
        &[
            "dhcp",
            "lease",
            "route",
            "ping",
            "http",
            "marker",
            "udp",
            "denied",
            "slaac",
            "route6",
            "ping6-gateway",
            "ping6-mapped",
            "http6",
            "denied6",
            "ping6-denied",
        ],
        &report,
    );

    for prefix in ["BODY", "BODY6"] {
        let expected = format!("{prefix} crc32={:08x} len={}", crc32(&body), body.len());
        assert!(
            console.lines().any(|l| l.trim() == expected),
            "HTTP body through netfence is not byte-exact: expected `{expected}`\n{report}"
        );
    }
    assert!(
        console.contains(&format!("UDP [{udp_content}]")),
        "TFTP (UDP) reply through netfence differs: expected `{udp_content}`\n{report}"
    );
    assert!(
        http_requests.lock().unwrap().len() >= 2,
        "the loopback HTTP server did not see both fetches (IPv4 and IPv6)\n{report}"
    );
    assert!(
        tftp_hits.load(Ordering::SeqCst) >= 1,
        "the loopback TFTP server saw no request\n{report}"
    );

    let decision = |action: &str, dst: &str| {
        log.lines().any(|l| {
            l.contains("decision") && l.contains(&format!("action={action}")) && l.contains(dst)
        })
    };
    assert!(
        decision("allow", "203.0.113.7:80"),
        "netfence logged no allow decision for 203.0.113.7:80\n{report}"
    );
    assert!(
        decision("allow", "203.0.113.8:69"),
        "netfence logged no allow decision for 203.0.113.8:69 (UDP)\n{report}"
    );
    assert!(
        decision("deny", "10.1.2.3:80"),
        "netfence logged no deny decision for 10.1.2.3:80\n{report}"
    );
    for (action, dst) in [
        ("allow", "[2001:db8::7]:80"),
        ("allow", "[2001:db8::9]:0"),
        ("deny", "[fd12::1]:80"),
        ("deny", "[fd12::1]:0"),
    ] {
        assert!(
            decision(action, dst),
            "netfence logged no {action} decision for {dst}\n{report}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("action=allow") && l.contains("proto=icmpv6")),
        "no ICMPv6 allow decision logged\n{report}"
    );
}

#[test]
fn crc32_matches_the_zlib_value() {
    assert_eq!(crc32(b"abc"), 0x3524_41c2);
    assert_eq!(crc32(b""), 0);
}
