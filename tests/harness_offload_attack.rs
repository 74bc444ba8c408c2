//! Attacks on the virtio-net offloads and on the TCP buffers committed on demand, from a
//! hostile or merely awkward guest and VMM:
//! - a guest whose mergeable RX buffers are all in use for a moment (it is slower than
//!   netfence) must get its large segments whole once it reposts, not cut in software;
//! - TSO frames with SYN, RST, FIN or urgent data, an `hdr_len` smaller than the real
//!   headers, `gso_size` 1, and IP lengths that disagree with the frame: no panic, counted
//!   drops or ordinary TCP, and the link carries on;
//! - a VMM that acks other offloads while a download runs (smoltcp's interface is rebuilt):
//!   the flow survives, and no frame reaches the guest with an offload it no longer acked;
//! - rings restarted from zero (a reboot) in the middle of bulk transfers, again and again,
//!   then new flows: the sockets' buffer memory is unmapped only after the sockets are gone;
//! - an out-of-order segment held across a rest period: the buffers are not given back under
//!   it, and the stream arrives byte-exact when the gap is filled.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown};
use std::time::Duration;

use common::frames::{self, parse_tcp, Flags};
use common::frontend::*;
use common::guest::TCP_BUF;
use common::process::close_and_count;
use common::servers::*;
use common::*;
use smoltcp::wire::{checksum, IpAddress, IpProtocol};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

/// A host server that sends `total` bytes of `pattern(total, seed)`, then closes.
fn bulk_sender(total: usize, seed: u64) -> OneShotServer<Result<(), String>> {
    OneShotServer::start(move |mut s| {
        let data = pattern(total, seed);
        s.write_all(&data).map_err(|e| e.to_string())?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())
    })
}

/// Waits until the RX buffers the guest has posted and netfence has not used hold less than
/// `bytes` (without taking any frame, so none is reposted): the guest is, for now, slower
/// than the link, and a frame of `bytes` does not fit.
fn wait_rx_room_below(g: &mut Guest, bytes: usize) {
    let fe = g.fe();
    let buf = fe.opts.rx_buf_size as usize;
    let until = deadline(SHORT);
    while (fe.rx.num_in_flight() - usize::from(fe.rx.used_pending())) * buf >= bytes {
        assert!(
            fe.wait_rx_progress(until),
            "netfence did not fill the RX ring: {}",
            fe.debug_state()
        );
    }
}

/// A mergeable-buffer guest with GUEST_TSO (cloud-hypervisor's defaults, on a ring of 64
/// buffers of 2 KiB: 128 KiB of room when all are posted) that lets its RX ring fill up
/// several times during a download. Whenever it reposts, a 64 KiB segment fits again: netfence must wait
/// for that room, not cut the segment into MTU-sized frames (which also pushes the queue to
/// the guest past its frame bound).
#[test]
fn large_segments_wait_for_mergeable_buffers() {
    const TOTAL: usize = 4 << 20;
    let server = bulk_sender(TOTAL, 61);
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
    ]);
    let opts = FrontendOptions {
        queue_size: 64,
        ..Default::default()
    };
    let mut g = guest_with(&nf, opts);
    let mark = nf.log_mark();
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        g.fe().acked_features & VIRTIO_NET_F_GUEST_TSO4 != 0 && g.fe().mrg_rxbuf(),
        "cloud-hypervisor's defaults ack GUEST_TSO4 and MRG_RXBUF"
    );
    // A window far larger than the ring's 128 KiB: the ring, not the window, holds netfence
    // back while the guest is slow.
    let h = g
        .tcp_connect_sized(PUBLIC_IP, 80, 2 << 20, SHORT)
        .expect("connect");
    let mut got = Vec::new();
    for _ in 0..4 {
        // Read a little, then be slow: netfence fills every buffer and has more to send.
        got.extend(
            g.tcp_recv_exact(h, 64 << 10, deadline(SHORT))
                .expect("64 KiB more"),
        );
        wait_rx_room_below(&mut g, 12 + 65_549);
    }
    let (rest, eof) = g.tcp_recv_to_eof(h, deadline(LONG));
    got.extend(rest);
    assert!(eof, "the download did not end with a FIN");
    if let Some(m) = mismatch(&got, &pattern(TOTAL, 61)) {
        panic!("downloaded bytes differ: {m}");
    }
    server.join(SHORT).expect("server").expect("server wrote");
    let st = g.fe().stats.clone();
    assert!(st.rx_nonzero_gso > 0, "no large segment reached the guest");
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(
        counts.get("rx-gso-segmented"),
        0,
        "large segments cut in software although the guest's buffers hold them: {st:?}"
    );
}

/// A frame's L4 checksum replaced by its pseudo-header sum (NEEDS_CSUM); returns csum_start.
fn make_partial(frame: &mut [u8], src: IpAddr, dst: IpAddr) -> u16 {
    let l4 = 14 + frames::ip_hdr_len(src);
    let len = frame.len() - l4;
    let pseudo = checksum::pseudo_header(
        &IpAddress::from(src),
        &IpAddress::from(dst),
        IpProtocol::Tcp,
        len as u32,
    );
    frame[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    l4 as u16
}

/// A hand-made TCP connection from the guest (no smoltcp on the guest side).
struct RawConn {
    mac: [u8; 6],
    gw: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    /// Our next sequence number and netfence's.
    seq: u32,
    their: u32,
}

impl RawConn {
    fn open(g: &mut Guest, dst: Ipv4Addr, dport: u16) -> RawConn {
        let gw = gateway_mac(g);
        let sport = g.next_port();
        let (src, dsta) = (IpAddr::V4(GUEST_IP), IpAddr::V4(dst));
        let isn = 0x4000_0000u32;
        let syn = frames::tcp_syn_frame(g.mac, gw, src, dsta, sport, dport, isn);
        let synack = g
            .raw_exchange(&syn, deadline(SHORT), |f| {
                parse_tcp(f).is_some_and(|t| t.src == dsta && t.dport == sport && t.flags.syn)
            })
            .and_then(|f| parse_tcp(&f))
            .expect("SYN-ACK");
        let c = RawConn {
            mac: g.mac,
            gw,
            src,
            dst: dsta,
            sport,
            dport,
            seq: isn + 1,
            their: synack.seq.wrapping_add(1),
        };
        g.fe().send_frame(&c.frame(c.seq, Flags::ACK, &[]));
        c
    }

    fn frame(&self, seq: u32, flags: Flags, data: &[u8]) -> Vec<u8> {
        let seg = frames::tcp_segment(
            self.src, self.dst, self.sport, self.dport, seq, self.their, flags, 65535, data,
        );
        frames::ip_frame(self.mac, self.gw, self.src, self.dst, 6, &seg)
    }

    fn ours(&self) -> impl Fn(&[u8]) -> bool + '_ {
        move |f: &[u8]| {
            parse_tcp(f).is_some_and(|t| {
                t.src == self.dst && t.sport == self.dport && t.dport == self.sport
            })
        }
    }

    /// Waits for netfence's ACK of everything up to `end`.
    fn wait_acked(&self, g: &mut Guest, end: u32) -> bool {
        let ours = self.ours();
        g.raw_wait(deadline(SHORT), |f| {
            ours(f) && parse_tcp(f).is_some_and(|t| t.flags.ack && t.ack == end)
        })
        .is_some()
    }
}

fn send_with(g: &mut Guest, hdr: &NetHdr, frame: &[u8]) {
    while !g.fe().try_send_frame_with(hdr, frame) {
        assert!(g.fe().wait(Some(deadline(SHORT))), "TX stuck");
    }
}

/// TSO frames a hostile guest may send: odd flags, headers that disagree with the frame,
/// `gso_size` 1. Each is dropped (counted) or handled as the one TCP segment it is; the
/// stream that carried the valid ones arrives byte-exact and the link answers afterwards.
#[test]
fn odd_tso_frames() {
    let sink = OneShotServer::start(|mut s| {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    let syn_host = OneShotServer::start(|mut s| {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    const SINK_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
    const SYN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{SINK_IP}:80=127.0.0.1:{}", sink.port()),
        "--map".to_string(),
        format!("{SYN_IP}:80=127.0.0.1:{}", syn_host.port()),
    ]);
    let mut g = guest(&nf);
    let mark = nf.log_mark();
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let (src, dst) = (IpAddr::V4(GUEST_IP), IpAddr::V4(SINK_IP));
    let tso = |csum_start: u16, gso_size: u16| NetHdr {
        flags: NET_HDR_F_NEEDS_CSUM,
        gso_type: NET_HDR_GSO_TCPV4,
        hdr_len: csum_start + 20,
        gso_size,
        csum_start,
        csum_offset: 16,
        num_buffers: 0,
    };

    // A SYN carrying 60 KB as one TSO frame: a new flow like any SYN.
    let gw = gateway_mac(&mut g);
    let syn_data = pattern(60_000, 70);
    let seg = frames::tcp_segment(
        src,
        IpAddr::V4(SYN_IP),
        41000,
        80,
        7,
        0,
        Flags::SYN,
        65535,
        &syn_data,
    );
    let mut f = frames::ip_frame(g.mac, gw, src, IpAddr::V4(SYN_IP), 6, &seg);
    let cs = make_partial(&mut f, src, IpAddr::V4(SYN_IP));
    send_with(&mut g, &tso(cs, 1448), &f);

    let mut c = RawConn::open(&mut g, SINK_IP, 80);
    let mut expected = Vec::new();
    let mut send_data = |g: &mut Guest,
                         c: &mut RawConn,
                         hdr_of: &dyn Fn(u16) -> NetHdr,
                         flags: Flags,
                         data: &[u8],
                         taken: bool| {
        let mut f = c.frame(c.seq, flags, data);
        let cs = make_partial(&mut f, c.src, c.dst);
        send_with(g, &hdr_of(cs), &f);
        if taken {
            c.seq = c.seq.wrapping_add(data.len() as u32);
            expected.extend_from_slice(data);
            assert!(c.wait_acked(g, c.seq), "segment not acknowledged");
        }
    };
    let psh = Flags {
        psh: true,
        ..Flags::ACK
    };
    // gso_size 1: one segment of 60 KB all the same (netfence terminates TCP; nothing is cut).
    let d1 = pattern(60_000, 71);
    send_data(&mut g, &mut c, &|cs| tso(cs, 1), psh, &d1, true);
    // hdr_len 14 (smaller than the real headers): only a hint, the frame is read as it is.
    let d2 = pattern(30_000, 72);
    send_data(
        &mut g,
        &mut c,
        &|cs| NetHdr {
            hdr_len: 14,
            ..tso(cs, 1448)
        },
        psh,
        &d2,
        true,
    );
    // The checksum said to be in the IP header, or past the TCP header: bad headers.
    let d3 = pattern(4000, 73);
    send_data(
        &mut g,
        &mut c,
        &|_| NetHdr {
            csum_start: 14,
            csum_offset: 10,
            ..tso(34, 1448)
        },
        psh,
        &d3,
        false,
    );
    send_data(
        &mut g,
        &mut c,
        &|cs| NetHdr {
            csum_start: cs + 20,
            ..tso(cs, 1448)
        },
        psh,
        &d3,
        false,
    );
    // A TSO frame for IPv6 on an IPv4 packet.
    send_data(
        &mut g,
        &mut c,
        &|cs| NetHdr {
            gso_type: NET_HDR_GSO_TCPV6,
            ..tso(cs, 1448)
        },
        psh,
        &d3,
        false,
    );
    // An IPv4 total length shorter than the frame: the trailing bytes are not data.
    let d4 = pattern(8000, 74);
    let mut f = c.frame(c.seq, psh, &d4);
    f.extend_from_slice(&[0xAA; 3000]);
    let cs = make_partial(&mut f[..14 + 20 + 20 + d4.len()], src, dst);
    send_with(&mut g, &tso(cs, 1448), &f);
    c.seq = c.seq.wrapping_add(d4.len() as u32);
    expected.extend_from_slice(&d4);
    assert!(
        c.wait_acked(&mut g, c.seq),
        "padded TSO frame not acknowledged"
    );
    // Urgent data in a TSO frame: ordinary bytes to netfence.
    let d5 = pattern(20_000, 75);
    let mut f = c.frame(c.seq, psh, &d5);
    f[14 + 20 + 13] |= 0x20; // URG
    f[14 + 20 + 18..14 + 20 + 20].copy_from_slice(&100u16.to_be_bytes());
    let cs = make_partial(&mut f, src, dst);
    send_with(&mut g, &tso(cs, 1448), &f);
    c.seq = c.seq.wrapping_add(d5.len() as u32);
    expected.extend_from_slice(&d5);
    assert!(
        c.wait_acked(&mut g, c.seq),
        "urgent TSO frame not acknowledged"
    );
    // Data and FIN in one TSO frame.
    let d6 = pattern(40_000, 76);
    let fin = Flags { fin: true, ..psh };
    let mut f = c.frame(c.seq, fin, &d6);
    let cs = make_partial(&mut f, src, dst);
    send_with(&mut g, &tso(cs, 1448), &f);
    c.seq = c.seq.wrapping_add(d6.len() as u32 + 1);
    expected.extend_from_slice(&d6);
    assert!(
        c.wait_acked(&mut g, c.seq),
        "data+FIN TSO frame not acknowledged"
    );
    let got = sink.join(SHORT).expect("sink");
    if let Some(m) = mismatch(&got, &expected) {
        panic!("the TSO stream differs: {m}");
    }
    // A TSO frame with RST and data: the flow of the SYN above is reset, nothing delivered.
    let rst = frames::tcp_segment(
        src,
        IpAddr::V4(SYN_IP),
        41000,
        80,
        8,
        0,
        Flags::RST,
        65535,
        &pattern(30_000, 77),
    );
    let mut f = frames::ip_frame(g.mac, gw, src, IpAddr::V4(SYN_IP), 6, &rst);
    let cs = make_partial(&mut f, src, IpAddr::V4(SYN_IP));
    send_with(&mut g, &tso(cs, 1448), &f);

    g.ping(GATEWAY, SHORT).unwrap_or_else(|e| panic!("{e}"));
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("offload-bad-header"), 3, "{}", nf.log_text());
    // The SYN's flow was reset by the guest's RST: its host connection ends.
    syn_host
        .join(SHORT)
        .expect("the SYN flow's host connection was not closed");
}

/// Makes sure netfence has taken and fully handled every TX chain published so far: a ping
/// to the gateway is sent and its chain comes back; the worker handles chains in order, so
/// the frames before it have been handled (what they made is queued for the guest).
fn settle_tx(g: &mut Guest, gw: [u8; 6]) {
    let ip = g.ip().expect("lease");
    let ping = frames::icmp_echo_frame(g.mac, gw, ip, GATEWAY, 0x5e77, 1, b"settle");
    let fe = g.fe();
    fe.send_frame(&ping);
    assert!(fe.wait_tx_drained(deadline(SHORT)), "TX not served");
}

/// SET_FEATURES again while a download runs, as a VMM may send at any time: first without
/// any offload while frames made for the old features wait for room in a disabled RX ring,
/// then with the offloads again. smoltcp's interface is rebuilt each time; the flow goes on
/// byte-exact, and no frame reaches the guest with an offload it did not ack at the time (the
/// frontend fails on a GSO frame, a partial checksum or a frame above the MTU it did not
/// allow).
#[test]
fn offloads_changed_mid_download() {
    const TOTAL: usize = 4 << 20;
    let server = bulk_sender(TOTAL, 81);
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
    ]);
    let mut g = guest(&nf);
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let full = g.fe().backend_acked;
    let acked_full = g.fe().acked_features;
    assert!(full & VIRTIO_NET_F_GUEST_TSO4 != 0, "GUEST_TSO4 acked");
    let gw = gateway_mac(&mut g);
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect");
    let mut got = g
        .tcp_recv_exact(h, 512 << 10, deadline(SHORT))
        .expect("first 512 KiB");
    for offloads_on in [false, true, false, true] {
        // The guest's receive buffer fills (netfence's window to it closes); then netfence
        // may no longer write to the guest, and the guest takes what it holds: its window
        // update makes netfence queue large segments for the features in use.
        // (Nearly: the window is advertised in units of its scale, so the last few bytes
        // of the buffer may never be offered.)
        g.poll_until(deadline(SHORT), |g| {
            (g.tcp(h).recv_queue() + 4 * 1460 >= TCP_BUF).then_some(())
        })
        .expect("the guest's receive buffer did not fill");
        g.fe()
            .vu
            .set_vring_enable(RX_QUEUE, false)
            .expect("SET_VRING_ENABLE 0");
        let held = g.tcp(h).recv_queue();
        got.extend(
            g.tcp_recv_exact(h, held, deadline(SHORT))
                .unwrap_or_else(|e| panic!("before the change: {e}")),
        );
        g.poll();
        settle_tx(&mut g, gw);
        let without = if offloads_on { 0 } else { OFFLOAD_BITS };
        let fe = g.fe();
        fe.vu.set_features(full & !without).expect("SET_FEATURES");
        fe.backend_acked = full & !without;
        fe.acked_features = acked_full & !without;
        fe.vu
            .set_vring_enable(RX_QUEUE, true)
            .expect("SET_VRING_ENABLE 1");
        got.extend(
            g.tcp_recv_exact(h, 256 << 10, deadline(SHORT))
                .unwrap_or_else(|e| panic!("after the change to offloads {offloads_on}: {e}")),
        );
    }
    let (rest, eof) = g.tcp_recv_to_eof(h, deadline(LONG));
    got.extend(rest);
    assert!(eof, "the download did not end with a FIN");
    if let Some(m) = mismatch(&got, &pattern(TOTAL, 81)) {
        panic!("downloaded bytes differ: {m}");
    }
    server.join(SHORT).expect("server").expect("server wrote");
    g.ping(GATEWAY, SHORT).unwrap_or_else(|e| panic!("{e}"));
}

/// A server that echoes what it reads until EOF (a bulk flow both ways).
fn echo_until_eof() -> OneShotServer<()> {
    OneShotServer::start(|mut s| {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// The guest reboots (rings restarted from zero) in the middle of bulk transfers both ways on
/// several flows, three times over, each time with other offloads acked in between: the
/// sockets' buffers (mappings committed on demand) are given back only after smoltcp has
/// forgotten the sockets. New flows after each reboot move data byte-exact; netfence stays up.
#[test]
fn reboots_during_bulk_transfers() {
    const FLOWS: u16 = 4;
    const ROUNDS: usize = 3;
    let servers: Vec<Vec<OneShotServer<()>>> = (0..=ROUNDS)
        .map(|_| (0..FLOWS).map(|_| echo_until_eof()).collect())
        .collect();
    let mut args = Vec::new();
    for (round, set) in servers.iter().enumerate() {
        for (i, s) in set.iter().enumerate() {
            args.push("--map".to_string());
            args.push(format!(
                "{PUBLIC_IP}:{}=127.0.0.1:{}",
                1000 + round * 10 + i,
                s.port()
            ));
        }
    }
    let mut nf = Netfence::spawn(&args);
    let mut g = guest(&nf);
    let full = g.fe().backend_acked;
    for round in 0..=ROUNDS {
        g.dhcp(SHORT * 2)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let data = pattern(1 << 20, round as u64);
        let handles: Vec<_> = (0..FLOWS)
            .map(|i| {
                g.tcp_connect(PUBLIC_IP, 1000 + (round * 10) as u16 + i, SHORT)
                    .unwrap_or_else(|e| panic!("round {round} flow {i}: {e:?}"))
            })
            .collect();
        if round == ROUNDS {
            // The last round runs to the end, byte-exact.
            for (i, h) in handles.into_iter().enumerate() {
                let got = g
                    .tcp_transfer(h, &data, true, deadline(LONG))
                    .unwrap_or_else(|e| panic!("last round flow {i}: {e}"));
                if let Some(m) = mismatch(&got, &data) {
                    panic!("last round flow {i}: echoed bytes differ: {m}");
                }
            }
            break;
        }
        // Push and pull on every flow until each has moved a few hundred KiB.
        let mut sent = vec![0usize; handles.len()];
        let mut received = vec![0usize; handles.len()];
        g.poll_until(deadline(LONG), |g| {
            for (k, &h) in handles.iter().enumerate() {
                let s = g.tcp(h);
                if s.can_send() && sent[k] < data.len() {
                    sent[k] += s.send_slice(&data[sent[k]..]).unwrap_or(0);
                }
                while s.can_recv() {
                    received[k] += s.recv(|b| (b.len(), b.len())).unwrap_or(0);
                }
            }
            received.iter().all(|&r| r >= 300 << 10).then_some(())
        })
        .unwrap_or_else(|| panic!("round {round}: flows stuck at {received:?}"));
        // Other offloads for a moment (the interface is rebuilt under the live sockets).
        let fe = g.fe();
        fe.vu
            .set_features(full & !OFFLOAD_BITS)
            .expect("SET_FEATURES");
        fe.vu.set_features(full).expect("SET_FEATURES");
        // The reboot, with data in flight both ways.
        g.fe().stop().expect("stop");
        g.fe().restart_vrings_fresh().expect("restart from 0");
        let Guest { dev, .. } = g;
        g = Guest::new(dev.fe);
    }
    g.ping(GATEWAY, SHORT).unwrap_or_else(|e| panic!("{e}"));
    assert!(nf.is_running(), "netfence died");
    assert_eq!(
        nf.log_text().matches("link reset").count(),
        ROUNDS,
        "every reboot resets the link"
    );
}

/// A guest sends the second half of its data before the first and then waits past the rest
/// period (buffers with nothing in order are given back after 2 s): the out-of-order half sits
/// in smoltcp's receive ring, so the ring must not be given back under it. When the gap is
/// filled, the host gets every byte as sent.
#[test]
fn out_of_order_bytes_survive_a_rest() {
    const SINK_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
    let sink = OneShotServer::start(|mut s| {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{SINK_IP}:80=127.0.0.1:{}", sink.port()),
    ]);
    let mut g = guest(&nf);
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let mut c = RawConn::open(&mut g, SINK_IP, 80);
    let data = pattern(12_000, 91);
    let (first, second) = data.split_at(6_000);
    // Something in order first, so that the flow has moved bytes (and committed pages).
    let lead = pattern(3000, 92);
    g.fe()
        .send_frame(&c.frame(c.seq, Flags::ACK, &lead[..1400]));
    g.fe()
        .send_frame(&c.frame(c.seq + 1400, Flags::ACK, &lead[1400..]));
    c.seq += 3000;
    assert!(c.wait_acked(&mut g, c.seq), "lead not acknowledged");
    // The second part, in MTU-sized segments, before the first.
    for (k, piece) in second.chunks(1400).enumerate() {
        let seq = c.seq + 6000 + (k * 1400) as u32;
        g.fe().send_frame(&c.frame(seq, Flags::ACK, piece));
    }
    settle_tx(&mut g, c.gw);
    // The rest period (2 s) and a housekeeping tick pass with the gap open. Nothing to wait
    // for but time: netfence says nothing when it gives memory back.
    std::thread::sleep(Duration::from_millis(3500));
    for (k, piece) in first.chunks(1400).enumerate() {
        let seq = c.seq + (k * 1400) as u32;
        g.fe().send_frame(&c.frame(seq, Flags::ACK, piece));
    }
    c.seq += data.len() as u32;
    assert!(
        c.wait_acked(&mut g, c.seq),
        "gap filled but not acknowledged"
    );
    let fin = Flags {
        fin: true,
        ..Flags::ACK
    };
    g.fe().send_frame(&c.frame(c.seq, fin, &[]));
    let got = sink.join(SHORT).expect("sink");
    let mut want = lead.clone();
    want.extend_from_slice(&data);
    if let Some(m) = mismatch(&got, &want) {
        panic!("the host got other bytes than the guest sent: {m}");
    }
}

/// netfence's resident set in KiB.
fn rss_kib(nf: &Netfence) -> u64 {
    let pid = nf.pid().expect("netfence running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// A loopback listener whose accept queue is full and never drained: a connect to it stays
/// in progress (Linux drops SYNs to a full accept queue), as to a host that does not answer.
fn unanswering_listener() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
    use std::os::fd::AsRawFd;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    // SAFETY: listen(2) on our own socket, to shrink its backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let addr = l.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => queued.push(s),
            Err(_) => break,
        }
        assert!(queued.len() < 16, "the accept queue does not fill");
    }
    (l, queued)
}

/// SYNs carrying 60 KB each (TSO frames) to a host that does not answer: each flow holds its
/// SYN while the host side connects, for up to the connect timeout. The SYN's data is not
/// held with it (smoltcp takes none from a SYN): 200 such flows cost netfence a few hundred
/// KiB, not 12 MB.
#[test]
fn held_syns_do_not_hold_their_data() {
    const SYNS: u16 = 200;
    let (listener, _queued) = unanswering_listener();
    const SLOW_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 40);
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!(
            "{SLOW_IP}:80=127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        ),
    ]);
    let mut g = guest(&nf);
    let mark = nf.log_mark();
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let gw = gateway_mac(&mut g);
    let (src, dst) = (IpAddr::V4(GUEST_IP), IpAddr::V4(SLOW_IP));
    let data = pattern(60_000, 99);
    let mac = g.mac;
    let syn = |sport: u16| {
        let seg = frames::tcp_segment(src, dst, sport, 80, 1, 0, Flags::SYN, 65535, &data);
        let mut f = frames::ip_frame(mac, gw, src, dst, 6, &seg);
        let cs = make_partial(&mut f, src, dst);
        let hdr = NetHdr {
            flags: NET_HDR_F_NEEDS_CSUM,
            gso_type: NET_HDR_GSO_TCPV4,
            hdr_len: cs + 24,
            gso_size: 1448,
            csum_start: cs,
            csum_offset: 16,
            num_buffers: 0,
        };
        (hdr, f)
    };
    // One first, so that what every flow shares is in the baseline.
    let (hdr, f) = syn(30000);
    send_with(&mut g, &hdr, &f);
    settle_tx(&mut g, gw);
    let before = rss_kib(&nf);
    for k in 1..SYNS {
        let (hdr, f) = syn(30000 + k);
        send_with(&mut g, &hdr, &f);
    }
    settle_tx(&mut g, gw);
    let after = rss_kib(&nf);
    eprintln!("netfence RSS: {before} KiB, {after} KiB with {SYNS} held SYNs of 60 KB");
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(
        counts.get("open_tcp"),
        u64::from(SYNS),
        "the SYNs' flows were not all held: {}",
        nf.log_text()
    );
    assert!(
        after <= before + 8 * u64::from(SYNS),
        "{SYNS} held SYNs cost {} KiB",
        after - before
    );
}
