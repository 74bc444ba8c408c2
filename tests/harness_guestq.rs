//! The queue of frames waiting for the guest's RX buffers is bounded in bytes
//! (`guest-queue-bytes`), not only in frames: with GUEST_TSO each frame may be 64 KiB. A guest
//! that stops reading its RX ring during a host -> guest transfer makes netfence keep the data
//! in its TCP buffers (and then in the host socket), never more than the bound in the queue;
//! when the guest reads again the transfer completes byte-exact.

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
