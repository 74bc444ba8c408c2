//! The vhost-user-net device: what the VMM negotiates with us and where its events land.
//!
//! The VMM (QEMU, cloud-hypervisor) connects to our socket, negotiates virtio-net features,
//! shares guest memory and hands us one RX and one TX virtqueue. `vhost-user-backend` runs one
//! worker thread that waits on the queues' kick eventfds and on our own fds (host sockets,
//! timer); every event lands in [`NetBackend::handle_event`], which passes it to the
//! [`Datapath`](crate::datapath::Datapath) of this connection. A new connection gets a new
//! `NetBackend`, so no state survives a VMM restart.
//!
//! Ring lifecycle: GET_VRING_BASE stops a ring; [`NetBackend::stop_vring`] then waits for a
//! `handle_event` that may still be using it, so the base the VMM gets back covers every chain
//! we took. When the rings come back at index 0 (the guest's driver started over: a reboot),
//! the link forgets its flows and frames ([`Datapath::reset_link`]); when they come back where
//! they stopped (the VM was paused), everything carries on. A change of the guest memory map
//! makes the worker look at the rings again ([`RESCAN_EVENT`]): a kick that came while a ring
//! was unreachable would otherwise be lost.

pub mod control_shim;
pub mod virtqueue;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::datapath::Datapath;

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
/// Event id of the nested epoll that holds every host socket of this connection.
/// Ids below `NUM_QUEUES` are the queues; `NUM_QUEUES` itself is the library's exit event.
pub const FLOWS_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Event id of the datapath's timerfd.
pub const TIMER_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// Event id of the DNS service's upstream sockets.
pub const DNS_EVENT: u16 = NUM_QUEUES as u16 + 3;
/// Event id of our own eventfd that makes the worker look at the rings again.
pub const RESCAN_EVENT: u16 = NUM_QUEUES as u16 + 4;

/// What the guest sees of the device, fixed for the life of a connection.
#[derive(Clone, Debug)]
pub struct DeviceSettings {
    pub guest_mac: [u8; 6],
    pub mtu: u16,
}

/// The `VhostUserBackend` of one VMM connection.
pub struct NetBackend {
    settings: DeviceSettings,
    datapath: Mutex<Datapath>,
    exit: (EventConsumer, EventNotifier),
    /// Written when the rings must be looked at again without a kick (memory map changed).
    rescan: EventFd,
    /// A ring was stopped (GET_VRING_BASE); decide at the next event whether the rings came
    /// back from 0 (reset the link) or from where they were.
    restart_pending: AtomicBool,
}

impl NetBackend {
    pub fn new(settings: DeviceSettings, datapath: Datapath) -> io::Result<Self> {
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok(NetBackend {
            settings,
            datapath: Mutex::new(datapath),
            exit,
            rescan: EventFd::new(EFD_NONBLOCK)?,
            restart_pending: AtomicBool::new(false),
        })
    }

    /// The fds the worker thread must watch besides the queues, with their event ids.
    pub fn extra_fds(&self) -> Vec<(std::os::fd::RawFd, u16)> {
        let dp = self.lock();
        vec![
            (dp.flows_fd(), FLOWS_EVENT),
            (dp.timer_fd(), TIMER_EVENT),
            (dp.dns_fd(), DNS_EVENT),
            (self.rescan.as_raw_fd(), RESCAN_EVENT),
        ]
    }

    /// After a ring was stopped: once a ring is started again, tells a guest that started over
    /// (every started ring at avail 0 and used 0, as a rebooted driver sets them up) from a VM
    /// that resumes where it stopped, and resets the link for the former. Rings that are not
    /// started yet are not looked at. (A paused VM whose started rings all stopped at a
    /// multiple of 65536 would be taken for a rebooted one; its flows would be reset.)
    fn check_restart(&self, vrings: &[VringRwLock], dp: &mut Datapath) {
        if !self.restart_pending.load(Ordering::Acquire) {
            return;
        }
        let mut started = 0;
        let mut from_zero = true;
        for vring in vrings {
            let state = vring.get_ref();
            let queue = state.get_queue();
            if queue.ready() {
                started += 1;
                from_zero &= queue.next_avail() == 0 && queue.next_used() == 0;
            }
        }
        if started == 0 {
            return;
        }
        self.restart_pending.store(false, Ordering::Release);
        if from_zero {
            info!("rings restarted from 0 (guest driver started over): resetting the link");
            dp.reset_link();
        } else {
            debug!("rings resumed where they stopped");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Datapath> {
        // A panic while holding the lock would be a bug; keep serving with what is there.
        self.datapath.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The virtio-net config space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
    fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.settings.guest_mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.settings.mtu.to_le_bytes());
        c
    }
}

/// The virtio feature bits we offer.
pub fn offered_features() -> u64 {
    (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_NET_F_MAC)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_STATUS)
        | (1 << VIRTIO_NET_F_MTU)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        offered_features()
    }

    fn acked_features(&self, features: u64) {
        debug!(
            features = format_args!("{features:#x}"),
            "VMM acked features"
        );
        self.lock().set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library applies it to each vring; the datapath asks the vrings.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(space.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(space.len());
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        self.lock().set_memory(mem);
        // A kick that came while a ring was outside the old map found nothing to read; with
        // EVENT_IDX the guest will not kick again for those chains.
        self.rescan.write(1)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The library has already marked the ring not ready, so no new drain or push starts
        // on it; a handle_event that is running holds the datapath lock until it is done
        // (each call is bounded), so once we have the lock nothing uses the ring any more.
        let _dp = self.lock();
        debug!(queue_index, "ring stopped");
        self.restart_pending.store(true, Ordering::Release);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset.contains(EventSet::ERROR) && device_event >= FLOWS_EVENT {
            warn!(device_event, "error event on a datapath fd");
        }
        let [rx, tx] = vrings else {
            return Ok(());
        };
        let mut dp = self.lock();
        self.check_restart(vrings, &mut dp);
        if device_event == RESCAN_EVENT {
            let _ = self.rescan.read();
            dp.handle_event(TX_QUEUE, rx, tx);
        } else {
            dp.handle_event(device_event, rx, tx);
        }
        Ok(())
    }
}
