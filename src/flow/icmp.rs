//! Guest pings carried over unprivileged ICMP sockets (`SOCK_DGRAM`, `IPPROTO_ICMP`).
//!
//! One host socket per (guest source, destination, echo identifier). The kernel gives the socket
//! its own identifier on the wire; replies are turned back into echo replies with the guest's
//! identifier, from the destination the guest pinged. This needs no privilege, only that the
//! process's group is inside `net.ipv4.ping_group_range` (scripts/install-deps.sh sets it).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Idle time after which an echo session is closed.
pub const ICMP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// (guest source, guest-visible destination, echo identifier)
pub type EchoKey = (Ipv4Addr, Ipv4Addr, u16);

pub struct EchoFlow {
    pub token: u64,
    pub guest: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ident: u16,
    pub host: Socket,
    pub last_active: Instant,
}

/// Opens a non-blocking ICMP datagram socket connected to `target`.
pub fn open_host(target: Ipv4Addr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::from(SocketAddr::V4(SocketAddrV4::new(
        target, 0,
    ))))?;
    Ok(socket)
}

/// An echo request as the kernel wants it on an ICMP socket (it fills in id and checksum).
pub fn echo_request(seq: u16, data: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(8 + data.len());
    msg.extend_from_slice(&[8, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(data);
    msg
}

/// Parses what an ICMP socket returns: `(seq, data)` of an echo reply.
pub fn parse_echo_reply(msg: &[u8]) -> Option<(u16, &[u8])> {
    if msg.len() < 8 || msg[0] != 0 || msg[1] != 0 {
        return None;
    }
    Some((u16::from_be_bytes([msg[6], msg[7]]), &msg[8..]))
}

impl EchoFlow {
    pub fn idle(&self, now: Instant) -> bool {
        now.duration_since(self.last_active) > ICMP_IDLE_TIMEOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_reply_parsing_checks_type_and_length() {
        assert_eq!(
            parse_echo_reply(&[0, 0, 0, 0, 0, 7, 0, 5, b'x']),
            Some((5, &b"x"[..]))
        );
        assert_eq!(parse_echo_reply(&[8, 0, 0, 0, 0, 7, 0, 5]), None);
        assert_eq!(parse_echo_reply(&[0, 0, 0]), None);
        assert_eq!(
            echo_request(0x0102, b"ab"),
            vec![8, 0, 0, 0, 0, 0, 1, 2, b'a', b'b']
        );
    }
}
