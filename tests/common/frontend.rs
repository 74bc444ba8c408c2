//! A vhost-user-net frontend (the VMM side) for driving netfence over its socket.
//!
//! [`Frontend::connect`] does the handshake the way cloud-hypervisor's vhost-user-net device
//! does (see TESTING.md): SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (then NEED_REPLY on
//! every message when REPLY_ACK was acked), GET_QUEUE_NUM with MQ, GET_CONFIG with CONFIG,
//! SET_FEATURES (the intersection, without VIRTIO_NET_F_MAC, as CH sends it), ADD_MEM_REG per
//! region with CONFIGURE_MEM_SLOTS (else SET_MEM_TABLE), SET_VRING_NUM for every queue, then per
//! queue SET_VRING_ADDR/BASE/CALL/KICK, and SET_VRING_ENABLE. Like a guest driver that filled
//! its RX ring before DRIVER_OK, the RX buffers are posted and the RX kick eventfd is already
//! signalled when the backend gets it.
//!
//! Queue 0 is RX (device writes frames to us), queue 1 is TX. Each frame carries the 12-byte
//! virtio_net_hdr_v1; with MRG_RXBUF a received frame may span `num_buffers` RX buffers.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Address, GuestAddress};

use super::memory::GuestMem;
use super::virtq::{Desc, Seg, SplitQueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

// virtio-net feature bits (virtio 1.2, 5.1.3) and ring/transport bits (6).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Size of virtio_net_hdr_v1 (and of virtio_net_hdr_mrg_rxbuf).
pub const NET_HDR_LEN: usize = 12;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// The offload feature bits a frontend may offer (checksums, TSO, ECN, UFO, both ways).
pub const OFFLOAD_BITS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_GUEST_UFO
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_HOST_UFO;

/// What cloud-hypervisor's vhost-user-net device offers the backend (offloads on, the default).
pub fn ch_features() -> u64 {
    OFFLOAD_BITS
        | VIRTIO_NET_F_MRG_RXBUF
        | VIRTIO_NET_F_CTRL_VQ
        | VIRTIO_NET_F_GUEST_ANNOUNCE
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_MTU
        | VIRTIO_NET_F_MQ
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_F_VERSION_1
        | VHOST_USER_F_PROTOCOL_FEATURES
}

/// The protocol features cloud-hypervisor offers.
pub fn ch_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::CONFIG
}

/// How the frontend sets itself up.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Virtio features offered to the backend (acked = this & backend's).
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    /// Strip VIRTIO_NET_F_MAC from SET_FEATURES, as cloud-hypervisor does.
    pub strip_mac_from_backend: bool,
    /// Use ADD_MEM_REG when CONFIGURE_MEM_SLOTS is acked (CH does); else always SET_MEM_TABLE.
    pub use_mem_slots: bool,
    pub queue_size: u16,
    /// Guest memory size and its guest-physical base.
    pub mem_size: usize,
    pub mem_base: u64,
    /// Number of memory regions (equal parts of one memfd).
    pub mem_regions: usize,
    /// Bytes per RX descriptor, descriptors per RX buffer, RX buffers posted (None = as many
    /// as fit the ring).
    pub rx_buf_size: u32,
    pub rx_descs_per_buf: u16,
    pub rx_buffers: Option<u16>,
    /// Bytes of each TX descriptor's chunk; a frame uses as many chained descriptors as needed.
    pub tx_chunk: u32,
    /// Put the virtio-net header in a descriptor of its own.
    pub tx_split_header: bool,
    /// Kick on every publish, ignoring EVENT_IDX / NO_NOTIFY hints.
    pub always_kick: bool,
    /// Bytes of config space read with GET_CONFIG (mac, status, max_virtqueue_pairs, mtu).
    pub config_len: u32,
    /// MAC the guest uses when the config space is not available.
    pub fallback_mac: [u8; 6],
    /// Bytes at the start of guest memory kept out of the allocator (before the rings) and
    /// filled with [`RESERVED_FILL`]: what a backend reads at a ring address it was never given.
    pub reserve_low: u64,
    /// How long a vhost-user call waits for the backend's reply before it fails (so that a
    /// backend that never answers fails a test instead of hanging it).
    pub reply_timeout: Duration,
    /// Queue pairs the frontend sets up (rings `2k`, `2k + 1`); the backend must have them.
    pub pairs: u16,
    /// Pairs enabled by [`Frontend::enable_vrings`] (the first n; None = all): the others are
    /// set up but never enabled, as a VMM does for pairs the guest does not use.
    pub enabled_pairs: Option<u16>,
}

/// The byte `FrontendOptions::reserve_low` memory is filled with.
pub const RESERVED_FILL: u8 = 0x5a;

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            features: ch_features(),
            protocol_features: ch_protocol_features(),
            strip_mac_from_backend: true,
            use_mem_slots: true,
            queue_size: 256,
            mem_size: 16 << 20,
            mem_base: 0,
            mem_regions: 1,
            rx_buf_size: 2048,
            rx_descs_per_buf: 1,
            rx_buffers: None,
            tx_chunk: 2048,
            tx_split_header: false,
            always_kick: false,
            config_len: 12,
            fallback_mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            reserve_low: 0,
            reply_timeout: Duration::from_secs(10),
            pairs: 1,
            enabled_pairs: None,
        }
    }
}

/// The device config space as read with GET_CONFIG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

/// The virtio_net_hdr_v1 of a received frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHdr {
    pub fn parse(b: &[u8]) -> NetHdr {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: if b.len() >= 12 { u(10) } else { 0 },
        }
    }
}

/// `flags`: the L4 checksum is partial.
pub const NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const NET_HDR_GSO_TCPV4: u8 = 1;
pub const NET_HDR_GSO_UDP: u8 = 3;
pub const NET_HDR_GSO_TCPV6: u8 = 4;
pub const NET_HDR_GSO_ECN: u8 = 0x80;

impl NetHdr {
    /// The 12-byte wire form.
    pub fn to_bytes(self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// Finishes a partial checksum as a NIC would: the one's-complement sum of `frame[start..]`
/// (whose checksum field holds the pseudo-header sum) goes, complemented, at `start + offset`.
/// False when the position is outside the frame.
pub fn complete_checksum(frame: &mut [u8], start: u16, offset: u16) -> bool {
    let (start, field) = (usize::from(start), usize::from(start) + usize::from(offset));
    if field + 2 > frame.len() || start > frame.len() {
        return false;
    }
    let mut sum: u32 = 0;
    for pair in frame[start..].chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[field..field + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    true
}

/// What happened so far, for assertions and reports.
#[derive(Clone, Debug, Default)]
pub struct FrontendStats {
    pub tx_frames: u64,
    pub tx_completed: u64,
    pub tx_bad_chains_sent: u64,
    pub tx_bad_chains_returned: u64,
    pub rx_frames: u64,
    pub rx_buffers_used: u64,
    /// Frames that spanned more than one buffer.
    pub rx_merged_frames: u64,
    /// Times the first buffer of a merged frame was visible before the rest.
    pub rx_partial_merge: u64,
    pub rx_nonzero_gso: u64,
    /// Frames whose header said NEEDS_CSUM (their checksum was completed here, as a driver's
    /// stack would take them).
    pub rx_needs_csum: u64,
    /// Largest frame received (without the header), and the largest `gso_size` seen.
    pub rx_largest_frame: usize,
    pub rx_largest_gso_size: u16,
    pub calls_seen: u64,
    /// Frames received and sent on each queue pair (multiqueue).
    pub rx_frames_by_pair: Vec<u64>,
    pub tx_frames_by_pair: Vec<u64>,
}

/// Descriptor chain shapes a well-behaved driver never publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadChain {
    /// One descriptor whose buffer lies beyond the end of guest memory.
    OutsideMemory,
    /// One descriptor that starts inside guest memory and runs past its end.
    StraddlesEnd,
    /// Two descriptors whose `next` fields point at each other.
    Loop,
    /// A descriptor pointing at itself.
    SelfLoop,
    /// A chain shorter than the virtio-net header (4 bytes).
    TooShort,
    /// A zero-length descriptor.
    ZeroLength,
    /// Header-only chain: exactly 12 bytes, no frame.
    HeaderOnly,
    /// `next` points past the end of the descriptor table.
    NextOutOfRange,
    /// A device-writable descriptor on the TX (device-readable) queue.
    WriteOnlyOnTx,
    /// An indirect descriptor whose table lies outside guest memory.
    IndirectOutside,
    /// An indirect descriptor with a length that is not a multiple of 16.
    IndirectBadLen,
    /// A readable descriptor followed by one of almost 4 GiB (past the end of guest memory;
    /// the summed length overflows a u32).
    HugeLength,
}

impl BadChain {
    pub const ALL: [BadChain; 12] = [
        BadChain::OutsideMemory,
        BadChain::StraddlesEnd,
        BadChain::Loop,
        BadChain::SelfLoop,
        BadChain::TooShort,
        BadChain::ZeroLength,
        BadChain::HeaderOnly,
        BadChain::NextOutOfRange,
        BadChain::WriteOnlyOnTx,
        BadChain::IndirectOutside,
        BadChain::IndirectBadLen,
        BadChain::HugeLength,
    ];
}

/// Tag bit of TX chains that were deliberately malformed.
const TAG_BAD: u64 = 1 << 63;

pub struct Frontend {
    pub vu: VuFrontend,
    pub mem: GuestMem,
    pub rx: SplitQueue,
    pub tx: SplitQueue,
    pub opts: FrontendOptions,
    pub backend_features: u64,
    pub backend_protocol_features: VhostUserProtocolFeatures,
    /// Features acked (the intersection); what was sent in SET_FEATURES is `backend_acked`.
    pub acked_features: u64,
    pub backend_acked: u64,
    pub acked_protocol_features: VhostUserProtocolFeatures,
    pub queue_num: Option<u64>,
    pub config: Option<NetConfig>,
    /// Messages of the handshake in order (for reports).
    pub handshake_log: Vec<String>,
    rx_area: GuestAddress,
    tx_area: GuestAddress,
    /// Scratch area for indirect tables and odd buffers.
    scratch: GuestAddress,
    rx_pending: VecDeque<(NetHdr, Vec<u8>)>,
    pub stats: FrontendStats,
    pub last_rx_hdr: Option<NetHdr>,
    /// More fds `wait` polls besides the call eventfds (e.g. a server's "done" eventfd); they
    /// are not read, so whoever registered one must consume or remove it.
    pub extra_wait_fds: Vec<i32>,
    /// Multiqueue: the rings of pairs 1.. while pair 0's are in `rx`/`tx` (the methods of one
    /// pair work on `rx`/`tx`; [`Frontend::with_pair`] swaps another pair in for a call).
    others: Vec<PairRings>,
    /// The pair whose rings are in `rx`/`tx` now.
    active: usize,
    /// Chooses the TX pair of each frame sent with `try_send_frame*` (None: pair 0).
    pub tx_steer: Option<TxSteer>,
    /// Sees every frame received, with its pair.
    pub rx_observer: Option<RxObserver>,
}

/// Picks the TX queue pair of a frame (multiqueue).
pub type TxSteer = Box<dyn FnMut(&[u8]) -> usize + Send>;
/// Sees a received frame and the pair it came on.
pub type RxObserver = Box<dyn FnMut(usize, &[u8]) + Send>;

/// The rings of one queue pair and their buffers.
struct PairRings {
    rx: SplitQueue,
    tx: SplitQueue,
    rx_area: GuestAddress,
    tx_area: GuestAddress,
}

fn err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

/// Bounds every read on the vhost-user socket (SO_RCVTIMEO): a reply that does not come
/// within `timeout` makes the call fail.
fn set_reply_timeout(vu: &VuFrontend, timeout: Duration) -> Result<(), String> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt on our own socket with a valid timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            vu.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(format!("SO_RCVTIMEO: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// What [`flood_tx`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodStats {
    /// Chains published.
    pub published: u64,
    /// Chains the device returned.
    pub returned: u64,
}

/// A guest that transmits as fast as it can: publishes one-descriptor chains of the staged
/// frame at `addr` (`len` bytes, header included; see [`Frontend::stage_tx_frame`]) whenever
/// the TX ring has a free descriptor, kicking as the device asks, until `stop` is set. Sends
/// on `started` once the device has returned `started_after` chains (the flood is under way).
/// Runs on a thread of its own beside a frontend that keeps the control channel, so it takes
/// the TX queue alone (see the disjoint borrows in the tests).
pub fn flood_tx(
    tx: &mut SplitQueue,
    addr: GuestAddress,
    len: u32,
    stop: &std::sync::atomic::AtomicBool,
    started: std::sync::mpsc::Sender<()>,
    started_after: u64,
) -> FloodStats {
    let mut stats = FloodStats::default();
    let mut announced = false;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        while tx.pop_used().is_some() {
            stats.returned += 1;
        }
        if !announced && stats.returned >= started_after {
            announced = true;
            let _ = started.send(());
        }
        match tx.alloc_descs(1) {
            Some(ids) => {
                tx.write_desc(
                    ids[0],
                    Desc {
                        addr: addr.raw_value(),
                        len,
                        flags: 0,
                        next: 0,
                    },
                );
                tx.publish_raw(ids, 0, 0);
                stats.published += 1;
                tx.kick_if_needed();
            }
            // Ring full: the device has not returned anything yet; look again.
            None => std::thread::yield_now(),
        }
    }
    stats
}

impl Frontend {
    /// Connects to `path` with default (cloud-hypervisor-like) options.
    pub fn connect_default(path: &Path) -> Frontend {
        Frontend::connect(path, FrontendOptions::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Connects and runs the whole vhost-user handshake; the device is live on return.
    pub fn connect(path: &Path, opts: FrontendOptions) -> Result<Frontend, String> {
        let mut fe = Frontend::prepare(path, opts)?;
        for q in 0..2 * fe.opts.pairs as usize {
            fe.setup_vring(q, 0)?;
        }
        fe.enable_vrings(true)?;
        Ok(fe)
    }

    /// The handshake up to the rings: features, config, memory (ADD_MEM_REG or SET_MEM_TABLE)
    /// and SET_VRING_NUM for both queues, with the RX buffers posted and the RX kick pending.
    /// The rings themselves are set up by [`setup_vring`](Self::setup_vring).
    pub fn prepare(path: &Path, opts: FrontendOptions) -> Result<Frontend, String> {
        let pairs = opts.pairs.max(1) as usize;
        let mut vu = VuFrontend::connect(path, 2 * pairs as u64).map_err(err("connect"))?;
        set_reply_timeout(&vu, opts.reply_timeout)?;
        let mut hl = Vec::new();

        // --- negotiate (CH: negotiate_features_vhost_user) ---
        vu.set_owner().map_err(err("SET_OWNER"))?;
        hl.push("SET_OWNER".to_string());
        let backend_features = vu.get_features().map_err(err("GET_FEATURES"))?;
        hl.push(format!("GET_FEATURES -> {backend_features:#x}"));
        let acked_features = opts.features & backend_features;
        let mut backend_protocol_features = VhostUserProtocolFeatures::empty();
        let acked_protocol_features = if acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            backend_protocol_features = vu
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            hl.push(format!(
                "GET_PROTOCOL_FEATURES -> {backend_protocol_features:?}"
            ));
            let acked = opts.protocol_features & backend_protocol_features;
            vu.set_protocol_features(acked)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
            hl.push(format!("SET_PROTOCOL_FEATURES {acked:?}"));
            acked
        } else {
            VhostUserProtocolFeatures::empty()
        };
        if acked_protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = if acked_protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let n = vu.get_queue_num().map_err(err("GET_QUEUE_NUM"))?;
            hl.push(format!("GET_QUEUE_NUM -> {n}"));
            if n < 2 * pairs as u64 {
                return Err(format!(
                    "backend has {n} queues, need {} ({pairs} RX/TX pairs)",
                    2 * pairs
                ));
            }
            Some(n)
        } else {
            None
        };
        let config = if acked_protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
            let buf = vec![0u8; opts.config_len as usize];
            let (_, payload) = vu
                .get_config(0, opts.config_len, VhostUserConfigFlags::WRITABLE, &buf)
                .map_err(err("GET_CONFIG"))?;
            hl.push(format!("GET_CONFIG -> {payload:02x?}"));
            if payload.len() < 12 {
                return Err(format!("config space too short: {payload:?}"));
            }
            Some(NetConfig {
                mac: payload[0..6].try_into().unwrap(),
                status: u16::from_le_bytes([payload[6], payload[7]]),
                max_virtqueue_pairs: u16::from_le_bytes([payload[8], payload[9]]),
                mtu: u16::from_le_bytes([payload[10], payload[11]]),
            })
        } else {
            None
        };

        // --- guest side: memory, rings, RX buffers posted before the device starts ---
        let mut mem = GuestMem::new(opts.mem_base, opts.mem_size, opts.mem_regions);
        if opts.reserve_low > 0 {
            let low = mem.alloc(opts.reserve_low, 1);
            mem.fill(low, opts.reserve_low as usize, RESERVED_FILL);
        }
        let qs = opts.queue_size;
        let mut rx = SplitQueue::new(&mut mem, RX_QUEUE, qs);
        let mut tx = SplitQueue::new(&mut mem, TX_QUEUE, qs);
        let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        rx.event_idx = event_idx;
        tx.event_idx = event_idx;
        rx.always_kick = opts.always_kick;
        tx.always_kick = opts.always_kick;
        let max_bufs = qs / opts.rx_descs_per_buf.max(1);
        let nbufs = opts.rx_buffers.unwrap_or(max_bufs).min(max_bufs);
        let rx_area = mem.alloc(
            nbufs as u64 * opts.rx_descs_per_buf as u64 * opts.rx_buf_size as u64,
            4096,
        );
        let tx_area = mem.alloc(qs as u64 * opts.tx_chunk as u64, 4096);
        let scratch = mem.alloc(256 << 10, 4096);

        let backend_acked = if opts.strip_mac_from_backend {
            acked_features & !VIRTIO_NET_F_MAC
        } else {
            acked_features
        };

        let mut fe = Frontend {
            vu,
            mem,
            rx,
            tx,
            opts: opts.clone(),
            backend_features,
            backend_protocol_features,
            acked_features,
            backend_acked,
            acked_protocol_features,
            queue_num,
            config,
            handshake_log: hl,
            rx_area,
            tx_area,
            scratch,
            rx_pending: VecDeque::new(),
            stats: FrontendStats::default(),
            last_rx_hdr: None,
            extra_wait_fds: Vec::new(),
            others: Vec::new(),
            active: 0,
            tx_steer: None,
            rx_observer: None,
        };
        fe.stats.rx_frames_by_pair = vec![0; pairs];
        fe.stats.tx_frames_by_pair = vec![0; pairs];
        for k in 1..pairs {
            let mut rx = SplitQueue::new(&mut fe.mem, 2 * k, qs);
            let mut tx = SplitQueue::new(&mut fe.mem, 2 * k + 1, qs);
            rx.event_idx = event_idx;
            tx.event_idx = event_idx;
            rx.always_kick = opts.always_kick;
            tx.always_kick = opts.always_kick;
            let rx_area = fe.mem.alloc(
                nbufs as u64 * opts.rx_descs_per_buf as u64 * opts.rx_buf_size as u64,
                4096,
            );
            let tx_area = fe.mem.alloc(qs as u64 * opts.tx_chunk as u64, 4096);
            fe.others.push(PairRings {
                rx,
                tx,
                rx_area,
                tx_area,
            });
        }
        for pair in 0..pairs {
            fe.with_pair(pair, |fe| -> Result<(), String> {
                for k in 0..nbufs {
                    fe.post_rx_buffer(k as u64);
                }
                // The guest kicked after filling the ring; the eventfd holds that kick.
                fe.rx.kick.write(1).map_err(err("RX kick"))
            })?;
        }

        // --- activate (CH: setup_vhost_user) ---
        fe.vu
            .set_features(backend_acked)
            .map_err(err("SET_FEATURES"))?;
        fe.handshake_log
            .push(format!("SET_FEATURES {backend_acked:#x}"));
        let regions = fe.mem.region_infos();
        if opts.use_mem_slots
            && acked_protocol_features.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            for r in &regions {
                fe.vu.add_mem_region(r).map_err(err("ADD_MEM_REG"))?;
                fe.handshake_log.push(format!(
                    "ADD_MEM_REG gpa={:#x} size={:#x}",
                    r.guest_phys_addr, r.memory_size
                ));
            }
        } else {
            fe.vu
                .set_mem_table(&regions)
                .map_err(err("SET_MEM_TABLE"))?;
            fe.handshake_log
                .push(format!("SET_MEM_TABLE {} regions", regions.len()));
        }
        for q in 0..2 * pairs {
            fe.vu.set_vring_num(q, qs).map_err(err("SET_VRING_NUM"))?;
        }
        Ok(fe)
    }

    /// Queue pairs set up.
    pub fn pairs(&self) -> usize {
        1 + self.others.len()
    }

    /// Exchanges the rings in `rx`/`tx` with pair `pair`'s (a no-op for pair 0 at rest); the
    /// same call swaps them back. [`with_pair`](Self::with_pair) is the safe form.
    pub fn swap_pair(&mut self, pair: usize) {
        if pair == 0 {
            return;
        }
        let other = &mut self.others[pair - 1];
        std::mem::swap(&mut self.rx, &mut other.rx);
        std::mem::swap(&mut self.tx, &mut other.tx);
        std::mem::swap(&mut self.rx_area, &mut other.rx_area);
        std::mem::swap(&mut self.tx_area, &mut other.tx_area);
        self.active = if self.active == pair { 0 } else { pair };
    }

    /// Runs `f` with pair `pair`'s rings in `rx`/`tx` (every single-pair method then works on
    /// that pair; received frames of every pair land in the one pending queue).
    pub fn with_pair<R>(&mut self, pair: usize, f: impl FnOnce(&mut Frontend) -> R) -> R {
        assert_eq!(self.active, 0, "with_pair does not nest");
        assert!(pair < self.pairs(), "pair {pair} was not set up");
        self.swap_pair(pair);
        let r = f(self);
        self.swap_pair(pair);
        r
    }

    /// Queues one frame on pair `pair`'s TX queue, waiting for room like `send_frame`.
    pub fn send_frame_on(&mut self, pair: usize, frame: &[u8]) {
        self.with_pair(pair, |fe| fe.send_frame_here(frame));
    }

    /// SET_VRING_ADDR, SET_VRING_BASE `base`, SET_VRING_CALL and SET_VRING_KICK for queue `q`.
    pub fn setup_vring(&mut self, q: usize, base: u16) -> Result<(), String> {
        if q >= 2 && self.active == 0 {
            return self.with_pair(q / 2, |fe| fe.setup_vring(q, base));
        }
        let (cfg, call, kick) = {
            let vq = if q % 2 == RX_QUEUE {
                &self.rx
            } else {
                &self.tx
            };
            (vq.config_data(&self.mem), &vq.call, &vq.kick)
        };
        self.vu
            .set_vring_addr(q, &cfg)
            .map_err(err("SET_VRING_ADDR"))?;
        self.vu
            .set_vring_base(q, base)
            .map_err(err("SET_VRING_BASE"))?;
        self.vu
            .set_vring_call(q, call)
            .map_err(err("SET_VRING_CALL"))?;
        self.vu
            .set_vring_kick(q, kick)
            .map_err(err("SET_VRING_KICK"))?;
        self.handshake_log.push(format!(
            "vring {q}: NUM {} ADDR BASE {base} CALL KICK",
            self.opts.queue_size
        ));
        Ok(())
    }

    /// SET_VRING_ENABLE for both queues (only with VHOST_USER_F_PROTOCOL_FEATURES acked).
    pub fn enable_vrings(&mut self, enable: bool) -> Result<(), String> {
        if self.backend_acked & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let pairs = self
                .opts
                .enabled_pairs
                .map_or(self.pairs(), |n| (n as usize).min(self.pairs()));
            for q in 0..2 * pairs {
                self.vu
                    .set_vring_enable(q, enable)
                    .map_err(err("SET_VRING_ENABLE"))?;
            }
            self.handshake_log
                .push(format!("SET_VRING_ENABLE 0..{} {enable}", 2 * pairs));
        }
        Ok(())
    }

    /// Stops queue `q` like a VMM does on VM stop: optionally SET_VRING_ENABLE 0 first, then
    /// GET_VRING_BASE. Returns the base (the device's next available index).
    pub fn stop_vring(&mut self, q: usize, disable_first: bool) -> Result<u32, String> {
        if disable_first {
            self.vu
                .set_vring_enable(q, false)
                .map_err(err("SET_VRING_ENABLE false"))?;
        }
        self.vu.get_vring_base(q).map_err(err("GET_VRING_BASE"))
    }

    /// Starts both rings again where they stopped (the VM resumes): the same rings, the bases
    /// GET_VRING_BASE returned, call and kick again (the backend let go of them), enable.
    pub fn resume_vrings(&mut self, rx_base: u32, tx_base: u32) -> Result<(), String> {
        for (q, base) in [(RX_QUEUE, rx_base), (TX_QUEUE, tx_base)] {
            self.vu
                .set_vring_num(q, self.opts.queue_size)
                .map_err(err("SET_VRING_NUM"))?;
            self.setup_vring(q, base as u16)?;
        }
        self.enable_vrings(true)
    }

    /// Starts both rings afresh, as a rebooted guest's driver does after the VMM stopped them:
    /// new zeroed rings, RX buffers posted again, bases 0. Frames not yet read are forgotten.
    pub fn restart_vrings_fresh(&mut self) -> Result<(), String> {
        let qs = self.opts.queue_size;
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        self.rx = SplitQueue::new(&mut self.mem, RX_QUEUE, qs);
        self.tx = SplitQueue::new(&mut self.mem, TX_QUEUE, qs);
        for vq in [&mut self.rx, &mut self.tx] {
            vq.event_idx = event_idx;
            vq.always_kick = self.opts.always_kick;
        }
        self.rx_pending.clear();
        let max_bufs = qs / self.opts.rx_descs_per_buf.max(1);
        let nbufs = self.opts.rx_buffers.unwrap_or(max_bufs).min(max_bufs);
        for k in 0..nbufs {
            self.post_rx_buffer(k as u64);
        }
        self.rx.kick.write(1).map_err(err("RX kick"))?;
        for q in [RX_QUEUE, TX_QUEUE] {
            self.vu.set_vring_num(q, qs).map_err(err("SET_VRING_NUM"))?;
            self.setup_vring(q, 0)?;
        }
        self.enable_vrings(true)
    }

    pub fn mrg_rxbuf(&self) -> bool {
        self.backend_acked & VIRTIO_NET_F_MRG_RXBUF != 0
    }

    pub fn hdr_len(&self) -> usize {
        if self.backend_acked & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) != 0 {
            12
        } else {
            10
        }
    }

    /// The MAC the guest should use: config space if available, else the fallback.
    pub fn guest_mac(&self) -> [u8; 6] {
        match self.config {
            Some(c) => c.mac,
            None => self.opts.fallback_mac,
        }
    }

    /// MTU from config space (if MTU was negotiated), else 1500.
    pub fn mtu(&self) -> u16 {
        match self.config {
            Some(c) if self.acked_features & VIRTIO_NET_F_MTU != 0 && c.mtu != 0 => c.mtu,
            _ => 1500,
        }
    }

    // ---- RX ------------------------------------------------------------------------------------

    fn rx_buf_addr(&self, tag: u64, part: u16) -> GuestAddress {
        let per = self.opts.rx_descs_per_buf as u64 * self.opts.rx_buf_size as u64;
        self.rx_area
            .unchecked_add(tag * per + part as u64 * self.opts.rx_buf_size as u64)
    }

    fn post_rx_buffer(&mut self, tag: u64) {
        let segs: Vec<Seg> = (0..self.opts.rx_descs_per_buf)
            .map(|p| Seg {
                addr: self.rx_buf_addr(tag, p),
                len: self.opts.rx_buf_size,
                write: true,
            })
            .collect();
        // Poison the buffer so stale bytes cannot pass for data.
        for s in &segs {
            self.mem.fill(s.addr, s.len as usize, 0xee);
        }
        self.rx
            .add_chain(&segs, tag)
            .expect("RX ring has room for a reposted buffer");
    }

    /// Copies out the `len` bytes the device wrote into RX buffer `tag`.
    fn read_rx_buffer(&self, tag: u64, len: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        let mut left = len as usize;
        let mut p = 0;
        while left > 0 {
            let n = left.min(self.opts.rx_buf_size as usize);
            out.extend(self.mem.read(self.rx_buf_addr(tag, p), n));
            left -= n;
            p += 1;
        }
        out
    }

    /// Moves every complete frame from the RX used ring to the pending queue, reposting buffers.
    /// Returns the number of frames moved.
    pub fn poll_rx(&mut self) -> usize {
        let mut frames = self.poll_rx_here();
        for pair in 1..self.pairs() {
            frames += self.with_pair(pair, |fe| fe.poll_rx_here());
        }
        frames
    }

    /// [`poll_rx`](Self::poll_rx) for the pair in `rx`.
    fn poll_rx_here(&mut self) -> usize {
        let before = self.rx_pending.len();
        let frames = self.poll_rx_ring();
        let pair = self.active;
        if let Some(n) = self.stats.rx_frames_by_pair.get_mut(pair) {
            *n += frames as u64;
        }
        if let Some(observe) = self.rx_observer.as_mut() {
            for (_, f) in self.rx_pending.iter().skip(before) {
                observe(pair, f);
            }
        }
        frames
    }

    fn poll_rx_ring(&mut self) -> usize {
        let hl = self.hdr_len();
        let mut frames = 0;
        let mut reposted = false;
        while let Some((e, fl)) = self.rx.pop_used() {
            self.stats.rx_buffers_used += 1;
            assert!(
                e.len as usize >= hl,
                "device bug: RX used len {} shorter than the {}-byte header",
                e.len,
                hl
            );
            let data = self.read_rx_buffer(fl.tag, e.len);
            self.post_rx_buffer(fl.tag);
            reposted = true;
            let hdr = NetHdr::parse(&data[..hl]);
            let nbuf = if self.mrg_rxbuf() { hdr.num_buffers } else { 1 };
            assert!(nbuf >= 1, "device bug: num_buffers 0 in RX header {hdr:?}");
            if hdr.gso_type != 0 {
                self.stats.rx_nonzero_gso += 1;
                let acked = match hdr.gso_type {
                    1 => self.acked_features & VIRTIO_NET_F_GUEST_TSO4 != 0,
                    4 => self.acked_features & VIRTIO_NET_F_GUEST_TSO6 != 0,
                    _ => false,
                };
                assert!(acked, "device bug: GSO type the guest did not ack: {hdr:?}");
                assert!(
                    hdr.gso_size > 0,
                    "device bug: GSO without gso_size: {hdr:?}"
                );
                self.stats.rx_largest_gso_size = self.stats.rx_largest_gso_size.max(hdr.gso_size);
            }
            let mut frame = data[hl..].to_vec();
            for k in 1..nbuf {
                if self.rx.used_pending() == 0 {
                    // A guest (Linux) would drop the frame here ("rx error: buffers missing").
                    self.stats.rx_partial_merge += 1;
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while self.rx.used_pending() == 0 {
                        assert!(
                            Instant::now() < deadline,
                            "device bug: frame announced {nbuf} buffers, only {k} arrived"
                        );
                        std::thread::yield_now();
                    }
                }
                let (e2, fl2) = self.rx.pop_used().unwrap();
                self.stats.rx_buffers_used += 1;
                frame.extend(self.read_rx_buffer(fl2.tag, e2.len));
                self.post_rx_buffer(fl2.tag);
            }
            if nbuf > 1 {
                self.stats.rx_merged_frames += 1;
            }
            if hdr.flags & NET_HDR_F_NEEDS_CSUM != 0 {
                assert!(
                    self.acked_features & VIRTIO_NET_F_GUEST_CSUM != 0,
                    "device bug: NEEDS_CSUM without GUEST_CSUM: {hdr:?}"
                );
                assert!(
                    complete_checksum(&mut frame, hdr.csum_start, hdr.csum_offset),
                    "device bug: NEEDS_CSUM at {}+{} of a {}-byte frame",
                    hdr.csum_start,
                    hdr.csum_offset,
                    frame.len()
                );
                self.stats.rx_needs_csum += 1;
            }
            if hdr.gso_type == 0 && frame.len() > 14 + usize::from(self.mtu()) {
                panic!(
                    "device bug: a {}-byte frame without GSO above the MTU {}",
                    frame.len(),
                    self.mtu()
                );
            }
            self.stats.rx_largest_frame = self.stats.rx_largest_frame.max(frame.len());
            self.stats.rx_frames += 1;
            self.last_rx_hdr = Some(hdr);
            self.rx_pending.push_back((hdr, frame));
            frames += 1;
        }
        if reposted {
            self.rx.kick_if_needed();
        }
        frames
    }

    /// Next received frame (without the virtio-net header) if one is already there.
    pub fn try_recv_frame(&mut self) -> Option<Vec<u8>> {
        self.try_recv_frame_hdr().map(|(_, f)| f)
    }

    pub fn try_recv_frame_hdr(&mut self) -> Option<(NetHdr, Vec<u8>)> {
        if self.rx_pending.is_empty() {
            self.poll_rx();
        }
        self.rx_pending.pop_front()
    }

    /// Waits (on the call eventfds) until a frame arrives or `deadline` passes.
    pub fn recv_frame(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        loop {
            self.reclaim_tx();
            if let Some(f) = self.try_recv_frame() {
                return Some(f);
            }
            if !self.wait(Some(deadline)) && Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Receives frames until `pred` accepts one (others are dropped) or the deadline passes.
    pub fn recv_matching(
        &mut self,
        deadline: Instant,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        while let Some(f) = self.recv_frame(deadline) {
            if pred(&f) {
                return Some(f);
            }
        }
        None
    }

    /// Frames already pulled off the ring but not consumed.
    pub fn pending_frames(&self) -> usize {
        self.rx_pending.len()
    }

    // ---- waiting ---------------------------------------------------------------------------------

    /// Blocks until netfence publishes another RX used element (whether or not earlier ones
    /// were taken), or `deadline` passes; returns whether it did.
    pub fn wait_rx_progress(&mut self, deadline: Instant) -> bool {
        loop {
            let seen = self.rx.enable_calls_after_published();
            if self.rx.used_idx() != seen {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let timeout_ms = (deadline - now)
                .as_micros()
                .div_ceil(1000)
                .min(i32::MAX as u128);
            let mut fd = libc::pollfd {
                fd: self.rx.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut fd, 1, timeout_ms as i32) };
            if r > 0 {
                self.rx.drain_call();
            }
            if self.rx.used_idx() != seen {
                return true;
            }
        }
    }

    /// Enables calls on both queues and blocks in poll(2) on their call eventfds until one fires
    /// or `deadline` passes (None = forever). Returns true if there may be work (a call fired or
    /// used entries were already pending).
    pub fn wait(&mut self, deadline: Option<Instant>) -> bool {
        let mut pending_rx = self.rx.enable_calls();
        let mut pending_tx = self.tx.enable_calls();
        for p in &mut self.others {
            pending_rx |= p.rx.enable_calls();
            pending_tx |= p.tx.enable_calls();
        }
        // Frames already pulled off the ring only count as work if they could be answered.
        let frames_ready = !self.rx_pending.is_empty()
            && self.tx.num_free() >= self.tx_descs_needed(self.mtu() as usize + 14);
        if pending_rx || pending_tx || frames_ready {
            return true;
        }
        let timeout_ms: i32 = match deadline {
            None => -1,
            Some(d) => {
                let now = Instant::now();
                if d <= now {
                    return false;
                }
                // Round up so a sub-millisecond remainder does not spin.
                let us = (d - now).as_micros();
                us.div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        let mut fds = vec![
            libc::pollfd {
                fd: self.rx.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.tx.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        for p in &self.others {
            for fd in [p.rx.call.as_raw_fd(), p.tx.call.as_raw_fd()] {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        for &fd in &self.extra_wait_fds {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "poll: {e}");
            return true;
        }
        if self.rx.drain_call() > 0 {
            self.stats.calls_seen += 1;
        }
        if self.tx.drain_call() > 0 {
            self.stats.calls_seen += 1;
        }
        for p in &mut self.others {
            if p.rx.drain_call() + p.tx.drain_call() > 0 {
                self.stats.calls_seen += 1;
            }
        }
        r > 0
    }

    /// Extra fds a caller may want to poll together with the call eventfds.
    pub fn call_fds(&self) -> [i32; 2] {
        [self.rx.call.as_raw_fd(), self.tx.call.as_raw_fd()]
    }

    // ---- TX ------------------------------------------------------------------------------------

    /// Frees TX chains the device has consumed. Returns how many came back.
    pub fn reclaim_tx(&mut self) -> usize {
        let mut n = self.reclaim_tx_here();
        if self.active == 0 {
            for pair in 1..self.pairs() {
                n += self.with_pair(pair, |fe| fe.reclaim_tx_here());
            }
        }
        n
    }

    fn reclaim_tx_here(&mut self) -> usize {
        let mut n = 0;
        while let Some((_, fl)) = self.tx.pop_used() {
            if fl.tag & TAG_BAD != 0 {
                self.stats.tx_bad_chains_returned += 1;
            } else {
                self.stats.tx_completed += 1;
            }
            n += 1;
        }
        n
    }

    fn tx_descs_needed(&self, frame_len: usize) -> usize {
        let c = self.opts.tx_chunk as usize;
        if self.opts.tx_split_header {
            1 + frame_len.div_ceil(c).max(1)
        } else {
            (NET_HDR_LEN + frame_len).div_ceil(c)
        }
    }

    /// Is there room in the TX ring for a frame of `frame_len` bytes (after reclaiming)?
    pub fn tx_has_room(&mut self, frame_len: usize) -> bool {
        self.reclaim_tx();
        let needed = self.tx_descs_needed(frame_len);
        self.tx.num_free() >= needed
            && (self.active != 0 || self.others.iter().all(|p| p.tx.num_free() >= needed))
    }

    /// Queues one frame (header prepended) if the ring has room; kicks as the device asks.
    pub fn try_send_frame(&mut self, frame: &[u8]) -> bool {
        self.try_send_frame_with(&NetHdr::default(), frame)
    }

    /// Like [`try_send_frame`](Self::try_send_frame) with `hdr` as the virtio-net header.
    pub fn try_send_frame_with(&mut self, hdr: &NetHdr, frame: &[u8]) -> bool {
        if self.active == 0 {
            if let Some(steer) = self.tx_steer.as_mut() {
                let pair = steer(frame).min(self.pairs() - 1);
                if pair != 0 {
                    return self.with_pair(pair, |fe| fe.try_send_frame_with(hdr, frame));
                }
            }
        }
        let hl = self.hdr_len();
        if !self.tx_has_room(frame.len()) {
            return false;
        }
        let mut hdr = hdr.to_bytes();
        hdr[10..12].fill(0); // num_buffers is unused on TX
        self.publish_tx(&hdr[..hl], frame, 0);
        self.stats.tx_frames += 1;
        if let Some(n) = self.stats.tx_frames_by_pair.get_mut(self.active) {
            *n += 1;
        }
        self.tx.kick_if_needed();
        true
    }

    /// Queues one frame, waiting up to 5 s for room in the TX ring. Panics if there never is.
    pub fn send_frame(&mut self, frame: &[u8]) {
        self.send_frame_here(frame)
    }

    fn send_frame_here(&mut self, frame: &[u8]) {
        let needed = self.tx_descs_needed(frame.len());
        assert!(
            needed <= self.opts.queue_size as usize,
            "frame of {} bytes needs {needed} descriptors, ring has {}",
            frame.len(),
            self.opts.queue_size
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.try_send_frame(frame) {
            if !self.wait(Some(deadline)) && Instant::now() >= deadline {
                panic!(
                    "TX ring stayed full for 5 s ({} in flight): the device does not consume TX",
                    self.tx.num_in_flight()
                );
            }
        }
    }

    /// Publishes all of `frames` and kicks once at the end, so that the device finds them in
    /// one TX drain (the ring must have room for all of them).
    pub fn send_burst(&mut self, frames: &[Vec<u8>]) {
        let needed: usize = frames.iter().map(|f| self.tx_descs_needed(f.len())).sum();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.tx_has_room_for(needed) {
            if !self.wait(Some(deadline)) && Instant::now() >= deadline {
                panic!("TX ring has no room for a burst of {} frames", frames.len());
            }
        }
        let hdr = [0u8; NET_HDR_LEN];
        let hl = self.hdr_len();
        for f in frames {
            self.publish_tx(&hdr[..hl], f, 0);
            self.stats.tx_frames += 1;
        }
        self.tx.kick_if_needed();
    }

    fn tx_has_room_for(&mut self, descriptors: usize) -> bool {
        self.reclaim_tx();
        self.tx.num_free() >= descriptors
    }

    /// Writes header + frame into TX chunks of freshly allocated descriptors and publishes.
    fn publish_tx(&mut self, hdr: &[u8], frame: &[u8], tag: u64) -> u16 {
        let c = self.opts.tx_chunk as usize;
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        if self.opts.tx_split_header {
            pieces.push(hdr.to_vec());
            if frame.is_empty() {
                // keep at least one data descriptor shape consistent with tx_descs_needed
                pieces.push(Vec::new());
            }
            for ch in frame.chunks(c) {
                pieces.push(ch.to_vec());
            }
        } else {
            let mut all = hdr.to_vec();
            all.extend_from_slice(frame);
            for ch in all.chunks(c) {
                pieces.push(ch.to_vec());
            }
        }
        let ids = self.tx.alloc_descs(pieces.len()).expect("checked room");
        for (k, (p, &id)) in pieces.iter().zip(&ids).enumerate() {
            let addr = self.tx_area.unchecked_add(id as u64 * c as u64);
            self.mem.write(addr, p);
            let last = k + 1 == ids.len();
            self.tx.write_desc(
                id,
                Desc {
                    addr: addr.raw_value(),
                    len: p.len() as u32,
                    flags: if last { 0 } else { VIRTQ_DESC_F_NEXT },
                    next: if last { 0 } else { ids[k + 1] },
                },
            );
        }
        self.tx.publish_raw(ids, 0, tag)
    }

    /// Sends raw bytes as the *whole* chain content (no header added): for frames whose
    /// virtio-net header is itself wrong.
    pub fn send_raw_chain_bytes(&mut self, bytes: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.tx_has_room(bytes.len().saturating_sub(NET_HDR_LEN)) {
            if !self.wait(Some(deadline)) && Instant::now() >= deadline {
                panic!("TX ring stayed full for 5 s");
            }
        }
        let hl = bytes.len().min(self.hdr_len());
        self.publish_tx(&bytes[..hl], &bytes[hl..], TAG_BAD);
        self.stats.tx_bad_chains_sent += 1;
        self.tx.kick_if_needed();
    }

    /// Publishes a malformed TX chain of the given shape and kicks. The device should count and
    /// drop it (and ideally still return it in the used ring).
    pub fn send_bad_chain(&mut self, kind: BadChain) {
        let frame = super::frames::garbage_ethernet(self.guest_mac(), 60);
        self.send_bad_chain_carrying(kind, &frame);
    }

    /// Chain shapes that can carry a complete frame in their readable part; if the device
    /// delivered such a frame it would have used a chain it should have dropped.
    pub const CARRYING: [BadChain; 7] = [
        BadChain::StraddlesEnd,
        BadChain::Loop,
        BadChain::SelfLoop,
        BadChain::NextOutOfRange,
        BadChain::WriteOnlyOnTx,
        BadChain::IndirectBadLen,
        BadChain::HugeLength,
    ];

    /// Like [`send_bad_chain`](Self::send_bad_chain), with `frame` (header prepended) as the
    /// bytes of the chain's first (readable) buffer where the shape allows it.
    pub fn send_bad_chain_carrying(&mut self, kind: BadChain, frame: &[u8]) {
        self.reclaim_tx();
        let qs = self.opts.queue_size;
        let end = self.mem.end().raw_value();
        let good = self.scratch;
        let mut bytes = vec![0u8; self.hdr_len()];
        bytes.extend_from_slice(frame);
        let blen = bytes.len() as u32;
        assert!(
            bytes.len() <= 32 << 10,
            "frame too large for the scratch area"
        );
        self.mem.write(good, &bytes);
        let d = |addr: u64, len: u32, flags: u16, next: u16| Desc {
            addr,
            len,
            flags,
            next,
        };
        let need = match kind {
            BadChain::Loop | BadChain::HugeLength => 2,
            _ => 1,
        };
        let ids = self
            .tx
            .alloc_descs(need)
            .expect("free TX descriptors for a bad chain");
        let g = good.raw_value();
        match kind {
            BadChain::OutsideMemory => {
                self.tx.write_desc(ids[0], d(end + (1 << 30), 1500, 0, 0));
            }
            BadChain::StraddlesEnd => {
                // The frame sits in the last bytes of guest memory; the buffer runs past the end.
                let at = end - 512;
                assert!(blen <= 512, "frame too large for StraddlesEnd");
                self.mem.write(GuestAddress(at), &bytes);
                self.tx.write_desc(ids[0], d(at, 4096, 0, 0));
            }
            BadChain::Loop => {
                self.tx
                    .write_desc(ids[0], d(g, blen, VIRTQ_DESC_F_NEXT, ids[1]));
                self.tx
                    .write_desc(ids[1], d(g, blen, VIRTQ_DESC_F_NEXT, ids[0]));
            }
            BadChain::SelfLoop => {
                self.tx
                    .write_desc(ids[0], d(g, blen, VIRTQ_DESC_F_NEXT, ids[0]));
            }
            BadChain::TooShort => {
                self.tx.write_desc(ids[0], d(g, 4, 0, 0));
            }
            BadChain::ZeroLength => {
                self.tx.write_desc(ids[0], d(g, 0, 0, 0));
            }
            BadChain::HeaderOnly => {
                self.tx
                    .write_desc(ids[0], d(g, self.hdr_len() as u32, 0, 0));
            }
            BadChain::NextOutOfRange => {
                self.tx
                    .write_desc(ids[0], d(g, blen, VIRTQ_DESC_F_NEXT, qs + 7));
            }
            BadChain::WriteOnlyOnTx => {
                self.tx
                    .write_desc(ids[0], d(g, blen, VIRTQ_DESC_F_WRITE, 0));
            }
            BadChain::IndirectOutside => {
                self.tx.write_desc(
                    ids[0],
                    d(end + (1 << 20), 32, super::virtq::VIRTQ_DESC_F_INDIRECT, 0),
                );
            }
            BadChain::IndirectBadLen => {
                // A valid first entry pointing at the frame, but a table length that is not a
                // multiple of 16.
                let table = self.scratch.unchecked_add(64 << 10);
                let mut t = vec![0u8; 32];
                t[0..8].copy_from_slice(&g.to_le_bytes());
                t[8..12].copy_from_slice(&blen.to_le_bytes());
                self.mem.write(table, &t);
                self.tx.write_desc(
                    ids[0],
                    d(
                        table.raw_value(),
                        17,
                        super::virtq::VIRTQ_DESC_F_INDIRECT,
                        0,
                    ),
                );
            }
            BadChain::HugeLength => {
                self.tx
                    .write_desc(ids[0], d(g, blen, VIRTQ_DESC_F_NEXT, ids[1]));
                self.tx.write_desc(ids[1], d(g, 0xffff_fff0, 0, 0));
            }
        }
        self.tx.publish_raw(ids, 0, TAG_BAD);
        self.stats.tx_bad_chains_sent += 1;
        self.tx.kick_if_needed();
    }

    /// Waits until every TX chain we published came back (or the deadline passes). Returns
    /// true if the TX ring is empty of in-flight chains.
    pub fn wait_tx_drained(&mut self, deadline: Instant) -> bool {
        loop {
            self.reclaim_tx();
            if self.tx.num_in_flight() == 0 {
                return true;
            }
            if !self.wait(Some(deadline)) && Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// One line of ring state, for failure messages.
    pub fn debug_state(&self) -> String {
        let q = |v: &SplitQueue| {
            format!(
                "avail_idx={} used_idx={} last_used={} in_flight={} avail_event={} used_flags={:#x} kicks={} suppressed={}",
                v.next_avail,
                v.used_idx(),
                v.last_used,
                v.num_in_flight(),
                v.avail_event(),
                v.used_flags(),
                v.kicks,
                v.kicks_suppressed
            )
        };
        format!(
            "RX[{}] TX[{}] pending_frames={} stats={:?}",
            q(&self.rx),
            q(&self.tx),
            self.rx_pending.len(),
            self.stats
        )
    }

    /// Stops the device the way QEMU does on VM stop: disable and fetch each vring's base.
    pub fn stop(&mut self) -> Result<(u32, u32), String> {
        for q in [RX_QUEUE, TX_QUEUE] {
            self.vu
                .set_vring_enable(q, false)
                .map_err(err("SET_VRING_ENABLE false"))?;
        }
        let rx = self.stop_vring(RX_QUEUE, false)?;
        let tx = self.stop_vring(TX_QUEUE, false)?;
        Ok((rx, tx))
    }

    /// Writes header + `frame` into the scratch area once and returns where and how long, for
    /// chains that all carry the same frame (see [`flood_tx`]).
    pub fn stage_tx_frame(&mut self, frame: &[u8]) -> (GuestAddress, u32) {
        let mut bytes = vec![0u8; self.hdr_len()];
        bytes.extend_from_slice(frame);
        // The second half of the scratch area; the first is for bad chains and indirect tables.
        let at = self.scratch.unchecked_add(128 << 10);
        assert!(bytes.len() <= 64 << 10, "frame too large to stage");
        self.mem.write(at, &bytes);
        (at, bytes.len() as u32)
    }

    /// Runs `control` (with the control channel and the RX queue) while another thread floods
    /// the TX ring with `frame` (see [`flood_tx`]); `control` starts once the device has taken
    /// `under_way` chains, and the flood stops when it returns (or panics). Fails if the flood
    /// never got under way within 5 s.
    pub fn during_tx_flood<R: Send>(
        &mut self,
        frame: &[u8],
        under_way: u64,
        control: impl FnOnce(&mut VuFrontend, &mut SplitQueue) -> R + Send,
    ) -> Result<(R, FloodStats), String> {
        /// Raises the stop flag when dropped, also while unwinding: the flood thread must
        /// never outlive a failure in the scope that waits for it.
        struct RaiseOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for RaiseOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let (addr, len) = self.stage_tx_frame(frame);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (vu, tx, rx) = (&mut self.vu, &mut self.tx, &mut self.rx);
        std::thread::scope(|s| {
            let raise = RaiseOnDrop(&stop);
            let flooder = s.spawn(|| flood_tx(tx, addr, len, &stop, started_tx, under_way));
            if started_rx.recv_timeout(Duration::from_secs(5)).is_err() {
                return Err(format!(
                    "the device did not take {under_way} chains of the flood within 5 s"
                ));
            }
            let r = control(vu, rx);
            drop(raise);
            let flood = flooder.join().map_err(|_| "flood thread panicked")?;
            Ok((r, flood))
        })
    }

    /// Publishes one single-descriptor TX chain over `len` bytes at guest address `addr` (which
    /// may lie outside `self.mem`, e.g. in a hot-added region) and kicks. With `bad`, the chain
    /// is expected back unused (counted as a bad chain sent).
    pub fn publish_tx_at(&mut self, addr: GuestAddress, len: u32, bad: bool) {
        self.publish_tx_at_quietly(addr, len, bad);
        self.tx.kick_if_needed();
    }

    /// [`Frontend::publish_tx_at`] without a kick: the device finds the chain only when it next
    /// looks at the ring for another reason.
    pub fn publish_tx_at_quietly(&mut self, addr: GuestAddress, len: u32, bad: bool) {
        self.reclaim_tx();
        let ids = self.tx.alloc_descs(1).expect("a free TX descriptor");
        self.tx.write_desc(
            ids[0],
            Desc {
                addr: addr.raw_value(),
                len,
                flags: 0,
                next: 0,
            },
        );
        if bad {
            self.tx.publish_raw(ids, 0, TAG_BAD);
            self.stats.tx_bad_chains_sent += 1;
        } else {
            self.tx.publish_raw(ids, 0, 0);
            self.stats.tx_frames += 1;
        }
    }

    /// Closes the vhost-user connection (the VMM went away).
    pub fn disconnect(self) {
        drop(self);
    }
}
