//! Moving frames between the virtqueues and the datapath.
//!
//! TX: every descriptor chain the guest made available is read (through vm-memory, which checks
//! each address against the guest's memory map), stripped of its virtio-net header and handed
//! over as one Ethernet frame. RX: a frame is written into as many of the guest's receive buffers
//! as it needs (mergeable RX buffers) behind a header that says how many it used.
//!
//! Bad chains (outside guest memory, looping, shorter than the header, larger than any frame) are
//! counted and returned to the guest as used with length 0; they never stop the queue.
//!
//! A ring is touched only while it is usable: enabled by the VMM, started (it has a kick fd and
//! was not stopped by GET_VRING_BASE) and with its addresses set. A ring that is not, or whose
//! available index is nonsense (more chains than the ring holds), ends the call: nothing is
//! read or written, nothing loops. The guest's next kick (or the VMM restarting the ring) brings
//! us back. One call takes at most [`TX_CHAINS_PER_CALL`] chains so that a guest that keeps its
//! TX ring full cannot hold the worker (and the datapath lock) forever; when it stops there, it
//! kicks the ring itself, so the rest is taken after the worker has served its other events.

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::{NetHeader, RingPositions};

/// Largest Ethernet frame we accept from or give to the guest: a 64 KiB TCP segment (TSO), or
/// a frame at the largest MTU.
pub const MAX_FRAME: usize = 65_562;

/// Most TX chains one [`drain_tx`] call takes before it gives the worker back.
pub const TX_CHAINS_PER_CALL: usize = 256;

/// At most one warning about an unusable ring per this interval: a guest can provoke one with
/// every kick.
const RING_WARNING_INTERVAL: Duration = Duration::from_secs(1);

type RingState = VringState<GuestMemoryAtomic<GuestMemoryMmap<()>>>;

/// Why a ring cannot be used right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingUnusable {
    /// Disabled (SET_VRING_ENABLE 0) or stopped (GET_VRING_BASE): normal, nothing to say.
    Stopped,
    /// Started (it has a kick fd) but its addresses were never set (SET_VRING_ADDR).
    NoAddresses,
}

/// Whether the device may read or write this ring now (see the module comment).
fn check_ring(state: &RingState) -> Result<(), RingUnusable> {
    let queue = state.get_queue();
    if !state.is_enabled() || !queue.ready() {
        Err(RingUnusable::Stopped)
    } else if queue.avail_ring() == 0 {
        // virtio-queue takes an available ring at 0 for "not set" and refuses to pop from it;
        // its notification calls would still write the used ring at address 0.
        Err(RingUnusable::NoAddresses)
    } else {
        Ok(())
    }
}

/// Whether `vring` is usable (enabled, started, addresses set).
pub fn ring_usable(vring: &VringRwLock) -> bool {
    check_ring(&vring.get_ref()).is_ok()
}

/// Logs a ring problem the guest or VMM caused, at most once per [`RING_WARNING_INTERVAL`]
/// (with the number of occurrences not logged since).
fn ring_warning(queue: &'static str, problem: &dyn std::fmt::Display) {
    static LAST: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if last
        .0
        .is_some_and(|at| now.duration_since(at) < RING_WARNING_INTERVAL)
    {
        last.1 += 1;
        return;
    }
    let suppressed = std::mem::take(&mut last.1);
    last.0 = Some(now);
    warn!(queue, suppressed, "{queue} ring not used: {problem}");
}

fn report_unusable(queue: &'static str, why: RingUnusable) {
    match why {
        RingUnusable::Stopped => debug!(queue, "ring disabled or stopped; not touched"),
        RingUnusable::NoAddresses => {
            ring_warning(queue, &"used before SET_VRING_ADDR, the queue is not ready")
        }
    }
}

/// Whether `head` names a descriptor of the ring. A driver may make any 16-bit value
/// available; a head beyond the ring can be neither read nor returned (virtio-queue's
/// `add_used` refuses it and logs an error line of its own for every such entry, outside our
/// rate limits), so it is counted as a bad chain and left alone.
fn head_in_ring(state: &RingState, head: u16) -> bool {
    head < state.get_queue().size()
}

/// Pops the next available chain, or reports why the ring cannot be read.
fn next_chain<'m>(
    state: &mut RingState,
    mem: &'m GuestMemoryMmap<()>,
    queue_name: &'static str,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap<()>>>, ()> {
    if let Err(why) = check_ring(state) {
        report_unusable(queue_name, why);
        return Err(());
    }
    match state.get_queue_mut().iter(mem) {
        Ok(mut avail) => Ok(avail.next()),
        Err(e) => {
            // Not ready, an available index more than the ring size ahead, or an available
            // ring outside guest memory: nothing can be taken until the ring is set up again.
            ring_warning(queue_name, &e);
            Err(())
        }
    }
}

/// Re-enables notifications of a usable ring and says whether the guest made more chains
/// available meanwhile. A ring that is not usable is not written and reports `false`.
pub fn enable_notification(vring: &VringRwLock) -> bool {
    let mut state = vring.get_mut();
    check_ring(&state).is_ok() && matches!(state.enable_notification(), Ok(true))
}

/// Asks the guest for a kick when it makes more buffers available than it has now: the RX
/// ring holds buffers, but too few for the frame at hand. `enable_notification` alone asks,
/// with EVENT_IDX, for a kick once the guest passes `next_avail`, which it passed long ago: a
/// Linux guest would then not kick again and the frame would wait for some unrelated event.
/// So `avail_event` is set to the available index seen now. Returns whether the guest made
/// more buffers available meanwhile (try again at once). A ring that is not usable is not
/// written and reports `false`.
pub fn await_more_buffers(vring: &VringRwLock, mem: &GuestMemoryMmap<()>) -> bool {
    use std::sync::atomic::{fence, Ordering};
    let mut state = vring.get_mut();
    if check_ring(&state).is_err() {
        return false;
    }
    let queue = state.get_queue();
    let Ok(seen) = queue.avail_idx(mem, Ordering::Acquire) else {
        return false;
    };
    if state.enable_notification().is_err() {
        return false;
    }
    let queue = state.get_queue();
    if queue.event_idx_enabled() {
        let Some(at) = avail_event_addr(queue) else {
            return false;
        };
        if mem
            .store(u16::to_le(seen.0), at, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
    }
    fence(Ordering::SeqCst);
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|now| now != seen)
}

/// Kicks the ring ourselves, as the guest would: the worker comes back to it after the other
/// events that are ready. The kick eventfd is the VMM's; a write that could block (a full
/// counter, or not an eventfd at all) is not attempted, and notifications are re-enabled
/// instead so that the guest's next kick brings us back.
fn kick_again(vring: &VringRwLock) {
    let kicked = {
        let state = vring.get_ref();
        state.get_kick().as_ref().is_some_and(|kick| {
            let fd = kick.as_raw_fd();
            let mut pollfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no timeout; the fd stays open while we hold the lock.
            let writable = unsafe { libc::poll(&mut pollfd, 1, 0) } == 1
                && pollfd.revents & libc::POLLOUT != 0;
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to an fd the vring owns (see above).
            writable && unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) } == 8
        })
    };
    if !kicked {
        ring_warning(
            "TX",
            &"cannot kick the ring to resume later; waiting for the guest",
        );
        let _ = enable_notification(vring);
    }
}

/// Whether a usable ring holds chains netfence has not taken (one read of the guest's index).
pub fn has_available(vring: &VringRwLock, mem: &GuestMemoryMmap<()>) -> bool {
    use std::sync::atomic::Ordering::Acquire;
    let state = vring.get_ref();
    check_ring(&state).is_ok()
        && state
            .get_queue()
            .avail_idx(mem, Acquire)
            .is_ok_and(|idx| idx.0 != state.get_queue().next_avail())
}

/// Where the guest's `used_event` lies: after the available ring's entries (virtio 1.x,
/// 2.7.6). `None` when the address would overflow (a VMM can put a ring anywhere).
fn used_event_addr(queue: &virtio_queue::Queue) -> Option<GuestAddress> {
    queue
        .avail_ring()
        .checked_add(4 + 2 * u64::from(queue.size()))
        .map(GuestAddress)
}

/// Where netfence's `avail_event` lies: after the used ring's elements (virtio 1.x, 2.7.8).
fn avail_event_addr(queue: &virtio_queue::Queue) -> Option<GuestAddress> {
    queue
        .used_ring()
        .checked_add(4 + 8 * u64::from(queue.size()))
        .map(GuestAddress)
}

/// With EVENT_IDX, whether the guest asks for a call (its `used_event`) at an index netfence
/// has already passed since it last called at `called_at` (its used index then): a request
/// that reached us too late to be seen when the entries were used. Returns the used index
/// now when it does (call, and remember it), `None` otherwise.
pub fn call_owed(vring: &VringRwLock, mem: &GuestMemoryMmap<()>, called_at: u16) -> Option<u16> {
    use std::sync::atomic::Ordering::Acquire;
    let state = vring.get_ref();
    let queue = state.get_queue();
    if check_ring(&state).is_err() || !queue.event_idx_enabled() {
        return None;
    }
    let used_event = u16::from_le(mem.load::<u16>(used_event_addr(queue)?, Acquire).ok()?);
    let used = queue.next_used();
    // The guest wants a call once the used index passes used_event: it did, after called_at.
    (used_event.wrapping_sub(called_at) < used.wrapping_sub(called_at)).then_some(used)
}

/// The used index of a ring (where netfence returns its next chain).
pub fn next_used(vring: &VringRwLock) -> u16 {
    vring.get_ref().get_queue().next_used()
}

/// Where `vring` stands (see [`RingPositions`]), read from guest memory; `None` while the ring
/// has no addresses or they are not in guest memory.
pub fn ring_positions(vring: &VringRwLock, mem: &GuestMemoryMmap<()>) -> Option<RingPositions> {
    use std::sync::atomic::Ordering::Acquire;
    let state = vring.get_ref();
    let queue = state.get_queue();
    let size = queue.size();
    let (avail_ring, used_ring) = (queue.avail_ring(), queue.used_ring());
    if avail_ring == 0 || used_ring == 0 {
        return None;
    }
    let load = |at: Option<GuestAddress>| mem.load::<u16>(at?, Acquire).ok().map(u16::from_le);
    let event_idx = queue.event_idx_enabled();
    let avail_flags = load(Some(GuestAddress(avail_ring)))?;
    let used_flags = load(Some(GuestAddress(used_ring)))?;
    Some(RingPositions {
        size,
        enabled: state.is_enabled(),
        ready: queue.ready(),
        avail: load(avail_ring.checked_add(2).map(GuestAddress))?,
        taken: queue.next_avail(),
        used: queue.next_used(),
        used_event: if event_idx {
            load(used_event_addr(queue))
        } else {
            None
        },
        avail_event: if event_idx {
            load(avail_event_addr(queue))
        } else {
            None
        },
        guest_no_interrupt: avail_flags & 1 != 0,
        device_no_notify: used_flags & 1 != 0,
    })
}

/// Length of the virtio-net header in front of every frame.
pub fn header_len(version_1_or_mrg: bool) -> usize {
    if version_1_or_mrg {
        12
    } else {
        10
    }
}

/// Most descriptors a chain may have. The virtio spec forbids a chain longer than the queue
/// (indirect entries included), and virtio-queue accepts indirect tables of 65,535 entries:
/// without this bound a ring full of such chains of zero-length descriptors costs millions of
/// descriptor reads per TX kick, with the datapath lock held.
pub const MAX_CHAIN_DESCRIPTORS: usize = super::MAX_QUEUE_SIZE;

// A well-formed chain: the iterator of virtio-queue stops quietly on a loop, a `next` out of
// range, a bad indirect table or a length overflow, which would make a truncated chain look
// complete. So a chain is accepted only if its last descriptor says "no next", it has at most
// [`MAX_CHAIN_DESCRIPTORS`] descriptors, its length fits a frame, and (for TX) no descriptor is
// device-writable. Both directions check this in the one walk that also moves the bytes.

/// Outcome counters of one TX drain.
#[derive(Default, Debug, Clone, Copy)]
pub struct TxStats {
    pub frames: u64,
    pub bad_chains: u64,
    /// Chains taken off the ring (frames and bad chains).
    pub chains: usize,
    /// The call stopped at [`TX_CHAINS_PER_CALL`] and kicked the ring to come back.
    pub capped: bool,
    /// The guest was called (used chains it asked to hear about).
    pub called: bool,
}

/// Bytes of scratch a TX drain needs: the largest header and the largest frame.
pub const TX_SCRATCH: usize = 12 + MAX_FRAME;

/// Copies a TX chain into `scratch` in one walk over its descriptors (no allocation) and
/// returns how many bytes it held, or `None` when the chain is not well formed (see
/// the comment above [`TxStats`]), is larger than `scratch`, or points outside guest memory.
fn read_tx_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap<()>,
    scratch: &mut [u8],
) -> Option<usize>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut seen = false;
    let mut last_has_next = false;
    let mut total = 0usize;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS || desc.is_write_only() {
            return None;
        }
        seen = true;
        last_has_next = desc.has_next();
        let end = total.checked_add(desc.len() as usize)?;
        let into = scratch.get_mut(total..end)?;
        if !into.is_empty() {
            mem.read_slice(into, desc.addr()).ok()?;
        }
        total = end;
    }
    (seen && !last_has_next).then_some(total)
}

/// Reads the available TX chains (at most [`TX_CHAINS_PER_CALL`]) and calls `on_frame` with
/// each frame's virtio-net header and the frame behind it. `scratch` must hold [`TX_SCRATCH`]
/// bytes; it is written, never zero-filled. Signals the guest when the used ring changed and it
/// asked for it. Returns at once when the ring is not usable or cannot be read.
pub fn drain_tx(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap<()>,
    hdr_len: usize,
    scratch: &mut [u8],
    mut on_frame: impl FnMut(&NetHeader, &[u8]),
) -> TxStats {
    let mut stats = TxStats::default();
    let mut used_any = false;
    // Set after a round that took nothing although the guest's index said there was more.
    let mut empty_round = false;
    'rounds: loop {
        {
            let mut state = vring.get_mut();
            if let Err(why) = check_ring(&state) {
                report_unusable("TX", why);
                break;
            }
            if state.disable_notification().is_err() {
                break;
            }
        }
        let mut taken = 0usize;
        loop {
            if stats.chains >= TX_CHAINS_PER_CALL {
                // Leave notifications off: we come back through our own kick.
                stats.capped = true;
                break 'rounds;
            }
            let chain = match next_chain(&mut vring.get_mut(), mem, "TX") {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(()) => break 'rounds,
            };
            taken += 1;
            stats.chains += 1;
            let head = chain.head_index();
            if !head_in_ring(&vring.get_ref(), head) {
                stats.bad_chains += 1;
                continue;
            }
            let len = read_tx_chain(chain, mem, scratch).filter(|&n| n >= hdr_len);
            // The frame is handed on before its chain is used: once the guest sees the chain
            // used it may send the flow's next frame on another queue (multiqueue), and that
            // one must not overtake this one.
            match len {
                Some(len) => {
                    stats.frames += 1;
                    let header = NetHeader::parse(&scratch[..hdr_len]);
                    on_frame(&header, &scratch[hdr_len..len]);
                }
                None => stats.bad_chains += 1,
            }
            if let Err(e) = vring.add_used(head, 0) {
                ring_warning("TX", &e);
                stats.bad_chains += 1;
                break 'rounds;
            }
            used_any = true;
        }
        // Re-enable notifications; if the guest added chains meanwhile, go round again. A round
        // that took nothing gets one more look (a chain published between our last pop and
        // the re-enable), never two: an index that says "more" while nothing can be taken
        // would otherwise keep us here for ever.
        if !enable_notification(vring) {
            break;
        }
        if taken == 0 {
            if empty_round {
                break;
            }
            empty_round = true;
        }
    }
    if stats.capped {
        kick_again(vring);
    }
    if used_any {
        stats.called = signal_if_needed(vring);
    }
    stats
}

/// Why a frame could not be written to the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum RxError {
    /// The guest has not made enough receive buffers available; try again after its next kick.
    NoBuffers,
    /// The guest's buffers are unusable (bad addresses); the frame is dropped.
    BadChain,
    /// A GSO frame larger than any room the guest has offered at once (see
    /// [`RxScratch::largest_room`]): waiting for buffers would not help.
    TooLarge,
}

/// Buffers [`push_rx`] reuses from frame to frame, so that writing a frame allocates nothing.
#[derive(Default)]
pub struct RxScratch {
    /// Writable segments (address, length) of the chains taken for the frame, in order.
    segs: Vec<(GuestAddress, u32)>,
    /// Each chain taken: its head and the end of its segments in `segs`.
    chains: Vec<(u16, usize)>,
    /// What goes to the used ring: head and bytes written.
    used: Vec<(u16, u32)>,
    /// The most room the guest has offered at once since its ring started: bytes of one
    /// buffer without mergeable buffers, of every available buffer with them (a lower bound:
    /// a frame that fit stops the count). A large segment that does not fit now but would
    /// have fit that room waits for the guest to repost; one larger is cut by the link. (A
    /// guest that is merely slower than netfence would otherwise get its large segments cut
    /// in software whenever its ring ran dry for a moment.)
    largest_room: usize,
}

/// Walks an RX chain once, appending its device-writable segments to `segs` (after checking
/// that each lies in guest memory). Returns their total length, or `None` for a chain that is
/// not well formed (see the comment above [`TxStats`]) or reaches outside guest memory.
fn collect_rx_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap<()>,
    segs: &mut Vec<(GuestAddress, u32)>,
) -> Option<usize>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    use vm_memory::GuestMemoryBackend as _;
    let mut seen = false;
    let mut last_has_next = false;
    let mut total = 0usize;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return None;
        }
        seen = true;
        last_has_next = desc.has_next();
        if !desc.is_write_only() {
            // Not ours to write (a receive buffer has none); skipped, as always.
            continue;
        }
        total += desc.len() as usize;
        if total > MAX_FRAME * 2 || !mem.check_range(desc.addr(), desc.len() as usize) {
            return None;
        }
        segs.push((desc.addr(), desc.len()));
    }
    (seen && !last_has_next).then_some(total)
}

/// Writes one frame behind `header` into the guest's RX queue. With `mergeable`, several
/// buffers may be used. Does not signal the guest: call [`signal_if_needed`] after a batch, or
/// signal unconditionally when it returned `Ok(true)` (several buffers used; see
/// [`publish_used`]).
pub fn push_rx(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap<()>,
    hdr_len: usize,
    mergeable: bool,
    header: &NetHeader,
    frame: &[u8],
    scratch: &mut RxScratch,
) -> Result<bool, RxError> {
    let needed = hdr_len + frame.len();
    let mut state = vring.get_mut();
    // A disabled, stopped or unreadable ring has no room: nothing is written to it.
    if check_ring(&state).is_err() {
        return Err(RxError::NoBuffers);
    }
    let RxScratch {
        segs,
        chains,
        used,
        largest_room,
    } = scratch;
    if state.get_queue().next_avail() == 0 {
        // The ring (re)started, perhaps with other buffers: learn their room again.
        *largest_room = 0;
    }
    segs.clear();
    chains.clear();
    used.clear();
    // Collect chains until they can hold the frame.
    let mut capacity = 0usize;
    while capacity < needed {
        let Ok(Some(chain)) = next_chain(&mut state, mem, "RX") else {
            break;
        };
        let head = chain.head_index();
        match collect_rx_chain(chain, mem, segs) {
            Some(len) if head_in_ring(&state, head) => {
                capacity += len;
                chains.push((head, segs.len()));
            }
            _ => {
                // The frame is dropped; every buffer taken so far goes back empty.
                for (h, _) in chains.iter() {
                    let _ = state.add_used(*h, 0);
                }
                if head_in_ring(&state, head) {
                    let _ = state.add_used(head, 0);
                }
                return Err(RxError::BadChain);
            }
        }
        if !mergeable {
            break;
        }
    }
    *largest_room = (*largest_room).max(capacity);
    if capacity < needed {
        for _ in 0..chains.len() {
            state.get_queue_mut().go_to_previous_position();
        }
        // A large segment that the guest's buffers cannot hold is no reason to drop it: if
        // they never held that much at once, the link cuts it to MTU-sized segments; else it
        // waits for the guest to repost.
        return Err(if header.is_gso() && needed > *largest_room {
            RxError::TooLarge
        } else if chains.is_empty() || mergeable || header.is_gso() {
            RxError::NoBuffers
        } else {
            RxError::BadChain
        });
    }
    let header = header.to_bytes(chains.len() as u16);
    // The header, then the frame: one run of bytes over the chains' segments in order.
    let mut parts = [&header[..hdr_len], frame];
    let mut seg_start = 0usize;
    for &(head, seg_end) in chains.iter() {
        let mut written = 0usize;
        for &(addr, len) in &segs[seg_start..seg_end] {
            let mut at = addr;
            let mut room = len as usize;
            for part in parts.iter_mut() {
                let n = part.len().min(room);
                if n == 0 {
                    continue;
                }
                if mem.write_slice(&part[..n], at).is_err() {
                    // Checked when the chain was walked; should the map have changed, every
                    // buffer goes back empty.
                    for (h, _) in chains.iter() {
                        let _ = state.add_used(*h, 0);
                    }
                    return Err(RxError::BadChain);
                }
                *part = &part[n..];
                at = at.unchecked_add(n as u64);
                room -= n;
                written += n;
            }
        }
        seg_start = seg_end;
        used.push((head, written as u32));
    }
    publish_used(&mut state, mem, used)
}

/// Puts a frame's buffers on the used ring so that the driver sees all of them at once: the
/// entries before the last are written first, then the last goes in through `add_used`, whose
/// release-store of the used index publishes them together. (Adding them one by one would let
/// a driver see the first buffer of a merged frame before the rest, and drop the frame.)
/// Returns `Ok(true)` when several buffers were used: the queue's event-index bookkeeping then
/// counts one, so the caller must signal the guest without asking `needs_notification`.
fn publish_used(
    state: &mut vhost_user_backend::VringState<GuestMemoryAtomic<GuestMemoryMmap<()>>>,
    mem: &GuestMemoryMmap<()>,
    used: &[(u16, u32)],
) -> Result<bool, RxError> {
    let Some((&(last_head, last_len), earlier)) = used.split_last() else {
        return Ok(false);
    };
    let queue = state.get_queue_mut();
    let start = queue.next_used();
    let size = queue.size();
    let ring = queue.used_ring();
    for (i, &(head, len)) in earlier.iter().enumerate() {
        let pos = u64::from(start.wrapping_add(i as u16) % size);
        // A used ring at the top of the address space (the VMM chose it) is refused, not
        // wrapped.
        let addr = ring
            .checked_add(4 + 8 * pos)
            .filter(|a| a.checked_add(8).is_some())
            .map(GuestAddress)
            .ok_or(RxError::BadChain)?;
        mem.write_obj(u32::from(head).to_le(), addr)
            .and_then(|_| mem.write_obj(len.to_le(), GuestAddress(addr.0 + 4)))
            .map_err(|_| RxError::BadChain)?;
    }
    queue.set_next_used(start.wrapping_add(earlier.len() as u16));
    state
        .add_used(last_head, last_len)
        .map_err(|_| RxError::BadChain)?;
    Ok(!earlier.is_empty())
}

/// Tells the guest about new used entries if it wants to know (EVENT_IDX aware). A ring that is
/// not usable is left alone. Returns whether it signalled.
pub fn signal_if_needed(vring: &VringRwLock) -> bool {
    if ring_usable(vring) && vring.needs_notification().unwrap_or(true) {
        let _ = vring.signal_used_queue();
        return true;
    }
    false
}
