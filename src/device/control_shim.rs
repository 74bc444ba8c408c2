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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::debug;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_LEN: usize = 12;
/// Largest payload we relay; vhost-user messages are far smaller.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most fds one vhost-user message carries (SET_MEM_TABLE: 8 regions; room to spare).
const MAX_FDS: usize = 32;

const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_KICK: u32 = 12;
const REQ_SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One message: header + payload bytes and the fds that came with it.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }
    /// First u32 of the payload: the ring index of SET_VRING_* messages.
    fn payload_u32(&self, at: usize) -> Option<u32> {
        let b = self.bytes.get(HEADER_LEN + at..HEADER_LEN + at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.bytes[4], self.bytes[5], self.bytes[6], self.bytes[7]])
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream.
fn read_message(stream: &mut UnixStream) -> io::Result<Option<Message>> {
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

/// Relays between `vmm` and `backend` until either side closes; returns the two relay threads.
/// `queues` is the device's queue count: ring indexes at or above it are never remembered.
pub fn relay(
    vmm: UnixStream,
    backend: UnixStream,
    queues: usize,
) -> io::Result<Vec<JoinHandle<()>>> {
    let vmm_writer = Arc::new(Mutex::new(vmm.try_clone()?));
    let features_seen = Arc::new(AtomicBool::new(false));

    let to_backend = {
        let mut vmm = vmm.try_clone()?;
        let backend = backend.try_clone()?;
        let vmm_writer = vmm_writer.clone();
        let features_seen = features_seen.clone();
        std::thread::Builder::new()
            .name("netfence-ctl-in".into())
            .spawn(move || {
                let mut early_enable = EarlyEnables::new(queues);
                loop {
                    let msg = match read_message(&mut vmm) {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            debug!(error = %e, "control channel from VMM ended");
                            break;
                        }
                    };
                    let request = msg.request();
                    tracing::trace!(
                        request,
                        flags = msg.flags(),
                        fds = msg.fds.len(),
                        "VMM request"
                    );
                    if request == REQ_SET_FEATURES {
                        features_seen.store(true, Ordering::Release);
                    }
                    if request == REQ_SET_VRING_ENABLE && !features_seen.load(Ordering::Acquire) {
                        debug!("answering early SET_VRING_ENABLE (before SET_FEATURES) locally");
                        if let (Some(index), Some(state)) = (msg.payload_u32(0), msg.payload_u32(4))
                        {
                            early_enable.record(index, state);
                        }
                        if msg.flags() & FLAG_NEED_REPLY != 0 {
                            let w = vmm_writer.lock().unwrap_or_else(|p| p.into_inner());
                            if write_message(&w, &ack_for(request)).is_err() {
                                break;
                            }
                        }
                        continue;
                    }
                    if write_message(&backend, &msg).is_err() {
                        break;
                    }
                    if request == REQ_SET_VRING_KICK && features_seen.load(Ordering::Acquire) {
                        let index = msg.payload_u32(0).unwrap_or(u32::MAX) & 0xff;
                        if let Some(state) = early_enable.take(index) {
                            debug!(index, state, "replaying early SET_VRING_ENABLE");
                            if write_message(&backend, &vring_enable(index, state)).is_err() {
                                break;
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

    #[test]
    fn no_queues_store_nothing() {
        let mut e = EarlyEnables::new(0);
        assert!(!e.record(0, 1));
        assert_eq!(e.take(0), None);
    }
}
