//! The netfence test harness: a vhost-user frontend with memfd guest memory and a guest-side
//! smoltcp stack, driving a real netfence process over its socket.
//!
//! - [`process`]: spawn netfence, capture its log, wait for log lines (no sleeps).
//! - [`memory`], [`virtq`]: guest memory and a split virtqueue driver in it.
//! - [`frontend`]: the vhost-user handshake (as cloud-hypervisor does it), send/receive frames,
//!   malformed descriptor chains.
//! - [`guest`]: smoltcp `Device` + helpers for DHCP, ping, TCP, UDP; raw-frame exchange.
//! - [`frames`], [`frames6`]: build and parse single frames of either IP family, and what only
//!   IPv6 has (neighbor discovery), with `smoltcp::wire`.
//! - [`denied`]: the denied-destination steps (dropped or rejected SYN) of both families.
//! - [`servers`]: loopback TCP/UDP servers for the host side, and a tripwire.
//! - [`dpdk`]: dpdk-testpmd as an independent frontend, a counting UDP sink, CPU use of a process.
//!
//! A test in a few lines:
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn example() {
//!     let echo = servers::TcpEchoServer::start();
//!     let nf = Netfence::spawn(&["--map".to_string(), format!("{PUBLIC_IP}:80=127.0.0.1:{}", echo.port())]);
//!     let mut g = guest_up(&nf); // handshake + DHCP
//!     let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).unwrap();
//!     g.tcp_send_all(h, b"hi", deadline(SHORT)).unwrap();
//!     assert_eq!(g.tcp_recv_exact(h, 2, deadline(SHORT)).unwrap(), b"hi");
//!     assert_eq!(nf.wait_for_decision(&format!("{PUBLIC_IP}:80"), SHORT).unwrap().action, "allow");
//! }
//! ```
//!
//! Rules the tests follow: every test starts its own netfence on its own socket; waits are on
//! events (call eventfds via poll(2), condvars, channels) bounded by deadlines, never sleeps;
//! on failure the netfence log is printed (the `Netfence` drop does it) and ring state is in
//! the message (`Frontend::debug_state`).
//!
//! The one network rule: tests only ever reach 127.0.0.0/8 and ::1. "Public" destinations are
//! documentation addresses (203.0.113.0/24, 2001:db8::/32) that netfence's `--map` sends to
//! loopback servers; destinations that must never be reached are mapped to a
//! [`servers::Tripwire`].
#![allow(dead_code)]

pub mod denied;
pub mod dpdk;
pub mod frames;
pub mod frames6;
pub mod frontend;
pub mod guest;
pub mod memory;
pub mod process;
pub mod real_guest;
pub mod servers;
pub mod tls;
pub mod virtq;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use frontend::{BadChain, Frontend, FrontendOptions};
#[allow(unused_imports)]
pub use guest::{ConnectError, Guest, Lease};
pub use process::Netfence;

/// Slot 0 addressing (172.16.0.0/30): gateway and guest.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// A documentation-range "public" address tests map to loopback servers.
pub const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// A private destination the default policy denies.
pub const PRIVATE_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);

/// Slot 0 IPv6 addressing (default ipv6_pool fd42:6d73:62::/48): the guest's on-link prefix,
/// the gateway's global address (in the policy's `host` group), the gateway's link-local
/// address (source of router advertisements, the guest's default router) and the address the
/// harness guest takes in the prefix.
pub const PREFIX6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 0);
pub const PREFIX6_LEN: u8 = 64;
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 1);
pub const GATEWAY6_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
pub const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 2);
/// A documentation-range (2001:db8::/32, `public` group) address tests map to loopback.
pub const PUBLIC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
/// A private (fc00::/7) destination the default policy denies.
pub const PRIVATE6: Ipv6Addr = Ipv6Addr::new(0xfd12, 0x3456, 0, 0, 0, 0, 0, 1);

/// Generous upper bounds; tests finish far sooner when things work.
pub const SHORT: Duration = Duration::from_secs(5);
pub const LONG: Duration = Duration::from_secs(60);
/// How long "no answer" is watched for.
pub const SILENCE: Duration = Duration::from_millis(1500);

pub fn deadline(d: Duration) -> Instant {
    Instant::now() + d
}

/// A private scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).ok();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connects a cloud-hypervisor-like frontend to `nf` and wraps it in a guest stack.
pub fn guest(nf: &Netfence) -> Guest {
    guest_with(nf, FrontendOptions::default())
}

pub fn guest_with(nf: &Netfence, opts: FrontendOptions) -> Guest {
    let fe = Frontend::connect(nf.socket_path(), opts)
        .unwrap_or_else(|e| panic!("vhost-user handshake failed: {e}\n{}", nf.log_text()));
    Guest::new(fe)
}

/// A guest that has its DHCP lease.
pub fn guest_up(nf: &Netfence) -> Guest {
    let mut g = guest(nf);
    if let Err(e) = g.dhcp(SHORT * 2) {
        panic!("{e}");
    }
    g
}

/// The gateway's MAC, from ARP for [`GATEWAY`] (the same MAC answers for IPv6).
pub fn gateway_mac(g: &mut Guest) -> [u8; 6] {
    g.arp_raw(GATEWAY, SHORT)
        .expect("ARP reply for the gateway")
        .sender_mac
}

/// A guest that has its DHCP lease and, beside it, static IPv6: [`GUEST6`]/64, its EUI-64
/// link-local address and a default route via [`GATEWAY6_LL`] (what a dual-stack guest has
/// after SLAAC; the router advertisement itself is tested separately).
pub fn guest_up6(nf: &Netfence) -> Guest {
    let mut g = guest_up(nf);
    g.set_ipv6(GUEST6, PREFIX6_LEN, GATEWAY6_LL);
    g
}
