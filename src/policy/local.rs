//! The host's own addresses: is a destination the machine netfence runs on?
//!
//! A guest that reaches one of the host's own non-loopback addresses (its public IPv4, its
//! global IPv6, a LAN or container-bridge address) reaches every host service bound to
//! 0.0.0.0 or [::]. Such an address belongs to the `host` group, not to `public` or `private`.
//!
//! The oracle: the kernel lets a socket `bind()` only to an address that is local to this
//! network namespace (any interface's address, any `local` route), and says `EADDRNOTAVAIL`
//! otherwise. A UDP socket bound to (address, port 0) and closed at once therefore answers
//! exactly and as of now: no netlink, no address list to go stale. It costs one socket per
//! probed address; policy probes only where the answer can change the group (private, public
//! and IPv4 link-local addresses; not loopback, IPv6 link-local, multicast, metadata or
//! addresses in no group).
//!
//! It fails closed: an error other than "address not available" counts as local, so the flow
//! is judged `host` and a preset blocks it. Running out of file descriptors is the likely such
//! error (a guest holding many flows), and it must not turn every decision into a misleading
//! "host blocked": the probe keeps one descriptor in reserve and spends it (then takes it back)
//! when the process has none left. One caveat: with
//! `net.ipv4.ip_nonlocal_bind` (or the IPv6 twin) set, the kernel binds to any address, so
//! every probed address counts as local and public egress is judged `host` (closed again).
//!
//! [`LocalAddrs`] makes the oracle injectable: `System` for `netfence run` and `check`,
//! `Fixed` and `None` for tests that must not depend on the machine they run on.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Mutex;

/// How the host's own addresses are recognised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalAddrs {
    /// No address is the host's own (beyond the gateway addresses). For tests and for
    /// reasoning about a config without a machine (`lint`).
    #[default]
    None,
    /// Ask the kernel ([`probe`]) each time.
    System,
    /// Exactly these addresses, compared as written, like the kernel would (policy asks about
    /// the canonical form and the written form of a destination).
    Fixed(Vec<IpAddr>),
}

impl LocalAddrs {
    /// Whether `ip` is one of the host's own addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        match self {
            LocalAddrs::None => false,
            LocalAddrs::System => probe(ip) != Probe::NotLocal,
            LocalAddrs::Fixed(addrs) => addrs.contains(&ip),
        }
    }
}

/// What the kernel said about an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A socket could bind to it: it is this host's.
    Local,
    /// "Cannot assign requested address" (or the family is not supported at all).
    NotLocal,
    /// Another error; callers treat it as local (fail closed).
    Failed(io::ErrorKind),
}

/// A descriptor held in reserve for the probe (`/dev/null`), opened at the first probe.
static RESERVE: Mutex<Option<File>> = Mutex::new(None);

fn bind_probe(ip: IpAddr) -> Result<Probe, io::Error> {
    match UdpSocket::bind(SocketAddr::new(ip, 0)) {
        Ok(sock) => {
            drop(sock);
            Ok(Probe::Local)
        }
        Err(e) => match e.raw_os_error() {
            Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT) => Ok(Probe::NotLocal),
            _ => Err(e),
        },
    }
}

/// Asks the kernel whether `ip` is an address of this host (this network namespace) by binding
/// a UDP socket to it, port 0; the socket is closed before this returns. When the process is
/// out of descriptors the reserved one is closed for the probe and reopened after it.
pub fn probe(ip: IpAddr) -> Probe {
    let mut reserve = RESERVE.lock().unwrap_or_else(|p| p.into_inner());
    if reserve.is_none() {
        *reserve = File::open("/dev/null").ok();
    }
    match bind_probe(ip) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::EMFILE) && reserve.take().is_some() => {
            let result = bind_probe(ip).unwrap_or_else(|e| Probe::Failed(e.kind()));
            *reserve = File::open("/dev/null").ok();
            result
        }
        Err(e) => Probe::Failed(e.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn system_probe_knows_loopback_and_not_documentation_space() {
        // 127.0.0.0/8 is one `local` route: every address in it binds, not only 127.0.0.1.
        assert_eq!(probe(ip("127.0.0.2")), Probe::Local);
        assert_eq!(probe(ip("127.0.0.1")), Probe::Local);
        assert_eq!(probe(ip("203.0.113.7")), Probe::NotLocal);
        assert_eq!(probe(ip("2001:db8::7")), Probe::NotLocal);
        assert!(LocalAddrs::System.is_local(ip("127.0.0.2")));
        assert!(!LocalAddrs::System.is_local(ip("203.0.113.7")));
    }

    #[test]
    fn fixed_and_none() {
        let fixed = LocalAddrs::Fixed(vec![ip("192.0.2.50"), ip("2001:db8::50")]);
        assert!(fixed.is_local(ip("192.0.2.50")));
        assert!(fixed.is_local(ip("2001:db8::50")));
        assert!(!fixed.is_local(ip("64:ff9b::c000:232")));
        assert!(!fixed.is_local(ip("192.0.2.51")));
        assert!(!fixed.is_local(ip("2001:db8::51")));
        assert!(!LocalAddrs::None.is_local(ip("127.0.0.1")));
        assert!(!LocalAddrs::default().is_local(ip("192.0.2.50")));
    }
}
