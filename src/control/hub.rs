//! Where the operator's side meets the links: each link (one per queue pair of each VMM
//! connection) has a [`Mailbox`] registered in the process's [`Hub`].
//!
//! The links own their state on their own worker threads and share nothing on the fast path.
//! The control socket, the metrics listener and reload reach them only through the mailbox: a
//! request is posted there and the link's worker is woken through an eventfd it watches; the
//! link answers (a [`LinkSnapshot`]) or applies (new settings) between two service rounds. A
//! requester waits for the answers with a bound, so a busy or wedged link delays `ctl` by at
//! most [`ANSWER_TIMEOUT`], never forever. A link that ends hands its last counters to the hub,
//! so totals survive VMM reconnects.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use crate::device::VringCounts;
use crate::flow::FlowSettings;

/// How long a requester waits for every link to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Distinct (action, reason) pairs kept in totals (each link keeps as many); the rest count as
/// reason "other" (reasons can carry names, and a guest chooses names).
pub use crate::flow::decide::DECISION_REASONS;
/// Flows listed per link in a snapshot (a link holds at most `tcp-flows` + `udp-flows` +
/// `icmp-flows` anyway; this caps what one `ctl flows` answer can carry).
pub const LISTED_FLOWS: usize = 4096;

/// One flow as `ctl flows` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FlowInfo {
    pub vm: u64,
    pub pair: u16,
    /// "tcp", "udp", "icmp", "dns-tcp".
    pub kind: &'static str,
    /// "egress" (the guest's) or "ingress" (a published port's).
    pub direction: &'static str,
    pub src: String,
    pub dst: String,
    pub state: String,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    pub age_secs: f64,
    /// The rule (or reason) that allowed it.
    pub rule: String,
    /// The domain it was allowed for, when a name decided.
    pub domain: Option<String>,
}

/// Cumulative figures of a link, as of the snapshot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkTotals {
    pub frames_from_guest: u64,
    pub frames_to_guest: u64,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    /// Payload bytes carried to and from host sockets (open and closed flows).
    pub flow_bytes_to_host: u64,
    pub flow_bytes_to_guest: u64,
    pub tx_kicks: u64,
    /// Times another event than a kick found TX chains waiting.
    pub tx_found_waiting: u64,
    /// Calls sent late (the guest's request for one arrived after its entries were used).
    pub late_calls: u64,
    pub rx_kicks: u64,
    pub rx_calls: u64,
    pub tx_calls: u64,
}

/// What one link reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkSnapshot {
    pub vm: u64,
    pub pair: u16,
    /// Open flows by kind: tcp, udp, icmp, dns-tcp.
    pub open: BTreeMap<&'static str, u64>,
    /// TCP flows by state (connecting, hello, established, closing, parked...).
    pub tcp_states: BTreeMap<&'static str, u64>,
    /// Drops, refusals and other events by reason.
    pub counters: BTreeMap<&'static str, u64>,
    /// Decisions by (allowed, reason).
    pub decisions: BTreeMap<(bool, String), u64>,
    /// DNS queries by outcome.
    pub dns: BTreeMap<&'static str, u64>,
    pub totals: LinkTotals,
    pub flows: Vec<FlowInfo>,
    /// The RX and TX rings as the device last read them (see [`VringCounts`]).
    pub rings: [Option<crate::device::RingPositions>; 2],
}

impl LinkSnapshot {
    /// Adds `other`'s counts into this one (flows are not kept: they are gone).
    pub fn absorb_counts(&mut self, other: &LinkSnapshot) {
        for (k, v) in &other.counters {
            *self.counters.entry(k).or_default() += v;
        }
        for ((allowed, reason), v) in &other.decisions {
            // Bounded as a link's own counts are: reasons can carry guest-chosen names.
            let key = if self.decisions.len() < DECISION_REASONS
                || self.decisions.contains_key(&(*allowed, reason.clone()))
            {
                (*allowed, reason.clone())
            } else {
                (*allowed, "other".to_string())
            };
            *self.decisions.entry(key).or_default() += v;
        }
        for (k, v) in &other.dns {
            *self.dns.entry(k).or_default() += v;
        }
        let (t, o) = (&mut self.totals, &other.totals);
        t.frames_from_guest += o.frames_from_guest;
        t.frames_to_guest += o.frames_to_guest;
        t.bytes_from_guest += o.bytes_from_guest;
        t.bytes_to_guest += o.bytes_to_guest;
        t.flow_bytes_to_host += o.flow_bytes_to_host;
        t.flow_bytes_to_guest += o.flow_bytes_to_guest;
        t.tx_kicks += o.tx_kicks;
        t.tx_found_waiting += o.tx_found_waiting;
        t.late_calls += o.late_calls;
        t.rx_kicks += o.rx_kicks;
        t.rx_calls += o.rx_calls;
        t.tx_calls += o.tx_calls;
    }
}

/// New settings for a link, from a reload.
pub struct SettingsUpdate {
    pub generation: u64,
    pub flows: Arc<FlowSettings>,
}

#[derive(Default)]
struct MailboxState {
    /// The snapshot generation asked for, and the last one answered with its answer.
    wanted: u64,
    answered: u64,
    answer: Option<LinkSnapshot>,
    /// Settings to apply, and the last generation applied (with how many flows it reset).
    update: Option<Arc<SettingsUpdate>>,
    applied: u64,
    applied_resets: u64,
}

/// One link's mailbox.
pub struct Mailbox {
    wake: EventFd,
    state: Mutex<MailboxState>,
    answered: Condvar,
    /// The device's counts for this pair.
    pub vring: Arc<VringCounts>,
}

impl Mailbox {
    pub fn new(vring: Arc<VringCounts>) -> std::io::Result<Self> {
        Ok(Mailbox {
            wake: EventFd::new(EFD_NONBLOCK)?,
            state: Mutex::new(MailboxState::default()),
            answered: Condvar::new(),
            vring,
        })
    }

    /// The eventfd the link's worker watches.
    pub fn fd(&self) -> std::os::unix::io::RawFd {
        use std::os::unix::io::AsRawFd;
        self.wake.as_raw_fd()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn poke(&self) {
        let _ = self.wake.write(1);
    }

    /// Called by the link when its eventfd fires: what it must do now.
    pub fn take_work(&self) -> LinkWork {
        let _ = self.wake.read();
        let st = self.lock();
        LinkWork {
            snapshot: st.wanted > st.answered,
            update: st
                .update
                .as_ref()
                .filter(|u| u.generation > st.applied)
                .cloned(),
        }
    }

    /// The link's answer to the current snapshot request.
    pub fn answer(&self, snapshot: LinkSnapshot) {
        let mut st = self.lock();
        st.answered = st.wanted;
        st.answer = Some(snapshot);
        self.answered.notify_all();
    }

    /// The link applied settings `generation`, resetting `resets` flows the new policy denies.
    pub fn applied(&self, generation: u64, resets: u64) {
        let mut st = self.lock();
        st.applied = st.applied.max(generation);
        st.applied_resets = resets;
        self.answered.notify_all();
    }

    fn request_snapshot(&self) -> u64 {
        let mut st = self.lock();
        st.wanted += 1;
        let want = st.wanted;
        drop(st);
        self.vring.report_rings.store(true, Ordering::Release);
        self.poke();
        want
    }

    /// Waits until `done` holds of the mailbox's state (the link answered) or `until`;
    /// returns the state then, or `None` on time out.
    fn wait_until(
        &self,
        until: Instant,
        done: impl Fn(&MailboxState) -> bool,
    ) -> Option<std::sync::MutexGuard<'_, MailboxState>> {
        let mut st = self.lock();
        while !done(&st) {
            let now = Instant::now();
            if now >= until {
                return None;
            }
            st = self
                .answered
                .wait_timeout(st, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Some(st)
    }

    fn wait_snapshot(&self, want: u64, until: Instant) -> Option<LinkSnapshot> {
        self.wait_until(until, |st| st.answered >= want)?
            .answer
            .take()
    }

    fn post_update(&self, update: Arc<SettingsUpdate>) {
        self.lock().update = Some(update);
        self.poke();
    }

    fn wait_applied(&self, generation: u64, until: Instant) -> Option<u64> {
        self.wait_until(until, |st| st.applied >= generation)
            .map(|st| st.applied_resets)
    }
}

/// What a link must do when its mailbox fires.
pub struct LinkWork {
    pub snapshot: bool,
    pub update: Option<Arc<SettingsUpdate>>,
}

/// The process-wide registry of links and what outlives them.
pub struct Hub {
    pub started: Instant,
    vmm_connections: AtomicU64,
    links: Mutex<Vec<Weak<Mailbox>>>,
    /// Counts of links that ended.
    retired: Mutex<LinkSnapshot>,
    /// The settings new links start with, and their generation (raised by each reload).
    current: Mutex<(u64, Arc<FlowSettings>)>,
}

/// What [`Hub::snapshot`] gathered.
pub struct Gathered {
    pub links: Vec<LinkSnapshot>,
    /// Links that did not answer in time.
    pub silent: usize,
    /// Counts of links that ended.
    pub retired: LinkSnapshot,
    pub vmm_connections: u64,
    pub uptime: Duration,
    pub settings_generation: u64,
}

impl Hub {
    pub fn new(settings: FlowSettings) -> Arc<Hub> {
        Arc::new(Hub {
            started: Instant::now(),
            vmm_connections: AtomicU64::new(0),
            links: Mutex::new(Vec::new()),
            retired: Mutex::new(LinkSnapshot::default()),
            current: Mutex::new((0, Arc::new(settings))),
        })
    }

    /// A VMM connected: its number (from 1).
    pub fn vmm_connected(&self) -> u64 {
        self.vmm_connections.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The settings a new link starts with.
    pub fn current_settings(&self) -> (u64, Arc<FlowSettings>) {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (cur.0, cur.1.clone())
    }

    /// Registers a link's mailbox (dead ones are forgotten on the way).
    pub fn register(&self, mailbox: &Arc<Mailbox>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|w| w.strong_count() > 0);
        links.push(Arc::downgrade(mailbox));
    }

    /// A link ended: its last counts join the totals.
    pub fn retire(&self, last: &LinkSnapshot) {
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .absorb_counts(last);
    }

    fn live(&self) -> Vec<Arc<Mailbox>> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.iter().filter_map(Weak::upgrade).collect()
    }

    /// Asks every live link for a snapshot and waits up to [`ANSWER_TIMEOUT`] in all.
    pub fn snapshot(&self) -> Gathered {
        let live = self.live();
        let asked: Vec<(Arc<Mailbox>, u64)> = live
            .into_iter()
            .map(|m| {
                let want = m.request_snapshot();
                (m, want)
            })
            .collect();
        let until = Instant::now() + ANSWER_TIMEOUT;
        let mut links = Vec::new();
        let mut silent = 0;
        for (m, want) in asked {
            match m.wait_snapshot(want, until) {
                Some(s) => links.push(s),
                None => silent += 1,
            }
        }
        links.sort_by_key(|s| (s.vm, s.pair));
        Gathered {
            links,
            silent,
            retired: self
                .retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            vmm_connections: self.vmm_connections.load(Ordering::Relaxed),
            uptime: self.started.elapsed(),
            settings_generation: self.current_settings().0,
        }
    }

    /// Makes `settings` current and hands them to every live link; returns the new
    /// generation, how many links applied them in time, how many did not, and how many flows
    /// they reset.
    pub fn install(&self, settings: FlowSettings) -> Installed {
        let update = {
            let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
            cur.0 += 1;
            cur.1 = Arc::new(settings);
            Arc::new(SettingsUpdate {
                generation: cur.0,
                flows: cur.1.clone(),
            })
        };
        let live = self.live();
        for m in &live {
            m.post_update(update.clone());
        }
        let until = Instant::now() + ANSWER_TIMEOUT;
        let mut out = Installed {
            generation: update.generation,
            ..Installed::default()
        };
        for m in &live {
            match m.wait_applied(update.generation, until) {
                Some(resets) => {
                    out.links += 1;
                    out.flows_reset += resets;
                }
                None => out.late += 1,
            }
        }
        out
    }
}

/// What [`Hub::install`] did.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Installed {
    pub generation: u64,
    pub links: usize,
    /// Links that had not applied the settings within the answer timeout (they will).
    pub late: usize,
    pub flows_reset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_keep_a_bounded_number_of_decision_reasons() {
        let mut totals = LinkSnapshot::default();
        for link in 0..10 {
            let mut one = LinkSnapshot::default();
            for i in 0..DECISION_REASONS {
                one.decisions
                    .insert((false, format!("SNI n{link}-{i}.example")), 1);
            }
            totals.absorb_counts(&one);
        }
        assert!(totals.decisions.len() <= DECISION_REASONS + 1);
        let all: u64 = totals.decisions.values().sum();
        assert_eq!(
            all,
            10 * DECISION_REASONS as u64,
            "every decision still counted"
        );
        assert!(totals.decisions.contains_key(&(false, "other".to_string())));
    }
}
