//! Real-guest tests: one QEMU (TCG) boot of the test guest attached to netfence.
//!
//! The guest is the Debian kernel + busybox initramfs that `scripts/build-guest.sh` writes to
//! `target/guest/`; [`boot_guest`] runs `scripts/run-guest.sh`, which boots it with a shell
//! script on its kernel command line and powers off when the script ends. Scripts report each
//! check as `CHECK-OK name` or `CHECK-FAIL name why`; [`assert_checks`] reads them back. The
//! loopback HTTP server and the bodies here are what the guest fetches through netfence.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// run-guest.sh kills QEMU after this many seconds; the test waits 30 s more for the script.
pub const GUEST_TIMEOUT_SECS: u64 = 180;

/// Where the guest image is (`NETFENCE_GUEST_DIR`, default `target/guest`).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("NETFENCE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"))
}

/// Fails (never skips) when the guest image has not been built.
pub fn require_guest_image() {
    let dir = guest_dir();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        assert!(
            dir.join(f).is_file(),
            "guest image {} is missing: run scripts/build-guest.sh (scripts/test.sh does it)",
            dir.join(f).display()
        );
    }
}

/// A marker that differs on every run: `prefix`, the pid and the clock.
pub fn unique_marker(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}{:x}x{:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

/// CRC-32 (IEEE 802.3, the zlib one), as busybox `crc32` prints it.
pub fn crc32(data: &[u8]) -> u32 {
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

/// A `len`-byte body that starts with `title` and the marker, differs on every run and is not
/// trivially compressible; printable, so a failure shows readable bytes.
pub fn make_body(title: &str, marker: &str, len: usize) -> Vec<u8> {
    let mut body = format!("{title} {marker}\n").into_bytes();
    let mut rng = super::frames::Rng::new(u64::from(crc32(marker.as_bytes())));
    while body.len() < len {
        let v = rng.next_u64();
        body.push(if body.len() % 64 == 63 {
            b'\n'
        } else {
            b'!' + (v >> 58) as u8
        });
    }
    body.truncate(len);
    body
}

/// An HTTP/1.0 server on 127.0.0.1 serving `body` to every request until the test ends; returns
/// its port and the requests it received (one per connection).
pub fn http_server(body: Arc<Vec<u8>>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind HTTP server on 127.0.0.1");
    let port = listener.local_addr().expect("HTTP server address").port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&requests);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (body, seen) = (Arc::clone(&body), Arc::clone(&seen));
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                let mut request = Vec::new();
                let mut buf = [0u8; 2048];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 32 * 1024 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&request).into_owned());
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
                let _ = conn.flush();
            });
        }
    });
    (port, requests)
}

/// Boots the guest with `script` on netfence's `socket`; returns its console (run-guest.sh's
/// stdout, then its stderr) and run-guest.sh's exit code.
pub fn boot_guest(socket: &Path, script: &Path) -> (String, Option<i32>) {
    boot_guest_with(socket, script, &[])
}

/// [`boot_guest`] with more run-guest.sh options (e.g. `--queues 2 --smp 2`).
pub fn boot_guest_with(socket: &Path, script: &Path, options: &[&str]) -> (String, Option<i32>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("bash")
        .arg(root.join("scripts/run-guest.sh"))
        .arg("--vhost-user")
        .arg(socket)
        .arg("--script")
        .arg(script)
        .arg("--timeout")
        .arg(GUEST_TIMEOUT_SECS.to_string())
        .args(options)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scripts/run-guest.sh");
    let mut out = child.stdout.take().expect("run-guest stdout");
    let mut err = child.stderr.take().expect("run-guest stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        let _ = tx.send(v);
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    // run-guest.sh bounds QEMU itself; this guards against the script hanging.
    let limit = Duration::from_secs(GUEST_TIMEOUT_SECS + 30);
    let Ok(out) = rx.recv_timeout(limit) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("scripts/run-guest.sh still running after {limit:?}; killed");
    };
    let status = child.wait().expect("wait for run-guest.sh");
    let err = err_reader.join().unwrap_or_default();
    let mut console = String::from_utf8_lossy(&out).replace('\r', "");
    console.push_str(&String::from_utf8_lossy(&err));
    (console, status.code())
}

/// The guest finished its script, no check failed, and every one of `checks` passed.
pub fn assert_checks(console: &str, checks: &[&str], report: &str) {
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
    for check in checks {
        assert!(
            console
                .lines()
                .any(|l| l.trim() == format!("CHECK-OK {check}")),
            "guest check `{check}` did not pass\n{report}"
        );
    }
}
