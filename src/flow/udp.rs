//! A guest UDP "connection": one connected host socket per (guest source, destination) pair.
//!
//! The first datagram of a pair is judged by the policy; later ones follow that decision.
//! Replies from the host socket are turned into frames from the destination the guest used.
//! A session idle for longer than its timeout is closed.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Idle time after which a UDP session is closed.
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct UdpFlow {
    pub token: u64,
    pub guest: SocketAddr,
    pub dst: SocketAddr,
    pub host: UdpSocket,
    pub last_active: Instant,
    pub datagrams_to_host: u64,
    pub datagrams_to_guest: u64,
}

/// Opens a non-blocking UDP socket connected to `target`.
pub fn open_host(target: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal address"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal address"),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_nonblocking(true)?;
    socket.connect(target)?;
    Ok(socket)
}

impl UdpFlow {
    pub fn idle(&self, now: Instant) -> bool {
        now.duration_since(self.last_active) > UDP_IDLE_TIMEOUT
    }
}
