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
//! Should the mapping fail (address space or map count exhausted), the rings are plain heap
//! buffers as they always were: nothing is refused for it.

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

impl RingMemory {
    /// A guest-end socket with `each` bytes of ring each way, and the memory behind them.
    ///
    /// The socket borrows the memory for `'static`: the caller keeps the `RingMemory` until
    /// the socket is gone (removed from its `SocketSet`, or the set dropped) and never lets
    /// smoltcp touch the socket after that.
    pub fn socket(each: usize) -> (tcp::Socket<'static>, RingMemory) {
        match Mapping::new(each * 2) {
            Some(map) => {
                // SAFETY: the mapping is `2 * each` bytes, readable and writable, zero-filled
                // (anonymous) and owned by the returned `RingMemory`, which outlives the socket
                // (see above); the two slices do not overlap and nothing else refers to them.
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
            // SAFETY: the range is exactly our mapping. Its contents are dead (the caller's
            // condition): smoltcp writes every byte of a ring before it reads it again.
            unsafe {
                libc::madvise(map.base.as_ptr().cast(), map.len, libc::MADV_DONTNEED);
            }
        }
    }

    /// Whether the rings are a mapping (else heap buffers, which are not given back).
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }
}

impl Mapping {
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
}
