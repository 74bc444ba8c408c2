//! The queue of frames waiting for the guest's RX buffers is bounded in bytes
//! (`guest-queue-bytes`), not only in frames: with GUEST_TSO each frame may be 64 KiB. A guest
//! that stops reading its RX ring during a host -> guest transfer makes netfence keep the data
//! in its TCP buffers (and then in the host socket), never more than the bound in the queue;
//! when the guest reads again the transfer completes byte-exact.
//!
//! And the cost of many flows per round: a flow at rest has its smoltcp socket parked out of
//! the set smoltcp polls, and is woken by a segment from the guest or an event on its host
//! socket; parked flows carry bytes both ways again, byte-exact.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::frontend::*;
use common::process::{close_and_count, field};
use common::servers::*;
use common::*;
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpEndpoint};

const BOUND: usize = 128 * 1024;
/// A GSO frame cut into MTU segments for a guest short of buffers gains their headers.
const SEGMENT_HEADERS: usize = 4096;

#[test]
fn a_guest_that_does_not_read_finds_at_most_the_byte_bound_queued() {
    const SIZE: usize = 2 << 20;
    let down = pattern(SIZE, 7);
    let sent = down.clone();
    let server = OneShotServer::start(move |mut s| {
        let r = s.write_all(&sent).map_err(|e| format!("server write: {e}"));
        let _ = s.shutdown(Shutdown::Write);
        r
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
        "--limit".to_string(),
        format!("guest-queue-bytes={BOUND}"),
    ]);
    // GUEST_TSO acked (cloud-hypervisor's features), and few RX buffers: a 64 KiB frame does
    // not fit them, so it also goes through the segmenting path.
    let opts = FrontendOptions {
        rx_buffers: Some(8),
        ..Default::default()
    };
    let mut g = guest_with(&nf, opts);
    let mark = nf.log_mark();
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    assert!(g.dev.fe.acked_features & VIRTIO_NET_F_GUEST_TSO4 != 0);

    // A window far larger than the bound, so that only the queue's bound holds netfence back.
    let h = g.tcp_socket(8 << 20, 4096);
    let local = g.next_port();
    let cx = g.iface.context();
    g.sockets
        .get_mut::<tcp::Socket>(h)
        .connect(cx, IpEndpoint::new(IpAddress::Ipv4(PUBLIC_IP), 80), local)
        .expect("connect");
    g.poll_until(deadline(SHORT), |g| {
        (g.tcp(h).state() == tcp::State::Established).then_some(())
    })
    .expect("connected");

    // The guest looks away for a while (what this test is about, not a synchronisation):
    // its RX ring fills and stays full while the server sends.
    std::thread::sleep(Duration::from_millis(1500));

    let got = g
        .tcp_recv_exact(h, SIZE, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(m) = mismatch(&got, &down) {
        panic!("guest received different bytes: {m}");
    }
    assert_eq!(server.join_polling(&mut g, SHORT).unwrap(), Ok(()));

    let counts = close_and_count(&nf, g, mark);
    let line = nf
        .wait_for_log_after(mark, "link closed", SHORT)
        .expect("link closed line");
    let peak: usize = field(&line, "guest_queue_peak_bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no guest_queue_peak_bytes in {line}"));
    eprintln!(
        "queue peak {peak} bytes, bound {BOUND}, filled {} times",
        counts.get("guest-queue-bytes-full")
    );
    assert!(
        counts.get("guest-queue-bytes-full") > 0,
        "the guest did not read for 1.5 s, yet the queue never reached its bound: {line}"
    );
    assert!(
        peak <= BOUND + SEGMENT_HEADERS,
        "{peak} bytes queued for the guest, bound {BOUND}"
    );
}

/// Flows at rest leave smoltcp's poll (their sockets are parked) and come back when the host
/// sends (a host event wakes them) or the guest does (its segment wakes them): each of them
/// carries bytes both ways byte-exact after resting, then closes cleanly.
#[test]
fn resting_flows_are_parked_and_woken_by_either_side() {
    const FLOWS: usize = 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(FLOWS) {
            h2.lock().unwrap().push(conn.expect("accept"));
        }
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{port}"),
    ]);
    let mut g = guest_up(&nf);
    let mark = nf.log_mark();
    let socks: Vec<_> = (0..FLOWS)
        .map(|_| {
            g.tcp_connect(PUBLIC_IP, 80, SHORT)
                .unwrap_or_else(|e| panic!("connect: {e:?}"))
        })
        .collect();
    g.poll_until(deadline(SHORT), |_| {
        (held.lock().unwrap().len() == FLOWS).then_some(())
    })
    .expect("the server accepted every flow");
    // Rest (well past the 50 ms after which a quiet flow is parked); then a ping to the
    // gateway makes netfence run a round, which parks them.
    g.run_for(Duration::from_millis(300));
    g.ping(GATEWAY, SHORT).expect("ping the gateway");

    // The host speaks first on every resting flow.
    let mut streams = std::mem::take(&mut *held.lock().unwrap());
    // Accept order is not connect order: each stream says which peer port it serves.
    streams.sort_by_key(|s| s.peer_addr().unwrap().port());
    for (i, s) in streams.iter_mut().enumerate() {
        s.write_all(format!("host {i:04}\n").as_bytes()).unwrap();
    }
    let mut by_port: Vec<(u16, _)> = socks
        .iter()
        .map(|h| (g.tcp(*h).local_endpoint().unwrap().port, *h))
        .collect();
    by_port.sort();
    for (i, (_, h)) in by_port.iter().enumerate() {
        let got = g
            .tcp_recv_exact(*h, 10, deadline(SHORT))
            .unwrap_or_else(|e| panic!("flow {i}: {e}"));
        assert_eq!(got, format!("host {i:04}\n").as_bytes(), "flow {i}");
    }
    g.run_for(Duration::from_millis(300));
    g.ping(GATEWAY, SHORT).expect("ping the gateway");

    // Then the guest, which also closes.
    for (i, (_, h)) in by_port.iter().enumerate() {
        let msg = pattern(3000, i as u64);
        assert_eq!(g.tcp(*h).send_slice(&msg), Ok(msg.len()));
        g.tcp(*h).close();
    }
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| std::thread::spawn(move || read_to_eof(&mut s)))
        .collect();
    g.poll_until(deadline(LONG), |_| {
        readers.iter().all(|r| r.is_finished()).then_some(())
    })
    .expect("every flow reached the server and closed");
    for (i, r) in readers.into_iter().enumerate() {
        let got = r
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("flow {i}: {e}"));
        assert!(got == pattern(3000, i as u64), "flow {i}: bytes differ");
    }
    let counts = close_and_count(&nf, g, mark);
    assert!(
        counts.get("tcp-flows-parked") >= 2 * FLOWS as u64,
        "flows parked {} times, expected each flow twice",
        counts.get("tcp-flows-parked")
    );
}
