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

pub mod frames;

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use crate::config::addressing::LinkAddrs6;

use self::frames::Macs;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

/// The smoltcp device: one frame in (from the classifier), a bounded queue out (to the guest).
pub struct GuestPort {
    inbound: Option<Vec<u8>>,
    pub to_guest: VecDeque<Vec<u8>>,
    /// Most frames `to_guest` holds (`guest-queue-frames`).
    capacity: usize,
    mtu: usize,
    spare: Vec<Vec<u8>>,
}

impl GuestPort {
    fn new(mtu: u16, capacity: usize) -> Self {
        GuestPort {
            inbound: None,
            to_guest: VecDeque::new(),
            capacity: capacity.max(1),
            mtu: usize::from(mtu) + 14,
            spare: Vec::new(),
        }
    }

    /// Queues a frame built outside smoltcp (DHCP, UDP, resets). Returns false when full.
    pub fn queue_frame(&mut self, frame: Vec<u8>) -> bool {
        if self.to_guest.len() >= self.capacity {
            return false;
        }
        self.to_guest.push_back(frame);
        true
    }

    /// Frames that still fit in the queue.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.to_guest.len())
    }

    /// Drops every queued frame (the guest's rings restarted).
    pub fn clear(&mut self) {
        while let Some(f) = self.to_guest.pop_front() {
            self.recycle(f);
        }
        self.inbound = None;
    }

    /// Hands back a buffer whose frame has been copied to the guest, for reuse.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < 64 {
            buf.clear();
            self.spare.push(buf);
        }
    }

    pub fn has_room(&self) -> bool {
        self.to_guest.len() < self.capacity
    }
}

pub struct LinkRx(Vec<u8>);
pub struct LinkTx<'a>(&'a mut GuestPort);

impl RxToken for LinkRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for LinkTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.0.spare.pop().unwrap_or_default();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.0.to_guest.push_back(buf);
        r
    }
}

impl Device for GuestPort {
    type RxToken<'a> = LinkRx;
    type TxToken<'a> = LinkTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(LinkRx, LinkTx<'_>)> {
        if !self.has_room() {
            return None;
        }
        let frame = self.inbound.take()?;
        Some((LinkRx(frame), LinkTx(self)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<LinkTx<'_>> {
        if self.has_room() {
            Some(LinkTx(self))
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

/// smoltcp's interface, its sockets and its device, for one guest link.
pub struct GuestStack {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub port: GuestPort,
    /// The gateway's and the guest's MAC, for the frames built outside smoltcp.
    pub macs: Macs,
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
    ) -> Self {
        let mut port = GuestPort::new(mtu, queue_frames);
        let epoch = std::time::Instant::now();
        let config = Config::new(HardwareAddress::Ethernet(macs.gateway_mac));
        let mut iface = Interface::new(config, &mut port, Instant::from_millis(0));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(gateway), prefix_len));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(addrs6.link_local), 64));
            let _ = addrs.push(IpCidr::new(
                IpAddress::Ipv6(addrs6.gateway),
                addrs6.prefix.prefix_len(),
            ));
        });
        iface.set_any_ip(true);
        GuestStack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            port,
            macs,
            epoch,
        }
    }

    /// Forgets every socket and every queued frame: the guest's rings restarted (reboot).
    pub fn reset(&mut self) {
        self.sockets = SocketSet::new(Vec::new());
        self.port.clear();
    }

    /// smoltcp's clock: milliseconds since this stack was made.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Feeds one classified frame to smoltcp and lets it react.
    pub fn receive(&mut self, frame: &[u8]) {
        let mut buf = self.port.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        self.port.inbound = Some(buf);
        self.poll();
        if let Some(buf) = self.port.inbound.take() {
            // smoltcp could not take it (queue to the guest full): it is dropped like on a wire.
            self.port.recycle(buf);
        }
    }

    /// Lets smoltcp send what its sockets have ready.
    pub fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.port, &mut self.sockets);
    }

    /// How long smoltcp can wait before it needs polling again.
    pub fn poll_delay(&mut self) -> Option<std::time::Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()))
    }
}
