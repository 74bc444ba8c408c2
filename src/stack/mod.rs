//! The guest-facing network stack: smoltcp playing the gateway.
//!
//! smoltcp's `Interface` owns the gateway's link (MAC, the gateway address of the guest's /30,
//! the gateway's addresses in the guest's IPv6 /64 and fe80::1), answers ARP, neighbour
//! solicitations and ICMP/ICMPv6 echo for the gateway, and terminates the guest's TCP connections: for
//! every allowed TCP flow the flow table creates a smoltcp socket listening on the guest's
//! destination (AnyIP), so the guest talks to "203.0.113.7:443" while the bytes go to a host
//! socket. Frames reach smoltcp only through [`GuestStack::receive`], after the classifier has
//! checked that they are for the gateway or for a known flow: with AnyIP on, smoltcp would
//! otherwise answer ARP, neighbour solicitations and pings for every address.
//!
//! Frames smoltcp sends, and the frames the link and the flows build themselves
//! ([`frames`]), go to one bounded queue ([`GuestPort`]) that the link flushes into the RX
//! virtqueue; when the queue is full smoltcp is told the device is busy and retries later, and
//! the flows stop reading their host sockets (backpressure).
//!
//! Offloads. smoltcp reads the device's capabilities once, when its `Interface` is built, so
//! the interface is built again when the VMM acks features ([`GuestStack::set_offloads`]).
//! Checksums smoltcp never verifies: the classifier has (or the guest left them partial, which
//! the virtio-net header says). With GUEST_CSUM, smoltcp leaves the TCP checksum out and the port
//! writes the pseudo-header sum and marks the frame `NEEDS_CSUM` (what a NIC's checksum offload
//! gets from a kernel). With GUEST_TSO4/6, smoltcp's `segmentation-offload` sends TCP segments of
//! up to 64 KiB and the port marks each larger than the guest's MTU as one GSO frame with its MSS;
//! smoltcp 0.14 drops IPv6 packets above the device MTU, so with GUEST_TSO6 the device MTU it sees
//! is raised and the MSS smoltcp announces in a SYN is clamped back to the guest's MTU here. A
//! frame larger than the guest's MTU that the guest did not allow is dropped (counted), never
//! sent.

pub mod frames;

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;

use crate::config::addressing::LinkAddrs6;
use crate::device::{NetHeader, Offloads};

use self::frames::Macs;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{
    Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium, PacketMeta, RxToken,
    TxToken,
};
use smoltcp::time::Instant;
use smoltcp::wire::{checksum, HardwareAddress, IpAddress, IpCidr, IpProtocol, TcpPacket};

/// Largest frame smoltcp may hand the port with TSO: a 64 KiB IP packet and its Ethernet header.
pub const TSO_FRAME: usize = 14 + 65_535;
/// Spare frame buffers kept for reuse.
const SPARE_BUFFERS: usize = 64;

/// A frame queued for the guest: its virtio-net header and its bytes.
pub struct OutFrame {
    pub header: NetHeader,
    /// The frame is `buf[..len]`; the rest is initialised memory kept for the buffer's next use.
    buf: Vec<u8>,
    len: usize,
}

impl OutFrame {
    /// A plain frame (every checksum in place, no larger than the MTU).
    pub fn plain(buf: Vec<u8>) -> Self {
        OutFrame {
            header: NetHeader::NONE,
            len: buf.len(),
            buf,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The smoltcp device: one frame in (from the classifier), a bounded queue out (to the guest).
///
/// The queue is bounded twice: in frames (`guest-queue-frames`) and in bytes
/// (`guest-queue-bytes`), since with GUEST_TSO one frame may be 64 KiB. smoltcp and the flows
/// see a full queue as a busy device: smoltcp keeps its segments in its send buffers (and sends
/// them later), UDP and echo replies stay in their host sockets. The byte bound is checked
/// against the largest frame smoltcp may write (a whole TSO frame when the guest takes them),
/// so the queue never holds more than the bound, except that an empty queue always takes one
/// frame and a GSO frame cut into segments for a guest short of buffers gains their headers.
pub struct GuestPort {
    to_guest: VecDeque<OutFrame>,
    /// Most frames `to_guest` holds (`guest-queue-frames`).
    capacity: usize,
    /// Most bytes `to_guest` holds (`guest-queue-bytes`).
    byte_capacity: usize,
    /// Bytes of the frames in `to_guest`, and the most it ever was.
    queued_bytes: usize,
    pub queued_bytes_peak: usize,
    /// Times the queue filled up to its byte bound (smoltcp and the flows then wait).
    pub byte_bound_hits: u64,
    /// The guest's MTU as an Ethernet frame length.
    mtu: usize,
    /// What the VMM acked (nothing until it does).
    offloads: Offloads,
    spare: Vec<Vec<u8>>,
    /// Frames smoltcp made that the guest could not take (larger than its MTU, no TSO for them).
    pub oversize_dropped: u64,
}

impl GuestPort {
    fn new(mtu: u16, capacity: usize, byte_capacity: usize) -> Self {
        GuestPort {
            to_guest: VecDeque::new(),
            capacity: capacity.max(1),
            byte_capacity: byte_capacity.max(1),
            queued_bytes: 0,
            queued_bytes_peak: 0,
            byte_bound_hits: 0,
            mtu: usize::from(mtu) + 14,
            offloads: Offloads::default(),
            spare: Vec::new(),
            oversize_dropped: 0,
        }
    }

    /// Whether `len` more bytes fit the byte bound (an empty queue takes any one frame).
    fn bytes_fit(&self, len: usize) -> bool {
        self.to_guest.is_empty() || self.queued_bytes + len <= self.byte_capacity
    }

    /// The largest frame smoltcp may write into the queue.
    fn largest_frame(&self) -> usize {
        if self.offloads.rx_tso4 || self.offloads.rx_tso6 {
            TSO_FRAME.max(self.mtu)
        } else {
            self.mtu
        }
    }

    /// Appends a frame and keeps the byte count (and its peak, and the bound's hits).
    fn push(&mut self, frame: OutFrame) {
        let had_room = self.has_room();
        self.queued_bytes += frame.len;
        self.queued_bytes_peak = self.queued_bytes_peak.max(self.queued_bytes);
        self.to_guest.push_back(frame);
        if had_room && !self.bytes_fit(self.largest_frame()) {
            self.byte_bound_hits += 1;
        }
    }

    /// Queues a frame built outside smoltcp (DHCP, UDP, resets). Returns false when full.
    pub fn queue_frame(&mut self, frame: Vec<u8>) -> bool {
        if self.to_guest.len() >= self.capacity || !self.bytes_fit(frame.len()) {
            return false;
        }
        self.push(OutFrame::plain(frame));
        true
    }

    /// Frames of up to the guest's MTU that still fit in the queue (in count and in bytes):
    /// how many UDP or echo replies may be read now.
    pub fn room(&self) -> usize {
        let frames = self.capacity.saturating_sub(self.to_guest.len());
        let bytes = if self.to_guest.is_empty() {
            (self.byte_capacity / self.mtu).max(1)
        } else {
            self.byte_capacity.saturating_sub(self.queued_bytes) / self.mtu
        };
        frames.min(bytes)
    }

    /// The next frame for the guest.
    pub fn front(&self) -> Option<&OutFrame> {
        self.to_guest.front()
    }

    /// Takes the next frame for the guest off the queue.
    pub fn pop_front(&mut self) -> Option<OutFrame> {
        let frame = self.to_guest.pop_front()?;
        self.queued_bytes -= frame.len;
        Some(frame)
    }

    /// Puts a frame back at the head of the queue (a piece of a frame cut into segments). It
    /// is taken whatever the bounds: it replaces what was taken off.
    pub fn push_front(&mut self, frame: OutFrame) {
        self.queued_bytes += frame.len;
        self.queued_bytes_peak = self.queued_bytes_peak.max(self.queued_bytes);
        self.to_guest.push_front(frame);
    }

    /// Frames in the queue.
    pub fn queued_frames(&self) -> usize {
        self.to_guest.len()
    }

    /// Bytes of the frames in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.to_guest.is_empty()
    }

    /// Drops every queued frame (the guest's rings restarted).
    pub fn clear(&mut self) {
        while let Some(f) = self.pop_front() {
            self.recycle(f);
        }
    }

    /// Hands back a frame that has been copied to the guest, so its buffer is used again.
    pub fn recycle(&mut self, frame: OutFrame) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(frame.buf);
        }
    }

    /// Whether smoltcp may write a frame now: the queue has a frame's room and the byte room
    /// for the largest frame smoltcp may write.
    pub fn has_room(&self) -> bool {
        self.to_guest.len() < self.capacity && self.bytes_fit(self.largest_frame())
    }

    /// The offloads in use.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Whether smoltcp sees a device MTU above the guest's (see the module comment).
    fn raised_mtu(&self) -> bool {
        self.offloads.rx_tso6
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = if self.raised_mtu() {
            TSO_FRAME.max(self.mtu)
        } else {
            self.mtu
        };
        // Never verify on receive (the classifier did, or the guest left it to us); compute on
        // send, except TCP's when the guest takes partial checksums.
        let mut checksum = ChecksumCapabilities::ignored();
        checksum.ipv4 = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        checksum.icmpv6 = Checksum::Tx;
        checksum.tcp = if self.offloads.rx_csum {
            Checksum::None
        } else {
            Checksum::Tx
        };
        caps.checksum = checksum;
        let tso = NonZeroUsize::new(TSO_FRAME.max(self.mtu));
        caps.segmentation.tcpv4 = tso.filter(|_| self.offloads.rx_tso4);
        caps.segmentation.tcpv6 = tso.filter(|_| self.offloads.rx_tso6);
        caps
    }

    /// Makes a frame smoltcp just wrote fit what the guest acked: the virtio-net header it
    /// needs, its TCP checksum's pseudo-header sum, a SYN's MSS clamped to the guest's MTU.
    /// `None`: the guest cannot take it.
    fn finish(&self, frame: &mut [u8], mss_hint: Option<u16>) -> Option<NetHeader> {
        let Some(tcp) = TcpSpot::find(frame) else {
            return (frame.len() <= self.mtu).then_some(NetHeader::NONE);
        };
        let mut header = NetHeader::NONE;
        let frame_len = frame.len();
        let ip_mtu = self.mtu - 14;
        let (src, dst) = (tcp.src, tcp.dst);
        let segment = &mut frame[tcp.start..tcp.end];
        let tcp_len = segment.len();
        let mut packet = TcpPacket::new_checked(&mut *segment).ok()?;
        let tcp_hdr = usize::from(packet.header_len());
        if packet.syn() && self.raised_mtu() {
            clamp_mss(&mut packet, (ip_mtu - tcp.ip_hdr - 20) as u16);
            if !self.offloads.rx_csum {
                packet.fill_checksum(&src, &dst);
            }
        }
        if self.offloads.rx_csum {
            packet.set_checksum(checksum::pseudo_header(
                &src,
                &dst,
                IpProtocol::Tcp,
                tcp_len as u32,
            ));
            header.flags = NetHeader::F_NEEDS_CSUM;
            header.csum_start = tcp.start as u16;
            header.csum_offset = 16;
        }
        if frame_len > self.mtu {
            let (allowed, gso_type) = if tcp.ip_hdr == 20 {
                (self.offloads.rx_tso4, NetHeader::GSO_TCPV4)
            } else {
                (self.offloads.rx_tso6, NetHeader::GSO_TCPV6)
            };
            if !allowed {
                return None;
            }
            let fits = (ip_mtu - tcp.ip_hdr).saturating_sub(tcp_hdr).max(1) as u16;
            header.gso_type = gso_type;
            header.gso_size = mss_hint.map_or(fits, |m| m.min(fits));
            header.hdr_len = (tcp.start + tcp_hdr) as u16;
        }
        Some(header)
    }
}

/// Where the TCP segment of a frame is, if the frame is TCP over IPv4 or IPv6.
struct TcpSpot {
    /// Offset of the TCP header in the frame, and end of the segment.
    start: usize,
    end: usize,
    ip_hdr: usize,
    src: IpAddress,
    dst: IpAddress,
}

impl TcpSpot {
    fn find(frame: &[u8]) -> Option<TcpSpot> {
        use smoltcp::wire::{Ipv4Packet, Ipv6Packet};
        let ip = frame.get(14..)?;
        match frame.get(12..14)? {
            [0x08, 0x00] => {
                let p = Ipv4Packet::new_checked(ip).ok()?;
                if p.next_header() != IpProtocol::Tcp {
                    return None;
                }
                let hdr = usize::from(p.header_len());
                Some(TcpSpot {
                    start: 14 + hdr,
                    end: 14 + usize::from(p.total_len()),
                    ip_hdr: hdr,
                    src: p.src_addr().into(),
                    dst: p.dst_addr().into(),
                })
            }
            [0x86, 0xdd] => {
                let p = Ipv6Packet::new_checked(ip).ok()?;
                if p.next_header() != IpProtocol::Tcp {
                    return None;
                }
                Some(TcpSpot {
                    start: 54,
                    end: 54 + usize::from(p.payload_len()),
                    ip_hdr: 40,
                    src: p.src_addr().into(),
                    dst: p.dst_addr().into(),
                })
            }
            _ => None,
        }
    }
}

/// Lowers the MSS option of a SYN to `mss` if it is larger (the checksum is not updated).
fn clamp_mss(packet: &mut TcpPacket<&mut [u8]>, mss: u16) {
    let options = packet.options_mut();
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = options.get(i + 1) else {
                    break;
                };
                let len = usize::from(len);
                if len < 2 || i + len > options.len() {
                    break;
                }
                if kind == 2 && len == 4 {
                    let current = u16::from_be_bytes([options[i + 2], options[i + 3]]);
                    if current > mss {
                        options[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    }
                }
                i += len;
            }
        }
    }
}

/// The device smoltcp polls: the port, and at most one frame from the guest, borrowed (never
/// copied).
struct PortWithFrame<'p, 'f> {
    port: &'p mut GuestPort,
    inbound: Option<&'f [u8]>,
}

pub struct LinkRx<'f>(&'f [u8]);
pub struct LinkTx<'a> {
    port: &'a mut GuestPort,
    meta: PacketMeta,
}

impl RxToken for LinkRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl TxToken for LinkTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let port = self.port;
        let mut buf = port.spare.pop().unwrap_or_default();
        if buf.len() < len {
            // Only a buffer's growth is zero-filled; a reused one is simply written over.
            buf.resize(len, 0);
        }
        let r = f(&mut buf[..len]);
        let hint = self
            .meta
            .segmentation_offload_size
            .map(|m| m.get())
            .filter(|_| len > port.mtu);
        match port.finish(&mut buf[..len], hint) {
            Some(header) => port.push(OutFrame { header, buf, len }),
            None => {
                port.oversize_dropped += 1;
                if port.spare.len() < SPARE_BUFFERS {
                    port.spare.push(buf);
                }
            }
        }
        r
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.meta = meta;
    }
}

impl<'f> Device for PortWithFrame<'_, 'f> {
    type RxToken<'a>
        = LinkRx<'f>
    where
        Self: 'a;
    type TxToken<'a>
        = LinkTx<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(LinkRx<'f>, LinkTx<'_>)> {
        if !self.port.has_room() {
            return None;
        }
        let frame = self.inbound.take()?;
        Some((
            LinkRx(frame),
            LinkTx {
                port: self.port,
                meta: PacketMeta::default(),
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<LinkTx<'_>> {
        if self.port.has_room() {
            Some(LinkTx {
                port: self.port,
                meta: PacketMeta::default(),
            })
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.port.capabilities()
    }
}

/// The gateway's addresses, to build the interface again.
struct Addresses {
    gateway: Ipv4Addr,
    prefix_len: u8,
    addrs6: LinkAddrs6,
}

/// smoltcp's interface, its sockets and its device, for one guest link.
pub struct GuestStack {
    pub iface: Interface,
    /// The sockets smoltcp polls: its every poll walks all of them.
    pub sockets: SocketSet<'static>,
    /// Sockets of flows at rest, which smoltcp does not walk (see [`GuestStack::park`]).
    pub parked: SocketSet<'static>,
    /// One socket at a time, to ask smoltcp whether it has work before it is parked.
    scratch: SocketSet<'static>,
    pub port: GuestPort,
    /// The gateway's and the guest's MAC, for the frames built outside smoltcp.
    pub macs: Macs,
    addresses: Addresses,
    epoch: std::time::Instant,
}

impl GuestStack {
    pub fn new(
        macs: Macs,
        gateway: Ipv4Addr,
        prefix_len: u8,
        addrs6: &LinkAddrs6,
        mtu: u16,
        queue_frames: usize,
        queue_bytes: usize,
    ) -> Self {
        let mut port = GuestPort::new(mtu, queue_frames, queue_bytes);
        let addresses = Addresses {
            gateway,
            prefix_len,
            addrs6: *addrs6,
        };
        let iface = build_interface(&mut port, &macs, &addresses);
        GuestStack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            parked: SocketSet::new(Vec::new()),
            scratch: SocketSet::new(Vec::new()),
            port,
            macs,
            addresses,
            epoch: std::time::Instant::now(),
        }
    }

    /// Uses the offloads the VMM acked from now on: smoltcp's interface is built again with
    /// the device's new capabilities (its sockets stay; it learns the guest's MAC again).
    /// Frames already queued for the guest are made to fit the new offloads ([`refit`]).
    pub fn set_offloads(&mut self, offloads: Offloads) {
        if offloads == self.port.offloads {
            return;
        }
        self.port.offloads = offloads;
        self.iface = build_interface(&mut self.port, &self.macs, &self.addresses);
        let queued = std::mem::take(&mut self.port.to_guest);
        for frame in queued {
            self.port.to_guest.extend(refit(frame, offloads));
        }
        // Cut segments gained headers: the byte count follows what the queue now holds.
        self.port.queued_bytes = self.port.to_guest.iter().map(|f| f.len).sum();
        self.port.queued_bytes_peak = self.port.queued_bytes_peak.max(self.port.queued_bytes);
    }

    /// Forgets every socket and every queued frame: the guest's rings restarted (reboot).
    pub fn reset(&mut self) {
        self.sockets = SocketSet::new(Vec::new());
        self.parked = SocketSet::new(Vec::new());
        self.scratch = SocketSet::new(Vec::new());
        self.port.clear();
    }

    /// Moves socket `handle` out of the set smoltcp polls into the parked set, if smoltcp has
    /// nothing to do for it until a frame arrives (no ACK, retransmission or timer pending).
    /// smoltcp's every poll, and every frame it takes in, walks all the sockets it polls: a
    /// link with thousands of flows at rest would pay for each of them on every frame of a
    /// busy one. A parked socket must be brought back ([`GuestStack::unpark`]) before a frame
    /// for it reaches smoltcp (smoltcp would answer it with a reset) or before it is used.
    /// Returns the socket's new handle and whether it is parked.
    pub fn park(&mut self, handle: SocketHandle) -> (SocketHandle, bool) {
        let now = self.now();
        let socket = self.sockets.remove(handle);
        let probe = self.scratch.add(socket);
        let idle = self.iface.poll_at(now, &self.scratch).is_none();
        let socket = self.scratch.remove(probe);
        if idle {
            (self.parked.add(socket), true)
        } else {
            (self.sockets.add(socket), false)
        }
    }

    /// Brings a parked socket back into the set smoltcp polls; returns its handle there.
    pub fn unpark(&mut self, parked: SocketHandle) -> SocketHandle {
        let socket = self.parked.remove(parked);
        self.sockets.add(socket)
    }

    /// smoltcp's clock: milliseconds since this stack was made.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Feeds one classified frame to smoltcp and lets it react. smoltcp reads the frame where
    /// it is. When the queue to the guest is full smoltcp cannot take it: it is dropped, as on
    /// a wire.
    pub fn receive(&mut self, frame: &[u8]) {
        let now = self.now();
        let mut device = PortWithFrame {
            port: &mut self.port,
            inbound: Some(frame),
        };
        self.iface.poll(now, &mut device, &mut self.sockets);
    }

    /// Lets smoltcp send what its sockets have ready.
    pub fn poll(&mut self) {
        let now = self.now();
        let mut device = PortWithFrame {
            port: &mut self.port,
            inbound: None,
        };
        self.iface.poll(now, &mut device, &mut self.sockets);
    }

    /// How long smoltcp can wait before it needs polling again.
    pub fn poll_delay(&mut self) -> Option<std::time::Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()))
    }
}

/// smoltcp's interface over `port` with its current capabilities.
fn build_interface(port: &mut GuestPort, macs: &Macs, addresses: &Addresses) -> Interface {
    let config = Config::new(HardwareAddress::Ethernet(macs.gateway_mac));
    let mut device = PortWithFrame {
        port,
        inbound: None,
    };
    let mut iface = Interface::new(config, &mut device, Instant::from_millis(0));
    let addrs6 = addresses.addrs6;
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(
            IpAddress::Ipv4(addresses.gateway),
            addresses.prefix_len,
        ));
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(addrs6.link_local), 64));
        let _ = addrs.push(IpCidr::new(
            IpAddress::Ipv6(addrs6.gateway),
            addrs6.prefix.prefix_len(),
        ));
    });
    iface.set_any_ip(true);
    iface
}

/// A frame queued for offloads the guest no longer acks (the VMM acked features again), made
/// to fit `offloads`: a large segment it cannot take is cut ([`segment`]), a partial checksum
/// it cannot take is completed. A frame that fits comes back as it is.
pub fn refit(mut frame: OutFrame, offloads: Offloads) -> Vec<OutFrame> {
    let header = frame.header;
    let gso_acked = match header.gso_type {
        NetHeader::GSO_NONE => true,
        NetHeader::GSO_TCPV4 => offloads.rx_tso4,
        NetHeader::GSO_TCPV6 => offloads.rx_tso6,
        _ => false,
    };
    if !gso_acked {
        return segment(frame, offloads.rx_csum);
    }
    if header.needs_csum() && !offloads.rx_csum {
        if let Some(tcp) = TcpSpot::find(frame.bytes()) {
            TcpPacket::new_unchecked(&mut frame.buf[tcp.start..tcp.end])
                .fill_checksum(&tcp.src, &tcp.dst);
        }
        frame.header = NetHeader::NONE;
    }
    vec![frame]
}

/// Cuts a GSO frame to the guest into segments of its `gso_size`, as the guest's NIC would have
/// (software TSO): for a guest whose receive buffers cannot hold the whole frame. Each segment
/// gets the headers with its own length, sequence number and checksum (partial, with its
/// header, when `partial_checksums`); FIN and PSH stay on the last. A frame that is not a TCP
/// GSO frame comes back as it is.
pub fn segment(frame: OutFrame, partial_checksums: bool) -> Vec<OutFrame> {
    let bytes = frame.bytes();
    let Some(tcp) = TcpSpot::find(bytes).filter(|_| frame.header.is_gso()) else {
        return vec![frame];
    };
    let Some(tcp_hdr) = bytes
        .get(tcp.start + 12)
        .map(|b| usize::from(b >> 4) * 4)
        .filter(|h| *h >= 20 && tcp.start + h <= tcp.end)
    else {
        return vec![frame];
    };
    let headers = tcp.start + tcp_hdr;
    let mss = usize::from(frame.header.gso_size.max(1));
    let payload = &bytes[headers..tcp.end];
    let seq = u32::from_be_bytes([
        bytes[tcp.start + 4],
        bytes[tcp.start + 5],
        bytes[tcp.start + 6],
        bytes[tcp.start + 7],
    ]);
    let chunks = payload.len().div_ceil(mss).max(1);
    let mut out = Vec::with_capacity(chunks);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let last = i + 1 == chunks;
        let mut buf = Vec::with_capacity(headers + chunk.len());
        buf.extend_from_slice(&bytes[..headers]);
        buf.extend_from_slice(chunk);
        let ip_len = buf.len() - 14;
        if tcp.ip_hdr == 20 {
            let mut ip = smoltcp::wire::Ipv4Packet::new_unchecked(&mut buf[14..]);
            ip.set_total_len(ip_len as u16);
            ip.set_ident(ip.ident().wrapping_add(i as u16));
            ip.fill_checksum();
        } else {
            smoltcp::wire::Ipv6Packet::new_unchecked(&mut buf[14..])
                .set_payload_len((ip_len - 40) as u16);
        }
        let tcp_len = buf.len() - tcp.start;
        let mut packet = TcpPacket::new_unchecked(&mut buf[tcp.start..]);
        packet.set_seq_number(smoltcp::wire::TcpSeqNumber(
            seq.wrapping_add((i * mss) as u32) as i32,
        ));
        if !last {
            // FIN and PSH only on the last segment.
            packet.set_fin(false);
            packet.set_psh(false);
        }
        let mut header = NetHeader::NONE;
        if partial_checksums {
            packet.set_checksum(checksum::pseudo_header(
                &tcp.src,
                &tcp.dst,
                IpProtocol::Tcp,
                tcp_len as u32,
            ));
            header.flags = NetHeader::F_NEEDS_CSUM;
            header.csum_start = tcp.start as u16;
            header.csum_offset = 16;
        } else {
            packet.fill_checksum(&tcp.src, &tcp.dst);
        }
        let len = buf.len();
        out.push(OutFrame { header, buf, len });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(bytes: usize) -> GuestPort {
        GuestPort::new(1500, 1024, bytes)
    }

    #[test]
    fn the_byte_bound_refuses_frames_and_counts_its_peak() {
        let mut p = port(4000);
        assert_eq!(p.room(), 2, "two MTU frames fit 4000 bytes");
        assert!(p.queue_frame(vec![0; 1514]));
        assert!(p.queue_frame(vec![0; 1514]));
        assert_eq!(p.room(), 0);
        assert!(!p.queue_frame(vec![0; 1000]), "past the byte bound");
        assert!(p.queue_frame(vec![0; 900]), "what still fits is taken");
        assert_eq!(p.queued_bytes(), 3928);
        assert!(!p.has_room(), "no room for an MTU frame from smoltcp");
        let f = p.pop_front().unwrap();
        p.recycle(f);
        assert!(p.has_room());
        assert_eq!(p.queued_bytes(), 2414);
        assert_eq!(p.queued_bytes_peak, 3928);
        p.clear();
        assert_eq!((p.queued_bytes(), p.queued_frames()), (0, 0));
    }

    #[test]
    fn with_guest_tso_smoltcp_needs_room_for_a_whole_tso_frame() {
        let mut p = port(256 * 1024);
        p.offloads.rx_tso4 = true;
        assert!(p.queue_frame(vec![0; 1514]));
        for _ in 0..2 {
            p.push(OutFrame::plain(vec![0; TSO_FRAME]));
        }
        assert!(p.has_room(), "3 frames, {} bytes", p.queued_bytes());
        p.push(OutFrame::plain(vec![0; TSO_FRAME]));
        assert!(!p.has_room(), "no room for another 64 KiB frame");
        assert_eq!(p.byte_bound_hits, 1);
        assert!(p.queued_bytes() <= 256 * 1024);
        // An empty queue takes any one frame, whatever the bound.
        let mut tiny = port(100);
        assert!(tiny.has_room() && tiny.queue_frame(vec![0; 1514]));
        assert!(!tiny.has_room() && tiny.room() == 0);
    }
}
