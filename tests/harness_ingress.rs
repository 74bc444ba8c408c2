//! Published ports end to end: host clients on 127.0.0.1 / ::1 reach servers in the harness
//! guest through `-p`, under the ingress rules, with every refusal prompt.
//!
//! The harness guest is single-threaded: each host client runs on a thread of its own while
//! the test's thread polls the guest until the client is done.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::process::close_and_count;
use common::*;
use smoltcp::socket::tcp::State;
use smoltcp::wire::{IpAddress, IpEndpoint};

/// A port free on `ip` now (bound and released; the test binds it again at once).
fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn publish(spec: String) -> [String; 2] {
    ["-p".to_string(), spec]
}

/// Runs `f` on a thread of its own (a host client).
fn client<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    thread::spawn(f)
}

/// Serves the guest until `done` holds (or LONG passed); whether it held. The guest's waits
/// are cut into short slices: what the host clients' threads do wakes no frontend eventfd.
fn serve_until(g: &mut Guest, mut done: impl FnMut(&mut Guest) -> bool) -> bool {
    let end = deadline(LONG);
    loop {
        let slice = deadline(Duration::from_millis(20)).min(end);
        if g.poll_until(slice, |g| done(g).then_some(())).is_some() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
    }
}

/// Serves the guest until client `h` finished, then joins it.
fn await_client<T>(g: &mut Guest, h: JoinHandle<T>) -> T {
    assert!(
        serve_until(g, |_| h.is_finished()),
        "the host client did not finish"
    );
    h.join().expect("the host client panicked")
}

/// What a host client saw of a connection it made and then read from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// The connection was reset (refused by netfence or the guest).
    Reset,
    /// It read these bytes, then EOF.
    Data(Vec<u8>),
    /// Something else (an error kind, a timeout).
    Other(String),
}

/// Connects to `addr`, sends `send` (if any) and reads to EOF or error.
fn connect_and_read(addr: SocketAddr, send: &'static [u8]) -> Seen {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return Seen::Other(format!("connect: {e}")),
    };
    s.set_read_timeout(Some(LONG)).unwrap();
    // A reset that arrives before the write is reported by the write (ECONNRESET, then EPIPE);
    // the read after it would see a plain EOF.
    if let Err(e) = s.write_all(send) {
        return match e.kind() {
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => Seen::Reset,
            _ => Seen::Other(format!("write: {e}")),
        };
    }
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => Seen::Data(got),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Seen::Reset,
        Err(e) => Seen::Other(format!("{:?}: {e}", e.kind())),
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// 1 MiB each way through a published port, byte-exact, with a half-close each way: the client
/// sends its MiB and shuts down its sending side, the guest reads to that FIN, answers with its
/// own MiB and closes. The guest sees the client come from the gateway.
#[test]
fn a_published_tcp_port_carries_a_mebibyte_each_way_with_half_close() {
    let hp = free_port("127.0.0.1");
    let nf = Netfence::spawn(&publish(format!("{hp}:8080")));
    let mut g = guest_up(&nf);
    let mark = nf.log_mark();
    let h = g.tcp_socket(256 * 1024, 256 * 1024);
    g.tcp(h).listen(8080).unwrap();
    let up = pattern(1 << 20, 1);
    let down = pattern(1 << 20, 7);
    let (up_c, down_c) = (up.clone(), down.clone());
    let c = client(move || {
        let mut s = TcpStream::connect(("127.0.0.1", hp)).unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        s.write_all(&up_c).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).map(|_| got == down_c)
    });
    let established = g.tcp_wait_state(h, &[State::Established], deadline(SHORT));
    assert!(established.is_some(), "no connection\n{}", nf.log_text());
    let remote = g.tcp(h).remote_endpoint().unwrap();
    assert_eq!(remote.addr, IpAddress::Ipv4(GATEWAY));
    let (got, fin) = g.tcp_recv_to_eof(h, deadline(LONG));
    assert!(fin, "no FIN after {} bytes", got.len());
    assert!(
        got == up,
        "host->guest bytes differ ({} received)",
        got.len()
    );
    g.tcp_send_all(h, &down, deadline(LONG)).unwrap();
    g.tcp_shutdown_write(h);
    let matched = await_client(&mut g, c).expect("the client's read failed");
    assert!(matched, "guest->host bytes differ");
    let d = nf
        .wait_for_line(mark, SHORT, |l| l.contains("direction=ingress"))
        .unwrap_or_else(|| panic!("no ingress decision\n{}", nf.log_text()));
    assert!(d.contains("action=allow"), "{d}");
    assert!(d.contains(&format!("dst={GUEST_IP}:8080")), "{d}");
}

/// Two clients of one published UDP port at once: each datagram reaches the guest from a
/// gateway port of its own, and each answer goes back to the client it answers.
#[test]
fn a_published_udp_port_keeps_one_session_per_client() {
    let hp = free_udp_port();
    let nf = Netfence::spawn(&publish(format!("{hp}:5353/udp")));
    let mut g = guest_up(&nf);
    let sock = g.udp_bind(5353);
    let clients: Vec<JoinHandle<Vec<u8>>> = ["alpha", "beta"]
        .into_iter()
        .map(|name| {
            client(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_read_timeout(Some(LONG)).unwrap();
                s.send_to(name.as_bytes(), ("127.0.0.1", hp)).unwrap();
                let mut buf = [0u8; 256];
                let (n, from) = s.recv_from(&mut buf).unwrap();
                assert_eq!(from.port(), hp, "the answer came from another port");
                buf[..n].to_vec()
            })
        })
        .collect();
    let mut sources = Vec::new();
    for _ in 0..2 {
        let (data, from) = g
            .udp_recv(sock, deadline(SHORT))
            .unwrap_or_else(|| panic!("no datagram\n{}", nf.log_text()));
        assert_eq!(from.addr, IpAddress::Ipv4(GATEWAY));
        let mut answer = b"echo ".to_vec();
        answer.extend_from_slice(&data);
        g.udp_send(sock, GATEWAY, from.port, &answer);
        sources.push(from.port);
    }
    assert_ne!(sources[0], sources[1], "two clients shared a session");
    let mut answers: Vec<String> = clients
        .into_iter()
        .map(|c| String::from_utf8(await_client(&mut g, c)).unwrap())
        .collect();
    answers.sort();
    assert_eq!(answers, ["echo alpha", "echo beta"]);
}

/// An ingress rule that denies the client, and `default_ingress = "deny"`: the client is reset
/// at once and the decision is logged with its reason; the guest never sees a SYN.
#[test]
fn ingress_denied_by_rule_or_default_is_reset_and_logged() {
    let dir = TempDir::new("nf-ingress");
    let deny_default = dir.path().join("deny.toml");
    std::fs::write(
        &deny_default,
        "[policy]\ndefault_egress = \"deny\"\ndefault_ingress = \"deny\"\n",
    )
    .unwrap();
    let cases: [(Vec<String>, &str); 2] = [
        (
            vec!["--net-rule".into(), "deny:ingress@loopback:tcp:8080".into()],
            "deny:ingress@loopback:tcp:8080",
        ),
        (
            vec!["--config".into(), deny_default.display().to_string()],
            "default ingress deny",
        ),
    ];
    for (args, reason) in cases {
        let hp = free_port("127.0.0.1");
        let mut all = args.clone();
        all.extend(publish(format!("{hp}:8080")));
        let nf = Netfence::spawn(&all);
        let mut g = guest_up(&nf);
        let h = g.tcp_socket(4096, 4096);
        g.tcp(h).listen(8080).unwrap();
        let c = client(move || connect_and_read(SocketAddr::from(([127, 0, 0, 1], hp)), b""));
        assert_eq!(await_client(&mut g, c), Seen::Reset, "{args:?}");
        assert_eq!(
            g.tcp(h).state(),
            State::Listen,
            "the guest saw the connection"
        );
        let d = nf
            .wait_for_line(0, SHORT, |l| {
                l.contains("decision") && l.contains("ingress")
            })
            .unwrap_or_else(|| panic!("no decision\n{}", nf.log_text()));
        assert!(d.contains("action=deny"), "{d}");
        assert!(d.contains(reason), "{args:?}: {d}");
    }
}

/// Nothing listens on the guest port: the guest resets netfence's SYN and the client is reset,
/// promptly; the refusal is logged and counted.
#[test]
fn a_closed_guest_port_resets_the_client() {
    let hp = free_port("127.0.0.1");
    let nf = Netfence::spawn(&publish(format!("{hp}:9999")));
    let mut g = guest_up(&nf);
    let mark = nf.log_mark();
    let c = client(move || connect_and_read(SocketAddr::from(([127, 0, 0, 1], hp)), b"hi"));
    assert_eq!(await_client(&mut g, c), Seen::Reset);
    assert!(
        nf.wait_for_log_after(mark, "the guest refused the connection", SHORT)
            .is_some(),
        "{}",
        nf.log_text()
    );
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("inbound-guest-refused"), 1);
}

/// Before the guest took its lease netfence has nowhere to send the connection: the client is
/// reset at once, with a decision that says why. After the lease the same port works.
#[test]
fn before_the_lease_a_client_is_refused_at_once() {
    let hp = free_port("127.0.0.1");
    let nf = Netfence::spawn(&publish(format!("{hp}:8080")));
    let mut g = guest(&nf);
    let c = client(move || connect_and_read(SocketAddr::from(([127, 0, 0, 1], hp)), b""));
    assert_eq!(await_client(&mut g, c), Seen::Reset);
    let d = nf
        .wait_for_line(0, SHORT, |l| {
            l.contains("decision") && l.contains("ingress")
        })
        .unwrap_or_else(|| panic!("no decision\n{}", nf.log_text()));
    assert!(d.contains("action=deny"), "{d}");
    assert!(d.contains("no IPv4 address yet"), "{d}");
    g.dhcp(SHORT).expect("lease");
    let h = g.tcp_socket(4096, 4096);
    g.tcp(h).listen(8080).unwrap();
    let c = client(move || connect_and_read(SocketAddr::from(([127, 0, 0, 1], hp)), b""));
    assert!(
        g.tcp_wait_state(h, &[State::Established], deadline(SHORT))
            .is_some(),
        "{}",
        nf.log_text()
    );
    g.tcp_shutdown_write(h);
    assert_eq!(await_client(&mut g, c), Seen::Data(Vec::new()));
}

/// 200 clients at once with `inbound-tcp=100`: 100 are carried (the guest holds them open until
/// all 200 were judged, then echoes and closes each), 100 are reset; the limit is logged.
#[test]
fn inbound_connections_past_the_limit_are_refused_the_rest_complete() {
    const CLIENTS: usize = 200;
    const LIMIT: usize = 100;
    let hp = free_port("127.0.0.1");
    let mut args = publish(format!("{hp}:7000")).to_vec();
    args.extend(["--limit".to_string(), format!("inbound-tcp={LIMIT}")]);
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let mark = nf.log_mark();
    let listeners: Vec<_> = (0..LIMIT + 10)
        .map(|_| {
            let h = g.tcp_socket(1024, 1024);
            g.tcp(h).listen(7000).unwrap();
            h
        })
        .collect();
    // What each client that finished saw, while the admitted ones are held: the refused.
    let finished = Arc::new(Mutex::new(Vec::<(usize, Seen)>::new()));
    let clients: Vec<JoinHandle<Seen>> = (0..CLIENTS)
        .map(|i| {
            let finished = finished.clone();
            client(move || {
                let msg: &'static [u8] = Box::leak(format!("client {i:03}").into_bytes().into());
                let seen = connect_and_read(SocketAddr::from(([127, 0, 0, 1], hp)), msg);
                finished.lock().unwrap().push((i, seen.clone()));
                seen
            })
        })
        .collect();
    let open = |g: &mut Guest| {
        listeners
            .iter()
            .filter(|h| g.tcp(**h).state() == State::Established)
            .count()
    };
    // Hold every admitted connection until the others all finished.
    let held = serve_until(&mut g, |g| {
        open(g) == LIMIT && finished.lock().unwrap().len() == CLIENTS - LIMIT
    });
    let refused = finished.lock().unwrap().clone();
    assert!(
        held,
        "{} finished, {} open; not reset: {:?}\n{}",
        refused.len(),
        open(&mut g),
        refused
            .iter()
            .filter(|(_, s)| *s != Seen::Reset)
            .collect::<Vec<_>>(),
        nf.log_text()
    );
    let not_reset: Vec<_> = refused.iter().filter(|(_, s)| *s != Seen::Reset).collect();
    assert!(
        not_reset.is_empty(),
        "refused clients that saw no reset: {not_reset:?}"
    );
    // Echo each admitted client's message and close.
    for h in &listeners {
        if g.tcp(*h).state() != State::Established {
            continue;
        }
        let msg = g.tcp_recv_exact(*h, 10, deadline(SHORT)).unwrap();
        g.tcp_send_all(*h, &msg, deadline(SHORT)).unwrap();
        g.tcp_shutdown_write(*h);
    }
    let mut done = 0;
    for (i, c) in clients.into_iter().enumerate() {
        match await_client(&mut g, c) {
            Seen::Data(d) => {
                assert_eq!(d, format!("client {i:03}").into_bytes(), "client {i}");
                done += 1;
            }
            Seen::Reset => {}
            other => panic!("client {i}: {other:?}"),
        }
    }
    assert_eq!(done, LIMIT);
    assert!(nf
        .wait_for_log_after(mark, "limit inbound-tcp (100) reached", SHORT)
        .is_some());
}

/// A published port bound to ::1 reaches the guest's IPv6 address (from the gateway's), once
/// the guest used one; before that the client is refused.
#[test]
fn an_ipv6_published_port_reaches_the_guests_ipv6_address() {
    let hp = free_port("::1");
    let nf = Netfence::spawn(&publish(format!("[::1]:{hp}:8080")));
    let mut g = guest_up6(&nf);
    let addr = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), hp);
    let c = client(move || connect_and_read(addr, b""));
    assert_eq!(
        await_client(&mut g, c),
        Seen::Reset,
        "no IPv6 address was seen yet"
    );
    // The guest uses its address: netfence learns it from the source.
    g.ping(GATEWAY6, SHORT).expect("ping the gateway over IPv6");
    let h = g.tcp_socket(4096, 4096);
    g.tcp(h).listen(8080).unwrap();
    let c = client(move || connect_and_read(addr, b"six"));
    assert!(
        g.tcp_wait_state(h, &[State::Established], deadline(SHORT))
            .is_some(),
        "{}",
        nf.log_text()
    );
    let remote: IpEndpoint = g.tcp(h).remote_endpoint().unwrap();
    assert_eq!(remote.addr, IpAddress::Ipv6(GATEWAY6));
    let local = g.tcp(h).local_endpoint().unwrap();
    assert_eq!(local.addr, IpAddress::Ipv6(GUEST6));
    let got = g.tcp_recv_exact(h, 3, deadline(SHORT)).unwrap();
    g.tcp_send_all(h, &got, deadline(SHORT)).unwrap();
    g.tcp_shutdown_write(h);
    assert_eq!(await_client(&mut g, c), Seen::Data(b"six".to_vec()));
}

/// The listeners outlive a VMM: between two VMMs a client is reset at once (never left
/// hanging), and the next VMM's guest is reached through the same port.
#[test]
fn published_ports_stay_across_vmm_connections() {
    let hp = free_port("127.0.0.1");
    let nf = Netfence::spawn(&publish(format!("{hp}:8080")));
    let addr = SocketAddr::from(([127, 0, 0, 1], hp));
    for round in 0..2 {
        let mut g = guest_up(&nf);
        let h = g.tcp_socket(4096, 4096);
        g.tcp(h).listen(8080).unwrap();
        let c = client(move || connect_and_read(addr, b""));
        assert!(
            g.tcp_wait_state(h, &[State::Established], deadline(SHORT))
                .is_some(),
            "round {round}\n{}",
            nf.log_text()
        );
        g.tcp_shutdown_write(h);
        assert_eq!(await_client(&mut g, c), Seen::Data(Vec::new()));
        let mark = nf.log_mark();
        drop(g);
        nf.wait_for_log_after(mark, "VMM disconnected", SHORT)
            .expect("the VMM left");
        // No VMM: refused at once.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(SHORT)).unwrap();
        let got = s.read(&mut [0u8; 1]);
        assert!(
            matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "round {round}: {got:?}"
        );
    }
    assert!(nf.log_text().contains("no VM is attached"));
}
