//! Reassembly of the guest's IPv4 and IPv6 fragments, so that policy judges whole datagrams.
//!
//! A guest that sends a UDP datagram larger than the link MTU fragments it. The classifier
//! cannot judge a fragment (only the first carries the transport header, and a later one could
//! overwrite it), so the link hands every fragment ([`is_fragment`]) to a per-link
//! [`Reassembler`] and classifies only what comes back as [`Reassembly::Complete`]: an ordinary,
//! unfragmented Ethernet frame, judged and checksummed like any other.
//!
//! Theory of operation:
//! - A datagram is keyed as RFC 791 and RFC 8200 say: IPv4 (source, destination, protocol,
//!   identification), IPv6 (source, destination, identification). Fragments of different keys
//!   never mix. The reassembled packet keeps the offset-0 fragment's Ethernet and IP headers
//!   (IPv4 options included; for IPv6 the Fragment header is removed and its next header takes
//!   its place). Transport checksums are left alone: the classifier verifies them over the
//!   whole datagram, so a fragment that was altered fails there.
//! - Any byte covered twice, even with identical data, drops the whole datagram (RFC 5722 for
//!   IPv6, and the same for IPv4): overlaps are how a transport header is rewritten behind a
//!   filter's back, and no honest sender produces them. An exact duplicate fragment is treated
//!   as an overlap too (the simplest safe rule; a duplicate only appears when a network
//!   duplicates frames, and the virtio link does not). The key of a dropped datagram is then
//!   remembered until its deadline in a short bounded list, so that its later fragments are
//!   dropped at once instead of opening a new reassembly that could never complete. This memo
//!   is an economy, not a safety property: a reassembly started afresh must still cover every
//!   byte exactly once before anything is judged.
//! - IPv6 atomic fragments (offset 0, M clear; RFC 6946) come back complete at once and never
//!   touch the state. A fragment header inside a reassembled IPv6 packet is refused, so what
//!   comes back is never a fragment again.
//!
//! Bounds (all in [`ReassemblyLimits`]): at most `max_datagrams` datagrams in progress, at most
//! `max_bytes` of fragment data and kept headers buffered across them, at most
//! `max_fragments` pieces per datagram (each piece is at least 8 bytes, and the per-fragment
//! work is a binary search and an insert into at most that many pieces), and each datagram
//! lives at most `timeout` from its first fragment. When a new datagram or fragment does not
//! fit, the datagram with the earliest deadline (the oldest) is evicted. Refusing the newcomer
//! instead would let a flood of never-completing datagrams hold every slot: an honest
//! datagram would be refused for as long as the flood goes on. With eviction, an honest
//! datagram whose fragments arrive back to back (as a guest's do, in one TX burst) completes
//! unless `max_datagrams` other new datagrams start in between, and the flood itself gains
//! nothing: memory and time stay bounded either way. Every operation is O(`max_datagrams` +
//! `max_fragments`), both meant to be tens.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6FragmentHeader, Ipv6Packet,
};

const ETHERNET_HEADER_LEN: usize = 14;
const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const FRAGMENT_HEADER_LEN: usize = 8;
/// IPv6 next header value of the Fragment header.
const NEXT_HEADER_FRAGMENT: u8 = 44;
/// The largest IPv4 total length and IPv6 payload length (no jumbograms).
const MAX_IP_LENGTH: usize = 65535;
/// A longer timeout is treated as this one (keeps deadline arithmetic in range).
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Bounds of one link's reassembly state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Datagrams being reassembled at once. 0 turns reassembly off (every fragment but an IPv6
    /// atomic one is dropped as [`FragmentDrop::BufferFull`]).
    pub max_datagrams: usize,
    /// Bytes buffered across them: fragment data plus the kept Ethernet and IP header.
    pub max_bytes: usize,
    /// Fragments (pieces) held for one datagram.
    pub max_fragments: usize,
    /// How long a datagram may take to complete, from its first fragment (at most an hour).
    pub timeout: Duration,
}

impl Default for ReassemblyLimits {
    /// 16 datagrams, 256 KiB, 64 fragments each (a 64 KiB datagram at a 1280-byte MTU needs 53),
    /// 5 seconds: shorter than RFC 791/8200's 15-60 s, since the guest's fragments arrive in
    /// one burst over a virtio ring, not across a lossy path.
    fn default() -> Self {
        ReassemblyLimits {
            max_datagrams: 16,
            max_bytes: 256 * 1024,
            max_fragments: 64,
            timeout: Duration::from_secs(5),
        }
    }
}

/// What became of one pushed fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Reassembly {
    /// The datagram is whole: an Ethernet frame with an unfragmented IP packet, for the
    /// classifier.
    Complete(Vec<u8>),
    /// Kept; the datagram is still missing pieces.
    Pending,
    /// Dropped, for this reason.
    Dropped(FragmentDrop),
}

/// Why a fragment or a datagram was dropped; each has its own counter.
///
/// [`Reassembler::push`] reports all but `Expired` and `Evicted`, which count whole datagrams
/// and come from [`Reassembler::expire`] and [`Reassembler::take_evicted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FragmentDrop {
    /// Not a parsable fragment: truncated headers, wrong version, not a fragment at all, no
    /// data, a length not a multiple of 8 with more fragments to come, or a Fragment header
    /// nested in a fragmented IPv6 packet. Only this fragment is dropped.
    Malformed,
    /// An IPv4 header checksum that does not verify. Only this fragment is dropped.
    BadChecksum,
    /// A byte covered twice (a duplicate fragment included): the datagram is dropped.
    Overlap,
    /// Fragments disagree on where the datagram ends: the datagram is dropped.
    Inconsistent,
    /// The reassembled packet would exceed 65535 bytes of IP length: the datagram is dropped.
    TooLarge,
    /// More than `max_fragments` pieces: the datagram is dropped.
    TooManyFragments,
    /// The datagram does not fit in `max_bytes` even alone (or `max_datagrams` is 0): dropped.
    BufferFull,
    /// A fragment of a datagram dropped earlier (before its deadline).
    AfterDrop,
    /// A datagram that did not complete before its deadline.
    Expired,
    /// A datagram dropped to make room for another.
    Evicted,
}

impl FragmentDrop {
    /// The counter name.
    pub fn as_str(self) -> &'static str {
        match self {
            FragmentDrop::Malformed => "fragment-malformed",
            FragmentDrop::BadChecksum => "fragment-bad-checksum",
            FragmentDrop::Overlap => "fragment-overlap",
            FragmentDrop::Inconsistent => "fragment-inconsistent",
            FragmentDrop::TooLarge => "fragment-too-large",
            FragmentDrop::TooManyFragments => "fragment-too-many",
            FragmentDrop::BufferFull => "fragment-buffer-full",
            FragmentDrop::AfterDrop => "fragment-of-dropped-datagram",
            FragmentDrop::Expired => "fragment-timeout",
            FragmentDrop::Evicted => "fragment-evicted",
        }
    }
}

/// Whether `frame` is an Ethernet frame carrying an IPv4 fragment (MF set or a non-zero
/// offset) or an IPv6 packet whose first next header is Fragment. A cheap look at a few bytes;
/// [`Reassembler::push`] validates the rest.
pub fn is_fragment(frame: &[u8]) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    let ip = &frame[ETHERNET_HEADER_LEN..];
    match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        0x0800 => match (ip.first(), ip.get(6..8)) {
            (Some(version_ihl), Some(flags_offset)) => {
                version_ihl >> 4 == 4 && (flags_offset[0] & 0x3f != 0 || flags_offset[1] != 0)
            }
            _ => false,
        },
        0x86dd => ip.len() >= IPV6_HEADER_LEN && ip[0] >> 4 == 6 && ip[6] == NEXT_HEADER_FRAGMENT,
        _ => false,
    }
}

/// A datagram's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        ident: u16,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ident: u32,
    },
}

impl Key {
    /// The most fragmentable-part bytes a reassembled packet may carry, given the IP header
    /// length of its offset-0 fragment (IPv4 counts the header in its total length).
    fn payload_limit(&self, ip_header_len: Option<usize>) -> usize {
        match self {
            Key::V4 { .. } => MAX_IP_LENGTH - ip_header_len.unwrap_or(IPV4_MIN_HEADER_LEN),
            Key::V6 { .. } => MAX_IP_LENGTH,
        }
    }
}

/// One parsed fragment, borrowing the frame.
struct Fragment<'a> {
    key: Key,
    /// Offset of `data` in the datagram's fragmentable part, in bytes.
    offset: usize,
    more: bool,
    data: &'a [u8],
    /// The Ethernet and IP headers (IPv4 with options; IPv6's fixed header) kept from the
    /// offset-0 fragment.
    head: &'a [u8],
    /// IPv6: the Fragment header's next header. IPv4: the protocol (already in `head`).
    next_header: u8,
}

impl Fragment<'_> {
    fn end(&self) -> usize {
        self.offset + self.data.len()
    }

    fn ip_header_len(&self) -> usize {
        self.head.len() - ETHERNET_HEADER_LEN
    }

    /// Bytes this fragment adds to the buffer.
    fn cost(&self) -> usize {
        self.data.len() + if self.offset == 0 { self.head.len() } else { 0 }
    }
}

fn parse(frame: &[u8]) -> Result<Fragment<'_>, FragmentDrop> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| FragmentDrop::Malformed)?;
    let ip = frame
        .get(ETHERNET_HEADER_LEN..)
        .ok_or(FragmentDrop::Malformed)?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => parse_ipv4(frame, ip),
        EthernetProtocol::Ipv6 => parse_ipv6(frame, ip),
        _ => Err(FragmentDrop::Malformed),
    }
}

fn parse_ipv4<'a>(frame: &'a [u8], ip_bytes: &'a [u8]) -> Result<Fragment<'a>, FragmentDrop> {
    let ip = Ipv4Packet::new_checked(ip_bytes).map_err(|_| FragmentDrop::Malformed)?;
    if ip.version() != 4 {
        return Err(FragmentDrop::Malformed);
    }
    if !ip.verify_checksum() {
        return Err(FragmentDrop::BadChecksum);
    }
    if !ip.more_frags() && ip.frag_offset() == 0 {
        return Err(FragmentDrop::Malformed);
    }
    let header_len = usize::from(ip.header_len());
    let data = ip_bytes
        .get(header_len..usize::from(ip.total_len()))
        .ok_or(FragmentDrop::Malformed)?;
    let head = frame
        .get(..ETHERNET_HEADER_LEN + header_len)
        .ok_or(FragmentDrop::Malformed)?;
    let protocol = u8::from(ip.next_header());
    Ok(Fragment {
        key: Key::V4 {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            protocol,
            ident: ip.ident(),
        },
        offset: usize::from(ip.frag_offset()),
        more: ip.more_frags(),
        data,
        head,
        next_header: protocol,
    })
}

fn parse_ipv6<'a>(frame: &'a [u8], ip_bytes: &'a [u8]) -> Result<Fragment<'a>, FragmentDrop> {
    let ip = Ipv6Packet::new_checked(ip_bytes).map_err(|_| FragmentDrop::Malformed)?;
    if ip.version() != 6 || u8::from(ip.next_header()) != NEXT_HEADER_FRAGMENT {
        return Err(FragmentDrop::Malformed);
    }
    let payload = ip.payload();
    let (fragment_header, data) = (
        payload
            .get(..FRAGMENT_HEADER_LEN)
            .ok_or(FragmentDrop::Malformed)?,
        payload
            .get(FRAGMENT_HEADER_LEN..)
            .ok_or(FragmentDrop::Malformed)?,
    );
    let next_header = fragment_header[0];
    if next_header == NEXT_HEADER_FRAGMENT {
        return Err(FragmentDrop::Malformed);
    }
    // smoltcp's view of the Fragment header starts after its next header and reserved bytes.
    let fields = Ipv6FragmentHeader::new_checked(&fragment_header[2..])
        .map_err(|_| FragmentDrop::Malformed)?;
    let head = frame
        .get(..ETHERNET_HEADER_LEN + IPV6_HEADER_LEN)
        .ok_or(FragmentDrop::Malformed)?;
    Ok(Fragment {
        key: Key::V6 {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            ident: fields.ident(),
        },
        offset: usize::from(fields.frag_offset()) * 8,
        more: fields.more_frags(),
        data,
        head,
        next_header,
    })
}

/// The unfragmented frame: `head` (Ethernet + IP header) followed by `payload_len` bytes of
/// `pieces`, with the IP header fixed up.
fn build_frame<'p>(
    key: &Key,
    head: &[u8],
    next_header: u8,
    payload_len: usize,
    pieces: impl Iterator<Item = &'p [u8]>,
) -> Result<Vec<u8>, FragmentDrop> {
    let mut frame = Vec::with_capacity(head.len() + payload_len);
    frame.extend_from_slice(head);
    for piece in pieces {
        frame.extend_from_slice(piece);
    }
    let ip = frame
        .get_mut(ETHERNET_HEADER_LEN..)
        .ok_or(FragmentDrop::Malformed)?;
    match key {
        Key::V4 { .. } => {
            let ip_header_len = head.len() - ETHERNET_HEADER_LEN;
            let total_len =
                u16::try_from(ip_header_len + payload_len).map_err(|_| FragmentDrop::TooLarge)?;
            if ip_header_len < IPV4_MIN_HEADER_LEN {
                return Err(FragmentDrop::Malformed);
            }
            let mut packet = Ipv4Packet::new_unchecked(ip);
            packet.set_total_len(total_len);
            packet.set_more_frags(false);
            packet.set_frag_offset(0);
            packet.fill_checksum();
        }
        Key::V6 { .. } => {
            let payload_len = u16::try_from(payload_len).map_err(|_| FragmentDrop::TooLarge)?;
            if ip.len() < IPV6_HEADER_LEN {
                return Err(FragmentDrop::Malformed);
            }
            let mut packet = Ipv6Packet::new_unchecked(ip);
            packet.set_payload_len(payload_len);
            packet.set_next_header(IpProtocol::from(next_header));
        }
    }
    Ok(frame)
}

/// A received range of a datagram's fragmentable part.
struct Piece {
    offset: usize,
    data: Vec<u8>,
}

impl Piece {
    fn end(&self) -> usize {
        self.offset + self.data.len()
    }
}

/// One datagram being reassembled.
struct Datagram {
    key: Key,
    deadline: Instant,
    /// Ethernet + IP header of the offset-0 fragment, once it arrived.
    head: Option<Vec<u8>>,
    /// IPv6: the next header of the offset-0 fragment's Fragment header.
    next_header: u8,
    /// Sorted by offset, never overlapping.
    pieces: Vec<Piece>,
    /// Sum of the pieces' lengths.
    received: usize,
    /// Largest end of any piece.
    max_end: usize,
    /// The fragmentable part's length, once the last fragment (MF clear) arrived.
    total: Option<usize>,
    /// What this datagram counts against `max_bytes`.
    bytes: usize,
}

impl Datagram {
    fn new(key: Key, deadline: Instant) -> Self {
        Datagram {
            key,
            deadline,
            head: None,
            next_header: 0,
            pieces: Vec::new(),
            received: 0,
            max_end: 0,
            total: None,
            bytes: 0,
        }
    }

    /// Whether `fragment` may join this datagram; changes nothing. Every error condemns the
    /// whole datagram.
    fn check(&self, fragment: &Fragment<'_>, max_fragments: usize) -> Result<(), FragmentDrop> {
        if self.pieces.len() >= max_fragments {
            return Err(FragmentDrop::TooManyFragments);
        }
        let end = fragment.end();
        let ip_header_len = if fragment.offset == 0 {
            Some(fragment.ip_header_len())
        } else {
            self.head
                .as_ref()
                .map(|head| head.len() - ETHERNET_HEADER_LEN)
        };
        if self.max_end.max(end) > self.key.payload_limit(ip_header_len) {
            return Err(FragmentDrop::TooLarge);
        }
        if !fragment.more {
            // A second last fragment with the same end overlaps the first; the overlap check
            // below names it so.
            if self.total.is_some_and(|total| total != end) || self.max_end > end {
                return Err(FragmentDrop::Inconsistent);
            }
        } else if self.total.is_some_and(|total| end > total) {
            return Err(FragmentDrop::Inconsistent);
        }
        let index = self.pieces.partition_point(|p| p.offset < fragment.offset);
        let overlaps_previous = index
            .checked_sub(1)
            .and_then(|i| self.pieces.get(i))
            .is_some_and(|previous| previous.end() > fragment.offset);
        let overlaps_next = self.pieces.get(index).is_some_and(|next| next.offset < end);
        if overlaps_previous || overlaps_next {
            return Err(FragmentDrop::Overlap);
        }
        Ok(())
    }

    /// Adds a fragment that passed [`Datagram::check`].
    fn insert(&mut self, fragment: &Fragment<'_>) {
        let index = self.pieces.partition_point(|p| p.offset < fragment.offset);
        self.pieces.insert(
            index,
            Piece {
                offset: fragment.offset,
                data: fragment.data.to_vec(),
            },
        );
        self.received += fragment.data.len();
        self.max_end = self.max_end.max(fragment.end());
        self.bytes += fragment.cost();
        if !fragment.more {
            self.total = Some(fragment.end());
        }
        if fragment.offset == 0 {
            self.head = Some(fragment.head.to_vec());
            self.next_header = fragment.next_header;
        }
    }

    /// Pieces never overlap and never pass `total`, so covering `total` bytes means covering
    /// all of them.
    fn is_complete(&self) -> bool {
        self.head.is_some() && self.total == Some(self.received)
    }

    fn assemble(&self) -> Result<Vec<u8>, FragmentDrop> {
        let head = self.head.as_deref().ok_or(FragmentDrop::Malformed)?;
        build_frame(
            &self.key,
            head,
            self.next_header,
            self.received,
            self.pieces.iter().map(|piece| piece.data.as_slice()),
        )
    }
}

/// One link's fragment reassembly state. See the module documentation.
pub struct Reassembler {
    limits: ReassemblyLimits,
    datagrams: Vec<Datagram>,
    /// Sum of the datagrams' `bytes`.
    buffered: usize,
    /// Keys of datagrams dropped before their deadline, with that deadline; at most
    /// `max_datagrams` entries, oldest forgotten first.
    dropped: VecDeque<(Key, Instant)>,
    /// Datagrams timed out and not yet reported by `expire`.
    expired: usize,
    /// Datagrams evicted and not yet reported by `take_evicted`.
    evicted: usize,
}

impl Reassembler {
    /// An empty reassembler bounded by `limits`.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits: ReassemblyLimits {
                timeout: limits.timeout.min(MAX_TIMEOUT),
                ..limits
            },
            datagrams: Vec::new(),
            buffered: 0,
            dropped: VecDeque::new(),
            expired: 0,
            evicted: 0,
        }
    }

    /// The limits in force (the timeout capped at an hour).
    pub fn limits(&self) -> &ReassemblyLimits {
        &self.limits
    }

    /// Takes one frame for which [`is_fragment`] holds: an IPv4 fragment, or an IPv6 packet
    /// whose next header is Fragment right after the fixed header. Datagrams whose deadline
    /// has passed are dropped first (and reported by the next [`Reassembler::expire`]).
    pub fn push(&mut self, frame: &[u8], now: Instant) -> Reassembly {
        self.drop_expired(now);
        let fragment = match parse(frame) {
            Ok(fragment) => fragment,
            Err(reason) => return Reassembly::Dropped(reason),
        };
        if fragment.data.is_empty() || (fragment.more && fragment.data.len() % 8 != 0) {
            return Reassembly::Dropped(FragmentDrop::Malformed);
        }
        let atomic = fragment.offset == 0 && !fragment.more;
        if atomic && matches!(fragment.key, Key::V6 { .. }) {
            return match build_frame(
                &fragment.key,
                fragment.head,
                fragment.next_header,
                fragment.data.len(),
                std::iter::once(fragment.data),
            ) {
                Ok(frame) => Reassembly::Complete(frame),
                Err(reason) => Reassembly::Dropped(reason),
            };
        }
        if self.dropped.iter().any(|(key, _)| *key == fragment.key) {
            return Reassembly::Dropped(FragmentDrop::AfterDrop);
        }
        match self.add(&fragment, now) {
            Ok(Some(frame)) => Reassembly::Complete(frame),
            Ok(None) => Reassembly::Pending,
            Err(reason) => Reassembly::Dropped(reason),
        }
    }

    fn add(
        &mut self,
        fragment: &Fragment<'_>,
        now: Instant,
    ) -> Result<Option<Vec<u8>>, FragmentDrop> {
        let deadline = now.checked_add(self.limits.timeout).unwrap_or(now);
        let mut index = match self.datagrams.iter().position(|d| d.key == fragment.key) {
            Some(index) => {
                if let Err(reason) =
                    self.datagrams[index].check(fragment, self.limits.max_fragments)
                {
                    self.drop_datagram(index);
                    return Err(reason);
                }
                index
            }
            None => {
                let datagram = Datagram::new(fragment.key, deadline);
                if let Err(reason) = datagram.check(fragment, self.limits.max_fragments) {
                    self.remember_dropped(fragment.key, deadline);
                    return Err(reason);
                }
                if self.limits.max_datagrams == 0 || fragment.cost() > self.limits.max_bytes {
                    self.remember_dropped(fragment.key, deadline);
                    return Err(FragmentDrop::BufferFull);
                }
                while self.datagrams.len() >= self.limits.max_datagrams {
                    if !self.evict_oldest_except(None) {
                        break;
                    }
                }
                self.datagrams.push(datagram);
                self.datagrams.len() - 1
            }
        };
        let cost = fragment.cost();
        if self.datagrams[index].bytes + cost > self.limits.max_bytes {
            // Too big even alone: never evict others for it.
            self.drop_datagram(index);
            return Err(FragmentDrop::BufferFull);
        }
        while self.buffered + cost > self.limits.max_bytes {
            let key = self.datagrams[index].key;
            if !self.evict_oldest_except(Some(index)) {
                self.drop_datagram(index);
                return Err(FragmentDrop::BufferFull);
            }
            index = self
                .datagrams
                .iter()
                .position(|d| d.key == key)
                .ok_or(FragmentDrop::BufferFull)?;
        }
        let datagram = &mut self.datagrams[index];
        datagram.insert(fragment);
        self.buffered += cost;
        if !datagram.is_complete() {
            return Ok(None);
        }
        let datagram = self.datagrams.remove(index);
        self.buffered -= datagram.bytes;
        datagram.assemble().map(Some)
    }

    /// Drops the datagram at `index` and remembers its key until its deadline.
    fn drop_datagram(&mut self, index: usize) {
        let datagram = self.datagrams.remove(index);
        self.buffered -= datagram.bytes;
        self.remember_dropped(datagram.key, datagram.deadline);
    }

    /// Evicts the datagram with the earliest deadline other than `keep`; false if there is
    /// none.
    fn evict_oldest_except(&mut self, keep: Option<usize>) -> bool {
        let oldest = self
            .datagrams
            .iter()
            .enumerate()
            .filter(|(index, _)| Some(*index) != keep)
            .min_by_key(|(_, datagram)| datagram.deadline)
            .map(|(index, _)| index);
        match oldest {
            Some(index) => {
                self.drop_datagram(index);
                self.evicted += 1;
                true
            }
            None => false,
        }
    }

    fn remember_dropped(&mut self, key: Key, deadline: Instant) {
        if self.limits.max_datagrams == 0 {
            return;
        }
        while self.dropped.len() >= self.limits.max_datagrams {
            self.dropped.pop_front();
        }
        self.dropped.push_back((key, deadline));
    }

    fn drop_expired(&mut self, now: Instant) {
        let before = self.datagrams.len();
        let mut freed = 0;
        self.datagrams.retain(|datagram| {
            let live = datagram.deadline > now;
            if !live {
                freed += datagram.bytes;
            }
            live
        });
        self.buffered -= freed;
        self.expired += before - self.datagrams.len();
        self.dropped.retain(|(_, deadline)| *deadline > now);
    }

    /// Drops the datagrams whose deadline is `now` or earlier; returns how many timed out since
    /// the last call (including those [`Reassembler::push`] found), for the `Expired` counter.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.drop_expired(now);
        std::mem::take(&mut self.expired)
    }

    /// How many datagrams were evicted to make room since the last call, for the `Evicted`
    /// counter.
    pub fn take_evicted(&mut self) -> usize {
        std::mem::take(&mut self.evicted)
    }

    /// When [`Reassembler::expire`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.datagrams.iter().map(|d| d.deadline).min()
    }

    /// Datagrams in progress.
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// No datagram in progress.
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Bytes held, as counted against `max_bytes`.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }
}

impl Reassembler {
    /// Checks every bound and the bookkeeping the module relies on; panics when one fails.
    /// For tests and the fuzz targets (`crate::fuzzing`), which call it after every step.
    #[doc(hidden)]
    pub fn assert_invariants(&self) {
        let limits = &self.limits;
        assert!(self.datagrams.len() <= limits.max_datagrams);
        assert!(self.buffered <= limits.max_bytes, "{} bytes", self.buffered);
        assert!(self.dropped.len() <= limits.max_datagrams);
        let bytes: usize = self.datagrams.iter().map(|d| d.bytes).sum();
        assert_eq!(bytes, self.buffered);
        for datagram in &self.datagrams {
            assert!(datagram.pieces.len() <= limits.max_fragments);
            assert!(!datagram.pieces.is_empty());
            let received: usize = datagram.pieces.iter().map(|p| p.data.len()).sum();
            assert_eq!(received, datagram.received);
            let head = datagram.head.as_ref().map_or(0, Vec::len);
            assert_eq!(datagram.bytes, received + head);
            for pair in datagram.pieces.windows(2) {
                assert!(pair[0].end() <= pair[1].offset, "pieces overlap");
            }
            let max_end = datagram.pieces.iter().map(Piece::end).max();
            assert_eq!(max_end, Some(datagram.max_end));
            if let Some(total) = datagram.total {
                assert!(datagram.max_end <= total);
                assert!(datagram.received < total, "complete but kept");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::classify::{classify, Classified, DropReason};
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, Ipv6FragmentRepr, UdpPacket, UdpRepr};
    use std::net::IpAddr;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xff, 0xff, 0x01];
    const V4_SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const V4_DST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
    const V4_OTHER_DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
    const V6_SRC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
    const V6_DST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
    const V6_OTHER_DST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
    const UDP: u8 = 17;
    const FLOW_LABEL: u32 = 0x12345;
    const MS: Duration = Duration::from_millis(1);

    fn ethernet(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(ETHERNET_HEADER_LEN + ip.len());
        frame.extend_from_slice(&GATEWAY_MAC);
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(ip);
        frame
    }

    /// A UDP header and `len` bytes of data (a pattern that shifts with `seed`), with the
    /// checksum for `src` -> `dst`.
    fn udp(src: IpAddr, dst: IpAddr, len: usize, seed: u8) -> Vec<u8> {
        let mut bytes = vec![0u8; 8 + len];
        let mut packet = UdpPacket::new_unchecked(&mut bytes[..]);
        let repr = UdpRepr {
            src_port: 40000,
            dst_port: 5353,
        };
        let fill = |payload: &mut [u8]| {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte = (i as u8).wrapping_mul(7).wrapping_add(seed);
            }
        };
        let caps = ChecksumCapabilities::default();
        repr.emit(&mut packet, &src.into(), &dst.into(), len, fill, &caps);
        bytes
    }

    #[allow(clippy::too_many_arguments)]
    fn ipv4_fragment(
        dst: Ipv4Addr,
        protocol: u8,
        ident: u16,
        options: &[u8],
        offset: usize,
        more: bool,
        data: &[u8],
    ) -> Vec<u8> {
        let header_len = IPV4_MIN_HEADER_LEN + options.len();
        let mut ip = vec![0u8; header_len + data.len()];
        ip[IPV4_MIN_HEADER_LEN..header_len].copy_from_slice(options);
        ip[header_len..].copy_from_slice(data);
        let mut packet = Ipv4Packet::new_unchecked(&mut ip[..]);
        packet.set_version(4);
        packet.set_header_len(header_len as u8);
        packet.set_total_len((header_len + data.len()) as u16);
        packet.set_ident(ident);
        packet.clear_flags();
        packet.set_more_frags(more);
        packet.set_frag_offset(offset as u16);
        packet.set_hop_limit(64);
        packet.set_next_header(IpProtocol::from(protocol));
        packet.set_src_addr(V4_SRC);
        packet.set_dst_addr(dst);
        packet.fill_checksum();
        ethernet(0x0800, &ip)
    }

    fn ipv6_fragment(
        dst: Ipv6Addr,
        next_header: u8,
        ident: u32,
        offset: usize,
        more: bool,
        data: &[u8],
    ) -> Vec<u8> {
        let mut ip = vec![0u8; IPV6_HEADER_LEN + FRAGMENT_HEADER_LEN + data.len()];
        let mut packet = Ipv6Packet::new_unchecked(&mut ip[..]);
        packet.set_version(6);
        packet.set_traffic_class(0);
        packet.set_flow_label(FLOW_LABEL);
        packet.set_payload_len((FRAGMENT_HEADER_LEN + data.len()) as u16);
        packet.set_next_header(IpProtocol::Ipv6Frag);
        packet.set_hop_limit(64);
        packet.set_src_addr(V6_SRC);
        packet.set_dst_addr(dst);
        ip[IPV6_HEADER_LEN] = next_header;
        let fields = &mut ip[IPV6_HEADER_LEN + 2..IPV6_HEADER_LEN + FRAGMENT_HEADER_LEN];
        Ipv6FragmentRepr {
            frag_offset: (offset / 8) as u16,
            more_frags: more,
            ident,
        }
        .emit(&mut Ipv6FragmentHeader::new_unchecked(fields));
        ip[IPV6_HEADER_LEN + FRAGMENT_HEADER_LEN..].copy_from_slice(data);
        ethernet(0x86dd, &ip)
    }

    #[derive(Debug, Clone, Copy)]
    enum Family {
        V4,
        V6,
    }

    const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

    impl Family {
        fn addrs(self) -> (IpAddr, IpAddr) {
            match self {
                Family::V4 => (V4_SRC.into(), V4_DST.into()),
                Family::V6 => (V6_SRC.into(), V6_DST.into()),
            }
        }

        fn udp(self, len: usize) -> Vec<u8> {
            let (src, dst) = self.addrs();
            udp(src, dst, len, 3)
        }

        /// A UDP fragment of datagram `ident` to the default destination.
        fn fragment(self, ident: u16, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
            match self {
                Family::V4 => ipv4_fragment(V4_DST, UDP, ident, &[], offset, more, data),
                Family::V6 => ipv6_fragment(V6_DST, UDP, ident.into(), offset, more, data),
            }
        }

        /// `payload` cut into fragments of `size` bytes, in order.
        fn split(self, ident: u16, payload: &[u8], size: usize) -> Vec<Vec<u8>> {
            let chunks: Vec<&[u8]> = payload.chunks(size).collect();
            chunks
                .iter()
                .enumerate()
                .map(|(i, chunk)| self.fragment(ident, i * size, i + 1 < chunks.len(), chunk))
                .collect()
        }
    }

    /// `frame` is the unfragmented datagram carrying `udp`, with verifying checksums.
    fn assert_whole_udp(family: Family, frame: &[u8], udp: &[u8]) {
        assert!(!is_fragment(frame));
        let ip_bytes = &frame[ETHERNET_HEADER_LEN..];
        let (src, dst): (IpAddress, IpAddress) = match family {
            Family::V4 => {
                let ip = Ipv4Packet::new_checked(ip_bytes).expect("IPv4 header");
                assert!(ip.verify_checksum());
                assert!(!ip.more_frags());
                assert_eq!(ip.frag_offset(), 0);
                assert_eq!(ip.next_header(), IpProtocol::Udp);
                assert_eq!(usize::from(ip.total_len()), ip_bytes.len());
                assert_eq!(ip.payload(), udp);
                (ip.src_addr().into(), ip.dst_addr().into())
            }
            Family::V6 => {
                let ip = Ipv6Packet::new_checked(ip_bytes).expect("IPv6 header");
                assert_eq!(ip.next_header(), IpProtocol::Udp);
                assert_eq!(ip.payload_len() as usize, ip_bytes.len() - IPV6_HEADER_LEN);
                assert_eq!(ip.flow_label(), FLOW_LABEL);
                assert_eq!(ip.payload(), udp);
                (ip.src_addr().into(), ip.dst_addr().into())
            }
        };
        let packet = UdpPacket::new_checked(udp).expect("UDP header");
        assert!(packet.verify_checksum(&src, &dst), "UDP checksum");
    }

    fn complete(result: Reassembly) -> Vec<u8> {
        match result {
            Reassembly::Complete(frame) => frame,
            other => panic!("expected a complete datagram, got {other:?}"),
        }
    }

    #[test]
    fn reassembles_in_order_out_of_order_and_reversed() {
        for family in FAMILIES {
            let udp = family.udp(3000);
            let fragments = family.split(7, &udp, 1232);
            assert_eq!(fragments.len(), 3);
            for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
                let now = Instant::now();
                let mut reassembler = Reassembler::new(ReassemblyLimits::default());
                for &i in &order[..2] {
                    assert!(is_fragment(&fragments[i]));
                    assert_eq!(reassembler.push(&fragments[i], now), Reassembly::Pending);
                    reassembler.assert_invariants();
                }
                assert_eq!(reassembler.len(), 1);
                assert!(reassembler.buffered_bytes() >= 1232 * 2 - 688);
                assert_eq!(
                    reassembler.next_deadline(),
                    Some(now + ReassemblyLimits::default().timeout)
                );
                let frame = complete(reassembler.push(&fragments[order[2]], now));
                assert_whole_udp(family, &frame, &udp);
                assert!(reassembler.is_empty(), "{family:?} {order:?}");
                assert_eq!(reassembler.buffered_bytes(), 0);
                assert_eq!(reassembler.next_deadline(), None);
            }
        }
    }

    #[test]
    fn reassembled_datagram_passes_the_classifier() {
        for family in FAMILIES {
            let udp = family.udp(3000);
            let fragments = family.split(9, &udp, 1448);
            assert_eq!(
                classify(&fragments[0]),
                Classified::Drop(DropReason::Fragment)
            );
            let mut reassembler = Reassembler::new(ReassemblyLimits::default());
            let now = Instant::now();
            let mut results: Vec<Reassembly> =
                fragments.iter().map(|f| reassembler.push(f, now)).collect();
            let frame = complete(results.pop().expect("results"));
            match classify(&frame) {
                Classified::Udp { dst, payload, .. } => {
                    assert_eq!(dst, std::net::SocketAddr::new(family.addrs().1, 5353));
                    assert_eq!(payload, &udp[8..]);
                }
                other => panic!("{family:?}: classified as {other:?}"),
            }
        }
    }

    #[test]
    fn ipv4_keeps_the_first_fragments_options() {
        let udp = Family::V4.udp(2000);
        let router_alert = [0x94, 0x04, 0x00, 0x00];
        let first = ipv4_fragment(V4_DST, UDP, 5, &router_alert, 0, true, &udp[..1024]);
        let second = ipv4_fragment(V4_DST, UDP, 5, &[], 1024, false, &udp[1024..]);
        let mut reassembler = Reassembler::new(ReassemblyLimits::default());
        let now = Instant::now();
        assert_eq!(reassembler.push(&second, now), Reassembly::Pending);
        let frame = complete(reassembler.push(&first, now));
        assert_whole_udp(Family::V4, &frame, &udp);
        let ip = Ipv4Packet::new_checked(&frame[ETHERNET_HEADER_LEN..]).expect("IPv4");
        assert_eq!(ip.header_len(), 24);
        assert_eq!(
            &frame[ETHERNET_HEADER_LEN + 20..ETHERNET_HEADER_LEN + 24],
            &router_alert
        );
        assert_eq!(ip.ident(), 5);
        assert_eq!(&frame[..ETHERNET_HEADER_LEN], &first[..ETHERNET_HEADER_LEN]);
    }

    #[test]
    fn fragments_of_different_keys_never_mix() {
        let now = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyLimits::default());
        // IPv4: same identification, but another destination, or another protocol.
        let a = udp(V4_SRC.into(), V4_DST.into(), 1500, 1);
        let b = udp(V4_SRC.into(), V4_OTHER_DST.into(), 1500, 2);
        let c = vec![0xc5; 1508];
        let fragments = |dst, protocol, data: &[u8]| {
            [
                ipv4_fragment(dst, protocol, 42, &[], 0, true, &data[..800]),
                ipv4_fragment(dst, protocol, 42, &[], 800, false, &data[800..]),
            ]
        };
        let (fa, fb, fc) = (
            fragments(V4_DST, UDP, &a),
            fragments(V4_OTHER_DST, UDP, &b),
            fragments(V4_DST, 253, &c),
        );
        for first in [&fa[0], &fb[0], &fc[0]] {
            assert_eq!(reassembler.push(first, now), Reassembly::Pending);
        }
        assert_eq!(reassembler.len(), 3);
        let whole_c = complete(reassembler.push(&fc[1], now));
        assert_eq!(&whole_c[ETHERNET_HEADER_LEN + 20..], &c[..]);
        let whole_b = complete(reassembler.push(&fb[1], now));
        assert_eq!(&whole_b[ETHERNET_HEADER_LEN + 20..], &b[..]);
        assert_whole_udp(Family::V4, &complete(reassembler.push(&fa[1], now)), &a);

        // IPv6: same identification, another destination.
        let a = udp(V6_SRC.into(), V6_DST.into(), 1500, 1);
        let b = udp(V6_SRC.into(), V6_OTHER_DST.into(), 1500, 2);
        let fa = [
            ipv6_fragment(V6_DST, UDP, 42, 0, true, &a[..800]),
            ipv6_fragment(V6_DST, UDP, 42, 800, false, &a[800..]),
        ];
        let fb = [
            ipv6_fragment(V6_OTHER_DST, UDP, 42, 0, true, &b[..800]),
            ipv6_fragment(V6_OTHER_DST, UDP, 42, 800, false, &b[800..]),
        ];
        assert_eq!(reassembler.push(&fa[0], now), Reassembly::Pending);
        assert_eq!(reassembler.push(&fb[1], now), Reassembly::Pending);
        assert_eq!(
            reassembler.push(&fb[0], now),
            Reassembly::Complete({
                let mut whole = fb[0][..ETHERNET_HEADER_LEN + IPV6_HEADER_LEN].to_vec();
                whole[ETHERNET_HEADER_LEN + 4..ETHERNET_HEADER_LEN + 6]
                    .copy_from_slice(&(b.len() as u16).to_be_bytes());
                whole[ETHERNET_HEADER_LEN + 6] = UDP;
                whole.extend_from_slice(&b);
                whole
            })
        );
        assert_whole_udp(Family::V6, &complete(reassembler.push(&fa[1], now)), &a);
        assert!(reassembler.is_empty());
    }

    #[test]
    fn any_overlap_drops_the_datagram_and_its_later_fragments() {
        /// (offset, length)
        type Range = (usize, usize);
        let data = [0x55u8; 64];
        // (kept pieces as (offset, len)), then the overlapping one; all with more fragments.
        let cases: [(&[Range], Range); 6] = [
            (&[(0, 16)], (0, 16)),         // exact duplicate
            (&[(0, 16)], (8, 16)),         // runs into the previous piece
            (&[(16, 16)], (8, 16)),        // runs into the next piece
            (&[(8, 8)], (0, 32)),          // covers a piece
            (&[(0, 32)], (8, 8)),          // inside a piece
            (&[(0, 8), (24, 8)], (8, 24)), // touches one, overlaps the other
        ];
        for family in FAMILIES {
            for (kept, (offset, len)) in cases {
                let now = Instant::now();
                let mut reassembler = Reassembler::new(ReassemblyLimits::default());
                for &(o, l) in kept {
                    let fragment = family.fragment(3, o, true, &data[..l]);
                    assert_eq!(reassembler.push(&fragment, now), Reassembly::Pending);
                }
                let overlapping = family.fragment(3, offset, true, &data[..len]);
                assert_eq!(
                    reassembler.push(&overlapping, now),
                    Reassembly::Dropped(FragmentDrop::Overlap),
                    "{family:?} {kept:?} then {:?}",
                    (offset, len)
                );
                assert!(reassembler.is_empty());
                assert_eq!(reassembler.buffered_bytes(), 0);
                // A later fragment of it, even one that would have completed it, is dropped.
                let last = family.fragment(3, 64, false, &data[..8]);
                assert_eq!(
                    reassembler.push(&last, now + MS),
                    Reassembly::Dropped(FragmentDrop::AfterDrop)
                );
                assert!(reassembler.is_empty());
                // Another datagram is not affected.
                let other = family.fragment(4, 8, true, &data[..8]);
                assert_eq!(reassembler.push(&other, now + MS), Reassembly::Pending);
            }
            // Adjacent pieces are not an overlap.
            let mut reassembler = Reassembler::new(ReassemblyLimits::default());
            let now = Instant::now();
            for (o, l) in [(0, 8), (16, 8), (8, 8)] {
                let fragment = family.fragment(3, o, true, &data[..l]);
                assert_eq!(reassembler.push(&fragment, now), Reassembly::Pending);
            }
        }
    }

    #[test]
    fn an_overlap_cannot_rewrite_the_transport_header() {
        for family in FAMILIES {
            let (src, dst) = family.addrs();
            let allowed = udp(src, dst, 1000, 1);
            let mut sneaky = allowed.clone();
            sneaky[2..4].copy_from_slice(&22u16.to_be_bytes());
            let now = Instant::now();
            let mut reassembler = Reassembler::new(ReassemblyLimits::default());
            let first = family.fragment(11, 0, true, &allowed[..504]);
            let rewrite = family.fragment(11, 0, true, &sneaky[..8]);
            let rest = family.fragment(11, 504, false, &allowed[504..]);
            assert_eq!(reassembler.push(&first, now), Reassembly::Pending);
            assert_eq!(
                reassembler.push(&rewrite, now),
                Reassembly::Dropped(FragmentDrop::Overlap)
            );
            assert_eq!(
                reassembler.push(&rest, now),
                Reassembly::Dropped(FragmentDrop::AfterDrop)
            );
            // Once the dropped datagram's deadline passed, the key starts afresh and must
            // again cover every byte exactly once.
            let later = now + ReassemblyLimits::default().timeout;
            assert_eq!(reassembler.push(&rest, later), Reassembly::Pending);
            assert_eq!(
                reassembler.push(&rewrite, later),
                Reassembly::Pending,
                "8 bytes at offset 0 leave a hole"
            );
            assert_eq!(
                reassembler.expire(later + ReassemblyLimits::default().timeout),
                1
            );
        }
    }

    #[test]
    fn fragments_disagreeing_on_the_end_drop_the_datagram() {
        let data = [1u8; 32];
        for family in FAMILIES {
            let cases: [[(usize, bool); 2]; 3] = [
                [(16, false), (24, false)], // two different ends
                [(16, false), (24, true)],  // data past the end
                [(32, true), (8, false)],   // an end before data already held
            ];
            for case in cases {
                let now = Instant::now();
                let mut reassembler = Reassembler::new(ReassemblyLimits::default());
                let [(o1, m1), (o2, m2)] = case;
                let first = family.fragment(8, o1, m1, &data[..8]);
                assert_eq!(reassembler.push(&first, now), Reassembly::Pending);
                let second = family.fragment(8, o2, m2, &data[..8]);
                assert_eq!(
                    reassembler.push(&second, now),
                    Reassembly::Dropped(FragmentDrop::Inconsistent),
                    "{family:?} {case:?}"
                );
                assert!(reassembler.is_empty());
            }
            // Two last fragments with the same end overlap.
            let mut reassembler = Reassembler::new(ReassemblyLimits::default());
            let now = Instant::now();
            let last = family.fragment(8, 16, false, &data[..8]);
            let longer_last = family.fragment(8, 8, false, &data[..16]);
            assert_eq!(reassembler.push(&last, now), Reassembly::Pending);
            assert_eq!(
                reassembler.push(&longer_last, now),
                Reassembly::Dropped(FragmentDrop::Overlap)
            );
        }
    }

    #[test]
    fn the_largest_datagram_completes_and_one_byte_more_is_too_large() {
        for (family, max_udp) in [(Family::V4, 65535 - 20), (Family::V6, 65535)] {
            let now = Instant::now();
            let mut reassembler = Reassembler::new(ReassemblyLimits::default());
            let udp = family.udp(max_udp - 8);
            let fragments = family.split(1, &udp, 1448);
            let (last, rest) = fragments.split_last().expect("fragments");
            for fragment in rest {
                assert_eq!(reassembler.push(fragment, now), Reassembly::Pending);
            }
            let frame = complete(reassembler.push(last, now));
            assert_whole_udp(family, &frame, &udp);
            assert_eq!(
                frame.len(),
                ETHERNET_HEADER_LEN + 65535 + if let Family::V6 = family { 40 } else { 0 }
            );

            // A last fragment ending one 8-byte unit further.
            let past = family.fragment(2, max_udp / 8 * 8, false, &[0; 8]);
            assert_eq!(
                reassembler.push(&past, now),
                Reassembly::Dropped(FragmentDrop::TooLarge)
            );
            let first = family.fragment(2, 0, true, &udp[..1448]);
            assert_eq!(
                reassembler.push(&first, now),
                Reassembly::Dropped(FragmentDrop::AfterDrop)
            );
            // The largest offset the header can say, with more data after it.
            let far = family.fragment(3, 65528, true, &[0; 16]);
            assert_eq!(
                reassembler.push(&far, now),
                Reassembly::Dropped(FragmentDrop::TooLarge)
            );
            assert!(reassembler.is_empty());
        }
        // IPv4 options of the first fragment count: a last fragment that fits a 20-byte header
        // does not fit a 24-byte one.
        let now = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyLimits::default());
        let last = ipv4_fragment(V4_DST, UDP, 4, &[], 65504, false, &[0; 8]);
        assert_eq!(reassembler.push(&last, now), Reassembly::Pending);
        let first = ipv4_fragment(V4_DST, UDP, 4, &[1, 1, 1, 0], 0, true, &[0; 8]);
        assert_eq!(
            reassembler.push(&first, now),
            Reassembly::Dropped(FragmentDrop::TooLarge)
        );
        assert!(reassembler.is_empty());
    }

    #[test]
    fn malformed_fragments_are_dropped_without_touching_state() {
        for family in FAMILIES {
            let now = Instant::now();
            let mut reassembler = Reassembler::new(ReassemblyLimits::default());
            let udp = family.udp(2000);
            let fragments = family.split(6, &udp, 1024);
            assert_eq!(reassembler.push(&fragments[0], now), Reassembly::Pending);
            let bytes = reassembler.buffered_bytes();
            let mut bad = vec![
                family.fragment(6, 1024, true, &udp[1024..1036]), // not a multiple of 8
                family.fragment(6, 1024, true, &[]),              // no data
                family.fragment(6, 1024, false, &[]),
                fragments[1][..ETHERNET_HEADER_LEN + 10].to_vec(), // truncated header
                fragments[1][..10].to_vec(),                       // truncated Ethernet
                ethernet(0x0806, &fragments[1][ETHERNET_HEADER_LEN..]), // ARP
            ];
            match family {
                Family::V4 => {
                    let mut checksum = fragments[1].clone();
                    checksum[ETHERNET_HEADER_LEN + 10] ^= 1;
                    assert_eq!(
                        reassembler.push(&checksum, now),
                        Reassembly::Dropped(FragmentDrop::BadChecksum)
                    );
                    // Not a fragment: offset 0, MF clear.
                    bad.push(ipv4_fragment(V4_DST, UDP, 6, &[], 0, false, &udp));
                    // Version 6 in an IPv4 frame.
                    let mut version = fragments[1].clone();
                    version[ETHERNET_HEADER_LEN] = 0x65;
                    bad.push(version);
                }
                Family::V6 => {
                    // A Fragment header inside a fragment.
                    bad.push(ipv6_fragment(V6_DST, 44, 6, 1024, false, &udp[1024..]));
                    bad.push(ipv6_fragment(V6_DST, 44, 6, 0, false, &udp));
                    // The fixed header's next header is not Fragment.
                    let mut not_fragment = fragments[1].clone();
                    not_fragment[ETHERNET_HEADER_LEN + 6] = UDP;
                    bad.push(not_fragment);
                    // Payload length too short for the Fragment header.
                    let mut short = fragments[1][..ETHERNET_HEADER_LEN + 44].to_vec();
                    short[ETHERNET_HEADER_LEN + 5] = 4;
                    bad.push(short);
                }
            }
            for frame in &bad {
                assert_eq!(
                    reassembler.push(frame, now),
                    Reassembly::Dropped(FragmentDrop::Malformed),
                    "{family:?} {frame:02x?}"
                );
                assert_eq!(reassembler.len(), 1);
                assert_eq!(reassembler.buffered_bytes(), bytes);
            }
            // The datagram in progress still completes.
            assert_whole_udp(
                family,
                &complete(reassembler.push(&fragments[1], now)),
                &udp,
            );
        }
    }

    #[test]
    fn ipv6_atomic_fragment_completes_at_once_without_state() {
        let now = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyLimits::default());
        let udp = Family::V6.udp(3000);
        let fragments = Family::V6.split(12, &udp, 1448);
        assert_eq!(reassembler.push(&fragments[0], now), Reassembly::Pending);
        let small = Family::V6.udp(100);
        let atomic = Family::V6.fragment(12, 0, false, &small);
        assert!(is_fragment(&atomic));
        let frame = complete(reassembler.push(&atomic, now));
        assert_whole_udp(Family::V6, &frame, &small);
        assert_eq!(frame.len(), atomic.len() - FRAGMENT_HEADER_LEN);
        // The datagram in progress with the same key is untouched.
        assert_eq!(reassembler.len(), 1);
        assert_eq!(reassembler.push(&fragments[1], now), Reassembly::Pending);
        assert_whole_udp(
            Family::V6,
            &complete(reassembler.push(&fragments[2], now)),
            &udp,
        );
        // With reassembly off, an atomic fragment still passes.
        let mut off = Reassembler::new(ReassemblyLimits {
            max_datagrams: 0,
            ..ReassemblyLimits::default()
        });
        assert!(matches!(off.push(&atomic, now), Reassembly::Complete(_)));
        assert_eq!(
            off.push(&fragments[0], now),
            Reassembly::Dropped(FragmentDrop::BufferFull)
        );
    }

    #[test]
    fn one_datagram_at_a_time_evicts_the_older() {
        for family in FAMILIES {
            let limits = ReassemblyLimits {
                max_datagrams: 1,
                max_bytes: 4096,
                ..ReassemblyLimits::default()
            };
            let mut r = Reassembler::new(limits);
            let now = Instant::now();
            let udp = family.udp(2000);
            let a = family.split(1, &udp, 1008);
            let b = family.split(2, &udp, 1008);
            assert_eq!((a.len(), b.len()), (2, 2));
            assert_eq!(r.push(&a[0], now), Reassembly::Pending);
            assert_eq!(r.push(&b[0], now + MS), Reassembly::Pending);
            assert_whole_udp(family, &complete(r.push(&b[1], now + MS)), &udp);
            assert_eq!(
                r.push(&a[1], now + MS),
                Reassembly::Dropped(FragmentDrop::AfterDrop)
            );
        }
    }

    #[test]
    fn a_new_datagram_beyond_max_datagrams_evicts_the_oldest() {
        for family in FAMILIES {
            let limits = ReassemblyLimits {
                max_datagrams: 3,
                ..ReassemblyLimits::default()
            };
            let mut reassembler = Reassembler::new(limits);
            let start = Instant::now();
            let udp = family.udp(1000);
            let datagrams: Vec<Vec<Vec<u8>>> = (1..=4)
                .map(|ident| family.split(ident, &udp, 504))
                .collect();
            for (i, fragments) in datagrams.iter().enumerate() {
                let now = start + MS * i as u32;
                assert_eq!(reassembler.push(&fragments[0], now), Reassembly::Pending);
                reassembler.assert_invariants();
            }
            assert_eq!(reassembler.len(), 3);
            assert_eq!(reassembler.take_evicted(), 1);
            assert_eq!(reassembler.take_evicted(), 0);
            let now = start + MS * 5;
            assert_eq!(
                reassembler.push(&datagrams[0][1], now),
                Reassembly::Dropped(FragmentDrop::AfterDrop)
            );
            for fragments in &datagrams[1..] {
                assert_whole_udp(
                    family,
                    &complete(reassembler.push(&fragments[1], now)),
                    &udp,
                );
            }
            assert!(reassembler.is_empty());
        }
    }

    #[test]
    fn max_bytes_evicts_the_oldest_and_refuses_a_datagram_too_big_alone() {
        for family in FAMILIES {
            let limits = ReassemblyLimits {
                max_bytes: 4000,
                ..ReassemblyLimits::default()
            };
            let mut reassembler = Reassembler::new(limits);
            let start = Instant::now();
            let udp = family.udp(3000);
            let one = family.split(1, &udp, 1232);
            let two = family.split(2, &udp, 1232);
            for (i, fragment) in [&one[0], &one[1], &two[0]].into_iter().enumerate() {
                let now = start + MS * i as u32;
                assert_eq!(reassembler.push(fragment, now), Reassembly::Pending);
            }
            assert!(reassembler.buffered_bytes() > 4000 - 1232);
            // Datagram 2's next piece only fits once datagram 1 is gone.
            assert_eq!(
                reassembler.push(&two[1], start + MS * 3),
                Reassembly::Pending
            );
            reassembler.assert_invariants();
            assert_eq!(reassembler.take_evicted(), 1);
            assert_eq!(reassembler.len(), 1);
            assert_whole_udp(
                family,
                &complete(reassembler.push(&two[2], start + MS * 4)),
                &udp,
            );

            // A datagram bigger than max_bytes on its own is refused and evicts nobody.
            let other = family.split(3, &udp, 1232);
            assert_eq!(reassembler.push(&other[0], start), Reassembly::Pending);
            let big = family.udp(5000);
            let big = family.split(4, &big, 1984);
            assert_eq!(reassembler.push(&big[0], start + MS), Reassembly::Pending);
            assert_eq!(
                reassembler.push(&big[1], start + MS),
                Reassembly::Dropped(FragmentDrop::BufferFull)
            );
            assert_eq!(reassembler.take_evicted(), 0);
            assert_eq!(reassembler.len(), 1);
            assert_eq!(
                reassembler.push(&big[2], start + MS),
                Reassembly::Dropped(FragmentDrop::AfterDrop)
            );
            assert_eq!(reassembler.push(&other[1], start + MS), Reassembly::Pending);
            let frame = complete(reassembler.push(&other[2], start + MS));
            assert_whole_udp(family, &frame, &udp);
            // A single fragment larger than max_bytes.
            let mut tiny = Reassembler::new(ReassemblyLimits {
                max_bytes: 1000,
                ..ReassemblyLimits::default()
            });
            assert_eq!(
                tiny.push(&big[1], start),
                Reassembly::Dropped(FragmentDrop::BufferFull)
            );
            assert_eq!(tiny.buffered_bytes(), 0);
        }
    }

    #[test]
    fn max_fragments_per_datagram() {
        for family in FAMILIES {
            let limits = ReassemblyLimits {
                max_fragments: 4,
                ..ReassemblyLimits::default()
            };
            let mut reassembler = Reassembler::new(limits);
            let now = Instant::now();
            let four = family.udp(400);
            let fragments = family.split(1, &four, 104);
            assert_eq!(fragments.len(), 4);
            let results: Vec<Reassembly> =
                fragments.iter().map(|f| reassembler.push(f, now)).collect();
            assert!(
                matches!(results[3], Reassembly::Complete(_)),
                "four pieces are fine"
            );
            let seven = family.udp(680);
            let fragments = family.split(2, &seven, 96);
            assert_eq!(fragments.len(), 8);
            for fragment in &fragments[..4] {
                assert_eq!(reassembler.push(fragment, now), Reassembly::Pending);
            }
            assert_eq!(
                reassembler.push(&fragments[4], now),
                Reassembly::Dropped(FragmentDrop::TooManyFragments)
            );
            assert!(reassembler.is_empty());
            assert_eq!(
                reassembler.push(&fragments[5], now),
                Reassembly::Dropped(FragmentDrop::AfterDrop)
            );
        }
    }

    #[test]
    fn expire_drops_timed_out_datagrams() {
        for family in FAMILIES {
            let limits = ReassemblyLimits {
                timeout: Duration::from_millis(100),
                ..ReassemblyLimits::default()
            };
            let mut reassembler = Reassembler::new(limits);
            let start = Instant::now();
            let udp = family.udp(3000);
            let one = family.split(1, &udp, 1232);
            let two = family.split(2, &udp, 1232);
            assert_eq!(reassembler.push(&one[0], start), Reassembly::Pending);
            assert_eq!(
                reassembler.push(&two[0], start + MS * 50),
                Reassembly::Pending
            );
            assert_eq!(reassembler.next_deadline(), Some(start + MS * 100));
            assert_eq!(reassembler.expire(start + MS * 99), 0);
            assert_eq!(reassembler.expire(start + MS * 100), 1);
            assert_eq!(reassembler.len(), 1);
            assert_eq!(reassembler.next_deadline(), Some(start + MS * 150));
            // A fragment of the expired datagram starts it afresh (it cannot complete).
            assert_eq!(
                reassembler.push(&one[1], start + MS * 101),
                Reassembly::Pending
            );
            assert_eq!(
                reassembler.push(&one[2], start + MS * 101),
                Reassembly::Pending
            );
            // push drops datagram 2 at its deadline; the next expire reports it.
            assert_eq!(
                reassembler.push(&two[1], start + MS * 150),
                Reassembly::Pending
            );
            assert_eq!(reassembler.expire(start + MS * 150), 1);
            assert_eq!(reassembler.expire(start + MS * 201), 1);
            assert_eq!(reassembler.next_deadline(), Some(start + MS * 250));
            assert_eq!(reassembler.expire(start + MS * 250), 1);
            assert!(reassembler.is_empty());
            assert_eq!(reassembler.buffered_bytes(), 0);
            assert_eq!(reassembler.next_deadline(), None);
        }
    }

    #[test]
    fn a_fragment_flood_neither_grows_nor_blocks_an_honest_datagram() {
        let limits = ReassemblyLimits::default();
        for family in FAMILIES {
            let mut reassembler = Reassembler::new(limits);
            let mut now = Instant::now();
            let udp = family.udp(3000);
            let junk = [0xeeu8; 1448];
            let (mut started, mut completed) = (0, 0);
            let mut honest = Vec::new();
            for i in 0..3000u16 {
                now += Duration::from_micros(100);
                // A datagram that never completes: only its first fragment.
                let flood = family.fragment(10_000 + i, 0, true, &junk);
                assert_eq!(reassembler.push(&flood, now), Reassembly::Pending);
                if i % 5 == 0 {
                    if honest.is_empty() {
                        started += 1;
                        honest = family.split(started, &udp, 1232);
                        honest.reverse();
                    }
                    let fragment = honest.pop().expect("fragment");
                    match reassembler.push(&fragment, now) {
                        Reassembly::Pending => {}
                        Reassembly::Complete(frame) => {
                            assert_whole_udp(family, &frame, &udp);
                            completed += 1;
                        }
                        other => panic!("honest fragment: {other:?}"),
                    }
                }
                reassembler.assert_invariants();
            }
            assert_eq!(completed, 200);
            assert!(reassembler.take_evicted() > 2000);
            assert!(reassembler.len() <= limits.max_datagrams);
        }
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    #[test]
    fn garbage_never_panics_and_never_exceeds_the_limits() {
        let limits = ReassemblyLimits {
            max_datagrams: 4,
            max_bytes: 6000,
            max_fragments: 8,
            timeout: Duration::from_millis(50),
        };
        let mut reassembler = Reassembler::new(limits);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut now = Instant::now();
        let mut outcomes = std::collections::HashMap::new();
        let payload: Vec<u8> = (0..9000).map(|i| i as u8).collect();
        let mut walk: Vec<Vec<u8>> = Vec::new();
        for _ in 0..30_000 {
            let family = if rng.chance(50) {
                Family::V4
            } else {
                Family::V6
            };
            let ident = rng.below(6) as u16;
            let mut frame = match rng.below(7) {
                0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
                1 | 2 => {
                    // Small grid: pieces of a few datagrams that often fit, overlap or finish.
                    let offset = 8 * rng.below(12);
                    let len = if rng.chance(90) {
                        8 * (1 + rng.below(6))
                    } else {
                        rng.below(64)
                    };
                    let more = rng.chance(75);
                    match family {
                        Family::V4 if rng.chance(20) => {
                            let options = [1u8; 8];
                            let options = &options[..4 * rng.below(3)];
                            ipv4_fragment(
                                V4_DST,
                                UDP,
                                ident,
                                options,
                                offset,
                                more,
                                &payload[..len],
                            )
                        }
                        _ => family.fragment(ident, offset, more, &payload[..len]),
                    }
                }
                3 => {
                    // Anywhere in the 64 KiB space, any length.
                    let offset = 8 * rng.below(8192);
                    let len = rng.below(1500);
                    family.fragment(ident, offset, rng.chance(50), &payload[..len])
                }
                4 => {
                    // One fragment of a real datagram (they often disagree with each other).
                    let len = 8 + rng.below(3000);
                    let size = 8 * (1 + rng.below(200));
                    let fragments = family.split(100 + ident, &payload[..len], size);
                    let i = rng.below(fragments.len());
                    fragments[i].clone()
                }
                _ => {
                    // The next fragment of a real datagram sent in order: completes, or has too
                    // many pieces, or is too big for max_bytes.
                    if walk.is_empty() {
                        let len = 8 + rng.below(payload.len() - 8);
                        let size = 8 * (1 + rng.below(250));
                        walk = family.split(200 + ident, &payload[..len], size);
                        walk.reverse();
                    }
                    walk.pop().unwrap_or_default()
                }
            };
            if rng.chance(10) && !frame.is_empty() {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(frame.len());
                    frame[i] = rng.next() as u8;
                }
            }
            if rng.chance(5) {
                frame.truncate(rng.below(frame.len() + 1));
            }
            now += Duration::from_micros(rng.below(2000) as u64);
            let result = reassembler.push(&frame, now);
            reassembler.assert_invariants();
            let outcome = match &result {
                Reassembly::Complete(whole) => {
                    assert!(!is_fragment(whole), "a complete frame is a fragment again");
                    let ip = &whole[ETHERNET_HEADER_LEN..];
                    match ip[0] >> 4 {
                        4 => {
                            let packet = Ipv4Packet::new_checked(ip).expect("IPv4");
                            assert!(packet.verify_checksum());
                            assert_eq!(usize::from(packet.total_len()), ip.len());
                        }
                        6 => {
                            let packet = Ipv6Packet::new_checked(ip).expect("IPv6");
                            assert_eq!(packet.payload_len() as usize + IPV6_HEADER_LEN, ip.len());
                        }
                        v => panic!("version {v}"),
                    }
                    "complete"
                }
                Reassembly::Pending => "pending",
                Reassembly::Dropped(reason) => reason.as_str(),
            };
            *outcomes.entry(outcome).or_insert(0usize) += 1;
            if rng.chance(2) {
                reassembler.expire(now);
            }
        }
        let expired = reassembler.expire(now + limits.timeout);
        let evicted = reassembler.take_evicted();
        assert!(reassembler.is_empty());
        assert_eq!(reassembler.buffered_bytes(), 0);
        for outcome in [
            "complete",
            "pending",
            "fragment-malformed",
            "fragment-bad-checksum",
            "fragment-overlap",
            "fragment-inconsistent",
            "fragment-too-large",
            "fragment-too-many",
            "fragment-buffer-full",
            "fragment-of-dropped-datagram",
        ] {
            assert!(
                outcomes.get(outcome).copied().unwrap_or(0) > 0,
                "never saw {outcome}: {outcomes:?}"
            );
        }
        assert!(expired + evicted > 0);
    }

    #[test]
    fn is_fragment_looks_at_the_right_bits() {
        let udp = Family::V4.udp(100);
        assert!(is_fragment(&ipv4_fragment(
            V4_DST,
            UDP,
            1,
            &[],
            0,
            true,
            &udp[..64]
        )));
        assert!(is_fragment(&ipv4_fragment(
            V4_DST,
            UDP,
            1,
            &[],
            64,
            false,
            &udp[64..]
        )));
        assert!(is_fragment(&ipv4_fragment(
            V4_DST,
            UDP,
            1,
            &[],
            65528,
            false,
            &udp[64..]
        )));
        let whole = ipv4_fragment(V4_DST, UDP, 1, &[], 0, false, &udp);
        assert!(!is_fragment(&whole));
        let mut dont_fragment = whole.clone();
        dont_fragment[ETHERNET_HEADER_LEN + 6] |= 0x40;
        assert!(!is_fragment(&dont_fragment));
        assert!(is_fragment(&Family::V6.fragment(1, 0, false, &udp)));
        let mut v6_udp = Family::V6.fragment(1, 0, false, &udp);
        v6_udp[ETHERNET_HEADER_LEN + 6] = UDP;
        assert!(!is_fragment(&v6_udp));
        for short in [
            &[][..],
            &whole[..13],
            &whole[..14],
            &whole[..20],
            &v6_udp[..50],
        ] {
            assert!(!is_fragment(short));
        }
        assert!(!is_fragment(&ethernet(
            0x0806,
            &whole[ETHERNET_HEADER_LEN..]
        )));
    }

    #[test]
    fn drop_reasons_have_distinct_counter_names() {
        let all = [
            FragmentDrop::Malformed,
            FragmentDrop::BadChecksum,
            FragmentDrop::Overlap,
            FragmentDrop::Inconsistent,
            FragmentDrop::TooLarge,
            FragmentDrop::TooManyFragments,
            FragmentDrop::BufferFull,
            FragmentDrop::AfterDrop,
            FragmentDrop::Expired,
            FragmentDrop::Evicted,
        ];
        let names: std::collections::HashSet<&str> = all.iter().map(|d| d.as_str()).collect();
        assert_eq!(names.len(), all.len());
    }
}
