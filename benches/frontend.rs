//! The benchmark frontend: a synthetic vhost-user guest that puts netfence's backend under load
//! without a real guest in the way, for scripts/bench.sh.
//!
//!   cargo bench --bench frontend -- tcp --dir up|down [--secs S] [--idle N] [--pairs P]
//!                                        [--pcap FILE]
//!   cargo bench --bench frontend -- tcp-limit [--secs S]
//!   cargo bench --bench frontend -- scale [--flows N]
//!   cargo bench --bench frontend -- rr [--secs S]
//!   cargo bench --bench frontend -- udp --size BYTES [--secs S]
//!
//! It is built on the harness (tests/common): netfence is spawned as the tests spawn it, the
//! vhost-user handshake is the harness's cloud-hypervisor-like one, DHCP is the harness guest's.
//! After that the rings are driven here by hand, because the harness guest copies and allocates
//! per frame and would be the bottleneck:
//! - `tcp --dir up` does one TCP handshake through `--map` to a loopback sink and keeps the
//!   window full of prebuilt frames (MSS-size, or 64 KiB TSO frames when netfence offers
//!   HOST_TSO4; partial checksums when it offers CSUM); only the TCP header of each is written.
//! - `tcp --dir down` reads a loopback source through netfence; of each frame it reads only the
//!   headers, and ACKs once per batch (large frames accepted when GUEST_TSO4 is offered).
//!   With `--pcap FILE` netfence records every frame (`run --pcap FILE`; the leg is named
//!   `tcp-DIR-pcap`) and a second line says how many frames its writer dropped.
//! - `tcp-limit`: the same frontend against dpdk-testpmd's vhost PMD in macswap mode, the raw
//!   vhost-user copy limit of this machine (every frame copied out of and back into guest memory).
//! - `scale`: N established idle flows through `--map` to a loopback listener that holds them;
//!   netfence's RSS before and after.
//! - `rr`: TCP request/response round trips (1 byte each way) through netfence to a loopback
//!   echo server, and connections per second (handshake + FIN both ways, to a server that
//!   closes when the guest does) with netfence's CPU and sleeps per connection: backend-only
//!   latency.
//! - `udp`: dpdk-testpmd virtio_user txonly -> netfence -> loopback sink (pps, netfence CPU per
//!   frame); the same testpmd against testpmd's vhost PMD (the DPDK<->DPDK limit); and a
//!   sendmmsg loop of the same datagrams to the same sink (the kernel's own cost per datagram).
//!
//! Results go to stdout as `RESULT leg key=value ...` lines; progress to stderr. Nothing here
//! fails on a time: a leg that cannot run prints `RESULT leg error="..."` and exits 1.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::dpdk::{cpu_ticks, Testpmd, GATEWAY_MAC};
use common::frontend::*;
use common::virtq::{Desc, Seg};
use common::{Frontend, FrontendOptions, Guest, Netfence, PUBLIC_IP};
use vm_memory::{Address, GuestAddress};

/// Where the guest sends; `--map` sends each port to a loopback server.
const SINK_PORT: u16 = 5001;
const SOURCE_PORT: u16 = 5002;
const HOLD_PORT: u16 = 5003;
const ECHO_PORT: u16 = 5004;
const CLOSE_PORT: u16 = 5005;
const MSS: usize = 1460;
/// Our window scale: 65535 << 7 = 8 MiB of receive window.
const OUR_WSCALE: u8 = 7;
const QUEUE_SIZE: u16 = 1024;
const RX_BUF: u32 = 4096;
/// TCP payload of one TSO frame: 44 segments of MSS (IP total length stays below 65535).
const TSO_PAYLOAD: usize = 44 * MSS;
const ETH_IP_TCP: usize = 14 + 20 + 20;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    raise_fd_limit();
    let Some(cmd) = args.first().cloned() else {
        eprintln!("usage: frontend tcp|tcp-limit|scale|rr|udp [options] (see benches/frontend.rs)");
        std::process::exit(2);
    };
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let secs: f64 = opt("--secs", "5").parse().expect("--secs");
    let r = match cmd.as_str() {
        "tcp" => tcp_leg(
            &opt("--dir", "up"),
            secs,
            opt("--idle", "0").parse().expect("--idle"),
            opt("--pairs", "1").parse().expect("--pairs"),
            Some(opt("--pcap", "")).filter(|p| !p.is_empty()),
        ),
        "tcp-limit" => tcp_limit_leg(secs),
        "scale" => scale_leg(opt("--flows", "10000").parse().expect("--flows")),
        "rr" => rr_leg(secs),
        "udp" => udp_leg(opt("--size", "64").parse().expect("--size"), secs),
        other => Err(format!("unknown leg {other}")),
    };
    if let Err(e) = r {
        println!("RESULT {cmd} error=\"{}\"", e.replace('"', "'"));
        std::process::exit(1);
    }
}

/// 10,000 flows need 10,000 sockets here (the held ends) and in netfence.
fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

fn cpu_secs(pid: u32) -> f64 {
    cpu_ticks(pid).unwrap_or(0) as f64 / ticks_per_sec()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Times netfence's threads went to sleep (voluntary context switches, all threads): each is
/// a wake-up later, the cost that dominates a short connection.
fn sleeps(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .sum()
}

// ---- checksums and frames ---------------------------------------------------------------------

fn sum16(data: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut it = data.chunks_exact(2);
    for w in &mut it {
        s += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    if let [b] = it.remainder() {
        s += (*b as u32) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    sum16(&src.octets()) + sum16(&dst.octets()) + proto as u32 + len as u32
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// The two ends of the guest's flows.
#[derive(Clone, Copy)]
struct Ends {
    mac: [u8; 6],
    gw_mac: [u8; 6],
    ip: Ipv4Addr,
    dst: Ipv4Addr,
}

/// Ethernet + IPv4 header (checksum filled) for an IP payload of `ip_payload` bytes.
fn eth_ip(e: &Ends, proto: u8, ip_payload: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(34);
    b.extend_from_slice(&e.gw_mac);
    b.extend_from_slice(&e.mac);
    b.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + ip_payload) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&e.ip.octets());
    ip[16..20].copy_from_slice(&e.dst.octets());
    let c = !fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    b.extend_from_slice(&ip);
    b
}

/// A TCP header with `opts`; the checksum is left 0.
#[allow(clippy::too_many_arguments)]
fn tcp_header(
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    opts: &[u8],
) -> Vec<u8> {
    let hl = 20 + opts.len();
    let mut t = vec![0u8; hl];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((hl / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&window.to_be_bytes());
    t[20..].copy_from_slice(opts);
    t
}

/// A whole control frame (no payload), TCP checksum filled.
#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    e: &Ends,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    opts: &[u8],
) -> Vec<u8> {
    let mut t = tcp_header(sport, dport, seq, ack, flags, window, opts);
    let c = !fold(pseudo_sum(e.ip, e.dst, 6, t.len()) + sum16(&t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = eth_ip(e, 6, t.len());
    f.extend_from_slice(&t);
    f
}

/// What the frontend needs of a received TCP segment.
#[derive(Clone, Copy, Debug)]
struct Seg4 {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: u32,
    wscale: Option<u8>,
}

/// Parses Ethernet/IPv4/TCP headers from the first bytes of a frame.
fn parse_seg(f: &[u8]) -> Option<Seg4> {
    if f.len() < ETH_IP_TCP || f[12..14] != [0x08, 0x00] || f[23] != 6 {
        return None;
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    let t = 14 + ihl;
    if f.len() < t + 20 {
        return None;
    }
    let doff = ((f[t + 12] >> 4) as usize) * 4;
    let mut wscale = None;
    let mut i = t + 20;
    let end = (t + doff).min(f.len());
    while i < end {
        match f[i] {
            0 => break,
            1 => i += 1,
            k => {
                let len = *f.get(i + 1)? as usize;
                if k == 3 && len == 3 {
                    wscale = f.get(i + 2).copied();
                }
                i += len.max(2);
            }
        }
    }
    let u32at = |o: usize| u32::from_be_bytes([f[o], f[o + 1], f[o + 2], f[o + 3]]);
    Some(Seg4 {
        sport: u16::from_be_bytes([f[t], f[t + 1]]),
        dport: u16::from_be_bytes([f[t + 2], f[t + 3]]),
        seq: u32at(t + 4),
        ack: u32at(t + 8),
        flags: f[t + 13],
        window: u16::from_be_bytes([f[t + 14], f[t + 15]]),
        payload: total.saturating_sub(ihl + doff) as u32,
        wscale,
    })
}

fn seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

// ---- the ring driver --------------------------------------------------------------------------

/// What the frontend counted.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    tx_frames: u64,
    rx_frames: u64,
    /// Notifications to the backend (TX and RX kicks) and from it (call eventfd reads).
    kicks: u64,
    calls: u64,
}

/// The harness frontend with its rings driven by hand: TX frames live in one slot per
/// descriptor, RX buffers are reposted as they come back.
struct Driver {
    fe: Frontend,
    hl: usize,
    slot_base: GuestAddress,
    /// The TX slots of pairs 1.. (multiqueue), swapped in with their rings by `on_pair`.
    other_slots: Vec<GuestAddress>,
    slot_size: u64,
    calls: u64,
    rx_frames: u64,
    rx_buffers: u64,
    tx_frames: u64,
    scratch: Vec<u8>,
}

impl Driver {
    fn new(mut fe: Frontend, max_frame: usize) -> Driver {
        let hl = fe.hdr_len();
        let slot_size = ((hl + max_frame) as u64).div_ceil(4096) * 4096;
        let slot_base = fe.mem.alloc(slot_size * QUEUE_SIZE as u64, 4096);
        let other_slots = (1..fe.pairs())
            .map(|_| fe.mem.alloc(slot_size * QUEUE_SIZE as u64, 4096))
            .collect();
        Driver {
            fe,
            hl,
            slot_base,
            other_slots,
            slot_size,
            calls: 0,
            rx_frames: 0,
            rx_buffers: 0,
            tx_frames: 0,
            scratch: vec![0u8; 256],
        }
    }

    /// Runs `f` with queue pair `pair`'s rings and TX slots in place of pair 0's.
    fn on_pair<R>(&mut self, pair: usize, f: impl FnOnce(&mut Driver) -> R) -> R {
        if pair == 0 {
            return f(self);
        }
        self.fe.swap_pair(pair);
        std::mem::swap(&mut self.slot_base, &mut self.other_slots[pair - 1]);
        let r = f(self);
        std::mem::swap(&mut self.slot_base, &mut self.other_slots[pair - 1]);
        self.fe.swap_pair(pair);
        r
    }

    /// Sleeps until the device returns something on any pair's rings (or `max` passes).
    fn wait_all(&mut self, max: Duration) {
        let pairs = self.fe.pairs();
        let mut fds = Vec::new();
        for k in 0..pairs {
            let pending = self.on_pair(k, |d| {
                fds.extend(d.fe.call_fds());
                d.fe.rx.enable_calls() | d.fe.tx.enable_calls()
            });
            if pending {
                return;
            }
        }
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfds.
        unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                max.as_millis().max(1) as i32,
            )
        };
        for k in 0..pairs {
            self.on_pair(k, |d| {
                if d.fe.rx.drain_call() + d.fe.tx.drain_call() > 0 {
                    d.calls += 1;
                }
            });
        }
    }

    fn acked(&self, bit: u64) -> bool {
        self.fe.acked_features & bit != 0
    }

    fn slot(&self, id: u16) -> GuestAddress {
        self.slot_base.unchecked_add(id as u64 * self.slot_size)
    }

    fn counts(&self) -> Counts {
        Counts {
            tx_frames: self.tx_frames,
            rx_frames: self.rx_frames,
            kicks: self.fe.tx.kicks + self.fe.rx.kicks,
            calls: self.calls,
        }
    }

    /// Frees the TX descriptors the device is done with.
    fn reclaim(&mut self) -> usize {
        let mut n = 0;
        while self.fe.tx.pop_used().is_some() {
            n += 1;
        }
        n
    }

    /// Publishes one frame of `len` bytes (header included) whose bytes `fill` writes into
    /// the slot; false when the ring is full.
    fn send_with(&mut self, len: usize, fill: impl FnOnce(&Frontend, GuestAddress)) -> bool {
        let Some(ids) = self.fe.tx.alloc_descs(1) else {
            return false;
        };
        let addr = self.slot(ids[0]);
        fill(&self.fe, addr);
        self.fe.tx.write_desc(
            ids[0],
            Desc {
                addr: addr.raw_value(),
                len: len as u32,
                flags: 0,
                next: 0,
            },
        );
        self.fe.tx.publish_raw(ids, 0, 0);
        self.tx_frames += 1;
        true
    }

    /// Sends a whole frame (a plain virtio-net header is put in front).
    fn send_frame(&mut self, frame: &[u8]) -> bool {
        let hl = self.hl;
        let ok = self.send_with(hl + frame.len(), |fe, a| {
            fe.mem.write(a, &[0u8; 12][..hl]);
            fe.mem.write(a.unchecked_add(hl as u64), frame);
        });
        self.fe.tx.kick_if_needed();
        ok
    }

    /// Takes every received frame off the RX ring, hands its first bytes (after the virtio-net
    /// header) and its length to `each`, and reposts the buffers.
    fn drain_rx(&mut self, mut each: impl FnMut(&[u8], u32)) -> usize {
        let mrg = self.fe.mrg_rxbuf();
        let mut frames = 0;
        while let Some((e, fl)) = self.fe.rx.pop_used() {
            let d = self.fe.rx.read_desc(fl.descs[0]);
            let n = (e.len as usize).min(self.scratch.len());
            let mut head = std::mem::take(&mut self.scratch);
            vm_memory::Bytes::read_slice(&self.fe.mem.mem, &mut head[..n], GuestAddress(d.addr))
                .expect("read RX buffer");
            self.repost(d, fl.tag);
            let nbuf = if mrg {
                u16::from_le_bytes([head[10], head[11]]).max(1)
            } else {
                1
            };
            let mut total = e.len.saturating_sub(self.hl as u32);
            for _ in 1..nbuf {
                let deadline = Instant::now() + Duration::from_secs(2);
                let (e2, fl2) = loop {
                    if let Some(x) = self.fe.rx.pop_used() {
                        break x;
                    }
                    assert!(Instant::now() < deadline, "merged RX frame never completed");
                    std::hint::spin_loop();
                };
                let d2 = self.fe.rx.read_desc(fl2.descs[0]);
                self.repost(d2, fl2.tag);
                total += e2.len;
            }
            if n > self.hl {
                each(&head[self.hl..n], total);
            }
            self.scratch = head;
            frames += 1;
        }
        if frames > 0 {
            self.fe.rx.kick_if_needed();
        }
        self.rx_frames += frames as u64;
        frames
    }

    fn repost(&mut self, d: Desc, tag: u64) {
        self.rx_buffers += 1;
        self.fe
            .rx
            .add_chain(
                &[Seg {
                    addr: GuestAddress(d.addr),
                    len: d.len,
                    write: true,
                }],
                tag,
            )
            .expect("RX ring has room for the buffer it returned");
    }

    /// Sleeps until the device returns something on either ring (or `max` passes).
    fn wait(&mut self, max: Duration) {
        if self.fe.rx.enable_calls() | self.fe.tx.enable_calls() {
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.fe.rx.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.fe.tx.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, max.as_millis().max(1) as i32) };
        if self.fe.rx.drain_call() > 0 {
            self.calls += 1;
        }
        if self.fe.tx.drain_call() > 0 {
            self.calls += 1;
        }
    }

    /// Answers an ARP request for our address (netfence may ask before it sends).
    fn answer_arp(&mut self, f: &[u8], e: &Ends) -> bool {
        if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[21] != 1 || f[38..42] != e.ip.octets() {
            return false;
        }
        let mut r = Vec::with_capacity(42);
        r.extend_from_slice(&f[6..12]);
        r.extend_from_slice(&e.mac);
        r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        r.extend_from_slice(&e.mac);
        r.extend_from_slice(&e.ip.octets());
        r.extend_from_slice(&f[22..32]);
        self.send_frame(&r);
        true
    }
}

/// Frontend options for the bench: a big ring, 4 KiB mergeable RX buffers, room for TSO slots.
fn bench_options() -> FrontendOptions {
    FrontendOptions {
        queue_size: QUEUE_SIZE,
        rx_buf_size: RX_BUF,
        mem_size: 192 << 20,
        tx_chunk: 64,
        ..FrontendOptions::default()
    }
}

/// netfence with its maps to the loopback servers; the guest's address and gateway MAC after
/// DHCP; the driver on the harness frontend.
fn netfence_guest(
    extra: &[String],
    maps: &[(u16, u16)],
) -> Result<(Netfence, Driver, Ends), String> {
    netfence_guest_pairs(extra, maps, 1)
}

/// [`netfence_guest`] with `pairs` queue pairs (`--queues`), when netfence offers them.
fn netfence_guest_pairs(
    extra: &[String],
    maps: &[(u16, u16)],
    pairs: u16,
) -> Result<(Netfence, Driver, Ends), String> {
    let mut args: Vec<String> = Vec::new();
    for (port, host_port) in maps {
        args.push("--map".into());
        args.push(format!("{PUBLIC_IP}:{port}=127.0.0.1:{host_port}"));
    }
    args.extend(extra.iter().cloned());
    let mut opts = bench_options();
    let nf = if pairs > 1 {
        args.extend(["--queues".to_string(), pairs.to_string()]);
        opts.pairs = pairs;
        Netfence::spawn(&args)
    } else {
        Netfence::spawn(&args)
    };
    let fe = Frontend::connect(nf.socket_path(), opts)?;
    let mut g = Guest::new(fe);
    let lease = g.dhcp(Duration::from_secs(10))?;
    let gw_mac = common::gateway_mac(&mut g);
    let ends = Ends {
        mac: g.mac,
        gw_mac,
        ip: lease.address.address(),
        dst: PUBLIC_IP,
    };
    let Guest { dev, .. } = g;
    let max_frame = if dev.fe.acked_features & VIRTIO_NET_F_HOST_TSO4 != 0 {
        ETH_IP_TCP + TSO_PAYLOAD
    } else {
        ETH_IP_TCP + MSS
    };
    Ok((nf, Driver::new(dev.fe, max_frame), ends))
}

fn features_text(d: &Driver) -> String {
    let f = d.fe.backend_features;
    let names = [
        (VIRTIO_NET_F_CSUM, "CSUM"),
        (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_NET_F_MQ, "MQ"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    ];
    names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

// ---- host-side servers ------------------------------------------------------------------------

/// A loopback listener whose connections `serve` handles, each on a thread.
fn serve(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback listener");
    let port = l.local_addr().unwrap().port();
    let serve = Arc::new(serve);
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let serve = serve.clone();
            thread::spawn(move || serve(s));
        }
    });
    port
}

/// Reads and discards; counts bytes.
fn sink_server(count: Arc<AtomicU64>) -> u16 {
    serve(move |mut s| {
        let mut buf = vec![0u8; 1 << 18];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    })
}

/// Writes as fast as it is read.
fn source_server() -> u16 {
    serve(|mut s| {
        let buf = vec![0x5au8; 1 << 18];
        while s.write_all(&buf).is_ok() {}
    })
}

/// Accepts and holds every connection (on one thread: 10,000 of them); counts them.
fn hold_server(count: Arc<AtomicU64>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback listener");
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    port
}

/// Echoes every byte back.
fn echo_server() -> u16 {
    serve(|mut s| {
        let _ = s.set_nodelay(true);
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// Reads each connection to its end, then closes it: one connection after another, on one
/// thread (the connections-per-second loop opens them one after another). A thread per
/// connection would make its start-up most of what a connection costs.
fn close_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback listener");
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        for mut s in l.incoming().flatten() {
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }
    });
    port
}

// ---- TCP through netfence ---------------------------------------------------------------------

/// One TCP flow of the synthetic guest.
#[derive(Clone, Copy, Debug)]
struct Flow {
    sport: u16,
    dport: u16,
    snd_una: u32,
    snd_nxt: u32,
    snd_wnd: u64,
    peer_wscale: u8,
    rcv_nxt: u32,
}

fn syn_options() -> [u8; 8] {
    let mss = (MSS as u16).to_be_bytes();
    [2, 4, mss[0], mss[1], 1, 3, 3, OUR_WSCALE]
}

/// Sends SYNs for every port of `sports` (at most `window` unanswered at once) and completes
/// each handshake; returns the established flows.
fn open_flows(
    d: &mut Driver,
    e: &Ends,
    sports: &[u16],
    dport: u16,
    window: usize,
    deadline: Instant,
) -> Result<Vec<Flow>, String> {
    let isn = 0x1000_0000u32;
    let mut flows: Vec<Option<Flow>> = vec![None; sports.len()];
    let base = sports[0];
    let mut next = 0usize;
    let mut done = 0usize;
    let mut resets = 0usize;
    while done < sports.len() {
        if Instant::now() > deadline {
            return Err(format!(
                "{done} of {} handshakes done before the deadline ({resets} reset)",
                sports.len()
            ));
        }
        d.reclaim();
        while next < sports.len() && next - done < window && d.fe.tx.num_free() > 8 {
            let f = tcp_frame(
                e,
                sports[next],
                dport,
                isn,
                0,
                TCP_SYN,
                65535,
                &syn_options(),
            );
            d.send_frame(&f);
            next += 1;
        }
        let mut acks = Vec::new();
        let mut arps = Vec::new();
        d.drain_rx(|f, _| {
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
                arps.push(f.to_vec());
                return;
            }
            let Some(s) = parse_seg(f) else { return };
            let i = s.dport.wrapping_sub(base) as usize;
            if s.sport != dport || i >= flows.len() {
                return;
            }
            if s.flags & TCP_RST != 0 {
                resets += 1;
                return;
            }
            if s.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK && flows[i].is_none() {
                let ws = s.wscale.unwrap_or(0);
                flows[i] = Some(Flow {
                    sport: s.dport,
                    dport,
                    snd_una: isn.wrapping_add(1),
                    snd_nxt: isn.wrapping_add(1),
                    snd_wnd: s.window as u64,
                    peer_wscale: ws,
                    rcv_nxt: s.seq.wrapping_add(1),
                });
                acks.push(i);
            }
        });
        for f in arps {
            d.answer_arp(&f, e);
        }
        for i in &acks {
            let fl = flows[*i].unwrap();
            let f = tcp_frame(
                e,
                fl.sport,
                dport,
                fl.snd_nxt,
                fl.rcv_nxt,
                TCP_ACK,
                65535,
                &[],
            );
            while !d.send_frame(&f) {
                d.reclaim();
            }
        }
        done += acks.len();
        if resets > 0 {
            return Err(format!(
                "{resets} SYNs answered with RST after {done} handshakes"
            ));
        }
        if acks.is_empty() {
            d.wait(Duration::from_millis(20));
        }
    }
    Ok(flows.into_iter().map(|f| f.unwrap()).collect())
}

/// Writes the frame template (virtio-net header, Ethernet, IPv4, TCP without seq/ack, payload)
/// into every TX slot; returns the per-frame constants.
struct DataTemplate {
    /// Bytes of TCP payload per frame and the frame's length with the virtio-net header.
    payload: usize,
    len: usize,
    /// Partial checksum: the device (or nobody, with NEEDS_CSUM) completes it.
    partial: bool,
    /// Sum of the pseudo header and payload, for the full checksum.
    base_sum: u32,
    /// The pseudo-header sum stored in the checksum field for NEEDS_CSUM frames.
    pseudo: u16,
}

fn write_data_template(d: &mut Driver, e: &Ends, fl: &Flow) -> DataTemplate {
    // Every slot is rewritten: wait until the device has read the frames still in flight.
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.fe.tx.num_in_flight() > 0 && Instant::now() < deadline {
        if d.reclaim() == 0 {
            d.wait(Duration::from_millis(10));
        }
    }
    let tso = d.acked(VIRTIO_NET_F_HOST_TSO4) && d.acked(VIRTIO_NET_F_CSUM);
    let partial = d.acked(VIRTIO_NET_F_CSUM);
    let payload = if tso { TSO_PAYLOAD } else { MSS };
    let hl = d.hl;
    let mut vh = [0u8; 12];
    if partial {
        vh[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        vh[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        vh[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    }
    if tso {
        vh[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        vh[2..4].copy_from_slice(&(ETH_IP_TCP as u16).to_le_bytes());
        vh[4..6].copy_from_slice(&(MSS as u16).to_le_bytes());
    }
    let mut frame = vh[..hl].to_vec();
    frame.extend(eth_ip(e, 6, 20 + payload));
    frame.extend(tcp_header(
        fl.sport,
        fl.dport,
        0,
        0,
        TCP_ACK | TCP_PSH,
        0,
        &[],
    ));
    let body: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
    frame.extend_from_slice(&body);
    for id in 0..QUEUE_SIZE {
        d.fe.mem.write(d.slot(id), &frame);
    }
    let base_sum = pseudo_sum(e.ip, e.dst, 6, 20 + payload) + sum16(&body);
    DataTemplate {
        payload,
        len: frame.len(),
        partial,
        base_sum,
        pseudo: fold(pseudo_sum(e.ip, e.dst, 6, 20 + payload)),
    }
}

/// Publishes one data segment at `seq` of the template.
fn send_data(d: &mut Driver, t: &DataTemplate, fl: &Flow, seq: u32) -> bool {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&fl.sport.to_be_bytes());
    h[2..4].copy_from_slice(&fl.dport.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&fl.rcv_nxt.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = TCP_ACK | TCP_PSH;
    h[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let c = if t.partial {
        t.pseudo
    } else {
        !fold(t.base_sum + sum16(&h))
    };
    h[16..18].copy_from_slice(&c.to_be_bytes());
    let at = (d.hl + 34) as u64;
    d.send_with(t.len, |fe, a| fe.mem.write(a.unchecked_add(at), &h))
}

struct Window {
    start: Instant,
    nf_cpu: f64,
    bytes: u64,
    counts: Counts,
}

fn tcp_leg(
    dir: &str,
    secs: f64,
    idle: usize,
    pairs: u32,
    pcap: Option<String>,
) -> Result<(), String> {
    let name = match (idle, pairs, &pcap) {
        (0, 1, Some(_)) => format!("tcp-{dir}-pcap"),
        (0, 1, None) => format!("tcp-{dir}"),
        (0, p, _) => format!("tcp-{dir}-pairs{p}"),
        (n, _, _) => format!("tcp-{dir}-idle{n}"),
    };
    let sunk = Arc::new(AtomicU64::new(0));
    let sink = sink_server(sunk.clone());
    let source = source_server();
    let held = Arc::new(AtomicU64::new(0));
    let hold = hold_server(held.clone());
    let flows_limit = (idle + 64).max(1024);
    let mut extra = vec![
        "--limit".to_string(),
        format!("tcp-flows={flows_limit}"),
        "--limit".to_string(),
        format!("tcp-connecting={}", flows_limit.min(4096)),
    ];
    // NF_BENCH_LIMITS=name=value,...: more limits for netfence (to size a default by measure).
    for l in std::env::var("NF_BENCH_LIMITS")
        .unwrap_or_default()
        .split(',')
    {
        if !l.is_empty() {
            extra.extend(["--limit".to_string(), l.to_string()]);
        }
    }
    if let Some(file) = &pcap {
        extra.extend(["--pcap".to_string(), file.clone()]);
    }
    let (nf, mut d, e) = netfence_guest_pairs(
        &extra,
        &[(SINK_PORT, sink), (SOURCE_PORT, source), (HOLD_PORT, hold)],
        pairs as u16,
    )
    .or_else(|e| {
        if pairs > 1 {
            // A netfence without multiqueue refuses the pairs (fewer queues than asked).
            netfence_guest(&extra, &[(SINK_PORT, sink)])
        } else {
            Err(e)
        }
    })?;
    let pid = nf.pid().ok_or("netfence has no pid")?;
    let feats = features_text(&d);
    if pairs > 1 {
        if d.fe.backend_features & VIRTIO_NET_F_MQ == 0 || d.fe.pairs() < pairs as usize {
            println!("RESULT {name} pairs={pairs} na=\"no-MQ\" features={feats}");
            return Ok(());
        }
        if dir != "up" || idle > 0 {
            println!("RESULT {name} pairs={pairs} na=\"up-only\" features={feats}");
            return Ok(());
        }
        return tcp_up_pairs(&name, secs, pairs as usize, nf, d, e, sunk, feats);
    }
    if idle > 0 {
        let ports: Vec<u16> = (20000..20000 + idle as u16).collect();
        open_flows(
            &mut d,
            &e,
            &ports,
            HOLD_PORT,
            256,
            Instant::now() + Duration::from_secs(120),
        )?;
        eprintln!("{name}: {idle} idle flows open");
    }
    let dport = if dir == "up" { SINK_PORT } else { SOURCE_PORT };
    let mut fl = open_flows(
        &mut d,
        &e,
        &[40000],
        dport,
        1,
        Instant::now() + Duration::from_secs(10),
    )?[0];
    let t = write_data_template(&mut d, &e, &fl);
    let warm = Duration::from_millis(500);
    let run = Duration::from_secs_f64(secs);
    let begin = Instant::now();
    let mut w0: Option<Window> = None;
    let mut last_progress = Instant::now();
    let mut retransmits = 0u64;
    let mut dupacks = 0u32;
    let mut ooo = 0u64;
    let mut arps = Vec::new();
    let mut sent_bytes = 0u64;
    let mut last = None;
    loop {
        let now = Instant::now();
        let bytes_now = if dir == "up" {
            sunk.load(Ordering::Relaxed)
        } else {
            sent_bytes
        };
        if w0.is_none() && now - begin >= warm {
            w0 = Some(Window {
                start: now,
                nf_cpu: cpu_secs(pid),
                bytes: bytes_now,
                counts: d.counts(),
            });
        }
        if let Some(w) = &w0 {
            if now - w.start >= run {
                let el = (now - w.start).as_secs_f64();
                let cpu = cpu_secs(pid) - w.nf_cpu;
                let bytes = bytes_now - w.bytes;
                let c = d.counts();
                let gb = bytes as f64 / 1e9;
                println!(
                    "RESULT {name} gbit={:.3} nf_cpu_s={:.2} nf_cpu_per_gb={:.2} nf_cores={:.2} frames_per_gb={:.0} kicks_per_gb={:.0} calls_per_gb={:.0} frame_payload={} retransmits={retransmits} out_of_order={ooo} features={feats}",
                    bytes as f64 * 8.0 / el / 1e9,
                    cpu,
                    cpu / gb.max(1e-9),
                    cpu / el,
                    (c.tx_frames + c.rx_frames - w.counts.tx_frames - w.counts.rx_frames) as f64 / gb.max(1e-9),
                    (c.kicks - w.counts.kicks) as f64 / gb.max(1e-9),
                    (c.calls - w.counts.calls) as f64 / gb.max(1e-9),
                    if dir == "up" { t.payload } else { 0 },
                );
                if std::env::var_os("BENCH_DEBUG").is_some() {
                    eprintln!(
                        "flow {fl:?} frames {c:?} last {last:?}\n{}\n{}",
                        d.fe.debug_state(),
                        nf.log_text()
                    );
                }
                if pcap.is_some() {
                    // The frames the pcap writer could not take, from the link's closing line.
                    drop(d);
                    let line = nf
                        .wait_for_log("link closed", Duration::from_secs(10))
                        .unwrap_or_default();
                    let dropped: u64 = line
                        .split("pcap-queue-full=")
                        .nth(1)
                        .and_then(|v| {
                            v.split(|ch: char| !ch.is_ascii_digit())
                                .next()?
                                .parse()
                                .ok()
                        })
                        .unwrap_or(0);
                    let frames = c.tx_frames + c.rx_frames;
                    println!(
                        "RESULT {name}-drops frames={frames} pcap_dropped={dropped} dropped_pct={:.1}",
                        dropped as f64 * 100.0 / frames.max(1) as f64
                    );
                }
                return Ok(());
            }
        }
        let mut progress = d.reclaim() > 0;
        let mut got = 0u32;
        let mut need_ack = false;
        d.drain_rx(|f, _| {
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
                arps.push(f.to_vec());
                return;
            }
            let Some(s) = parse_seg(f) else { return };
            last = Some(s);
            if s.dport != fl.sport || s.sport != fl.dport {
                return;
            }
            got += 1;
            if s.flags & TCP_ACK != 0 && seq_gt(s.ack, fl.snd_una) {
                fl.snd_una = s.ack;
                last_progress = Instant::now();
                dupacks = 0;
            } else if s.flags & TCP_ACK != 0
                && s.payload == 0
                && s.ack == fl.snd_una
                && fl.snd_nxt != fl.snd_una
            {
                dupacks += 1;
            }
            if s.flags & TCP_ACK != 0 {
                fl.snd_wnd = (s.window as u64) << fl.peer_wscale;
            }
            if s.payload > 0 {
                need_ack = true;
                if s.seq == fl.rcv_nxt {
                    fl.rcv_nxt = fl.rcv_nxt.wrapping_add(s.payload);
                    sent_bytes += s.payload as u64;
                    last_progress = Instant::now();
                } else {
                    ooo += 1;
                }
            }
        });
        for f in arps.drain(..) {
            d.answer_arp(&f, &e);
        }
        progress |= got > 0;
        if need_ack {
            let f = tcp_frame(
                &e,
                fl.sport,
                fl.dport,
                fl.snd_nxt,
                fl.rcv_nxt,
                TCP_ACK,
                65535,
                &[],
            );
            d.reclaim();
            d.send_frame(&f);
        }
        if dir == "up" {
            // Go back to the first unacknowledged byte when nothing moved for a while (netfence
            // dropped a segment it had no room for).
            // (3 duplicate ACKs, as a guest's fast retransmit; else 200 ms without progress.)
            if fl.snd_nxt != fl.snd_una
                && (dupacks >= 3 || last_progress.elapsed() > Duration::from_millis(200))
            {
                dupacks = 0;
                fl.snd_nxt = fl.snd_una;
                retransmits += 1;
                last_progress = Instant::now();
            }
            let p = t.payload as u32;
            while (fl.snd_nxt.wrapping_sub(fl.snd_una) as u64 + p as u64) <= fl.snd_wnd {
                let seq = fl.snd_nxt;
                if !send_data(&mut d, &t, &fl, seq) {
                    break;
                }
                fl.snd_nxt = fl.snd_nxt.wrapping_add(p);
                progress = true;
            }
            d.fe.tx.kick_if_needed();
        }
        if !progress {
            d.wait(Duration::from_millis(50));
        }
    }
}

/// One guest->host flow's sender state in [`tcp_up_pairs`].
struct UpFlow {
    fl: Flow,
    t: DataTemplate,
    last_progress: Instant,
    dupacks: u32,
    retransmits: u64,
}

/// `tcp --dir up --pairs P`: one flow per queue pair (its SYN and data on that pair's TX
/// queue, so each pair's worker owns one), every flow's window kept full as in [`tcp_leg`].
#[allow(clippy::too_many_arguments)]
fn tcp_up_pairs(
    name: &str,
    secs: f64,
    pairs: usize,
    nf: Netfence,
    mut d: Driver,
    e: Ends,
    sunk: Arc<AtomicU64>,
    feats: String,
) -> Result<(), String> {
    let pid = nf.pid().ok_or("netfence has no pid")?;
    let mut flows = Vec::new();
    for k in 0..pairs {
        let sport = 40000 + k as u16;
        let up = d.on_pair(k, |d| -> Result<UpFlow, String> {
            let fl = open_flows(
                d,
                &e,
                &[sport],
                SINK_PORT,
                1,
                Instant::now() + Duration::from_secs(10),
            )?[0];
            let t = write_data_template(d, &e, &fl);
            Ok(UpFlow {
                fl,
                t,
                last_progress: Instant::now(),
                dupacks: 0,
                retransmits: 0,
            })
        })?;
        flows.push(up);
    }
    let warm = Duration::from_millis(500);
    let run = Duration::from_secs_f64(secs);
    let begin = Instant::now();
    let mut w0: Option<(Instant, f64, u64, u64)> = None;
    let mut rx_by_pair = vec![0u64; pairs];
    loop {
        let now = Instant::now();
        let bytes_now = sunk.load(Ordering::Relaxed);
        if w0.is_none() && now - begin >= warm {
            w0 = Some((now, cpu_secs(pid), bytes_now, d.tx_frames + d.rx_frames));
        }
        if let Some((start, cpu0, bytes0, frames0)) = w0 {
            if now - start >= run {
                let el = (now - start).as_secs_f64();
                let cpu = cpu_secs(pid) - cpu0;
                let bytes = bytes_now - bytes0;
                let gb = bytes as f64 / 1e9;
                let retransmits: u64 = flows.iter().map(|f| f.retransmits).sum();
                println!(
                    "RESULT {name} pairs={pairs} gbit={:.3} nf_cpu_s={:.2} nf_cpu_per_gb={:.2} nf_cores={:.2} frames_per_gb={:.0} retransmits={retransmits} rx_frames_by_pair={rx_by_pair:?} features={feats}",
                    bytes as f64 * 8.0 / el / 1e9,
                    cpu,
                    cpu / gb.max(1e-9),
                    cpu / el,
                    (d.tx_frames + d.rx_frames - frames0) as f64 / gb.max(1e-9),
                );
                return Ok(());
            }
        }
        let mut progress = false;
        for (k, up) in flows.iter_mut().enumerate() {
            progress |= d.on_pair(k, |d| {
                let mut progress = d.reclaim() > 0;
                let mut arps = Vec::new();
                let fl = &mut up.fl;
                let mut got = 0u64;
                d.drain_rx(|f, _| {
                    if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
                        arps.push(f.to_vec());
                        return;
                    }
                    let Some(s) = parse_seg(f) else { return };
                    if s.dport != fl.sport || s.sport != fl.dport {
                        return;
                    }
                    got += 1;
                    if s.flags & TCP_ACK != 0 && seq_gt(s.ack, fl.snd_una) {
                        fl.snd_una = s.ack;
                        up.last_progress = Instant::now();
                        up.dupacks = 0;
                    } else if s.flags & TCP_ACK != 0
                        && s.payload == 0
                        && s.ack == fl.snd_una
                        && fl.snd_nxt != fl.snd_una
                    {
                        up.dupacks += 1;
                    }
                    if s.flags & TCP_ACK != 0 {
                        fl.snd_wnd = (s.window as u64) << fl.peer_wscale;
                    }
                });
                rx_by_pair[k] += got;
                for f in arps.drain(..) {
                    d.answer_arp(&f, &e);
                }
                progress |= got > 0;
                if fl.snd_nxt != fl.snd_una
                    && (up.dupacks >= 3 || up.last_progress.elapsed() > Duration::from_millis(200))
                {
                    up.dupacks = 0;
                    fl.snd_nxt = fl.snd_una;
                    up.retransmits += 1;
                    up.last_progress = Instant::now();
                }
                let p = up.t.payload as u32;
                while (fl.snd_nxt.wrapping_sub(fl.snd_una) as u64 + p as u64) <= fl.snd_wnd {
                    let seq = fl.snd_nxt;
                    if !send_data(d, &up.t, fl, seq) {
                        break;
                    }
                    fl.snd_nxt = fl.snd_nxt.wrapping_add(p);
                    progress = true;
                }
                d.fe.tx.kick_if_needed();
                progress
            });
        }
        if !progress {
            d.wait_all(Duration::from_millis(50));
        }
    }
}

// ---- the raw copy limit: the same frontend against dpdk-testpmd's vhost PMD ------------------

/// A dpdk-testpmd with a vhost PMD port (a vhost-user *backend*) listening on `sock`.
struct VhostTestpmd {
    child: Child,
    out: PathBuf,
    _dir: common::TempDir,
}

impl VhostTestpmd {
    fn spawn(
        sock: &Path,
        dir: common::TempDir,
        mode: &str,
        fwd_cpu: usize,
        main_cpu: usize,
    ) -> Result<VhostTestpmd, String> {
        let out = dir.path().join("testpmd.out");
        let prefix = format!("nf-bench-vhost-{}", std::process::id());
        let args: Vec<String> = vec![
            "-oL".into(),
            "-eL".into(),
            "dpdk-testpmd".into(),
            "--lcores".into(),
            format!("0@{main_cpu},1@{fwd_cpu}"),
            "--main-lcore".into(),
            "0".into(),
            "--no-pci".into(),
            "-m".into(),
            "256".into(),
            "--single-file-segments".into(),
            "--in-memory".into(),
            "--no-telemetry".into(),
            format!("--file-prefix={prefix}"),
            "--vdev".into(),
            format!("net_vhost0,iface={},queues=1", sock.display()),
            "--".into(),
            format!("--forward-mode={mode}"),
            "--nb-cores=1".into(),
            "--total-num-mbufs=16384".into(),
            "--stats-period=1".into(),
        ];
        let f = std::fs::File::create(&out).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("stdbuf");
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(f.try_clone().map_err(|e| e.to_string())?)
            .stderr(f);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("dpdk-testpmd: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "dpdk-testpmd's vhost socket did not appear: {}",
                    std::fs::read_to_string(&out).unwrap_or_default()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(VhostTestpmd {
            child,
            out,
            _dir: dir,
        })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The `Rx-pps:` figures of testpmd's periodic port statistics so far.
    fn rx_pps(&self) -> Vec<u64> {
        self.output()
            .lines()
            .filter_map(|l| l.split("Rx-pps:").nth(1))
            .filter_map(|r| r.split_whitespace().next().and_then(|v| v.parse().ok()))
            .collect()
    }
}

impl Drop for VhostTestpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tcp_limit_leg(secs: f64) -> Result<(), String> {
    let dir = common::TempDir::new("nf-bench-limit");
    let sock = dir.path().join("vhost.sock");
    let tp = VhostTestpmd::spawn(&sock, dir, "macswap", 1, 0)?;
    let fe = Frontend::connect(
        &sock,
        FrontendOptions {
            strip_mac_from_backend: false,
            ..bench_options()
        },
    )
    .map_err(|e| format!("{e}\n{}", tp.output()))?;
    let mut d = Driver::new(fe, ETH_IP_TCP + MSS);
    let e = Ends {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        gw_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
        ip: Ipv4Addr::new(192, 0, 2, 2),
        dst: Ipv4Addr::new(192, 0, 2, 1),
    };
    let fl = Flow {
        sport: 1,
        dport: 2,
        snd_una: 0,
        snd_nxt: 0,
        snd_wnd: 0,
        peer_wscale: 0,
        rcv_nxt: 0,
    };
    // Plain MSS frames with full checksums: no offload is asked of testpmd.
    d.fe.acked_features &= !(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4);
    let t = write_data_template(&mut d, &e, &fl);
    let begin = Instant::now();
    let warm = Duration::from_millis(500);
    let mut w0: Option<(Instant, u64)> = None;
    let mut bytes = 0u64;
    let mut seq = 0u32;
    loop {
        let now = Instant::now();
        if w0.is_none() && now - begin >= warm {
            w0 = Some((now, bytes));
        }
        if let Some((s, b)) = w0 {
            if now - s >= Duration::from_secs_f64(secs) {
                let el = (now - s).as_secs_f64();
                println!(
                    "RESULT tcp-limit gbit={:.3} frame_payload={} backend=dpdk-testpmd-vhost-macswap",
                    (bytes - b) as f64 * 8.0 / el / 1e9,
                    t.payload
                );
                return Ok(());
            }
        }
        let mut progress = d.reclaim() > 0;
        let mut got = 0u64;
        d.drain_rx(|_, len| got += (len as u64).saturating_sub(ETH_IP_TCP as u64));
        if got > 0 {
            bytes += got;
            progress = true;
        }
        while d.fe.tx.num_in_flight() < QUEUE_SIZE as usize / 2 && send_data(&mut d, &t, &fl, seq) {
            seq = seq.wrapping_add(MSS as u32);
            progress = true;
        }
        d.fe.tx.kick_if_needed();
        if !progress {
            if now - begin > Duration::from_secs(10) && bytes == 0 {
                return Err(format!("no frame came back from testpmd\n{}", tp.output()));
            }
            d.wait(Duration::from_millis(10));
        }
    }
}

// ---- scale: many idle flows -------------------------------------------------------------------

fn scale_leg(flows: usize) -> Result<(), String> {
    let held = Arc::new(AtomicU64::new(0));
    let hold = hold_server(held.clone());
    let extra = vec![
        "--limit".to_string(),
        format!("tcp-flows={}", flows + 64),
        "--limit".to_string(),
        format!("tcp-connecting={}", (flows + 64).min(4096)),
    ];
    let (nf, mut d, e) = netfence_guest(&extra, &[(HOLD_PORT, hold)])?;
    let pid = nf.pid().ok_or("netfence has no pid")?;
    let rss0 = rss_kib(pid);
    let start = Instant::now();
    let ports: Vec<u16> = (10000..10000 + flows as u16).collect();
    open_flows(
        &mut d,
        &e,
        &ports,
        HOLD_PORT,
        256,
        Instant::now() + Duration::from_secs(300),
    )?;
    let opened = start.elapsed().as_secs_f64();
    // The host ends: every flow accepted by the holder.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (held.load(Ordering::Relaxed) as usize) < flows && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let rss1 = rss_kib(pid);
    println!(
        "RESULT scale flows={flows} held={} rss_mb_before={:.1} rss_mb={:.1} kib_per_flow={:.1} open_per_s={:.0}",
        held.load(Ordering::Relaxed),
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        (rss1.saturating_sub(rss0)) as f64 / flows as f64,
        flows as f64 / opened
    );
    Ok(())
}

// ---- request/response through netfence, backend only -----------------------------------------

fn rr_leg(secs: f64) -> Result<(), String> {
    let echo = echo_server();
    let close = close_server();
    let (nf, mut d, e) = netfence_guest(&[], &[(ECHO_PORT, echo), (CLOSE_PORT, close)])?;
    let pid = nf.pid().ok_or("netfence has no pid")?;
    let mut fl = open_flows(
        &mut d,
        &e,
        &[41000],
        ECHO_PORT,
        1,
        Instant::now() + Duration::from_secs(10),
    )?[0];
    let mut rtts: Vec<f64> = Vec::new();
    let cpu0 = cpu_secs(pid);
    let end = Instant::now() + Duration::from_secs_f64(secs / 2.0);
    while Instant::now() < end {
        let t0 = Instant::now();
        // One byte of request.
        let mut t = tcp_header(
            fl.sport,
            fl.dport,
            fl.snd_nxt,
            fl.rcv_nxt,
            TCP_ACK | TCP_PSH,
            65535,
            &[],
        );
        t.push(b'x');
        let c = !fold(pseudo_sum(e.ip, e.dst, 6, t.len()) + sum16(&t));
        t[16..18].copy_from_slice(&c.to_be_bytes());
        let mut f = eth_ip(&e, 6, t.len());
        f.extend_from_slice(&t);
        d.reclaim();
        d.send_frame(&f);
        fl.snd_nxt = fl.snd_nxt.wrapping_add(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut answered = false;
        while !answered {
            d.drain_rx(|f, _| {
                if let Some(s) = parse_seg(f) {
                    if s.dport == fl.sport && s.payload > 0 && s.seq == fl.rcv_nxt {
                        fl.rcv_nxt = fl.rcv_nxt.wrapping_add(s.payload);
                        answered = true;
                    }
                }
            });
            if !answered {
                if Instant::now() > deadline {
                    return Err("no echo within 5 s".into());
                }
                d.wait(Duration::from_millis(5));
            }
        }
        rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        // Acknowledge the echo so netfence has nothing outstanding.
        let a = tcp_frame(
            &e,
            fl.sport,
            fl.dport,
            fl.snd_nxt,
            fl.rcv_nxt,
            TCP_ACK,
            65535,
            &[],
        );
        d.send_frame(&a);
    }
    let rr_cpu = cpu_secs(pid) - cpu0;
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p) as usize];
    // Connections per second: handshake, then FIN both ways, one after another.
    let end = Instant::now() + Duration::from_secs_f64(secs / 2.0);
    let t0 = Instant::now();
    let cps_cpu0 = cpu_secs(pid);
    let cps_sleeps0 = sleeps(pid);
    let mut conns = 0u64;
    let mut port = 42000u16;
    while Instant::now() < end {
        let fl = open_flows(
            &mut d,
            &e,
            &[port],
            CLOSE_PORT,
            1,
            Instant::now() + Duration::from_secs(5),
        )?[0];
        let fin = tcp_frame(
            &e,
            fl.sport,
            fl.dport,
            fl.snd_nxt,
            fl.rcv_nxt,
            TCP_ACK | TCP_FIN,
            65535,
            &[],
        );
        d.reclaim();
        d.send_frame(&fin);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut peer_fin = None;
        while peer_fin.is_none() {
            d.drain_rx(|f, _| {
                if let Some(s) = parse_seg(f) {
                    if s.dport == fl.sport && s.flags & TCP_FIN != 0 {
                        peer_fin = Some(s.seq);
                    }
                }
            });
            if peer_fin.is_none() {
                if Instant::now() > deadline {
                    return Err("no FIN from netfence within 5 s".into());
                }
                d.wait(Duration::from_millis(5));
            }
        }
        let last = tcp_frame(
            &e,
            fl.sport,
            fl.dport,
            fl.snd_nxt.wrapping_add(1),
            peer_fin.unwrap().wrapping_add(1),
            TCP_ACK,
            65535,
            &[],
        );
        d.send_frame(&last);
        conns += 1;
        port = port.wrapping_add(1).max(42000);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cps_cpu = cpu_secs(pid) - cps_cpu0;
    let cps_sleeps = sleeps(pid) - cps_sleeps0;
    println!(
        "RESULT rr round_trips={} p50_us={:.0} p99_us={:.0} nf_cpu_us_per_rt={:.1} conns_per_s={:.0} nf_cpu_us_per_conn={:.1} nf_sleeps_per_conn={:.2}",
        rtts.len(),
        pct(0.5),
        pct(0.99),
        rr_cpu * 1e6 / rtts.len().max(1) as f64,
        conns as f64 / elapsed,
        cps_cpu * 1e6 / conns.max(1) as f64,
        cps_sleeps as f64 / conns.max(1) as f64
    );
    Ok(())
}

// ---- UDP: testpmd -> netfence -> sink, DPDK<->DPDK, and the kernel's sendmmsg --------------------

/// A loopback UDP socket that drains with recvmmsg and counts datagrams.
fn udp_sink(count: Arc<AtomicU64>) -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind UDP sink");
    let port = s.local_addr().unwrap().port();
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(8 << 20);
    thread::spawn(move || {
        const N: usize = 64;
        let mut bufs = vec![[0u8; 2048]; N];
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; each points at its own iovec.
        let mut msgs: Vec<libc::mmsghdr> = (0..N).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        loop {
            // SAFETY: msgs/iov/bufs outlive the call; N entries.
            let n = unsafe {
                libc::recvmmsg(
                    s.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    N as u32,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if n > 0 {
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });
    port
}

fn thread_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct for this thread.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut r);
        let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
        t(r.ru_utime) + t(r.ru_stime)
    }
}

/// Waits until `count` moves, then measures its rate over `secs`; None if it never moved.
fn measure_rate(
    count: &AtomicU64,
    secs: f64,
    start_within: Duration,
    mut sample: impl FnMut() -> f64,
) -> Option<(f64, f64, u64)> {
    let deadline = Instant::now() + start_within;
    let first = count.load(Ordering::Relaxed);
    while count.load(Ordering::Relaxed) < first + 1000 {
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(300));
    let (c0, s0, t0) = (count.load(Ordering::Relaxed), sample(), Instant::now());
    thread::sleep(Duration::from_secs_f64(secs));
    let (c1, s1) = (count.load(Ordering::Relaxed), sample());
    let el = t0.elapsed().as_secs_f64();
    Some(((c1 - c0) as f64 / el, s1 - s0, c1 - c0))
}

fn udp_leg(size: usize, secs: f64) -> Result<(), String> {
    let count = Arc::new(AtomicU64::new(0));
    let sink = udp_sink(count.clone());
    let payload = size.saturating_sub(42).max(1);
    let txonly = |extra: &[String]| -> Vec<String> {
        let mut v = vec![
            format!("--txpkts={size}"),
            format!("--tx-ip={},198.18.0.2", common::GUEST_IP),
            "--tx-udp=9,9".into(),
            format!("--eth-peer=0,{GATEWAY_MAC}"),
        ];
        v.extend_from_slice(extra);
        v
    };

    // 1. testpmd virtio_user -> netfence -> sink.
    let nf = Netfence::spawn(&[
        "--net-rule".to_string(),
        "allow@198.18.0.2:udp:9".into(),
        "--net-default-egress".into(),
        "deny".into(),
        "--map".into(),
        format!("198.18.0.2:9=127.0.0.1:{sink}"),
    ]);
    let pid = nf.pid().ok_or("netfence has no pid")?;
    let mut tp = Testpmd::spawn(nf.socket_path(), "bench", "txonly", &txonly(&[]));
    let r = measure_rate(&count, secs, Duration::from_secs(30), || cpu_secs(pid));
    let Some((pps, cpu, n)) = r else {
        return Err(format!(
            "no datagram reached the sink: {:?}\n{}",
            tp.failure(),
            tp.output_text()
        ));
    };
    tp.signal(libc::SIGKILL);
    drop(tp);
    drop(nf);
    let nf_us = cpu * 1e6 / n.max(1) as f64;

    // 2. The same testpmd against testpmd's vhost PMD (rxonly): DPDK<->DPDK.
    let dir = common::TempDir::new("nf-bench-dpdk");
    let sock = dir.path().join("vhost.sock");
    let limit = match VhostTestpmd::spawn(&sock, dir, "rxonly", 1, 1) {
        Ok(v) => {
            let tp = Testpmd::spawn(&sock, "bench-limit", "txonly", &txonly(&[]));
            let deadline = Instant::now() + Duration::from_secs(30);
            while v.rx_pps().iter().all(|&p| p == 0) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
            }
            thread::sleep(Duration::from_secs_f64(secs.max(2.0)));
            let mut p: Vec<u64> = v.rx_pps().into_iter().filter(|&p| p > 0).collect();
            drop(tp);
            if p.is_empty() {
                eprintln!("udp: no Rx-pps from the vhost testpmd:\n{}", v.output());
                None
            } else {
                p.sort();
                Some(p[p.len() / 2] as f64)
            }
        }
        Err(e) => {
            eprintln!("udp: DPDK<->DPDK leg: {e}");
            None
        }
    };

    // 3. The kernel's own cost: sendmmsg of the same datagrams to the same sink.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let cpu_used = Arc::new(std::sync::Mutex::new(0f64));
    let sender = {
        let (stop, sent, cpu_used) = (stop.clone(), sent.clone(), cpu_used.clone());
        thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
            s.connect(("127.0.0.1", sink)).expect("connect sender");
            const N: usize = 32;
            let mut buf = vec![0x5au8; payload];
            let mut iov: Vec<libc::iovec> = (0..N)
                .map(|_| libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: payload,
                })
                .collect();
            // SAFETY: plain data, pointing at iov.
            let mut msgs: Vec<libc::mmsghdr> =
                (0..N).map(|_| unsafe { std::mem::zeroed() }).collect();
            for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
            }
            let c0 = thread_cpu_secs();
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: msgs and what they point at outlive the call.
                let n = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), N as u32, 0) };
                if n > 0 {
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            *cpu_used.lock().unwrap() = thread_cpu_secs() - c0;
        })
    };
    let t0 = Instant::now();
    let got0 = count.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    sender.join().map_err(|_| "sender panicked")?;
    let el = t0.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    let kernel_us = *cpu_used.lock().unwrap() * 1e6 / sent.max(1) as f64;
    let sink_pps = (count.load(Ordering::Relaxed) - got0) as f64 / el;
    println!(
        "RESULT udp{size} nf_pps={pps:.0} nf_cpu_us_per_frame={nf_us:.2} dpdk_limit_pps={} sendmmsg_pps={:.0} sendmmsg_sink_pps={sink_pps:.0} kernel_us_per_dgram={kernel_us:.2}",
        limit.map(|l| format!("{l:.0}")).unwrap_or_else(|| "n/a".into()),
        sent as f64 / el,
    );
    Ok(())
}
