//! Steps of the denied-destination tests that IPv4 (`harness_policy`) and IPv6
//! (`harness_ipv6`) share: netfence with the denied address mapped to a tripwire, a hand-built
//! SYN and the TCP frames that answer it, and the checks of a denied SYN that is dropped (no
//! answer, deny logged, a real client times out in SYN-SENT) or rejected (an RST that ACKs
//! the SYN, deny logged, a real client is reset at once).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::State;

use super::frames::{self, parse_tcp, TcpInfo};
use super::process::DecisionLine;
use super::servers::Tripwire;
use super::{ConnectError, Guest, Netfence, SHORT, SILENCE};

/// The sequence number of the SYNs [`raw_syn`] sends.
pub const RAW_SYN_SEQ: u32 = 0x1000_0000;

/// netfence (with `extra` arguments) with `denied` mapped to a tripwire of its family: a flow
/// the policy wrongly allowed would land on loopback (and be counted), never leave the machine.
pub fn netfence_with_tripwire(extra: &[&str], denied: IpAddr) -> (Netfence, Tripwire) {
    let trip = if denied.is_ipv4() {
        Tripwire::start()
    } else {
        Tripwire::start6()
    };
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.extend(trip.map_args_ip(&[denied]));
    (Netfence::spawn(&args), trip)
}

/// Sends one hand-built SYN from `src` to `dst:port` through the gateway at `gw` and returns
/// the TCP frames of that flow seen within `watch` (stopping early at an RST, which ends the
/// flow).
pub fn raw_syn(
    g: &mut Guest,
    gw: [u8; 6],
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    port: u16,
    watch: Duration,
) -> Vec<TcpInfo> {
    let dst = dst.into();
    let sport = g.next_port();
    let syn = frames::tcp_syn_frame(g.mac, gw, src, dst, sport, port, RAW_SYN_SEQ);
    let end = Instant::now() + watch;
    let mut seen: Vec<TcpInfo> = Vec::new();
    g.dev.fe.send_frame(&syn);
    while let Some(f) = g.raw_wait(end, |f| {
        parse_tcp(f)
            .map(|t| t.src == dst && t.sport == port && t.dport == sport)
            .unwrap_or(false)
    }) {
        let t = parse_tcp(&f).unwrap();
        let rst = t.flags.rst;
        seen.push(t);
        if rst {
            break;
        }
    }
    seen
}

/// Waits for the decision on `dst:port` and checks it is a deny.
fn deny_logged(nf: &Netfence, dst: IpAddr, port: u16) -> DecisionLine {
    let d = nf
        .wait_for_decision(&SocketAddr::new(dst, port).to_string(), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "deny", "{}", d.line);
    d
}

/// A SYN from `src` to `dst:port`, which the policy denies and netfence (without `--reject`)
/// drops: unanswered for [`SILENCE`], logged as a deny, and a real client's retransmissions
/// stay unanswered too. Returns the decision.
pub fn denied_syn_dropped(
    nf: &Netfence,
    g: &mut Guest,
    gw: [u8; 6],
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    port: u16,
) -> DecisionLine {
    let dst = dst.into();
    let seen = raw_syn(g, gw, src, dst, port, SILENCE);
    assert!(seen.is_empty(), "denied SYN was answered: {seen:?}");
    let d = deny_logged(nf, dst, port);
    let r = g.tcp_connect(dst, port, SILENCE);
    assert_eq!(r.err(), Some(ConnectError::Timeout(State::SynSent)));
    d
}

/// A SYN from `src` to `dst:port`, which the policy denies and netfence (with `--reject`)
/// answers with an RST that ACKs it (checksums good), logged as a deny; a real client is reset
/// within a second. Returns the RST.
pub fn denied_syn_rejected(
    nf: &Netfence,
    g: &mut Guest,
    gw: [u8; 6],
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    port: u16,
) -> TcpInfo {
    let dst = dst.into();
    let seen = raw_syn(g, gw, src, dst, port, SHORT);
    let rst = seen
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("no answer to a rejected SYN"));
    assert!(rst.flags.rst, "answer is not an RST: {rst:?}");
    assert!(!rst.flags.syn, "rejected SYN got a SYN: {rst:?}");
    assert!(
        rst.flags.ack && rst.ack == RAW_SYN_SEQ.wrapping_add(1),
        "RST must ACK the SYN: {rst:?}"
    );
    assert!(rst.checksums_ok, "bad checksum on RST: {rst:?}");
    deny_logged(nf, dst, port);
    match g.tcp_connect(dst, port, SHORT) {
        Err(ConnectError::Reset { after }) => assert!(after < Duration::from_secs(1)),
        other => panic!("expected reset, got {other:?}"),
    }
    rst
}
