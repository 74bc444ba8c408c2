//! Guest memory for the harness: a memfd mapped MAP_SHARED, split into one or more regions that
//! are handed to the backend (SET_MEM_TABLE or ADD_MEM_REG), plus a bump allocator for rings and
//! buffers. Everything the backend reads or writes lives here.

use std::fs::File;
use std::os::fd::FromRawFd;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

pub struct GuestMem {
    pub mem: GuestMemoryMmap<()>,
    pub base: GuestAddress,
    pub size: u64,
    next: u64,
    _file: File,
}

impl GuestMem {
    /// `size` bytes of shared memory starting at guest physical address `base`, split into
    /// `regions` equal regions (each its own mapping of the same memfd at its own offset).
    pub fn new(base: u64, size: usize, regions: usize) -> GuestMem {
        assert!(
            regions >= 1 && size.is_multiple_of(regions * 4096),
            "bad memory geometry"
        );
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd =
            unsafe { libc::memfd_create(c"netfence-harness-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh, owned descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).expect("ftruncate memfd");
        let per = size / regions;
        let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = (0..regions)
            .map(|i| {
                (
                    GuestAddress(base + (i * per) as u64),
                    per,
                    Some(FileOffset::new(
                        file.try_clone().expect("dup memfd"),
                        (i * per) as u64,
                    )),
                )
            })
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(ranges).expect("map guest memory");
        GuestMem {
            mem,
            base: GuestAddress(base),
            size: size as u64,
            next: base,
            _file: file,
        }
    }

    /// Allocates `len` bytes aligned to `align`, never straddling a region boundary.
    pub fn alloc(&mut self, len: u64, align: u64) -> GuestAddress {
        let mut start = self.next.div_ceil(align) * align;
        // Move to the next region if the allocation would cross the end of this one.
        let region = self
            .mem
            .find_region(GuestAddress(start))
            .expect("guest memory exhausted");
        let region_end = region.start_addr().raw_value() + region.len();
        if start + len > region_end {
            start = region_end.div_ceil(align) * align;
            let r2 = self
                .mem
                .find_region(GuestAddress(start))
                .expect("guest memory exhausted");
            assert!(
                start + len <= r2.start_addr().raw_value() + r2.len(),
                "allocation of {len} bytes does not fit a region"
            );
        }
        self.next = start + len;
        GuestAddress(start)
    }

    /// First guest address past the end of guest memory.
    pub fn end(&self) -> GuestAddress {
        self.base.unchecked_add(self.size)
    }

    /// The address the backend must use for the vring (a VA of *our* process, as VMMs pass it).
    pub fn host_addr(&self, gpa: GuestAddress) -> u64 {
        self.mem.get_host_address(gpa).expect("gpa in guest memory") as u64
    }

    /// Regions as the vhost-user frontend announces them.
    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("region with fd"))
            .collect()
    }

    pub fn write(&self, gpa: GuestAddress, data: &[u8]) {
        self.mem.write_slice(data, gpa).expect("write guest memory");
    }

    pub fn read(&self, gpa: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, gpa).expect("read guest memory");
        v
    }

    pub fn fill(&self, gpa: GuestAddress, len: usize, byte: u8) {
        self.write(gpa, &vec![byte; len]);
    }
}
