//! Loopback servers for the host side of flows. Every server binds 127.0.0.1:0 (or [::1]:0 with
//! the `*6` constructors, for IPv6 flows), runs on its own thread with blocking I/O bounded by
//! timeouts, and reports what happened over a channel.

use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::EventFd;

/// IPv4 and IPv6 loopback addresses servers bind to.
pub const LOOPBACK4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const LOOPBACK6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// I/O timeout of server threads: long enough for slow CI, bounded so nothing hangs forever.
pub const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A TCP server that echoes every connection until EOF, then closes.
pub struct TcpEchoServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TcpEchoServer {
    pub fn start() -> TcpEchoServer {
        Self::start_on(LOOPBACK4)
    }

    /// An echo server on [::1].
    pub fn start6() -> TcpEchoServer {
        Self::start_on(LOOPBACK6)
    }

    pub fn start_on(ip: IpAddr) -> TcpEchoServer {
        let l = TcpListener::bind((ip, 0)).expect("bind echo server");
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (acc, st) = (accepted.clone(), stop.clone());
        thread::spawn(move || {
            for conn in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                acc.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    c.set_read_timeout(Some(SERVER_IO_TIMEOUT)).ok();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        });
        TcpEchoServer {
            addr,
            accepted,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so the thread can exit.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// A one-connection TCP server running `handler` on the accepted stream; the handler's result
/// comes back through [`OneShotServer::join`].
pub struct OneShotServer<T> {
    pub addr: SocketAddr,
    rx: mpsc::Receiver<Result<T, String>>,
    /// Written when the handler finished, so a guest poll loop wakes up for it.
    done: Arc<EventFd>,
}

impl<T: Send + 'static> OneShotServer<T> {
    pub fn start(handler: impl FnOnce(TcpStream) -> T + Send + 'static) -> OneShotServer<T> {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind server");
        Self::start_on(l, handler)
    }

    /// Like [`start`](Self::start) on [::1].
    pub fn start6(handler: impl FnOnce(TcpStream) -> T + Send + 'static) -> OneShotServer<T> {
        let l = TcpListener::bind("[::1]:0").expect("bind server on [::1]");
        Self::start_on(l, handler)
    }

    /// Like [`start`](Self::start) on a listener the caller prepared (socket options...).
    pub fn start_on(
        l: TcpListener,
        handler: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> OneShotServer<T> {
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        let done = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let done2 = done.clone();
        thread::spawn(move || {
            l.set_nonblocking(false).ok();
            let r = match accept_with_timeout(&l, SERVER_IO_TIMEOUT) {
                Ok(s) => {
                    s.set_read_timeout(Some(SERVER_IO_TIMEOUT)).ok();
                    s.set_write_timeout(Some(SERVER_IO_TIMEOUT)).ok();
                    Ok(handler(s))
                }
                Err(e) => Err(e),
            };
            let _ = tx.send(r);
            let _ = done2.write(1);
        });
        OneShotServer { addr, rx, done }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits for the handler's result.
    pub fn join(self, timeout: Duration) -> Result<T, String> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => Err(format!("server did not finish within {timeout:?}")),
        }
    }

    /// Waits for the handler's result while keeping the guest stack running (it has to, for
    /// queued data and FINs to reach the server).
    pub fn join_polling(self, g: &mut super::Guest, timeout: Duration) -> Result<T, String> {
        let deadline = std::time::Instant::now() + timeout;
        let fd = self.done.as_raw_fd();
        g.fe().extra_wait_fds.push(fd);
        let r = g.poll_until(deadline, |_| self.rx.try_recv().ok());
        g.fe().extra_wait_fds.retain(|&f| f != fd);
        match r {
            Some(r) => r,
            None => Err(format!("server did not finish within {timeout:?}")),
        }
    }

    /// The handler's result if it already finished.
    pub fn try_join(&self) -> Option<Result<T, String>> {
        self.rx.try_recv().ok()
    }
}

/// accept(2) bounded by a timeout (poll on the listening socket).
pub fn accept_with_timeout(l: &TcpListener, timeout: Duration) -> Result<TcpStream, String> {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if r <= 0 {
        return Err(format!("no connection within {timeout:?}"));
    }
    l.accept()
        .map(|(s, _)| s)
        .map_err(|e| format!("accept: {e}"))
}

/// Reads until EOF (bounded by the stream's read timeout).
pub fn read_to_eof(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut v = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(v),
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read after {} bytes: {e}", v.len())),
        }
    }
}

/// A UDP server echoing every datagram back to its sender, counting them.
pub struct UdpEchoServer {
    pub addr: SocketAddr,
    pub received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpEchoServer {
    pub fn start() -> UdpEchoServer {
        Self::start_on(LOOPBACK4)
    }

    /// A UDP echo server on [::1].
    pub fn start6() -> UdpEchoServer {
        Self::start_on(LOOPBACK6)
    }

    pub fn start_on(ip: IpAddr) -> UdpEchoServer {
        let s = UdpSocket::bind((ip, 0)).expect("bind udp");
        let addr = s.local_addr().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).ok();
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (rc, st) = (received.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        rc.fetch_add(1, Ordering::SeqCst);
                        let _ = s.send_to(&buf[..n], from);
                    }
                    Err(_) => continue,
                }
            }
        });
        UdpEchoServer {
            addr,
            received,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A loopback port with nothing listening (connecting to it is refused).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let p = l.local_addr().unwrap().port();
    drop(l);
    p
}

/// Deterministic test data of `n` bytes (different per seed).
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    super::frames::Rng::new(seed).bytes(n)
}

/// Why two byte strings differ (lengths, first differing offset, where the bytes found there
/// came from), or None if they are equal. For failure messages of byte-exact transfers.
pub fn mismatch(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let mut s = format!(
        "got {} bytes, want {}; first difference at offset {first}",
        got.len(),
        want.len()
    );
    if first < got.len() {
        let w = &got[first..(first + 32).min(got.len())];
        match want.windows(w.len()).position(|x| x == w) {
            Some(p) => s.push_str(&format!(
                "; the bytes received there were sent at offset {p}"
            )),
            None => s.push_str("; the bytes received there were never sent"),
        }
    }
    if first < want.len() {
        let w = &want[first..(first + 32).min(want.len())];
        match got.windows(w.len()).position(|x| x == w) {
            Some(p) => s.push_str(&format!("; the bytes sent there arrived at offset {p}")),
            None => s.push_str("; the bytes sent there never arrived"),
        }
    }
    Some(s)
}

/// A loopback TCP listener and UDP socket on the same port that only count what reaches them.
/// Tests map destinations that must never be reached (denied ones, garbage) to it, so a policy
/// bug shows up as a count here instead of as traffic leaving the machine.
pub struct Tripwire {
    /// The loopback address it listens on (127.0.0.1 or ::1).
    pub ip: IpAddr,
    pub port: u16,
    pub tcp_accepted: Arc<AtomicUsize>,
    pub udp_received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Tripwire {
    pub fn start() -> Tripwire {
        Self::start_on(LOOPBACK4)
    }

    /// A tripwire on [::1], for IPv6 destinations.
    pub fn start6() -> Tripwire {
        Self::start_on(LOOPBACK6)
    }

    pub fn start_on(ip: IpAddr) -> Tripwire {
        let (l, u) = loop {
            let l = TcpListener::bind((ip, 0)).expect("bind tripwire");
            let port = l.local_addr().unwrap().port();
            if let Ok(u) = UdpSocket::bind((ip, port)) {
                break (l, u);
            }
        };
        let port = l.local_addr().unwrap().port();
        let tcp_accepted = Arc::new(AtomicUsize::new(0));
        let udp_received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, st) = (tcp_accepted.clone(), stop.clone());
        thread::spawn(move || {
            for c in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if c.is_ok() {
                    t.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let (ur, st) = (udp_received.clone(), stop.clone());
        u.set_read_timeout(Some(Duration::from_millis(500))).ok();
        thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                if u.recv_from(&mut buf).is_ok() {
                    ur.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Tripwire {
            ip,
            port,
            tcp_accepted,
            udp_received,
            stop,
        }
    }

    /// `--map` arguments sending each of `addrs` (all ports) to the tripwire.
    pub fn map_args(&self, addrs: &[std::net::Ipv4Addr]) -> Vec<String> {
        let addrs: Vec<IpAddr> = addrs.iter().map(|&a| IpAddr::V4(a)).collect();
        self.map_args_ip(&addrs)
    }

    /// `--map` arguments sending each of `addrs` (either family, all ports) to the tripwire;
    /// IPv6 guest addresses are written in brackets.
    pub fn map_args_ip(&self, addrs: &[IpAddr]) -> Vec<String> {
        let host = SocketAddr::new(self.ip, self.port);
        addrs
            .iter()
            .flat_map(|a| {
                let guest = match a {
                    IpAddr::V4(v4) => v4.to_string(),
                    IpAddr::V6(v6) => format!("[{v6}]"),
                };
                ["--map".to_string(), format!("{guest}={host}")]
            })
            .collect()
    }

    pub fn hits(&self) -> (usize, usize) {
        (
            self.tcp_accepted.load(Ordering::SeqCst),
            self.udp_received.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Tripwire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(
            &SocketAddr::new(self.ip, self.port),
            Duration::from_millis(200),
        );
    }
}

/// What [`OneShotServer::exchange`] saw: whether the bytes read to EOF were the expected upload
/// (`Ok(None)`, or where they differ), and whether its own download was written and shut.
pub type Exchange = (Result<Option<String>, String>, Result<(), String>);

impl OneShotServer<Exchange> {
    /// A server that writes `down` and shuts its sending side while it reads to EOF and
    /// compares what it read with `up`: both directions at once, each with its half-close.
    pub fn exchange(up: Vec<u8>, down: Vec<u8>) -> OneShotServer<Exchange> {
        OneShotServer::start(move |mut s| {
            let mut w = s.try_clone().unwrap();
            let writer = thread::spawn(move || {
                w.write_all(&down)
                    .map_err(|e| format!("server write: {e}"))?;
                w.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| format!("shutdown: {e}"))
            });
            let got = read_to_eof(&mut s);
            let written = writer.join().unwrap();
            (got.map(|g| mismatch(&g, &up)), written)
        })
    }
}
