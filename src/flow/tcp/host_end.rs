//! The host end of a TCP flow: a non-blocking host socket and what its epoll edges said.
//!
//! The socket is opened when the guest's SYN is allowed and connects at once (so a refusal can
//! fail the guest's connect); it is registered edge-triggered in the flows' epoll, so
//! `readable`/`writable` remember an edge until a read or write reports `WouldBlock`.
//! Keep-alive is on, so a host peer that vanished is noticed even on an idle flow.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

use crate::flow::OpenError;

/// Keep-alive probes start after this much idle time on the host connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Opens a non-blocking host connection to `target`. `Ok` means connected or in progress.
pub fn connect(target: SocketAddr) -> Result<Socket, OpenError> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(OpenError::Socket)?;
    // Non-blocking from the start (SOCK_NONBLOCK): no fcntl round trips.
    let setup = socket.set_tcp_nodelay(true).and_then(|_| {
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(KEEPALIVE_IDLE)
                .with_interval(KEEPALIVE_INTERVAL),
        )
    });
    setup.map_err(OpenError::Socket)?;
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(OpenError::Connect(e)),
    }
}

/// The host side of one flow.
pub struct HostEnd {
    pub socket: Socket,
    /// Where it connects (the address map's target for the guest's destination).
    pub target: SocketAddr,
    pub readable: bool,
    pub writable: bool,
    /// The host closed its sending side.
    pub eof: bool,
    /// We shut down our sending side (the guest's FIN went through).
    pub write_shut: bool,
}

impl HostEnd {
    pub fn new(socket: Socket, target: SocketAddr) -> Self {
        HostEnd {
            socket,
            target,
            readable: false,
            writable: false,
            eof: false,
            write_shut: false,
        }
    }

    /// After the socket reported writable/error while connecting: `Ok(())` if connected.
    pub fn connect_result(&self) -> io::Result<()> {
        if let Some(err) = self.socket.take_error()? {
            return Err(err);
        }
        // A connected socket has a peer; an unconnected one fails here with ENOTCONN.
        self.socket.peer_addr().map(|_| ())
    }

    /// Whether the connect has already completed (right after `connect`: a connect to one of
    /// this host's own addresses completes within the call). One `getpeername`; `false` while
    /// it is in progress or when it failed (the writable edge then tells).
    pub fn connected_now(&self) -> bool {
        self.socket.peer_addr().is_ok()
    }

    /// Half-closes toward the host (the guest sent FIN and all its bytes are out).
    pub fn shutdown_write(&mut self) {
        if !self.write_shut {
            let _ = self.socket.shutdown(Shutdown::Write);
            self.write_shut = true;
        }
    }

    /// Makes closing the socket send an RST instead of a FIN.
    pub fn reset_on_close(&self) {
        let _ = self.socket.set_linger(Some(Duration::ZERO));
    }
}
