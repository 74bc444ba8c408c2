//! The guest's receive queue as a port the link writes frames into ([`GuestRx`]).
//!
//! A frame goes into as many receive buffers as it needs (mergeable RX buffers, see
//! [`virtqueue::push_rx`]). When the guest has too few buffers the port announces what it
//! filled, asks the guest for a kick and reports [`RxOutcome::NoRoom`]; the link keeps the frame
//! and the next RX kick brings it back. A ring that is stopped (GET_VRING_BASE), not yet set up or
//! disabled (SET_VRING_ENABLE 0) is never written: every frame meets `NoRoom` until it runs again.

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::GuestMemoryMmap;

use super::virtqueue::{self, RxError, RxScratch};
use super::{GuestRx, NetHeader, RxOutcome};

/// One service pass's view of the RX queue.
pub struct RxPort<'a> {
    vring: &'a VringRwLock,
    mem: &'a GuestMemoryMmap<()>,
    hdr_len: usize,
    mergeable: bool,
    scratch: &'a mut RxScratch,
    /// Frames delivered in this pass.
    pub delivered: u64,
    /// Frames dropped on unusable buffers in this pass.
    pub dropped: u64,
    /// A merged frame was delivered: the guest must be signalled without asking event-idx.
    force_signal: bool,
    /// Whether notifications were re-enabled once already after running out of buffers.
    retried: bool,
}

impl<'a> RxPort<'a> {
    pub fn new(
        vring: &'a VringRwLock,
        mem: &'a GuestMemoryMmap<()>,
        hdr_len: usize,
        mergeable: bool,
        scratch: &'a mut RxScratch,
    ) -> Self {
        RxPort {
            vring,
            mem,
            hdr_len,
            mergeable,
            scratch,
            delivered: 0,
            dropped: 0,
            force_signal: false,
            retried: false,
        }
    }

    /// Signals the guest about what this pass delivered (if it asked to be told); returns
    /// whether it did.
    pub fn finish(self) -> bool {
        if self.delivered == 0 && self.dropped == 0 {
            return false;
        }
        if self.force_signal {
            let _ = self.vring.needs_notification();
            let _ = self.vring.signal_used_queue();
            true
        } else {
            virtqueue::signal_if_needed(self.vring)
        }
    }
}

impl GuestRx for RxPort<'_> {
    fn push(&mut self, header: &NetHeader, frame: &[u8]) -> RxOutcome {
        if !virtqueue::ring_usable(self.vring) {
            return RxOutcome::NoRoom;
        }
        loop {
            match virtqueue::push_rx(
                self.vring,
                self.mem,
                self.hdr_len,
                self.mergeable,
                header,
                frame,
                self.scratch,
            ) {
                Ok(merged) => {
                    self.force_signal |= merged;
                    self.delivered += 1;
                    return RxOutcome::Delivered;
                }
                Err(RxError::NoBuffers) => {
                    // Too few buffers for this frame: announce what was filled (so the guest
                    // can repost), ask for a kick when it adds buffers, and wait for it. One
                    // retry covers buffers that arrived while we asked.
                    virtqueue::signal_if_needed(self.vring);
                    if self.retried || !virtqueue::await_more_buffers(self.vring, self.mem) {
                        return RxOutcome::NoRoom;
                    }
                    self.retried = true;
                }
                Err(RxError::BadChain) => {
                    self.dropped += 1;
                    return RxOutcome::Dropped;
                }
                Err(RxError::TooLarge) => return RxOutcome::TooLarge,
            }
        }
    }
}
