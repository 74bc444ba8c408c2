//! A guest TCP connection carried over a host TCP socket.
//!
//! Theory of operation: the guest's SYN is held while netfence connects the host socket
//! (non-blocking). Only when the host side is connected does a smoltcp socket start listening on
//! the guest's destination and receive the held SYN, so the guest's handshake completes exactly
//! when the far end accepted; a refusal becomes an RST to the guest instead. Then bytes move
//! both ways with no buffer of our own: host -> guest reads the host socket straight into
//! smoltcp's send buffer only while it has room, guest -> host writes smoltcp's receive buffer
//! straight into the host socket only while it accepts. A full buffer on either side closes the
//! TCP window on the other (backpressure). FIN becomes shutdown(SHUT_WR) and back; an RST or a
//! socket error on either side aborts the other side.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpListenEndpoint};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Bytes of smoltcp buffer per direction per connection: the most a flow holds.
pub const TCP_BUFFER_BYTES: usize = 512 * 1024;

pub enum TcpPhase {
    /// Host connect in progress; the guest's SYN waits here.
    Connecting { syn_frame: Vec<u8> },
    /// The guest's handshake was completed first (to read its TLS ClientHello); the host
    /// connect is in progress. The guest's bytes wait in the smoltcp socket.
    ConnectingAfterHello { handle: SocketHandle },
    /// Handshake handed to smoltcp; bytes flow.
    Open { handle: SocketHandle },
}

pub struct TcpFlow {
    pub token: u64,
    pub guest: SocketAddr,
    pub dst: SocketAddr,
    pub host_target: SocketAddr,
    pub host: Socket,
    pub phase: TcpPhase,
    pub started: Instant,
    pub readable: bool,
    pub writable: bool,
    pub host_eof: bool,
    pub host_write_shut: bool,
    /// The guest's FIN was seen (its data ends where the receive buffer ends).
    pub guest_fin_seen: bool,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
}

/// What happened to a flow in one pump.
#[derive(Debug, PartialEq, Eq)]
pub enum PumpResult {
    Alive,
    /// Both sides are done; remove the flow.
    Finished,
    /// One side failed; the other was reset.
    Aborted(&'static str),
}

/// Opens a non-blocking host connection. `Ok` means connected or in progress.
pub fn connect_host(target: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

/// After the host socket reported writable/error while connecting: `Ok(())` if connected.
pub fn connect_result(socket: &Socket) -> io::Result<()> {
    if let Some(err) = socket.take_error()? {
        return Err(err);
    }
    // A connected socket has a peer; an unconnected one fails here with ENOTCONN.
    socket.peer_addr().map(|_| ())
}

/// A smoltcp socket listening on the guest's destination, ready for the held SYN.
pub fn listening_socket(dst: SocketAddr) -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER_BYTES]);
    let tx = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER_BYTES]);
    let mut socket = tcp::Socket::new(rx, tx);
    socket.set_nagle_enabled(false);
    // smoltcp's delayed ACK stays on (10 ms; every second full segment is ACKed at once): it
    // halves the frames sent while the guest uploads. A closed flow's socket lingers a little
    // so that its last delayed ACK still goes out (`Datapath::close_tcp`).
    let endpoint = IpListenEndpoint {
        addr: Some(IpAddress::from(dst.ip())),
        port: dst.port(),
    };
    // Listening fails only for port 0, which the classifier never lets through as a new flow.
    let _ = socket.listen(endpoint);
    socket
}

enum ReadStep {
    Data(usize),
    Again,
    Eof,
    Failed,
}

impl TcpFlow {
    /// A flow whose host socket is connecting; `key` is (guest source, guest-visible dst).
    pub fn new(
        token: u64,
        key: (SocketAddr, SocketAddr),
        host_target: SocketAddr,
        host: Socket,
        phase: TcpPhase,
    ) -> Self {
        TcpFlow {
            token,
            guest: key.0,
            dst: key.1,
            host_target,
            host,
            phase,
            started: Instant::now(),
            readable: false,
            writable: false,
            host_eof: false,
            host_write_shut: false,
            guest_fin_seen: false,
            bytes_to_host: 0,
            bytes_to_guest: 0,
        }
    }

    /// Moves bytes both ways as far as both sides allow, and propagates FIN and RST.
    pub fn pump(&mut self, sockets: &mut SocketSet<'static>) -> PumpResult {
        let TcpPhase::Open { handle } = self.phase else {
            return PumpResult::Alive;
        };
        let sock = sockets.get_mut::<tcp::Socket>(handle);

        // Guest -> host.
        while self.writable && sock.can_recv() {
            let host = &mut self.host;
            let result = sock.recv(|buf| match host.write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match result {
                Ok(Ok(n)) => self.bytes_to_host += n as u64,
                Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                Ok(Err(_)) | Err(_) => {
                    sock.abort();
                    return PumpResult::Aborted("host write failed");
                }
            }
        }

        // Host -> guest.
        while self.readable && !self.host_eof && sock.can_send() {
            let host = &mut self.host;
            let step = sock.send(|buf| match host.read(buf) {
                Ok(0) => (0, ReadStep::Eof),
                Ok(n) => (n, ReadStep::Data(n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => (0, ReadStep::Again),
                Err(e) if e.kind() == ErrorKind::Interrupted => (0, ReadStep::Data(0)),
                Err(_) => (0, ReadStep::Failed),
            });
            match step {
                Ok(ReadStep::Data(n)) => self.bytes_to_guest += n as u64,
                Ok(ReadStep::Again) => self.readable = false,
                Ok(ReadStep::Eof) => {
                    self.host_eof = true;
                    sock.close();
                }
                Ok(ReadStep::Failed) | Err(_) => {
                    sock.abort();
                    return PumpResult::Aborted("host connection reset");
                }
            }
        }

        // The guest sent FIN and everything before it reached the host: half-close the host.
        if matches!(
            sock.state(),
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
        ) {
            self.guest_fin_seen = true;
        }
        if self.guest_fin_seen && !sock.can_recv() && !self.host_write_shut {
            let _ = self.host.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }

        match sock.state() {
            // Done once the guest's last bytes are on the host socket.
            tcp::State::TimeWait => {
                if self.host_write_shut {
                    PumpResult::Finished
                } else {
                    PumpResult::Alive
                }
            }
            tcp::State::Closed => {
                if self.guest_fin_seen {
                    if self.host_write_shut {
                        PumpResult::Finished
                    } else {
                        PumpResult::Alive
                    }
                } else {
                    // The guest reset the connection: reset the host side too.
                    let _ = self.host.set_linger(Some(std::time::Duration::ZERO));
                    PumpResult::Aborted("guest reset")
                }
            }
            _ => PumpResult::Alive,
        }
    }
}
