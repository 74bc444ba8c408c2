//! Self-tests of the harness's split-virtqueue driver against an independent device-side
//! implementation (rust-vmm's virtio-queue), so that a failing netfence test is not a harness
//! bug in disguise.

mod common;

use std::io::{Read, Write};

use common::memory::GuestMem;
use common::virtq::{need_event, Seg, SplitQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestAddress};

/// A device-side queue over the same rings.
fn device_queue(q: &SplitQueue, event_idx: bool) -> Queue {
    let mut d = Queue::new(1024).unwrap();
    d.set_size(q.size);
    let split = |a: GuestAddress| {
        (
            Some(a.raw_value() as u32),
            Some((a.raw_value() >> 32) as u32),
        )
    };
    let (l, h) = split(q.desc_table);
    d.set_desc_table_address(l, h);
    let (l, h) = split(q.avail);
    d.set_avail_ring_address(l, h);
    let (l, h) = split(q.used);
    d.set_used_ring_address(l, h);
    d.set_event_idx(event_idx);
    d.set_ready(true);
    d
}

fn setup(size: u16, event_idx: bool) -> (GuestMem, SplitQueue, Queue) {
    let mut gm = GuestMem::new(0x10_0000, 1 << 20, 1);
    let mut q = SplitQueue::new(&mut gm, 0, size);
    q.event_idx = event_idx;
    let d = device_queue(&q, event_idx);
    assert!(d.is_valid(&gm.mem));
    (gm, q, d)
}

#[test]
fn readable_chains_round_trip_and_wrap() {
    let (mut gm, mut q, mut d) = setup(8, false);
    let buf = gm.alloc(4096, 4096);
    // 2-descriptor chains, 4 in flight at a time, 6 rounds: indices wrap the ring 3 times.
    for round in 0..6u8 {
        for k in 0..4u8 {
            let a = buf.unchecked_add(k as u64 * 256);
            gm.write(a, &[round, k, 0xaa, 0xbb, 0xcc]);
            let segs = [
                Seg {
                    addr: a,
                    len: 3,
                    write: false,
                },
                Seg {
                    addr: a.unchecked_add(3),
                    len: 2,
                    write: false,
                },
            ];
            q.add_chain(&segs, k as u64).expect("room for the chain");
        }
        assert_eq!(q.num_free(), 0);
        assert!(q
            .add_chain(
                &[Seg {
                    addr: buf,
                    len: 1,
                    write: false
                }],
                9
            )
            .is_none());
        // Device: pop every chain, read it, return it.
        let mut seen = Vec::new();
        while let Some(chain) = d.pop_descriptor_chain(&gm.mem) {
            let head = chain.head_index();
            let mut r = chain.reader(&gm.mem).unwrap();
            let mut b = Vec::new();
            r.read_to_end(&mut b).unwrap();
            seen.push(b);
            d.add_used(&gm.mem, head, 0).unwrap();
        }
        assert_eq!(seen.len(), 4, "round {round}");
        for (k, b) in seen.iter().enumerate() {
            assert_eq!(b, &[round, k as u8, 0xaa, 0xbb, 0xcc]);
        }
        let mut tags = Vec::new();
        while let Some((_, fl)) = q.pop_used() {
            tags.push(fl.tag);
        }
        assert_eq!(tags, vec![0, 1, 2, 3]);
        assert_eq!(q.num_free(), 8);
    }
    assert_eq!(q.next_avail, 24);
}

#[test]
fn writable_chains_carry_device_data_back() {
    let (mut gm, mut q, mut d) = setup(16, false);
    let buf = gm.alloc(4096, 4096);
    q.add_chain(
        &[
            Seg {
                addr: buf,
                len: 4,
                write: true,
            },
            Seg {
                addr: buf.unchecked_add(100),
                len: 8,
                write: true,
            },
        ],
        7,
    )
    .unwrap();
    let chain = d.pop_descriptor_chain(&gm.mem).unwrap();
    let head = chain.head_index();
    let mut w = chain.writer(&gm.mem).unwrap();
    assert_eq!(w.available_bytes(), 12);
    w.write_all(b"hello world!").unwrap();
    d.add_used(&gm.mem, head, 12).unwrap();
    let (e, fl) = q.pop_used().unwrap();
    assert_eq!((e.len, fl.tag), (12, 7));
    assert_eq!(gm.read(buf, 4), b"hell");
    assert_eq!(gm.read(buf.unchecked_add(100), 8), b"o world!");
}

#[test]
fn event_idx_kick_suppression_follows_the_device() {
    let (mut gm, mut q, mut d) = setup(16, true);
    let buf = gm.alloc(4096, 4096);
    let one = |q: &mut SplitQueue| {
        q.add_chain(
            &[Seg {
                addr: buf,
                len: 1,
                write: false,
            }],
            0,
        )
        .unwrap()
    };
    // The device asks to be kicked for the next buffer (avail_event = 0).
    assert!(!d.enable_notification(&gm.mem).unwrap());
    one(&mut q);
    assert!(q.kick_if_needed(), "first buffer after enable must kick");
    // The device has not caught up (avail_event still 0): further buffers do not kick.
    one(&mut q);
    assert!(!q.kick_if_needed());
    one(&mut q);
    assert!(!q.kick_if_needed());
    // The device drains and re-enables: avail_event = 3, the next buffer kicks again.
    while let Some(c) = d.pop_descriptor_chain(&gm.mem) {
        d.add_used(&gm.mem, c.head_index(), 0).unwrap();
    }
    assert!(!d.enable_notification(&gm.mem).unwrap());
    assert_eq!(q.avail_event(), 3);
    one(&mut q);
    assert!(q.kick_if_needed());
    assert_eq!((q.kicks, q.kicks_suppressed), (2, 2));
}

#[test]
fn event_idx_call_suppression_follows_the_driver() {
    let (mut gm, mut q, mut d) = setup(16, true);
    let buf = gm.alloc(4096, 4096);
    for _ in 0..4 {
        q.add_chain(
            &[Seg {
                addr: buf,
                len: 1,
                write: false,
            }],
            0,
        )
        .unwrap();
    }
    // Driver wants a call for the next used buffer.
    assert!(!q.enable_calls());
    let c = d.pop_descriptor_chain(&gm.mem).unwrap();
    d.add_used(&gm.mem, c.head_index(), 0).unwrap();
    assert!(
        d.needs_notification(&gm.mem).unwrap(),
        "used_event=0 crossed: call"
    );
    // Driver has not consumed or re-enabled: no further calls.
    let c = d.pop_descriptor_chain(&gm.mem).unwrap();
    d.add_used(&gm.mem, c.head_index(), 0).unwrap();
    assert!(!d.needs_notification(&gm.mem).unwrap());
    // Driver consumes both and re-enables: nothing pending, next used calls again.
    assert!(q.pop_used().is_some() && q.pop_used().is_some());
    assert!(!q.enable_calls());
    let c = d.pop_descriptor_chain(&gm.mem).unwrap();
    d.add_used(&gm.mem, c.head_index(), 0).unwrap();
    assert!(d.needs_notification(&gm.mem).unwrap());
    // enable_calls reports pending work instead of letting the caller sleep on it.
    assert!(q.enable_calls());
}

#[test]
#[should_panic(expected = "device bug")]
fn unknown_used_id_is_reported_as_a_device_bug() {
    let (mut gm, mut q, mut d) = setup(16, false);
    let buf = gm.alloc(4096, 4096);
    q.add_chain(
        &[Seg {
            addr: buf,
            len: 1,
            write: false,
        }],
        0,
    )
    .unwrap();
    let c = d.pop_descriptor_chain(&gm.mem).unwrap();
    // A device returning a descriptor that is not a head in flight.
    d.add_used(&gm.mem, c.head_index() + 5, 0).unwrap();
    q.pop_used();
}

#[test]
#[should_panic(expected = "device bug")]
fn used_length_beyond_the_buffer_is_reported() {
    let (mut gm, mut q, mut d) = setup(16, false);
    let buf = gm.alloc(4096, 4096);
    q.add_chain(
        &[Seg {
            addr: buf,
            len: 64,
            write: true,
        }],
        0,
    )
    .unwrap();
    let c = d.pop_descriptor_chain(&gm.mem).unwrap();
    d.add_used(&gm.mem, c.head_index(), 65).unwrap();
    q.pop_used();
}

#[test]
fn need_event_matches_the_spec_formula() {
    // vring_need_event(event, new, old): kick iff event is in [old, new).
    assert!(need_event(0, 1, 0));
    assert!(!need_event(5, 3, 2));
    assert!(need_event(5, 6, 5));
    assert!(need_event(5, 7, 4));
    assert!(!need_event(5, 5, 4));
    assert!(need_event(0xffff, 0, 0xffff));
    assert!(need_event(0xfffe, 2, 0xfffd));
}

#[test]
fn guest_memory_regions_and_allocation() {
    let mut gm = GuestMem::new(1 << 32, 2 << 20, 2);
    let infos = gm.region_infos();
    assert_eq!(infos.len(), 2);
    assert_eq!(infos[0].guest_phys_addr, 1 << 32);
    assert_eq!(infos[1].guest_phys_addr, (1 << 32) + (1 << 20));
    assert_eq!(infos[1].mmap_offset, 1 << 20);
    // An allocation that would straddle the region boundary moves to the next region.
    let a = gm.alloc((1 << 20) - 4096, 4096);
    let b = gm.alloc(8192, 4096);
    assert_eq!(a.raw_value(), 1 << 32);
    assert_eq!(b.raw_value(), (1 << 32) + (1 << 20));
    gm.write(b, b"xyz");
    assert_eq!(gm.read(b, 3), b"xyz");
}
