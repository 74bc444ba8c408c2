//! Real-guest test: one QEMU (TCG) boot of a Linux guest attached to netfence over vhost-user.
//!
//! The guest is the Debian kernel + busybox initramfs that `scripts/build-guest.sh` writes to
//! `target/guest/`; `scripts/run-guest.sh` boots it with a shell script on its kernel command line.
//! In that one boot the guest's own tools check, through netfence:
//!
//! - DHCP: `udhcpc` gets 172.16.0.2/30 with router 172.16.0.1 (slot 0);
//! - ICMP: `ping` to the gateway is answered;
//! - TCP: `curl http://203.0.113.7/` fetches a body from an HTTP server inside this test on
//!   127.0.0.1 (`--map 203.0.113.7:80=127.0.0.1:PORT`), byte-exact (CRC-32 and length compared);
//! - UDP: `curl tftp://203.0.113.8/` reads a file from a one-packet TFTP server in this test on
//!   127.0.0.1 (`--map 203.0.113.8:69=127.0.0.1:PORT`);
//! - policy: `curl http://10.1.2.3/` (private, denied by the default public-only policy) fails;
//! - IPv6: the kernel configures fd42:6d73:62::/64 by SLAAC from netfence's router advertisement
//!   with a default route via fe80::1; `ping -6` reaches the gateway and 2001:db8::9 (mapped to
//!   ::1 through an unprivileged ICMPv6 socket); `curl http://[2001:db8::7]/` fetches the same
//!   body byte-exact; `curl http://[fd12::1]/` and `ping -6 fd12::1` (private) are denied.
//!
//! and the test checks netfence's log for the allow and deny decisions. Every address the guest
//! uses is a documentation or private range that netfence maps to loopback or denies, so nothing
//! leaves the host. Run `scripts/build-guest.sh` first (scripts/test.sh does): without the guest
//! image this test fails, it never skips.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Upper bound for the whole boot; run-guest.sh kills QEMU itself after `GUEST_TIMEOUT_SECS`.
const GUEST_TIMEOUT_SECS: u64 = 180;
/// How long netfence may take to bind its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of the HTTP body: several TCP segments and window updates, quick under TCG.
const BODY_LEN: usize = 200_000;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn guest_dir() -> PathBuf {
    std::env::var_os("NETFENCE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("guest"))
}

/// CRC-32 (IEEE 802.3, the zlib one), as busybox `crc32` prints it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// A body that is different on every run (the marker) and not trivially compressible.
fn make_body(marker: &str) -> Vec<u8> {
    let mut body = format!("netfence guest test body {marker}\n").into_bytes();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(crc32(marker.as_bytes()));
    while body.len() < BODY_LEN {
        // xorshift64*, printable so a failure shows readable bytes
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        body.push(b'!' + (v >> 58) as u8);
        if body.len() % 64 == 63 {
            body.push(b'\n');
        }
    }
    body.truncate(BODY_LEN);
    body
}

/// Serves `body` to every connection (HTTP/1.0, one request per connection) until the test ends.
fn start_http_server(body: Arc<Vec<u8>>, hits: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind HTTP server on 127.0.0.1");
    let port = listener.local_addr().expect("HTTP server address").port();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let body = Arc::clone(&body);
            hits.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || serve_http(&mut conn, &body));
        }
    });
    port
}

fn serve_http(conn: &mut TcpStream, body: &[u8]) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
    let _ = conn.flush();
}

/// A TFTP server that answers any read request with one DATA packet (block 1, < 512 bytes, so
/// the transfer ends there), sent from the same socket so netfence's UDP flow carries it back.
fn start_tftp_server(content: Vec<u8>, hits: Arc<AtomicUsize>) -> u16 {
    assert!(content.len() < 512, "one TFTP block only");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind TFTP server on 127.0.0.1");
    let port = sock.local_addr().expect("TFTP server address").port();
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                return;
            };
            // opcode 1 = RRQ; anything else (the client's ACK) needs no answer.
            if n >= 2 && buf[..2] == [0, 1] {
                hits.fetch_add(1, Ordering::SeqCst);
                let mut data = vec![0, 3, 0, 1];
                data.extend_from_slice(&content);
                let _ = sock.send_to(&data, peer);
            }
        }
    });
    port
}

/// A temporary directory removed when the test ends, whether it passes or panics.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// netfence, its stderr collected line by line by a reader thread.
struct Netfence {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Netfence {
    fn start(socket: &Path, args: &[String]) -> Netfence {
        let mut child = Command::new(env!("CARGO_BIN_EXE_netfence"))
            .arg("run")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn netfence");
        let stderr = child.stderr.take().expect("netfence stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<()>();
        let log_w = Arc::clone(&log);
        let socket_text = socket.display().to_string();
        let wanted = socket_text.clone();
        let reader = thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening on") && line.contains(&wanted) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                log_w.lock().unwrap().push(line);
            }
        });
        let mut nf = Netfence {
            child,
            log,
            reader: Some(reader),
        };
        if rx.recv_timeout(LISTEN_TIMEOUT).is_err() {
            let status = nf.child.try_wait().ok().flatten();
            let log = nf.stop();
            panic!(
                "netfence did not log `listening on {socket_text}` within {LISTEN_TIMEOUT:?} \
                 (exit status: {status:?}); its log:\n{log}"
            );
        }
        nf
    }

    /// Kills netfence (if still running), waits for its log to be read to the end, returns it.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Netfence {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots the guest with `script` on netfence's socket; returns (console, run-guest.sh exit code).
fn boot_guest(socket: &Path, script_file: &Path) -> (String, Option<i32>) {
    let mut child = Command::new("bash")
        .arg(repo_root().join("scripts").join("run-guest.sh"))
        .arg("--vhost-user")
        .arg(socket)
        .arg("--script")
        .arg(script_file)
        .arg("--timeout")
        .arg(GUEST_TIMEOUT_SECS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scripts/run-guest.sh");
    let mut stdout = child.stdout.take().expect("run-guest stdout");
    let mut stderr = child.stderr.take().expect("run-guest stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let err_thread = thread::spawn(move || {
        let mut err = Vec::new();
        let _ = stderr.read_to_end(&mut err);
        err
    });
    // run-guest.sh bounds QEMU's run time itself; this is the guard against the script hanging.
    let deadline = Duration::from_secs(GUEST_TIMEOUT_SECS + 30);
    let out = match rx.recv_timeout(deadline) {
        Ok(out) => out,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("scripts/run-guest.sh still running after {deadline:?}; killed");
        }
    };
    let status = child.wait().expect("wait for run-guest.sh");
    let err = err_thread.join().unwrap_or_default();
    let mut console = String::from_utf8_lossy(&out).replace('\r', "");
    console.push_str(&String::from_utf8_lossy(&err));
    (console, status.code())
}

/// The shell script the guest runs. Each check prints `CHECK-OK name` or `CHECK-FAIL name`.
fn guest_script(marker: &str) -> String {
    format!(
        r#"ok() {{ echo "CHECK-OK $1"; }}
bad() {{ echo "CHECK-FAIL $1 $2"; }}
udhcpc -i eth0 -n -q -t 5 -T 2 && ok dhcp || bad dhcp "udhcpc failed"
ip -4 addr show eth0
ip route
ip -4 addr show eth0 | grep -q 'inet 172.16.0.2/30' && ok lease || bad lease "no 172.16.0.2/30 on eth0"
ip route | grep -q '^default via 172.16.0.1' && ok route || bad route "no default route via 172.16.0.1"
ping -c 1 -W 5 172.16.0.1 && ok ping || bad ping "gateway did not answer"
curl -sS --max-time 30 -o /tmp/body http://203.0.113.7/ && ok http || bad http "curl rc=$?"
echo "BODY crc32=$(crc32 < /tmp/body) len=$(wc -c < /tmp/body)"
grep -q '{marker}' /tmp/body && ok marker || bad marker "marker not in body"
curl -sS --max-time 15 --tftp-no-options -o /tmp/udp tftp://203.0.113.8/check && ok udp || bad udp "curl tftp rc=$?"
echo "UDP [$(cat /tmp/udp)]"
t0=$(date +%s)
curl -sS --connect-timeout 4 --max-time 6 -o /dev/null http://10.1.2.3/
rc=$?
echo "DENIED rc=$rc after $(($(date +%s) - t0))s"
[ $rc -ne 0 ] && ok denied || bad denied "curl to 10.1.2.3 succeeded"
# IPv6: wait (bounded) for SLAAC to finish duplicate address detection.
for i in $(seq 1 40); do
  ip -6 addr show dev eth0 | grep 'scope global' | grep -qv tentative && break
  sleep 0.25
done
ip -6 addr show dev eth0
ip -6 route
ip -6 addr show dev eth0 | grep -q 'inet6 fd42:6d73:62:0:.*/64 scope global' && ok slaac || bad slaac "no SLAAC address in fd42:6d73:62::/64"
ip -6 route | grep -q '^default via fe80::1' && ok route6 || bad route6 "no default route via fe80::1"
ping -6 -c 1 -W 5 fd42:6d73:62::1 && ok ping6-gateway || bad ping6-gateway "gateway did not answer"
ping -6 -c 2 -W 5 2001:db8::9 && ok ping6-mapped || bad ping6-mapped "mapped ICMPv6 echo failed"
curl -sS --max-time 30 -g -o /tmp/body6 'http://[2001:db8::7]/' && ok http6 || bad http6 "curl rc=$?"
echo "BODY6 crc32=$(crc32 < /tmp/body6) len=$(wc -c < /tmp/body6)"
curl -sS --connect-timeout 4 --max-time 6 -g -o /dev/null 'http://[fd12::1]/' && bad denied6 "curl to [fd12::1] succeeded" || ok denied6
ping -6 -c 1 -W 2 fd12::1 && bad ping6-denied "ping to fd12::1 answered" || ok ping6-denied
exit 0
"#
    )
}

fn unique_marker() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("nf{:x}x{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

#[test]
fn real_guest_dual_stack_gets_addresses_pings_fetches_mapped_tcp_udp_and_is_denied_private() {
    let gdir = guest_dir();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        assert!(
            gdir.join(f).is_file(),
            "guest image {} is missing: run scripts/build-guest.sh (scripts/test.sh does it)",
            gdir.join(f).display()
        );
    }

    let marker = unique_marker();
    let body = Arc::new(make_body(&marker));
    let http_hits = Arc::new(AtomicUsize::new(0));
    let http_port = start_http_server(Arc::clone(&body), Arc::clone(&http_hits));
    let udp_content = format!("udp-ok-{marker}");
    let tftp_hits = Arc::new(AtomicUsize::new(0));
    let tftp_port = start_tftp_server(udp_content.clone().into_bytes(), Arc::clone(&tftp_hits));

    let tmp = TempDir(std::env::temp_dir().join(format!("netfence-guest-test-{marker}")));
    std::fs::create_dir_all(&tmp.0).expect("create temp dir");
    let socket = tmp.0.join("netfence.sock");
    let script_file = tmp.0.join("guest.sh");
    std::fs::write(&script_file, guest_script(&marker)).expect("write guest script");

    let mut nf = Netfence::start(
        &socket,
        &[
            "--once".to_string(),
            "--map".to_string(),
            format!("203.0.113.7:80=127.0.0.1:{http_port}"),
            "--map".to_string(),
            format!("203.0.113.8:69=127.0.0.1:{tftp_port}"),
            "--map".to_string(),
            format!("[2001:db8::7]:80=127.0.0.1:{http_port}"),
            "--map".to_string(),
            "2001:db8::9=::1".to_string(),
        ],
    );
    let started = Instant::now();
    let (console, rc) = boot_guest(&socket, &script_file);
    let boot_secs = started.elapsed().as_secs_f64();
    let log = nf.stop();

    let report = format!(
        "--- guest console ({boot_secs:.1}s, run-guest.sh exit {rc:?}) ---\n{console}\n--- netfence log ---\n{log}\n---"
    );
    println!("{report}");

    assert!(
        console.contains("NETFENCE-GUEST-END rc=0"),
        "guest did not finish its script (timeout or crash?)\n{report}"
    );
    let failed: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("CHECK-FAIL"))
        .collect();
    assert!(
        failed.is_empty(),
        "guest checks failed: {failed:?}\n{report}"
    );
    for check in [
        "dhcp",
        "lease",
        "route",
        "ping",
        "http",
        "marker",
        "udp",
        "denied",
        "slaac",
        "route6",
        "ping6-gateway",
        "ping6-mapped",
        "http6",
        "denied6",
        "ping6-denied",
    ] {
        assert!(
            console
                .lines()
                .any(|l| l.trim() == format!("CHECK-OK {check}")),
            "guest check `{check}` did not pass\n{report}"
        );
    }

    for prefix in ["BODY", "BODY6"] {
        let expected = format!("{prefix} crc32={:08x} len={}", crc32(&body), body.len());
        assert!(
            console.lines().any(|l| l.trim() == expected),
            "HTTP body through netfence is not byte-exact: expected `{expected}`\n{report}"
        );
    }
    assert!(
        console.contains(&format!("UDP [{udp_content}]")),
        "TFTP (UDP) reply through netfence differs: expected `{udp_content}`\n{report}"
    );
    assert!(
        http_hits.load(Ordering::SeqCst) >= 1,
        "the loopback HTTP server saw no connection\n{report}"
    );
    assert!(
        tftp_hits.load(Ordering::SeqCst) >= 1,
        "the loopback TFTP server saw no request\n{report}"
    );

    let decision = |action: &str, dst: &str| {
        log.lines().any(|l| {
            l.contains("decision") && l.contains(&format!("action={action}")) && l.contains(dst)
        })
    };
    assert!(
        decision("allow", "203.0.113.7:80"),
        "netfence logged no allow decision for 203.0.113.7:80\n{report}"
    );
    assert!(
        decision("allow", "203.0.113.8:69"),
        "netfence logged no allow decision for 203.0.113.8:69 (UDP)\n{report}"
    );
    assert!(
        decision("deny", "10.1.2.3:80"),
        "netfence logged no deny decision for 10.1.2.3:80\n{report}"
    );
    for (action, dst) in [
        ("allow", "[2001:db8::7]:80"),
        ("allow", "[2001:db8::9]:0"),
        ("deny", "[fd12::1]:80"),
        ("deny", "[fd12::1]:0"),
    ] {
        assert!(
            decision(action, dst),
            "netfence logged no {action} decision for {dst}\n{report}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("action=allow") && l.contains("proto=icmpv6")),
        "no ICMPv6 allow decision logged\n{report}"
    );
}

#[test]
fn crc32_matches_the_zlib_value() {
    assert_eq!(crc32(b"abc"), 0x3524_41c2);
    assert_eq!(crc32(b""), 0);
}
