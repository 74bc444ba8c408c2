//! The same traffic over different virtio/vhost-user shapes a frontend may choose: feature
//! subsets, queue sizes, RX buffer layouts (mergeable or not, tiny buffers, few buffers),
//! split headers, memory layouts (GPA base, several regions, SET_MEM_TABLE vs ADD_MEM_REG).
//! Each run: DHCP, ping, then 256 KiB up and 1 MiB down over TCP, byte-exact.

mod common;

use common::frontend::*;
use common::servers::*;
use common::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

fn exercise(opts: FrontendOptions) -> FrontendStats {
    const UP: usize = 256 << 10;
    const DOWN: usize = 1 << 20;
    let up = pattern(UP, 11);
    let down = pattern(DOWN, 12);
    let (up2, down2) = (up.clone(), down.clone());
    let server = OneShotServer::exchange(up2, down2);
    let mut args = vec![
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
    ];
    if !opts
        .protocol_features
        .contains(VhostUserProtocolFeatures::CONFIG)
    {
        // Without GET_CONFIG the guest uses its own MAC: netfence must be told it (it drops
        // frames from any other MAC), as the VMM's operator would.
        let m = opts.fallback_mac;
        args.push("--guest-mac".to_string());
        args.push(format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        ));
    }
    let nf = Netfence::spawn(&args);
    let mut g = guest_with(&nf, opts);
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    g.ping(GATEWAY, SHORT).unwrap_or_else(|e| panic!("{e}"));
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let got = g
        .tcp_transfer(h, &up, true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.len(), DOWN);
    if let Some(m) = mismatch(&got, &down) {
        panic!("downloaded bytes differ: {m}");
    }
    let (uploaded, written) = server.join_polling(&mut g, SHORT).unwrap();
    assert_eq!(written, Ok(()), "the server's download");
    match uploaded {
        Ok(None) => {}
        Ok(Some(m)) => panic!("uploaded bytes differ: {m}; {}", g.dev.fe.debug_state()),
        Err(e) => panic!("server: {e}"),
    }
    let st = g.dev.fe.stats.clone();
    assert_eq!(
        st.rx_partial_merge, 0,
        "merged frame published before all its buffers: {st:?}"
    );
    // The frontend itself fails on a GSO frame or a partial checksum the guest did not ack.
    if g.dev.fe.acked_features & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6) == 0 {
        assert_eq!(
            st.rx_nonzero_gso, 0,
            "GSO frame without GSO negotiated: {st:?}"
        );
    }
    assert_eq!(g.dev.tx_dropped, 0);
    st
}

#[test]
fn cloud_hypervisor_defaults() {
    exercise(FrontendOptions::default());
}

#[test]
fn mergeable_rx_with_tiny_buffers() {
    let o = FrontendOptions {
        rx_buf_size: 256,
        ..Default::default()
    };
    let st = exercise(o);
    assert!(
        st.rx_merged_frames > 0,
        "no frame spanned several buffers: {st:?}"
    );
}

#[test]
fn few_rx_buffers() {
    // Four 2 KiB buffers: netfence must wait for the guest to repost, not drop or stall.
    let o = FrontendOptions {
        rx_buffers: Some(4),
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn few_tiny_mergeable_buffers() {
    // Eight 256-byte buffers: a full-size frame needs six of them at once.
    let o = FrontendOptions {
        rx_buffers: Some(8),
        rx_buf_size: 256,
        ..Default::default()
    };
    let st = exercise(o);
    assert!(st.rx_merged_frames > 0);
}

#[test]
fn without_mergeable_rx_buffers() {
    let o = FrontendOptions {
        features: ch_features() & !VIRTIO_NET_F_MRG_RXBUF,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn without_mergeable_rx_two_descriptor_buffers() {
    let o = FrontendOptions {
        features: ch_features() & !VIRTIO_NET_F_MRG_RXBUF,
        rx_buf_size: 1024,
        rx_descs_per_buf: 2,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn without_event_idx() {
    let o = FrontendOptions {
        features: ch_features() & !VIRTIO_RING_F_EVENT_IDX,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn with_indirect_descriptors_acked() {
    let o = FrontendOptions {
        features: ch_features() | VIRTIO_RING_F_INDIRECT_DESC,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn header_in_its_own_descriptor_and_small_tx_chunks() {
    let o = FrontendOptions {
        tx_split_header: true,
        tx_chunk: 512,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn queue_size_1024() {
    let o = FrontendOptions {
        queue_size: 1024,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn queue_size_64() {
    let o = FrontendOptions {
        queue_size: 64,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn high_gpa_two_regions_add_mem_reg() {
    let o = FrontendOptions {
        mem_base: 1 << 32,
        mem_regions: 2,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn high_gpa_two_regions_set_mem_table() {
    let o = FrontendOptions {
        mem_base: 1 << 32,
        mem_regions: 2,
        use_mem_slots: false,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn without_reply_ack() {
    let o = FrontendOptions {
        protocol_features: ch_protocol_features() - VhostUserProtocolFeatures::REPLY_ACK,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn without_config_protocol_feature() {
    // No GET_CONFIG: the guest uses its own MAC (as a VMM with a configured MAC would).
    let o = FrontendOptions {
        protocol_features: ch_protocol_features() - VhostUserProtocolFeatures::CONFIG,
        fallback_mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55],
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn mac_acked_to_backend() {
    // QEMU-style: VIRTIO_NET_F_MAC is not stripped from SET_FEATURES.
    let o = FrontendOptions {
        strip_mac_from_backend: false,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn every_kick_sent() {
    let o = FrontendOptions {
        always_kick: true,
        ..Default::default()
    };
    exercise(o);
}

#[test]
fn config_space_read_with_a_larger_size() {
    // A VMM may read a larger virtio_net_config (speed, duplex, RSS fields); the first 12 bytes
    // must be the same.
    let nf = Netfence::spawn(&["--guest-mac", "02:00:00:00:00:77", "--mtu", "1280"]);
    for len in [12u32, 17, 24] {
        let o = FrontendOptions {
            config_len: len,
            ..Default::default()
        };
        let fe = Frontend::connect(nf.socket_path(), o)
            .unwrap_or_else(|e| panic!("config_len {len}: {e}"));
        let c = fe.config.unwrap();
        assert_eq!(c.mac, [2, 0, 0, 0, 0, 0x77]);
        assert_eq!(c.mtu, 1280);
        assert_eq!(c.status & VIRTIO_NET_S_LINK_UP, VIRTIO_NET_S_LINK_UP);
    }
}

#[test]
fn backend_features_as_documented() {
    let nf = Netfence::spawn::<&str>(&[]);
    let fe = Frontend::connect_default(nf.socket_path());
    let want = VIRTIO_F_VERSION_1
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_MRG_RXBUF
        | VIRTIO_NET_F_STATUS
        | VIRTIO_NET_F_MTU
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | VHOST_USER_F_PROTOCOL_FEATURES;
    assert_eq!(
        fe.backend_features & want,
        want,
        "missing features: {:#x}",
        want & !fe.backend_features
    );
    let pf = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(
        fe.backend_protocol_features.contains(pf),
        "{:?}",
        fe.backend_protocol_features
    );
    // The checksum and TCP segmentation offloads both ways, and none that netfence does not
    // implement (UDP fragmentation offload, ECN with TSO).
    let offloads = VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_GUEST_TSO4
        | VIRTIO_NET_F_GUEST_TSO6
        | VIRTIO_NET_F_HOST_TSO4
        | VIRTIO_NET_F_HOST_TSO6;
    assert_eq!(fe.backend_features & offloads, offloads);
    let not_offered = VIRTIO_NET_F_GUEST_UFO
        | VIRTIO_NET_F_HOST_UFO
        | VIRTIO_NET_F_GUEST_ECN
        | VIRTIO_NET_F_HOST_ECN;
    assert_eq!(fe.backend_features & not_offered, 0);
}

/// A guest can make TX chains available and never kick for them: QEMU's TCG with one vCPU
/// leaves out the guest's memory barriers, and with them the EVENT_IDX handshake that tells
/// the guest netfence wants a kick (its TX queue then waits for ever with a full ring; seen in
/// real-guest runs). netfence looks at the TX ring whenever anything wakes it, at the latest
/// on its once-a-second timer, so a chain published without a kick is still taken (and
/// counted in the metrics as found waiting).
#[test]
fn tx_chains_published_without_a_kick_are_taken() {
    let control = TempDir::new("unkicked");
    let ctl = control.path().join("nf.ctl");
    let nf = Netfence::spawn(&["--control".to_string(), ctl.display().to_string()]);
    let mut g = guest_up(&nf);
    let ip = g.ip().expect("a DHCP lease");
    let request = frames::arp_request(g.mac, ip, GATEWAY);
    let mac = g.mac;
    let fe = &mut g.dev.fe;
    let (at, len) = fe.stage_tx_frame(&request);
    fe.publish_tx_at_quietly(at, len, false);
    // Nothing else happens on this link: only netfence's own timer can bring it to the ring.
    let reply = fe.recv_matching(deadline(std::time::Duration::from_secs(3)), |f| {
        frames::parse_arp(f)
            .is_some_and(|a| !a.request && a.sender_ip == GATEWAY && a.target_mac == mac)
    });
    assert!(
        reply.is_some(),
        "an ARP request published without a kick was never answered: {}\n{}",
        fe.debug_state(),
        nf.log_text()
    );
    let (found, text) = vring_notifications(&ctl, "tx_found_waiting");
    assert!(
        found.is_some_and(|n| n >= 1),
        "the metrics do not count the chain found waiting: {found:?}\n{text}"
    );
}

/// The same lost handshake the other way: a guest asks for a call (used_event) just as
/// netfence returns the entries it waits for, and its request arrives too late to be seen.
/// Later entries never pass the index it asked for, so without a late call its RX would sleep
/// for good. netfence looks for such requests whenever it wakes (at the latest on its timer)
/// and calls.
#[test]
fn a_call_asked_for_too_late_is_still_sent() {
    let control = TempDir::new("latecall");
    let ctl = control.path().join("nf.ctl");
    let nf = Netfence::spawn(&["--control".to_string(), ctl.display().to_string()]);
    let mut g = guest_up(&nf);
    let ip = g.ip().expect("a DHCP lease");
    let request = frames::arp_request(g.mac, ip, GATEWAY);
    let fe = &mut g.dev.fe;
    // No call wanted for a long while, then a frame for netfence to answer into RX.
    let before = fe.rx.used_idx();
    fe.rx.set_used_event(before.wrapping_add(0x4000));
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    fe.send_frame(&request);
    // Nothing tells us the answer is there (that is the point): watch the used index.
    let until = deadline(SHORT);
    while fe.rx.used_idx() == before && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_ne!(
        fe.rx.used_idx(),
        before,
        "netfence never answered the ARP request"
    );
    fe.rx.drain_call();
    // Now the guest's request arrives, late: a call once the used index passes `before`,
    // which it already has.
    fe.rx.set_used_event(before);
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let mut fd = libc::pollfd {
        fd: fe.call_fds()[0],
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut fd, 1, 3000) };
    assert_eq!(
        ready,
        1,
        "no call came for entries the guest asked to hear about: {}",
        fe.debug_state()
    );
    let (late, text) = vring_notifications(&ctl, "late_call");
    assert!(
        late.is_some_and(|n| n >= 1),
        "the late call is not counted: {late:?}\n{text}"
    );
}

/// `netfence_vring_notifications_total{kind=KIND}` from `ctl metrics`, and the metrics text.
fn vring_notifications(control: &std::path::Path, kind: &str) -> (Option<u64>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netfence"))
        .args(["ctl", "--control"])
        .arg(control)
        .arg("metrics")
        .output()
        .expect("netfence ctl metrics");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let prefix = format!("netfence_vring_notifications_total{{kind=\"{kind}\"}} ");
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok());
    (value, text)
}
