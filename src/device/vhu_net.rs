//! `VhostUserBackend` for virtio-net: features, config space, and the worker's events.
//!
//! One [`NetBackend`] serves one VMM connection with one or more queue pairs. Each pair has its
//! own link and its own worker thread; its state (the link, guest memory, the negotiated header
//! layout) sits behind one mutex per pair that the pair's worker holds for each event and that
//! the control thread takes to change memory or stop one of its rings, so GET_VRING_BASE waits
//! for a drain in flight and never sees a ring half-used. The control thread takes one pair's
//! lock at a time, never two.
//!
//! Events: a TX kick drains the TX queue into the link; an RX kick means the guest gave us
//! buffers; the link's own fds (host sockets, timer) are passed on by index. After each event
//! the link moves what it can and writes frames for the guest through an [`RxPort`].
//!
//! Ring lifecycle: GET_VRING_BASE stops a ring; [`NetBackend::stop_vring`] then waits for an
//! event being handled that may still use it, so the base the VMM gets back covers every chain
//! we took. When the rings come back at index 0 (the guest's driver started over: a reboot), or
//! the VMM sends RESET_DEVICE, the link forgets every flow and queued frame: a new driver must
//! not receive the old one's frames. When they come back where they stopped (the VM was
//! paused), everything carries on. A change of the guest memory map makes the worker look at
//! the rings again ([`rescan_event`]): a kick that came while a ring was unreachable would
//! otherwise be lost.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion, GuestUsize,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rx_port::RxPort;
use super::virtqueue::{self, RxScratch};
use super::{
    first_link_event, rescan_event, DeviceSettings, GuestMemory, LinkDriver, Offloads, VringCounts,
    MAX_PAIRS, MAX_QUEUE_SIZE, PAIR_DROPPED_AFTER, RX_QUEUE, TX_QUEUE,
};
use crate::observe::{Counters, LogGate};

/// What the device counts.
#[derive(Default, Debug, Clone)]
pub struct DeviceCounters {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Malformed descriptor chains, by direction ("tx-bad-chain", "rx-bad-chain").
    pub drops: Counters,
}

/// How often a worker looks for calls the guest asked for too late to be seen (see
/// `DeviceState::handle_event`); its timer wakes it at least once a second.
const LATE_CALL_CHECK: Duration = Duration::from_millis(50);

/// Everything a pair's worker and the control thread share, behind one lock.
struct DeviceState<L> {
    link: L,
    /// Which pair this is (for logs).
    pair: u16,
    /// This device's event ids (they depend on the number of pairs).
    rescan_event: u16,
    first_link_event: u16,
    mem: Option<GuestMemory>,
    hdr_len: usize,
    mergeable: bool,
    /// Where TX chains are copied ([`virtqueue::TX_SCRATCH`] bytes, zeroed once).
    scratch: Box<[u8]>,
    rx_scratch: RxScratch,
    counters: DeviceCounters,
    /// Notifications counted for the operator (shared with the link's reports).
    vring_counts: Arc<VringCounts>,
    /// A ring was stopped (GET_VRING_BASE); see `check_restart`.
    stopped: bool,
    /// Whether the RX ring was usable at the last event, as told to the link.
    rx_usable: bool,
    /// Since when the RX ring has been started but disabled, and whether the link was told.
    rx_disabled_since: Option<Instant>,
    pair_dropped: bool,
    bad_chain_log: LogGate,
    /// The RX and TX used index when the guest was last called (`None`: not yet, or the ring
    /// started over).
    called_at: [Option<u16>; 2],
    /// When calls owed were last looked for (see `handle_event`).
    owed_checked: Instant,
}

/// The `VhostUserBackend` of one VMM connection, over one link `L` per queue pair.
pub struct NetBackend<L> {
    settings: DeviceSettings,
    /// Pair `k` serves rings `2k` (RX) and `2k + 1` (TX) on worker thread `k`.
    pairs: Vec<Pair<L>>,
}

/// One queue pair: its link and rings' state, and the fds of its worker.
struct Pair<L> {
    state: Mutex<DeviceState<L>>,
    /// The link's fds, fixed at creation.
    link_fds: Vec<RawFd>,
    /// The worker's exit event (one per worker: the library never consumes it).
    exit: (EventConsumer, EventNotifier),
    /// Written when the rings must be looked at again without a kick (memory map changed).
    rescan: EventFd,
}

impl<L: LinkDriver> NetBackend<L> {
    /// A device with one queue pair per link (1 to [`MAX_PAIRS`]).
    pub fn new(settings: DeviceSettings, links: Vec<L>) -> io::Result<Self> {
        let count = u16::try_from(links.len())
            .ok()
            .filter(|n| (1..=MAX_PAIRS).contains(n))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} queue pairs; expected 1-{MAX_PAIRS}", links.len()),
                )
            })?;
        let mut pairs = Vec::with_capacity(links.len());
        for (index, link) in links.into_iter().enumerate() {
            let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
            pairs.push(Pair {
                link_fds: link.watched_fds(),
                state: Mutex::new(DeviceState {
                    vring_counts: link.vring_counts(),
                    link,
                    pair: index as u16,
                    rescan_event: rescan_event(count),
                    first_link_event: first_link_event(count),
                    mem: None,
                    hdr_len: 12,
                    mergeable: false,
                    scratch: vec![0u8; virtqueue::TX_SCRATCH].into_boxed_slice(),
                    rx_scratch: RxScratch::default(),
                    counters: DeviceCounters::default(),
                    stopped: false,
                    rx_usable: false,
                    rx_disabled_since: None,
                    pair_dropped: false,
                    bad_chain_log: LogGate::new(5, Duration::from_secs(10)),
                    called_at: [None; 2],
                    owed_checked: Instant::now(),
                }),
                exit,
                rescan: EventFd::new(EFD_NONBLOCK)?,
            });
        }
        Ok(NetBackend { settings, pairs })
    }

    /// How many queue pairs the device has.
    pub fn pairs(&self) -> u16 {
        self.pairs.len() as u16
    }

    /// The fds worker thread `pair` must watch besides its queues, with their event ids.
    pub fn extra_fds(&self, pair: usize) -> Vec<(RawFd, u16)> {
        let Some(p) = self.pairs.get(pair) else {
            return Vec::new();
        };
        let count = self.pairs();
        let mut fds = vec![(p.rescan.as_raw_fd(), rescan_event(count))];
        fds.extend(
            p.link_fds
                .iter()
                .enumerate()
                .map(|(i, fd)| (*fd, first_link_event(count) + i as u16)),
        );
        fds
    }

    /// A copy of pair `pair`'s device counters.
    pub fn counters(&self, pair: usize) -> Option<DeviceCounters> {
        self.pairs.get(pair).map(|p| p.lock().counters.clone())
    }

    /// The virtio-net config space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
    fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.settings.guest_mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.pairs().to_le_bytes());
        c[10..12].copy_from_slice(&self.settings.mtu.to_le_bytes());
        c
    }
}

impl<L> Pair<L> {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeviceState<L>> {
        // A panic while holding the lock would be a bug; keep serving with what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<L> Drop for Pair<L> {
    fn drop(&mut self) {
        let state = self.lock();
        let c = &state.counters;
        info!(
            pair = state.pair,
            tx_frames = c.tx_frames,
            rx_frames = c.rx_frames,
            tx_bad_chains = c.drops.get("tx-bad-chain"),
            rx_bad_chains = c.drops.get("rx-bad-chain"),
            "device closed"
        );
    }
}

impl<L: LinkDriver> DeviceState<L> {
    /// After a ring was stopped: once a ring is started again, tells a guest that started over
    /// (every started ring at avail 0 and used 0, as a rebooted driver sets them up) from a VM
    /// that resumes where it stopped, and resets the link for the former. Rings that are not
    /// started yet are not looked at. (A paused VM whose started rings all stopped at a
    /// multiple of 65536 would be taken for a rebooted one; its flows would be reset.)
    fn check_restart(&mut self, rx: &VringRwLock, tx: &VringRwLock) {
        if !self.stopped {
            return;
        }
        let mut started = 0;
        let mut from_zero = true;
        for vring in [rx, tx] {
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
        self.stopped = false;
        self.called_at = [None; 2];
        if from_zero {
            info!(
                pair = self.pair,
                "rings restarted from 0 (guest driver started over): link reset"
            );
            self.link.reset();
        } else {
            debug!("rings resumed where they stopped");
        }
    }

    /// Tells the link when its RX ring becomes usable or not, and when the guest has stopped
    /// using the pair (see [`LinkDriver::pair_dropped`]).
    fn check_rx_state(&mut self, rx: &VringRwLock) {
        let (enabled, ready) = {
            let state = rx.get_ref();
            (state.is_enabled(), state.get_queue().ready())
        };
        let usable = enabled && ready;
        if usable != self.rx_usable {
            self.rx_usable = usable;
            self.link.set_rx_usable(usable);
        }
        if enabled || !ready {
            self.rx_disabled_since = None;
            self.pair_dropped = false;
            return;
        }
        let now = Instant::now();
        let since = *self.rx_disabled_since.get_or_insert(now);
        if !self.pair_dropped && now.duration_since(since) >= PAIR_DROPPED_AFTER {
            self.pair_dropped = true;
            self.link.pair_dropped();
        }
    }

    /// Takes the frames the guest made available on TX and hands them to the link.
    fn drain_tx(&mut self, tx: &VringRwLock, mem: &vm_memory::GuestMemoryMmap<()>) {
        let hdr_len = self.hdr_len;
        let link = &mut self.link;
        let stats = virtqueue::drain_tx(tx, mem, hdr_len, &mut self.scratch, |header, frame| {
            link.guest_frame(header, frame)
        });
        self.counters.tx_frames += stats.frames;
        if stats.called {
            self.called_at[1] = Some(virtqueue::next_used(tx));
            self.vring_counts.tx_calls.fetch_add(1, Ordering::Relaxed);
        }
        if stats.bad_chains > 0 {
            self.counters.drops.add("tx-bad-chain", stats.bad_chains);
            if let Some(suppressed) = self.bad_chain_log.admit(Instant::now()) {
                warn!(
                    count = stats.bad_chains,
                    total = self.counters.drops.get("tx-bad-chain"),
                    suppressed,
                    "dropped bad TX descriptor chains"
                );
            }
        }
    }

    fn handle_event(&mut self, event: u16, rx: &VringRwLock, tx: &VringRwLock) {
        let Some(mem) = self.mem.clone() else {
            return;
        };
        let mem = mem.memory();
        self.check_restart(rx, tx);
        self.check_rx_state(rx);
        self.link.take_handoffs();
        let counts = &self.vring_counts;
        if counts.report_rings.swap(false, Ordering::AcqRel) {
            let positions = [
                virtqueue::ring_positions(rx, &mem),
                virtqueue::ring_positions(tx, &mem),
            ];
            *counts.rings.lock().unwrap_or_else(|p| p.into_inner()) = positions;
        }
        match event {
            TX_QUEUE => counts.tx_kicks.fetch_add(1, Ordering::Relaxed),
            RX_QUEUE => counts.rx_kicks.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        // A rescan (the memory map changed) looks at TX as a kick would.
        let event = if event == self.rescan_event {
            TX_QUEUE
        } else {
            event
        };
        match event {
            TX_QUEUE => self.drain_tx(tx, &mem),
            RX_QUEUE => {}
            id if id >= self.first_link_event => {
                self.link.fd_ready(usize::from(id - self.first_link_event))
            }
            _ => {}
        }
        // The guest may have made TX chains available without a kick reaching us: under
        // QEMU's TCG with one vCPU the guest's memory barriers are left out, and with them the
        // handshake that tells it to kick (EVENT_IDX's avail_event), so now and then it misses
        // our request and waits for ever with a full ring. Whatever woke the worker (a host
        // socket, the at-most-a-second timer, the guest's RX), chains waiting are taken now.
        if event != TX_QUEUE && virtqueue::has_available(tx, &mem) {
            self.vring_counts
                .tx_found_waiting
                .fetch_add(1, Ordering::Relaxed);
            self.drain_tx(tx, &mem);
        }
        let mut port = RxPort::new(rx, &mem, self.hdr_len, self.mergeable, &mut self.rx_scratch);
        self.link.service(&mut port);
        self.counters.rx_frames += port.delivered;
        self.counters.drops.add("rx-bad-chain", port.dropped);
        if port.finish() {
            self.called_at[0] = Some(virtqueue::next_used(rx));
            self.vring_counts.rx_calls.fetch_add(1, Ordering::Relaxed);
        }
        // The same lost handshake the other way: a guest that asks for a call (used_event)
        // just as netfence returns the entries it waits for may have its request arrive too
        // late to be seen, and sleep on a ring with entries it was never told about (its RX
        // then stops for good: later entries never pass the index it asked for). So whatever
        // woke the worker, a call the guest asked for at an index already passed is sent now.
        // (At most every LATE_CALL_CHECK: a guest busy polling its ring may ask at an index
        // just passed and see the entries itself; the extra call is harmless, but needless.)
        if event != TX_QUEUE && event != RX_QUEUE && self.owed_checked.elapsed() >= LATE_CALL_CHECK
        {
            self.owed_checked = Instant::now();
            for (i, vring) in [rx, tx].into_iter().enumerate() {
                let called_at =
                    *self.called_at[i].get_or_insert_with(|| virtqueue::next_used(vring));
                if let Some(used) = virtqueue::call_owed(vring, &mem, called_at) {
                    let _ = vring.signal_used_queue();
                    self.called_at[i] = Some(used);
                    self.vring_counts.late_calls.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Whether every byte of `region` has file behind it. The VMM says how large a region is and
/// mmap believes it: a page past the end of the file raises SIGBUS when it is touched, which
/// would kill netfence the first time a descriptor (or a ring) points there. Anonymous
/// regions and files that are not regular files (no size to compare) pass.
fn backed_to_its_end(region: &vm_memory::GuestRegionMmap<()>) -> bool {
    let Some(file_offset) = region.file_offset() else {
        return true;
    };
    match file_offset.file().metadata() {
        Ok(meta) if meta.is_file() => file_offset
            .start()
            .checked_add(region.len())
            .is_some_and(|end| end <= meta.len()),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Removes from the guest memory map the regions a VMM announced larger than their file
/// (see [`backed_to_its_end`]), in the map every ring shares, so that nothing ever reads or
/// writes them: a chain into one is a bad chain. Returns what was refused, for the VMM's error.
fn drop_regions_past_eof(mem: &GuestMemory) -> Option<String> {
    let map = mem.memory();
    let short: Vec<(GuestAddress, GuestUsize)> = map
        .iter()
        .filter(|r| !backed_to_its_end(r))
        .map(|r| (r.start_addr(), r.len()))
        .collect();
    if short.is_empty() {
        return None;
    }
    let mut kept = (*map).clone();
    drop(map);
    for &(base, len) in &short {
        if let Ok((rest, _)) = kept.remove_region(base, len) {
            kept = rest;
        }
    }
    let shared = mem.lock().unwrap_or_else(|p| p.into_inner());
    shared.replace(kept);
    let list: Vec<String> = short
        .iter()
        .map(|(base, len)| format!("{len:#x} bytes at {:#x}", base.0))
        .collect();
    let why = format!(
        "memory regions larger than their file refused: {}",
        list.join(", ")
    );
    warn!("{why}");
    Some(why)
}

/// The virtio feature bits we offer with `pairs` queue pairs: with more than one, MQ and the
/// control queue it needs (the VMM serves the control queue itself; the guest's choice of
/// pairs reaches us as rings enabled and disabled).
pub fn offered_features(pairs: u16) -> u64 {
    let multiqueue = if pairs > 1 {
        (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ)
    } else {
        0
    };
    multiqueue
        | (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_NET_F_MAC)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_STATUS)
        | (1 << VIRTIO_NET_F_MTU)
        | (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_NET_F_GUEST_TSO6)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

impl<L: LinkDriver> VhostUserBackend for NetBackend<L> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.pairs.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        offered_features(self.pairs())
    }

    fn acked_features(&self, features: u64) {
        debug!(
            features = format_args!("{features:#x}"),
            "VMM acked features"
        );
        let v1 = features & (1 << VIRTIO_F_VERSION_1) != 0;
        let mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let offloads = Offloads::from_features(features);
        debug!(?offloads, "offloads negotiated");
        for pair in &self.pairs {
            let mut state = pair.lock();
            state.mergeable = mergeable;
            state.hdr_len = virtqueue::header_len(v1 || mergeable);
            state.link.set_offloads(offloads);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        // QEMU (7.2) drives each queue pair as a vhost device of its own over the one
        // connection, and every one of them sends ADD_MEM_REG for every region: the second
        // pair's would overlap the first's and be refused. SET_MEM_TABLE it sends once.
        if self.pairs.len() > 1 {
            features
        } else {
            features | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library applies it to each vring; the device asks the vrings.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The vhost crate bounds `size` (at most 256 bytes) before it calls us; the reply must
        // be exactly `size` bytes, zero beyond the fields we have.
        let space = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        let refused = drop_regions_past_eof(&mem);
        for pair in &self.pairs {
            pair.lock().mem = Some(mem.clone());
            // A kick that came while a ring was outside the old map found nothing to read;
            // with EVENT_IDX the guest will not kick again for those chains.
            pair.rescan.write(1)?;
        }
        match refused {
            None => Ok(()),
            Some(why) => Err(io::Error::new(io::ErrorKind::InvalidInput, why)),
        }
    }

    fn reset_device(&self) {
        debug!("VMM reset the device: resetting the links");
        for pair in &self.pairs {
            let mut state = pair.lock();
            state.stopped = false;
            state.link.reset();
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Taking the lock waits for an event being handled (a TX drain, an RX fill) to end;
        // the library has already marked the ring not ready, so no later event touches it.
        let Some(pair) = self.pairs.get(queue_index as usize / 2) else {
            return Ok(());
        };
        pair.lock().stopped = true;
        debug!(queue_index, "ring stopped");
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs.len()).map(|k| 0b11u64 << (2 * k)).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let exit = &self.pairs.get(thread_index)?.exit;
        Some((exit.0.try_clone().ok()?, exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(pair) = self.pairs.get(thread_id) else {
            return Ok(());
        };
        let count = self.pairs();
        if evset.contains(EventSet::ERROR) && device_event >= first_link_event(count) {
            debug!(device_event, pair = thread_id, "error event on a link fd");
        }
        if device_event == rescan_event(count) {
            let _ = pair.rescan.read();
        }
        let [rx, tx] = vrings else {
            return Ok(());
        };
        pair.lock().handle_event(device_event, rx, tx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pair_offers_no_multiqueue_and_more_pairs_offer_it_with_the_control_queue() {
        let mq = (1u64 << VIRTIO_NET_F_MQ) | (1u64 << VIRTIO_NET_F_CTRL_VQ);
        assert_eq!(offered_features(1) & mq, 0);
        assert_eq!(offered_features(2) & mq, mq);
        assert_eq!(offered_features(2) & !mq, offered_features(1));
    }
}
