//! A guest UDP "connection": one connected host socket per (guest source, destination) pair.
//!
//! The first datagram of a pair is judged by the policy; later ones follow that decision.
//! Replies from the host socket are turned into frames from the destination the guest used,
//! but only while the guest's queue has room: a slow guest leaves datagrams in the host
//! socket's receive buffer (where the kernel drops the excess), never in ours. An ICMP error
//! the kernel reports for the host socket (port unreachable) goes back to the guest as one.
//! A session idle for longer than `udp-idle-secs` is closed.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::OpenError;

pub struct UdpFlow {
    pub token: u64,
    pub guest: SocketAddr,
    pub dst: SocketAddr,
    pub host: UdpSocket,
    /// The host socket reported readable and has not yet said `WouldBlock`.
    pub readable: bool,
    pub last_active: Instant,
    pub datagrams_to_host: u64,
    pub datagrams_to_guest: u64,
}

/// Opens a non-blocking UDP socket connected to `target`.
pub fn open_host(target: SocketAddr) -> Result<UdpSocket, OpenError> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::DGRAM.cloexec(),
        Some(Protocol::UDP),
    )
    .map_err(OpenError::Socket)?;
    socket.set_nonblocking(true).map_err(OpenError::Socket)?;
    socket
        .connect(&SockAddr::from(target))
        .map_err(OpenError::Connect)?;
    Ok(socket.into())
}

impl UdpFlow {
    pub fn new(
        token: u64,
        guest: SocketAddr,
        dst: SocketAddr,
        host: UdpSocket,
        now: Instant,
    ) -> Self {
        UdpFlow {
            token,
            guest,
            dst,
            host,
            readable: false,
            last_active: now,
            datagrams_to_host: 0,
            datagrams_to_guest: 0,
        }
    }

    pub fn idle(&self, now: Instant, timeout: Duration) -> bool {
        now.duration_since(self.last_active) > timeout
    }
}

/// Whether a socket error is the kernel relaying "nobody listens there" for a connected socket.
pub fn is_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECONNREFUSED)
}
