//! The memory behind a guest end's two smoltcp buffers, committed only as it is used.
//!
//! smoltcp's TCP socket takes its receive and send rings when it is made and can neither grow
//! nor swap them later, and the receive ring's capacity fixes the window scale the socket
//! offers in its SYN or SYN-ACK (and so the largest window it can ever advertise). So every
//! guest end gets rings of the full `tcp-buffer-bytes` each way, and the window stays sized
//! for throughput; but both rings live in one private anonymous mapping that the kernel backs
//! page by page as bytes are written into it. A flow costs the memory of what it has carried,
//! up to its two buffers, and no more: the rings grow on demand at page granularity.
//!
//! A flow at rest with both rings empty gives the pages back ([`RingMemory::release`],
//! `MADV_DONTNEED`), so a flow that once streamed costs kilobytes again once it rests; so does
//! a flow whose rings are found empty 2 s after its last release although a byte still moves
//! now and then (`TcpFlow::rest`). What a link may hold in its rings at once is still bounded
//! by `tcp-link-buffer-bytes` (bytes held), and what is resident by what the flows carried in
//! the last seconds.
//!
//! A closed flow's mapping is not unmapped but kept, its pages given back, for the next flow
//! its thread opens (at most [`POOLED_MAPPINGS`] per thread): a short connection then costs
//! one `madvise` instead of `mmap`, `madvise` and `munmap`.
//!
//! Should the mapping fail (address space or map count exhausted), the rings are plain heap
//! buffers as they always were: nothing is refused for it.

use std::cell::RefCell;
use std::ptr::NonNull;

use smoltcp::socket::tcp;

/// One mapping holding a socket's receive ring, then its send ring.
pub struct RingMemory {
    map: Option<Mapping>,
}

struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only released or unmapped
// through `&self`/`Drop` by whoever owns the flow, on that owner's thread.
unsafe impl Send for RingMemory {}

/// How many closed flows' mappings a thread keeps for its next flows (released: they hold no
/// memory, only address space).
pub const POOLED_MAPPINGS: usize = 16;

thread_local! {
    /// This thread's mappings waiting for a flow.
    static POOL: RefCell<Vec<Mapping>> = const { RefCell::new(Vec::new()) };
}

/// A pooled mapping of `len` bytes, if this thread has one.
fn pooled(len: usize) -> Option<Mapping> {
    POOL.try_with(|pool| {
        let mut pool = pool.try_borrow_mut().ok()?;
        let i = pool.iter().position(|m| m.len == len)?;
        Some(pool.swap_remove(i))
    })
    .ok()
    .flatten()
}

/// Keeps `map` (its pages given back) for this thread's next flow, or unmaps it when the pool
/// is full (or the thread is ending).
fn give_back(map: Mapping) {
    let _ = POOL.try_with(move |pool| {
        if let Ok(mut pool) = pool.try_borrow_mut() {
            if pool.len() < POOLED_MAPPINGS {
                map.release();
                pool.push(map);
            }
        }
        // Not pooled: `map` is dropped (unmapped) here.
    });
}

impl RingMemory {
    /// A guest-end socket with `each` bytes of ring each way, and the memory behind them.
    ///
    /// The socket borrows the memory for `'static`: the caller keeps the `RingMemory` until
    /// the socket is gone (removed from its `SocketSet`, or the set dropped) and never lets
    /// smoltcp touch the socket after that.
    pub fn socket(each: usize) -> (tcp::Socket<'static>, RingMemory) {
        match pooled(each * 2).or_else(|| Mapping::new(each * 2)) {
            Some(map) => {
                // SAFETY: the mapping is `2 * each` bytes, readable and writable, and owned by
                // the returned `RingMemory`, which outlives the socket (see above); the two
                // slices do not overlap and nothing else refers to them (a pooled mapping's
                // previous socket is gone: it came back through `Drop`). smoltcp reads no ring
                // byte it did not write first, so what a pooled mapping held does not matter
                // (and it reads as zeros: released).
                let (rx, tx) = unsafe {
                    let all = std::slice::from_raw_parts_mut(map.base.as_ptr(), each * 2);
                    all.split_at_mut(each)
                };
                let socket =
                    tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
                (socket, RingMemory { map: Some(map) })
            }
            None => {
                let socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0u8; each]),
                    tcp::SocketBuffer::new(vec![0u8; each]),
                );
                (socket, RingMemory { map: None })
            }
        }
    }

    /// Gives the rings' pages back to the kernel; they read as zeros and are committed again
    /// as they are written. Call only when both rings hold no byte the socket will read again:
    /// its receive and send queues are empty and no out-of-order segment waits in the receive
    /// ring.
    pub fn release(&self) {
        if let Some(map) = &self.map {
            map.release();
        }
    }

    /// Whether the rings are a mapping (else heap buffers, which are not given back).
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            give_back(map);
        }
    }
}

impl Mapping {
    /// Gives the pages back to the kernel (they read as zeros and are committed again as they
    /// are written).
    fn release(&self) {
        // SAFETY: the range is exactly our mapping. Its contents are dead (the callers'
        // condition): smoltcp writes every byte of a ring before it reads it again.
        unsafe {
            libc::madvise(self.base.as_ptr().cast(), self.len, libc::MADV_DONTNEED);
        }
    }

    fn new(len: usize) -> Option<Mapping> {
        if len == 0 {
            return None;
        }
        // SAFETY: a fresh private anonymous mapping; no address is imposed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // Transparent huge pages would commit 2 MiB at the first byte written.
        // SAFETY: advice on our own mapping.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE);
        }
        NonNull::new(ptr.cast()).map(|base| Mapping { base, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; the socket over it is gone (the owner's
        // contract in `RingMemory::socket`).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages of `len` bytes at `base` (mincore).
    fn resident(base: *mut u8, len: usize) -> usize {
        let page = 4096;
        let mut v = vec![0u8; len.div_ceil(page)];
        // SAFETY: mincore over our own page-aligned mapping into a large enough vector.
        let r = unsafe { libc::mincore(base.cast(), len, v.as_mut_ptr()) };
        assert_eq!(r, 0);
        v.iter().filter(|b| **b & 1 != 0).count()
    }

    #[test]
    fn rings_are_committed_as_written_and_given_back_at_rest() {
        let each = 512 * 1024;
        let (mut socket, memory) = RingMemory::socket(each);
        assert!(memory.is_mapped());
        let map = memory.map.as_ref().unwrap();
        assert_eq!(socket.recv_capacity(), each);
        assert_eq!(socket.send_capacity(), each);
        assert_eq!(
            resident(map.base.as_ptr(), map.len),
            0,
            "nothing committed up front"
        );
        // The send ring takes bytes only once the socket is connected; fill it by hand.
        let base = map.base.as_ptr();
        // SAFETY: writing through the mapping while the socket is idle, as smoltcp would.
        unsafe {
            std::ptr::write_bytes(base.add(each), 7, 3 * 4096);
        }
        assert_eq!(resident(base, map.len), 3);
        memory.release();
        assert_eq!(resident(base, map.len), 0, "released at rest");
        // SAFETY: as above.
        assert_eq!(
            unsafe { *base.add(each) },
            0,
            "released pages read as zeros"
        );
        assert!(socket.send_queue() == 0);
        socket.abort();
        drop(socket);
        drop(memory);
    }

    #[test]
    fn a_closed_flows_mapping_serves_the_next_flow_released() {
        // A thread of its own: the pool is per thread.
        std::thread::spawn(|| {
            let each = 64 * 1024;
            let (socket, memory) = RingMemory::socket(each);
            let base = memory.map.as_ref().unwrap().base.as_ptr();
            // SAFETY: writing through the mapping while the socket is idle, as smoltcp would.
            unsafe {
                std::ptr::write_bytes(base, 9, 2 * 4096);
            }
            assert_eq!(resident(base, 2 * each), 2);
            drop(socket);
            drop(memory);
            let (socket, memory) = RingMemory::socket(each);
            let map = memory.map.as_ref().unwrap();
            assert_eq!(
                map.base.as_ptr(),
                base,
                "the closed flow's mapping is reused"
            );
            assert_eq!(resident(base, map.len), 0, "its pages were given back");
            // SAFETY: reading our own mapping.
            assert_eq!(unsafe { *base }, 0, "it reads as zeros");
            // Another size does not take it; more than the pool holds are unmapped.
            let (other_socket, other) = RingMemory::socket(each / 2);
            assert_ne!(other.map.as_ref().unwrap().base.as_ptr(), base);
            drop((other_socket, other));
            let flows: Vec<_> = (0..POOLED_MAPPINGS + 4)
                .map(|_| RingMemory::socket(each))
                .collect();
            drop(flows);
            let held = POOL.with(|p| p.borrow().len());
            assert_eq!(
                held, POOLED_MAPPINGS,
                "the pool keeps at most POOLED_MAPPINGS"
            );
            drop((socket, memory));
        })
        .join()
        .unwrap();
    }
}
