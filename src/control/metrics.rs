//! Prometheus metrics (`run --metrics [ADDR:]PORT`, and `ctl metrics`).
//!
//! At each scrape the links are asked for their counts (`hub::Hub::snapshot`), the counts of
//! links that ended are added, and the whole is encoded with `prometheus-client` in the
//! OpenMetrics text format. Nothing is kept between scrapes: the links own the numbers.
//!
//! The listener is a minimal HTTP/1.1 responder on a thread of its own: one connection at a
//! time, each with read and write timeouts and a bounded request, answering `GET /metrics`
//! (and 404 for any other path). It is for a local scraper: bind it to loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode as encode_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::warn;

use super::hub::{Gathered, Hub};
use super::socket::totals;
use crate::observe::LogGate;

/// How long a scraper may take to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request read.
const MAX_REQUEST: usize = 8 << 10;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn counter_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (l, v) in values {
        family.get_or_create(&l).inc_by(v);
    }
    registry.register(name, help, family);
}

fn gauge_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let family = Family::<Labels, Gauge>::default();
    for (l, v) in values {
        family
            .get_or_create(&l)
            .set(i64::try_from(v).unwrap_or(i64::MAX));
    }
    registry.register(name, help, family);
}

/// The limit a capacity denial names ("limit tcp-flows (1024) reached" -> "tcp-flows").
fn limit_of(reason: &str) -> Option<&str> {
    reason.strip_prefix("limit ")?.split_whitespace().next()
}

/// The metrics of `g` in the OpenMetrics text format.
pub fn encode(g: &Gathered) -> String {
    let all = totals(g);
    let mut r = Registry::with_prefix("netfence");
    let uptime = Gauge::<i64>::default();
    uptime.set(g.uptime.as_secs() as i64);
    r.register("uptime_seconds", "Seconds since netfence started", uptime);
    counter_family(
        &mut r,
        "vmm_connections",
        "VMM connections served",
        [(Vec::new(), g.vmm_connections)],
    );
    gauge_family(
        &mut r,
        "links",
        "Links (queue pairs of connected VMMs) by whether they answered this scrape",
        [
            (labels(&[("answered", "yes")]), g.links.len() as u64),
            (labels(&[("answered", "no")]), g.silent as u64),
        ],
    );
    gauge_family(
        &mut r,
        "settings_generation",
        "Reloads installed since start",
        [(Vec::new(), g.settings_generation)],
    );
    gauge_family(
        &mut r,
        "flows_open",
        "Open flows by kind",
        all.open.iter().map(|(k, v)| (labels(&[("kind", k)]), *v)),
    );
    gauge_family(
        &mut r,
        "tcp_flows",
        "Open TCP flows by state",
        all.tcp_states
            .iter()
            .map(|(k, v)| (labels(&[("state", k)]), *v)),
    );
    counter_family(
        &mut r,
        "decisions",
        "Flow decisions by action and the rule or reason that decided",
        all.decisions.iter().map(|((allowed, reason), v)| {
            let action = if *allowed { "allow" } else { "deny" };
            (labels(&[("action", action), ("reason", reason)]), *v)
        }),
    );
    let mut limit_hits: std::collections::BTreeMap<String, u64> = Default::default();
    for ((_, reason), v) in &all.decisions {
        if let Some(limit) = limit_of(reason) {
            *limit_hits.entry(limit.to_string()).or_default() += v;
        }
    }
    for (reason, v) in &all.counters {
        if let Some(limit) = reason.strip_suffix("-full") {
            *limit_hits.entry(limit.to_string()).or_default() += v;
        }
    }
    counter_family(
        &mut r,
        "limit_hits",
        "Times a bound on guest-driven state was reached, by limit",
        limit_hits
            .iter()
            .map(|(k, v)| (labels(&[("limit", k)]), *v)),
    );
    let t = &all.totals;
    counter_family(
        &mut r,
        "frames",
        "Frames across the virtqueues",
        [
            (labels(&[("direction", "from_guest")]), t.frames_from_guest),
            (labels(&[("direction", "to_guest")]), t.frames_to_guest),
        ],
    );
    counter_family(
        &mut r,
        "frame_bytes",
        "Bytes of frames across the virtqueues",
        [
            (labels(&[("direction", "from_guest")]), t.bytes_from_guest),
            (labels(&[("direction", "to_guest")]), t.bytes_to_guest),
        ],
    );
    counter_family(
        &mut r,
        "flow_bytes",
        "TCP payload bytes carried between the guest and host sockets",
        [
            (labels(&[("direction", "to_host")]), t.flow_bytes_to_host),
            (labels(&[("direction", "to_guest")]), t.flow_bytes_to_guest),
        ],
    );
    counter_family(
        &mut r,
        "events",
        "Drops, refusals and other counted events, by reason",
        all.counters
            .iter()
            .map(|(k, v)| (labels(&[("reason", k)]), *v)),
    );
    counter_family(
        &mut r,
        "dns_queries",
        "Gateway DNS queries by outcome",
        all.dns.iter().map(|(k, v)| (labels(&[("outcome", k)]), *v)),
    );
    let counter = |name: &str| all.counters.get(name).copied().unwrap_or(0);
    counter_family(
        &mut r,
        "tls_handshakes",
        "TLS ClientHellos judged at the SNI gate, by outcome",
        [
            (
                labels(&[("outcome", "intercepted")]),
                counter("tls-intercepted"),
            ),
            (
                labels(&[("outcome", "intercept_failed")]),
                counter("tls-intercept-failed"),
            ),
            (
                labels(&[("outcome", "refused")]),
                counter("tls-hello-refused"),
            ),
        ],
    );
    counter_family(
        &mut r,
        "vring_notifications",
        "Virtqueue notifications: kicks from the guest, calls to it (per queue), TX chains found waiting when something else woke the worker, and calls sent late (asked for at an index already passed)",
        [
            (labels(&[("kind", "tx_kick")]), t.tx_kicks),
            (labels(&[("kind", "tx_found_waiting")]), t.tx_found_waiting),
            (labels(&[("kind", "late_call")]), t.late_calls),
            (labels(&[("kind", "rx_kick")]), t.rx_kicks),
            (labels(&[("kind", "rx_call")]), t.rx_calls),
            (labels(&[("kind", "tx_call")]), t.tx_calls),
        ],
    );
    let mut text = String::new();
    if encode_text(&mut text, &r).is_err() {
        text = "# EOF\n".to_string();
    }
    text
}

/// Binds the metrics listener at `addr`. Serving starts with [`start`], after confinement,
/// so that its thread is confined too.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serves the bound metrics listener on a thread of its own; returns its address.
pub fn start(listener: TcpListener, hub: Arc<Hub>) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("netfence-metrics".to_string())
        .spawn(move || {
            let mut failures = LogGate::new(5, Duration::from_secs(60));
            for conn in listener.incoming() {
                let result = conn.and_then(|stream| respond(stream, &hub));
                if let Err(e) = result {
                    if let Some(suppressed) = failures.admit(Instant::now()) {
                        warn!(error = %e, suppressed, "metrics client failed");
                    }
                    if e.kind() != std::io::ErrorKind::WouldBlock
                        && e.kind() != std::io::ErrorKind::TimedOut
                    {
                        // accept errors like EMFILE repeat at once: do not spin.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(bound)
}

fn respond(mut stream: TcpStream, hub: &Hub) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    // The whole request within CLIENT_TIMEOUT (not each read: a client trickling a byte at a
    // time would hold the listener for hours).
    let until = Instant::now() + CLIENT_TIMEOUT;
    let path = loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request not complete in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break (req.method == Some("GET")).then(|| req.path.unwrap_or("").to_string());
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => break None,
        }
    };
    let (status, kind, body) = match path.as_deref().map(|p| p.split('?').next().unwrap_or(p)) {
        Some("/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode(&hub.snapshot()),
        ),
        Some(_) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        None => (
            "400 Bad Request",
            "text/plain",
            "GET /metrics\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_denials_name_their_limit() {
        assert_eq!(
            limit_of("limit tcp-flows (1024) reached"),
            Some("tcp-flows")
        );
        assert_eq!(limit_of("allow public"), None);
    }
}
