//! A guest-side smoltcp 0.14 stack over the [`Frontend`]: what a guest kernel would do with the
//! virtio-net device, for DHCP, ARP, ping, TCP and UDP through netfence.
//!
//! Everything is driven by [`Guest::poll_until`]: poll the interface, test a condition, and if
//! it does not hold yet, block on the call eventfds for at most what `iface.poll_delay` says
//! (bounded by the caller's deadline). There are no sleeps.
//!
//! Raw-frame helpers ([`Guest::raw_exchange`]) send a hand-built frame and wait for a matching
//! reply; other frames that arrive meanwhile are kept and handed to smoltcp afterwards.
//!
//! IPv6 is static ([`Guest::set_ipv6`]: an address in the prefix, the EUI-64 link-local address
//! and a default route via a link-local router); ping, TCP and UDP take either family.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{dhcpv4, icmp, tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    DhcpRepr, EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpCidr, IpEndpoint, Ipv4Cidr, Ipv6Cidr,
};

use super::frontend::Frontend;

/// The smoltcp `Device` over the frontend's queues.
pub struct GuestDevice {
    pub fe: Frontend,
    /// Ethernet frame size limit (MTU + 14).
    pub frame_mtu: usize,
    /// Frames set aside by raw helpers, delivered to smoltcp before new ones.
    pub stash: VecDeque<Vec<u8>>,
    /// Keep a copy of every frame in both directions (for debugging failed tests).
    pub capture: Option<Capture>,
    pub tx_dropped: u64,
}

/// The last `limit` frames seen by smoltcp in either direction, for failure reports. With
/// `tcp_only`, only TCP segment headers are kept (a few bytes each, no allocation per frame),
/// which perturbs timing far less during bulk transfers.
#[derive(Default)]
pub struct Capture {
    pub frames: VecDeque<(bool, Vec<u8>)>,
    pub segments: VecDeque<(bool, TcpSummary)>,
    pub limit: usize,
    pub tcp_only: bool,
}

/// TCP header fields of one captured segment.
#[derive(Clone, Copy, Debug)]
pub struct TcpSummary {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub len: u16,
}

impl TcpSummary {
    /// Reads the headers without validation (for captures only).
    fn parse(f: &[u8]) -> Option<TcpSummary> {
        if f.len() < 54 || f[12..14] != [8, 0] || f[23] != 6 {
            return None;
        }
        let ihl = ((f[14] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([f[16], f[17]]) as usize;
        let t = f.get(14 + ihl..14 + ihl + 20)?;
        let doff = ((t[12] >> 4) as usize) * 4;
        let be16 = |i: usize| u16::from_be_bytes([t[i], t[i + 1]]);
        let be32 = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
        Some(TcpSummary {
            sport: be16(0),
            dport: be16(2),
            seq: be32(4),
            ack: be32(8),
            flags: t[13],
            window: be16(14),
            len: total.saturating_sub(ihl + doff) as u16,
        })
    }
}

impl std::fmt::Display for TcpSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut fl = String::new();
        for (bit, c) in [
            (0x02, 'S'),
            (0x10, '.'),
            (0x08, 'P'),
            (0x01, 'F'),
            (0x04, 'R'),
        ] {
            if self.flags & bit != 0 {
                fl.push(c);
            }
        }
        write!(
            f,
            "{}>{} [{fl}] seq={} ack={} win={} len={}",
            self.sport, self.dport, self.seq, self.ack, self.window, self.len
        )
    }
}

impl Capture {
    pub fn new(limit: usize) -> Capture {
        Capture {
            limit,
            ..Default::default()
        }
    }

    pub fn tcp_headers(limit: usize) -> Capture {
        Capture {
            limit,
            tcp_only: true,
            ..Default::default()
        }
    }

    fn record(&mut self, outgoing: bool, f: &[u8]) {
        if self.tcp_only {
            if let Some(t) = TcpSummary::parse(f) {
                if self.segments.len() == self.limit {
                    self.segments.pop_front();
                }
                self.segments.push_back((outgoing, t));
            }
            return;
        }
        if self.frames.len() == self.limit {
            self.frames.pop_front();
        }
        self.frames.push_back((outgoing, f.to_vec()));
    }

    /// One line per frame: "guest->" or "->guest" and a summary.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for (out, f) in &self.frames {
            s.push_str(if *out { "guest-> " } else { "->guest " });
            s.push_str(&super::frames::describe(f));
            s.push('\n');
        }
        for (out, t) in &self.segments {
            s.push_str(if *out { "guest-> " } else { "->guest " });
            s.push_str(&t.to_string());
            s.push('\n');
        }
        s
    }
}

pub struct RxTok(Vec<u8>);

pub struct TxTok<'a> {
    dev: &'a mut GuestDevice,
}

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        if let Some(c) = self.dev.capture.as_mut() {
            c.record(true, &buf);
        }
        if !self.dev.fe.try_send_frame(&buf) {
            self.dev.tx_dropped += 1;
        }
        r
    }
}

impl GuestDevice {
    fn next_frame(&mut self) -> Option<Vec<u8>> {
        let f = match self.stash.pop_front() {
            Some(f) => f,
            None => self.fe.try_recv_frame()?,
        };
        // smoltcp 0.14 trims a segment to its receive window but still takes its FIN, which
        // loses the trimmed bytes (netfence works around the same bug on its side, see
        // `netfence::stack::frames::split_fin`). This guest is a test instrument, so it always
        // takes data and FIN separately: the bare FIN is taken only once the data before it is.
        let f = match netfence::stack::frames::split_fin(&f) {
            Some((data, fin)) => {
                self.stash.push_front(fin);
                data
            }
            None => f,
        };
        if let Some(c) = self.capture.as_mut() {
            c.record(false, &f);
        }
        Some(f)
    }
}

impl Device for GuestDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _ts: SmolInstant) -> Option<(RxTok, TxTok<'_>)> {
        // Like a guest driver's RX path, consume used RX buffers and repost them whatever the
        // state of TX, so RX never waits on TX.
        self.fe.poll_rx();
        // Hand a frame to smoltcp only when a reply could be sent; otherwise it stays queued.
        if !self.fe.tx_has_room(self.frame_mtu) {
            return None;
        }
        let f = self.next_frame()?;
        Some((RxTok(f), TxTok { dev: self }))
    }

    fn transmit(&mut self, _ts: SmolInstant) -> Option<TxTok<'_>> {
        if self.fe.tx_has_room(self.frame_mtu) {
            Some(TxTok { dev: self })
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.frame_mtu;
        caps.max_burst_size = None;
        // Compute and verify every checksum: netfence offers no checksum offload.
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}

/// What DHCP gave us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Cidr,
    pub router: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub subnet_mask: Option<Ipv4Addr>,
    pub mtu: Option<u16>,
    pub lease_time: Option<u32>,
    /// Every option of the ACK as (code, data).
    pub options: Vec<(u8, Vec<u8>)>,
}

/// Why a TCP connect did not reach Established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The socket went back to Closed: an RST answered the SYN.
    Reset { after: Duration },
    /// Still not established at the deadline (state at that time).
    Timeout(tcp::State),
}

pub struct Guest {
    pub dev: GuestDevice,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub mac: [u8; 6],
    pub lease: Option<Lease>,
    /// Static IPv6 configuration, if any: (address, prefix length, default router).
    pub ipv6: Option<(Ipv6Addr, u8, Ipv6Addr)>,
    next_port: u16,
}

/// Default TCP socket buffer sizes (both directions).
pub const TCP_BUF: usize = 256 * 1024;

fn smol_now() -> SmolInstant {
    SmolInstant::now()
}

impl Guest {
    pub fn new(fe: Frontend) -> Guest {
        let mac = fe.guest_mac();
        let frame_mtu = fe.mtu() as usize + 14;
        let mut dev = GuestDevice {
            fe,
            frame_mtu,
            stash: VecDeque::new(),
            capture: None,
            tx_dropped: 0,
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        let iface = Interface::new(config, &mut dev, smol_now());
        Guest {
            dev,
            iface,
            sockets: SocketSet::new(Vec::new()),
            mac,
            lease: None,
            ipv6: None,
            next_port: 49152 + (std::process::id() % 1000) as u16,
        }
    }

    pub fn fe(&mut self) -> &mut Frontend {
        &mut self.dev.fe
    }

    /// Our IPv4 address (after DHCP or `set_address`).
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.lease.as_ref().map(|l| l.address.address())
    }

    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.lease.as_ref().and_then(|l| l.router)
    }

    /// Our global IPv6 address (after `set_ipv6`).
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ipv6.map(|(a, _, _)| a)
    }

    /// Our link-local IPv6 address (modified EUI-64 of the MAC, as Linux forms it).
    pub fn link_local6(&self) -> Ipv6Addr {
        super::frames6::link_local_from_mac(self.mac)
    }

    /// One interface poll.
    pub fn poll(&mut self) {
        self.iface
            .poll(smol_now(), &mut self.dev, &mut self.sockets);
    }

    /// Polls until `f` returns Some or the deadline passes, waiting on the call eventfds in
    /// between for at most what smoltcp's timers allow.
    pub fn poll_until<T>(
        &mut self,
        deadline: Instant,
        mut f: impl FnMut(&mut Guest) -> Option<T>,
    ) -> Option<T> {
        loop {
            self.poll();
            if let Some(x) = f(self) {
                return Some(x);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let delay = self
                .iface
                .poll_delay(smol_now(), &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()));
            if delay == Some(Duration::ZERO) {
                continue;
            }
            let wake = match delay {
                Some(d) => deadline.min(now + d),
                None => deadline,
            };
            self.dev.fe.wait(Some(wake));
        }
    }

    /// Polls for `d`, doing whatever the stack has to do, and then returns.
    pub fn run_for(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        self.poll_until::<()>(deadline, |_| None);
    }

    // ---- addressing ----------------------------------------------------------------------------

    /// Runs the smoltcp DHCP client to completion and configures the interface with the lease.
    pub fn dhcp(&mut self, timeout: Duration) -> Result<Lease, String> {
        let mut sock = dhcpv4::Socket::new();
        let pkt_buf: &'static mut [u8] = Box::leak(vec![0u8; 1500].into_boxed_slice());
        sock.set_receive_packet_buffer(pkt_buf);
        sock.set_parameter_request_list(&[1, 3, 6, 26, 51]);
        let h = self.sockets.add(sock);
        let deadline = Instant::now() + timeout;
        let lease = self.poll_until(deadline, |g| {
            let s = g.sockets.get_mut::<dhcpv4::Socket>(h);
            match s.poll() {
                Some(dhcpv4::Event::Configured(cfg)) => Some(lease_from(&cfg)),
                _ => None,
            }
        });
        self.sockets.remove(h);
        let lease = lease.ok_or_else(|| format!("no DHCP lease within {timeout:?}"))?;
        self.apply_lease(lease.clone());
        Ok(lease)
    }

    /// Configures address and default route without DHCP.
    pub fn set_address(&mut self, cidr: Ipv4Cidr, router: Ipv4Addr) {
        self.apply_lease(Lease {
            address: cidr,
            router: Some(router),
            dns_servers: vec![],
            server: router,
            subnet_mask: None,
            mtu: None,
            lease_time: None,
            options: vec![],
        });
    }

    fn apply_lease(&mut self, lease: Lease) {
        self.iface.update_ip_addrs(|addrs| {
            addrs.retain(|a| !matches!(a, IpCidr::Ipv4(_)));
            addrs.push(IpCidr::Ipv4(lease.address)).unwrap();
        });
        if let Some(r) = lease.router {
            self.iface.routes_mut().add_default_ipv4_route(r).unwrap();
        } else {
            self.iface.routes_mut().remove_default_ipv4_route();
        }
        self.lease = Some(lease);
    }

    /// Configures IPv6 beside whatever IPv4 there is: `addr/prefix_len`, the link-local
    /// address `fe80::<EUI-64>/64` and a default route via `router` (typically link-local).
    /// Replaces an earlier IPv6 configuration.
    pub fn set_ipv6(&mut self, addr: Ipv6Addr, prefix_len: u8, router: Ipv6Addr) {
        let ll = self.link_local6();
        self.iface.update_ip_addrs(|addrs| {
            addrs.retain(|a| !matches!(a, IpCidr::Ipv6(_)));
            // Link-local first: smoltcp then also prefers it for link-local destinations.
            addrs
                .push(IpCidr::Ipv6(Ipv6Cidr::new(ll, 64)))
                .expect("room for the link-local address (smoltcp iface-max-addr-count)");
            addrs
                .push(IpCidr::Ipv6(Ipv6Cidr::new(addr, prefix_len)))
                .expect("room for the IPv6 address (smoltcp iface-max-addr-count)");
        });
        self.iface
            .routes_mut()
            .add_default_ipv6_route(router)
            .expect("room for the IPv6 default route");
        self.ipv6 = Some((addr, prefix_len, router));
    }

    pub fn next_port(&mut self) -> u16 {
        self.next_port = if self.next_port >= 65000 {
            49152
        } else {
            self.next_port + 1
        };
        self.next_port
    }

    // ---- ICMP ----------------------------------------------------------------------------------

    /// Sends one echo request (ICMP or ICMPv6) to `dst` and waits for the matching reply;
    /// returns the RTT.
    pub fn ping(&mut self, dst: impl Into<IpAddr>, timeout: Duration) -> Result<Duration, String> {
        let dst: IpAddr = dst.into();
        let ident = self.next_port();
        let mut sock = icmp::Socket::new(
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0u8; 2048]),
            icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0u8; 2048]),
        );
        sock.bind(icmp::Endpoint::Ident(ident))
            .map_err(|e| format!("{e:?}"))?;
        let h = self.sockets.add(sock);
        let data: Vec<u8> = (0..56u8).collect();
        let seq = 1u16;
        let caps = ChecksumCapabilities::default();
        let start = Instant::now();
        let s = self.sockets.get_mut::<icmp::Socket>(h);
        match dst {
            IpAddr::V4(dst4) => {
                let repr = Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no: seq,
                    data: &data,
                };
                let buf = s
                    .send(repr.buffer_len(), IpAddress::Ipv4(dst4))
                    .map_err(|e| format!("{e:?}"))?;
                repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
            }
            IpAddr::V6(dst6) => {
                // smoltcp re-emits ICMPv6 with the real source address and checksum.
                let repr = Icmpv6Repr::EchoRequest {
                    ident,
                    seq_no: seq,
                    data: &data,
                };
                let buf = s
                    .send(repr.buffer_len(), IpAddress::Ipv6(dst6))
                    .map_err(|e| format!("{e:?}"))?;
                repr.emit(
                    &Ipv6Addr::UNSPECIFIED,
                    &dst6,
                    &mut Icmpv6Packet::new_unchecked(buf),
                    &caps,
                );
            }
        }
        let deadline = start + timeout;
        let want_from = IpAddress::from(dst);
        let r = self.poll_until(deadline, |g| {
            let s = g.sockets.get_mut::<icmp::Socket>(h);
            while s.can_recv() {
                let mut buf = [0u8; 2048];
                let (n, from) = s.recv_slice(&mut buf).ok()?;
                if from != want_from {
                    continue;
                }
                if let Some((i, seq_no, ok)) = echo_reply_of(dst, &buf[..n], &data) {
                    if i == ident && seq_no == seq {
                        return Some(ok);
                    }
                }
            }
            None
        });
        self.sockets.remove(h);
        match r {
            Some(true) => Ok(start.elapsed()),
            Some(false) => Err("echo reply with different data".into()),
            None => Err(format!("no echo reply from {dst} within {timeout:?}")),
        }
    }

    // ---- raw frames ----------------------------------------------------------------------------

    /// Sends `frame` as is and waits for a frame `pred` accepts. Frames that do not match are
    /// kept for smoltcp. The interface is not polled meanwhile.
    pub fn raw_exchange(
        &mut self,
        frame: &[u8],
        deadline: Instant,
        pred: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        self.dev.fe.send_frame(frame);
        self.raw_wait(deadline, pred)
    }

    /// Waits for a frame `pred` accepts (others are stashed for smoltcp). Neighbor
    /// solicitations for our IPv6 addresses that `pred` does not want are answered here, as
    /// the guest kernel would, since smoltcp is not polled meanwhile.
    pub fn raw_wait(
        &mut self,
        deadline: Instant,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let mut kept = Vec::new();
        let found = loop {
            match self.dev.fe.recv_frame(deadline) {
                Some(f) if pred(&f) => break Some(f),
                Some(f) if self.answer_neighbor_solicit(&f) => {}
                Some(f) => kept.push(f),
                None => break None,
            }
        };
        self.dev.stash.extend(kept);
        found
    }

    /// If `f` is a neighbor solicitation for one of our IPv6 addresses, sends the
    /// advertisement and returns true.
    pub fn answer_neighbor_solicit(&mut self, f: &[u8]) -> bool {
        let Some(ns) = super::frames6::parse_neighbor_solicit(f) else {
            return false;
        };
        let ours = ns.target == self.link_local6() || Some(ns.target) == self.ip6();
        if !ours || !ns.checksum_ok {
            return false;
        }
        let to_mac = ns.slla.unwrap_or(ns.ip.eth_src);
        let na = super::frames6::neighbor_advert_frame(self.mac, to_mac, ns.target, ns.ip.src);
        self.dev.fe.send_frame(&na);
        true
    }

    /// Collects every frame arriving until the deadline (none are given to smoltcp).
    pub fn raw_collect(&mut self, deadline: Instant) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = self.dev.stash.drain(..).collect();
        while let Some(f) = self.dev.fe.recv_frame(deadline) {
            v.push(f);
        }
        v
    }

    /// ARP who-has `target` sent by hand; returns the reply.
    pub fn arp_raw(
        &mut self,
        target: Ipv4Addr,
        timeout: Duration,
    ) -> Option<super::frames::ArpInfo> {
        let src_ip = self.ip().unwrap_or(Ipv4Addr::UNSPECIFIED);
        let req = super::frames::arp_request(self.mac, src_ip, target);
        let mac = self.mac;
        let f = self.raw_exchange(&req, Instant::now() + timeout, |f| {
            super::frames::parse_arp(f)
                .map(|a| !a.request && a.sender_ip == target && a.target_mac == mac)
                .unwrap_or(false)
        })?;
        super::frames::parse_arp(&f)
    }

    // ---- TCP -----------------------------------------------------------------------------------

    pub fn tcp_socket(&mut self, rx: usize, tx: usize) -> SocketHandle {
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; rx]),
            tcp::SocketBuffer::new(vec![0u8; tx]),
        );
        self.sockets.add(s)
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Starts a connection without waiting (for raw observation of the handshake).
    pub fn tcp_start(&mut self, dst: impl Into<IpAddr>, port: u16) -> SocketHandle {
        self.tcp_start_sized(dst, port, TCP_BUF)
    }

    /// [`Guest::tcp_start`] with a receive buffer (and so a window) of `rx` bytes.
    pub fn tcp_start_sized(
        &mut self,
        dst: impl Into<IpAddr>,
        port: u16,
        rx: usize,
    ) -> SocketHandle {
        let h = self.tcp_socket(rx, TCP_BUF);
        let local = self.next_port();
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(
                cx,
                IpEndpoint::new(IpAddress::from(dst.into()), port),
                local,
            )
            .expect("tcp connect");
        h
    }

    /// Connects and waits for Established (or an RST, or the deadline).
    pub fn tcp_connect(
        &mut self,
        dst: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<SocketHandle, ConnectError> {
        self.tcp_connect_sized(dst, port, TCP_BUF, timeout)
    }

    /// [`Guest::tcp_connect`] with a receive buffer (and so a window) of `rx` bytes.
    pub fn tcp_connect_sized(
        &mut self,
        dst: impl Into<IpAddr>,
        port: u16,
        rx: usize,
        timeout: Duration,
    ) -> Result<SocketHandle, ConnectError> {
        let start = Instant::now();
        let h = self.tcp_start_sized(dst, port, rx);
        let r = self.poll_until(start + timeout, |g| match g.tcp(h).state() {
            tcp::State::Established => Some(Ok(())),
            tcp::State::Closed => Some(Err(())),
            _ => None,
        });
        match r {
            Some(Ok(())) => Ok(h),
            Some(Err(())) => {
                self.sockets.remove(h);
                Err(ConnectError::Reset {
                    after: start.elapsed(),
                })
            }
            None => {
                let st = self.tcp(h).state();
                self.tcp(h).abort();
                self.poll();
                self.sockets.remove(h);
                Err(ConnectError::Timeout(st))
            }
        }
    }

    /// Queues all of `data` (waiting for window as needed). Does not wait for ACKs.
    pub fn tcp_send_all(
        &mut self,
        h: SocketHandle,
        data: &[u8],
        deadline: Instant,
    ) -> Result<(), String> {
        let mut off = 0;
        self.poll_until(deadline, |g| {
            let s = g.tcp(h);
            if !s.may_send() {
                return Some(());
            }
            if s.can_send() {
                off += s.send_slice(&data[off..]).unwrap_or(0);
            }
            (off == data.len()).then_some(())
        });
        if off == data.len() {
            Ok(())
        } else {
            Err(format!(
                "sent {off} of {} bytes (state {})",
                data.len(),
                self.tcp(h).state()
            ))
        }
    }

    /// Waits until everything queued has been acknowledged.
    pub fn tcp_flush(&mut self, h: SocketHandle, deadline: Instant) -> bool {
        self.poll_until(deadline, |g| (g.tcp(h).send_queue() == 0).then_some(()))
            .is_some()
    }

    /// Reads exactly `n` bytes.
    pub fn tcp_recv_exact(
        &mut self,
        h: SocketHandle,
        n: usize,
        deadline: Instant,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(n);
        self.poll_until(deadline, |g| {
            let s = g.tcp(h);
            while s.can_recv() && out.len() < n {
                let want = n - out.len();
                let _ = s.recv(|b| {
                    let k = b.len().min(want);
                    out.extend_from_slice(&b[..k]);
                    (k, ())
                });
            }
            (out.len() == n || !s.may_recv()).then_some(())
        });
        if out.len() == n {
            Ok(out)
        } else {
            Err(format!(
                "received {} of {n} bytes (state {})",
                out.len(),
                self.tcp(h).state()
            ))
        }
    }

    /// Reads until the peer's FIN (or RST). Returns the bytes and whether it ended with a FIN.
    pub fn tcp_recv_to_eof(&mut self, h: SocketHandle, deadline: Instant) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let done = self.poll_until(deadline, |g| {
            let s = g.tcp(h);
            while s.can_recv() {
                let _ = s.recv(|b| {
                    out.extend_from_slice(b);
                    (b.len(), ())
                });
            }
            (!s.may_recv()).then_some(())
        });
        let st = self.tcp(h).state();
        let fin = done.is_some() && st != tcp::State::Closed;
        (out, fin)
    }

    /// Sends `data`, closes our side after it (FIN) if `close`, and reads until the peer's FIN,
    /// both at once (full duplex). Returns what was received.
    pub fn tcp_transfer(
        &mut self,
        h: SocketHandle,
        data: &[u8],
        close: bool,
        deadline: Instant,
    ) -> Result<Vec<u8>, String> {
        let mut off = 0;
        let mut closed = false;
        let mut out = Vec::new();
        let r = self.poll_until(deadline, |g| {
            let s = g.tcp(h);
            if s.can_send() && off < data.len() {
                off += s.send_slice(&data[off..]).unwrap_or(0);
            }
            if off == data.len() && close && !closed {
                s.close();
                closed = true;
            }
            while s.can_recv() {
                let _ = s.recv(|b| {
                    out.extend_from_slice(b);
                    (b.len(), ())
                });
            }
            if s.state() == tcp::State::Closed {
                return Some(false);
            }
            (!s.may_recv() && off == data.len()).then_some(true)
        });
        match r {
            Some(true) => Ok(out),
            Some(false) => Err(format!(
                "connection reset after sending {off} of {} and receiving {} bytes",
                data.len(),
                out.len()
            )),
            None => Err(format!(
                "timeout: sent {off} of {}, received {} bytes, state {}; {}",
                data.len(),
                out.len(),
                self.tcp(h).state(),
                self.dev.fe.debug_state()
            )),
        }
    }

    /// Sends our FIN (half-close: we can still receive).
    pub fn tcp_shutdown_write(&mut self, h: SocketHandle) {
        self.tcp(h).close();
        self.poll();
    }

    /// Waits until the socket reaches one of `states`.
    pub fn tcp_wait_state(
        &mut self,
        h: SocketHandle,
        states: &[tcp::State],
        deadline: Instant,
    ) -> Option<tcp::State> {
        self.poll_until(deadline, |g| {
            let st = g.tcp(h).state();
            states.contains(&st).then_some(st)
        })
    }

    // ---- UDP -----------------------------------------------------------------------------------

    pub fn udp_bind(&mut self, port: u16) -> SocketHandle {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 128 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 128 * 1024]),
        );
        s.bind(port).expect("udp bind");
        self.sockets.add(s)
    }

    pub fn udp_send(&mut self, h: SocketHandle, dst: impl Into<IpAddr>, port: u16, data: &[u8]) {
        self.sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(data, IpEndpoint::new(IpAddress::from(dst.into()), port))
            .expect("udp send");
        self.poll();
    }

    /// Waits for one datagram.
    pub fn udp_recv(
        &mut self,
        h: SocketHandle,
        deadline: Instant,
    ) -> Option<(Vec<u8>, IpEndpoint)> {
        self.poll_until(deadline, |g| {
            let s = g.sockets.get_mut::<udp::Socket>(h);
            if s.can_recv() {
                let mut buf = vec![0u8; 65536];
                let (n, meta) = s.recv_slice(&mut buf).ok()?;
                buf.truncate(n);
                Some((buf, meta.endpoint))
            } else {
                None
            }
        })
    }
}

/// (ident, seq, data equals `want`) of an echo reply an ICMP socket received from `from`. The
/// stack already verified the checksum, and ICMPv6 checksums need our own address, so parsing
/// here ignores checksums.
fn echo_reply_of(from: IpAddr, pkt: &[u8], want: &[u8]) -> Option<(u16, u16, bool)> {
    let caps = ChecksumCapabilities::ignored();
    match from {
        IpAddr::V4(_) => {
            let p = Icmpv4Packet::new_checked(pkt).ok()?;
            match Icmpv4Repr::parse(&p, &caps).ok()? {
                Icmpv4Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                } => Some((ident, seq_no, data == want)),
                _ => None,
            }
        }
        IpAddr::V6(src) => {
            let p = Icmpv6Packet::new_checked(pkt).ok()?;
            match Icmpv6Repr::parse(&src, &Ipv6Addr::UNSPECIFIED, &p, &caps).ok()? {
                Icmpv6Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                } => Some((ident, seq_no, data == want)),
                _ => None,
            }
        }
    }
}

fn lease_from(cfg: &dhcpv4::Config<'_>) -> Lease {
    let mut lease = Lease {
        address: cfg.address,
        router: cfg.router,
        dns_servers: cfg.dns_servers.iter().copied().collect(),
        server: cfg.server.identifier,
        subnet_mask: None,
        mtu: None,
        lease_time: None,
        options: vec![],
    };
    if let Some(pkt) = &cfg.packet {
        for o in pkt.options() {
            lease.options.push((o.kind, o.data.to_vec()));
            if o.kind == 26 && o.data.len() == 2 {
                lease.mtu = Some(u16::from_be_bytes([o.data[0], o.data[1]]));
            }
        }
        if let Ok(repr) = DhcpRepr::parse(pkt) {
            lease.subnet_mask = repr.subnet_mask;
            lease.lease_time = repr.lease_duration;
        }
    }
    lease
}
