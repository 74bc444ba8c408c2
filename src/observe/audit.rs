//! `--audit FILE`: what netfence decided and carried, one JSON object per line, for operators
//! and their log shippers.
//!
//! Three kinds of line (`"event"`), each with `time` (RFC 3339, UTC), `link` (the number of
//! the VMM connection since netfence started, from 1, as `ctl` reports it) and `pair` (its
//! queue pair):
//!
//! - `decision`: a new flow was judged: `direction` (egress: the guest's flow; ingress: a host
//!   client through a published port, `src` the client, `dst` the guest), `protocol`, `src`,
//!   `dst`, `domains` (the names the decision knew the destination by) and `domain_source`
//!   (`dns-cache`: names the guest resolved through netfence; `sni`: the TLS ClientHello's
//!   name; null without names), `action` (`allow` or `deny`), `rule` (the 1-based index of
//!   the rule that decided, as `netfence config` lists them, or null when a default, a limit or
//!   another check did) and `reason` (the decision's reason as the log has it). Every decision
//!   is written except those answered from memory: retransmissions of a denied flow within
//!   `denied-memo-secs` and repeated DNS pairs, which were written the first time.
//! - `close`: a flow ended: the same addresses, `bytes_to_host` and `bytes_to_guest` (payload
//!   bytes: TCP stream bytes, UDP datagram payloads, echo data), `duration_secs` and `why`.
//! - `secret-violation`: a placeholder was bound for a host its secret does not allow: `secret`
//!   (the secret's `env_var`, never its value), `host`, `port`, `action` and `reason`.
//!
//! Bounds. A guest can open denied flows as fast as it can send SYNs, each one a decision
//! nobody remembers. So a queue pair writes at most `audit-deny-rate` denied decisions a second;
//! the rest are counted and reported in one `decisions-suppressed` line (`denied`: how many,
//! `since`: when the first was) when the next second's first denial is written, at housekeeping
//! or when the link closes. Allowed decisions, closes and violations are not rate-limited: each
//! is a flow that held a host socket. Behind that, the writer's queue is bounded in bytes
//! (`audit-queue-bytes`; lines past it are dropped and counted in the writer's log) and the
//! file rotates at `--audit-max-mb` keeping `--audit-files` old files, so neither memory nor
//! disk grows without bound.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::writer::{FileSpec, RecordWriter, RotatingFile, WriterStats};
use crate::policy::{Direction, Protocol};
use crate::secrets::Violation;

/// The window `audit-deny-rate` counts in.
const DENY_WINDOW: Duration = Duration::from_secs(1);

/// The audit file and its writer thread, shared by every link of the process.
pub struct AuditLog {
    writer: RecordWriter,
}

impl AuditLog {
    /// Creates the file (an existing one is rotated away) and starts its writer, with at most
    /// `queue_bytes` of lines waiting for it.
    pub fn create(spec: FileSpec, queue_bytes: usize) -> io::Result<AuditLog> {
        let file = RotatingFile::create(spec, Vec::new())?;
        Ok(AuditLog {
            writer: RecordWriter::start("audit", "audit-queue-bytes", queue_bytes, file)?,
        })
    }

    fn write(&self, line: &impl Serialize) -> bool {
        let Ok(mut bytes) = serde_json::to_vec(line) else {
            return false;
        };
        bytes.push(b'\n');
        self.writer.push(bytes)
    }

    pub fn stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// Writes what is queued and closes the file.
    pub fn finish(&self) {
        self.writer.finish();
    }
}

/// Now, as RFC 3339 in UTC with microseconds.
fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(t: SystemTime) -> String {
    // Fixed width (always six digits of fraction), so that lines sort as text.
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// The rule index at the start of a decision's reason (`rule 3 "allow@public" ...`).
pub fn rule_index(reason: &str) -> Option<usize> {
    let rest = reason.strip_prefix("rule ")?;
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// A decision as the audit writes it.
pub struct DecisionRecord<'a> {
    pub direction: Direction,
    pub protocol: Protocol,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub allowed: bool,
    pub reason: &'a str,
    pub domains: &'a [String],
    /// `dns-cache` or `sni`; `None` when no name was involved.
    pub domain_source: Option<&'static str>,
}

/// A flow that ended.
pub struct CloseRecord<'a> {
    pub direction: Direction,
    pub protocol: Protocol,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    pub duration: Duration,
    pub why: &'a str,
}

#[derive(Serialize)]
struct DecisionLine<'a> {
    time: String,
    event: &'static str,
    link: u64,
    pair: u16,
    direction: &'static str,
    protocol: &'static str,
    src: String,
    dst: String,
    domains: &'a [String],
    domain_source: Option<&'static str>,
    action: &'static str,
    rule: Option<usize>,
    reason: &'a str,
}

#[derive(Serialize)]
struct CloseLine<'a> {
    time: String,
    event: &'static str,
    link: u64,
    pair: u16,
    direction: &'static str,
    protocol: &'static str,
    src: String,
    dst: String,
    bytes_to_host: u64,
    bytes_to_guest: u64,
    duration_secs: f64,
    why: &'a str,
}

#[derive(Serialize)]
struct ViolationLine<'a> {
    time: String,
    event: &'static str,
    link: u64,
    pair: u16,
    protocol: &'static str,
    src: String,
    dst: String,
    secret: &'a str,
    host: &'a str,
    port: u16,
    action: String,
    reason: String,
}

#[derive(Serialize)]
struct SuppressedLine {
    time: String,
    event: &'static str,
    link: u64,
    pair: u16,
    denied: u64,
    since: String,
    limit: &'static str,
}

/// One queue pair of one VMM connection, as the audit names it.
#[derive(Clone)]
pub struct AuditTag {
    log: Arc<AuditLog>,
    pub link: u64,
    pub pair: u16,
}

impl AuditTag {
    pub fn new(log: Arc<AuditLog>, link: u64, pair: u16) -> Self {
        AuditTag { log, link, pair }
    }

    fn decision(&self, d: &DecisionRecord) -> bool {
        self.log.write(&DecisionLine {
            time: now_rfc3339(),
            event: "decision",
            link: self.link,
            pair: self.pair,
            direction: d.direction.name(),
            protocol: d.protocol.name(),
            src: d.src.to_string(),
            dst: d.dst.to_string(),
            domains: d.domains,
            domain_source: d.domain_source,
            action: if d.allowed { "allow" } else { "deny" },
            rule: rule_index(d.reason),
            reason: d.reason,
        })
    }

    /// A flow ended.
    pub fn flow_closed(&self, c: &CloseRecord) -> bool {
        self.log.write(&CloseLine {
            time: now_rfc3339(),
            event: "close",
            link: self.link,
            pair: self.pair,
            direction: c.direction.name(),
            protocol: c.protocol.name(),
            src: c.src.to_string(),
            dst: c.dst.to_string(),
            bytes_to_host: c.bytes_to_host,
            bytes_to_guest: c.bytes_to_guest,
            duration_secs: (c.duration.as_secs_f64() * 1000.0).round() / 1000.0,
            why: c.why,
        })
    }

    /// A secret's placeholder went where it may not (the flow `src` -> `dst` was reset).
    pub fn secret_violation(&self, src: SocketAddr, dst: SocketAddr, v: &Violation) -> bool {
        self.log.write(&ViolationLine {
            time: now_rfc3339(),
            event: "secret-violation",
            link: self.link,
            pair: self.pair,
            protocol: Protocol::Tcp.name(),
            src: src.to_string(),
            dst: dst.to_string(),
            secret: &v.secret,
            host: &v.host,
            port: v.port,
            action: v.action.to_string(),
            reason: v.reason.to_string(),
        })
    }
}

/// The decisions of one queue pair, with the `audit-deny-rate` bound on denials.
pub struct DecisionAudit {
    tag: AuditTag,
    denials_per_window: u64,
    window_start: Option<Instant>,
    denials_in_window: u64,
    /// Denials not written since the last summary, and when the first of them was.
    suppressed: u64,
    suppressed_since: Option<SystemTime>,
}

impl DecisionAudit {
    pub fn new(tag: AuditTag, denials_per_sec: usize) -> Self {
        DecisionAudit {
            tag,
            denials_per_window: denials_per_sec.max(1) as u64,
            window_start: None,
            denials_in_window: 0,
            suppressed: 0,
            suppressed_since: None,
        }
    }

    pub fn tag(&self) -> &AuditTag {
        &self.tag
    }

    /// Writes a decision (a denial only within the rate; see the module comment).
    pub fn decision(&mut self, d: &DecisionRecord, now: Instant) {
        if !d.allowed {
            if self
                .window_start
                .is_none_or(|s| now.duration_since(s) >= DENY_WINDOW)
            {
                self.summarise();
                self.window_start = Some(now);
                self.denials_in_window = 0;
            }
            if self.denials_in_window >= self.denials_per_window {
                if self.suppressed == 0 {
                    self.suppressed_since = Some(SystemTime::now());
                }
                self.suppressed += 1;
                return;
            }
            self.denials_in_window += 1;
        }
        self.tag.decision(d);
    }

    /// Writes the summary of suppressed denials once their window is over (housekeeping).
    pub fn flush(&mut self, now: Instant) {
        if self
            .window_start
            .is_some_and(|s| now.duration_since(s) >= DENY_WINDOW)
        {
            self.summarise();
        }
    }

    fn summarise(&mut self) {
        if self.suppressed == 0 {
            return;
        }
        let since = self.suppressed_since.take().unwrap_or_else(SystemTime::now);
        self.tag.log.write(&SuppressedLine {
            time: now_rfc3339(),
            event: "decisions-suppressed",
            link: self.tag.link,
            pair: self.tag.pair,
            denied: std::mem::take(&mut self.suppressed),
            since: rfc3339(since),
            limit: "audit-deny-rate",
        });
    }
}

impl Drop for DecisionAudit {
    fn drop(&mut self) {
        self.summarise();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> FileSpec {
        let dir =
            std::env::temp_dir().join(format!("netfence-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        FileSpec {
            path: dir.join("audit.jsonl"),
            max_bytes: 1 << 20,
            keep: 1,
        }
    }

    fn lines(spec: &FileSpec) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&spec.path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn denial(port: u16) -> (SocketAddr, SocketAddr) {
        (
            "172.16.0.2:40000".parse().unwrap(),
            SocketAddr::from(([10, 1, 2, 3], port)),
        )
    }

    #[test]
    fn rule_indexes_are_read_from_reasons() {
        assert_eq!(
            rule_index("rule 3 \"allow@public\" (preset public-only)"),
            Some(3)
        );
        assert_eq!(rule_index("rule 12 \"deny@x\"; intercepted"), Some(12));
        assert_eq!(rule_index("limit tcp-flows (4) reached"), None);
        assert_eq!(rule_index("rule x"), None);
    }

    #[test]
    fn times_are_rfc3339_utc_with_microseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123456Z");
        let whole = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_920_000);
        assert_eq!(rfc3339(whole), "2023-11-14T22:13:20.920000Z");
    }

    #[test]
    fn denials_past_the_rate_are_summarised_and_allows_are_not_limited() {
        let spec = scratch("rate");
        let log = Arc::new(AuditLog::create(spec.clone(), 1 << 20).unwrap());
        let tag = AuditTag::new(log.clone(), 1, 0);
        let mut audit = DecisionAudit::new(tag, 3);
        let t0 = Instant::now();
        let names = ["example.com".to_string()];
        for port in 0..10u16 {
            let (src, dst) = denial(port);
            for allowed in [false, true] {
                audit.decision(
                    &DecisionRecord {
                        direction: Direction::Egress,
                        protocol: Protocol::Tcp,
                        src,
                        dst,
                        allowed,
                        reason: if allowed {
                            "rule 2 \"allow@*\""
                        } else {
                            "preset default"
                        },
                        domains: &names,
                        domain_source: Some("dns-cache"),
                    },
                    t0,
                );
            }
        }
        audit.flush(t0 + DENY_WINDOW);
        drop(audit);
        log.finish();
        let lines = lines(&spec);
        let count = |action: &str| {
            lines
                .iter()
                .filter(|l| l["event"] == "decision" && l["action"] == action)
                .count()
        };
        assert_eq!(count("allow"), 10);
        assert_eq!(count("deny"), 3);
        let summary: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == "decisions-suppressed")
            .collect();
        assert_eq!(summary.len(), 1, "{lines:?}");
        assert_eq!(summary[0]["denied"], 7);
        let allow = lines.iter().find(|l| l["action"] == "allow").unwrap();
        assert_eq!(allow["link"], 1);
        assert_eq!(allow["rule"], 2);
        assert_eq!(allow["domains"][0], "example.com");
        assert_eq!(allow["domain_source"], "dns-cache");
        assert_eq!(allow["dst"], "10.1.2.3:0");
        let deny = lines.iter().find(|l| l["action"] == "deny").unwrap();
        assert!(deny["rule"].is_null());
        let _ = std::fs::remove_dir_all(spec.path.parent().unwrap());
    }
}
