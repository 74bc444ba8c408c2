//! A guest TCP connection carried over a host TCP socket, as a pipeline of stages:
//! guest end <-> optional middle stage <-> host end.
//!
//! Theory of operation. The guest's SYN is held while netfence connects the host end
//! ([`host_end`], non-blocking); the connect counts against `tcp-connecting` and times out after
//! `connect-timeout-secs`. (A connect to one of the host's own addresses, loopback above all,
//! has usually completed when `connect()` returns: the SYN is then answered at once, not one
//! epoll round later.) Only when the host side is connected does the guest end (a smoltcp
//! socket listening on the guest's destination) receive the held SYN, so the guest's handshake
//! completes exactly when the far end accepted; a refusal becomes an RST (or an ICMP
//! unreachable) to the guest instead. A guest that then never completes its handshake loses the
//! flow after `handshake-timeout-secs`.
//!
//! Then bytes move both ways with no buffer of our own: host -> guest reads the host socket
//! straight into smoltcp's send buffer only while it has room, guest -> host writes smoltcp's
//! receive buffer straight into the host socket only while it accepts. A full buffer on either
//! side closes the TCP window on the other (backpressure). FIN becomes shutdown(SHUT_WR) and
//! back; an RST or a socket error on either side aborts the other side.
//!
//! A middle stage sits between the two ends when the flow needs one: the SNI gate
//! ([`sni_gate`]), which holds the guest's first bytes until the TLS server name is judged, and
//! TLS interception ([`intercept`]), which terminates the guest's TLS and speaks TLS upstream.
//! While a middle stage is in place the ends do not move bytes by themselves; the flow engine
//! runs the stage, which moves them.

pub mod host_end;
pub mod intercept;
pub mod rings;
pub mod sni_gate;

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpListenEndpoint};

use self::host_end::HostEnd;
use self::intercept::Interceptor;
use self::rings::RingMemory;
use self::sni_gate::SniGate;
use crate::secrets::{HttpRequestRewriter, PlaceholderScanner, StreamError, Violation};
use crate::stack::frames::TcpHead;
use crate::stack::GuestStack;

/// The guest end of a flow.
pub enum GuestEnd {
    /// The guest's SYN (the frame and its header), held while the host end connects.
    Held { syn_frame: Vec<u8>, syn: TcpHead },
    /// A smoltcp socket terminates the guest's connection; `since` it received the SYN.
    /// `rings` is the memory of its buffers (kept until the socket is removed). `parked`: the
    /// socket is in the stack's parked set (the flow is at rest; see [`TcpFlow::park`]) and
    /// `handle` is its handle there.
    Socket {
        handle: SocketHandle,
        since: Instant,
        rings: RingMemory,
        parked: bool,
    },
}

/// How long a flow moves no byte before its buffers' memory is given back (if they are empty).
pub const REST: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a flow moves no byte before its socket is parked (well past [`GUEST_ACK_DELAY`],
/// so that its last ACK is normally out).
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(50);

/// Where the guest's byte stream stands, from the segments it sent: whether smoltcp's receive
/// ring may hold bytes past what it put in order (an out-of-order segment waiting for a gap).
#[derive(Debug, Default)]
pub struct GuestSeq {
    /// The sequence number of the next byte smoltcp will put in order (once the SYN is in).
    next: Option<u32>,
    /// One past the last byte the guest sent, in any segment handed to smoltcp.
    sent_end: Option<u32>,
}

impl GuestSeq {
    /// A segment `head` was handed to smoltcp, and its receive queue grew by `accepted`
    /// bytes (the segment's, and any out-of-order bytes it joined); `synced` whether the
    /// socket is now synchronized (it took the guest's SYN).
    pub fn segment(&mut self, head: &TcpHead, accepted: usize, synced: bool) {
        if head.syn && synced && self.next.is_none() {
            self.next = Some(head.seq.wrapping_add(1));
        }
        if let Some(next) = &mut self.next {
            *next = next.wrapping_add(accepted as u32);
        }
        if head.payload_len > 0 {
            let end = head
                .seq
                .wrapping_add(u32::from(head.syn))
                .wrapping_add(head.payload_len as u32);
            match self.sent_end {
                Some(e) if (end.wrapping_sub(e) as i32) <= 0 => {}
                _ => self.sent_end = Some(end),
            }
        }
    }

    /// Whether every byte the guest sent is in order (nothing waits past a gap).
    pub fn all_in_order(&self) -> bool {
        match (self.next, self.sent_end) {
            (Some(next), Some(end)) => (end.wrapping_sub(next) as i32) <= 0,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

pub struct TcpFlow {
    pub token: u64,
    pub guest: SocketAddr,
    pub dst: SocketAddr,
    pub host: HostEnd,
    pub guest_end: GuestEnd,
    /// The middle stage, while there is one.
    pub middle: Option<Middle>,
    pub started: Instant,
    /// The last time a byte moved either way (or the flow changed stage).
    pub last_active: Instant,
    /// The guest's FIN was seen (its data ends where the receive buffer ends).
    pub guest_fin_seen: bool,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    /// A host client's connection through a published port (netfence connected to the guest).
    pub inbound: bool,
    /// The guest end reached Established (for an inbound flow: the guest accepted).
    pub guest_connected: bool,
    /// The guest's byte stream, for telling when the receive ring is truly empty.
    pub guest_seq: GuestSeq,
    /// `last_active` when the buffers' memory was last given back (nothing moved since).
    pub released_at: Option<Instant>,
    /// When the buffers' memory was last given back (or the flow started).
    pub last_release: Instant,
    /// The rule (or reason) that allowed the flow, for the operator (`ctl flows`).
    pub rule: String,
    /// The name the flow was allowed for, when its ClientHello named one.
    pub domain: Option<String>,
}

/// Why an inbound flow ended when the guest refused the connection.
pub const GUEST_REFUSED: &str = "the guest refused the connection (nothing listens on the port?)";

/// A flow's middle stage.
pub enum Middle {
    /// Holding the guest's first bytes until its ClientHello is judged.
    Gate(SniGate),
    /// Terminating the guest's TLS and speaking TLS upstream.
    Tls(Box<Interceptor>),
    /// Filtering the guest's cleartext on its way to the host (secrets): the ends still move
    /// the bytes, through the filter.
    Clear(Box<ClearFilter>),
}

/// What the guest's cleartext goes through when secrets are configured.
pub enum ClearStage {
    /// HTTP requests (plain HTTP): placeholders substituted for allowed hosts.
    Http(HttpRequestRewriter),
    /// Any other stream: a placeholder is a violation unless the destination is allowed.
    Scan(PlaceholderScanner),
}

/// A cleartext filter with the bytes it produced and the host socket has not taken yet.
pub struct ClearFilter {
    stage: ClearStage,
    pending: Vec<u8>,
    finished: bool,
}

/// Bytes taken from the guest end per step through a cleartext filter.
const FILTER_CHUNK: usize = 16 * 1024;

impl ClearFilter {
    pub fn new(stage: ClearStage) -> Self {
        ClearFilter {
            stage,
            pending: Vec::new(),
            finished: false,
        }
    }

    fn push(&mut self, input: &[u8]) -> Result<(), StreamError> {
        match &mut self.stage {
            ClearStage::Http(rw) => rw.push(input, &mut self.pending),
            ClearStage::Scan(scan) => {
                scan.scan(input).map_err(StreamError::Violation)?;
                self.pending.extend_from_slice(input);
                Ok(())
            }
        }
    }

    /// Frees what the filter's output buffer grew to, once it is empty.
    fn shrink(&mut self) {
        if self.pending.is_empty() {
            self.pending = Vec::new();
        }
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        match &mut self.stage {
            ClearStage::Http(rw) => rw.finish(&mut self.pending),
            ClearStage::Scan(_) => Ok(()),
        }
    }
}

impl Middle {
    /// Frees the stage's empty staging buffers (the flow is at rest).
    fn shrink(&mut self) {
        match self {
            Middle::Gate(_) => {}
            Middle::Tls(tls) => tls.shrink(),
            Middle::Clear(filter) => filter.shrink(),
        }
    }

    /// Whether this is the SNI gate (counts against `tls-hellos`).
    pub fn is_gate(&self) -> bool {
        matches!(self, Middle::Gate(_))
    }

    /// Whether this is an interception still in its handshakes (counts against
    /// `tls-handshakes`).
    pub fn is_tls_handshake(&self) -> bool {
        matches!(self, Middle::Tls(i) if i.handshaking())
    }

    /// Whether the flow's own pump moves the bytes (no stage, or a cleartext filter).
    fn lets_the_ends_pump(&self) -> bool {
        matches!(self, Middle::Clear(_))
    }
}

/// What happened to a flow in one pump.
#[derive(Debug, PartialEq, Eq)]
pub enum PumpResult {
    Alive,
    /// Both sides are done; remove the flow.
    Finished,
    /// One side failed; the other was reset.
    Aborted(&'static str),
    /// The guest's bytes broke a secret's rules (or could not be parsed): reset both ends.
    Refused(StreamError),
}

impl From<Violation> for PumpResult {
    fn from(v: Violation) -> Self {
        PumpResult::Refused(StreamError::Violation(v))
    }
}

/// How long a guest end holds the ACK of the guest's full-sized data, hoping to send it with
/// data of its own (smoltcp's default is 10 ms). More than a full-sized segment
/// unacknowledged is ACKed at once, so a bulk upload sends about as many ACKs whatever the
/// delay; 1 ms is also the timer's granularity (`link::timer`), which keeps netfence's wakeups
/// few (a 100 us timer cost a guest's bulk upload about 18% more CPU per GB).
pub const GUEST_ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(1);

/// Payload below which a segment counts as a small write (under any usual MSS): it is ACKed
/// at once. A guest that writes twice before it reads (Nagle's algorithm holds the second
/// small write until the first is ACKed) otherwise waits out the ACK delay per exchange: at
/// 1 ms such an exchange took twice as long as through passt (1256 against 580 us, bench
/// write-write gap). The price is a separate ACK when the host's answer follows at once.
pub const SMALL_SEGMENT: usize = 1200;

/// A guest end's smoltcp socket with `buffer_bytes` of buffer each way (`tcp-buffer-bytes`),
/// committed as it is used ([`rings`]), and the memory behind it. Nagle is off (the guest's
/// stack decides how it segments; we forward as soon as the host gives bytes) and the ACK
/// delay is [`GUEST_ACK_DELAY`]. A closed flow's socket lingers a little so that its last
/// ACK still goes out (see the flow engine's `close_tcp`).
pub fn guest_socket(buffer_bytes: usize) -> (tcp::Socket<'static>, RingMemory) {
    let (mut socket, rings) = RingMemory::socket(buffer_bytes);
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(Some(GUEST_ACK_DELAY));
    (socket, rings)
}

/// Makes `socket` listen on the guest's destination, ready for the held SYN.
fn listen_on(socket: &mut tcp::Socket<'static>, dst: SocketAddr) {
    let endpoint = IpListenEndpoint {
        addr: Some(IpAddress::from(dst.ip())),
        port: dst.port(),
    };
    // Listening fails only for port 0, which the classifier never lets through as a new flow.
    let _ = socket.listen(endpoint);
}

/// A flow's guest end listening on the guest's destination, ready for the held SYN, with
/// `buffer_bytes` of buffer each way (the most the flow holds; `tcp-buffer-bytes`).
pub fn listening_guest_end(
    dst: SocketAddr,
    buffer_bytes: usize,
) -> (tcp::Socket<'static>, RingMemory) {
    let (mut socket, rings) = guest_socket(buffer_bytes);
    listen_on(&mut socket, dst);
    (socket, rings)
}

/// A small listening socket with heap buffers of `buffer_bytes` each way (DNS over TCP).
pub fn listening_socket(dst: SocketAddr, buffer_bytes: usize) -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0u8; buffer_bytes]);
    let tx = tcp::SocketBuffer::new(vec![0u8; buffer_bytes]);
    let mut socket = tcp::Socket::new(rx, tx);
    socket.set_nagle_enabled(false);
    listen_on(&mut socket, dst);
    socket
}

/// Writes what a filter produced into the host socket as far as it takes it.
fn flush_pending(
    pending: &mut Vec<u8>,
    host: &mut HostEnd,
    bytes_to_host: &mut u64,
) -> Result<(), PumpResult> {
    while host.writable && !pending.is_empty() {
        match host.socket.write(pending) {
            Ok(n) => {
                pending.drain(..n);
                *bytes_to_host += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => host.writable = false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(PumpResult::Aborted("host write failed")),
        }
    }
    Ok(())
}

/// The guest's bytes through `filter` into the host socket: the filter's output is flushed
/// first, and more is taken from the guest only when it is all gone (so at most one chunk's
/// output waits here; the rest stays in the guest end's window).
fn filter_to_host(
    filter: &mut ClearFilter,
    sock: &mut tcp::Socket<'static>,
    host: &mut HostEnd,
    bytes_to_host: &mut u64,
) -> Result<(), PumpResult> {
    let mut chunk = [0u8; FILTER_CHUNK];
    loop {
        flush_pending(&mut filter.pending, host, bytes_to_host)?;
        if !filter.pending.is_empty() || !sock.can_recv() {
            return Ok(());
        }
        let n = sock.recv_slice(&mut chunk).unwrap_or(0);
        if n == 0 {
            return Ok(());
        }
        filter.push(&chunk[..n]).map_err(PumpResult::Refused)?;
    }
}

enum ReadStep {
    Data(usize),
    Again,
    Eof,
    Failed,
}

impl TcpFlow {
    /// A flow whose host end is connecting and whose guest SYN is held.
    pub fn new(
        token: u64,
        syn: TcpHead,
        host: HostEnd,
        syn_frame: Vec<u8>,
        middle: Option<Middle>,
        now: Instant,
    ) -> Self {
        TcpFlow {
            token,
            guest: syn.src,
            dst: syn.dst,
            host,
            guest_end: GuestEnd::Held { syn_frame, syn },
            middle,
            started: now,
            last_active: now,
            guest_fin_seen: false,
            bytes_to_host: 0,
            bytes_to_guest: 0,
            inbound: false,
            guest_connected: false,
            guest_seq: GuestSeq::default(),
            released_at: None,
            last_release: now,
            rule: String::new(),
            domain: None,
        }
    }

    /// A connection from a host client through a published port: the guest end is a smoltcp
    /// socket `handle` (over `rings`) connecting from the gateway (`dst`) to the guest's server
    /// (`guest`); the host end is the accepted connection. `middle`: a cleartext filter, with
    /// secrets.
    #[allow(clippy::too_many_arguments)]
    pub fn inbound(
        token: u64,
        guest: SocketAddr,
        dst: SocketAddr,
        host: HostEnd,
        handle: SocketHandle,
        rings: RingMemory,
        middle: Option<Middle>,
        now: Instant,
    ) -> Self {
        TcpFlow {
            token,
            guest,
            dst,
            host,
            guest_end: GuestEnd::Socket {
                handle,
                since: now,
                rings,
                parked: false,
            },
            middle,
            started: now,
            last_active: now,
            guest_fin_seen: false,
            bytes_to_host: 0,
            bytes_to_guest: 0,
            inbound: true,
            guest_connected: false,
            guest_seq: GuestSeq::default(),
            released_at: None,
            last_release: now,
            rule: String::new(),
            domain: None,
        }
    }

    /// Whether the host connect is still in progress.
    pub fn is_dialing(&self) -> bool {
        matches!(self.guest_end, GuestEnd::Held { .. })
    }

    /// At rest (no byte moved for [`REST`]), or [`REST`] after the last release while bytes
    /// still trickle: gives back the memory of the guest end's buffers if both are empty and
    /// nothing waits out of order, and frees the middle stage's empty staging buffers.
    /// Returns whether the rings were released. (Were only a silent flow released, a guest
    /// could fill the rings of every flow once and then keep each committed with a byte now
    /// and then: tcp-flows times both buffers, far past tcp-link-buffer-bytes. An empty ring
    /// starts again at its first byte, so a trickle commits a page or two.)
    pub fn rest(&mut self, stack: &GuestStack, now: Instant) -> bool {
        let quiet = now.duration_since(self.last_active) >= REST;
        let due = now.duration_since(self.last_release) >= REST;
        if self.released_at == Some(self.last_active) || !(quiet || due) {
            return false;
        }
        let Some(sock) = self.socket(stack) else {
            return false;
        };
        if sock.recv_queue() != 0 || sock.send_queue() != 0 || !self.guest_seq.all_in_order() {
            return false;
        }
        let GuestEnd::Socket { rings, .. } = &self.guest_end else {
            return false;
        };
        rings.release();
        if let Some(middle) = &mut self.middle {
            middle.shrink();
        }
        self.released_at = Some(self.last_active);
        self.last_release = now;
        rings.is_mapped()
    }

    /// The guest end's socket, wherever it is (polled or parked), once it exists.
    pub fn socket<'s>(&self, stack: &'s GuestStack) -> Option<&'s tcp::Socket<'static>> {
        match self.guest_end {
            GuestEnd::Socket { handle, parked, .. } => Some(if parked {
                stack.parked.get::<tcp::Socket>(handle)
            } else {
                stack.sockets.get::<tcp::Socket>(handle)
            }),
            GuestEnd::Held { .. } => None,
        }
    }

    /// Whether the guest end's socket is parked.
    pub fn is_parked(&self) -> bool {
        matches!(self.guest_end, GuestEnd::Socket { parked: true, .. })
    }

    /// Brings a parked socket back where smoltcp polls it; returns whether it was parked.
    pub fn wake(&mut self, stack: &mut GuestStack) -> bool {
        if let GuestEnd::Socket { handle, parked, .. } = &mut self.guest_end {
            if *parked {
                *handle = stack.unpark(*handle);
                *parked = false;
                return true;
            }
        }
        false
    }

    /// Parks the guest end's socket if the flow is quiet: established, no byte moved for
    /// [`QUIET`], nothing held either way or waiting out of order, nothing to read from the
    /// host, no middle stage, and smoltcp has nothing to send for it. A parked flow costs
    /// nothing per round; a frame from the guest or an event on its host socket wakes it.
    /// Returns whether it is parked now.
    pub fn park(&mut self, stack: &mut GuestStack, now: Instant) -> bool {
        if self.middle.is_some()
            || self.host.readable
            || self.host.eof
            || self.host.write_shut
            || self.guest_fin_seen
            || now.duration_since(self.last_active) < QUIET
            || !self.guest_seq.all_in_order()
        {
            return false;
        }
        let GuestEnd::Socket { handle, parked, .. } = &mut self.guest_end else {
            return false;
        };
        if *parked {
            return true;
        }
        let sock = stack.sockets.get::<tcp::Socket>(*handle);
        if sock.state() != tcp::State::Established
            || sock.send_queue() != 0
            || sock.recv_queue() != 0
        {
            return false;
        }
        let (new, is_parked) = stack.park(*handle);
        *handle = new;
        *parked = is_parked;
        is_parked
    }

    /// The guest end's socket in the set smoltcp polls, once it exists (`None` while it is
    /// parked: wake it first).
    pub fn handle(&self) -> Option<SocketHandle> {
        match self.guest_end {
            GuestEnd::Socket {
                handle,
                parked: false,
                ..
            } => Some(handle),
            _ => None,
        }
    }

    /// Moves bytes both ways as far as both sides allow, and propagates FIN and RST. At most
    /// `to_guest_room` bytes are read from the host socket (the link-wide budget of bytes held
    /// toward the guest); what is read is taken off it.
    pub fn pump(
        &mut self,
        sockets: &mut SocketSet<'static>,
        now: Instant,
        to_guest_room: &mut usize,
    ) -> PumpResult {
        let Some(handle) = self.handle() else {
            return PumpResult::Alive;
        };
        if self
            .middle
            .as_ref()
            .is_some_and(|m| !m.lets_the_ends_pump())
        {
            return PumpResult::Alive;
        }
        let sock = sockets.get_mut::<tcp::Socket>(handle);
        let moved_before = self.bytes_to_host + self.bytes_to_guest;
        if !matches!(
            sock.state(),
            tcp::State::Closed | tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived
        ) {
            self.guest_connected = true;
        }

        // Guest -> host, through the cleartext filter when there is one.
        if let Some(Middle::Clear(filter)) = &mut self.middle {
            if let Err(result) =
                filter_to_host(filter, sock, &mut self.host, &mut self.bytes_to_host)
            {
                sock.abort();
                return result;
            }
        }
        while self.middle.is_none() && self.host.writable && sock.can_recv() {
            let host = &mut self.host.socket;
            let result = sock.recv(|buf| match host.write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match result {
                Ok(Ok(n)) => self.bytes_to_host += n as u64,
                Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => self.host.writable = false,
                Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Ok(Err(_)) | Err(_) => {
                    sock.abort();
                    return PumpResult::Aborted("host write failed");
                }
            }
        }

        // Host -> guest.
        while *to_guest_room > 0 && self.host.readable && !self.host.eof && sock.can_send() {
            let host = &mut self.host.socket;
            let room = *to_guest_room;
            let step = sock.send(|buf| {
                let n = buf.len().min(room);
                match host.read(&mut buf[..n]) {
                    Ok(0) => (0, ReadStep::Eof),
                    Ok(n) => (n, ReadStep::Data(n)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => (0, ReadStep::Again),
                    Err(e) if e.kind() == ErrorKind::Interrupted => (0, ReadStep::Data(0)),
                    Err(_) => (0, ReadStep::Failed),
                }
            });
            match step {
                Ok(ReadStep::Data(n)) => {
                    self.bytes_to_guest += n as u64;
                    *to_guest_room -= n;
                }
                Ok(ReadStep::Again) => self.host.readable = false,
                Ok(ReadStep::Eof) => {
                    self.host.eof = true;
                    sock.close();
                }
                Ok(ReadStep::Failed) | Err(_) => {
                    sock.abort();
                    return PumpResult::Aborted("host connection reset");
                }
            }
        }
        if self.bytes_to_host + self.bytes_to_guest != moved_before {
            self.last_active = now;
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
        let filter_drained = match &mut self.middle {
            Some(Middle::Clear(filter)) => {
                if self.guest_fin_seen && !sock.can_recv() {
                    if let Err(e) = filter.finish() {
                        sock.abort();
                        return PumpResult::Refused(e);
                    }
                    if let Err(result) =
                        flush_pending(&mut filter.pending, &mut self.host, &mut self.bytes_to_host)
                    {
                        sock.abort();
                        return result;
                    }
                }
                filter.pending.is_empty()
            }
            _ => true,
        };
        if self.guest_fin_seen && !sock.can_recv() && filter_drained {
            self.host.shutdown_write();
        }

        match sock.state() {
            // Done once the guest's last bytes are on the host socket.
            tcp::State::TimeWait if self.host.write_shut => PumpResult::Finished,
            tcp::State::Closed if self.guest_fin_seen => {
                if self.host.write_shut {
                    PumpResult::Finished
                } else {
                    PumpResult::Alive
                }
            }
            tcp::State::Closed => {
                // The guest reset the connection: reset the host side too.
                self.host.reset_on_close();
                if self.inbound && !self.guest_connected {
                    PumpResult::Aborted(GUEST_REFUSED)
                } else {
                    PumpResult::Aborted("guest reset")
                }
            }
            _ => PumpResult::Alive,
        }
    }
}
