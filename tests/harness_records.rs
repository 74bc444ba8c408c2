//! Records for operators (`--pcap`, `--audit`) through the harness: the pcap holds the frames
//! of a known exchange as tcpdump reads them, rotates into whole files at its size bound and
//! drops (and counts) frames when its writer's queue is full; the audit has a line per
//! decision, per flow end (with the bytes that moved) and per secret violation, never a
//! secret's value, and a flood of denied flows is bounded; bad paths are argument errors.
//!
//! Every test runs netfence with `--once` and waits for it to exit after the guest leaves, so
//! the writers have written everything before the files are read.

mod common;
mod dnsfake;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::process::{close_and_count, field};
use common::servers::*;
use common::tls::{request_end, spawn_intercepting, TestCa};
use common::*;
use dnsfake::{udp_lookup, write_config, Answer, FakeDns};
use hickory_proto::rr::RecordType;
use netfence::config::default_placeholder;
use serde_json::Value;

/// A second "public" address, never resolved by the guest.
const PUBLIC_IP2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 8);

/// `path` with `.n` appended, as rotation names old files.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// `tcpdump -r path -nn`: its lines; panics unless tcpdump read the file without an error.
fn tcpdump(path: &Path) -> Vec<String> {
    let out = Command::new("tcpdump")
        .args(["-r", path.to_str().unwrap(), "-nn"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run tcpdump (scripts/install-deps.sh installs it): {e}")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tcpdump -r {} failed: {stderr}",
        path.display()
    );
    assert!(
        stderr.contains("link-type EN10MB"),
        "{}: {stderr}",
        path.display()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The TCP payload length tcpdump prints last on a line (`..., length 1448` or, on port 80,
/// `..., length 1448: HTTP`).
fn tcp_length(line: &str) -> u64 {
    line.rsplit_once("length ")
        .and_then(|(_, n)| {
            n.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok())
        })
        .unwrap_or(0)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The guest leaves, netfence (`--once`) exits 0; returns what its link counted.
fn finish(mut nf: Netfence, g: Guest) -> (Netfence, common::process::LinkCounts) {
    let mark = nf.log_mark();
    let counts = close_and_count(&nf, g, mark);
    let status = nf
        .wait_exit(SHORT)
        .unwrap_or_else(|| panic!("netfence did not exit\n{}", nf.log_text()));
    assert!(status.success(), "{status}\n{}", nf.log_text());
    (nf, counts)
}

/// The `NAME writer closed` line's numbers: (records, dropped).
fn writer_closed(nf: &Netfence, what: &str) -> (u64, u64) {
    let line = nf
        .log_lines()
        .into_iter()
        .find(|l| l.contains(&format!("{what} writer closed")))
        .unwrap_or_else(|| panic!("no '{what} writer closed' line\n{}", nf.log_text()));
    let num = |k: &str| -> u64 {
        field(&line, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    (num("records"), num("dropped"))
}

fn map(guest: impl std::fmt::Display, host_port: u16) -> [String; 2] {
    [
        "--map".to_string(),
        format!("{guest}=127.0.0.1:{host_port}"),
    ]
}

/// A known exchange (ARP and DHCP, a TCP connection with data both ways and its close) is in
/// the pcap as tcpdump reads it; the file is 0600 and nothing was dropped.
#[test]
fn pcap_shows_the_frames_of_a_known_exchange() {
    let dir = TempDir::new("nf-pcap");
    let pcap = dir.path().join("trace.pcap");
    let echo = TcpEchoServer::start();
    let mut args = vec![
        "--once".to_string(),
        "--pcap".to_string(),
        pcap.display().to_string(),
    ];
    args.extend(map(format!("{PUBLIC_IP}:80"), echo.port()));
    let nf = Netfence::spawn(&args);
    assert_eq!(mode(&pcap), 0o600, "the pcap file is created 0600");
    let mut g = guest_up(&nf);
    gateway_mac(&mut g);
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let port = g.tcp(h).local_endpoint().unwrap().port;
    let msg = b"seen in the pcap, both ways";
    g.tcp_send_all(h, msg, deadline(SHORT)).unwrap();
    assert_eq!(
        g.tcp_recv_exact(h, msg.len(), deadline(SHORT)).unwrap(),
        msg
    );
    g.tcp_shutdown_write(h);
    let (rest, fin) = g.tcp_recv_to_eof(h, deadline(SHORT));
    assert!(rest.is_empty() && fin);
    let (nf, counts) = finish(nf, g);
    assert_eq!(counts.get("pcap-queue-full"), 0);

    let lines = tcpdump(&pcap);
    let text = lines.join("\n");
    let has = |what: &str, pred: &dyn Fn(&str) -> bool| {
        assert!(
            lines.iter().any(|l| pred(l)),
            "no {what} in the pcap:\n{text}"
        );
    };
    has("ARP request for the gateway", &|l| {
        l.contains("ARP, Request who-has 172.16.0.1")
    });
    has("ARP reply", &|l| l.contains("ARP, Reply 172.16.0.1 is-at"));
    has("DHCP request", &|l| l.contains("BOOTP/DHCP, Request"));
    has("DHCP reply", &|l| l.contains("BOOTP/DHCP, Reply"));
    let guest = format!("{GUEST_IP}.{port}");
    let server = format!("{PUBLIC_IP}.80");
    let up = format!("{guest} > {server}: ");
    let down = format!("{server} > {guest}: ");
    has("SYN", &|l| l.contains(&format!("{up}Flags [S]")));
    has("SYN-ACK", &|l| l.contains(&format!("{down}Flags [S.]")));
    let n = msg.len() as u64;
    has("data to the server", &|l| {
        l.contains(&up) && tcp_length(l) == n
    });
    has("data to the guest", &|l| {
        l.contains(&down) && tcp_length(l) == n
    });
    has("guest FIN", &|l| l.contains(&format!("{up}Flags [F.]")));
    has("server FIN", &|l| l.contains(&format!("{down}Flags [F.]")));
    let (records, dropped) = writer_closed(&nf, "pcap");
    assert_eq!(dropped, 0);
    assert_eq!(records, lines.len() as u64, "{text}");
}

/// `--pcap-max-mb 1` with 3.5 MiB through: the file rotates into several files, each at most
/// 1 MiB and a whole pcap tcpdump reads, at most `--pcap-files` old ones; together they hold
/// every byte of the download.
#[test]
fn pcap_rotates_at_its_size_bound_into_whole_files() {
    const DOWN: usize = 3584 << 10;
    let dir = TempDir::new("nf-pcap-rotate");
    let pcap = dir.path().join("trace.pcap");
    let server = OneShotServer::exchange(pattern(1000, 1), pattern(DOWN, 2));
    let mut args = vec![
        "--once".to_string(),
        "--pcap".to_string(),
        pcap.display().to_string(),
        "--pcap-max-mb".to_string(),
        "1".to_string(),
        "--pcap-files".to_string(),
        "5".to_string(),
    ];
    args.extend(map(format!("{PUBLIC_IP}:80"), server.port()));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let port = g.tcp(h).local_endpoint().unwrap().port;
    let got = g
        .tcp_transfer(h, &pattern(1000, 1), true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.len(), DOWN);
    let (up_ok, _) = server.join_polling(&mut g, SHORT).unwrap();
    assert_eq!(up_ok, Ok(None));
    let (_nf, counts) = finish(nf, g);
    assert_eq!(counts.get("pcap-queue-full"), 0);

    let mut files = vec![pcap.clone()];
    files.extend((1..=5).map(|n| numbered(&pcap, n)).filter(|p| p.exists()));
    assert!(
        files.len() >= 4,
        "3.5 MiB in files of 1 MiB: expected 4 or more files, found {files:?}"
    );
    assert!(
        !numbered(&pcap, 6).exists(),
        "more than --pcap-files old files"
    );
    let down = format!("{PUBLIC_IP}.80 > {GUEST_IP}.{port}: ");
    let mut payload_down = 0;
    for f in &files {
        let size = std::fs::metadata(f).unwrap().len();
        assert!(size <= 1 << 20, "{} is {size} bytes", f.display());
        assert_eq!(mode(f), 0o600, "{}", f.display());
        let lines = tcpdump(f);
        assert!(!lines.is_empty(), "{} holds no frame", f.display());
        payload_down += lines
            .iter()
            .filter(|l| l.contains(&down))
            .map(|l| tcp_length(l))
            .sum::<u64>();
    }
    assert!(
        payload_down >= DOWN as u64,
        "the files hold {payload_down} bytes of the {DOWN}-byte download"
    );
}

/// A pcap queue of 4 KiB (`--limit pcap-queue-bytes=4096`) cannot hold the guest's 64 KiB
/// segments: they are not recorded but counted, on the link's closing line and in the
/// writer's log; what was recorded is a readable pcap.
#[test]
fn a_full_pcap_queue_drops_frames_and_counts_them() {
    const DOWN: usize = 1 << 20;
    let dir = TempDir::new("nf-pcap-queue");
    let pcap = dir.path().join("trace.pcap");
    let server = OneShotServer::exchange(Vec::new(), pattern(DOWN, 3));
    let mut args = vec![
        "--once".to_string(),
        "--pcap".to_string(),
        pcap.display().to_string(),
        "--limit".to_string(),
        "pcap-queue-bytes=4096".to_string(),
    ];
    args.extend(map(format!("{PUBLIC_IP}:80"), server.port()));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let got = g
        .tcp_transfer(h, &[], true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.len(), DOWN);
    let (_, written) = server.join_polling(&mut g, SHORT).unwrap();
    assert_eq!(written, Ok(()));
    let (nf, counts) = finish(nf, g);
    let full = counts.get("pcap-queue-full");
    assert!(full > 0, "no frame found the queue full\n{}", nf.log_text());
    let (records, dropped) = writer_closed(&nf, "pcap");
    assert_eq!(
        dropped, full,
        "the writer and the link count the same drops"
    );
    assert!(
        nf.log_lines()
            .iter()
            .any(|l| l.contains("pcap records dropped") && l.contains("pcap-queue-bytes")),
        "{}",
        nf.log_text()
    );
    let lines = tcpdump(&pcap);
    assert_eq!(records, lines.len() as u64);
    assert!(
        lines.iter().any(|l| l.contains("BOOTP/DHCP")),
        "small frames still fit the queue"
    );
    println!(
        "pcap queue of 4096 bytes, 1 MiB download: {records} frames recorded, {dropped} dropped"
    );
}

/// The guest-side port of an IPv4 TCP/UDP frame from the guest.
fn guest_source_port(frame: &[u8]) -> Option<u16> {
    if frame.get(12..14)? != [0x08, 0x00] || !matches!(frame.get(23)?, 6 | 17) {
        return None;
    }
    let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
    Some(u16::from_be_bytes([
        *frame.get(14 + ihl)?,
        *frame.get(15 + ihl)?,
    ]))
}

/// With two queue pairs, both pairs' frames go to the one file: flows sent on pair 0 and on
/// pair 1 are both in it.
#[test]
fn every_queue_pair_feeds_the_one_pcap() {
    let dir = TempDir::new("nf-pcap-mq");
    let pcap = dir.path().join("trace.pcap");
    let echo = TcpEchoServer::start();
    let mut args = vec![
        "--once".to_string(),
        "--queues".to_string(),
        "2".to_string(),
        "--pcap".to_string(),
        pcap.display().to_string(),
    ];
    args.extend(map(format!("{PUBLIC_IP}:80"), echo.port()));
    let nf = Netfence::spawn(&args);
    let opts = FrontendOptions {
        pairs: 2,
        ..FrontendOptions::default()
    };
    let mut g = guest_with(&nf, opts);
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    g.fe().tx_steer = Some(Box::new(|f| {
        guest_source_port(f).map_or(0, |p| usize::from(p % 2))
    }));
    let mut ports = HashMap::new();
    while ports.len() < 2 {
        let h = g
            .tcp_connect(PUBLIC_IP, 80, SHORT)
            .unwrap_or_else(|e| panic!("connect: {e:?}"));
        let port = g.tcp(h).local_endpoint().unwrap().port;
        g.tcp_send_all(h, b"ping", deadline(SHORT)).unwrap();
        assert_eq!(g.tcp_recv_exact(h, 4, deadline(SHORT)).unwrap(), b"ping");
        ports.entry(port % 2).or_insert(port);
    }
    let tx = g.fe().stats.tx_frames_by_pair.clone();
    assert!(tx.iter().all(|&n| n > 0), "TX frames by pair {tx:?}");
    let (_nf, _counts) = finish(nf, g);
    let lines = tcpdump(&pcap);
    for (pair, port) in ports {
        let syn = format!("{GUEST_IP}.{port} > {PUBLIC_IP}.80: Flags [S]");
        assert!(
            lines.iter().any(|l| l.contains(&syn)),
            "the flow sent on pair {pair} is missing:\n{}",
            lines.join("\n")
        );
    }
}

/// The audit file's lines, parsed.
fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn show(lines: &[Value]) -> String {
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// An allowed flow to a name the guest resolved, a denied one, and their lines: one decision
/// each with every field (the denied SYN's retransmissions are not decided again), and a
/// close line for the allowed flow whose byte counts are what moved.
#[test]
fn audit_has_decisions_and_closes_with_their_fields() {
    const NAME: &str = "echo.example.com";
    let dir = TempDir::new("nf-audit");
    let audit = dir.path().join("audit.jsonl");
    let echo = TcpEchoServer::start();
    let dns = FakeDns::start(&[(NAME, Answer::A(vec![PUBLIC_IP]))]);
    let cfg = write_config(
        dir.path(),
        &format!("[dns]\nnameservers = [\"{}\"]\n", dns.nameserver()),
    );
    let mut args = vec![
        "--once".to_string(),
        "--audit".to_string(),
        audit.display().to_string(),
        "--config".to_string(),
        cfg.display().to_string(),
    ];
    args.extend(map(format!("{PUBLIC_IP}:7"), echo.port()));
    let nf = Netfence::spawn(&args);
    assert_eq!(mode(&audit), 0o600, "the audit file is created 0600");
    let mut g = guest_up(&nf);
    udp_lookup(&mut g, GATEWAY, NAME, RecordType::A, SHORT).expect("lookup");
    let started = Instant::now();
    let h = g
        .tcp_connect(PUBLIC_IP, 7, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let port = g.tcp(h).local_endpoint().unwrap().port;
    let data = pattern(100_000, 5);
    let back = g
        .tcp_transfer(h, &data, true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(back == data, "echo differs");
    g.tcp_wait_state(
        h,
        &[
            smoltcp::socket::tcp::State::TimeWait,
            smoltcp::socket::tcp::State::Closed,
        ],
        deadline(SHORT),
    );
    let flow_secs = started.elapsed().as_secs_f64();
    // Denied (private), silently: the guest's stack retransmits its SYN meanwhile.
    let denied = g.tcp_connect(PRIVATE_IP, 80, SILENCE);
    assert!(denied.is_err());
    let (_nf, _counts) = finish(nf, g);

    let lines = audit_lines(&audit);
    let text = show(&lines);
    println!("{text}");
    let decisions: Vec<&Value> = lines.iter().filter(|l| l["event"] == "decision").collect();
    let allowed: Vec<&&Value> = decisions
        .iter()
        .filter(|l| l["dst"] == format!("{PUBLIC_IP}:7"))
        .collect();
    assert_eq!(allowed.len(), 1, "{text}");
    let a = allowed[0];
    assert_eq!(a["action"], "allow", "{text}");
    assert_eq!(a["link"], 1);
    assert_eq!(a["pair"], 0);
    assert_eq!(a["direction"], "egress");
    assert_eq!(a["protocol"], "tcp");
    assert_eq!(a["src"], format!("{GUEST_IP}:{port}"));
    assert_eq!(a["domains"], serde_json::json!([NAME]));
    assert_eq!(a["domain_source"], "dns-cache");
    assert!(a["rule"].is_u64(), "the public-only preset's rule: {a}");
    assert!(
        a["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("rule {}", a["rule"]))),
        "{a}"
    );
    let time = a["time"].as_str().unwrap();
    assert!(
        time.len() == "2026-01-01T00:00:00.000000Z".len()
            && time.as_bytes()[10] == b'T'
            && time.ends_with('Z'),
        "not RFC 3339 UTC: {time}"
    );
    let denied: Vec<&&Value> = decisions
        .iter()
        .filter(|l| l["dst"] == format!("{PRIVATE_IP}:80"))
        .collect();
    assert_eq!(
        denied.len(),
        1,
        "retransmissions are not decided again: {text}"
    );
    assert_eq!(denied[0]["action"], "deny");
    assert!(denied[0]["domain_source"].is_null() && denied[0]["domains"] == serde_json::json!([]));
    assert!(!denied[0]["reason"].as_str().unwrap_or("").is_empty());
    assert!(
        decisions
            .iter()
            .any(|l| l["protocol"] == "udp" && l["dst"] == format!("{GATEWAY}:53")),
        "the DNS query's decision: {text}"
    );
    let closes: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "close" && l["dst"] == format!("{PUBLIC_IP}:7"))
        .collect();
    assert_eq!(closes.len(), 1, "{text}");
    let c = closes[0];
    assert_eq!(c["src"], format!("{GUEST_IP}:{port}"));
    assert_eq!(c["bytes_to_host"], data.len() as u64, "{c}");
    assert_eq!(c["bytes_to_guest"], data.len() as u64, "{c}");
    assert_eq!(c["why"], "closed", "{c}");
    let secs = c["duration_secs"].as_f64().unwrap();
    assert!(
        secs > 0.0 && secs <= flow_secs + 1.0,
        "{c}, flow took {flow_secs:.3} s"
    );
}

/// A plain HTTP server on loopback that answers each request with itself.
fn plain_http_server() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    log.lock().unwrap().extend_from_slice(&chunk[..n]);
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = request_end(&buf) {
                        let req: Vec<u8> = buf.drain(..end).collect();
                        let head =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", req.len());
                        let _ = stream.write_all(head.as_bytes());
                        let _ = stream.write_all(&req);
                    }
                }
            });
        }
    });
    (port, seen)
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A secret substituted on its way to its host (the server echoes the real value back to the
/// guest) and its placeholder sent where it may not go: the audit has the violation with the
/// secret's name and the destination, and the value nowhere.
#[test]
fn audit_has_secret_violations_and_never_a_value() {
    const NAME: &str = "api.example.com";
    const KEY: &str = "sk-real-0123456789abcdef";
    let up_ca = TestCa::new("test upstream CA");
    let (http_port, seen) = plain_http_server();
    let dns = FakeDns::start(&[(NAME, Answer::A(vec![PUBLIC_IP]))]);
    let dir = TempDir::new("nf-audit-secrets");
    let audit = dir.path().join("audit.jsonl");
    let toml = format!(
        "[[secrets]]\nenv_var = \"API_KEY\"\nvalue = \"{KEY}\"\nallowed_hosts = [\"{NAME}\"]\n\
         [dns]\nnameservers = [\"{}\"]\n",
        dns.nameserver()
    );
    let mut args = vec![
        "--once".to_string(),
        "--audit".to_string(),
        audit.display().to_string(),
    ];
    args.extend(map(PUBLIC_IP, http_port));
    args.extend(map(PUBLIC_IP2, http_port));
    let (nf, _ca_pem, _tls_dir) = spawn_intercepting(&up_ca, &toml, "", &args, &[]);
    let mut g = guest_up(&nf);
    udp_lookup(&mut g, GATEWAY, NAME, RecordType::A, SHORT).expect("lookup");
    let ph = default_placeholder("API_KEY");
    // Allowed: substituted, and the server's echo carries the value back into the guest.
    let request = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nAuthorization: Bearer {ph}\r\n\r\n");
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect");
    g.tcp_send_all(h, request.as_bytes(), deadline(SHORT))
        .unwrap();
    let head = g
        .tcp_recv_exact(h, 15, deadline(SHORT))
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert_eq!(head, b"HTTP/1.1 200 OK");
    assert!(contains(&seen.lock().unwrap(), &format!("Bearer {KEY}")));
    // Not allowed: the placeholder in a raw stream to an address no allowed name resolved to.
    let v = g.tcp_connect(PUBLIC_IP2, 5555, SHORT).expect("connect");
    let vport = g.tcp(v).local_endpoint().unwrap().port;
    g.tcp_send_all(v, format!("hello {ph} bye").as_bytes(), deadline(SHORT))
        .unwrap();
    let reset = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(v).state() == smoltcp::socket::tcp::State::Closed).then_some(())
    });
    assert!(reset.is_some(), "the raw stream was not reset");
    let (_nf, _counts) = finish(nf, g);

    let raw = std::fs::read(&audit).unwrap();
    assert!(
        !contains(&raw, KEY),
        "the secret's value is in the audit file"
    );
    let lines = audit_lines(&audit);
    let text = show(&lines);
    let violations: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "secret-violation")
        .collect();
    assert_eq!(violations.len(), 1, "{text}");
    let v = violations[0];
    assert_eq!(v["secret"], "API_KEY");
    assert_eq!(v["src"], format!("{GUEST_IP}:{vport}"));
    assert_eq!(v["dst"], format!("{PUBLIC_IP2}:5555"));
    assert_eq!(v["port"], 5555);
    assert_eq!(v["action"], "block_and_log");
    assert!(
        v["host"].is_string() && !v["reason"].as_str().unwrap().is_empty(),
        "{v}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "close" && l["dst"] == format!("{PUBLIC_IP2}:5555")),
        "the reset flow's close line: {text}"
    );
}

/// A flood of 200 denied flows (distinct ports) with `--limit audit-deny-rate=5`: a handful of
/// deny lines, the rest counted in `decisions-suppressed` lines, every denial accounted for;
/// the allowed flow's line is written whatever the flood. Then `audit-queue-bytes` smaller
/// than a line: nothing is written, every line is counted as dropped.
#[test]
fn audit_bounds_a_flood_of_denials_and_its_queue() {
    const SYNS: u16 = 200;
    let dir = TempDir::new("nf-audit-flood");
    let audit = dir.path().join("audit.jsonl");
    let echo = TcpEchoServer::start();
    let mut args = vec![
        "--once".to_string(),
        "--audit".to_string(),
        audit.display().to_string(),
        "--limit".to_string(),
        "audit-deny-rate=5".to_string(),
    ];
    args.extend(map(format!("{PUBLIC_IP}:80"), echo.port()));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let me = g.mac;
    let started = Instant::now();
    for i in 0..SYNS {
        g.dev.fe.send_frame(&common::frames::tcp_syn_frame(
            me,
            gw,
            GUEST_IP,
            PRIVATE_IP,
            30_000 + i,
            1000 + i,
            u32::from(i),
        ));
    }
    // The TX queue is served in order: the gateway's answer comes after every SYN was decided.
    g.ping(GATEWAY, SHORT).expect("ping the gateway");
    let flood_secs = started.elapsed().as_secs_f64();
    g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("allowed flow");
    let (_nf, _counts) = finish(nf, g);
    let lines = audit_lines(&audit);
    let text = show(&lines);
    let denied = lines
        .iter()
        .filter(|l| {
            l["event"] == "decision"
                && l["action"] == "deny"
                && l["dst"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("{PRIVATE_IP}:"))
        })
        .count() as u64;
    let suppressed: u64 = lines
        .iter()
        .filter(|l| l["event"] == "decisions-suppressed")
        .map(|l| l["denied"].as_u64().unwrap())
        .sum();
    assert_eq!(
        denied + suppressed,
        u64::from(SYNS),
        "every denial is written or counted: {denied} + {suppressed}\n{text}"
    );
    let windows = flood_secs.ceil() as u64 + 1;
    assert!(
        (5..=5 * windows).contains(&denied),
        "{denied} deny lines in {flood_secs:.2} s at 5 a second"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "decision" && l["action"] == "allow"),
        "the allowed flow's decision: {text}"
    );
    println!(
        "audit: {SYNS} denied SYNs in {flood_secs:.2} s -> {denied} lines, {suppressed} suppressed"
    );

    // A queue smaller than one line: every line is dropped and counted.
    let audit2 = dir.path().join("audit2.jsonl");
    let mut args = vec![
        "--once".to_string(),
        "--audit".to_string(),
        audit2.display().to_string(),
        "--limit".to_string(),
        "audit-queue-bytes=64".to_string(),
    ];
    args.extend(map(format!("{PUBLIC_IP}:80"), echo.port()));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("allowed flow");
    let (nf, _counts) = finish(nf, g);
    let (records, dropped) = writer_closed(&nf, "audit");
    assert_eq!(records, 0);
    assert!(
        dropped >= 2,
        "a DNS-free run still has a decision and a close: {dropped}"
    );
    assert_eq!(std::fs::metadata(&audit2).unwrap().len(), 0);
    assert!(
        nf.log_lines()
            .iter()
            .any(|l| l.contains("audit records dropped") && l.contains("audit-queue-bytes")),
        "{}",
        nf.log_text()
    );
}

/// A path that cannot be written, the same file for both, and out-of-range bounds are
/// argument errors: exit 2 at start-up with a message naming the option; `--help` explains
/// every option; a file already there is kept as FILE.1.
#[test]
fn record_options_are_checked_at_start_up() {
    let dir = TempDir::new("nf-records-cli");
    let d = dir.path().display().to_string();
    let missing = format!("{d}/no/such/dir/trace.pcap");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = format!("{}/audit.jsonl", file.display());
    let same = format!("{d}/same");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--pcap", &missing], "--pcap"),
        (vec!["--audit", &d], "--audit"),
        (vec!["--audit", &under_file], "--audit"),
        (vec!["--pcap", &same, "--audit", &same], "two files"),
        (vec!["--pcap", &same, "--pcap-max-mb", "0"], "--pcap-max-mb"),
        (vec!["--pcap", &same, "--pcap-files", "101"], "--pcap-files"),
        (vec!["--audit-max-mb", "5"], "--audit"),
        (vec!["--pcap-files", "1"], "--pcap"),
    ];
    for (args, says) in cases {
        let mut nf = Netfence::builder().args(&args).no_wait().spawn();
        let status = nf
            .wait_exit(SHORT)
            .unwrap_or_else(|| panic!("{args:?}: still running\n{}", nf.log_text()));
        let text = nf.log_text();
        assert_eq!(status.code(), Some(2), "{args:?}\n{text}");
        assert!(
            text.contains(says),
            "{args:?}: the message does not say {says:?}\n{text}"
        );
        assert!(!text.contains("panicked"), "{text}");
    }
    assert!(
        !Path::new(&same).exists(),
        "nothing was created for refused arguments"
    );

    let help = Command::new(env!("CARGO_BIN_EXE_netfence"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for option in [
        "--pcap <FILE>",
        "--pcap-max-mb <N>",
        "--pcap-files <N>",
        "--audit <FILE>",
        "--audit-max-mb <N>",
        "--audit-files <N>",
        "pcap-queue-bytes",
        "audit-queue-bytes",
        "audit-deny-rate",
    ] {
        assert!(help.contains(option), "run --help lacks {option}");
    }

    // A file from an earlier run is rotated away, not overwritten.
    let pcap = dir.path().join("kept.pcap");
    std::fs::write(&pcap, b"an earlier capture").unwrap();
    let args = ["--pcap".to_string(), pcap.display().to_string()];
    let nf = Netfence::spawn(&args);
    assert_eq!(
        std::fs::read(numbered(&pcap, 1)).unwrap(),
        b"an earlier capture"
    );
    assert_eq!(mode(&pcap), 0o600);
    drop(nf);
}

/// A reload (`ctl reload`) keeps the audit going: the flow it denies has a close line saying
/// so, and a new flow is decided by the new policy, on the same audit file.
#[test]
fn audit_follows_a_reload() {
    let allow = |ports: &str| {
        format!(
            "[policy]\ndefault_egress = \"deny\"\nrules = [ {{ action = \"allow\", destination = \"{PUBLIC_IP}\", protocols = [\"tcp\"], ports = [{ports}] }} ]\n"
        )
    };
    let dir = TempDir::new("nf-audit-reload");
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("netfence.toml");
    std::fs::write(&config, allow("80, 81")).unwrap();
    let control = dir.path().join("nf.ctl");
    let (kept, cut) = (TcpEchoServer::start(), TcpEchoServer::start());
    let mut args = vec![
        "--once".to_string(),
        "--audit".to_string(),
        audit.display().to_string(),
        "--config".to_string(),
        config.display().to_string(),
        "--control".to_string(),
        control.display().to_string(),
    ];
    args.extend(map(format!("{PUBLIC_IP}:80"), kept.port()));
    args.extend(map(format!("{PUBLIC_IP}:81"), cut.port()));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let stay = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("flow to 80");
    let go = g.tcp_connect(PUBLIC_IP, 81, SHORT).expect("flow to 81");
    let go_port = g.tcp(go).local_endpoint().unwrap().port;
    g.tcp_send_all(go, b"before", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(go, 6, deadline(SHORT)).unwrap(), b"before");
    std::fs::write(&config, allow("80")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_netfence"))
        .args(["ctl", "--control", control.to_str().unwrap(), "reload"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let closed = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(go).state() == smoltcp::socket::tcp::State::Closed).then_some(())
    });
    assert!(closed.is_some(), "the denied flow was not reset");
    assert!(g
        .tcp_connect(PUBLIC_IP, 81, std::time::Duration::from_millis(500))
        .is_err());
    g.tcp_send_all(stay, b"after", deadline(SHORT)).unwrap();
    assert_eq!(
        g.tcp_recv_exact(stay, 5, deadline(SHORT)).unwrap(),
        b"after"
    );
    let (_nf, _counts) = finish(nf, g);

    let lines = audit_lines(&audit);
    let text = show(&lines);
    let to_81 = format!("{PUBLIC_IP}:81");
    let reset = lines
        .iter()
        .find(|l| l["event"] == "close" && l["src"] == format!("{GUEST_IP}:{go_port}"))
        .unwrap_or_else(|| panic!("no close line for the reset flow\n{text}"));
    assert_eq!(reset["why"], "denied by the reloaded policy", "{reset}");
    assert_eq!(reset["bytes_to_host"], 6);
    let decisions_81: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "decision" && l["dst"] == to_81)
        .collect();
    assert_eq!(decisions_81.len(), 2, "{text}");
    assert_eq!(decisions_81[0]["action"], "allow");
    assert_eq!(
        decisions_81[1]["action"], "deny",
        "the reloaded policy: {text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "close" && l["dst"] == format!("{PUBLIC_IP}:80")),
        "the kept flow's close line: {text}"
    );
}

/// A client's session through a published UDP port ends in the audit too (as TCP flows do),
/// with the bytes each way: here when the link closes.
#[test]
fn audit_closes_published_udp_sessions() {
    let dir = TempDir::new("nf-audit-udp");
    let audit = dir.path().join("audit.jsonl");
    let hp = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nf = Netfence::spawn(&[
        "--once".to_string(),
        "--audit".to_string(),
        audit.display().to_string(),
        "-p".to_string(),
        format!("{hp}:5353/udp"),
    ]);
    let mut g = guest_up(&nf);
    let sock = g.udp_bind(5353);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(SHORT)).unwrap();
    client.send_to(b"alpha", ("127.0.0.1", hp)).unwrap();
    let (data, from) = g
        .udp_recv(sock, deadline(SHORT))
        .unwrap_or_else(|| panic!("no datagram\n{}", nf.log_text()));
    assert_eq!(data, b"alpha");
    g.udp_send(sock, GATEWAY, from.port, b"echo alpha");
    // The answer leaves through netfence's worker: serve the guest until it has.
    let got = g.poll_until(deadline(SHORT), |_| {
        let mut buf = [0u8; 64];
        client.set_nonblocking(true).unwrap();
        client
            .recv_from(&mut buf)
            .ok()
            .map(|(n, _)| buf[..n].to_vec())
    });
    assert_eq!(
        got.as_deref(),
        Some(&b"echo alpha"[..]),
        "{}",
        nf.log_text()
    );
    let client_addr = client.local_addr().unwrap();
    let (_nf, _counts) = finish(nf, g);

    let lines = audit_lines(&audit);
    let text = show(&lines);
    let closes: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "close" && l["protocol"] == "udp")
        .collect();
    assert_eq!(closes.len(), 1, "{text}");
    let c = closes[0];
    assert_eq!(c["direction"], "ingress", "{c}");
    assert_eq!(c["src"], client_addr.to_string(), "{c}");
    assert_eq!(c["dst"], format!("{GUEST_IP}:5353"), "{c}");
    assert_eq!(c["bytes_to_guest"], 5, "{c}");
    assert_eq!(c["bytes_to_host"], 10, "{c}");
    assert_eq!(c["why"], "link closed", "{c}");
}
