//! Published ports: host listeners whose connections and datagrams are carried into the guest.
//!
//! Theory of operation. `netfence run` binds every `-p/--publish` (config `ports`) at start,
//! before it serves any VMM: a port in use, a privileged port without the right or an address
//! that is not this host's stops netfence with exit status 2 and a message naming the binding.
//! The listeners live as long as the process, across VMM connections.
//!
//! While a VMM is connected its link holds a [`Claim`] on the ports: the link's worker watches
//! the listeners in its own epoll and carries each accepted connection (or each new UDP peer)
//! into the guest as a flow, judged by the ingress rules (see `flow::inbound`). While no link
//! holds the claim (before the first VMM, between two), a background thread answers for the
//! ports: each connection is reset at once (SO_LINGER 0) and each datagram dropped, and both are
//! logged (rate-limited), so a host client never hangs on a port with no VM behind it.
//!
//! The claim is a hand-over under one mutex: the thread drains a ready listener only while it
//! holds the mutex and sees no claim, and a link takes the claim under the same mutex (and wakes
//! the thread out of its `poll`), so no connection is accepted by both or by neither.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{PortProtocol, PublishSpec};
use crate::observe::LogGate;

/// Pending connections a published TCP port's listener queues (the kernel caps it at
/// net.core.somaxconn). A burst of clients beyond it is answered with SYN cookies or dropped
/// SYNs that the clients retry a second later: roomy enough for a burst, and each waiting
/// connection costs the kernel a little memory, not netfence.
const BACKLOG: i32 = 1024;
/// Connections or datagrams the refusing thread takes from one ready listener per wake-up.
const REFUSALS_PER_WAKE: usize = 64;
/// How long the refusing thread's `poll` waits before it looks at the claim again.
const REFUSER_POLL: Duration = Duration::from_secs(1);

/// A published port's bound socket.
pub enum Listening {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// One published port: what the user asked for and the socket bound for it.
pub struct PublishedPort {
    pub spec: PublishSpec,
    pub socket: Listening,
    /// The address the socket is bound to.
    pub local: SocketAddr,
}

impl PublishedPort {
    pub fn fd(&self) -> RawFd {
        match &self.socket {
            Listening::Tcp(l) => l.as_raw_fd(),
            Listening::Udp(u) => u.as_raw_fd(),
        }
    }
}

/// Who answers for the ports now.
#[derive(Default)]
struct Owner {
    /// The claim in force (a link's), if any.
    held: Option<u64>,
    /// The last claim handed out.
    issued: u64,
}

/// Every published port of this process, and who serves them.
pub struct PublishedPorts {
    ports: Vec<PublishedPort>,
    owner: Mutex<Owner>,
    released: Condvar,
    /// Written when a link claims the ports: the refusing thread leaves its `poll`.
    wake: EventFd,
}

/// Binds one published port (non-blocking); the error names it and says what to do.
fn bind_one(spec: &PublishSpec) -> Result<PublishedPort, String> {
    let addr = SocketAddr::new(spec.bind, spec.host_port);
    let what = format!("publish {spec}");
    let (ty, proto) = match spec.protocol {
        PortProtocol::Tcp => (Type::STREAM, Protocol::TCP),
        PortProtocol::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(addr), ty.cloexec(), Some(proto))
        .map_err(|e| format!("{what}: cannot make a socket: {e}"))?;
    let setup = || -> io::Result<()> {
        if addr.is_ipv6() {
            // [::] means IPv6 only: 0.0.0.0 is a binding of its own.
            socket.set_only_v6(true)?;
        }
        if spec.protocol == PortProtocol::Tcp {
            // A restart must not wait for the last run's connections in TIME_WAIT (a port
            // another process listens on is still refused).
            socket.set_reuse_address(true)?;
        }
        socket.set_nonblocking(true)
    };
    setup().map_err(|e| format!("{what}: cannot set up the socket: {e}"))?;
    socket.bind(&SockAddr::from(addr)).map_err(|e| {
        let port = spec.host_port;
        match e.kind() {
            io::ErrorKind::AddrInUse => format!(
                "{what}: {addr} ({}) is in use by another process; choose another host port",
                spec.protocol
            ),
            io::ErrorKind::PermissionDenied => format!(
                "{what}: binding port {port} needs privileges (root or CAP_NET_BIND_SERVICE, \
                 or a lower sysctl net.ipv4.ip_unprivileged_port_start); choose a port >= 1024"
            ),
            io::ErrorKind::AddrNotAvailable => format!(
                "{what}: {} is not an address of this host; use 127.0.0.1, ::1, 0.0.0.0 or \
                 one of the host's addresses",
                spec.bind
            ),
            _ => format!("{what}: cannot bind {addr}: {e}"),
        }
    })?;
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(addr);
    let listening = match spec.protocol {
        PortProtocol::Tcp => {
            socket
                .listen(BACKLOG)
                .map_err(|e| format!("{what}: cannot listen on {addr}: {e}"))?;
            Listening::Tcp(socket.into())
        }
        PortProtocol::Udp => Listening::Udp(socket.into()),
    };
    Ok(PublishedPort {
        spec: *spec,
        socket: listening,
        local,
    })
}

impl PublishedPorts {
    /// Binds every port of `specs`. The first that cannot be bound is the error (exit 2).
    pub fn bind(specs: &[PublishSpec]) -> Result<Arc<PublishedPorts>, String> {
        let ports = specs.iter().map(bind_one).collect::<Result<Vec<_>, _>>()?;
        let wake =
            EventFd::new(EFD_NONBLOCK).map_err(|e| format!("published ports: eventfd: {e}"))?;
        for p in &ports {
            info!(
                listen = %p.local, proto = %p.spec.protocol, guest_port = p.spec.guest_port,
                "published port bound"
            );
        }
        Ok(Arc::new(PublishedPorts {
            ports,
            owner: Mutex::new(Owner::default()),
            released: Condvar::new(),
            wake,
        }))
    }

    pub fn ports(&self) -> &[PublishedPort] {
        &self.ports
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    fn owner(&self) -> MutexGuard<'_, Owner> {
        self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the ports for a link: until the claim is dropped, its worker accepts on them.
    /// A newer claim replaces an older one that was never released (a link left behind).
    pub fn claim(self: &Arc<Self>) -> Claim {
        let id = {
            let mut owner = self.owner();
            owner.issued += 1;
            owner.held = Some(owner.issued);
            owner.issued
        };
        let _ = self.wake.write(1);
        Claim {
            ports: self.clone(),
            id,
        }
    }

    /// Starts the thread that refuses connections while no link holds the claim.
    pub fn start_refuser(self: &Arc<Self>) -> io::Result<()> {
        if self.ports.is_empty() {
            return Ok(());
        }
        let ports = self.clone();
        thread::Builder::new()
            .name("netfence-ports".into())
            .spawn(move || ports.refuse_while_unclaimed())
            .map(|_| ())
    }

    fn refuse_while_unclaimed(&self) {
        let mut log = LogGate::new(5, Duration::from_secs(10));
        let mut pollfds: Vec<libc::pollfd> = self
            .ports
            .iter()
            .map(|p| p.fd())
            .chain(std::iter::once(self.wake.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            {
                let mut owner = self.owner();
                while owner.held.is_some() {
                    owner = self.released.wait(owner).unwrap_or_else(|p| p.into_inner());
                }
            }
            for p in pollfds.iter_mut() {
                p.revents = 0;
            }
            // SAFETY: `pollfds` is a valid array of `pollfd` of the length given; the fds stay
            // open as long as `self` (the listeners and the eventfd are owned by it).
            let n = unsafe {
                libc::poll(
                    pollfds.as_mut_ptr(),
                    pollfds.len() as libc::nfds_t,
                    REFUSER_POLL.as_millis() as libc::c_int,
                )
            };
            if n <= 0 {
                continue;
            }
            let _ = self.wake.read();
            let owner = self.owner();
            if owner.held.is_some() {
                continue;
            }
            for (port, pfd) in self.ports.iter().zip(&pollfds) {
                if pfd.revents != 0 {
                    refuse_pending(port, &mut log);
                }
            }
            drop(owner);
        }
    }
}

/// Takes what waits on `port` while no VM is attached: connections are reset, datagrams dropped.
fn refuse_pending(port: &PublishedPort, log: &mut LogGate) {
    for _ in 0..REFUSALS_PER_WAKE {
        let peer = match &port.socket {
            Listening::Tcp(l) => match l.accept() {
                Ok((stream, peer)) => {
                    reset(stream);
                    peer
                }
                Err(_) => return,
            },
            Listening::Udp(u) => {
                let mut buf = [0u8; 1];
                match u.recv_from(&mut buf) {
                    Ok((_, peer)) => peer,
                    Err(_) => return,
                }
            }
        };
        if let Some(suppressed) = log.admit(Instant::now()) {
            info!(listen = %port.local, proto = %port.spec.protocol, peer = %peer, suppressed,
                "published port: refused, no VM is attached");
        }
    }
}

/// Closes a host connection with an RST (SO_LINGER 0): the client sees a refusal at once.
pub fn reset(stream: TcpStream) {
    let socket = Socket::from(stream);
    if let Err(e) = socket.set_linger(Some(Duration::ZERO)) {
        warn!(error = %e, "cannot set SO_LINGER on a refused connection");
    }
}

/// A link's hold on the published ports; dropping it hands them back to the refusing thread.
pub struct Claim {
    ports: Arc<PublishedPorts>,
    id: u64,
}

impl Claim {
    pub fn ports(&self) -> &Arc<PublishedPorts> {
        &self.ports
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut owner = self.ports.owner();
        if owner.held == Some(self.id) {
            owner.held = None;
            self.ports.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{IpAddr, Ipv4Addr};

    fn spec(port: u16, protocol: PortProtocol) -> PublishSpec {
        PublishSpec {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port: port,
            guest_port: 80,
            protocol,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn a_port_in_use_is_refused_with_its_name() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = PublishedPorts::bind(&[spec(port, PortProtocol::Tcp)])
            .err()
            .expect("in use");
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(e.contains("in use"), "{e}");
    }

    #[test]
    fn an_address_not_of_this_host_is_refused() {
        let mut s = spec(free_port(), PortProtocol::Tcp);
        s.bind = "192.0.2.55".parse().unwrap();
        let e = PublishedPorts::bind(&[s]).err().expect("not ours");
        assert!(e.contains("not an address of this host"), "{e}");
    }

    #[test]
    fn unclaimed_ports_refuse_and_a_claim_stops_that() {
        let port = free_port();
        let ports = PublishedPorts::bind(&[spec(port, PortProtocol::Tcp)]).unwrap();
        ports.start_refuser().unwrap();
        // Unclaimed: the connection is accepted and reset by the refusing thread.
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        let got = c.read(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{got:?}"
        );
        // Claimed: nobody accepts (the link would); the connection waits in the backlog.
        let claim = ports.claim();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let got = c.read(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "{got:?}"
        );
        // Released: the waiting connection is refused.
        drop(claim);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let got = c.read(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{got:?}"
        );
    }

    #[test]
    fn an_older_claim_cannot_release_a_newer_one() {
        let ports = PublishedPorts::bind(&[spec(free_port(), PortProtocol::Udp)]).unwrap();
        let old = ports.claim();
        let new = ports.claim();
        drop(old);
        assert_eq!(ports.owner().held, Some(new.id));
        drop(new);
        assert_eq!(ports.owner().held, None);
    }
}
