//! dpdk-testpmd as the VMM: netfence served by a vhost-user frontend it was not written beside.
//!
//! testpmd's txonly engine sends 64-byte UDP frames as fast as it can, from the guest's address
//! (172.16.0.2, so source validation has nothing to drop) to 198.18.0.2:9. netfence runs with
//! one allow rule for exactly that destination, default deny for every other one, and a `--map`
//! of it to a loopback sink the test owns; before any traffic, `netfence check` must confirm
//! the map and the deny, since an allowed unmapped destination would be a real send.
//!
//! Leaving mid-traffic is done the way `timeout N dpdk-testpmd ...` does it (SIGTERM: testpmd
//! stops its rings with GET_VRING_BASE while its TX ring is full, then closes the socket) and
//! the way a crashing VMM does (SIGKILL: the socket just closes), but only once the sink has
//! seen traffic, so every round really leaves mid-traffic. The race behind issue 9's wedge
//! does not fire every time, so there are several rounds.
//!
//! The tests run one at a time (a lock in this file): testpmd's poll loop takes a whole CPU
//! of the two these machines have. Hugepages: scripts/hugepages.sh (run by install-deps.sh).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::dpdk::*;
use common::*;

/// Where testpmd's frames go, as the guest sees it.
const SINK_DST: &str = "198.18.0.2:9";
/// How long testpmd may take from spawn to traffic reaching the sink (EAL start, hugepages,
/// vhost-user handshake); about a second on an idle machine.
const TESTPMD_START: Duration = Duration::from_secs(30);
/// Datagrams the sink must have seen before testpmd is made to leave ("mid-traffic").
const TRAFFIC_BEFORE_LEAVING: u64 = 2000;
/// How long testpmd may take to exit after its signal.
const TESTPMD_EXIT: Duration = Duration::from_secs(10);
/// How long netfence may take to log "VMM disconnected" (or, with --once, to exit) after
/// testpmd left.
const RELEASE_DEADLINE: Duration = Duration::from_secs(10);
/// What netfence may log in one round (start, decision, disconnect: well under 2 KiB today).
const ROUND_LOG_BUDGET: usize = 256 * 1024;
/// How long an idle netfence is watched after the last round, and what it may use meanwhile.
/// How long a netfence that ran over its log budget is watched for its CPU figure.
const SPIN_WATCH: Duration = Duration::from_millis(500);
const IDLE_WINDOW: Duration = Duration::from_secs(2);
const IDLE_MAX_CORES: f64 = 0.25;
const IDLE_LOG_BUDGET: usize = 4 * 1024;
/// How long the harness frontend after testpmd may take to get its lease.
const NEXT_FRONTEND_DEADLINE: Duration = Duration::from_secs(20);

/// How testpmd leaves.
#[derive(Clone, Copy, Debug)]
enum Leave {
    /// SIGTERM, as `timeout N` sends it: testpmd stops its port (GET_VRING_BASE on rings the
    /// backend is still draining) and exits.
    Term,
    /// SIGKILL: the VMM crashed; the socket closes with the rings running.
    Kill,
}

impl Leave {
    fn signal(self) -> i32 {
        match self {
            Leave::Term => libc::SIGTERM,
            Leave::Kill => libc::SIGKILL,
        }
    }
}

/// Rounds of leaving mid-traffic. On main before the issue 9 fix, one of the first three
/// SIGTERM rounds wedged the link in each of 12 runs (the SIGKILL rounds never did); a round
/// takes well under a second when nothing wedges.
const LEAVES: [Leave; 8] = [
    Leave::Term,
    Leave::Kill,
    Leave::Term,
    Leave::Term,
    Leave::Term,
    Leave::Kill,
    Leave::Term,
    Leave::Term,
];

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// netfence's policy and map: UDP to [`SINK_DST`] allowed and sent to the sink, everything else
/// denied.
fn policy_args(sink: &UdpSink) -> Vec<String> {
    vec![
        "--net-rule".into(),
        "allow@198.18.0.2:udp:9".into(),
        "--net-default-egress".into(),
        "deny".into(),
        "--map".into(),
        format!("{SINK_DST}=127.0.0.1:{}", sink.port()),
    ]
}

/// `netfence check` with the test's policy: the sink destination is allowed and mapped to the
/// sink; testpmd's other possible destinations are denied. Panics otherwise, before any
/// traffic is sent.
fn assert_only_the_sink_is_reachable(args: &[String], sink: &UdpSink) {
    let check = |proto: &str, dst: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_netfence"))
            .args(["check", "egress", proto, dst])
            .args(args)
            .output()
            .expect("run netfence check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, text) = check("udp", SINK_DST);
    let mapped = format!("host side (map): 127.0.0.1:{}", sink.port());
    assert!(
        code == Some(0) && text.contains(&mapped),
        "netfence check must allow {SINK_DST} and map it to the sink ({mapped}):\n{text}"
    );
    for (proto, dst) in [
        ("udp", "198.18.0.1:9"),
        ("udp", "198.18.0.2:10"),
        ("tcp", SINK_DST),
        ("udp", "203.0.113.7:9"),
    ] {
        let (code, text) = check(proto, dst);
        assert_eq!(
            code,
            Some(1),
            "netfence check must deny {proto} {dst}:\n{text}"
        );
    }
}

/// One flow, one decision: nothing but the sink's destination was tried.
fn assert_only_sink_decisions(nf: &Netfence) {
    let others: Vec<String> = nf
        .decisions()
        .into_iter()
        .filter(|d| d.dst != SINK_DST || d.action != "allow")
        .map(|d| d.line)
        .collect();
    assert!(others.is_empty(), "other decisions: {others:#?}");
}

/// A sink and a netfence whose only reachable destination is that sink.
fn netfence_with_sink(extra: &[&str]) -> (UdpSink, Netfence) {
    let sink = UdpSink::start();
    let mut args = policy_args(&sink);
    assert_only_the_sink_is_reachable(&args, &sink);
    args.extend(extra.iter().map(|s| s.to_string()));
    let nf = Netfence::spawn(&args);
    (sink, nf)
}

/// testpmd's txonly arguments: 64-byte frames from the guest (address and MAC) to the
/// gateway's MAC and [`SINK_DST`].
fn txonly_args() -> Vec<String> {
    vec![
        "--txpkts=64".into(),
        format!("--tx-ip={GUEST_IP},198.18.0.2"),
        "--tx-udp=9,9".into(),
        format!("--eth-peer=0,{GATEWAY_MAC}"),
    ]
}

/// Starts testpmd in txonly mode on `nf` and returns once `at_least` more datagrams reached the
/// sink. A testpmd that exits or sends nothing fails the test (its output is printed).
fn start_sending(nf: &Netfence, sink: &UdpSink, name: &str, at_least: u64) -> Testpmd {
    let before = sink.count().datagrams;
    let mut tp = Testpmd::spawn(nf.socket_path(), name, "txonly", &txonly_args());
    let started = Instant::now();
    let r = sink.wait_until(
        started + TESTPMD_START,
        |c| c.datagrams >= before + at_least,
        || tp.failure().is_some(),
    );
    if let Err(c) = r {
        let how = tp
            .failure()
            .unwrap_or_else(|| format!("still running after {TESTPMD_START:?}"));
        panic!(
            "{name}: the sink saw {} of {at_least} datagrams from dpdk-testpmd: {how}",
            c.datagrams - before
        );
    }
    eprintln!(
        "{name}: {} datagrams at the sink {:?} after spawning dpdk-testpmd",
        sink.count().datagrams - before,
        started.elapsed()
    );
    tp
}

/// Makes testpmd leave the way `how` says and waits for it to be gone; netfence's CPU use is
/// measured from the signal on.
fn leave(nf: &Netfence, mut tp: Testpmd, how: Leave, what: &str) -> CpuWatch {
    let cpu = CpuWatch::start(nf.pid().expect("netfence pid"));
    tp.signal(how.signal());
    if tp.wait_exit(TESTPMD_EXIT).is_none() {
        panic!(
            "{what}: dpdk-testpmd still running {TESTPMD_EXIT:?} after {how:?} (stuck in a \
             vhost-user request netfence does not answer?)"
        );
    }
    cpu
}

/// What netfence did from the moment testpmd was told to leave until the test stopped waiting.
struct Release {
    /// The line that ended the wait ("VMM disconnected"), if any.
    line: Option<String>,
    /// The round logged more than [`ROUND_LOG_BUDGET`] before that line came.
    over_budget: bool,
    log_bytes: usize,
    cores: Option<f64>,
    waited: Duration,
}

impl std::fmt::Display for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cores = self
            .cores
            .map(|c| format!("{:.0}% of a CPU", c * 100.0))
            .unwrap_or_else(|| "? CPU (process gone)".into());
        write!(
            f,
            "in the {:?} after testpmd was told to leave, netfence used {cores} and the round \
             logged {} bytes{}",
            self.waited,
            self.log_bytes,
            if self.over_budget {
                format!(" (over the budget of {ROUND_LOG_BUDGET})")
            } else {
                String::new()
            }
        )
    }
}

/// Waits (up to [`RELEASE_DEADLINE`]) for a log line from `mark` on that satisfies `until`, or
/// for the log to end (netfence exited), counting log bytes and giving up early once the round
/// has logged more than [`ROUND_LOG_BUDGET`] (a spinning worker logs megabytes per second).
/// `cpu` was started when testpmd was told to leave; when the wait ends over budget, netfence
/// is watched [`SPIN_WATCH`] longer so that its CPU figure means something.
fn watch_release(
    nf: &Netfence,
    mark: usize,
    cpu: CpuWatch,
    until: impl Fn(&str) -> bool,
) -> Release {
    let mut log_bytes = 0;
    let line = nf.wait_for_line(mark, RELEASE_DEADLINE, |l| {
        log_bytes += l.len() + 1;
        until(l) || log_bytes > ROUND_LOG_BUDGET
    });
    let line = line.filter(|l| until(l));
    let over_budget = line.is_none() && log_bytes > ROUND_LOG_BUDGET;
    if over_budget && cpu.elapsed() < SPIN_WATCH {
        // An observation window on the failure path only.
        let _ = nf.wait_for_line(usize::MAX, SPIN_WATCH - cpu.elapsed(), |_| false);
    }
    Release {
        line,
        over_budget,
        log_bytes,
        cores: cpu.cores(),
        waited: cpu.elapsed(),
    }
}

/// netfence idles: little CPU and no log lines over [`IDLE_WINDOW`].
fn assert_idle(nf: &Netfence, after: &str) {
    let cpu = CpuWatch::start(nf.pid().expect("netfence pid"));
    let mark = nf.log_mark();
    let mut log_bytes = 0;
    // An observation window, not a synchronisation: nothing should happen in it.
    let _ = nf.wait_for_line(mark, IDLE_WINDOW, |l| {
        log_bytes += l.len() + 1;
        false
    });
    let cores = cpu.cores().unwrap_or(f64::NAN);
    eprintln!(
        "after {after}: netfence used {:.1}% of a CPU and logged {log_bytes} bytes in {:?}",
        cores * 100.0,
        cpu.elapsed()
    );
    assert!(
        cores <= IDLE_MAX_CORES,
        "after {after}: idle netfence used {:.0}% of a CPU over {:?} (a worker still spinning?)",
        cores * 100.0,
        cpu.elapsed()
    );
    assert!(
        log_bytes <= IDLE_LOG_BUDGET,
        "after {after}: idle netfence logged {log_bytes} bytes in {:?}",
        cpu.elapsed()
    );
}

#[test]
fn testpmd_txonly_reaches_the_mapped_sink() {
    let _serial = one_at_a_time();
    let (sink, nf) = netfence_with_sink(&[]);
    let tp = start_sending(&nf, &sink, "txonly", 1000);

    let c = sink.count();
    let (from, payload) = c.first.clone().expect("a first datagram");
    // 64-byte frames: 14 Ethernet + 20 IPv4 + 8 UDP header bytes, 22 bytes of payload.
    assert_eq!(payload.len(), 22, "payload of testpmd's 64-byte frames");
    assert!(from.ip().is_loopback(), "datagram from {from}");

    let d = nf
        .wait_for_decision(SINK_DST, SHORT)
        .unwrap_or_else(|| panic!("no decision logged for {SINK_DST}"));
    assert_eq!(d.action, "allow", "{}", d.line);
    assert_eq!(
        field_of(&d.line, "src").as_deref(),
        Some(format!("{GUEST_IP}:9").as_str()),
        "{}",
        d.line
    );
    assert_only_sink_decisions(&nf);
    drop(tp);
    eprintln!("sink total: {} datagrams", sink.count().datagrams);
}

#[test]
fn testpmd_leaving_mid_traffic_does_not_wedge_the_link() {
    let _serial = one_at_a_time();
    let (sink, mut nf) = netfence_with_sink(&[]);
    for (round, how) in LEAVES.into_iter().enumerate() {
        let what = format!("round {round} ({how:?})");
        let mark = nf.log_mark();
        let tp = start_sending(&nf, &sink, &format!("leave{round}"), TRAFFIC_BEFORE_LEAVING);
        let cpu = leave(&nf, tp, how, &what);

        let r = watch_release(&nf, mark, cpu, |l| l.contains("VMM disconnected"));
        eprintln!("{what}: {r}");
        assert!(
            r.line.is_some(),
            "{what}: no `VMM disconnected` after dpdk-testpmd left mid-traffic: the link is \
             wedged; {r}"
        );
        assert!(
            r.log_bytes <= ROUND_LOG_BUDGET,
            "{what}: netfence logged {} bytes in one round",
            r.log_bytes
        );
        nf.assert_running(&what);

        // The next VMM is served: the harness frontend gets a lease and a gateway ping.
        let mark = nf.log_mark();
        let lease = lease_within(nf.socket_path(), NEXT_FRONTEND_DEADLINE)
            .unwrap_or_else(|e| panic!("{what}: the next frontend was not served: {e}"));
        assert_eq!(lease, format!("{GUEST_IP}/30"), "{what}");
        // It left too (cleanly); wait for netfence to see that before the next round.
        nf.wait_for_log_after(mark, "VMM disconnected", RELEASE_DEADLINE)
            .unwrap_or_else(|| panic!("{what}: harness frontend's disconnect not logged"));
    }
    assert_idle(&nf, "the last round");
}

#[test]
fn testpmd_leaving_mid_traffic_lets_once_exit() {
    let _serial = one_at_a_time();
    for (round, how) in LEAVES.into_iter().enumerate() {
        let what = format!("--once round {round} ({how:?})");
        let (sink, mut nf) = netfence_with_sink(&["--once"]);
        let tp = start_sending(&nf, &sink, &format!("once{round}"), TRAFFIC_BEFORE_LEAVING);
        let cpu = leave(&nf, tp, how, &what);

        // Nothing ends the wait but the log closing (netfence exited) or the budget.
        let r = watch_release(&nf, 0, cpu, |_| false);
        let status = if r.log_bytes <= ROUND_LOG_BUDGET {
            nf.wait_exit(SHORT)
        } else {
            None
        };
        eprintln!("{what}: {r}");
        let status = status.unwrap_or_else(|| {
            panic!("{what}: netfence --once still running after dpdk-testpmd left: {r}")
        });
        assert!(
            status.success(),
            "{what}: netfence --once exited with {status}"
        );
    }
}

/// What the reflecting sink puts in its answers; it never answers a datagram that carries it.
const REPLY_TAG: &[u8] = b"netfence->testpmd #";

#[test]
fn testpmd_receives_what_netfence_delivers() {
    let _serial = one_at_a_time();
    // The sink answers each of testpmd's datagrams with a tagged payload. netfence delivers the
    // answer to the guest's RX ring; testpmd's 5tswap engine receives it, swaps Ethernet, IP
    // addresses and UDP ports and sends it back, so it comes to the sink again as a datagram of
    // the same allowed, mapped flow. A tagged datagram at the sink therefore went netfence ->
    // testpmd's RX queue -> testpmd's TX queue -> netfence. Tagged datagrams are not answered,
    // so the exchange ends after one burst (--tx-first sends one txonly burst to start it).
    let came_back = Arc::new(AtomicU64::new(0));
    let mangled = Arc::new(AtomicU64::new(0));
    let sink = {
        let (came_back, mangled) = (came_back.clone(), mangled.clone());
        UdpSink::start_replying(Box::new(move |payload, n| {
            match payload.strip_prefix(REPLY_TAG) {
                Some(number) => {
                    // Intact: the number of an answer the sink sent before this datagram.
                    let sent_before = std::str::from_utf8(number)
                        .ok()
                        .and_then(|t| t.parse::<u64>().ok())
                        .is_some_and(|k| k < n);
                    let counter = if sent_before { &came_back } else { &mangled };
                    counter.fetch_add(1, Ordering::SeqCst);
                    None
                }
                None => Some([REPLY_TAG, n.to_string().as_bytes()].concat()),
            }
        }))
    };
    let args = policy_args(&sink);
    assert_only_the_sink_is_reachable(&args, &sink);
    let nf = Netfence::spawn(&args);
    let mut app_args = txonly_args();
    app_args.push("--tx-first".into());
    let mut tp = Testpmd::spawn(nf.socket_path(), "reflect", "5tswap", &app_args);
    // Done when answers came back and every answer sent so far has (the burst is small and
    // the path lossless, so all of them do).
    let r = sink.wait_until(
        deadline(TESTPMD_START),
        |c| {
            let back = came_back.load(Ordering::SeqCst);
            back > 0 && back == c.datagrams - back
        },
        || tp.failure().is_some(),
    );
    let c = r.unwrap_or_else(|c| {
        panic!(
            "no answer came back through dpdk-testpmd within {TESTPMD_START:?}: the sink saw {} \
             datagrams; {}",
            c.datagrams,
            tp.failure()
                .unwrap_or_else(|| "dpdk-testpmd still running".into())
        )
    });
    eprintln!(
        "sink: {} datagrams, {} of them answers that came back through testpmd",
        c.datagrams,
        came_back.load(Ordering::SeqCst)
    );
    assert_eq!(
        mangled.load(Ordering::SeqCst),
        0,
        "answers that came back changed"
    );
    assert_only_sink_decisions(&nf);
    drop(tp);
}

/// `key=value` of a log line.
fn field_of(line: &str, key: &str) -> Option<String> {
    common::process::field(line, key)
}
