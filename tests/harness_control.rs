//! The operator's side: `netfence ctl` over the control socket, Prometheus metrics, and live
//! reload (SIGHUP and `ctl reload`) with flows in flight.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::servers::*;
use common::*;
use smoltcp::socket::tcp::State;

/// A policy that allows the guest TCP to 203.0.113.7 on `ports` and nothing else.
fn allow_ports(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "[policy]\ndefault_egress = \"deny\"\nrules = [ {{ action = \"allow\", destination = \"{PUBLIC_IP}\", protocols = [\"tcp\"], ports = [{}] }} ]\n",
        list.join(", ")
    )
}

struct Operated {
    nf: Netfence,
    config: PathBuf,
    control: PathBuf,
    metrics: SocketAddr,
    _dir: TempDir,
}

/// netfence with a config file, a control socket, metrics on an ephemeral loopback port, and
/// `maps` (guest port on PUBLIC_IP -> loopback server port).
fn operated(policy: &str, maps: &[(u16, u16)]) -> Operated {
    let dir = TempDir::new("control");
    let config = dir.path().join("netfence.toml");
    std::fs::write(&config, policy).unwrap();
    let control = dir.path().join("nf.ctl");
    let mut args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--control".to_string(),
        control.display().to_string(),
        "--metrics".to_string(),
        "0".to_string(),
    ];
    for (guest_port, host_port) in maps {
        args.push("--map".to_string());
        args.push(format!("{PUBLIC_IP}:{guest_port}=127.0.0.1:{host_port}"));
    }
    let nf = Netfence::spawn(&args);
    let line = nf
        .wait_for_log("metrics at http://", SHORT)
        .expect("metrics address logged");
    let metrics = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Operated {
        nf,
        config,
        control,
        metrics,
        _dir: dir,
    }
}

fn ctl(control: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netfence"))
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run netfence ctl")
}

fn ctl_json(control: &Path, command: &str) -> serde_json::Value {
    let out = ctl(control, &["--json", command]);
    assert!(
        out.status.success(),
        "ctl {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl --json prints JSON")
}

fn scrape(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(SHORT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

/// The value of the sample `name{labels}` (labels as written, e.g. `direction="to_host"`).
fn sample(body: &str, name: &str, labels: &str) -> Option<u64> {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn echo(g: &mut Guest, h: smoltcp::iface::SocketHandle, data: &[u8]) {
    g.tcp_send_all(h, data, deadline(SHORT)).unwrap();
    let back = g.tcp_recv_exact(h, data.len(), deadline(SHORT)).unwrap();
    assert!(mismatch(&back, data).is_none(), "echo differs");
}

#[test]
fn ctl_lists_flows_and_status() {
    let server = TcpEchoServer::start();
    let udp_server = UdpEchoServer::start();
    let policy = format!(
        "[policy]\ndefault_egress = \"deny\"\nrules = [\n\
         {{ action = \"allow\", destination = \"{PUBLIC_IP}\", protocols = [\"tcp\"], ports = [80] }},\n\
         {{ action = \"allow\", destination = \"{PUBLIC_IP}\", protocols = [\"udp\"], ports = [90] }},\n]\n"
    );
    let op = operated(&policy, &[(80, server.port()), (90, udp_server.port())]);
    let mut g = guest_up(&op.nf);
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect");
    echo(&mut g, h, &pattern(5000, 3));
    let u = g.udp_bind(40090);
    g.udp_send(u, PUBLIC_IP, 90, b"datagram");
    let (back, _) = g.udp_recv(u, deadline(SHORT)).expect("UDP echo");
    assert_eq!(back, b"datagram");
    let flows = ctl_json(&op.control, "flows");
    let list = flows["flows"].as_array().expect("a flows list");
    let udp = list
        .iter()
        .find(|f| f["kind"] == "udp")
        .unwrap_or_else(|| panic!("the UDP flow is not listed: {flows}"));
    assert_eq!(udp["src"], format!("{GUEST_IP}:40090"));
    assert_eq!(udp["dst"], format!("{PUBLIC_IP}:90"));
    assert_eq!(udp["bytes_to_host"], 8);
    assert_eq!(udp["bytes_to_guest"], 8);
    let list = flows["flows"].as_array().expect("a flows list");
    let port = g.tcp(h).local_endpoint().unwrap().port;
    let ours = list
        .iter()
        .find(|f| f["src"] == format!("{GUEST_IP}:{port}"))
        .unwrap_or_else(|| panic!("our flow is not listed: {flows}"));
    assert_eq!(ours["dst"], format!("{PUBLIC_IP}:80"));
    assert_eq!(ours["kind"], "tcp");
    assert_eq!(ours["direction"], "egress");
    assert_eq!(ours["bytes_to_host"], 5000);
    assert_eq!(ours["bytes_to_guest"], 5000);
    assert!(
        ours["rule"].as_str().is_some_and(|r| r.contains("allow")),
        "rule: {ours}"
    );
    // The table form has a header and our flow's line.
    let table = ctl(&op.control, &["flows"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("KIND"), "{text}");
    assert!(text.contains(&format!("{GUEST_IP}:{port}")), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&op.control).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the control socket is for netfence's user only"
    );
    let status = ctl_json(&op.control, "status");
    assert_eq!(status["vmm_connections"], 1);
    assert_eq!(status["open"]["tcp"], 1, "{status}");
    assert!(status["totals"]["frames_from_guest"].as_u64().unwrap() > 0);
    // Where the rings stand, as the frontend itself sees them: every TX chain taken and
    // returned, no more RX buffers than the guest offered.
    let (tx_avail, tx_size) = (g.dev.fe.tx.avail_idx_raw(), g.dev.fe.tx.size);
    let link = &status["links"][0];
    let tx = &link["rings"]["tx"];
    assert_eq!(tx["size"], tx_size, "{link}");
    assert_eq!(tx["avail"], tx_avail, "{link}");
    assert_eq!(tx["taken"], tx_avail, "{link}");
    assert_eq!(tx["used"], tx_avail, "{link}");
    let rx = &link["rings"]["rx"];
    assert_eq!(rx["avail"], g.dev.fe.rx.avail_idx_raw(), "{link}");
    assert!(rx["used"].as_u64() <= rx["avail"].as_u64(), "{link}");
    let text = String::from_utf8_lossy(&ctl(&op.control, &["status"]).stdout).to_string();
    assert!(
        text.contains(&format!(
            "tx ring: size {tx_size}, guest offered {tx_avail}, netfence took {tx_avail} and returned {tx_avail}"
        )),
        "{text}"
    );
    // A command netfence does not know is refused with exit 1... and clap refuses it first.
    let bad = ctl(&op.control, &["bogus"]);
    assert_eq!(bad.status.code(), Some(2));
    // No netfence at the path: exit 2 with the path named.
    let none = ctl(Path::new("/nonexistent/nf.ctl"), &["status"]);
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("/nonexistent/nf.ctl"));
}

#[test]
fn metrics_counters_move() {
    let server = TcpEchoServer::start();
    let op = operated(&allow_ports(&[80]), &[(80, server.port())]);
    let (head, before) = scrape(op.metrics, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("openmetrics-text"), "{head}");
    assert!(before.trim_end().ends_with("# EOF"), "{before}");
    let (missing, _) = scrape(op.metrics, "/other");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let mut g = guest_up(&op.nf);
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect");
    echo(&mut g, h, &pattern(20_000, 4));
    // A denied flow: port 81 is not allowed.
    let denied = g.tcp_connect(PUBLIC_IP, 81, Duration::from_millis(300));
    assert!(denied.is_err(), "port 81 must be denied");
    let (_, after) = scrape(op.metrics, "/metrics");
    let to_host = sample(&after, "netfence_flow_bytes_total", "direction=\"to_host\"");
    assert_eq!(to_host, Some(20_000), "{after}");
    let frames = sample(&after, "netfence_frames_total", "direction=\"from_guest\"").unwrap();
    assert!(frames > 4, "{after}");
    assert_eq!(
        sample(&after, "netfence_flows_open", "kind=\"tcp\""),
        Some(1)
    );
    let denials: u64 = after
        .lines()
        .filter(|l| l.starts_with("netfence_decisions_total{action=\"deny\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(denials >= 1, "no deny decision counted:\n{after}");
    let kicks = sample(
        &after,
        "netfence_vring_notifications_total",
        "kind=\"tx_kick\"",
    );
    assert!(kicks.is_some_and(|k| k > 0), "{after}");
    // Calls both ways: the frontend asks for them (EVENT_IDX) when it waits on either queue.
    for kind in ["kind=\"rx_call\"", "kind=\"tx_call\""] {
        let calls = sample(&after, "netfence_vring_notifications_total", kind);
        assert!(calls.is_some_and(|c| c > 0), "{kind}: {after}");
    }
    assert!(
        sample(&after, "netfence_dns_queries_total", "outcome=\"queries\"").is_some(),
        "{after}"
    );
    // `ctl metrics` prints the same exposition.
    let out = ctl(&op.control, &["metrics"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("netfence_flow_bytes_total"));
}

/// A reload that denies port 81 resets the open flow to 81 (the guest sees it reset) and
/// keeps the flow to 80 byte-exact, with data in flight across the reload; new flows follow
/// the new policy; a config that does not validate, or that changes a fixed key, is refused
/// and the running policy stays.
#[test]
fn reload_resets_denied_flows_and_keeps_allowed_ones() {
    let (kept, cut) = (TcpEchoServer::start(), TcpEchoServer::start());
    let op = operated(
        &allow_ports(&[80, 81]),
        &[(80, kept.port()), (81, cut.port())],
    );
    let mut g = guest_up(&op.nf);
    let stay = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("flow to 80");
    let go = g.tcp_connect(PUBLIC_IP, 81, SHORT).expect("flow to 81");
    echo(&mut g, go, b"before");
    // Data in flight on the kept flow while the reload happens.
    let data = pattern(256 << 10, 9);
    g.tcp_send_all(stay, &data[..64 << 10], deadline(SHORT))
        .unwrap();
    std::fs::write(&op.config, allow_ports(&[80])).unwrap();
    let mark = op.nf.log_mark();
    let pid = op.nf.pid().expect("pid");
    let kill = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let line = op
        .nf
        .wait_for_log_after(mark, "config reloaded", SHORT)
        .unwrap_or_else(|| panic!("no reload after SIGHUP\n{}", op.nf.log_text()));
    assert!(line.contains("flows_reset=1"), "{line}");
    let reset = op
        .nf
        .wait_for_log_after(mark, "the reloaded policy denies it", SHORT)
        .expect("the reset flow is logged");
    assert!(reset.contains(&format!("{PUBLIC_IP}:81")), "{reset}");
    assert!(reset.contains("rule="), "{reset}");
    g.tcp_send_all(stay, &data[64 << 10..], deadline(SHORT))
        .unwrap();
    let back = g.tcp_recv_exact(stay, data.len(), deadline(LONG)).unwrap();
    assert!(mismatch(&back, &data).is_none(), "the kept flow lost bytes");
    let closed = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(go).state() == State::Closed).then_some(())
    });
    assert!(
        closed.is_some(),
        "the denied flow was not reset: {:?}",
        g.tcp(go).state()
    );
    assert!(
        g.tcp_connect(PUBLIC_IP, 81, Duration::from_millis(500))
            .is_err(),
        "a new flow to 81 must be denied"
    );
    // A config that does not validate: refused, exit 1, the running policy stays.
    std::fs::write(&op.config, "policy = \"bogus\"\n").unwrap();
    let out = ctl(&op.control, &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    // A fixed key: refused with its name.
    std::fs::write(
        &op.config,
        format!("ipv4_pool = \"10.0.0.0/8\"\n{}", allow_ports(&[80, 81])),
    )
    .unwrap();
    let text = std::fs::read_to_string(&op.config).unwrap();
    let out = ctl(&op.control, &["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}\n{err}");
    assert!(err.contains("ipv4_pool"), "{text}\n{err}");
    // Still the policy of the last good reload: 80 allowed, 81 denied.
    let again = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .expect("80 still allowed");
    echo(&mut g, again, b"after");
    assert!(g
        .tcp_connect(PUBLIC_IP, 81, Duration::from_millis(500))
        .is_err());
    // And a good one through ctl: 81 allowed again.
    std::fs::write(&op.config, allow_ports(&[80, 81])).unwrap();
    let done = ctl_json(&op.control, "reload");
    assert_eq!(done["flows_reset"], 0, "{done}");
    let back = g
        .tcp_connect(PUBLIC_IP, 81, SHORT)
        .expect("81 allowed again");
    echo(&mut g, back, b"again");
}

/// A connection through a published port that a reload's ingress rules deny is reset: the
/// host client sees the reset, the guest's end is reset too.
#[test]
fn reload_resets_a_published_port_connection_the_new_rules_deny() {
    let hp = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let allow_in = "[policy]\ndefault_egress = \"deny\"\ndefault_ingress = \"allow\"\n";
    let dir = TempDir::new("control");
    let config = dir.path().join("netfence.toml");
    std::fs::write(&config, allow_in).unwrap();
    let control = dir.path().join("nf.ctl");
    let nf = Netfence::spawn(&[
        "--config".to_string(),
        config.display().to_string(),
        "--control".to_string(),
        control.display().to_string(),
        "-p".to_string(),
        format!("{hp}:8080"),
    ]);
    let mut g = guest_up(&nf);
    let h = g.tcp_socket(64 * 1024, 64 * 1024);
    g.tcp(h).listen(8080).unwrap();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", hp)).unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        s.write_all(b"hello").unwrap();
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(got),
            other => Err(format!("{other:?} after {got:?}")),
        }
    });
    assert!(
        g.tcp_wait_state(h, &[State::Established], deadline(SHORT))
            .is_some(),
        "no inbound connection\n{}",
        nf.log_text()
    );
    assert_eq!(g.tcp_recv_exact(h, 5, deadline(SHORT)).unwrap(), b"hello");
    std::fs::write(
        &config,
        format!(
            "{allow_in}rules = [ {{ action = \"deny\", direction = \"ingress\", destination = \"loopback\" }} ]\n"
        ),
    )
    .unwrap();
    let done = ctl_json(&control, "reload");
    assert_eq!(done["flows_reset"], 1, "{done}");
    let closed = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(h).state() == State::Closed).then_some(())
    });
    assert!(
        closed.is_some(),
        "the guest end was not reset: {:?}",
        g.tcp(h).state()
    );
    let seen = client.join().unwrap();
    assert!(seen.is_ok(), "the host client was not reset: {seen:?}");
}

/// A metrics client that trickles its request a byte at a time, and a control client that
/// says nothing, hold their listener for a bounded time: a scrape and a `ctl status` behind
/// them are answered.
#[test]
fn slow_clients_do_not_hold_metrics_or_control() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let op = operated(&allow_ports(&[80]), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let (connected_tx, connected) = std::sync::mpsc::channel();
    let trickler = {
        let (stop, addr) = (stop.clone(), op.metrics);
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            connected_tx.send(()).unwrap();
            // Never a whole request: "GET /metrics HTTP/1.1\r\n" and then header bytes.
            for b in b"GET /metrics HTTP/1.1\r\nX-Slow: "
                .iter()
                .chain([b'a'; 200].iter())
            {
                if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    // Both slow clients are connected (queued first) before the requests behind them.
    let silent = std::os::unix::net::UnixStream::connect(&op.control).unwrap();
    connected
        .recv_timeout(SHORT)
        .expect("the trickler connected");
    let scraper = std::thread::spawn(move || {
        let mut s = TcpStream::connect(op.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).map(|_| text)
    });
    let status = ctl(&op.control, &["status"]);
    assert!(
        status.status.success(),
        "ctl status behind a silent client failed"
    );
    let text = scraper
        .join()
        .unwrap()
        .expect("the scrape behind a trickling client timed out");
    assert!(text.starts_with("HTTP/1.1 200"), "{text:.200}");
    stop.store(true, Ordering::Relaxed);
    drop(silent);
    trickler.join().unwrap();
}

/// A DNS-over-TCP connection the guest resets during its handshake is forgotten at once: its
/// socket, back to listening, must not take the next connection's SYN (the open DNS-TCP
/// connections, as `ctl status` counts them, are the live one only).
#[test]
fn a_dns_tcp_handshake_the_guest_resets_is_forgotten() {
    use common::frames::{self, Flags};
    let dns = "[policy]\ndefault_egress = \"deny\"\nrules = [ { action = \"allow\", destination = \"host\", protocols = [\"tcp\"], ports = [53] } ]\n";
    let op = operated(dns, &[]);
    let mut g = guest_up(&op.nf);
    let gw = g.arp_raw(GATEWAY, SHORT).expect("ARP").sender_mac;
    let me = g.mac;
    let (sport, iss) = (42001u16, 5_000_000u32);
    let fe = &mut g.dev.fe;
    fe.send_frame(&frames::tcp_syn_frame(
        me, gw, GUEST_IP, GATEWAY, sport, 53, iss,
    ));
    fe.recv_matching(deadline(SHORT), |f| {
        frames::parse_tcp(f).is_some_and(|t| t.dport == sport && t.flags.syn && t.flags.ack)
    })
    .expect("SYN-ACK from the gateway's DNS");
    let rst = frames::tcp_segment(GUEST_IP, GATEWAY, sport, 53, iss + 1, 0, Flags::RST, 0, &[]);
    fe.send_frame(&frames::eth(
        gw,
        me,
        0x0800,
        &frames::ipv4_packet(GUEST_IP, GATEWAY, 6, 1, &rst),
    ));
    let live = g
        .tcp_connect(GATEWAY, 53, SHORT)
        .expect("a second DNS-TCP connection");
    assert_eq!(g.tcp(live).state(), State::Established);
    let status = ctl_json(&op.control, "status");
    assert_eq!(status["open"]["dns-tcp"], 1, "{status}");
}
