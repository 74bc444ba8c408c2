//! The vhost-user-net device: what the VMM negotiates with us, and the virtqueues.
//!
//! The VMM (QEMU, cloud-hypervisor) connects to our socket, negotiates virtio-net features,
//! shares guest memory and hands us one RX and one TX virtqueue. `vhost-user-backend` runs one
//! worker thread that waits on the queues' kick eventfds and on the link's own fds (host
//! sockets, timer); every event lands in [`vhu_net::NetBackend::handle_event`].
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

/// Queue index of the guest's receive queue (we write frames into it).
pub const RX_QUEUE: u16 = 0;
/// Queue index of the guest's transmit queue (we drain frames from it).
pub const TX_QUEUE: u16 = 1;
/// One RX/TX pair.
pub const NUM_QUEUES: usize = 2;
/// Largest virtqueue we accept.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Event id of the device's own eventfd that makes the worker look at the rings again (after
/// the memory map changed). Ids below `NUM_QUEUES` are the queues; `NUM_QUEUES` itself is the
/// library's exit event.
pub const RESCAN_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Event id of the link's first own fd; the link's fd `i` carries `FIRST_LINK_EVENT + i`.
pub const FIRST_LINK_EVENT: u16 = NUM_QUEUES as u16 + 2;

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
}

/// The guest's receive queue as the link sees it.
pub trait GuestRx {
    fn push(&mut self, frame: &[u8]) -> RxOutcome;
}

/// The link behind a device: one queue pair's worker state (see `crate::link`).
///
/// Every method runs on the vring worker thread with the device's lock held, and must return
/// in bounded time: the worker must come back to its epoll (exit events, the next VMM).
pub trait LinkDriver: Send + 'static {
    /// The fds the worker must watch besides the queues (host sockets' epoll, timer, ...).
    /// Fixed for the life of the link; fd `i` reports as [`LinkDriver::fd_ready`]`(i)`.
    fn watched_fds(&self) -> Vec<RawFd>;
    /// One Ethernet frame the guest sent (virtio-net header already removed).
    fn guest_frame(&mut self, frame: &[u8]);
    /// The link's fd number `index` is ready.
    fn fd_ready(&mut self, index: usize);
    /// Moves data until nothing more can move now; frames for the guest go to `rx`.
    fn service(&mut self, rx: &mut dyn GuestRx);
    /// The guest's rings restarted from zero (the guest rebooted or reset its driver): forget
    /// every flow and every frame queued for the old driver.
    fn reset(&mut self);
}
