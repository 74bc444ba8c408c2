//! What the operator sees of a link's flows and what a reload does to them.
//!
//! [`Flows::report`] fills a link's part of a `ctl status`/`flows`/metrics answer: open flows
//! by kind and state, counters, decisions, DNS outcomes and each flow's line. Both run on the
//! link's worker, between service rounds, when the control hub asks (see `control::hub`).
//!
//! [`Flows::apply_settings`] installs reloaded settings: new flows follow the new policy at
//! once (the denied memo, judged under the old one, is forgotten), and every open flow is
//! judged again as its first packet was: with the names it was allowed for (the ClientHello's
//! name for a TLS flow, else the DNS cache's names for its address). A flow the new policy
//! denies is reset both ways (TCP) or closed (UDP, ICMP), with one log line naming the rule;
//! the others keep flowing untouched. A connection through a published port is judged again
//! by the ingress rules on its client's address (UDP clients of published ports are not: their
//! sessions end on their own idle timeout).

use std::net::SocketAddr;
use std::time::Instant;

use smoltcp::socket::tcp as stcp;
use tracing::info;

use super::tcp::{GuestEnd, Middle};
use super::{FlowKey, FlowSettings, Flows};
use crate::control::hub::{FlowInfo, LinkSnapshot, LISTED_FLOWS};
use crate::dns::cache::CachedNames;
use crate::observe::LogGate;
use crate::policy::Protocol;
use crate::stack::GuestStack;

/// Log lines naming flows a reload reset, per reload (the rest are counted in the summary).
const RESET_LINES: u32 = 20;

fn tcp_state_name(state: stcp::State) -> &'static str {
    match state {
        stcp::State::Closed => "closed",
        stcp::State::Listen => "listen",
        stcp::State::SynSent => "syn-sent",
        stcp::State::SynReceived => "syn-received",
        stcp::State::Established => "established",
        stcp::State::FinWait1 => "fin-wait-1",
        stcp::State::FinWait2 => "fin-wait-2",
        stcp::State::CloseWait => "close-wait",
        stcp::State::Closing => "closing",
        stcp::State::LastAck => "last-ack",
        stcp::State::TimeWait => "time-wait",
    }
}

impl Flows {
    /// This link's part of a report into `snap`; with `with_flows`, one line per flow (at
    /// most [`LISTED_FLOWS`]).
    pub fn report(
        &self,
        stack: &GuestStack,
        with_flows: bool,
        snap: &mut LinkSnapshot,
        now: Instant,
    ) {
        let (tcp, udp, echo, dns_tcp) = self.counts();
        snap.open.insert("tcp", tcp as u64);
        snap.open.insert("udp", udp as u64);
        snap.open.insert("icmp", echo as u64);
        snap.open.insert("dns-tcp", dns_tcp as u64);
        for (reason, n) in self.counters.iter() {
            *snap.counters.entry(reason).or_default() += n;
        }
        *snap.counters.entry("denied-memo-hits").or_default() += self.denied_memo_hits();
        for ((allowed, reason), n) in &self.decider.log.counts {
            *snap
                .decisions
                .entry((*allowed, reason.clone()))
                .or_default() += n;
        }
        let dns = self.dns.service.stats();
        for (outcome, n) in [
            ("queries", dns.queries),
            ("forwarded", dns.forwarded),
            ("answered-locally", dns.answered_locally),
            ("blocked", dns.blocked),
            ("rebind-blocked", dns.rebind_blocked),
            ("malformed", dns.malformed),
            ("unsupported", dns.unsupported),
            ("dropped-over-limit", dns.dropped_over_limit),
            ("upstream-timeouts", dns.timeouts),
            ("servfail", dns.servfail),
            ("answers", dns.answers),
            ("truncated", dns.truncated),
        ] {
            *snap.dns.entry(outcome).or_default() += n;
        }
        let closed = self.table.closed;
        let mut to_host = closed.tcp_bytes_to_host;
        let mut to_guest = closed.tcp_bytes_to_guest;
        let mut listed = 0usize;
        for (key, flow) in &self.table.tcp {
            to_host += flow.bytes_to_host;
            to_guest += flow.bytes_to_guest;
            let state = match (&flow.guest_end, &flow.middle) {
                (GuestEnd::Held { .. }, _) => "connecting",
                (_, Some(Middle::Gate(_))) => "awaiting-hello",
                _ if flow.is_parked() => "established",
                _ => flow
                    .socket(stack)
                    .map_or("closed", |s| tcp_state_name(s.state())),
            };
            *snap.tcp_states.entry(state).or_default() += 1;
            if with_flows && listed < LISTED_FLOWS {
                listed += 1;
                let (src, dst) = if flow.inbound {
                    (flow.host.target, flow.guest)
                } else {
                    *key
                };
                snap.flows.push(FlowInfo {
                    vm: snap.vm,
                    pair: snap.pair,
                    kind: "tcp",
                    direction: if flow.inbound { "ingress" } else { "egress" },
                    src: src.to_string(),
                    dst: dst.to_string(),
                    state: if flow.is_parked() {
                        "established (resting)".to_string()
                    } else {
                        state.to_string()
                    },
                    bytes_to_host: flow.bytes_to_host,
                    bytes_to_guest: flow.bytes_to_guest,
                    age_secs: now.duration_since(flow.started).as_secs_f64(),
                    rule: flow.rule.clone(),
                    domain: flow.domain.clone(),
                });
            }
        }
        snap.totals.flow_bytes_to_host += to_host;
        snap.totals.flow_bytes_to_guest += to_guest;
        if !with_flows {
            return;
        }
        let udp = self.table.udp.iter().map(|(key, flow)| {
            (
                "udp",
                key.0.to_string(),
                key.1.to_string(),
                format!(
                    "{} datagrams out, {} in",
                    flow.datagrams_to_host, flow.datagrams_to_guest
                ),
                (flow.bytes_to_host, flow.bytes_to_guest, flow.started),
                &flow.rule,
            )
        });
        let echo = self.table.echo.values().map(|flow| {
            (
                "icmp",
                flow.guest.to_string(),
                flow.dst.to_string(),
                format!("echo id {}", flow.ident),
                (flow.bytes_to_host, flow.bytes_to_guest, flow.started),
                &flow.rule,
            )
        });
        let room = LISTED_FLOWS.saturating_sub(listed);
        for (kind, src, dst, state, (to_host, to_guest, started), rule) in
            udp.chain(echo).take(room)
        {
            snap.flows.push(FlowInfo {
                vm: snap.vm,
                pair: snap.pair,
                kind,
                direction: "egress",
                src,
                dst,
                state,
                bytes_to_host: to_host,
                bytes_to_guest: to_guest,
                age_secs: now.duration_since(started).as_secs_f64(),
                rule: rule.clone(),
                domain: None,
            });
        }
    }

    /// Installs reloaded settings and judges every open egress flow again; returns how many
    /// flows the new policy denied (and were reset or closed).
    pub fn apply_settings(&mut self, settings: FlowSettings, stack: &mut GuestStack) -> u64 {
        let now = Instant::now();
        self.decider.set_policy(settings.policy.clone());
        self.settings.policy = settings.policy;
        self.settings.addrmap = settings.addrmap;
        self.settings.secrets = settings.secrets;
        let mut gate = LogGate::new(RESET_LINES, std::time::Duration::from_secs(3600));
        let mut denied: Vec<(FlowKey, String)> = Vec::new();
        for (key, flow) in &self.table.tcp {
            let verdict = match &flow.domain {
                _ if flow.inbound => self.decider.judge_ingress_open(
                    Protocol::Tcp,
                    flow.host.target,
                    flow.guest.port(),
                ),
                Some(name) => self.sni_verdict(key.1, name, now),
                None => self.judge_open(Protocol::Tcp, key.1, now),
            };
            if let Err(rule) = verdict {
                denied.push((*key, rule));
            }
        }
        let resets = denied.len() as u64;
        for (key, rule) in denied {
            if let Some(suppressed) = gate.admit(now) {
                info!(src = %key.0, dst = %key.1, rule = %rule, suppressed,
                    "TCP flow reset: the reloaded policy denies it");
            }
            self.abort_tcp(
                &key,
                "denied by the reloaded policy",
                "tcp-reset-by-reload",
                stack,
            );
        }
        let udp_denied: Vec<(FlowKey, String)> = self
            .table
            .udp
            .keys()
            .filter_map(|key| {
                self.judge_open(Protocol::Udp, key.1, now)
                    .err()
                    .map(|rule| (*key, rule))
            })
            .collect();
        for (key, rule) in &udp_denied {
            if let Some(suppressed) = gate.admit(now) {
                info!(src = %key.0, dst = %key.1, rule = %rule, suppressed,
                    "UDP flow closed: the reloaded policy denies it");
            }
            self.table
                .remove_udp_because(key, "denied by the reloaded policy");
            self.counters.inc("udp-closed-by-reload");
        }
        let echo_denied: Vec<_> = self
            .table
            .echo
            .iter()
            .filter_map(|(key, flow)| {
                let protocol = match flow.dst {
                    std::net::IpAddr::V4(_) => Protocol::Icmpv4,
                    std::net::IpAddr::V6(_) => Protocol::Icmpv6,
                };
                self.judge_open(protocol, SocketAddr::new(flow.dst, 0), now)
                    .err()
                    .map(|rule| (*key, rule))
            })
            .collect();
        for (key, _) in &echo_denied {
            self.table
                .remove_echo_because(key, "denied by the reloaded policy");
            self.counters.inc("icmp-closed-by-reload");
        }
        let total = resets + udp_denied.len() as u64 + echo_denied.len() as u64;
        info!(
            tcp_reset = resets,
            udp_closed = udp_denied.len(),
            icmp_closed = echo_denied.len(),
            not_logged = gate.suppressed(),
            "reloaded policy applied to the open flows"
        );
        total
    }

    /// The open flow to `dst` judged by the policy in force, with the names the DNS cache has
    /// for its address.
    fn judge_open(
        &self,
        protocol: Protocol,
        dst: SocketAddr,
        now: Instant,
    ) -> Result<String, String> {
        let names: CachedNames = self.names_for(dst.ip(), now);
        self.decider.judge_open(protocol, dst, &names)
    }
}
