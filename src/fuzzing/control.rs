//! Fuzz body for the vhost-user control shim: the message reader over a real socket pair, and
//! the relay's decisions on what the VMM sends.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{push_record, Input};
use crate::device::control_shim::{
    read_message, VmmRequests, VmmStep, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION, HEADER_LEN,
    MAX_PAYLOAD, REQ_SET_FEATURES, REQ_SET_VRING_ENABLE, REQ_SET_VRING_KICK,
};

/// Sends per input: the writer and the reader are one thread, so what is written must fit in
/// the socket buffer (the writer is non-blocking and stops when it is full, too).
const MAX_SENDS: usize = 32;

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Input: a byte choosing the device's queue count (0-3), then sends: a flags byte (bit 0:
/// attach an fd) and a record of bytes, written in turn to one end of a socket pair as the VMM
/// would, the messages read at the other end with `read_message` and given to the relay.
///
/// Holds: no panic; the messages read are the stream cut at the sizes their headers say, in
/// order, never above `MAX_PAYLOAD`; a clean end comes only at a message boundary; the relay
/// answers only a SET_VRING_ENABLE before SET_FEATURES, with an ACK exactly when NEED_REPLY is
/// set; it replays only the last early state of a ring the device has, once, after that
/// ring's SET_VRING_KICK.
pub fn vhost_user(data: &[u8]) {
    let mut input = Input::new(data);
    let queues = usize::from(input.byte() % 4);
    let Ok((mut reader, mut writer)) = UnixStream::pair() else {
        return;
    };
    let Ok((pipe, _pipe_writer)) = io::pipe() else {
        return;
    };
    if writer.set_nonblocking(true).is_err() {
        return;
    }
    let mut stream = Vec::new();
    for _ in 0..MAX_SENDS {
        if input.is_empty() {
            break;
        }
        let flags = input.byte();
        let chunk = input.record();
        if chunk.is_empty() {
            continue;
        }
        let sent = if flags & 1 != 0 {
            writer
                .send_with_fds(&[chunk], &[pipe.as_raw_fd()])
                .map_err(io::Error::from)
        } else {
            writer.write(chunk)
        };
        match sent {
            Ok(n) => stream.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    drop(writer);

    let mut requests = VmmRequests::new(queues);
    let mut features_seen = false;
    let mut early: Vec<Option<u32>> = vec![None; queues];
    let mut consumed = 0;
    loop {
        let msg = match read_message(&mut reader) {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                assert_eq!(consumed, stream.len(), "a clean end inside a message");
                break;
            }
            Err(_) => {
                assert!(consumed < stream.len(), "an error at a message boundary");
                break;
            }
        };
        let bytes = msg.bytes();
        let size = le32(bytes, 8).expect("a whole header") as usize;
        assert!(size <= MAX_PAYLOAD, "a payload of {size} bytes");
        assert_eq!(bytes.len(), HEADER_LEN + size);
        assert_eq!(
            stream.get(consumed..consumed + bytes.len()),
            Some(bytes),
            "a message that is not the next part of the stream"
        );
        consumed += bytes.len();

        let request = msg.request();
        if request == REQ_SET_FEATURES {
            features_seen = true;
        }
        match requests.step(&msg) {
            VmmStep::Answer(ack) => {
                assert!(
                    request == REQ_SET_VRING_ENABLE && !features_seen,
                    "answered request {request}"
                );
                assert_eq!(ack.is_some(), msg.flags() & FLAG_NEED_REPLY != 0);
                if let Some(ack) = ack {
                    let b = ack.bytes();
                    assert_eq!(le32(b, 0), Some(request));
                    assert_eq!(le32(b, 4), Some(FLAG_VERSION | FLAG_REPLY));
                    assert_eq!(b.len(), HEADER_LEN + 8);
                }
                if let (Some(index), Some(state)) = (msg.payload_u32(0), msg.payload_u32(4)) {
                    if let Some(slot) = early.get_mut(index as usize) {
                        *slot = Some(state);
                    }
                }
            }
            VmmStep::Forward(replay) => {
                assert!(
                    request != REQ_SET_VRING_ENABLE || features_seen,
                    "an early enable forwarded"
                );
                let kick_index = (request == REQ_SET_VRING_KICK && features_seen)
                    .then(|| msg.payload_u32(0).unwrap_or(u32::MAX) & 0xff);
                let expected = kick_index
                    .and_then(|i| early.get_mut(i as usize))
                    .and_then(Option::take);
                match (replay, expected) {
                    (None, None) => {}
                    (Some(replay), Some(state)) => {
                        let b = replay.bytes();
                        assert_eq!(le32(b, 0), Some(REQ_SET_VRING_ENABLE));
                        assert_eq!(le32(b, HEADER_LEN), kick_index);
                        assert_eq!(le32(b, HEADER_LEN + 4), Some(state));
                    }
                    (replay, expected) => {
                        panic!("replayed {replay:?}, expected state {expected:?}")
                    }
                }
            }
        }
    }
}

fn wire(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = request.to_le_bytes().to_vec();
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn ring(index: u32, value: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&value.to_le_bytes());
    p
}

pub fn vhost_user_seeds() -> Vec<Vec<u8>> {
    // QEMU's order: an early enable, SET_FEATURES, then the kick of each ring.
    let messages = [
        wire(1, FLAG_VERSION, &[]),
        wire(
            REQ_SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &ring(0, 1),
        ),
        wire(REQ_SET_VRING_ENABLE, FLAG_VERSION, &ring(1, 1)),
        wire(REQ_SET_FEATURES, FLAG_VERSION, &[0; 8]),
        wire(REQ_SET_VRING_KICK, FLAG_VERSION, &0u64.to_le_bytes()),
        wire(REQ_SET_VRING_KICK, FLAG_VERSION, &1u64.to_le_bytes()),
    ];
    let mut whole = vec![2, 0];
    push_record(&mut whole, &messages.concat());
    let mut one_by_one = vec![2];
    for (i, m) in messages.iter().enumerate() {
        one_by_one.push(u8::from(i % 2 == 1));
        push_record(&mut one_by_one, m);
    }
    let stream = messages.concat();
    let mut cut = vec![1, 0];
    push_record(&mut cut, &stream[..7]);
    cut.push(1);
    push_record(&mut cut, &stream[7..]);
    vec![whole, one_by_one, cut]
}
