//! TLS interception: a middle stage that terminates the guest's TLS and speaks TLS upstream.
//!
//! Theory of operation. The SNI gate has judged the ClientHello's name and the policy allowed
//! it; the host end is already connected. The stage then:
//!
//! 1. reads the guest's ClientHello into a rustls `Acceptor` (the bytes are taken from the guest
//!    end's buffer now) and learns the ALPN protocols the guest offers;
//! 2. connects upstream with its own rustls client, same SNI, offering those protocols (only
//!    `http/1.1` when secrets may be substituted: headers of other protocols are not read), and
//!    verifies the upstream's certificate as `[tls]` says. If that fails, the guest's handshake
//!    fails with a fatal TLS alert, never a silent downgrade;
//! 3. answers the guest with a leaf certificate for the name (from the link's leaf cache),
//!    selecting the protocol the upstream accepted;
//! 4. relays plaintext both ways. The guest's plaintext passes through an optional filter (secret
//!    substitution) before it is encrypted upstream.
//!
//! Every buffer is bounded: ciphertext is read from one side only while rustls wants it, and
//! plaintext is moved only while the other side's rustls send buffer has room, so a slow side
//! closes the other side's window as in a plain flow; the data put into the guest end counts
//! against the flow's share of `tcp-link-buffer-bytes` as a plain flow's does. A pump moves
//! rounds until nothing moves (each round is held to the rustls buffers, and no event may come
//! to pump again once the guest has sent everything). Closing is propagated with close_notify
//! and FIN; any TLS error resets both ends.

use std::io::{self, ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use rustls::server::{Accepted, Acceptor};
use rustls::{ClientConnection, Connection};
use smoltcp::socket::tcp;

use super::host_end::HostEnd;
use crate::secrets::{HttpRequestRewriter, StreamError};
use crate::tls::{Interception, LeafCache};

/// Plaintext moved from one side to the other per step, at most.
const PLAINTEXT_CHUNK: usize = 16 * 1024;
/// rustls buffers at most this much plaintext waiting to be encrypted and sent, per side.
const SEND_BUFFER_LIMIT: usize = 64 * 1024;
/// ALPN protocols passed on (others the guest offers are dropped).
const KNOWN_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why an intercepted connection ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterceptError {
    /// The upstream's TLS failed (its certificate, its handshake); the guest got an alert.
    Upstream(String),
    /// The guest's TLS failed.
    Guest(String),
    /// The secrets rewriter refused the guest's plaintext (a violation, a bad request).
    Secret(StreamError),
    /// A socket failed.
    Io(String),
}

impl std::fmt::Display for InterceptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InterceptError::Upstream(e) => write!(f, "upstream TLS failed: {e}"),
            InterceptError::Guest(e) => write!(f, "guest TLS failed: {e}"),
            InterceptError::Secret(e) => write!(f, "{e}"),
            InterceptError::Io(e) => write!(f, "socket failed: {e}"),
        }
    }
}

/// Where the interception is.
enum Phase {
    /// Reading the guest's ClientHello.
    Hello(Box<Acceptor>),
    /// The guest's hello is in; the upstream handshake runs.
    Upstream(Box<Accepted>),
    /// Both connections exist.
    Relay(Box<Connection>),
    /// Finished (or failed): nothing more moves.
    Done,
}

/// What one pump of the stage came to.
#[derive(Debug, PartialEq, Eq)]
pub enum InterceptStep {
    Alive,
    /// Both sides closed cleanly, and the guest's TCP connection is through its close.
    Finished,
    /// The guest reset its connection before the upstream closed: the upstream is reset too.
    GuestReset,
    Failed(InterceptError),
}

/// One intercepted connection.
pub struct Interceptor {
    name: String,
    phase: Phase,
    upstream: Option<Box<ClientConnection>>,
    /// Secret substitution in the guest's requests (only `http/1.1` is then offered).
    filter: Option<HttpRequestRewriter>,
    /// Only `http/1.1` is offered (secrets may be substituted in this connection's requests).
    http1_only: bool,
    /// When the stage started; a handshake not done by the deadline fails.
    pub started: Instant,
    /// Plaintext from the guest that the upstream's send buffer did not take yet.
    pending_to_host: Vec<u8>,
    /// Plaintext from the upstream that the guest's send buffer did not take yet.
    pending_to_guest: Vec<u8>,
    guest_closed: bool,
    host_closed: bool,
    /// close_notify sent upstream / to the guest (after every byte before it).
    closed_upstream: bool,
    closed_to_guest: bool,
    /// The fatal alert owed to the guest, if the upstream failed before the guest handshake.
    alert_owed: bool,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
}

/// `handshake_failure`, fatal, as a TLS 1.2 record (clients of every version read it).
const FATAL_HANDSHAKE_FAILURE: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

fn tls_err(e: rustls::Error) -> String {
    e.to_string()
}

/// The ALPN protocols to offer upstream for what the guest offered: the known ones, only
/// `http/1.1` when `http1_only`.
fn upstream_alpn(offered: Option<Vec<&[u8]>>, http1_only: bool) -> Vec<Vec<u8>> {
    offered
        .unwrap_or_default()
        .into_iter()
        .filter(|p| KNOWN_ALPN.contains(p))
        .filter(|p| !http1_only || *p == b"http/1.1")
        .map(|p| p.to_vec())
        .collect()
}

impl Interceptor {
    /// An interception of a connection to `name`; with `filter` (secrets), only `http/1.1` is
    /// offered, since only its requests are parsed.
    pub fn new(name: &str, filter: Option<HttpRequestRewriter>, now: Instant) -> Self {
        Interceptor {
            name: name.to_string(),
            phase: Phase::Hello(Box::default()),
            upstream: None,
            http1_only: filter.is_some(),
            filter,
            started: now,
            pending_to_host: Vec::new(),
            pending_to_guest: Vec::new(),
            guest_closed: false,
            host_closed: false,
            closed_upstream: false,
            closed_to_guest: false,
            alert_owed: false,
            bytes_to_host: 0,
            bytes_to_guest: 0,
        }
    }

    /// Frees the plaintext staging buffers once they are empty (the flow is at rest).
    pub fn shrink(&mut self) {
        for pending in [&mut self.pending_to_host, &mut self.pending_to_guest] {
            if pending.is_empty() {
                *pending = Vec::new();
            }
        }
    }

    /// Whether the handshakes are still running (counts against `tls-handshakes`).
    pub fn handshaking(&self) -> bool {
        match &self.phase {
            Phase::Hello(_) | Phase::Upstream(_) => true,
            Phase::Relay(guest) => guest.is_handshaking(),
            Phase::Done => false,
        }
    }

    /// Moves what can move. `tls` and `leaves` make the configurations and the certificate.
    /// At most `to_guest_room` bytes of data are put into the guest end (the flow's share of
    /// the link's budget toward the guest; the handshake's own messages do not count), and
    /// what is put in is taken off it.
    pub fn pump(
        &mut self,
        sock: &mut tcp::Socket<'static>,
        host: &mut HostEnd,
        tls: &Arc<Interception>,
        leaves: &mut LeafCache,
        to_guest_room: &mut usize,
    ) -> InterceptStep {
        match self.step(sock, host, tls, leaves, to_guest_room) {
            Ok(step) => step,
            Err(e) => {
                if self.alert_owed && sock.can_send() {
                    let _ = sock.send_slice(&FATAL_HANDSHAKE_FAILURE);
                }
                self.phase = Phase::Done;
                InterceptStep::Failed(e)
            }
        }
    }

    fn step(
        &mut self,
        sock: &mut tcp::Socket<'static>,
        host: &mut HostEnd,
        tls: &Arc<Interception>,
        leaves: &mut LeafCache,
        to_guest_room: &mut usize,
    ) -> Result<InterceptStep, InterceptError> {
        if sock.state() == tcp::State::Closed && !matches!(self.phase, Phase::Relay(_)) {
            // The guest reset its connection during the handshakes.
            host.reset_on_close();
            return Ok(InterceptStep::GuestReset);
        }
        // 1. The guest's ClientHello.
        if let Phase::Hello(acceptor) = &mut self.phase {
            let mut accepted = None;
            while sock.can_recv() {
                let taken = sock.recv(|buf| match acceptor.read_tls(&mut &buf[..]) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match taken {
                    Ok(Ok(0)) | Err(_) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(InterceptError::Guest(e.to_string())),
                }
                match acceptor.accept() {
                    Ok(None) => continue,
                    Ok(Some(a)) => {
                        accepted = Some(a);
                        break;
                    }
                    Err((e, _alert)) => return Err(InterceptError::Guest(tls_err(e))),
                }
            }
            if let Some(accepted) = accepted {
                let offered = accepted
                    .client_hello()
                    .alpn()
                    .map(|protocols| protocols.collect::<Vec<_>>());
                let alpn = upstream_alpn(offered, self.http1_only);
                let server_name = ServerName::try_from(self.name.clone())
                    .map_err(|e| InterceptError::Guest(e.to_string()))?;
                let upstream = ClientConnection::new(tls.upstream_config(&alpn), server_name)
                    .map_err(|e| InterceptError::Upstream(tls_err(e)))?;
                self.upstream = Some(Box::new(upstream));
                self.phase = Phase::Upstream(Box::new(accepted));
                self.alert_owed = true;
            }
        }
        // 2. The upstream handshake, then the guest's.
        if let Phase::Upstream(_) = &self.phase {
            let Some(upstream) = self.upstream.as_deref_mut() else {
                return Err(InterceptError::Upstream("no upstream connection".into()));
            };
            upstream_io(upstream, host)?;
            if !upstream.is_handshaking() {
                let alpn = upstream.alpn_protocol().map(|p| p.to_vec());
                let key = leaves
                    .certified_key(&self.name, std::time::SystemTime::now())
                    .map_err(|e| InterceptError::Guest(e.to_string()))?;
                let config = tls.server_config(key, alpn);
                let Phase::Upstream(accepted) = std::mem::replace(&mut self.phase, Phase::Done)
                else {
                    unreachable!("checked above");
                };
                let mut guest = accepted
                    .into_connection(config)
                    .map_err(|(e, _)| InterceptError::Guest(tls_err(e)))?;
                guest.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
                self.alert_owed = false;
                self.phase = Phase::Relay(Box::new(Connection::Server(guest)));
            } else if host.eof {
                return Err(InterceptError::Upstream(
                    "the upstream closed during its handshake".into(),
                ));
            }
        }
        // 3. Relay, round after round while anything moves: a round takes at most what the
        // rustls buffers hold, and nothing may come to pump again once the guest has sent
        // everything (its last bytes would wait for a timer).
        let Phase::Relay(guest) = &mut self.phase else {
            return Ok(InterceptStep::Alive);
        };
        let Some(upstream) = self.upstream.as_deref_mut() else {
            return Err(InterceptError::Upstream("no upstream connection".into()));
        };
        upstream.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        let mut chunk = [0u8; PLAINTEXT_CHUNK];
        loop {
            let before = (
                self.bytes_to_host,
                self.bytes_to_guest,
                self.pending_to_host.len(),
                self.pending_to_guest.len(),
                sock.recv_queue(),
                sock.send_queue(),
            );
            guest_in(guest, sock)?;
            upstream_io(upstream, host)?;
            // Guest plaintext -> upstream.
            loop {
                if !flush_plaintext(&mut self.pending_to_host, &mut upstream.writer())? {
                    break;
                }
                let n = match guest.reader().read(&mut chunk) {
                    Ok(0) => {
                        end_guest(
                            &mut self.guest_closed,
                            &mut self.filter,
                            &mut self.pending_to_host,
                        )?;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                        // The guest closed TCP without close_notify: end the upstream as well.
                        end_guest(
                            &mut self.guest_closed,
                            &mut self.filter,
                            &mut self.pending_to_host,
                        )?;
                        break;
                    }
                    Err(e) => return Err(InterceptError::Guest(e.to_string())),
                };
                self.bytes_to_host += n as u64;
                match &mut self.filter {
                    Some(f) => f
                        .push(&chunk[..n], &mut self.pending_to_host)
                        .map_err(InterceptError::Secret)?,
                    None => self.pending_to_host.extend_from_slice(&chunk[..n]),
                }
            }
            // Upstream plaintext -> guest.
            loop {
                if !flush_plaintext(&mut self.pending_to_guest, &mut guest.writer())? {
                    break;
                }
                let n = match upstream.reader().read(&mut chunk) {
                    Ok(0) => {
                        self.host_closed = true;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                        self.host_closed = true;
                        break;
                    }
                    Err(e) => return Err(InterceptError::Upstream(e.to_string())),
                };
                self.bytes_to_guest += n as u64;
                self.pending_to_guest.extend_from_slice(&chunk[..n]);
            }
            // A side's close goes on once everything before it went on.
            if self.guest_closed && !self.closed_upstream && self.pending_to_host.is_empty() {
                upstream.send_close_notify();
                self.closed_upstream = true;
            }
            if self.host_closed && !self.closed_to_guest && self.pending_to_guest.is_empty() {
                guest.send_close_notify();
                self.closed_to_guest = true;
            }
            upstream_io(upstream, host)?;
            // The handshake's flight goes out whatever the link holds; data, within the room.
            let mut no_limit = usize::MAX;
            let room = if guest.is_handshaking() {
                &mut no_limit
            } else {
                &mut *to_guest_room
            };
            guest_out(guest, sock, room)?;
            let after = (
                self.bytes_to_host,
                self.bytes_to_guest,
                self.pending_to_host.len(),
                self.pending_to_guest.len(),
                sock.recv_queue(),
                sock.send_queue(),
            );
            if after == before {
                break;
            }
        }
        if self.closed_to_guest && !guest.wants_write() {
            sock.close();
        }
        if self.closed_upstream && !upstream.wants_write() {
            host.shutdown_write();
        }
        // Done when both TLS sessions ended and the guest's TCP connection is through its
        // close too (TimeWait: both FINs in and ours acknowledged; Closed: the guest acknowledged
        // our FIN after its own), so its last segments still meet the socket. A socket closed
        // before the upstream ended was reset by the guest.
        let tls_done = self.guest_closed
            && self.host_closed
            && !guest.wants_write()
            && !upstream.wants_write();
        Ok(match sock.state() {
            tcp::State::Closed if !self.host_closed => {
                host.reset_on_close();
                InterceptStep::GuestReset
            }
            tcp::State::Closed => InterceptStep::Finished,
            tcp::State::TimeWait if tls_done => InterceptStep::Finished,
            _ => InterceptStep::Alive,
        })
    }
}

/// The guest ended its stream: what the rewriter still holds goes out (close_notify follows
/// once everything did).
fn end_guest(
    closed: &mut bool,
    filter: &mut Option<HttpRequestRewriter>,
    pending: &mut Vec<u8>,
) -> Result<(), InterceptError> {
    if !*closed {
        *closed = true;
        if let Some(f) = filter {
            f.finish(pending).map_err(InterceptError::Secret)?;
        }
    }
    Ok(())
}

/// Writes `pending` into a rustls writer as far as it takes it; true when all of it went.
fn flush_plaintext(pending: &mut Vec<u8>, writer: &mut dyn Write) -> Result<bool, InterceptError> {
    if pending.is_empty() {
        return Ok(true);
    }
    let n = match writer.write(pending) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
        Err(e) => return Err(InterceptError::Io(e.to_string())),
    };
    pending.drain(..n);
    Ok(pending.is_empty())
}

/// Ciphertext from the guest end into the guest-side connection, while rustls wants it.
fn guest_in(conn: &mut Connection, sock: &mut tcp::Socket<'static>) -> Result<(), InterceptError> {
    while conn.wants_read() && sock.can_recv() {
        let read = sock.recv(|buf| match conn.read_tls(&mut &buf[..]) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match read {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(InterceptError::Guest(e.to_string())),
        }
        conn.process_new_packets()
            .map_err(|e| InterceptError::Guest(tls_err(e)))?;
    }
    if !sock.may_recv() && !sock.can_recv() && conn.wants_read() {
        // The guest sent FIN: let rustls see the end of the stream.
        let _ = conn.read_tls(&mut io::empty());
        conn.process_new_packets()
            .map_err(|e| InterceptError::Guest(tls_err(e)))?;
    }
    Ok(())
}

/// Ciphertext from the guest-side connection into the guest end, while it has room and at most
/// `room` bytes (taken off it).
fn guest_out(
    conn: &mut Connection,
    sock: &mut tcp::Socket<'static>,
    room: &mut usize,
) -> Result<(), InterceptError> {
    while *room > 0 && conn.wants_write() && sock.can_send() {
        let limit = *room;
        let written = sock.send(|buf| {
            let n = buf.len().min(limit);
            let mut w: &mut [u8] = &mut buf[..n];
            match conn.write_tls(&mut w) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            }
        });
        match written {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => *room -= n,
            Ok(Err(e)) => return Err(InterceptError::Io(e.to_string())),
        }
    }
    Ok(())
}

/// Ciphertext both ways between the upstream connection and the host socket.
fn upstream_io(conn: &mut ClientConnection, host: &mut HostEnd) -> Result<(), InterceptError> {
    while host.writable && conn.wants_write() {
        match conn.write_tls(&mut host.socket) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => host.writable = false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(InterceptError::Io(e.to_string())),
        }
    }
    while host.readable && !host.eof && conn.wants_read() {
        match conn.read_tls(&mut host.socket) {
            Ok(0) => {
                host.eof = true;
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => host.readable = false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(InterceptError::Io(e.to_string())),
        }
        conn.process_new_packets()
            .map_err(|e| InterceptError::Upstream(tls_err(e)))?;
    }
    Ok(())
}
