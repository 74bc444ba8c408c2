//! A link never wedges, whatever the VMM or the guest does to the rings.
//!
//! Each test pulls one trigger that once left the vring worker spinning inside `handle_event`
//! (100% CPU, tens of MB/s of log, a teardown that never finished): the VMM stops the TX ring
//! (GET_VRING_BASE, with or without SET_VRING_ENABLE 0 first) while the guest keeps
//! transmitting; the guest writes an available index more than the ring size ahead; the VMM
//! lets the guest kick before it set the ring's addresses. Others check that netfence keeps off
//! rings it must not touch and follows the VMM through changes: RX disabled while host data
//! flows, memory regions added and removed mid-flow, rings restarted from 0 as a rebooted guest
//! does them.
//!
//! From the trigger on, [`Aftermath`] measures netfence's CPU time and log growth; when the VMM
//! has left it waits (bounded) for netfence to log `VMM disconnected`, checks both figures,
//! and then has a second VMM get a DHCP lease, or with `--once` sees the process exit.

mod common;

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use common::frames;
use common::frontend::{FloodStats, RX_QUEUE, TX_QUEUE};
use common::memory::GuestMem;
use common::servers::*;
use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

/// CPU time netfence may use after a trigger: this much, plus half the wall time it took.
const CPU_ALLOWANCE_SECS: f64 = 0.3;
/// Log netfence may write after a trigger.
const LOG_ALLOWANCE_BYTES: u64 = 64 << 10;
/// Chains the device must have taken before the flood counts as under way.
const FLOOD_UNDER_WAY: u64 = 512;
/// Frames of the flood are large, so that the device takes far longer per chain than the
/// guest needs to publish one and the TX ring stays full: the device is then always busy with
/// it when the ring stops, however the threads are scheduled.
const FLOOD_FRAME_LEN: usize = 32 << 10;

/// What happens after the first VMM has left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Another VMM connects and must be served.
    Vmm,
    /// netfence runs with `--once` and must exit.
    Exit,
}

fn spawn(next: Next, extra: &[String]) -> Netfence {
    let mut args: Vec<String> = extra.to_vec();
    if next == Next::Exit {
        args.push("--once".into());
    }
    Netfence::spawn(&args)
}

/// netfence's CPU time, log size and log position from a trigger on.
struct Aftermath {
    what: String,
    t0: Instant,
    cpu0: f64,
    bytes0: u64,
    mark: usize,
}

impl Aftermath {
    fn start(nf: &Netfence, what: &str) -> Aftermath {
        Aftermath {
            what: what.to_string(),
            t0: Instant::now(),
            cpu0: nf.cpu_seconds(),
            bytes0: nf.log_bytes(),
            mark: nf.log_mark(),
        }
    }

    /// The VMM has just left (its frontend was dropped). netfence must log `VMM disconnected`
    /// in time, with little CPU and log spent since the trigger, and then serve the next VMM
    /// (or exit, with `--once`).
    fn finish(self, nf: &mut Netfence, next: Next) {
        let disconnected = nf.wait_for_log_after(self.mark, "VMM disconnected", SHORT);
        let wall = self.t0.elapsed().as_secs_f64();
        let cpu = nf.cpu_seconds() - self.cpu0;
        let log = nf.log_bytes() - self.bytes0;
        eprintln!(
            "{}: netfence used {cpu:.2} s CPU and wrote {log} bytes of log in {wall:.2} s",
            self.what
        );
        assert!(
            cpu <= CPU_ALLOWANCE_SECS + 0.5 * wall,
            "{}: netfence used {cpu:.2} s of CPU in {wall:.2} s (a worker spinning?)",
            self.what
        );
        assert!(
            log <= LOG_ALLOWANCE_BYTES,
            "{}: netfence wrote {log} bytes of log in {wall:.2} s",
            self.what
        );
        assert!(
            disconnected.is_some(),
            "{}: netfence did not log `VMM disconnected` within {SHORT:?} of the VMM leaving",
            self.what
        );
        let abandoned = nf
            .log_lines()
            .iter()
            .any(|l| l.contains("did not stop within"));
        assert!(!abandoned, "{}: the device had to be abandoned", self.what);
        match next {
            Next::Vmm => {
                nf.assert_running(&self.what);
                let mut g = guest_up(nf);
                g.ping(GATEWAY, SHORT)
                    .unwrap_or_else(|e| panic!("{}: next VMM: {e}", self.what));
            }
            Next::Exit => {
                let st = nf
                    .wait_exit(SHORT)
                    .unwrap_or_else(|| panic!("{}: netfence --once still running", self.what));
                assert!(
                    st.success(),
                    "{}: netfence --once exited with {st:?}",
                    self.what
                );
            }
        }
    }
}

/// Floods the TX ring with small frames and, once the device is taking them, stops the TX
/// ring (SET_VRING_ENABLE 0 first if asked, then GET_VRING_BASE) while the flood goes on.
/// Returns the TX base, what the flood did, and the aftermath started at the stop. Whether
/// chains were still in flight at the stop is up to timing (netfence may have emptied the ring
/// just before): the callers that need it check `in_flight`.
fn stop_tx_during_flood(
    nf: &Netfence,
    g: &mut Guest,
    disable_first: bool,
) -> (u32, FloodStats, Aftermath) {
    let fe = g.fe();
    let frame = frames::garbage_ethernet(fe.guest_mac(), FLOOD_FRAME_LEN);
    let ((base, aftermath), flood) = fe
        .during_tx_flood(&frame, FLOOD_UNDER_WAY, |vu, _| {
            if disable_first {
                vu.set_vring_enable(TX_QUEUE, false)
                    .expect("SET_VRING_ENABLE 0 on TX");
            }
            let base = vu.get_vring_base(TX_QUEUE).expect("GET_VRING_BASE on TX");
            (base, Aftermath::start(nf, "TX stopped during a flood"))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let fe = g.fe();
    eprintln!(
        "flood: {flood:?}; TX base {base}, avail {}, used {}",
        fe.tx.next_avail,
        fe.tx.used_idx()
    );
    // Every chain the device took before the stop came back; none after it.
    assert_eq!(
        fe.tx.used_idx(),
        base as u16,
        "TX base {base} and used index disagree after GET_VRING_BASE"
    );
    (base, flood, aftermath)
}

/// A guest that keeps its TX ring full does not keep netfence from the rest of its work: a
/// datagram from the host reaches the guest while the flood goes on (each `handle_event` takes
/// a bounded number of TX chains, then the worker serves its other events).
#[test]
fn tx_flood_does_not_starve_host_traffic() {
    let server = UdpSocket::bind("127.0.0.1:0").expect("bind UDP server");
    server.set_read_timeout(Some(SHORT)).unwrap();
    let port = server.local_addr().unwrap().port();
    let (heard_tx, heard_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let replier = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (_, peer) = server.recv_from(&mut buf).map_err(|e| e.to_string())?;
        let _ = heard_tx.send(());
        go_rx.recv_timeout(SHORT).map_err(|e| e.to_string())?;
        server
            .send_to(b"through the flood", peer)
            .map_err(|e| e.to_string())
    });
    let mut nf = spawn(
        Next::Vmm,
        &["--map".into(), format!("{PUBLIC_IP}:9=127.0.0.1:{port}")],
    );
    let mut g = guest_up(&nf);
    let gw_mac = gateway_mac(&mut g);
    let (mac, ip) = (g.mac, g.ip().expect("lease"));
    let fe = g.fe();
    fe.send_frame(&frames::udp_frame(
        mac, gw_mac, ip, PUBLIC_IP, 40009, 9, b"hello",
    ));
    heard_rx
        .recv_timeout(SHORT)
        .expect("the host server never got the guest's datagram");
    assert!(fe.wait_tx_drained(deadline(SHORT)));
    fe.poll_rx();
    let frame = frames::garbage_ethernet(fe.guest_mac(), FLOOD_FRAME_LEN);
    let (arrived, flood) = fe
        .during_tx_flood(&frame, FLOOD_UNDER_WAY, |_, rx| {
            let before = rx.used_idx();
            go_tx.send(()).expect("replier waiting");
            let until = deadline(SHORT);
            loop {
                rx.enable_calls();
                if rx.used_idx() != before {
                    return true;
                }
                let now = Instant::now();
                if now >= until {
                    return false;
                }
                let mut pfd = libc::pollfd {
                    fd: rx.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = (until - now).as_millis().min(i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
                let _ = rx.drain_call();
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("flood: {flood:?}");
    assert!(
        arrived,
        "nothing reached the guest in {SHORT:?} while it flooded its TX ring"
    );
    // The chains left when the flood stopped are taken too: a drain that stopped at its cap
    // came back for the rest by itself (the guest, told not to kick, did not).
    assert!(
        g.fe().wait_tx_drained(deadline(SHORT)),
        "TX chains left after the flood were never taken: {}",
        g.fe().debug_state()
    );
    // (netfence was busy with the flood until now; the aftermath starts when it ends.)
    let aftermath = Aftermath::start(&nf, "TX flood with host traffic");
    replier.join().unwrap().expect("replier");
    let fe = g.fe();
    let reply = fe.recv_matching(deadline(SHORT), |f| {
        frames::parse_udp(f).is_some_and(|u| u.payload == b"through the flood")
    });
    assert!(reply.is_some(), "the host's datagram was not delivered");
    drop(g);
    aftermath.finish(&mut nf, Next::Vmm);
}

/// Chains the guest had published but the device had not taken when TX stopped at `base`.
fn in_flight(g: &mut Guest, base: u32) -> u16 {
    g.fe().tx.next_avail.wrapping_sub(base as u16)
}

/// Attempts at stopping TX with chains in flight: netfence often empties the ring before the
/// stop arrives, so a round that stopped an empty ring (still checked whole) is played again.
const IN_FLIGHT_ATTEMPTS: usize = 8;

fn tx_stopped_while_guest_sends(disable_first: bool, next: Next) {
    for attempt in 1..=IN_FLIGHT_ATTEMPTS {
        let mut nf = spawn(next, &[]);
        let mut g = guest_up(&nf);
        let (base, _, aftermath) = stop_tx_during_flood(&nf, &mut g, disable_first);
        let caught = in_flight(&mut g, base);
        drop(g); // the VMM goes away with the guest still transmitting
        aftermath.finish(&mut nf, next);
        if caught > 0 {
            eprintln!("attempt {attempt}: {caught} chains in flight at the stop");
            return;
        }
    }
    panic!(
        "in {IN_FLIGHT_ATTEMPTS} attempts the TX ring was always drained when it stopped; \
         the test never stopped it in flight"
    );
}

#[test]
fn get_vring_base_while_guest_sends() {
    tx_stopped_while_guest_sends(false, Next::Vmm);
}

#[test]
fn get_vring_base_while_guest_sends_once() {
    tx_stopped_while_guest_sends(false, Next::Exit);
}

#[test]
fn disable_then_get_vring_base_while_guest_sends() {
    tx_stopped_while_guest_sends(true, Next::Vmm);
}

#[test]
fn disable_then_get_vring_base_while_guest_sends_once() {
    tx_stopped_while_guest_sends(true, Next::Exit);
}

/// The VM pauses with TX in flight and resumes (QEMU `stop` / `cont`): the rings start again
/// at the bases GET_VRING_BASE returned, the chains left in the ring are taken, the link works.
#[test]
fn rings_resume_where_they_stopped_with_tx_in_flight() {
    for attempt in 1..=IN_FLIGHT_ATTEMPTS {
        let mut nf = spawn(Next::Vmm, &[]);
        let mut g = guest_up(&nf);
        let (tx_base, _, aftermath) = stop_tx_during_flood(&nf, &mut g, true);
        let caught = in_flight(&mut g, tx_base);
        let fe = g.fe();
        let rx_base = fe.stop_vring(RX_QUEUE, true).expect("stop RX");
        fe.resume_vrings(rx_base, tx_base).expect("resume");
        assert!(
            fe.wait_tx_drained(deadline(SHORT)),
            "TX chains left in the ring were not taken after the resume: {}",
            fe.debug_state()
        );
        g.ping(GATEWAY, SHORT).expect("ping after resume");
        drop(g);
        aftermath.finish(&mut nf, Next::Vmm);
        if caught > 0 {
            eprintln!("attempt {attempt}: resumed with {caught} chains in flight");
            return;
        }
    }
    panic!("in {IN_FLIGHT_ATTEMPTS} attempts the TX ring was always drained when it stopped");
}

fn avail_index_beyond_ring_size(next: Next) {
    let mut nf = spawn(next, &[]);
    let mut g = guest_up(&nf);
    let fe = g.fe();
    assert!(fe.wait_tx_drained(deadline(SHORT)));
    let bogus = fe.tx.next_avail.wrapping_add(fe.opts.queue_size + 5);
    let aftermath = Aftermath::start(&nf, "avail index beyond the ring size");
    fe.tx.write_avail_idx_raw(bogus);
    fe.tx.kick_now();
    nf.wait_for_log_after(aftermath.mark, "invalid available ring index", SHORT)
        .expect("netfence never looked at the bogus index");
    drop(g);
    aftermath.finish(&mut nf, next);
}

#[test]
fn avail_index_more_than_ring_size_ahead() {
    avail_index_beyond_ring_size(Next::Vmm);
}

#[test]
fn avail_index_more_than_ring_size_ahead_once() {
    avail_index_beyond_ring_size(Next::Exit);
}

/// A VMM that hands over the TX kick (and enables the ring) before SET_VRING_ADDR, with the
/// guest already transmitting. vhost-user-backend marks a ring ready as soon as it has a kick
/// fd, so netfence is called for a ring whose addresses are still 0; what lies there in guest
/// memory (here: not zero) must not be taken for an available index.
fn kicked_before_vring_addr(nf: &Netfence) -> (Frontend, Aftermath) {
    let opts = FrontendOptions {
        reserve_low: 64 << 10,
        ..Default::default()
    };
    let mut fe = Frontend::prepare(nf.socket_path(), opts).expect("handshake");
    fe.setup_vring(RX_QUEUE, 0).expect("RX ring");
    fe.vu
        .set_vring_call(TX_QUEUE, &fe.tx.call)
        .expect("SET_VRING_CALL");
    fe.vu
        .set_vring_kick(TX_QUEUE, &fe.tx.kick)
        .expect("SET_VRING_KICK");
    // A frame is waiting, published without a kick of its own: the ring counts as kicked as
    // soon as it is enabled (vhost-user-backend hands us an event for it then). No other kick
    // is outstanding once netfence has said the ring is not ready, so nothing can make it look
    // at the ring between the SET_VRING_ADDR and SET_VRING_BASE that a later setup sends (a
    // VMM that kicks in that window would have chains taken twice: its own doing).
    let discover = frames::garbage_ethernet(fe.guest_mac(), 64);
    let (at, len) = fe.stage_tx_frame(&discover);
    fe.publish_tx_at_quietly(at, len, false);
    let aftermath = Aftermath::start(nf, "kick before SET_VRING_ADDR");
    fe.enable_vrings(true).expect("SET_VRING_ENABLE");
    nf.wait_for_log_after(aftermath.mark, "not ready", SHORT)
        .expect("netfence never looked at the TX ring");
    (fe, aftermath)
}

fn kick_before_vring_addr_then_leave(next: Next) {
    let mut nf = spawn(next, &[]);
    let (fe, aftermath) = kicked_before_vring_addr(&nf);
    drop(fe);
    aftermath.finish(&mut nf, next);
}

#[test]
fn kick_before_set_vring_addr() {
    kick_before_vring_addr_then_leave(Next::Vmm);
}

#[test]
fn kick_before_set_vring_addr_once() {
    kick_before_vring_addr_then_leave(Next::Exit);
}

/// The same VMM then finishes setting up the ring: the link works.
#[test]
fn kick_before_set_vring_addr_then_proper_setup() {
    let mut nf = spawn(Next::Vmm, &[]);
    let (mut fe, aftermath) = kicked_before_vring_addr(&nf);
    fe.setup_vring(TX_QUEUE, 0).expect("TX ring");
    fe.tx.kick_now();
    let mut g = Guest::new(fe);
    g.dhcp(SHORT * 2).expect("DHCP after the ring was set up");
    g.ping(GATEWAY, SHORT).expect("ping");
    drop(g);
    aftermath.finish(&mut nf, Next::Vmm);
}

/// A host server that sends `total` bytes of `pattern(total, seed)` and closes.
fn bulk_sender(total: usize, seed: u64) -> OneShotServer<Result<(), String>> {
    OneShotServer::start(move |mut s| {
        let data = pattern(total, seed);
        s.write_all(&data).map_err(|e| e.to_string())
    })
}

fn expect_pattern(got: &[u8], total: usize, seed: u64, what: &str) {
    let want = pattern(total, seed);
    if let Some(m) = mismatch(got, &want) {
        panic!("{what}: received data differs: {m}");
    }
}

/// SET_VRING_ENABLE 0 on RX while host data flows to the guest: netfence writes nothing into
/// the disabled ring (its used index does not move while the guest's TX is served), and the
/// transfer completes once the ring is enabled again.
#[test]
fn rx_disabled_while_host_data_flows() {
    const TOTAL: usize = 1 << 20;
    let server = bulk_sender(TOTAL, 11);
    let mut nf = spawn(
        Next::Vmm,
        &[
            "--map".into(),
            format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
        ],
    );
    let mut g = guest_up(&nf);
    let gw_mac = gateway_mac(&mut g);
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect");
    let mut got = g
        .tcp_recv_exact(h, 64 << 10, deadline(SHORT))
        .expect("first 64 KiB");
    let aftermath = Aftermath::start(&nf, "RX disabled during a download");
    let (mac, ip) = (g.mac, g.ip().expect("lease"));
    let fe = g.fe();
    // Take what is there and repost every buffer: the ring is full of room.
    fe.poll_rx();
    fe.vu
        .set_vring_enable(RX_QUEUE, false)
        .expect("SET_VRING_ENABLE 0 on RX");
    let used_at_disable = fe.rx.used_idx();
    // Each ping's reply is something to write to the guest; the second ping's chain coming
    // back means the worker has finished with the first one, reply included.
    for seq in 0..2 {
        let ping = frames::icmp_echo_frame(mac, gw_mac, ip, GATEWAY, 0x7e57, seq, b"rx off");
        fe.send_frame(&ping);
        assert!(fe.wait_tx_drained(deadline(SHORT)), "TX not served");
    }
    assert_eq!(
        fe.rx.used_idx(),
        used_at_disable,
        "netfence wrote into the disabled RX ring"
    );
    fe.vu
        .set_vring_enable(RX_QUEUE, true)
        .expect("SET_VRING_ENABLE 1 on RX");
    let (rest, eof) = g.tcp_recv_to_eof(h, deadline(LONG));
    got.extend(rest);
    assert!(
        eof,
        "the download did not finish after RX was enabled again"
    );
    expect_pattern(&got, TOTAL, 11, "download across an RX disable");
    server.join(SHORT).expect("server").expect("server wrote");
    drop(g);
    aftermath.finish(&mut nf, Next::Vmm);
}

/// Memory slots change mid-flow (cloud-hypervisor hotplugs memory with ADD_MEM_REG; QEMU
/// updates its layout with REMOVE_MEM_REG then ADD_MEM_REG): a frame in a hot-added region is
/// read, a chain into a removed region is refused, and removing and re-adding the region that
/// holds the rings (with the guest kicking in between) leaves the download intact.
#[test]
fn memory_regions_change_mid_flow() {
    const TOTAL: usize = 1 << 20;
    let server = bulk_sender(TOTAL, 12);
    let mut nf = spawn(
        Next::Vmm,
        &[
            "--map".into(),
            format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
        ],
    );
    let mut g = guest_up(&nf);
    let gw_mac = gateway_mac(&mut g);
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect");
    let mut got = g
        .tcp_recv_exact(h, 64 << 10, deadline(SHORT))
        .expect("first 64 KiB");
    let aftermath = Aftermath::start(&nf, "memory regions changed mid-flow");
    let (mac, ip) = (g.mac, g.ip().expect("lease"));

    // Hot-add 1 MiB far above the guest's RAM and send a ping from there.
    let hot = GuestMem::new(1 << 30, 1 << 20, 1);
    let hot_region = hot.region_infos().remove(0);
    g.fe()
        .vu
        .add_mem_region(&hot_region)
        .expect("ADD_MEM_REG hot-added region");
    let ping = frames::icmp_echo_frame(mac, gw_mac, ip, GATEWAY, 0x40f, 1, b"from hotplugged ram");
    let mut bytes = vec![0u8; g.fe().hdr_len()];
    bytes.extend_from_slice(&ping);
    hot.write(hot.base, &bytes);
    g.fe().publish_tx_at(hot.base, bytes.len() as u32, false);
    let reply = g.raw_wait(deadline(SHORT), |f| {
        frames::parse_icmp(f).is_some_and(|i| i.msg_type == 0 && i.ident == 0x40f)
    });
    assert!(
        reply.is_some(),
        "no reply to a ping read from hot-added memory"
    );

    // Remove it: a chain pointing there is now outside guest memory.
    g.fe()
        .vu
        .remove_mem_region(&hot_region)
        .expect("REMOVE_MEM_REG hot-added region");
    g.fe().publish_tx_at(hot.base, bytes.len() as u32, true);
    assert!(
        g.fe().wait_tx_drained(deadline(SHORT)),
        "chain not returned"
    );
    assert_eq!(g.fe().stats.tx_bad_chains_returned, 1);

    // Remove the region with the rings and buffers, let the guest transmit and kick, add it
    // back: nothing the guest did meanwhile may be lost for good.
    let main_region = g.fe().mem.region_infos().remove(0);
    g.fe()
        .vu
        .remove_mem_region(&main_region)
        .expect("REMOVE_MEM_REG main region");
    let ping = frames::icmp_echo_frame(mac, gw_mac, ip, GATEWAY, 0x40f, 2, b"during the gap");
    g.fe().send_frame(&ping);
    g.fe().tx.kick_now();
    g.fe()
        .vu
        .add_mem_region(&main_region)
        .expect("ADD_MEM_REG main region");
    let reply = g.raw_wait(deadline(SHORT), |f| {
        frames::parse_icmp(f).is_some_and(|i| i.msg_type == 0 && i.ident == 0x40f && i.seq == 2)
    });
    assert!(
        reply.is_some(),
        "the ping sent while the rings were unmapped was never answered: {}",
        g.fe().debug_state()
    );
    let (rest, eof) = g.tcp_recv_to_eof(h, deadline(LONG));
    got.extend(rest);
    assert!(eof, "the download did not finish");
    expect_pattern(&got, TOTAL, 12, "download across memory changes");
    server.join(SHORT).expect("server").expect("server wrote");
    drop(g);
    aftermath.finish(&mut nf, Next::Vmm);
}

/// The guest reboots: the VMM stops the rings mid-TCP-flow, then the guest's new driver sets
/// them up from 0. The old flow's host connection is closed, and the new guest gets a lease
/// and a new connection.
#[test]
fn rings_restarted_from_zero_reset_the_link() {
    let old_flow = OneShotServer::start(|mut s| {
        let mut b = [0u8; 5];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        s.write_all(b"ready").map_err(|e| e.to_string())?;
        // Returns when netfence closes the connection (EOF or reset).
        let mut rest = Vec::new();
        let end = s.read_to_end(&mut rest).map_err(|e| e.kind());
        Ok::<_, String>(end)
    });
    let echo = TcpEchoServer::start();
    let mut nf = spawn(
        Next::Vmm,
        &[
            "--map".into(),
            format!("{PUBLIC_IP}:80=127.0.0.1:{}", old_flow.port()),
            "--map".into(),
            format!("{PUBLIC_IP}:81=127.0.0.1:{}", echo.port()),
        ],
    );
    let mut g = guest_up(&nf);
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect");
    g.tcp_send_all(h, b"hello", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 5, deadline(SHORT)).unwrap(), b"ready");

    let (rx_base, tx_base) = g.fe().stop().expect("stop");
    assert!(rx_base > 0 && tx_base > 0, "rings stopped at 0");
    let aftermath = Aftermath::start(&nf, "rings restarted from 0");
    g.fe().restart_vrings_fresh().expect("restart from 0");
    let end = old_flow.join(SHORT).unwrap_or_else(|e| {
        panic!("the old flow's host connection is still open after the restart: {e}")
    });
    eprintln!("old flow ended with {end:?}");
    nf.wait_for_log_after(aftermath.mark, "link reset", SHORT)
        .expect("no link reset logged");

    // A new guest on the same VMM connection: its own stack, DHCP, a new connection.
    let Guest { dev, .. } = g;
    let mut g = Guest::new(dev.fe);
    g.dhcp(SHORT * 2).expect("DHCP after the reboot");
    let h = g
        .tcp_connect(PUBLIC_IP, 81, SHORT)
        .expect("connect after reboot");
    g.tcp_send_all(h, b"again", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 5, deadline(SHORT)).unwrap(), b"again");
    drop(g);
    aftermath.finish(&mut nf, Next::Vmm);
}

/// A VM paused mid-TCP-flow and resumed keeps its flow: rings that come back where they
/// stopped are not taken for a reboot.
#[test]
fn rings_resumed_keep_the_flow() {
    let echo = TcpEchoServer::start();
    let mut nf = spawn(
        Next::Vmm,
        &[
            "--map".into(),
            format!("{PUBLIC_IP}:81=127.0.0.1:{}", echo.port()),
        ],
    );
    let mut g = guest_up(&nf);
    let h = g.tcp_connect(PUBLIC_IP, 81, SHORT).expect("connect");
    g.tcp_send_all(h, b"before", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 6, deadline(SHORT)).unwrap(), b"before");
    let (rx_base, tx_base) = g.fe().stop().expect("stop");
    let aftermath = Aftermath::start(&nf, "rings resumed");
    g.fe().resume_vrings(rx_base, tx_base).expect("resume");
    g.tcp_send_all(h, b"after", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 5, deadline(SHORT)).unwrap(), b"after");
    assert!(
        !nf.log_lines().iter().any(|l| l.contains("link reset")),
        "a resume was taken for a reboot"
    );
    drop(g);
    aftermath.finish(&mut nf, Next::Vmm);
}
