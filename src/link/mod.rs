//! One guest link: what one queue pair's worker owns, between the device and the flows.
//!
//! The device ([`crate::device`]) hands the link every frame the guest sent and every ready
//! fd, through the [`LinkDriver`] interface it owns. The link:
//!
//! 1. validates and classifies the frame ([`classify`], [`guard`]): malformed, spoofed and
//!    unwanted frames are counted and dropped here, and nothing passes under `none`;
//! 2. answers what the gateway itself serves: ARP and neighbour discovery ([`ndp`]), DHCP
//!    ([`dhcp`]), router advertisements, pings to the gateway (smoltcp);
//! 3. gives TCP, UDP and echo traffic to the flows ([`crate::flow`]), which decide new flows
//!    and carry them over host sockets;
//! 4. after each event, [`Link::service`] moves bytes until nothing more can move and writes the
//!    frames for the guest into its receive queue (the device's [`GuestRx`]).
//!
//! Nothing blocks and nothing loops unbounded: a side that cannot take more simply stops being
//! read. Time-based work (smoltcp retransmissions, timeouts) runs from one timerfd ([`timer`]).
//!
//! With `--pcap`, every frame is recorded where it crosses the device: as the device hands it
//! over ([`LinkDriver::guest_frame`]) and as it is written into the guest's RX buffers
//! ([`Link::flush`]); see [`crate::observe::pcap`].

pub mod classify;
pub mod dhcp;
pub mod fragments;
pub mod guard;
pub mod mq;
pub mod ndp;
pub mod timer;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;
use tracing::{debug, info, warn};

use crate::config::addressing::Addressing;
use crate::control::hub::{Hub, LinkSnapshot, Mailbox};
use crate::device::{GuestRx, LinkDriver, NetHeader, Offloads, RxOutcome, VringCounts};
use crate::flow::table::FlowRef;
use crate::flow::{FlowSettings, Flows};
use crate::observe::audit::AuditLog;
use crate::observe::pcap::PcapLog;
use crate::observe::{Counters, LogGate};
use crate::stack::frames::{self, Macs};
use crate::stack::GuestStack;

use self::classify::{classify_offloaded, Classified, DropReason};
use self::dhcp::DhcpServer;
use self::fragments::{Reassembler, Reassembly, ReassemblyLimits};
use self::guard::SourceGuard;
use self::mq::{Handoff, VmShared};
use self::timer::Timer;

/// Housekeeping (timeouts, log summaries) runs at least this often.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Rounds of pump/flush per service call: bounded, so the worker always gets back to epoll.
const SERVICE_ROUNDS: usize = 64;
/// Guest IPv6 addresses remembered as introduced to smoltcp (its neighbour cache holds 8).
const INTRODUCED_ADDRESSES: usize = 8;
/// How often an address is introduced again (smoltcp forgets a neighbour after 60 s).
const INTRODUCTION_REFRESH: Duration = Duration::from_secs(30);

/// The link's fds, in [`LinkDriver::watched_fds`] order.
const FD_FLOWS: usize = 0;
const FD_TIMER: usize = 1;
const FD_DNS: usize = 2;
/// The eventfd of the link's mailbox: the operator asks (a report) or sends (reloaded settings).
const FD_CONTROL: usize = 3;
/// With multiqueue: the eventfd of this pair's inbox of handed-off frames.
const FD_INBOX: usize = 4;

/// Where a guest frame is served (multiqueue steering, see [`mq`]).
enum Steer {
    /// By this pair.
    Here,
    /// By this pair, which just claimed the frame's flow: released if no flow came of it.
    Claimed(FlowRef),
    /// By pair `n`.
    To(u16),
}

/// Everything a link needs to know, shared by all connections of one netfence process.
#[derive(Clone)]
pub struct LinkSettings {
    pub addressing: Addressing,
    pub gateway_mac: [u8; 6],
    pub guest_mac: [u8; 6],
    pub mtu: u16,
    pub lease_secs: u32,
    pub flows: FlowSettings,
    /// Queue pairs of the device (`--queues`), one link and worker thread each.
    pub pairs: u16,
    /// `--pcap`: where every frame between the guest and the link is recorded.
    pub pcap: Option<Arc<PcapLog>>,
    /// `--audit`: where decisions, flow ends and secret violations are written.
    pub audit: Option<Arc<AuditLog>>,
    /// The process's control hub (reports, reload), and which of its settings these are.
    pub hub: Option<Arc<Hub>>,
    pub settings_generation: u64,
    /// The VMM connection's number (from 1), for reports.
    pub vm: u64,
}

/// How a link ends its VMM's connection on its own: a secret's `block_and_terminate` takes
/// this VM's network down. The server hands each link one over the VMM's control socket and
/// asks it afterwards whether it fired (`--once` then exits with status 3).
#[derive(Clone, Default)]
pub struct Terminator {
    inner: Arc<TerminatorInner>,
}

#[derive(Default)]
struct TerminatorInner {
    requested: AtomicBool,
    vmm: Mutex<Option<UnixStream>>,
}

impl Terminator {
    /// A terminator that shuts `vmm` (the VMM's control connection) down when it fires.
    pub fn new(vmm: Option<UnixStream>) -> Self {
        Terminator {
            inner: Arc::new(TerminatorInner {
                requested: AtomicBool::new(false),
                vmm: Mutex::new(vmm),
            }),
        }
    }

    /// Ends the VMM's connection (once).
    pub fn terminate(&self) {
        self.inner.requested.store(true, Ordering::Release);
        let vmm = self
            .inner
            .vmm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(vmm) = vmm {
            let _ = vmm.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether it fired.
    pub fn requested(&self) -> bool {
        self.inner.requested.load(Ordering::Acquire)
    }
}

/// The link of one VMM connection.
pub struct Link {
    settings: LinkSettings,
    stack: GuestStack,
    flows: Flows,
    dhcp: DhcpServer,
    guard: SourceGuard,
    /// IPv4 and IPv6 fragments being put back together (bounded by the fragment limits).
    fragments: Reassembler,
    timer: Timer,
    /// Frames dropped here, by reason.
    pub counters: Counters,
    spoof_log: LogGate,
    /// When the last router advertisement went out; `None` until the guest solicits one
    /// (a guest that never does has no IPv6 and gets no unsolicited ones).
    last_advert: Option<Instant>,
    last_housekeeping: Instant,
    /// Guest IPv6 addresses smoltcp has been told the MAC of (see `introduce_guest`).
    introduced: Vec<(Ipv6Addr, Instant)>,
    terminator: Terminator,
    /// The link is down (a secret's `block_and_terminate`): nothing is served any more.
    down: bool,
    /// The offloads the VMM acked.
    offloads: Offloads,
    /// Which queue pair this link serves; with more than one, what the pairs share.
    pair: u16,
    vm: Option<Arc<VmShared>>,
    /// Frames taken from the inbox, being served.
    handoffs: VecDeque<Handoff>,
    /// With multiqueue, on pairs other than 0: when the guest's IPv4 MAC was last told to
    /// smoltcp (pair 0 serves ARP; see `ndp::arp_introduction`).
    arp_introduced: Option<Instant>,
    /// Whether this pair's RX queue can take frames (else new flows go to pair 0).
    rx_usable: bool,
    /// `--pcap` (a copy of the settings' handle, read once per frame).
    pcap: Option<Arc<PcapLog>>,
    /// Where the operator's requests arrive (see `control::hub`).
    mailbox: Arc<Mailbox>,
    /// The device's notification counts for this pair.
    vring: Arc<VringCounts>,
    /// Frames and bytes each way across the virtqueues.
    frames_from_guest: u64,
    bytes_from_guest: u64,
    frames_to_guest: u64,
    bytes_to_guest: u64,
}

impl Link {
    pub fn new(settings: LinkSettings, terminator: Terminator) -> io::Result<Self> {
        let macs = Macs {
            gateway_mac: EthernetAddress(settings.gateway_mac),
            guest_mac: EthernetAddress(settings.guest_mac),
        };
        let addressing = settings.addressing;
        let stack = GuestStack::new(
            macs,
            addressing.v4.gateway,
            addressing.v4.prefix_len,
            &addressing.v6,
            settings.mtu,
            settings.flows.limits.guest_queue_frames,
            settings.flows.limits.guest_queue_bytes,
        );
        let dhcp = DhcpServer {
            addrs: addressing.v4,
            mtu: settings.mtu,
            lease_secs: settings.lease_secs,
        };
        let limits = &settings.flows.limits;
        let fragments = Reassembler::new(ReassemblyLimits {
            max_datagrams: limits.fragment_datagrams,
            max_bytes: limits.fragment_bytes,
            timeout: limits.fragment_timeout,
            ..ReassemblyLimits::default()
        });
        let pcap = settings.pcap.clone();
        let vring = Arc::new(VringCounts::default());
        let mailbox = Arc::new(Mailbox::new(vring.clone())?);
        if let Some(hub) = &settings.hub {
            hub.register(&mailbox);
        }
        let mut link = Link {
            mailbox,
            vring,
            frames_from_guest: 0,
            bytes_from_guest: 0,
            frames_to_guest: 0,
            bytes_to_guest: 0,
            fragments,
            flows: Flows::new(settings.flows.clone())?,
            stack,
            dhcp,
            guard: SourceGuard {
                guest_mac: settings.guest_mac,
                addressing,
            },
            timer: Timer::new()?,
            counters: Counters::default(),
            spoof_log: LogGate::new(3, Duration::from_secs(60)),
            last_advert: None,
            last_housekeeping: Instant::now(),
            introduced: Vec::new(),
            terminator,
            down: false,
            offloads: Offloads::default(),
            settings,
            pair: 0,
            vm: None,
            handoffs: VecDeque::new(),
            arp_introduced: None,
            rx_usable: false,
            pcap,
        };
        // A reload between the time these settings were taken and the registration: catch up.
        let newer = link
            .settings
            .hub
            .as_ref()
            .map(|hub| hub.current_settings())
            .filter(|(generation, _)| *generation != link.settings.settings_generation);
        if let Some((generation, flows)) = newer {
            link.apply_settings(generation, &flows);
        }
        Ok(link)
    }

    /// Installs reloaded settings (see `flow::operator`); returns how many open flows they
    /// denied.
    fn apply_settings(&mut self, generation: u64, flows: &FlowSettings) -> u64 {
        let mut flows = flows.clone();
        if self.pair > 0 {
            flows.published = None;
        }
        self.settings.flows = flows.clone();
        self.settings.settings_generation = generation;
        self.flows.apply_settings(flows, &mut self.stack)
    }

    /// Serves the operator's requests in the mailbox.
    fn control_work(&mut self) {
        let work = self.mailbox.take_work();
        if let Some(update) = work.update {
            let resets = self.apply_settings(update.generation, &update.flows);
            self.mailbox.applied(update.generation, resets);
        }
        if work.snapshot {
            let snapshot = self.report(true);
            self.mailbox.answer(snapshot);
        }
    }

    /// What this link reports to the operator.
    fn report(&self, with_flows: bool) -> LinkSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let mut snap = LinkSnapshot {
            vm: self.settings.vm,
            pair: self.pair,
            ..LinkSnapshot::default()
        };
        for (reason, n) in self.counters.iter() {
            *snap.counters.entry(reason).or_default() += n;
        }
        let t = &mut snap.totals;
        t.frames_from_guest = self.frames_from_guest;
        t.bytes_from_guest = self.bytes_from_guest;
        t.frames_to_guest = self.frames_to_guest;
        t.bytes_to_guest = self.bytes_to_guest;
        t.tx_kicks = self.vring.tx_kicks.load(Relaxed);
        t.tx_found_waiting = self.vring.tx_found_waiting.load(Relaxed);
        t.late_calls = self.vring.late_calls.load(Relaxed);
        t.rx_kicks = self.vring.rx_kicks.load(Relaxed);
        t.rx_calls = self.vring.rx_calls.load(Relaxed);
        t.tx_calls = self.vring.tx_calls.load(Relaxed);
        snap.rings = *self.vring.rings.lock().unwrap_or_else(|p| p.into_inner());
        self.flows
            .report(&self.stack, with_flows, &mut snap, Instant::now());
        snap
    }

    /// The links of a VM with `pairs` queue pairs (one link, as [`Link::new`] makes it, for one
    /// pair). Pair 0 serves the gateway (ARP, DHCP, neighbour discovery, DNS, published
    /// ports); every pair serves the flows it owns (see [`mq`]).
    pub fn for_pairs(
        settings: &LinkSettings,
        terminator: &Terminator,
        pairs: u16,
    ) -> io::Result<Vec<Link>> {
        if pairs <= 1 {
            let mut link = Link::new(settings.clone(), terminator.clone())?;
            link.flows.audit_as(settings.audit.clone(), settings.vm, 0);
            return Ok(vec![link]);
        }
        let names = Arc::new(std::sync::RwLock::new(crate::dns::cache::NameCache::new(
            settings.flows.dns.cache_capacity,
        )));
        let vm = Arc::new(VmShared::new(
            pairs,
            settings.flows.limits.handoff_frames,
            names.clone(),
        )?);
        let mut links = Vec::with_capacity(usize::from(pairs));
        let (audit, number) = (settings.audit.clone(), settings.vm);
        for pair in 0..pairs {
            let mut settings = settings.clone();
            if pair > 0 {
                settings.flows.published = None;
            }
            let mut link = Link::new(settings, terminator.clone())?;
            link.flows
                .join_vm(vm.owners.clone(), vm.counts.clone(), pair, names.clone());
            link.pair = pair;
            link.flows.audit_as(audit.clone(), number, pair);
            link.vm = Some(vm.clone());
            link.introduce_guest_v4();
            links.push(link);
        }
        Ok(links)
    }

    /// On pairs other than 0 of a multiqueue VM: tells smoltcp the guest's IPv4 MAC (pair 0
    /// learns it from the guest's ARP).
    fn introduce_guest_v4(&mut self) {
        if self.pair == 0 || self.vm.is_none() {
            return;
        }
        let v4 = self.settings.addressing.v4;
        let frame = ndp::arp_introduction(&self.stack.macs, v4.guest, v4.gateway);
        self.stack.receive(&frame);
        self.arp_introduced = Some(Instant::now());
    }

    /// With multiqueue: which pair serves a classified guest frame. The gateway's own services
    /// are pair 0's; a flow's frames go to the flow's owner, and an opening frame makes this
    /// pair the owner of a new flow.
    fn steer(&self, classified: &Classified) -> Steer {
        let Some(vm) = &self.vm else {
            return Steer::Here;
        };
        let addressing = &self.settings.addressing;
        let gateway_or_dns = |dst: SocketAddr| {
            addressing.is_gateway(dst.ip())
                || (dst.port() == 53 && self.settings.flows.dns_intercept_all)
        };
        let (key, opening) = match classified {
            Classified::Tcp(head) if !gateway_or_dns(head.dst) => {
                (FlowRef::Tcp((head.src, head.dst)), head.syn && !head.ack)
            }
            Classified::Udp { src, dst, .. } if !gateway_or_dns(*dst) => {
                (FlowRef::Udp((*src, *dst)), true)
            }
            Classified::IcmpEcho {
                src, dst, ident, ..
            } if !addressing.is_gateway(*dst) => (FlowRef::Echo((*src, *dst, *ident)), true),
            _ => {
                return if self.pair == 0 {
                    Steer::Here
                } else {
                    Steer::To(0)
                }
            }
        };
        if self.flows.has_flow(&key) {
            return Steer::Here;
        }
        match vm.owners.get(&key) {
            Some(owner) if owner == self.pair => Steer::Claimed(key),
            Some(owner) => Steer::To(owner),
            None if !opening => Steer::Here,
            // A pair that cannot answer (its RX queue is not usable) opens nothing itself.
            None => match vm
                .owners
                .claim(key, if self.rx_usable { self.pair } else { 0 })
            {
                owner if owner == self.pair => Steer::Claimed(key),
                owner => Steer::To(owner),
            },
        }
    }

    /// Hands a frame to pair `to` (dropped and counted when its inbox is full).
    fn hand_off(&mut self, to: u16, header: &NetHeader, frame: &[u8]) {
        let Some(vm) = &self.vm else {
            return;
        };
        let Some(inbox) = vm.inboxes.get(usize::from(to)) else {
            return;
        };
        let handoff = Handoff {
            header: *header,
            frame: frame.to_vec(),
        };
        debug!(
            pair = self.pair,
            to,
            rx_usable = self.rx_usable,
            len = frame.len(),
            "frame handed to its pair"
        );
        if inbox.push(handoff) {
            vm.handed_off.fetch_add(1, Ordering::Relaxed);
            self.counters.inc("handoff");
        } else {
            vm.handoff_full.fetch_add(1, Ordering::Relaxed);
            self.counters.inc("handoff-full");
        }
    }

    /// Serves the frames other pairs handed to this one, in the order they came.
    fn take_handoffs(&mut self) {
        let Some(vm) = &self.vm else {
            return;
        };
        vm.inboxes[usize::from(self.pair)].take_all(&mut self.handoffs);
        while let Some(h) = self.handoffs.pop_front() {
            self.receive_frame(&h.header, &h.frame, true);
        }
    }

    /// Takes the link down when a secret's `block_and_terminate` fired: every flow is reset,
    /// nothing more is served, and the VMM's connection is ended.
    fn check_terminate(&mut self) {
        // Any pair's secret takes every pair of the VM down.
        if self.down || !(self.flows.terminate_requested() || self.terminator.requested()) {
            return;
        }
        self.down = true;
        self.flows.reset();
        self.stack.reset();
        self.terminator.terminate();
    }

    /// The flows of this link (for counters).
    pub fn flows(&self) -> &Flows {
        &self.flows
    }

    fn count_drop(&mut self, reason: &'static str) {
        self.counters.inc(reason);
        debug!(reason, "dropped guest frame");
    }

    /// Uses the offloads the VMM acked, both ways, from now on.
    fn set_offloads(&mut self, offloads: Offloads) {
        if offloads == self.offloads {
            return;
        }
        info!(?offloads, "offloads in use");
        self.offloads = offloads;
        self.stack.set_offloads(offloads);
        // The new interface knows no neighbour: introduce the guest's addresses again.
        self.introduced.clear();
        self.introduce_guest_v4();
    }

    /// A frame from this pair's TX queue (`handed`: from another pair's, served here because
    /// this pair owns its flow; it is never handed on again).
    fn receive_frame(&mut self, header: &NetHeader, frame: &[u8], handed: bool) {
        if self.down {
            self.count_drop("link-down");
            return;
        }
        if !self.settings.flows.policy.network_enabled() {
            // `none`: no network at all, not even the gateway's own services.
            self.count_drop("network-none");
            return;
        }
        if let Err(reason) = classify::check_header(header, frame, &self.offloads) {
            self.count_drop(reason.as_str());
            return;
        }
        let reassembled;
        let mut header = header;
        let frame = if fragments::is_fragment(frame) {
            // A fragment's checksums are whole (a guest completes them before it fragments);
            // the reassembled datagram is judged without offloads.
            if *header != NetHeader::NONE {
                self.count_drop(DropReason::OffloadBadHeader.as_str());
                return;
            }
            header = &NetHeader::NONE;
            // Every fragment must come from the guest's MAC; the IP source is part of the
            // reassembly key and is checked on the whole datagram below.
            if frame.get(6..12) != Some(&self.settings.guest_mac[..]) {
                self.counters.inc(guard::reasons::MAC);
                return;
            }
            match self.fragments.push(frame, Instant::now()) {
                Reassembly::Complete(whole) => {
                    self.counters.inc("fragments-reassembled");
                    reassembled = whole;
                    &reassembled[..]
                }
                Reassembly::Pending => return,
                Reassembly::Dropped(why) => {
                    self.count_drop(why.as_str());
                    return;
                }
            }
        } else {
            frame
        };
        let classified = classify_offloaded(frame, header);
        if let Err(reason) = self.guard.check(frame, &classified) {
            self.counters.inc(reason);
            if let Some(suppressed) = self.spoof_log.admit(Instant::now()) {
                let mac = frame
                    .get(6..12)
                    .map(|m| EthernetAddress::from_bytes(m).to_string())
                    .unwrap_or_default();
                warn!(reason, source_mac = %mac, source_ip = ?classified.source(), suppressed,
                    guest_mac = %EthernetAddress(self.settings.guest_mac),
                    "dropped a guest frame with a source that is not the guest's (does the VMM give the guest --guest-mac?)");
            }
            return;
        }
        let steer = if handed {
            Steer::Here
        } else {
            self.steer(&classified)
        };
        if let Steer::To(pair) = steer {
            self.hand_off(pair, header, frame);
            return;
        }
        self.serve_frame(classified, frame);
        if let (Steer::Claimed(key), Some(vm)) = (steer, &self.vm) {
            if !self.flows.has_flow(&key) {
                // Denied, or refused: nothing of it stays here.
                vm.owners.release(&key, self.pair);
            }
        }
    }

    /// Serves a classified frame that this pair owns.
    fn serve_frame(&mut self, classified: Classified, frame: &[u8]) {
        match classified.source() {
            Some(IpAddr::V6(src)) => {
                self.introduce_guest(src);
                self.flows.guest_address_seen(IpAddr::V6(src));
            }
            Some(src) => self.flows.guest_address_seen(src),
            None => {}
        }
        let addressing = self.settings.addressing;
        match classified {
            Classified::Arp { target, .. } => {
                if target == addressing.v4.gateway {
                    self.stack.receive(frame);
                } else {
                    self.count_drop("arp-not-gateway");
                }
            }
            Classified::Dhcp { payload, .. } => self.dhcp(payload),
            Classified::IcmpEcho { dst, .. } if addressing.is_gateway(dst) => {
                self.stack.receive(frame)
            }
            Classified::IcmpEcho {
                src,
                dst,
                ident,
                seq,
                data,
            } => self
                .flows
                .echo_request(src, dst, ident, seq, data, frame, &mut self.stack),
            Classified::IcmpOther { dst, .. } if addressing.is_gateway(dst) => {
                self.stack.receive(frame)
            }
            Classified::IcmpOther { .. } => self.count_drop("icmp-other"),
            Classified::NeighborSolicit { src, target } if addressing.v6.is_gateway(target) => {
                let advert = ndp::neighbor_advert(&self.stack.macs, target, src);
                self.stack.port.queue_frame(advert);
            }
            // The guest checking that an address of its /64 is free (duplicate address
            // detection): it is about to use it, and published ports can reach it there.
            Classified::NeighborSolicit { src, target }
                if src.is_unspecified() && addressing.v6.prefix.contains(&target) =>
            {
                self.introduce_guest(target);
                self.flows.guest_address_seen(IpAddr::V6(target));
                self.count_drop("ndp-not-gateway");
            }
            // smoltcp with AnyIP would claim every address; only the gateway's are ours.
            Classified::NeighborSolicit { .. } => self.count_drop("ndp-not-gateway"),
            Classified::RouterSolicit { src } => self.router_solicit(src),
            Classified::Tcp(head) => self.flows.tcp_segment(head, frame, &mut self.stack),
            Classified::Udp { src, dst, payload } => {
                self.flows
                    .udp_datagram(src, dst, payload, frame, &mut self.stack)
            }
            Classified::Drop(reason) => self.count_drop(reason.as_str()),
        }
    }

    fn dhcp(&mut self, payload: &[u8]) {
        let Some(reply) = self.dhcp.handle(payload) else {
            self.count_drop("dhcp-ignored");
            return;
        };
        let addrs = self.settings.addressing.v4;
        let to = if reply.broadcast {
            std::net::Ipv4Addr::BROADCAST
        } else {
            addrs.guest
        };
        let frame = frames::udp_to_guest(
            &self.stack.macs,
            SocketAddr::from((addrs.gateway, 67)),
            SocketAddr::from((to, 68)),
            reply.payload.len(),
            reply.broadcast,
            |b| b.copy_from_slice(&reply.payload),
        );
        debug!(guest = %addrs.guest, "DHCP reply");
        self.stack.port.queue_frame(frame);
        if reply.leased {
            self.flows.guest_address_seen(IpAddr::V4(addrs.guest));
        }
    }

    /// Tells smoltcp the guest's MAC for a guest IPv6 address it has not seen yet.
    fn introduce_guest(&mut self, src: Ipv6Addr) {
        if src.is_unspecified() || src.is_multicast() {
            return;
        }
        // A short linear search per frame; housekeeping forgets entries after the refresh time.
        if self.introduced.iter().any(|(a, _)| *a == src) {
            return;
        }
        if self.introduced.len() >= INTRODUCED_ADDRESSES {
            self.introduced.remove(0);
        }
        self.introduced.push((src, Instant::now()));
        let gateway = self.settings.addressing.v6.source_for(src);
        let frame = ndp::guest_introduction(&self.stack.macs, src, gateway);
        self.stack.receive(&frame);
    }

    /// Answers a router solicitation with an advertisement of the guest's /64.
    fn router_solicit(&mut self, src: Ipv6Addr) {
        let to = if src.is_unspecified() {
            ndp::ALL_NODES
        } else {
            src
        };
        self.send_router_advert(to);
    }

    fn send_router_advert(&mut self, to: Ipv6Addr) {
        let addrs6 = self.settings.addressing.v6;
        let frame = ndp::router_advert(&self.stack.macs, &addrs6, self.settings.mtu, to);
        debug!(to = %to, prefix = %addrs6.prefix, "router advertisement");
        self.last_advert = Some(Instant::now());
        self.stack.port.queue_frame(frame);
    }

    fn housekeeping(&mut self, now: Instant) {
        self.last_housekeeping = now;
        if self
            .last_advert
            .is_some_and(|at| now.duration_since(at) >= self.settings.flows.limits.ra_interval)
        {
            self.send_router_advert(ndp::ALL_NODES);
        }
        self.flows.housekeeping(now, &mut self.stack);
        let expired = self.fragments.expire(now) as u64;
        self.counters.add("fragment-timeout", expired);
        let evicted = self.fragments.take_evicted() as u64;
        self.counters.add("fragment-evicted", evicted);
        self.introduced
            .retain(|(_, at)| now.duration_since(*at) < INTRODUCTION_REFRESH);
        self.flows.publish_counts();
        if self
            .arp_introduced
            .is_some_and(|at| now.duration_since(at) >= INTRODUCTION_REFRESH)
        {
            self.introduce_guest_v4();
        }
    }

    /// Copies queued frames into the guest's RX buffers; returns how many were delivered.
    fn flush(&mut self, rx: &mut dyn GuestRx) -> usize {
        let mut delivered = 0;
        while let Some(frame) = self.stack.port.front() {
            match rx.push(&frame.header, frame.bytes()) {
                RxOutcome::Delivered => {
                    delivered += 1;
                    if let Some(pcap) = &self.pcap {
                        if !pcap.record(frame.bytes()) {
                            self.counters.inc("pcap-queue-full");
                        }
                    }
                    self.frames_to_guest += 1;
                    self.bytes_to_guest += frame.bytes().len() as u64;
                }
                RxOutcome::Dropped => self.counters.inc("rx-dropped"),
                RxOutcome::TooLarge => {
                    // The guest's buffers never held a segment this large (too few, or not
                    // mergeable and too small): it goes as MTU-sized segments instead.
                    if let Some(frame) = self.stack.port.pop_front() {
                        let partial = self.offloads.rx_csum;
                        for piece in crate::stack::segment(frame, partial).into_iter().rev() {
                            self.stack.port.push_front(piece);
                        }
                        self.counters.inc("rx-gso-segmented");
                    }
                    continue;
                }
                RxOutcome::NoRoom => break,
            }
            if let Some(frame) = self.stack.port.pop_front() {
                self.stack.port.recycle(frame);
            }
        }
        delivered
    }

    /// Moves data until nothing more can move (or the round budget is spent), then arms the
    /// timer for the next deadline.
    fn service(&mut self, rx: &mut dyn GuestRx) {
        self.check_terminate();
        if self.down {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.last_housekeeping) >= HOUSEKEEPING {
            // Under a constant stream of events the timer may never fire: do it here.
            self.housekeeping(now);
        }
        for _ in 0..SERVICE_ROUNDS {
            self.flows.pump(&mut self.stack);
            self.check_terminate();
            if self.down {
                return;
            }
            self.stack.poll();
            let oversize = std::mem::take(&mut self.stack.port.oversize_dropped);
            if oversize > 0 {
                self.counters.add("oversize-to-guest", oversize);
            }
            let bound_hits = std::mem::take(&mut self.stack.port.byte_bound_hits);
            self.counters.add("guest-queue-bytes-full", bound_hits);
            let before = self.stack.port.queued_frames();
            let delivered = self.flush(rx);
            if delivered == 0 && before == self.stack.port.queued_frames() {
                break;
            }
            if !self.stack.port.is_empty() && delivered == 0 {
                break;
            }
        }
        let now = Instant::now();
        let mut deadline = self.last_housekeeping + HOUSEKEEPING;
        if let Some(d) = self.stack.poll_delay() {
            deadline = deadline.min(now + d);
        }
        for d in [self.flows.next_deadline(), self.fragments.next_deadline()]
            .into_iter()
            .flatten()
        {
            deadline = deadline.min(d);
        }
        self.timer.arm_at(deadline, now);
    }
}

impl LinkDriver for Link {
    fn watched_fds(&self) -> Vec<RawFd> {
        let [flows, dns] = self.flows.fds();
        let mut fds = vec![0; 4];
        fds[FD_FLOWS] = flows;
        fds[FD_TIMER] = self.timer.as_raw_fd();
        fds[FD_DNS] = dns;
        fds[FD_CONTROL] = self.mailbox.fd();
        if let Some(vm) = &self.vm {
            fds.push(vm.inboxes[usize::from(self.pair)].fd());
        }
        fds
    }

    fn guest_frame(&mut self, header: &NetHeader, frame: &[u8]) {
        if let Some(pcap) = &self.pcap {
            if !pcap.record(frame) {
                self.counters.inc("pcap-queue-full");
            }
        }
        self.frames_from_guest += 1;
        self.bytes_from_guest += frame.len() as u64;
        Link::receive_frame(self, header, frame, false);
    }

    fn vring_counts(&self) -> Arc<VringCounts> {
        self.vring.clone()
    }

    fn take_handoffs(&mut self) {
        Link::take_handoffs(self);
    }

    fn set_rx_usable(&mut self, usable: bool) {
        self.rx_usable = usable;
    }

    fn pair_dropped(&mut self) {
        if self.pair == 0 || self.vm.is_none() {
            return;
        }
        let (tcp, udp, echo, _) = self.flows.counts();
        if tcp + udp + echo > 0 {
            info!(
                pair = self.pair,
                tcp, udp, echo, "the guest stopped using this queue pair: its flows are reset"
            );
        }
        LinkDriver::reset(self);
    }

    fn set_offloads(&mut self, offloads: Offloads) {
        Link::set_offloads(self, offloads);
    }

    fn fd_ready(&mut self, index: usize) {
        match index {
            FD_FLOWS => self.flows.host_ready(&mut self.stack),
            FD_TIMER => {
                self.timer.consume();
                let now = Instant::now();
                if now.duration_since(self.last_housekeeping) >= HOUSEKEEPING {
                    self.housekeeping(now);
                }
                self.flows.dns_ready(&mut self.stack);
            }
            FD_DNS => self.flows.dns_ready(&mut self.stack),
            FD_CONTROL => self.control_work(),
            FD_INBOX => {
                if let Some(vm) = &self.vm {
                    vm.inboxes[usize::from(self.pair)].consume_wake();
                }
                self.take_handoffs();
            }
            _ => {}
        }
    }

    fn service(&mut self, rx: &mut dyn GuestRx) {
        Link::service(self, rx);
    }

    fn reset(&mut self) {
        self.flows.reset();
        self.fragments = Reassembler::new(*self.fragments.limits());
        self.stack.reset();
        self.introduced.clear();
        self.last_advert = None;
        // Frames handed over for the old driver's flows are not served to the new one.
        if let Some(vm) = &self.vm {
            vm.inboxes[usize::from(self.pair)].take_all(&mut self.handoffs);
            self.handoffs.clear();
        }
        self.introduce_guest_v4();
    }
}

impl Drop for Link {
    /// One line with everything counted on this link, when its VMM connection ends; the
    /// counts join the hub's totals.
    fn drop(&mut self) {
        if let Some(hub) = &self.settings.hub {
            hub.retire(&self.report(false));
        }
        let drops: Vec<String> = self
            .counters
            .iter()
            .chain(self.flows.counters.iter())
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect();
        let (tcp, udp, echo, dns_tcp) = self.flows.counts();
        info!(
            pair = self.pair,
            drops = ?drops.join(","),
            decision_lines = self.flows.decision_lines(),
            denied_memo_hits = self.flows.denied_memo_hits(),
            tcp_buffered_peak = self.flows.tcp_buffered_peak,
            guest_queue_peak_bytes = self.stack.port.queued_bytes_peak,
            open_tcp = tcp, open_udp = udp, open_echo = echo, open_dns_tcp = dns_tcp,
            open_inbound_udp = self.flows.inbound_udp_sessions(),
            "link closed"
        );
    }
}

/// The drop reasons of the classifier, for documentation and tests.
pub fn drop_reasons() -> impl Iterator<Item = &'static str> {
    [
        DropReason::Malformed,
        DropReason::BadChecksum,
        DropReason::Fragment,
        DropReason::Broadcast,
        DropReason::UnknownEtherType,
        DropReason::UnknownProtocol,
        DropReason::ExtensionHeader,
        DropReason::UnexpectedNdp,
        DropReason::OffloadNotNegotiated,
        DropReason::OffloadBadHeader,
    ]
    .into_iter()
    .map(DropReason::as_str)
}
