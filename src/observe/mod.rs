//! What netfence counts and how it logs without letting a guest flood the log.
//!
//! [`Counters`] count drops and refusals by reason (a `&'static str` such as "bad-checksum"),
//! per layer. [`LogGate`] bounds how many lines one kind of event may write per window: a guest
//! that sends a million bad frames gets a few lines and a count of the rest, never a line per
//! packet. Decisions have their own aggregation (`flow::decide`). The writer itself never
//! blocks the datapath (main.rs installs a non-blocking, lossy writer).
//!
//! Records for operators: [`pcap`] (`--pcap`: every frame between guest and netfence) and
//! [`audit`] (`--audit`: decisions, flow ends and secret violations as JSON lines), written by
//! a thread of their own through a bytes-bounded queue into files that rotate at a size bound
//! ([`writer`]); [`records`] holds their options and starts them.

pub mod audit;
pub mod pcap;
pub mod records;
pub mod writer;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Counts by reason.
#[derive(Default, Debug, Clone)]
pub struct Counters {
    by_reason: BTreeMap<&'static str, u64>,
}

impl Counters {
    /// Counts one event of `reason`.
    pub fn inc(&mut self, reason: &'static str) {
        self.add(reason, 1);
    }

    pub fn add(&mut self, reason: &'static str, n: u64) {
        if n > 0 {
            *self.by_reason.entry(reason).or_default() += n;
        }
    }

    pub fn get(&self, reason: &str) -> u64 {
        self.by_reason.get(reason).copied().unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.by_reason.iter().map(|(k, v)| (*k, *v))
    }
}

/// A budget of log lines per window for one kind of event.
#[derive(Debug, Clone)]
pub struct LogGate {
    lines_per_window: u32,
    window: Duration,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogGate {
    pub const fn new(lines_per_window: u32, window: Duration) -> Self {
        LogGate {
            lines_per_window,
            window,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be written now. `Some(n)`: write it, and say that `n` earlier events
    /// were not logged; `None`: count it silently.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= self.window);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.lines_per_window {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Events not logged since the last admitted line.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_admits_a_budget_per_window_and_reports_the_rest() {
        let mut gate = LogGate::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(gate.admit(t0), Some(0));
        assert_eq!(gate.admit(t0), Some(0));
        assert_eq!(gate.admit(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(gate.admit(t0 + Duration::from_millis(10)), None);
        }
        assert_eq!(gate.suppressed(), 1000);
        assert_eq!(gate.admit(t0 + Duration::from_secs(1)), Some(1000));
        assert_eq!(gate.suppressed(), 0);
    }

    #[test]
    fn counters_count_by_reason() {
        let mut c = Counters::default();
        c.inc("a");
        c.add("a", 2);
        c.add("b", 0);
        assert_eq!(c.get("a"), 3);
        assert_eq!(c.get("b"), 0);
        assert_eq!(c.iter().count(), 1);
    }
}
