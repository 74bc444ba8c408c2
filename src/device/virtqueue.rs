//! Moving frames between the virtqueues and the datapath.
//!
//! TX: every descriptor chain the guest made available is read (through vm-memory, which checks
//! each address against the guest's memory map), stripped of its virtio-net header and handed
//! over as one Ethernet frame. RX: a frame is written into as many of the guest's receive buffers
//! as it needs (mergeable RX buffers) behind a header that says how many it used.
//!
//! Bad chains (outside guest memory, looping, shorter than the header, larger than any frame) are
//! counted and returned to the guest as used with length 0; they never stop the queue.

use std::io::{Read, Write};

use tracing::debug;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Largest Ethernet frame we accept from or give to the guest (no GSO is offered).
pub const MAX_FRAME: usize = 65_562;

/// Length of the virtio-net header in front of every frame.
pub fn header_len(version_1_or_mrg: bool) -> usize {
    if version_1_or_mrg {
        12
    } else {
        10
    }
}

/// Walks a chain and says whether it ends properly: the iterator of virtio-queue stops quietly
/// on a loop, a `next` out of range, a bad indirect table or a length overflow, which would make
/// a truncated chain look complete. A chain is accepted only if its last descriptor says "no
/// next", its length fits a frame, and (for TX) no descriptor is device-writable.
fn chain_is_well_formed<M>(chain: &DescriptorChain<M>, transmit: bool) -> bool
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let mut seen = false;
    let mut last_has_next = false;
    let mut total: u64 = 0;
    for desc in chain.clone() {
        seen = true;
        last_has_next = desc.has_next();
        total += u64::from(desc.len());
        if (transmit && desc.is_write_only()) || total > (MAX_FRAME as u64) * 2 {
            return false;
        }
    }
    seen && !last_has_next
}

/// Outcome counters of one TX drain.
#[derive(Default, Debug, Clone, Copy)]
pub struct TxStats {
    pub frames: u64,
    pub bad_chains: u64,
}

/// Reads every available TX chain and calls `on_frame` with each frame (header stripped).
/// Signals the guest when the used ring changed and it asked for it.
pub fn drain_tx(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap<()>,
    hdr_len: usize,
    scratch: &mut Vec<u8>,
    mut on_frame: impl FnMut(&[u8]),
) -> TxStats {
    let mut stats = TxStats::default();
    let mut used_any = false;
    loop {
        if vring.disable_notification().is_err() {
            break;
        }
        loop {
            let chain = {
                let mut state = vring.get_mut();
                state.get_queue_mut().pop_descriptor_chain(mem)
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            scratch.clear();
            let well_formed = chain_is_well_formed(&chain, true);
            let ok = well_formed
                && match chain.reader(mem) {
                    Ok(mut reader) => {
                        let total = reader.available_bytes();
                        if total < hdr_len || total - hdr_len > MAX_FRAME {
                            false
                        } else {
                            scratch.resize(total, 0);
                            reader.read_exact(scratch).is_ok()
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "bad TX descriptor chain");
                        false
                    }
                };
            if vring.add_used(head, 0).is_err() {
                stats.bad_chains += 1;
                break;
            }
            used_any = true;
            if ok {
                stats.frames += 1;
                on_frame(&scratch[hdr_len..]);
            } else {
                stats.bad_chains += 1;
            }
        }
        // Re-enable notifications; if the guest added chains meanwhile, go round again.
        match vring.enable_notification() {
            Ok(true) => continue,
            _ => break,
        }
    }
    if used_any {
        signal_if_needed(vring);
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
}

/// Writes one frame into the guest's RX queue. With `mergeable`, several buffers may be used.
/// Does not signal the guest: call [`signal_if_needed`] after a batch, or signal unconditionally
/// when it returned `Ok(true)` (several buffers used; see [`publish_used`]).
pub fn push_rx(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap<()>,
    hdr_len: usize,
    mergeable: bool,
    frame: &[u8],
) -> Result<bool, RxError> {
    let needed = hdr_len + frame.len();
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    // Collect chains until they can hold the frame.
    let mut chains = Vec::new();
    let mut capacity = 0usize;
    while capacity < needed {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let usable = chain_is_well_formed(&chain, false);
        let writer = match chain.writer(mem).ok().filter(|_| usable).ok_or(()) {
            Ok(w) => w,
            Err(_) => {
                // The frame is dropped; every buffer taken so far goes back empty.
                for (h, _) in &chains {
                    let _ = state.add_used(*h, 0);
                }
                let _ = state.add_used(head, 0);
                return Err(RxError::BadChain);
            }
        };
        capacity += writer.available_bytes();
        chains.push((head, writer));
        if !mergeable {
            break;
        }
    }
    if capacity < needed {
        for _ in 0..chains.len() {
            queue.go_to_previous_position();
        }
        return Err(if chains.is_empty() || mergeable {
            RxError::NoBuffers
        } else {
            RxError::BadChain
        });
    }
    let mut header = [0u8; 12];
    header[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
    let mut remaining = frame;
    let mut header_left: &[u8] = &header[..hdr_len];
    let mut used = Vec::with_capacity(chains.len());
    for (head, mut writer) in chains {
        let mut written = 0usize;
        if !header_left.is_empty() {
            let n = header_left.len().min(writer.available_bytes());
            if writer.write_all(&header_left[..n]).is_err() {
                used.push((head, written as u32));
                continue;
            }
            header_left = &header_left[n..];
            written += n;
        }
        let n = remaining.len().min(writer.available_bytes());
        if writer.write_all(&remaining[..n]).is_ok() {
            remaining = &remaining[n..];
            written += n;
        }
        used.push((head, written as u32));
    }
    publish_used(&mut state, mem, &used)
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
        let addr = GuestAddress(ring + 4 + 8 * pos);
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

/// Tells the guest about new used entries if it wants to know (EVENT_IDX aware).
pub fn signal_if_needed(vring: &VringRwLock) {
    if vring.needs_notification().unwrap_or(true) {
        let _ = vring.signal_used_queue();
    }
}
