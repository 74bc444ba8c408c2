//! dpdk-testpmd as an independent vhost-user frontend, and what its tests need beside it.
//!
//! A harness written next to the backend shares its blind spots; testpmd's `net_virtio_user`
//! port is a VMM-side vhost-user implementation nobody here wrote (it found the link that wedged
//! when a frontend left mid-traffic, issue 9). [`Testpmd::spawn`] runs it on netfence's socket:
//!
//! ```text
//! stdbuf -oL -eL dpdk-testpmd --lcores 0@B,1@A --main-lcore 0 --no-pci -m 256
//!     --single-file-segments --in-memory --no-telemetry --file-prefix=nf-NAME-PID-N
//!     --vdev net_virtio_user0,path=SOCK,queues=1,mac=GUEST_MAC
//!     -- --forward-mode=MODE --nb-cores=1 --total-num-mbufs=8192 ARGS...
//! ```
//!
//! - Memory: `-m 256` preallocates 128 hugepages of 2 MiB; `--total-num-mbufs=8192` keeps the
//!   mbuf pool inside them (testpmd's default pool, 155,456 mbufs, grows it to ~216 pages).
//!   scripts/hugepages.sh reserves them. `--in-memory` unlinks the hugepage files, so the pages
//!   go back to the kernel when the process ends, however it ends; the runtime directory of the
//!   file prefix is removed on drop.
//! - CPU: testpmd's forwarding lcore polls at 100%; it is pinned to one CPU and the main lcore to
//!   the other (the machines have 2 cores), as TESTING.md shows.
//! - stdout goes line-buffered through `stdbuf` into a [`SharedLog`], so a failing test shows
//!   everything testpmd said; stdin is a pipe held open, because non-interactive testpmd leaves
//!   at EOF on stdin ("Press enter to exit").
//! - testpmd is SIGKILLed on drop and dies with the test thread (PR_SET_PDEATHSIG) if the test
//!   process dies first. A testpmd that cannot start fails the test with its output: no skips.
//!
//! Also here: [`UdpSink`] (a loopback UDP socket that counts what netfence delivers to it),
//! [`CpuWatch`] (a process's CPU use from /proc/PID/stat) and [`lease_within`] (a harness
//! frontend's DHCP lease, bounded by a deadline even if the handshake never completes).

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::process::{collapse_repeats, read_lines, SharedLog, REPEATS_SHOWN};
use super::{Frontend, FrontendOptions, Guest, GATEWAY};

/// The guest MAC testpmd's port uses: netfence's default `--guest-mac`.
pub const GUEST_MAC: &str = "52:54:00:4e:46:02";
/// netfence's gateway MAC, the Ethernet destination of testpmd's txonly frames.
pub const GATEWAY_MAC: &str = "52:54:00:4e:46:01";
/// Hugepage memory each testpmd preallocates (`-m`), in MiB.
pub const TESTPMD_MEMORY_MB: u32 = 256;
/// Size of testpmd's mbuf pool; small enough to fit in [`TESTPMD_MEMORY_MB`].
pub const TESTPMD_MBUFS: u32 = 8192;

/// What dpdk-testpmd (22.11) prints when it cannot start or has no working port.
const FATAL_OUTPUT: &[&str] = &[
    "Cannot init EAL",
    "EAL: FATAL",
    "EAL: Error",
    "failed to initialize net_virtio_user0",
    "No probed ethernet devices",
    "Fail to configure port",
    "Fail to start port",
    "Cannot allocate memory",
];

/// A running dpdk-testpmd.
pub struct Testpmd {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    log: Arc<SharedLog>,
    readers: Vec<thread::JoinHandle<()>>,
    prefix: String,
    /// The command line, for failure messages.
    pub command: String,
}

impl Testpmd {
    /// Starts testpmd with one `net_virtio_user` port on `socket` in `forward_mode`; `name`
    /// (short) goes into its unique `--file-prefix`; `app_args` follow the testpmd options.
    pub fn spawn(socket: &Path, name: &str, forward_mode: &str, app_args: &[String]) -> Testpmd {
        static N: AtomicU64 = AtomicU64::new(0);
        let prefix = format!(
            "nf-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let binary = find_in_path("dpdk-testpmd").unwrap_or_else(|| {
            panic!(
                "dpdk-testpmd is not installed (Debian package dpdk-dev): run scripts/install-deps.sh"
            )
        });
        let mut args: Vec<String> = vec![
            "-oL".into(),
            "-eL".into(),
            binary.display().to_string(),
            "--lcores".into(),
            lcores_arg(),
            "--main-lcore".into(),
            "0".into(),
            "--no-pci".into(),
            "-m".into(),
            TESTPMD_MEMORY_MB.to_string(),
            "--single-file-segments".into(),
            "--in-memory".into(),
            "--no-telemetry".into(),
            format!("--file-prefix={prefix}"),
            "--vdev".into(),
            format!(
                "net_virtio_user0,path={},queues=1,mac={GUEST_MAC}",
                socket.display()
            ),
            "--".into(),
            format!("--forward-mode={forward_mode}"),
            "--nb-cores=1".into(),
            format!("--total-num-mbufs={TESTPMD_MBUFS}"),
        ];
        args.extend(app_args.iter().cloned());
        let command = format!("stdbuf {}", args.join(" "));
        let mut cmd = Command::new("stdbuf");
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
        // setting survives stdbuf's exec of testpmd.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        let log = Arc::new(SharedLog::default());
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        let readers = vec![
            spawn_reader(stdout, &log, ""),
            spawn_reader(stderr, &log, "[stderr] "),
        ];
        Testpmd {
            stdin: child.stdin.take(),
            child: Some(child),
            log,
            readers,
            prefix,
            command,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` (libc::SIGTERM: testpmd stops its port, which stops the rings, then
    /// exits; libc::SIGKILL: the socket just closes, as when a VMM crashes).
    pub fn signal(&mut self, signal: i32) {
        if let Some(c) = self.child.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                // SAFETY: plain kill(2) on our own unreaped child.
                unsafe { libc::kill(c.id() as libc::pid_t, signal) };
            }
        }
    }

    /// Closes testpmd's stdin: it stops forwarding, stops and closes its port and exits.
    pub fn leave_cleanly(&mut self) {
        self.stdin = None;
    }

    /// The exit status if testpmd has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for testpmd to exit (its stdout closing is the event).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let _ = self.log.wait_for_line(usize::MAX, timeout, |_| false);
        if start.elapsed() < timeout {
            // Returned early: stdout reached EOF, so the process is exiting; reap it.
            return self.child.as_mut().and_then(|c| c.wait().ok());
        }
        self.exited()
    }

    /// Blocks until a line of testpmd's output contains `needle` (or it exits, or timeout).
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.log
            .wait_for_line(0, timeout, |l| l.contains(needle))
            .map(|(_, l)| l)
    }

    /// The first line of testpmd's output that says it cannot do its job (it does not always
    /// exit then: without a port it waits at "Press enter to exit" like a working one).
    pub fn fatal_error(&self) -> Option<String> {
        self.log
            .lines()
            .into_iter()
            .find(|l| FATAL_OUTPUT.iter().any(|m| l.contains(m)))
    }

    /// Why testpmd is not (or no longer) forwarding, if it says or shows so: its fatal line
    /// (with a hint where the machine set-up is the likely cause) or its exit status.
    pub fn failure(&mut self) -> Option<String> {
        if let Some(line) = self.fatal_error() {
            let hint = if line.to_lowercase().contains("hugepage") || line.contains("memory") {
                " (hugepages: run scripts/hugepages.sh, which scripts/install-deps.sh runs)"
            } else {
                ""
            };
            return Some(format!("dpdk-testpmd failed: {line}{hint}"));
        }
        self.exited()
            .map(|st| format!("dpdk-testpmd exited ({st})"))
    }

    /// Everything testpmd printed so far, with the command line.
    pub fn output_text(&self) -> String {
        format!(
            "---- dpdk-testpmd output ({}) ----\n{}---- end of dpdk-testpmd output ----",
            self.command,
            collapse_repeats(&self.log.lines(), REPEATS_SHOWN)
        )
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        remove_runtime_files(&self.prefix);
        if thread::panicking() {
            eprintln!("{}", self.output_text());
        }
    }
}

fn spawn_reader(
    r: impl Read + Send + 'static,
    log: &Arc<SharedLog>,
    prefix: &'static str,
) -> thread::JoinHandle<()> {
    let log = log.clone();
    thread::Builder::new()
        .name("testpmd-output".into())
        .spawn(move || read_lines(r, &log, prefix))
        .expect("spawn reader thread")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `--lcores`: the main lcore on the second CPU this process may use, the forwarding lcore on
/// the first (both on the same CPU when there is only one).
fn lcores_arg() -> String {
    let cpus = allowed_cpus();
    let first = cpus.first().copied().unwrap_or(0);
    let second = cpus.get(1).copied().unwrap_or(first);
    format!("0@{second},1@{first}")
}

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Removes what a testpmd with `prefix` may leave behind: its runtime directory and, without
/// --in-memory or after a crash, its hugepage files.
fn remove_runtime_files(prefix: &str) {
    let mut dirs = vec![PathBuf::from("/var/run/dpdk").join(prefix)];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        dirs.push(PathBuf::from(x).join("dpdk").join(prefix));
    }
    dirs.push(std::env::temp_dir().join("dpdk").join(prefix));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    if let Ok(entries) = std::fs::read_dir("/dev/hugepages") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// What a [`UdpSink`] has received.
#[derive(Clone, Debug, Default)]
pub struct SinkCount {
    pub datagrams: u64,
    pub bytes: u64,
    /// Sender and payload of the first datagram.
    pub first: Option<(SocketAddr, Vec<u8>)>,
}

/// A UDP socket on 127.0.0.1 that counts the datagrams reaching it; netfence's `--map` sends
/// testpmd's traffic here. Optionally answers each datagram (see [`UdpSink::start_replying`]).
pub struct UdpSink {
    pub addr: SocketAddr,
    state: Arc<(Mutex<SinkCount>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// How a [`UdpSink`] answers: given the payload and the number of datagrams received before
/// it, the payload to send back, if any.
pub type SinkReply = Box<dyn FnMut(&[u8], u64) -> Option<Vec<u8>> + Send>;

impl UdpSink {
    pub fn start() -> UdpSink {
        Self::start_replying(Box::new(|_, _| None))
    }

    pub fn start_replying(mut reply: SinkReply) -> UdpSink {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP sink");
        let addr = socket.local_addr().expect("sink address");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .ok();
        let state = Arc::new((Mutex::new(SinkCount::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("udp-sink".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !sp.load(Ordering::SeqCst) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let before = st.0.lock().unwrap().datagrams;
                    // Before the count moves, so whatever `reply` records is there when a
                    // waiter wakes for the new count.
                    let answer = reply(&buf[..n], before);
                    {
                        let mut c = st.0.lock().unwrap();
                        c.datagrams += 1;
                        c.bytes += n as u64;
                        if c.first.is_none() {
                            c.first = Some((from, buf[..n].to_vec()));
                        }
                        st.1.notify_all();
                    }
                    if let Some(answer) = answer {
                        let _ = socket.send_to(&answer, from);
                    }
                }
            })
            .expect("spawn sink thread");
        UdpSink {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn count(&self) -> SinkCount {
        self.state.0.lock().unwrap().clone()
    }

    /// Blocks until `done` holds for the count, the deadline passes, or `give_up` says so
    /// (checked at least every 100 ms: it watches something that does not wake this sink,
    /// such as a child process exiting). Ok with the count when `done` held.
    pub fn wait_until(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&SinkCount) -> bool,
        mut give_up: impl FnMut() -> bool,
    ) -> Result<SinkCount, SinkCount> {
        let (lock, cv) = &*self.state;
        let mut c = lock.lock().unwrap();
        loop {
            if done(&c) {
                return Ok(c.clone());
            }
            let now = Instant::now();
            if now >= deadline || give_up() {
                return Err(c.clone());
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            c = cv.wait_timeout(c, slice).unwrap().0;
        }
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// CPU time of a process (user + system, /proc/PID/stat fields 14 and 15), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A process's CPU use from a starting point: [`CpuWatch::cores`] is CPU seconds per second.
pub struct CpuWatch {
    pid: u32,
    start: Instant,
    ticks: u64,
}

impl CpuWatch {
    pub fn start(pid: u32) -> CpuWatch {
        CpuWatch {
            pid,
            start: Instant::now(),
            ticks: cpu_ticks(pid).unwrap_or(0),
        }
    }

    /// CPU used since the start, in cores (1.0 = one CPU busy all the time), or None when the
    /// process is gone.
    pub fn cores(&self) -> Option<f64> {
        let now = cpu_ticks(self.pid)?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        Some(now.saturating_sub(self.ticks) as f64 / hz / secs)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Connects a harness frontend to `socket`, gets a DHCP lease and pings the gateway, on a
/// thread, so that a backend that never answers the handshake fails the caller after `timeout`
/// instead of hanging it. Ok with the leased address.
pub fn lease_within(socket: &Path, timeout: Duration) -> Result<String, String> {
    let socket = socket.to_path_buf();
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("second-frontend".into())
        .spawn(move || {
            let r = (|| {
                let fe = Frontend::connect(&socket, FrontendOptions::default())
                    .map_err(|e| format!("vhost-user handshake: {e}"))?;
                let mut g = Guest::new(fe);
                let lease = g.dhcp(super::SHORT * 2)?;
                g.ping(GATEWAY, super::SHORT)
                    .map_err(|e| format!("ping gateway: {e}"))?;
                Ok(lease.address.to_string())
            })();
            let _ = tx.send(r);
        })
        .expect("spawn frontend thread");
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(format!(
            "no DHCP lease and gateway ping within {timeout:?} (handshake or DHCP never answered)"
        ))
    })
}
