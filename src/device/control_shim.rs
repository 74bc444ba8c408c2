//! A relay for the vhost-user control channel, between the VMM and our backend.
//!
//! Why: QEMU (7.2 at least) sends `SET_VRING_ENABLE` for a vhost-user net device as soon as the
//! guest driver negotiates features, before it sends `SET_FEATURES` to the backend. The `vhost`
//! crate's request handler rejects `SET_VRING_ENABLE` until `VHOST_USER_F_PROTOCOL_FEATURES` is
//! acked by `SET_FEATURES`, and drops the connection. QEMU repeats the enable in
//! `vhost_dev_start`, after `SET_FEATURES`, so the early one carries no information.
//!
//! QEMU does not repeat it later (vhost-net starts the device with `vrings=false`), so the state
//! must not be lost either.
//!
//! The relay passes every message (header, payload and attached fds) through unchanged, except
//! `SET_VRING_ENABLE` before the first `SET_FEATURES`: it answers that itself (an ACK when the VMM
//! asked for one), remembers the state, and replays it to the backend right after that ring's
//! `SET_VRING_KICK`, when the backend accepts it. Only the control channel goes through here; the
//! datapath (guest memory, kick and call eventfds) is shared directly between VMM and backend.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::debug;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A message header: request (u32), flags (u32), payload size (u32), little-endian.
pub const HEADER_LEN: usize = 12;
/// Largest payload we relay; vhost-user messages are far smaller.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most fds one vhost-user message carries (SET_MEM_TABLE: 8 regions; room to spare).
const MAX_FDS: usize = 32;

pub const REQ_SET_FEATURES: u32 = 2;
pub const REQ_SET_VRING_KICK: u32 = 12;
pub const REQ_SET_VRING_ENABLE: u32 = 18;
pub const FLAG_VERSION: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// One message: header + payload bytes and the fds that came with it.
pub struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    /// Header and payload, as received.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// How many fds came with the message.
    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }
    pub fn request(&self) -> u32 {
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }
    /// The u32 at `at` in the payload (at 0: the ring index of SET_VRING_* messages).
    pub fn payload_u32(&self, at: usize) -> Option<u32> {
        let b = self.bytes.get(HEADER_LEN + at..HEADER_LEN + at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn flags(&self) -> u32 {
        u32::from_le_bytes([self.bytes[4], self.bytes[5], self.bytes[6], self.bytes[7]])
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream. A payload above [`MAX_PAYLOAD`] or
/// a stream that ends inside a message is an error.
pub fn read_message(stream: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points into `header`, which outlives the call.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds)? };
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: these fds were just received and belong to nobody else.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER_LEN {
        stream.read_exact(&mut header[n..])?;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message payload of {size} bytes"),
        ));
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + size);
    bytes.extend_from_slice(&header);
    bytes.resize(HEADER_LEN + size, 0);
    stream.read_exact(&mut bytes[HEADER_LEN..])?;
    Ok(Some(Message { bytes, fds }))
}

fn write_message(stream: &UnixStream, msg: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = stream.send_with_fds(&[&msg.bytes[..]], &raw)?;
    // The rest (rare: a short write) goes without fds, which were attached to the first byte.
    let mut rest = &msg.bytes[sent..];
    while !rest.is_empty() {
        sent = (&*stream).write(rest)?;
        if sent == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        rest = &rest[sent..];
    }
    Ok(())
}

/// A SET_VRING_ENABLE without NEED_REPLY, as the VMM would have sent it.
fn vring_enable(index: u32, enable: u32) -> Message {
    let mut bytes = Vec::with_capacity(HEADER_LEN + 8);
    bytes.extend_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
    bytes.extend_from_slice(&FLAG_VERSION.to_le_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&index.to_le_bytes());
    bytes.extend_from_slice(&enable.to_le_bytes());
    Message {
        bytes,
        fds: Vec::new(),
    }
}

/// The ACK the backend would have sent for a swallowed request.
fn ack_for(request: u32) -> Message {
    let mut bytes = Vec::with_capacity(HEADER_LEN + 8);
    bytes.extend_from_slice(&request.to_le_bytes());
    bytes.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    Message {
        bytes,
        fds: Vec::new(),
    }
}

/// Ring enable states the VMM sent before SET_FEATURES, by ring index, waiting for that ring's
/// SET_VRING_KICK. The index comes from the VMM, so only the device's own rings are kept: one
/// slot per queue, nothing else is ever stored.
struct EarlyEnables {
    states: Vec<Option<u32>>,
}

impl EarlyEnables {
    fn new(queues: usize) -> Self {
        EarlyEnables {
            states: vec![None; queues],
        }
    }

    /// Remembers `state` for ring `index`; an index the device does not have is dropped
    /// (logged at debug) and false returned.
    fn record(&mut self, index: u32, state: u32) -> bool {
        match usize::try_from(index)
            .ok()
            .and_then(|i| self.states.get_mut(i))
        {
            Some(slot) => {
                *slot = Some(state);
                true
            }
            None => {
                debug!(
                    index,
                    queues = self.states.len(),
                    "early SET_VRING_ENABLE for a ring the device does not have, dropped"
                );
                false
            }
        }
    }

    /// The state remembered for ring `index`, forgotten as it is taken.
    fn take(&mut self, index: u32) -> Option<u32> {
        let i = usize::try_from(index).ok()?;
        self.states.get_mut(i)?.take()
    }
}

/// What the relay does with one message from the VMM.
#[derive(Debug)]
pub enum VmmStep {
    /// An early SET_VRING_ENABLE, answered here: send the ACK (if the VMM asked for one) back
    /// to the VMM; nothing goes to the backend.
    Answer(Option<Message>),
    /// Pass the message to the backend, then the remembered SET_VRING_ENABLE, if any, that
    /// this SET_VRING_KICK releases.
    Forward(Option<Message>),
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("request", &self.request())
            .field("len", &self.bytes.len())
            .field("fds", &self.fds.len())
            .finish()
    }
}

/// The relay's memory of the VMM's requests: whether SET_FEATURES was seen, and the early
/// SET_VRING_ENABLE states waiting for their ring's SET_VRING_KICK.
pub struct VmmRequests {
    features_seen: bool,
    early_enable: EarlyEnables,
}

impl VmmRequests {
    /// For a device of `queues` rings: ring indexes at or above it are never remembered.
    pub fn new(queues: usize) -> Self {
        VmmRequests {
            features_seen: false,
            early_enable: EarlyEnables::new(queues),
        }
    }

    /// Decides what happens to `msg`, the next message from the VMM.
    pub fn step(&mut self, msg: &Message) -> VmmStep {
        let request = msg.request();
        if request == REQ_SET_FEATURES {
            self.features_seen = true;
        }
        if request == REQ_SET_VRING_ENABLE && !self.features_seen {
            debug!("answering early SET_VRING_ENABLE (before SET_FEATURES) locally");
            if let (Some(index), Some(state)) = (msg.payload_u32(0), msg.payload_u32(4)) {
                self.early_enable.record(index, state);
            }
            let ack = (msg.flags() & FLAG_NEED_REPLY != 0).then(|| ack_for(request));
            return VmmStep::Answer(ack);
        }
        let mut replay = None;
        if request == REQ_SET_VRING_KICK && self.features_seen {
            let index = msg.payload_u32(0).unwrap_or(u32::MAX) & 0xff;
            if let Some(state) = self.early_enable.take(index) {
                debug!(index, state, "replaying early SET_VRING_ENABLE");
                replay = Some(vring_enable(index, state));
            }
        }
        VmmStep::Forward(replay)
    }
}

/// Relays between `vmm` and `backend` until either side closes; returns the two relay threads.
/// `queues` is the device's queue count: ring indexes at or above it are never remembered.
pub fn relay(
    vmm: UnixStream,
    backend: UnixStream,
    queues: usize,
) -> io::Result<Vec<JoinHandle<()>>> {
    let vmm_writer = Arc::new(Mutex::new(vmm.try_clone()?));

    let to_backend = {
        let mut vmm = vmm.try_clone()?;
        let backend = backend.try_clone()?;
        let vmm_writer = vmm_writer.clone();
        std::thread::Builder::new()
            .name("netfence-ctl-in".into())
            .spawn(move || {
                let mut requests = VmmRequests::new(queues);
                loop {
                    let msg = match read_message(&mut vmm) {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            debug!(error = %e, "control channel from VMM ended");
                            break;
                        }
                    };
                    tracing::trace!(
                        request = msg.request(),
                        flags = msg.flags(),
                        fds = msg.fds.len(),
                        "VMM request"
                    );
                    match requests.step(&msg) {
                        VmmStep::Answer(ack) => {
                            if let Some(ack) = ack {
                                let w = vmm_writer.lock().unwrap_or_else(|p| p.into_inner());
                                if write_message(&w, &ack).is_err() {
                                    break;
                                }
                            }
                        }
                        VmmStep::Forward(replay) => {
                            if write_message(&backend, &msg).is_err() {
                                break;
                            }
                            if let Some(enable) = replay {
                                if write_message(&backend, &enable).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
                let _ = backend.shutdown(std::net::Shutdown::Both);
            })?
    };

    let to_vmm = {
        let mut backend = backend;
        let vmm = vmm;
        std::thread::Builder::new()
            .name("netfence-ctl-out".into())
            .spawn(move || {
                loop {
                    let msg = match read_message(&mut backend) {
                        Ok(Some(m)) => m,
                        _ => break,
                    };
                    let w = vmm_writer.lock().unwrap_or_else(|p| p.into_inner());
                    if write_message(&w, &msg).is_err() {
                        break;
                    }
                }
                let _ = vmm.shutdown(std::net::Shutdown::Both);
            })?
    };
    Ok(vec![to_backend, to_vmm])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as the VMM writes it.
    fn wire(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = request.to_le_bytes().to_vec();
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn ring_payload(index: u32, value: u32) -> Vec<u8> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&value.to_le_bytes());
        p
    }

    /// The messages `read_message` makes of `chunks` written one by one, then its final result
    /// (`None` for a clean end, the error otherwise).
    fn read_all(chunks: &[&[u8]]) -> (Vec<Message>, Option<io::Error>) {
        let (mut reader, mut writer) = UnixStream::pair().unwrap();
        for chunk in chunks {
            writer.write_all(chunk).unwrap();
        }
        drop(writer);
        let mut out = Vec::new();
        loop {
            match read_message(&mut reader) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn messages_are_read_whole_however_they_arrive() {
        let first = wire(REQ_SET_FEATURES, FLAG_VERSION, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let second = wire(REQ_SET_VRING_KICK, FLAG_VERSION, &[]);
        let mut stream = first.clone();
        stream.extend_from_slice(&second);
        // Whole, then cut inside the first header, then byte by byte.
        let cuts: Vec<Vec<&[u8]>> = vec![
            vec![&stream],
            vec![&stream[..5], &stream[5..]],
            stream.chunks(1).collect(),
        ];
        for chunks in cuts {
            let (messages, end) = read_all(&chunks);
            assert!(end.is_none(), "{end:?}");
            assert_eq!(messages.len(), 2);
            assert_eq!(messages[0].bytes(), &first[..]);
            assert_eq!(
                messages[0].payload_u32(4),
                Some(u32::from_le_bytes([5, 6, 7, 8]))
            );
            assert_eq!(messages[0].payload_u32(8), None);
            assert_eq!(messages[1].bytes(), &second[..]);
        }
    }

    #[test]
    fn fds_come_with_their_message() {
        let (mut reader, writer) = UnixStream::pair().unwrap();
        let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
        let msg = wire(REQ_SET_VRING_KICK, FLAG_VERSION, &0u64.to_le_bytes());
        writer
            .send_with_fds(&[&msg[..]], &[pipe_r.as_raw_fd()])
            .unwrap();
        let got = read_message(&mut reader).unwrap().unwrap();
        assert_eq!(got.bytes(), &msg[..]);
        assert_eq!(got.fd_count(), 1);
    }

    #[test]
    fn oversized_and_cut_messages_are_errors() {
        let mut huge = wire(REQ_SET_FEATURES, FLAG_VERSION, &[]);
        huge[8..12].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        let (messages, end) = read_all(&[&huge]);
        assert!(messages.is_empty());
        assert_eq!(end.unwrap().kind(), io::ErrorKind::InvalidData);

        let whole = wire(REQ_SET_FEATURES, FLAG_VERSION, &[0; 8]);
        for cut in [3, HEADER_LEN, HEADER_LEN + 4] {
            let (messages, end) = read_all(&[&whole[..cut]]);
            assert!(messages.is_empty());
            assert_eq!(
                end.unwrap().kind(),
                io::ErrorKind::UnexpectedEof,
                "cut at {cut}"
            );
        }
        let (messages, end) = read_all(&[]);
        assert!(
            messages.is_empty() && end.is_none(),
            "a clean end is not an error"
        );
    }

    /// Reads `bytes` as one message.
    fn message(bytes: Vec<u8>) -> Message {
        let (messages, _) = read_all(&[&bytes]);
        messages.into_iter().next().unwrap()
    }

    #[test]
    fn early_enables_are_answered_and_replayed_after_the_kick() {
        let mut requests = VmmRequests::new(2);
        let enable = |index, flags| {
            message(wire(
                REQ_SET_VRING_ENABLE,
                FLAG_VERSION | flags,
                &ring_payload(index, 1),
            ))
        };
        let kick = |index: u32| {
            message(wire(
                REQ_SET_VRING_KICK,
                FLAG_VERSION,
                &u64::from(index).to_le_bytes(),
            ))
        };
        match requests.step(&enable(1, FLAG_NEED_REPLY)) {
            VmmStep::Answer(Some(ack)) => assert_eq!(
                ack.bytes(),
                &wire(REQ_SET_VRING_ENABLE, FLAG_VERSION | FLAG_REPLY, &[0; 8])[..]
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            requests.step(&enable(7, 0)),
            VmmStep::Answer(None)
        ));
        assert!(
            matches!(requests.step(&kick(1)), VmmStep::Forward(None)),
            "before SET_FEATURES"
        );
        let features = message(wire(REQ_SET_FEATURES, FLAG_VERSION, &[0; 8]));
        assert!(matches!(requests.step(&features), VmmStep::Forward(None)));
        match requests.step(&kick(1)) {
            VmmStep::Forward(Some(replay)) => assert_eq!(
                replay.bytes(),
                &wire(REQ_SET_VRING_ENABLE, FLAG_VERSION, &ring_payload(1, 1))[..]
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(requests.step(&kick(1)), VmmStep::Forward(None)),
            "replayed once"
        );
        assert!(
            matches!(requests.step(&kick(7)), VmmStep::Forward(None)),
            "ring 7 is not ours"
        );
        assert!(
            matches!(requests.step(&enable(0, 0)), VmmStep::Forward(None)),
            "after SET_FEATURES"
        );
    }

    #[test]
    fn early_enables_keep_only_the_device_rings() {
        let mut e = EarlyEnables::new(2);
        assert!(e.record(0, 1));
        assert!(e.record(1, 0));
        assert!(e.record(1, 1), "a later state replaces the earlier one");
        for bad in [2, 3, 255, 256, u32::MAX] {
            assert!(!e.record(bad, 1), "index {bad} was accepted");
            assert_eq!(e.take(bad), None, "index {bad} was stored");
        }
        assert_eq!(e.states.len(), 2, "storage grew");
        assert_eq!(e.take(0), Some(1));
        assert_eq!(e.take(0), None, "taken once");
        assert_eq!(e.take(1), Some(1));
    }

    /// With two pairs (QEMU `queues=2`): QEMU enables pair 0 and disables pair 1 before the
    /// features are set (the guest has not chosen its pairs yet); each ring keeps its own state.
    #[test]
    fn early_enables_of_a_second_pair_are_kept_per_ring() {
        let mut e = EarlyEnables::new(4);
        for (ring, state) in [(0, 1), (1, 1), (2, 0), (3, 0)] {
            assert!(e.record(ring, state));
        }
        assert!(!e.record(4, 1), "ring 4 does not exist with two pairs");
        assert_eq!(
            [e.take(2), e.take(3), e.take(0), e.take(1)],
            [Some(0), Some(0), Some(1), Some(1)]
        );
    }

    #[test]
    fn no_queues_store_nothing() {
        let mut e = EarlyEnables::new(0);
        assert!(!e.record(0, 1));
        assert_eq!(e.take(0), None);
    }
}
