//! The decision point: a denied destination is dropped silently by default, answered with an
//! RST (TCP) or ICMP unreachable (UDP) with `--reject`, and logged either way.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::frames::{self, parse_icmp};
use common::*;

/// netfence with the private destination mapped to a tripwire.
fn netfence_with_tripwire(extra: &[&str]) -> (Netfence, servers::Tripwire) {
    denied::netfence_with_tripwire(extra, PRIVATE_IP.into())
}

#[test]
fn private_destination_dropped_silently() {
    let (nf, trip) = netfence_with_tripwire(&[]);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let d = denied::denied_syn_dropped(&nf, &mut g, gw, GUEST_IP, PRIVATE_IP, 80);
    assert!(
        !d.reason.is_empty(),
        "decision without a reason: {}",
        d.line
    );
    // The gateway still works.
    g.ping(GATEWAY, SHORT).unwrap();
    assert_eq!(trip.hits(), (0, 0), "a denied destination was connected to");
}

#[test]
fn private_destination_rejected_with_rst() {
    let (nf, trip) = netfence_with_tripwire(&["--reject"]);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    denied::denied_syn_rejected(&nf, &mut g, gw, GUEST_IP, PRIVATE_IP, 443);
    assert_eq!(trip.hits(), (0, 0), "a denied destination was connected to");
}

#[test]
fn private_udp_rejected_with_icmp_unreachable() {
    let (nf, trip) = netfence_with_tripwire(&["--reject"]);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let f = frames::udp_frame(g.mac, gw, GUEST_IP, PRIVATE_IP, 40000, 53, b"denied?");
    let reply = g
        .raw_exchange(&f, deadline(SHORT), |f| {
            parse_icmp(f).map(|i| i.msg_type == 3).unwrap_or(false)
        })
        .expect("no ICMP unreachable for a rejected UDP datagram");
    let icmp = parse_icmp(&reply).unwrap();
    assert_eq!(icmp.ip.dst, GUEST_IP);
    assert!(icmp.checksums_ok);
    let q = icmp.quoted.expect("ICMP error quotes the datagram");
    assert_eq!(
        (q.dst, q.proto, q.ports()),
        (IpAddr::from(PRIVATE_IP), 17, Some((40000, 53)))
    );
    assert_eq!(trip.hits(), (0, 0), "a denied destination was sent to");
}

#[test]
fn private_udp_dropped_silently() {
    let (nf, trip) = netfence_with_tripwire(&[]);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let f = frames::udp_frame(g.mac, gw, GUEST_IP, PRIVATE_IP, 40001, 53, b"denied?");
    g.dev.fe.send_frame(&f);
    let got = g.raw_wait(deadline(SILENCE), |f| {
        parse_icmp(f).is_some()
            || frames::parse_udp(f)
                .map(|u| u.src == PRIVATE_IP)
                .unwrap_or(false)
    });
    assert!(
        got.is_none(),
        "denied UDP was answered: {}",
        frames::describe(&got.unwrap())
    );
    let d = nf
        .wait_for_decision(&format!("{PRIVATE_IP}:53"), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "deny", "{}", d.line);
    assert_eq!(trip.hits(), (0, 0), "a denied destination was sent to");
}

/// A public (documentation) destination is allowed by the default policy and logged; an
/// address-only map sends every port of it to the loopback server.
#[test]
fn mapped_public_address_allowed_and_logged() {
    let echo = servers::TcpEchoServer::start();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_up(&nf);
    // Address-only map: any port of 203.0.113.7 goes to the echo server's port.
    let h = g
        .tcp_connect(PUBLIC_IP, 8443, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    g.tcp_send_all(h, b"ping", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 4, deadline(SHORT)).unwrap(), b"ping");
    let d = nf
        .wait_for_decision(&format!("{PUBLIC_IP}:8443"), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
}

/// `--max-connections N`: the (N+1)th concurrent connection is denied (here: rejected, so the
/// guest sees an RST), and a slot frees up when a connection ends.
#[test]
fn max_connections_limit() {
    let echo = servers::TcpEchoServer::start();
    let nf = Netfence::spawn(&[
        "--max-connections".to_string(),
        "2".to_string(),
        "--reject".to_string(),
        "--map".to_string(),
        format!("{PUBLIC_IP}=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_up(&nf);
    let a = g
        .tcp_connect(PUBLIC_IP, 1001, SHORT)
        .unwrap_or_else(|e| panic!("first: {e:?}"));
    let _b = g
        .tcp_connect(PUBLIC_IP, 1002, SHORT)
        .unwrap_or_else(|e| panic!("second: {e:?}"));
    match g.tcp_connect(PUBLIC_IP, 1003, SHORT) {
        Err(ConnectError::Reset { .. }) => {}
        other => panic!("third connection over the limit of 2: {other:?}"),
    }
    let d = nf
        .wait_for_decision(&format!("{PUBLIC_IP}:1003"), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "deny", "{}", d.line);
    // End the first connection cleanly (both FINs), then a new one fits.
    g.tcp_shutdown_write(a);
    let (_, fin) = g.tcp_recv_to_eof(a, deadline(SHORT));
    assert!(fin);
    let ok = g.poll_until(deadline(SHORT), |g| {
        g.tcp_connect(PUBLIC_IP, 1004, Duration::from_millis(500))
            .ok()
    });
    assert!(
        ok.is_some(),
        "no connection slot freed after a connection closed:\n{}",
        nf.log_text()
    );
}

/// Pings beyond the gateway go through an unprivileged ICMP socket when allowed (a "public"
/// documentation address mapped to the host's loopback), are dropped when denied, and with
/// `--reject` are answered with ICMP "communication administratively prohibited".
#[test]
fn icmp_echo_allowed_dropped_and_rejected() {
    let public = Ipv4Addr::new(203, 0, 113, 5);
    let nf = Netfence::spawn(&["--map", "203.0.113.5=127.0.0.1"]);
    let mut g = guest_up(&nf);
    g.ping(public, SHORT)
        .expect("ping to an allowed mapped address is answered");
    let d = nf
        .wait_for_decision(&format!("{public}:0"), SHORT)
        .expect("ICMP decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
    assert!(
        g.ping(PRIVATE_IP, SILENCE).is_err(),
        "ping to a private address was answered"
    );
    let d = nf
        .wait_for_decision(&format!("{PRIVATE_IP}:0"), SHORT)
        .expect("ICMP deny logged");
    assert_eq!(d.action, "deny", "{}", d.line);

    let nf = Netfence::spawn(&["--reject"]);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let ping = frames::icmp_echo_frame(g.mac, gw, GUEST_IP, PRIVATE_IP, 0x4242, 1, b"denied");
    let reply = g
        .raw_exchange(&ping, deadline(SHORT), |f| {
            parse_icmp(f).map(|i| i.msg_type == 3).unwrap_or(false)
        })
        .expect("a rejected ping gets ICMP unreachable");
    let icmp = parse_icmp(&reply).unwrap();
    assert_eq!(icmp.ip.src, GATEWAY);
    assert!(icmp.checksums_ok);
}

/// A documentation address that the namespace test below makes one of the host's own.
const HOST_OWN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);

/// The host's own non-loopback addresses are the `host` group, not `public`: netfence runs in
/// a user and network namespace of the test's own where 192.0.2.50 is an address of `lo` (a
/// service bound to 0.0.0.0 there would answer on it). Under the default policy a guest's SYN
/// to 192.0.2.50:80 is denied as `host` and dropped; had netfence dialled it, the refused
/// connection would have answered the guest with an RST. The vhost-user socket is a filesystem
/// path, so the harness reaches it from outside the namespace.
#[test]
fn host_own_address_is_host_not_public() {
    let setup =
        format!("ip link set lo up && ip addr add {HOST_OWN}/32 dev lo && exec \"$0\" \"$@\"");
    // The namespace has no route to the host's resolvers; an upstream on the namespace's own
    // loopback keeps DNS set-up from failing (nothing answers there, nothing needs to).
    let dir = TempDir::new("netfence-netns-cfg");
    let cfg = dir.path().join("netfence.toml");
    std::fs::write(&cfg, "[dns]\nnameservers = [\"127.0.0.1\"]\n").unwrap();
    let nf = Netfence::builder()
        .arg("--config")
        .arg(cfg.display().to_string())
        .wrapper(&[
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "sh",
            "-c",
            &setup,
        ])
        .spawn();
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let d = denied::denied_syn_dropped(&nf, &mut g, gw, GUEST_IP, HOST_OWN, 80);
    assert_eq!(d.reason, "preset public-only: host blocked", "{}", d.line);
}

/// The counterpart: outside such a namespace 192.0.2.50 is not the host's, so it is public and
/// allowed (mapped to a loopback echo server), which shows the namespace test can fail.
#[test]
fn same_address_elsewhere_is_public() {
    let echo = servers::TcpEchoServer::start();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{HOST_OWN}=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(HOST_OWN, 80, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    g.tcp_send_all(h, b"ping", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 4, deadline(SHORT)).unwrap(), b"ping");
    let d = nf
        .wait_for_decision(&format!("{HOST_OWN}:80"), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
    assert!(d.line.contains("allow@public"), "{}", d.line);
}
