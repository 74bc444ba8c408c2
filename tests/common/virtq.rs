//! The driver side of a split virtqueue (virtio 1.x, 2.7), living in [`GuestMem`].
//!
//! Layout: descriptor table (16 bytes per entry: addr u64, len u32, flags u16, next u16), the
//! available ring (flags u16, idx u16, ring[size] u16, used_event u16) written by us, and the
//! used ring (flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16) written by the
//! device. We keep a free list of descriptors and remember each published chain by its head so
//! that what the device returns can be checked (known head, sane length) and freed.
//!
//! Raw access ([`SplitQueue::write_desc`], [`SplitQueue::publish_raw`]) lets tests craft
//! malformed chains. Anything the device does wrong (unknown id, used index jumping by more than
//! the ring size) panics with "device bug".

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMem;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// One descriptor table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One used ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// A buffer segment of a chain to publish: guest address, length, device-writable or not.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

/// A chain we published and the device has not returned yet.
#[derive(Clone, Debug)]
pub struct InFlight {
    /// Descriptor indices we allocated for it (freed when the head comes back).
    pub descs: Vec<u16>,
    /// Total bytes of device-writable segments.
    pub writable_len: u64,
    /// Caller's tag (e.g. which RX buffer).
    pub tag: u64,
}

pub struct SplitQueue {
    mem: GuestMemoryMmap<()>,
    pub index: usize,
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    free: VecDeque<u16>,
    in_flight: Vec<Option<InFlight>>,
    /// Our shadow of avail->idx (next slot to fill).
    pub next_avail: u16,
    /// avail->idx at the last notification decision.
    kicked_avail: u16,
    /// Next used ring slot to read.
    pub last_used: u16,
    pub event_idx: bool,
    /// Kick on every publish, ignoring the device's suppression hints.
    pub always_kick: bool,
    pub kick: EventFd,
    pub call: EventFd,
    pub kicks: u64,
    pub kicks_suppressed: u64,
}

/// virtio's vring_need_event: does moving the index from `old` to `new` pass `event`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl SplitQueue {
    /// Allocates the three rings of a `size`-entry queue in `gm` and zeroes them.
    pub fn new(gm: &mut GuestMem, index: usize, size: u16) -> SplitQueue {
        assert!(size.is_power_of_two(), "queue size must be a power of two");
        let n = size as u64;
        let desc_table = gm.alloc(16 * n, 4096);
        let avail = gm.alloc(6 + 2 * n, 4096);
        let used = gm.alloc(6 + 8 * n, 4096);
        gm.fill(desc_table, (16 * n) as usize, 0);
        gm.fill(avail, (6 + 2 * n) as usize, 0);
        gm.fill(used, (6 + 8 * n) as usize, 0);
        SplitQueue {
            mem: gm.mem.clone(),
            index,
            size,
            desc_table,
            avail,
            used,
            free: (0..size).collect(),
            in_flight: vec![None; size as usize],
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            event_idx: false,
            always_kick: false,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd"),
            kicks: 0,
            kicks_suppressed: 0,
        }
    }

    /// The `VringConfigData` a VMM sends for this queue (ring addresses as our VAs).
    pub fn config_data(&self, gm: &GuestMem) -> vhost::VringConfigData {
        vhost::VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: gm.host_addr(self.desc_table),
            used_ring_addr: gm.host_addr(self.used),
            avail_ring_addr: gm.host_addr(self.avail),
            log_addr: None,
        }
    }

    // ---- raw ring access -------------------------------------------------------------------

    pub fn write_desc(&self, i: u16, d: Desc) {
        let a = self.desc_table.unchecked_add(16 * i as u64);
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write_slice(&b, a).unwrap();
    }

    pub fn read_desc(&self, i: u16) -> Desc {
        let a = self.desc_table.unchecked_add(16 * i as u64);
        let mut b = [0u8; 16];
        self.mem.read_slice(&mut b, a).unwrap();
        Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            next: u16::from_le_bytes(b[14..16].try_into().unwrap()),
        }
    }

    fn load16(&self, a: GuestAddress) -> u16 {
        u16::from_le(self.mem.load(a, Ordering::Acquire).unwrap())
    }

    fn store16(&self, a: GuestAddress, v: u16) {
        self.mem.store(v.to_le(), a, Ordering::Release).unwrap();
    }

    pub fn avail_flags(&self) -> u16 {
        self.load16(self.avail)
    }
    pub fn set_avail_flags(&self, f: u16) {
        self.store16(self.avail, f)
    }
    pub fn used_flags(&self) -> u16 {
        self.load16(self.used)
    }
    pub fn used_idx(&self) -> u16 {
        self.load16(self.used.unchecked_add(2))
    }
    /// avail_event, written by the device (meaningful with EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        self.load16(self.used.unchecked_add(4 + 8 * self.size as u64))
    }
    /// used_event, written by us (meaningful with EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        self.store16(self.avail.unchecked_add(4 + 2 * self.size as u64), v)
    }

    // ---- descriptors -----------------------------------------------------------------------

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_in_flight(&self) -> usize {
        self.size as usize - self.free.len()
    }

    /// Takes `n` descriptors off the free list (None if there are not enough).
    pub fn alloc_descs(&mut self, n: usize) -> Option<Vec<u16>> {
        if n == 0 || self.free.len() < n {
            return None;
        }
        Some((0..n).map(|_| self.free.pop_front().unwrap()).collect())
    }

    /// Builds a chain over freshly allocated descriptors and publishes it. Returns the head.
    pub fn add_chain(&mut self, segs: &[Seg], tag: u64) -> Option<u16> {
        let ids = self.alloc_descs(segs.len())?;
        let mut writable = 0u64;
        for (k, (seg, &id)) in segs.iter().zip(&ids).enumerate() {
            let last = k + 1 == segs.len();
            let mut flags = 0;
            if seg.write {
                flags |= VIRTQ_DESC_F_WRITE;
                writable += seg.len as u64;
            }
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let next = if last { 0 } else { ids[k + 1] };
            self.write_desc(
                id,
                Desc {
                    addr: seg.addr.raw_value(),
                    len: seg.len,
                    flags,
                    next,
                },
            );
        }
        let head = ids[0];
        self.in_flight[head as usize] = Some(InFlight {
            descs: ids,
            writable_len: writable,
            tag,
        });
        self.publish(head);
        Some(head)
    }

    /// Registers `descs` (already written with `write_desc`, allocated with `alloc_descs`) as an
    /// in-flight chain with head `descs[0]` and publishes that head.
    pub fn publish_raw(&mut self, descs: Vec<u16>, writable_len: u64, tag: u64) -> u16 {
        let head = descs[0];
        assert!(
            self.in_flight[head as usize].is_none(),
            "head {head} already in flight"
        );
        self.in_flight[head as usize] = Some(InFlight {
            descs,
            writable_len,
            tag,
        });
        self.publish(head);
        head
    }

    /// Puts `head` in the next available ring slot and bumps avail->idx (release).
    fn publish(&mut self, head: u16) {
        let slot = self.next_avail % self.size;
        let a = self.avail.unchecked_add(4 + 2 * slot as u64);
        self.mem.write_obj(head.to_le(), a).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        self.store16(self.avail.unchecked_add(2), self.next_avail);
    }

    /// Puts `head` in the next available ring slot and bumps avail->idx, with no bookkeeping
    /// and no check: a driver that makes a head index available that it never allocated (even
    /// one beyond the ring). The device must not return it (it cannot), so nothing is freed.
    pub fn publish_head_unchecked(&mut self, head: u16) {
        self.publish(head);
    }

    /// Writes avail->idx as given, without publishing anything (a driver that lies about how
    /// many chains it made available). Our own bookkeeping (`next_avail`) is left alone.
    pub fn write_avail_idx_raw(&self, idx: u16) {
        fence(Ordering::Release);
        self.store16(self.avail.unchecked_add(2), idx);
    }

    /// avail->idx as it is in guest memory.
    pub fn avail_idx_raw(&self) -> u16 {
        self.load16(self.avail.unchecked_add(2))
    }

    /// Notifies the device if it asked for it (EVENT_IDX avail_event, or USED_F_NO_NOTIFY).
    /// Returns whether a kick was sent.
    pub fn kick_if_needed(&mut self) -> bool {
        let old = self.kicked_avail;
        let new = self.next_avail;
        if old == new {
            return false;
        }
        self.kicked_avail = new;
        // Our avail->idx store must be visible before we read the device's hint.
        fence(Ordering::SeqCst);
        let needed = self.always_kick
            || if self.event_idx {
                need_event(self.avail_event(), new, old)
            } else {
                self.used_flags() & VIRTQ_USED_F_NO_NOTIFY == 0
            };
        if needed {
            self.kick_now();
        } else {
            self.kicks_suppressed += 1;
        }
        needed
    }

    /// Writes the kick eventfd unconditionally.
    pub fn kick_now(&mut self) {
        self.kicks += 1;
        self.kick.write(1).expect("kick eventfd");
    }

    /// Reads the next used element, if the device published one. Checks it and frees the chain.
    pub fn pop_used(&mut self) -> Option<(UsedElem, InFlight)> {
        let idx = self.used_idx();
        let pending = idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return None;
        }
        assert!(
            pending <= self.size,
            "device bug: queue {} used idx {} is {} ahead of last seen {} (size {})",
            self.index,
            idx,
            pending,
            self.last_used,
            self.size
        );
        // Read the element only after seeing the index (acquire above).
        let slot = self.last_used % self.size;
        let a = self.used.unchecked_add(4 + 8 * slot as u64);
        let id = u32::from_le(self.mem.read_obj(a).unwrap());
        let len = u32::from_le(self.mem.read_obj(a.unchecked_add(4)).unwrap());
        self.last_used = self.last_used.wrapping_add(1);
        assert!(
            (id as usize) < self.size as usize,
            "device bug: queue {} used id {} out of range (size {})",
            self.index,
            id,
            self.size
        );
        let fl = self.in_flight[id as usize].take().unwrap_or_else(|| {
            panic!(
                "device bug: queue {} returned id {} that is not in flight",
                self.index, id
            )
        });
        assert!(
            len as u64 <= fl.writable_len,
            "device bug: queue {} id {} used len {} > writable {}",
            self.index,
            id,
            len,
            fl.writable_len
        );
        for &d in &fl.descs {
            self.free.push_back(d);
        }
        Some((UsedElem { id, len }, fl))
    }

    /// Number of used elements the device has published that we have not read.
    pub fn used_pending(&self) -> u16 {
        self.used_idx().wrapping_sub(self.last_used)
    }

    /// Asks for a call on the next used element; returns true if some are already pending
    /// (the caller should process them instead of waiting).
    pub fn enable_calls(&mut self) -> bool {
        if self.event_idx {
            self.set_used_event(self.last_used);
        } else {
            self.set_avail_flags(0);
        }
        fence(Ordering::SeqCst);
        self.used_pending() != 0
    }

    /// Asks for a call when the device publishes a used element past those published now,
    /// read or not; returns the used index it waits past.
    pub fn enable_calls_after_published(&mut self) -> u16 {
        let seen = self.used_idx();
        if self.event_idx {
            self.set_used_event(seen);
        } else {
            self.set_avail_flags(0);
        }
        fence(Ordering::SeqCst);
        seen
    }

    /// Asks the device not to call (a hint only).
    pub fn disable_calls(&mut self) {
        if !self.event_idx {
            self.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Clears the call eventfd (non-blocking).
    pub fn drain_call(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }

    /// In-flight chain with this head, if any.
    pub fn in_flight(&self, head: u16) -> Option<&InFlight> {
        self.in_flight.get(head as usize).and_then(|x| x.as_ref())
    }
}
