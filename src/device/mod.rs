//! The vhost-user-net device: what the VMM negotiates with us, and the virtqueues.
//!
//! The VMM (QEMU, cloud-hypervisor) connects to our socket, negotiates virtio-net features,
//! shares guest memory and hands us one RX/TX virtqueue pair per `--queues` (VIRTIO_NET_F_MQ).
//! `vhost-user-backend` runs one worker thread per pair that waits on that pair's kick eventfds
//! and on its link's own fds (host sockets, timer); every event lands in
//! [`vhu_net::NetBackend::handle_event`] with the pair's index as the thread id.
//!
//! The device knows nothing of what a frame means. It drains TX chains into frames
//! ([`virtqueue`]), hands each to the link through the small [`LinkDriver`] interface it owns,
//! and lets the link write frames for the guest through a [`GuestRx`] port over the RX queue
//! ([`rx_port`]). The link (`crate::link`) implements `LinkDriver`; the device never imports it.
//! A new VMM connection gets a new device and a new link, so no state survives a VMM restart.

pub mod control_shim;
pub mod rx_port;
pub mod vhu_net;
pub mod virtqueue;

use std::os::fd::RawFd;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use vhu_net::NetBackend;

/// Guest memory as the backend library hands it to us.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Queue id of a pair's receive queue (we write frames into it), as the worker of that pair
/// sees it: vhost-user-backend numbers a thread's queues from 0 in index order, so pair `k`'s
/// RX ring (global index `2k`) reports as 0 and its TX ring (`2k + 1`) as 1 in every worker.
pub const RX_QUEUE: u16 = 0;
/// Queue id of a pair's transmit queue (we drain frames from it); see [`RX_QUEUE`].
pub const TX_QUEUE: u16 = 1;
/// Most queue pairs a device offers (`--queues`).
pub const MAX_PAIRS: u16 = 16;
/// How long a started RX ring of a pair must stay disabled before the pair counts as dropped
/// by the guest (a VMM pausing the VM disables it only for the moment before it stops it).
pub const PAIR_DROPPED_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
/// Largest virtqueue we accept.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Event id of a pair's own eventfd that makes its worker look at the rings again (after the
/// memory map changed). Ids below `2 * pairs` are queues (only 0 and 1 come to a worker, see
/// [`RX_QUEUE`]); `2 * pairs` itself is the library's exit and vring-enabled event.
pub fn rescan_event(pairs: u16) -> u16 {
    2 * pairs + 1
}

/// Event id of a link's first own fd; the link's fd `i` carries `first_link_event(pairs) + i`.
pub fn first_link_event(pairs: u16) -> u16 {
    2 * pairs + 2
}

/// What the guest sees of the device, fixed for the life of a connection.
#[derive(Clone, Debug)]
pub struct DeviceSettings {
    pub guest_mac: [u8; 6],
    pub mtu: u16,
}

/// What became of a frame offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into the guest's receive buffers.
    Delivered,
    /// No room now (too few buffers, or the ring is stopped or disabled): keep it and offer it
    /// again later; the device wakes the link when the guest adds buffers.
    NoRoom,
    /// The guest's buffers were unusable; the frame is gone (counted by the device).
    Dropped,
    /// A large segment (GSO) bigger than the guest has ever offered room for at once: it
    /// would wait for ever. The link cuts it into MTU-sized segments.
    TooLarge,
}

/// The virtio-net header of one frame (virtio 1.x 5.1.6), in either direction, without
/// `num_buffers` (the device fills that in on RX).
///
/// From the guest it says what the guest left to us: `NEEDS_CSUM` (the L4 checksum at
/// `csum_start + csum_offset` holds only the pseudo-header sum) and `gso_type`/`gso_size` (the
/// frame is one large TCP segment the guest expects to be cut into `gso_size` pieces). To the
/// guest it says the same of our frames. [`NetHeader::NONE`] is a plain frame with every
/// checksum in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl NetHeader {
    /// `flags`: the L4 checksum is partial (pseudo-header only).
    pub const F_NEEDS_CSUM: u8 = 1;
    /// `flags`: the checksums were verified (to the guest only).
    pub const F_DATA_VALID: u8 = 2;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    /// `gso_type` bit: the segments carry ECN's congestion-window-reduced flag.
    pub const GSO_ECN: u8 = 0x80;
    /// A plain frame: nothing offloaded.
    pub const NONE: NetHeader = NetHeader {
        flags: 0,
        gso_type: 0,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads the first 10 bytes of a header (shorter input reads as zeros).
    pub fn parse(bytes: &[u8]) -> NetHeader {
        let mut b = [0u8; 10];
        let n = bytes.len().min(10);
        b[..n].copy_from_slice(&bytes[..n]);
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    /// The 12-byte wire form with `num_buffers`.
    pub fn to_bytes(&self, num_buffers: u16) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        b
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & Self::F_NEEDS_CSUM != 0
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type != Self::GSO_NONE
    }
}

/// The offloads the VMM acked (`VIRTIO_NET_F_*`), as the link uses them. A feature whose
/// prerequisite was not acked counts as not acked (TSO needs the checksum offload of its
/// direction), so every combination a VMM may ack is a consistent one here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// CSUM: the guest may send partial checksums (`NEEDS_CSUM`).
    pub tx_csum: bool,
    /// HOST_TSO4: the guest may send TCPv4 segments up to 64 KiB (`GSO_TCPV4`).
    pub tx_tso4: bool,
    /// HOST_TSO6: the same for TCPv6.
    pub tx_tso6: bool,
    /// GUEST_CSUM: frames to the guest may carry partial checksums.
    pub rx_csum: bool,
    /// GUEST_TSO4: TCPv4 segments to the guest may be larger than its MTU.
    pub rx_tso4: bool,
    /// GUEST_TSO6: the same for TCPv6.
    pub rx_tso6: bool,
}

impl Offloads {
    /// What the acked feature bits allow.
    pub fn from_features(features: u64) -> Offloads {
        use virtio_bindings::virtio_net::*;
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let tx_csum = has(VIRTIO_NET_F_CSUM);
        let rx_csum = has(VIRTIO_NET_F_GUEST_CSUM);
        Offloads {
            tx_csum,
            tx_tso4: tx_csum && has(VIRTIO_NET_F_HOST_TSO4),
            tx_tso6: tx_csum && has(VIRTIO_NET_F_HOST_TSO6),
            rx_csum,
            rx_tso4: rx_csum && has(VIRTIO_NET_F_GUEST_TSO4),
            rx_tso6: rx_csum && has(VIRTIO_NET_F_GUEST_TSO6),
        }
    }
}

/// The guest's receive queue as the link sees it.
pub trait GuestRx {
    /// Writes `frame` behind the virtio-net header `header` (which the link fills only with
    /// offloads the guest acked).
    fn push(&mut self, header: &NetHeader, frame: &[u8]) -> RxOutcome;
}

/// Notifications on one queue pair, counted by the device for the operator (metrics): kicks
/// from the guest on each queue, and calls (interrupts) netfence sent it. And, when a report
/// asks (`report_rings`), where both rings stand: the device reads them on its next event,
/// before the link answers, so `ctl status` shows a wedged ring as it is.
#[derive(Default, Debug)]
pub struct VringCounts {
    pub tx_kicks: std::sync::atomic::AtomicU64,
    pub rx_kicks: std::sync::atomic::AtomicU64,
    pub rx_calls: std::sync::atomic::AtomicU64,
    pub tx_calls: std::sync::atomic::AtomicU64,
    /// Times another event than a kick found TX chains waiting and took them (see
    /// `vhu_net::DeviceState::handle_event`): their kick may still have been on its way, or it
    /// was lost.
    pub tx_found_waiting: std::sync::atomic::AtomicU64,
    /// Calls sent late: the guest asked for one at an index already passed (see
    /// `vhu_net::DeviceState::handle_event`).
    pub late_calls: std::sync::atomic::AtomicU64,
    /// Set by a report request; the device clears it when it has filled `rings`.
    pub report_rings: std::sync::atomic::AtomicBool,
    /// The RX and TX rings' positions when last asked (`None`: not set up).
    pub rings: std::sync::Mutex<[Option<RingPositions>; 2]>,
}

/// Where one virtqueue stands: the guest's indices and ours. A TX ring whose `avail` is ahead
/// of `taken` waits for netfence; one whose `used` the guest has not seen (its `used_event`
/// behind `used` with no call sent) waits for an interrupt.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RingPositions {
    pub size: u16,
    pub enabled: bool,
    pub ready: bool,
    /// The guest's available index (chains it has offered).
    pub avail: u16,
    /// How far netfence has taken chains.
    pub taken: u16,
    /// netfence's used index (chains returned).
    pub used: u16,
    /// With EVENT_IDX: the used index past which the guest wants a call.
    pub used_event: Option<u16>,
    /// With EVENT_IDX: the available index past which netfence asked for a kick.
    pub avail_event: Option<u16>,
    /// Without EVENT_IDX: the guest's "no interrupt" and netfence's "no notify" flags.
    pub guest_no_interrupt: bool,
    pub device_no_notify: bool,
}

/// The link behind a device: one queue pair's worker state (see `crate::link`).
///
/// Every method runs on the vring worker thread with the device's lock held, and must return
/// in bounded time: the worker must come back to its epoll (exit events, the next VMM).
pub trait LinkDriver: Send + 'static {
    /// The fds the worker must watch besides the queues (host sockets' epoll, timer, ...).
    /// Fixed for the life of the link; fd `i` reports as [`LinkDriver::fd_ready`]`(i)`.
    fn watched_fds(&self) -> Vec<RawFd>;
    /// One Ethernet frame the guest sent, and its virtio-net header (unchecked: the link
    /// judges it against the acked [`Offloads`]).
    fn guest_frame(&mut self, header: &NetHeader, frame: &[u8]);
    /// Serves what other queue pairs handed to this one (multiqueue); the device calls it
    /// before it drains the TX queue, so a flow that moved between queues stays in order.
    fn take_handoffs(&mut self) {}
    /// Whether this pair's RX queue can take frames now (enabled and started); told when it
    /// changes. A multiqueue link gives new flows to pair 0 while its own cannot.
    fn set_rx_usable(&mut self, _usable: bool) {}
    /// The guest stopped using this pair: its RX queue stayed disabled while started (QEMU
    /// after `ethtool -L combined` shrank the pairs) for [`PAIR_DROPPED_AFTER`].
    fn pair_dropped(&mut self) {}
    /// The VMM acked features: from now on frames may use these offloads both ways. May come
    /// again (the guest's driver restarted with other features).
    fn set_offloads(&mut self, offloads: Offloads);
    /// The link's fd number `index` is ready.
    fn fd_ready(&mut self, index: usize);
    /// Where the device counts this pair's notifications.
    fn vring_counts(&self) -> std::sync::Arc<VringCounts> {
        std::sync::Arc::default()
    }
    /// Moves data until nothing more can move now; frames for the guest go to `rx`.
    fn service(&mut self, rx: &mut dyn GuestRx);
    /// The guest's rings restarted from zero (the guest rebooted or reset its driver): forget
    /// every flow and every frame queued for the old driver.
    fn reset(&mut self);
}
