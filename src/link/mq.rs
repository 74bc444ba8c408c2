//! Multiqueue: what the links of one VM's queue pairs share, and how a frame that reached the
//! wrong pair gets to the right one.
//!
//! Each queue pair has its own [`super::Link`] on its own worker thread. Frames that are not a
//! flow's (ARP, DHCP, neighbour discovery, everything to a gateway address: pings, DNS,
//! published ports' replies) and DNS intercepted anywhere are served by pair 0. A flow
//! belongs to the pair that saw its opening frame ([`crate::flow::owners`]); a later frame of
//! it that arrives on another pair (the guest's sender moved to another CPU) is handed to the
//! owner through the owner's [`Inbox`], once: the receiver never hands it on again.
//!
//! Order: the device hands a TX frame to the link before it returns the frame's chain to the
//! guest, and a pair takes its inbox before it drains its own TX ring, so a flow whose frames
//! move between queues reaches its owner in the order the guest sent them (Linux moves a flow
//! to another queue only when all its earlier frames were consumed).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::NetHeader;
use crate::dns::cache::NameCache;
use crate::flow::owners::{Owners, PairCounts};

/// A guest frame on its way to the pair that owns its flow.
pub struct Handoff {
    pub header: NetHeader,
    pub frame: Vec<u8>,
}

/// The frames handed to one pair, bounded by `handoff-frames`.
pub struct Inbox {
    queue: Mutex<VecDeque<Handoff>>,
    /// Frames queued (read without the lock to skip an empty inbox).
    queued: AtomicUsize,
    capacity: usize,
    /// Written when the inbox goes from empty to not empty; in the owner's epoll.
    wake: EventFd,
}

impl Inbox {
    pub fn new(capacity: usize) -> std::io::Result<Self> {
        Ok(Inbox {
            queue: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            capacity: capacity.max(1),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queues a frame for the owner; `false` (the frame is dropped) when the inbox is full.
    pub fn push(&self, handoff: Handoff) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= self.capacity {
            return false;
        }
        let was_empty = queue.is_empty();
        queue.push_back(handoff);
        self.queued.store(queue.len(), Ordering::Release);
        drop(queue);
        if was_empty {
            let _ = self.wake.write(1);
        }
        true
    }

    /// Moves every queued frame to `out` (in the order they came).
    pub fn take_all(&self, out: &mut VecDeque<Handoff>) {
        if self.queued.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        out.append(&mut queue);
        self.queued.store(0, Ordering::Release);
    }

    /// Consumes the wake-up (the frames are taken with [`Inbox::take_all`]).
    pub fn consume_wake(&self) {
        let _ = self.wake.read();
    }

    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

/// What the links of one multiqueue VM share.
pub struct VmShared {
    pub pairs: u16,
    pub owners: Arc<Owners>,
    /// Every pair's flow counts (the flow budgets are per VM).
    pub counts: Arc<PairCounts>,
    /// Pair `k`'s inbox at index `k`.
    pub inboxes: Vec<Inbox>,
    /// The VM's one IP -> names cache (pair 0's DNS service fills it).
    pub names: Arc<RwLock<NameCache>>,
    /// Frames handed from one pair to another, and those dropped at a full inbox.
    pub handed_off: AtomicU64,
    pub handoff_full: AtomicU64,
}

impl VmShared {
    pub fn new(
        pairs: u16,
        handoff_frames: usize,
        names: Arc<RwLock<NameCache>>,
    ) -> std::io::Result<Self> {
        Ok(VmShared {
            pairs,
            owners: Arc::new(Owners::default()),
            counts: Arc::new(PairCounts::new(usize::from(pairs))),
            inboxes: (0..pairs)
                .map(|_| Inbox::new(handoff_frames))
                .collect::<std::io::Result<_>>()?,
            names,
            handed_off: AtomicU64::new(0),
            handoff_full: AtomicU64::new(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Handoff {
        Handoff {
            header: NetHeader::NONE,
            frame: vec![n],
        }
    }

    #[test]
    fn inbox_is_bounded_and_wakes_once_per_batch() {
        let inbox = Inbox::new(2).unwrap();
        assert!(inbox.push(frame(1)));
        assert!(inbox.push(frame(2)));
        assert!(!inbox.push(frame(3)), "a full inbox refuses");
        // One wake-up for the batch: the eventfd counts 1.
        assert_eq!(inbox.wake.read().unwrap(), 1);
        let mut out = VecDeque::new();
        inbox.take_all(&mut out);
        assert_eq!(
            out.iter().map(|h| h.frame[0]).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(inbox.push(frame(4)));
        assert_eq!(inbox.wake.read().unwrap(), 1);
    }
}
