//! VMM connections coming and going: a restarted VM gets networking again, a VMM that dies
//! mid-handshake or mid-flow leaves nothing behind, `--once` exits after its VMM leaves.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::frontend::{RX_QUEUE, TX_QUEUE};
use common::servers::*;
use common::*;
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::VhostBackend;

#[test]
fn reconnect_gets_dhcp_again() {
    let mut nf = Netfence::spawn::<&str>(&[]);
    for round in 0..3 {
        let mut g = guest(&nf);
        let lease = g
            .dhcp(SHORT * 2)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(lease.address.address(), GUEST_IP);
        g.ping(GATEWAY, SHORT)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        drop(g); // the VMM goes away
        assert!(
            nf.is_running(),
            "netfence exited after VMM disconnect (round {round})"
        );
    }
}

#[test]
fn reconnect_after_vmm_died_mid_handshake() {
    let mut nf = Netfence::spawn::<&str>(&[]);
    {
        let vu = VuFrontend::connect(nf.socket_path(), 2).expect("connect");
        vu.set_owner().unwrap();
        let _ = vu.get_features().unwrap();
        // dropped here: socket closed before any memory or vring was set up
    }
    {
        // Dies after memory and rings but before enabling them.
        let o = FrontendOptions::default();
        let fe = Frontend::connect(nf.socket_path(), o).expect("handshake");
        drop(fe);
    }
    let mut g = guest_up(&nf);
    g.ping(GATEWAY, SHORT).unwrap();
    assert!(nf.is_running());
}

#[test]
fn vmm_disconnect_closes_its_host_connections() {
    // The server waits for the guest's data, then for the connection to end.
    let server = OneShotServer::start(|mut s| {
        let mut b = [0u8; 5];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        s.write_all(b"ready").map_err(|e| e.to_string())?;
        // EOF or reset once netfence drops the flow of the vanished VM.
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        Ok::<_, String>((b, r.map(|_| rest.len()).map_err(|e| e.kind())))
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    g.tcp_send_all(h, b"hello", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 5, deadline(SHORT)).unwrap(), b"ready");
    drop(g); // VMM gone with the connection open
    let (hello, end) = server
        .join(Duration::from_secs(10))
        .unwrap_or_else(|e| {
            panic!(
                "host connection still open 10 s after the VMM left: {e}\n{}",
                nf.log_text()
            )
        })
        .unwrap();
    assert_eq!(&hello, b"hello");
    eprintln!("host side saw: {end:?}");
    // And the next VM works.
    let mut g2 = guest_up(&nf);
    g2.ping(GATEWAY, SHORT).unwrap();
}

#[test]
fn once_exits_after_the_vmm_leaves() {
    let mut nf = Netfence::spawn(&["--once"]);
    let mut g = guest_up(&nf);
    g.ping(GATEWAY, SHORT).unwrap();
    drop(g);
    let st = nf
        .wait_exit(SHORT)
        .unwrap_or_else(|| panic!("netfence --once still running after the VMM left"));
    assert!(st.success(), "netfence --once exited with {st:?}");
}

/// QEMU's VM stop: SET_VRING_ENABLE 0 and GET_VRING_BASE on each ring, here while the guest is
/// still transmitting as fast as it can, so the TX ring stops with chains in flight. The bases
/// must match what the device consumed, and the next VM must be served. Whether chains are in
/// flight at the stop is a race with the device (which drains a ring of dropped frames about as
/// fast as the flood fills it): a stop that found the ring drained still checks the bases, and
/// the VM is stopped again, up to `ATTEMPTS` times, until one stop catches chains in flight.
#[test]
fn stop_like_qemu_reports_vring_bases() {
    const ATTEMPTS: usize = 8;
    let nf = Netfence::spawn::<&str>(&[]);
    let mut caught_in_flight = false;
    for attempt in 0..ATTEMPTS {
        let mut g = guest_up(&nf);
        g.ping(GATEWAY, SHORT).unwrap();
        let fe = g.fe();
        let frame = common::frames::garbage_ethernet(fe.guest_mac(), 32 << 10);
        let ((rx_base, tx_base), flood) = fe
            .during_tx_flood(&frame, 512, |vu, _| {
                for q in [RX_QUEUE, TX_QUEUE] {
                    vu.set_vring_enable(q, false).expect("SET_VRING_ENABLE 0");
                }
                let rx = vu.get_vring_base(RX_QUEUE).expect("GET_VRING_BASE 0");
                let tx = vu.get_vring_base(TX_QUEUE).expect("GET_VRING_BASE 1");
                (rx, tx)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("attempt {attempt}: flood {flood:?}, bases RX {rx_base} TX {tx_base}");
        let fe = g.fe();
        let in_flight = fe.tx.next_avail != tx_base as u16;
        // TX: every chain the device took was returned, none after the stop.
        assert_eq!(tx_base, fe.tx.used_idx() as u32, "TX vring base");
        // RX: the device has consumed exactly what it returned.
        assert_eq!(rx_base, fe.rx.used_idx() as u32, "RX vring base");
        drop(g);
        if in_flight {
            caught_in_flight = true;
            break;
        }
    }
    assert!(
        caught_in_flight,
        "TX had nothing in flight at any of {ATTEMPTS} stops"
    );
    let mut g2 = guest_up(&nf);
    g2.ping(GATEWAY, SHORT).unwrap();
}
