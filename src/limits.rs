//! Every bound and timeout on state a guest can grow, in one place.
//!
//! The guest is an adversary: every table it can fill (flows, sockets, memos, pending
//! handshakes, fragments, queued frames, log lines) has a named limit here, with a default that
//! keeps one guest from exhausting the host, and every idle thing has a timeout. `netfence run
//! --limit NAME=VALUE` changes one (the names and defaults are listed in `--help`, generated
//! from [`LIMITS`]); tests shrink them to hit them.

use std::fmt::Write as _;
use std::time::Duration;

/// Default of `guest-queue-bytes`.
pub const GUEST_QUEUE_BYTES: usize = 1024 * 1024;

/// The limits of one link. Counts are per link (per guest); times are durations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// TCP flows carried to host sockets at once (connecting, open or closing).
    pub tcp_flows: usize,
    /// TCP flows whose host connect is still in progress (dials before the guest's handshake).
    pub tcp_connecting: usize,
    /// TCP flows waiting for their TLS ClientHello (held before any byte goes upstream).
    pub tls_hellos: usize,
    /// Leaf certificates kept for intercepted TLS, one per server name (least recently used
    /// evicted).
    pub tls_leaf_cache: usize,
    /// Intercepted TLS flows in their handshakes at once (their crypto costs the link's thread).
    pub tls_handshakes: usize,
    /// An intercepted flow whose handshakes (upstream and guest) are not done by then fails.
    pub tls_handshake_timeout: Duration,
    /// Bytes of buffer per direction of one TCP flow (the guest end's window).
    pub tcp_buffer_bytes: usize,
    /// Bytes all TCP flows of the link may hold in each direction together, shared among the
    /// open flows (each gets at least 16 KiB): a flow past its share is not read from the host
    /// (toward the guest) and its new data segments wait (toward the host).
    pub tcp_link_buffer_bytes: usize,
    /// UDP sessions (one host socket each).
    pub udp_flows: usize,
    /// Guest datagrams held in one TX drain's batch before they go out together (per flow, by
    /// `sendmmsg` and UDP GSO); a fuller batch is sent at once and collecting starts again.
    pub udp_batch_datagrams: usize,
    /// Bytes of guest datagrams held in one TX drain's batch (see `udp_batch_datagrams`).
    pub udp_batch_bytes: usize,
    /// Connections from host clients through published TCP ports carried into the guest at
    /// once (they count against `tcp-flows` and `max_connections` too).
    pub inbound_tcp: usize,
    /// Peers talking to the guest through published UDP ports at once (each a session with
    /// the `udp-idle-secs` timeout; they count against `max_connections` too).
    pub inbound_udp: usize,
    /// ICMP echo sessions (one host socket each).
    pub icmp_flows: usize,
    /// DNS-over-TCP connections to the gateway's DNS service.
    pub dns_tcp: usize,
    /// Denied flows remembered (so retransmissions are neither re-judged nor re-logged).
    pub denied_memo: usize,
    /// How long a denied flow is remembered.
    pub denied_memo_time: Duration,
    /// Frames waiting for room in the guest's RX queue.
    pub guest_queue_frames: usize,
    /// Bytes of frames waiting for room in the guest's RX queue (with GUEST_TSO a frame may be
    /// 64 KiB): past it smoltcp keeps its segments and UDP and echo replies are not read.
    pub guest_queue_bytes: usize,
    /// With multiqueue: guest frames one queue pair has handed to another (the owner of their
    /// flow) and that it has not served yet; more are dropped and counted (`handoff-full`).
    pub handoff_frames: usize,
    /// A host connect that has not completed by then fails the guest's connection.
    pub connect_timeout: Duration,
    /// A guest that does not complete its TCP handshake (after the host side is up) by then
    /// loses the flow; the host connection is closed.
    pub handshake_timeout: Duration,
    /// How long a TLS ClientHello may take to arrive after the handshake.
    pub hello_timeout: Duration,
    /// A TCP flow with no byte either way for this long is closed (both sides reset).
    pub tcp_idle: Duration,
    /// A UDP session with no datagram either way for this long is closed.
    pub udp_idle: Duration,
    /// An echo session idle for this long is closed.
    pub icmp_idle: Duration,
    /// A DNS-over-TCP connection idle for this long is closed.
    pub dns_tcp_idle: Duration,
    /// Datagrams being reassembled from fragments at once.
    pub fragment_datagrams: usize,
    /// Bytes of fragments buffered at once.
    pub fragment_bytes: usize,
    /// How long a fragmented datagram may take to complete.
    pub fragment_timeout: Duration,
    /// Interval of unsolicited router advertisements.
    pub ra_interval: Duration,
    /// Decision log lines per second (the rest are counted and summarised).
    pub decision_log_rate: usize,
    /// Bytes of one HTTP request head (request line and fields) on a flow that can carry
    /// secrets; a longer head resets the connection.
    pub http_header_bytes: usize,
    /// Bytes of a Content-Length request body held whole to substitute secrets in it (only
    /// for secrets with `substitute_in` naming `body`); a longer one resets the connection.
    pub secret_body_bytes: usize,
    /// `--pcap`: bytes of frames waiting for the pcap writer thread (the whole process): a
    /// frame that finds the queue full is not recorded (counted as `pcap-queue-full`).
    pub pcap_queue_bytes: usize,
    /// `--audit`: bytes of lines waiting for the audit writer thread (the whole process); a
    /// line that finds the queue full is dropped and counted.
    pub audit_queue_bytes: usize,
    /// `--audit`: denied decisions written per second per queue pair; the rest are counted in
    /// one `decisions-suppressed` line.
    pub audit_deny_rate: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tcp_flows: 1024,
            tcp_connecting: 256,
            tls_hellos: 256,
            tls_leaf_cache: 1024,
            tls_handshakes: 64,
            tls_handshake_timeout: Duration::from_secs(10),
            tcp_buffer_bytes: 512 * 1024,
            tcp_link_buffer_bytes: 64 * 1024 * 1024,
            udp_flows: 1024,
            udp_batch_datagrams: 256,
            udp_batch_bytes: 512 * 1024,
            inbound_tcp: 256,
            inbound_udp: 256,
            icmp_flows: 64,
            dns_tcp: 32,
            denied_memo: 4096,
            denied_memo_time: Duration::from_secs(30),
            guest_queue_frames: 1024,
            guest_queue_bytes: GUEST_QUEUE_BYTES,
            handoff_frames: 512,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            tcp_idle: Duration::from_secs(3600),
            udp_idle: Duration::from_secs(60),
            icmp_idle: Duration::from_secs(30),
            dns_tcp_idle: Duration::from_secs(30),
            fragment_datagrams: 16,
            fragment_bytes: 256 * 1024,
            fragment_timeout: Duration::from_secs(5),
            ra_interval: Duration::from_secs(600),
            decision_log_rate: 50,
            http_header_bytes: 64 * 1024,
            secret_body_bytes: 1024 * 1024,
            pcap_queue_bytes: 16 * 1024 * 1024,
            audit_queue_bytes: 1024 * 1024,
            audit_deny_rate: 100,
        }
    }
}

/// How a limit's value is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Count,
    Bytes,
    /// Written in seconds (fractions allowed: `0.5`).
    Seconds,
}

/// One named limit: its `--limit` name, unit, meaning and place in [`Limits`].
pub struct LimitSpec {
    pub name: &'static str,
    pub unit: Unit,
    pub help: &'static str,
    get: fn(&Limits) -> u64,
    set: fn(&mut Limits, u64),
}

macro_rules! count {
    ($name:literal, $field:ident, $help:literal) => {
        LimitSpec {
            name: $name,
            unit: Unit::Count,
            help: $help,
            get: |l| l.$field as u64,
            set: |l, v| l.$field = v as usize,
        }
    };
}
macro_rules! bytes {
    ($name:literal, $field:ident, $help:literal) => {
        LimitSpec {
            name: $name,
            unit: Unit::Bytes,
            help: $help,
            get: |l| l.$field as u64,
            set: |l, v| l.$field = v as usize,
        }
    };
}
macro_rules! millis {
    ($name:literal, $field:ident, $help:literal) => {
        LimitSpec {
            name: $name,
            unit: Unit::Seconds,
            help: $help,
            get: |l| l.$field.as_millis() as u64,
            set: |l, v| l.$field = Duration::from_millis(v),
        }
    };
}

/// Every limit, in `--help` order.
pub const LIMITS: &[LimitSpec] = &[
    count!("tcp-flows", tcp_flows, "TCP flows carried at once"),
    count!(
        "tcp-connecting",
        tcp_connecting,
        "host connects in progress (dialled at the guest's SYN)"
    ),
    count!(
        "tls-hellos",
        tls_hellos,
        "TCP flows waiting for a TLS ClientHello"
    ),
    count!(
        "tls-leaf-cache",
        tls_leaf_cache,
        "leaf certificates cached for TLS interception (one per name)"
    ),
    count!(
        "tls-handshakes",
        tls_handshakes,
        "intercepted TLS handshakes at once"
    ),
    millis!(
        "tls-handshake-timeout-secs",
        tls_handshake_timeout,
        "intercepted TLS handshake deadline"
    ),
    bytes!(
        "tcp-buffer-bytes",
        tcp_buffer_bytes,
        "buffer per direction of one TCP flow"
    ),
    bytes!(
        "tcp-link-buffer-bytes",
        tcp_link_buffer_bytes,
        "bytes all TCP flows hold per direction, shared among them"
    ),
    count!("udp-flows", udp_flows, "UDP sessions"),
    count!(
        "udp-batch-datagrams",
        udp_batch_datagrams,
        "guest datagrams collected in one TX drain before they are sent"
    ),
    bytes!(
        "udp-batch-bytes",
        udp_batch_bytes,
        "bytes of guest datagrams collected in one TX drain before they are sent"
    ),
    count!(
        "inbound-tcp",
        inbound_tcp,
        "connections through published TCP ports (also in tcp-flows)"
    ),
    count!(
        "inbound-udp",
        inbound_udp,
        "peers of published UDP ports (sessions)"
    ),
    count!("icmp-flows", icmp_flows, "ICMP echo sessions"),
    count!(
        "dns-tcp",
        dns_tcp,
        "DNS-over-TCP connections to the gateway"
    ),
    count!("denied-memo", denied_memo, "denied flows remembered"),
    millis!(
        "denied-memo-secs",
        denied_memo_time,
        "how long a denied flow is remembered"
    ),
    count!(
        "guest-queue-frames",
        guest_queue_frames,
        "frames waiting for the guest's RX buffers"
    ),
    bytes!(
        "guest-queue-bytes",
        guest_queue_bytes,
        "bytes of frames waiting for the guest's RX buffers"
    ),
    count!(
        "handoff-frames",
        handoff_frames,
        "frames handed to another queue pair, per pair (--queues)"
    ),
    millis!(
        "connect-timeout-secs",
        connect_timeout,
        "host connect deadline"
    ),
    millis!(
        "handshake-timeout-secs",
        handshake_timeout,
        "guest TCP handshake deadline once the host side is up"
    ),
    millis!(
        "hello-timeout-secs",
        hello_timeout,
        "TLS ClientHello deadline"
    ),
    millis!("tcp-idle-secs", tcp_idle, "idle TCP flow timeout"),
    millis!("udp-idle-secs", udp_idle, "idle UDP session timeout"),
    millis!("icmp-idle-secs", icmp_idle, "idle echo session timeout"),
    millis!(
        "dns-tcp-idle-secs",
        dns_tcp_idle,
        "idle DNS-over-TCP connection timeout"
    ),
    count!(
        "fragment-datagrams",
        fragment_datagrams,
        "datagrams being reassembled at once"
    ),
    bytes!(
        "fragment-bytes",
        fragment_bytes,
        "bytes of fragments buffered at once"
    ),
    millis!(
        "fragment-timeout-secs",
        fragment_timeout,
        "reassembly deadline per datagram"
    ),
    millis!(
        "ra-interval-secs",
        ra_interval,
        "unsolicited router advertisement interval"
    ),
    count!(
        "decision-log-rate",
        decision_log_rate,
        "decision log lines per second (the rest are summarised)"
    ),
    bytes!(
        "http-header-bytes",
        http_header_bytes,
        "HTTP request head on a flow that can carry secrets, before and after substitution"
    ),
    bytes!(
        "secret-body-bytes",
        secret_body_bytes,
        "request body held to substitute secrets in it; what values add to one body"
    ),
    bytes!(
        "pcap-queue-bytes",
        pcap_queue_bytes,
        "frames waiting for the --pcap writer (process); more are not recorded"
    ),
    bytes!(
        "audit-queue-bytes",
        audit_queue_bytes,
        "lines waiting for the --audit writer (process); more are dropped"
    ),
    count!(
        "audit-deny-rate",
        audit_deny_rate,
        "denied decisions written to --audit per second per queue pair"
    ),
];

impl Limits {
    /// Applies one `NAME=VALUE`. Errors name the limit, the value and what is accepted.
    pub fn apply(&mut self, assignment: &str) -> Result<(), String> {
        let Some((name, value)) = assignment.split_once('=') else {
            return Err(format!(
                "--limit `{assignment}`: expected NAME=VALUE, e.g. tcp-flows=1000; names: {}",
                limit_names()
            ));
        };
        let (name, value) = (name.trim(), value.trim());
        let Some(spec) = LIMITS.iter().find(|s| s.name == name) else {
            return Err(format!(
                "--limit `{name}`: unknown limit; names: {}",
                limit_names()
            ));
        };
        let parsed = match spec.unit {
            Unit::Count | Unit::Bytes => value.parse::<u64>().ok().filter(|v| *v >= 1),
            Unit::Seconds => value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.001 && *v <= 1e9)
                .map(|v| (v * 1000.0).round() as u64),
        };
        let Some(v) = parsed.filter(|v| *v <= (u32::MAX as u64)) else {
            let accepted = match spec.unit {
                Unit::Count | Unit::Bytes => "a whole number from 1 to 4294967295",
                Unit::Seconds => "seconds from 0.001 to 4294967 (fractions allowed)",
            };
            return Err(format!(
                "--limit {name}={value}: not a valid value; expected {accepted}"
            ));
        };
        (spec.set)(self, v);
        Ok(())
    }
}

/// The limit names joined for messages.
pub fn limit_names() -> String {
    LIMITS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// The table of limits with their defaults, for `--help`.
pub fn help_table() -> String {
    let defaults = Limits::default();
    let mut out = String::new();
    for spec in LIMITS {
        let v = (spec.get)(&defaults);
        let value = match spec.unit {
            Unit::Count => v.to_string(),
            Unit::Bytes => v.to_string(),
            Unit::Seconds if v % 1000 == 0 => (v / 1000).to_string(),
            Unit::Seconds => format!("{}", v as f64 / 1000.0),
        };
        let _ = writeln!(out, "  {:<24} {:>8}  {}", spec.name, value, spec.help);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_round_trips_through_its_name() {
        for spec in LIMITS {
            let mut l = Limits::default();
            let text = match spec.unit {
                Unit::Seconds => "2.5".to_string(),
                _ => "7".to_string(),
            };
            l.apply(&format!("{}={text}", spec.name)).unwrap();
            let want = if spec.unit == Unit::Seconds { 2500 } else { 7 };
            assert_eq!((spec.get)(&l), want, "{}", spec.name);
            assert_ne!(l, Limits::default(), "{} changed nothing", spec.name);
        }
        let names: std::collections::HashSet<_> = LIMITS.iter().map(|s| s.name).collect();
        assert_eq!(names.len(), LIMITS.len(), "duplicate limit names");
    }

    #[test]
    fn bad_limits_are_explained() {
        let mut l = Limits::default();
        let e = l.apply("tcp-flows").unwrap_err();
        assert!(e.contains("NAME=VALUE"), "{e}");
        let e = l.apply("nope=3").unwrap_err();
        assert!(
            e.contains("unknown limit") && e.contains("tcp-flows"),
            "{e}"
        );
        let e = l.apply("tcp-flows=0").unwrap_err();
        assert!(e.contains("whole number"), "{e}");
        let e = l.apply("udp-idle-secs=-1").unwrap_err();
        assert!(e.contains("seconds"), "{e}");
        let e = l.apply("udp-idle-secs=nan").unwrap_err();
        assert!(e.contains("udp-idle-secs=nan"), "{e}");
        assert_eq!(l, Limits::default());
    }

    #[test]
    fn help_lists_every_limit_with_its_default() {
        let help = help_table();
        for spec in LIMITS {
            assert!(help.contains(spec.name), "{}", spec.name);
        }
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with("tcp-flows "))
            .expect("a tcp-flows line");
        assert!(line.contains(" 1024 "), "{line}");
    }
}
