//! Guest pings carried over unprivileged ICMP sockets (`SOCK_DGRAM`, `IPPROTO_ICMP` or
//! `IPPROTO_ICMPV6`, by the family of the host-side target).
//!
//! One host socket per (guest source, destination, echo identifier). The kernel gives the socket
//! its own identifier on the wire; replies are turned back into echo replies with the guest's
//! identifier, from the destination the guest pinged. This needs no privilege, only that the
//! process's group is inside `net.ipv4.ping_group_range`, which covers both families
//! (scripts/install-deps.sh sets it).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::OpenError;

/// (guest source, guest-visible destination, echo identifier)
pub type EchoKey = (IpAddr, IpAddr, u16);

pub struct EchoFlow {
    pub token: u64,
    pub guest: IpAddr,
    pub dst: IpAddr,
    pub ident: u16,
    /// Where the host socket is connected (its family decides the ICMP message types).
    pub target: IpAddr,
    pub host: Socket,
    /// The host socket reported readable and has not yet said `WouldBlock`.
    pub readable: bool,
    pub last_active: Instant,
    /// The rule (or reason) that allowed the flow, for the operator (`ctl flows`).
    pub rule: String,
    pub started: Instant,
    /// Echo data bytes sent to the host and relayed to the guest.
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
}

/// Opens a non-blocking ICMP (or ICMPv6, for an IPv6 target) datagram socket to `target`.
pub fn open_host(target: IpAddr) -> Result<Socket, OpenError> {
    let (domain, protocol) = match target {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let socket =
        Socket::new(domain, Type::DGRAM.cloexec(), Some(protocol)).map_err(OpenError::Socket)?;
    socket.set_nonblocking(true).map_err(OpenError::Socket)?;
    socket
        .connect(&SockAddr::from(SocketAddr::new(target, 0)))
        .map_err(OpenError::Connect)?;
    Ok(socket)
}

/// ICMP message types of an echo request and reply, by the host socket's family.
fn echo_types(target: IpAddr) -> (u8, u8) {
    match target {
        IpAddr::V4(_) => (8, 0),
        IpAddr::V6(_) => (128, 129),
    }
}

/// An echo request as the kernel wants it on an ICMP socket to `target` (it fills in id and
/// checksum).
pub fn echo_request(target: IpAddr, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(8 + data.len());
    msg.extend_from_slice(&[echo_types(target).0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(data);
    msg
}

/// Parses what an ICMP socket to `target` returns: `(seq, data)` of an echo reply.
pub fn parse_echo_reply(target: IpAddr, msg: &[u8]) -> Option<(u16, &[u8])> {
    if msg.len() < 8 || msg[0] != echo_types(target).1 || msg[1] != 0 {
        return None;
    }
    Some((u16::from_be_bytes([msg[6], msg[7]]), &msg[8..]))
}

impl EchoFlow {
    pub fn idle(&self, now: Instant, timeout: Duration) -> bool {
        now.duration_since(self.last_active) > timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_reply_parsing_checks_type_and_length() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(
            parse_echo_reply(v4, &[0, 0, 0, 0, 0, 7, 0, 5, b'x']),
            Some((5, &b"x"[..]))
        );
        assert_eq!(parse_echo_reply(v4, &[8, 0, 0, 0, 0, 7, 0, 5]), None);
        assert_eq!(parse_echo_reply(v4, &[0, 0, 0]), None);
        assert_eq!(parse_echo_reply(v6, &[0, 0, 0, 0, 0, 7, 0, 5]), None);
        assert_eq!(
            parse_echo_reply(v6, &[129, 0, 0, 0, 0, 7, 0, 5]),
            Some((5, &b""[..]))
        );
        assert_eq!(
            echo_request(v4, 0x0102, b"ab"),
            vec![8, 0, 0, 0, 0, 0, 1, 2, b'a', b'b']
        );
        assert_eq!(echo_request(v6, 1, b"")[0], 128);
    }
}
