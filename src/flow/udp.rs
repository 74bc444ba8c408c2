//! A guest UDP "connection": one connected host socket per (guest source, destination) pair,
//! and the batching that moves its datagrams in few system calls.
//!
//! The first datagram of a pair is judged by the policy; later ones follow that decision.
//! Toward the host, the datagrams of one TX drain are not sent one by one: [`UdpBatch`]
//! collects them (bounded by `udp-batch-datagrams` and `udp-batch-bytes`; a full batch goes out
//! at once) and the flows send them when the drain ends, each flow in its own order with one
//! `sendmmsg`, in which a run of same-size datagrams (optionally ended by one shorter) is one
//! message with a `UDP_SEGMENT` control: the kernel cuts it into datagrams (GSO). An error on
//! one flow stays with that flow. Replies from the host socket are read with `recvmmsg`
//! ([`UdpReceiver`]), never more at once than the guest's queue has room for: a slow guest
//! leaves datagrams in the host socket's receive buffer (where the kernel drops the excess),
//! never in ours. An ICMP error the kernel reports for the host socket (port unreachable) goes
//! back to the guest as one. A session idle for longer than `udp-idle-secs` is closed.
//!
//! Send errors, per flow: `ECONNREFUSED` is the kernel relaying an earlier datagram's port
//! unreachable (reported to the guest, and the datagram is tried once more); `EAGAIN` and
//! `ENOBUFS` (the socket's send buffer is full) drop the flow's remaining datagrams of this
//! batch, counted; a GSO message the kernel refuses (segment larger than the path MTU, no
//! checksum offload) turns GSO off for the flow and its datagrams go out one by one.
//! `sendmmsg` reports a failure after the first message only as a short count (the error
//! itself is consumed), so sending resumes at the first unsent message, which then reports it.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::table::FlowMap;
use super::{FlowKey, OpenError};

/// `UDP_SEGMENT` (linux/udp.h): a send's payload is cut into datagrams of this size.
const UDP_SEGMENT: libc::c_int = 103;
/// Most datagrams one GSO send may carry (`UDP_MAX_SEGMENTS` of older kernels; newer allow 128).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload of one GSO send: the largest IPv4 UDP payload.
const GSO_MAX_BYTES: usize = 65_507;
/// Most messages in one `sendmmsg`/`recvmmsg` call (`UIO_MAXIOV`).
const MMSG_MAX: usize = 1024;
/// Bytes of receive buffers one `recvmmsg` fills at most, and how many datagrams.
const RECV_BATCH_BYTES: usize = 256 * 1024;
const RECV_BATCH_MAX: usize = 64;
/// Interrupted system calls retried in one flow's send before its datagrams count as failed.
const EINTR_RETRIES: usize = 8;

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
    /// Payload bytes the guest sent on the session (batched for the host socket) and that were
    /// queued for the guest.
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    /// This flow's datagrams in the current batch, in the guest's order.
    pending: Vec<Span>,
    /// The kernel refused a GSO send on this socket: its datagrams go out one by one.
    gso_refused: bool,
    /// The rule (or reason) that allowed the flow, for the operator (`ctl flows`).
    pub rule: String,
    pub started: Instant,
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
            bytes_to_host: 0,
            bytes_to_guest: 0,
            pending: Vec::new(),
            gso_refused: false,
            rule: String::new(),
            started: now,
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

// ---- Toward the host: the batch -------------------------------------------------------------

/// Where one collected datagram's payload lies in the batch's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    len: usize,
}

/// One message of a flow's `sendmmsg`: `count` datagrams from `first` (an index into the
/// flow's spans); with `segment` non-zero, they go as one GSO send of that segment size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Message {
    first: usize,
    count: usize,
    segment: u16,
}

/// What became of one flow's datagrams when its batch was sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    pub sent: usize,
    /// The kernel relayed a port unreachable for this flow (tell the guest).
    pub refused: bool,
    /// Dropped because the socket's send buffer was full.
    pub would_block: usize,
    /// Dropped for another error.
    pub failed: usize,
}

/// Guest datagrams collected during one TX drain, per flow (see the module comment).
pub struct UdpBatch {
    bytes: Vec<u8>,
    datagrams: usize,
    /// Flows holding datagrams, in the order they got their first one.
    flows: Vec<FlowKey>,
    max_datagrams: usize,
    max_bytes: usize,
    send: SendScratch,
}

/// What a flow's `sendmmsg` is built in, kept from one batch to the next.
#[derive(Default)]
struct SendScratch {
    messages: Vec<Message>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    controls: Vec<[u64; 4]>,
}

// SAFETY: the raw pointers in `iovecs` and `headers` point into the batch's own buffers only
// while one `sendmmsg` is being built and made; they are never dereferenced after it.
unsafe impl Send for SendScratch {}

impl UdpBatch {
    pub fn new(max_datagrams: usize, max_bytes: usize) -> Self {
        UdpBatch {
            bytes: Vec::new(),
            datagrams: 0,
            flows: Vec::new(),
            max_datagrams: max_datagrams.max(1),
            max_bytes,
            send: SendScratch::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams == 0
    }

    /// Whether a datagram of `len` bytes fits in the batch (one always fits an empty batch).
    pub fn fits(&self, len: usize) -> bool {
        self.datagrams == 0
            || (self.datagrams < self.max_datagrams && self.bytes.len() + len <= self.max_bytes)
    }

    /// Adds a datagram of `flow` (keyed `key`) to the batch: its payload is copied once.
    /// The caller checks [`UdpBatch::fits`] first.
    pub fn push(&mut self, key: FlowKey, flow: &mut UdpFlow, payload: &[u8]) {
        if flow.pending.is_empty() {
            self.flows.push(key);
        }
        flow.pending.push(Span {
            start: self.bytes.len(),
            len: payload.len(),
        });
        flow.bytes_to_host += payload.len() as u64;
        self.bytes.extend_from_slice(payload);
        self.datagrams += 1;
    }

    /// Forgets every collected datagram (the flows were closed).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.flows.clear();
        self.datagrams = 0;
    }

    /// Sends every flow's datagrams, flow by flow in the order they first appeared, and calls
    /// `report` with each flow and what became of its datagrams. A flow closed meanwhile loses
    /// its datagrams silently.
    pub fn flush(
        &mut self,
        flows: &mut FlowMap<UdpFlow>,
        mut report: impl FnMut(&UdpFlow, SendReport),
    ) {
        for key in self.flows.drain(..) {
            let Some(flow) = flows.get_mut(&key) else {
                continue;
            };
            let spans = std::mem::take(&mut flow.pending);
            let mut gso = !flow.gso_refused;
            let outcome = send_spans(
                flow.host.as_raw_fd(),
                &spans,
                &self.bytes,
                &mut gso,
                &mut self.send,
            );
            flow.gso_refused = !gso;
            flow.datagrams_to_host += outcome.sent as u64;
            // The span list keeps its allocation for the next batch.
            flow.pending = spans;
            flow.pending.clear();
            report(flow, outcome);
        }
        self.clear();
    }
}

/// Cuts a flow's datagrams into messages: a run of same-size datagrams (ended by at most one
/// shorter one) becomes one GSO message, within the kernel's segment and size bounds.
fn plan(spans: &[Span], gso: bool, out: &mut Vec<Message>) {
    out.clear();
    let mut i = 0;
    while i < spans.len() {
        let segment = spans[i].len;
        let mut j = i + 1;
        if gso && segment > 0 && segment <= usize::from(u16::MAX) {
            let mut total = segment;
            while j < spans.len()
                && j - i < GSO_MAX_SEGMENTS
                && spans[j].len == segment
                && total + segment <= GSO_MAX_BYTES
            {
                total += segment;
                j += 1;
            }
            // A shorter datagram may end a run of two or more.
            if j - i >= 2
                && j < spans.len()
                && j - i < GSO_MAX_SEGMENTS
                && spans[j].len > 0
                && spans[j].len < segment
                && total + spans[j].len <= GSO_MAX_BYTES
            {
                j += 1;
            }
        }
        let count = j - i;
        out.push(Message {
            first: i,
            count,
            // Two or more datagrams: the total exceeds one segment, so the kernel cuts it.
            segment: if count > 1 { segment as u16 } else { 0 },
        });
        i = j;
    }
}

/// Sends one flow's datagrams in order; `gso` is cleared when the kernel refuses GSO.
fn send_spans(
    fd: RawFd,
    spans: &[Span],
    bytes: &[u8],
    gso: &mut bool,
    scratch: &mut SendScratch,
) -> SendReport {
    let mut report = SendReport::default();
    let mut messages = std::mem::take(&mut scratch.messages);
    plan(spans, *gso, &mut messages);
    let mut next = 0;
    let mut retried_refused_at = None;
    let mut interrupted = 0;
    while next < messages.len() {
        let end = (next + MMSG_MAX).min(messages.len());
        match sendmmsg(fd, spans, bytes, &messages[next..end], scratch) {
            Ok(n) if n > 0 => {
                report.sent += messages[next..next + n]
                    .iter()
                    .map(|m| m.count)
                    .sum::<usize>();
                next += n;
            }
            Ok(_) => {
                report.would_block += messages[next..].iter().map(|m| m.count).sum::<usize>();
                break;
            }
            Err(e) => match e.raw_os_error().unwrap_or(0) {
                libc::EINTR if interrupted < EINTR_RETRIES => interrupted += 1,
                libc::ECONNREFUSED => {
                    // About an earlier datagram; the error is consumed: try this one again,
                    // once.
                    report.refused = true;
                    if retried_refused_at == Some(next) {
                        report.failed += messages[next].count;
                        next += 1;
                    } else {
                        retried_refused_at = Some(next);
                    }
                }
                libc::EAGAIN | libc::ENOBUFS => {
                    report.would_block += messages[next..].iter().map(|m| m.count).sum::<usize>();
                    break;
                }
                libc::EINVAL | libc::EMSGSIZE | libc::EIO if messages[next].segment != 0 => {
                    // No GSO on this path: the rest go one datagram per message.
                    *gso = false;
                    let first = messages[next].first;
                    messages.truncate(next);
                    messages.extend((first..spans.len()).map(|i| Message {
                        first: i,
                        count: 1,
                        segment: 0,
                    }));
                }
                _ => {
                    report.failed += messages[next].count;
                    next += 1;
                }
            },
        }
    }
    scratch.messages = messages;
    report
}

/// One `sendmmsg` of `messages` (at most [`MMSG_MAX`]); the number of messages sent.
fn sendmmsg(
    fd: RawFd,
    spans: &[Span],
    bytes: &[u8],
    messages: &[Message],
    scratch: &mut SendScratch,
) -> io::Result<usize> {
    let SendScratch {
        iovecs,
        headers,
        controls,
        ..
    } = scratch;
    iovecs.clear();
    headers.clear();
    controls.clear();
    for m in messages {
        for s in &spans[m.first..m.first + m.count] {
            let payload = &bytes[s.start..s.start + s.len];
            iovecs.push(libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            });
        }
        if m.segment != 0 {
            controls.push(segment_control(m.segment));
        }
    }
    // Both vectors are complete: their addresses are stable while the headers point in.
    let (mut iov_at, mut control_at) = (0usize, 0usize);
    for m in messages {
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
        header.msg_hdr.msg_iov = iovecs[iov_at..].as_mut_ptr();
        header.msg_hdr.msg_iovlen = m.count as _;
        iov_at += m.count;
        if m.segment != 0 {
            header.msg_hdr.msg_control = controls[control_at..].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            header.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
            control_at += 1;
        }
        headers.push(header);
    }
    // SAFETY: every header points at live iovecs over `bytes` and, for GSO, at a control
    // buffer of CMSG_SPACE(2) bytes; all outlive the call.
    let n = unsafe {
        libc::sendmmsg(
            fd,
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A control buffer with one `UDP_SEGMENT` message of `segment` bytes.
fn segment_control(segment: u16) -> [u64; 4] {
    let mut buf = [0u64; 4];
    let cmsg = buf.as_mut_ptr().cast::<libc::cmsghdr>();
    // SAFETY: the buffer is 32 bytes, 8-aligned: room for a cmsghdr and 2 bytes of data
    // (CMSG_SPACE(2) is 24 on 64-bit Linux).
    unsafe {
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
    buf
}

// ---- Toward the guest: recvmmsg ------------------------------------------------------------

/// Receive buffers for `recvmmsg`, kept by the link: slots one byte larger than the largest
/// payload a guest frame carries, so a larger datagram shows as truncated.
#[derive(Default)]
pub struct UdpReceiver {
    buffers: Vec<u8>,
    slot: usize,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    lengths: Vec<(usize, bool)>,
}

// SAFETY: the raw pointers in `iovecs` and `headers` point into `buffers` only during one
// `recvmmsg`; they are rebuilt before every call.
unsafe impl Send for UdpReceiver {}

impl UdpReceiver {
    /// Reads up to `max` datagrams of at most `max_payload` bytes from `socket`; returns how
    /// many came (see [`UdpReceiver::datagram`]). `WouldBlock` when there was none.
    pub fn receive(
        &mut self,
        socket: &UdpSocket,
        max: usize,
        max_payload: usize,
    ) -> io::Result<usize> {
        let slot = max_payload + 1;
        let slots = (RECV_BATCH_BYTES / slot).clamp(1, RECV_BATCH_MAX);
        let count = max.min(slots).min(MMSG_MAX);
        if count == 0 {
            return Ok(0);
        }
        if self.slot != slot || self.buffers.len() < slot * count {
            self.slot = slot;
            self.buffers.resize(slot * slots, 0);
        }
        self.iovecs.clear();
        self.headers.clear();
        for chunk in self.buffers.chunks_exact_mut(slot).take(count) {
            self.iovecs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: slot,
            });
        }
        for iov in self.iovecs.iter_mut() {
            // SAFETY: an all-zero msghdr is a valid empty one.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            self.headers.push(header);
        }
        // SAFETY: `count` headers, each over one live slot of `buffers`; no timeout.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        self.lengths.clear();
        self.lengths.extend(self.headers[..n].iter().map(|h| {
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            (
                h.msg_len as usize,
                truncated || h.msg_len as usize > max_payload,
            )
        }));
        Ok(n)
    }

    /// The `i`th datagram of the last [`UdpReceiver::receive`]; `None` if it was too large.
    pub fn datagram(&self, i: usize) -> Option<&[u8]> {
        let (len, too_large) = *self.lengths.get(i)?;
        if too_large {
            return None;
        }
        self.buffers.get(i * self.slot..i * self.slot + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(lens: &[usize]) -> Vec<Span> {
        let mut start = 0;
        lens.iter()
            .map(|&len| {
                let s = Span { start, len };
                start += len;
                s
            })
            .collect()
    }

    fn planned(lens: &[usize], gso: bool) -> Vec<(usize, usize, u16)> {
        let mut out = Vec::new();
        plan(&spans(lens), gso, &mut out);
        out.iter().map(|m| (m.first, m.count, m.segment)).collect()
    }

    #[test]
    fn same_size_runs_become_gso_messages_ended_by_one_shorter() {
        assert_eq!(
            planned(&[64, 64, 64, 10, 100, 7, 7], true),
            vec![(0, 4, 64), (4, 1, 0), (5, 2, 7)]
        );
        // A longer datagram starts a new run; a lone datagram takes no tail.
        assert_eq!(
            planned(&[100, 50, 50, 200], true),
            vec![(0, 1, 0), (1, 2, 50), (3, 1, 0)]
        );
        assert_eq!(planned(&[64, 64, 64], false).len(), 3);
        // Empty datagrams cannot be segments.
        assert_eq!(planned(&[0, 0], true), vec![(0, 1, 0), (1, 1, 0)]);
    }

    #[test]
    fn gso_messages_respect_the_kernel_bounds() {
        let many = vec![10usize; 200];
        let p = planned(&many, true);
        assert!(p.iter().all(|&(_, n, _)| n <= GSO_MAX_SEGMENTS), "{p:?}");
        assert_eq!(p.iter().map(|&(_, n, _)| n).sum::<usize>(), 200);
        let big = vec![30_000usize; 5];
        let p = planned(&big, true);
        assert!(
            p.iter().all(|&(_, n, _)| n * 30_000 <= GSO_MAX_BYTES),
            "{p:?}"
        );
    }

    fn pair() -> (UdpSocket, UdpSocket) {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let Ok(sender) = open_host(sink.local_addr().unwrap()) else {
            panic!("cannot open a connected socket");
        };
        (sender, sink)
    }

    fn batch_of(flow: &mut UdpFlow, key: FlowKey, batch: &mut UdpBatch, payloads: &[Vec<u8>]) {
        for p in payloads {
            assert!(batch.fits(p.len()));
            batch.push(key, flow, p);
        }
    }

    #[test]
    fn a_batch_arrives_in_order_with_its_boundaries() {
        let (sender, sink) = pair();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let addr = sink.local_addr().unwrap();
        let key = (addr, addr);
        let mut map = FlowMap::default();
        map.insert(key, UdpFlow::new(1, addr, addr, sender, Instant::now()));
        let mut batch = UdpBatch::new(1000, 1 << 20);
        let lens = [64usize, 64, 64, 64, 20, 1400, 1400, 1400, 3, 0, 64];
        let payloads: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|b| (b + i) as u8).collect())
            .collect();
        batch_of(map.get_mut(&key).unwrap(), key, &mut batch, &payloads);
        let mut reports = Vec::new();
        batch.flush(&mut map, |_, r| reports.push(r));
        assert!(batch.is_empty());
        assert_eq!(reports[0].sent, lens.len(), "{reports:?}");
        let mut buf = [0u8; 2000];
        for (i, p) in payloads.iter().enumerate() {
            let n = sink.recv(&mut buf).expect("datagram");
            assert_eq!(&buf[..n], &p[..], "datagram {i}");
        }
    }

    #[test]
    fn receiver_reads_several_and_flags_too_large() {
        let (sender, sink) = pair();
        sink.connect(sender.local_addr().unwrap()).unwrap();
        for n in [5usize, 100, 6, 7] {
            sink.send(&vec![n as u8; n]).unwrap();
        }
        let mut rx = UdpReceiver::default();
        let got = rx.receive(&sender, 3, 50).expect("three datagrams");
        assert_eq!(got, 3);
        assert_eq!(rx.datagram(0), Some(&[5u8; 5][..]));
        assert_eq!(rx.datagram(1), None, "larger than the payload limit");
        assert_eq!(rx.datagram(2), Some(&[6u8; 6][..]));
        assert_eq!(rx.receive(&sender, 3, 50).unwrap(), 1);
        assert_eq!(rx.datagram(0), Some(&[7u8; 7][..]));
        let e = rx.receive(&sender, 3, 50).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
