//! Running netfence as a child process for a test.
//!
//! [`Netfence::spawn`] starts `netfence run --socket <tmpdir>/nf.sock <args>` and waits until it
//! logs `listening on`. A reader thread copies the child's stderr line by line into a shared log
//! (ANSI colour codes stripped) and wakes anyone blocked in [`Netfence::wait_for_log`] through a
//! condvar; nothing here sleeps. On drop the child is killed, and if the test is panicking the
//! whole log is printed so a CI failure shows what netfence said.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{Guest, TempDir, SHORT};

/// How long `spawn` waits for `listening on`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Lines kept of a child's output at most; later lines are only counted (a runaway logger
/// must fail its test, not exhaust the test's memory).
pub const MAX_KEPT_LINES: usize = 100_000;

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// The child's stderr reached EOF (it exited or closed stderr).
    closed: bool,
    /// Bytes of output seen (kept or not).
    bytes: u64,
    /// Lines seen beyond `MAX_KEPT_LINES`.
    dropped_lines: u64,
}

/// The child's stderr, shared between the reader thread and the test.
#[derive(Default)]
pub struct SharedLog {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl SharedLog {
    fn push(&self, line: String, raw_len: usize) {
        let mut st = self.state.lock().unwrap();
        st.bytes += raw_len as u64;
        if st.lines.len() < MAX_KEPT_LINES {
            st.lines.push(line);
        } else {
            st.dropped_lines += 1;
        }
        self.changed.notify_all();
    }

    fn close(&self) {
        let mut st = self.state.lock().unwrap();
        st.closed = true;
        self.changed.notify_all();
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    /// Blocks until a line from index `from` on satisfies `pred`, the log closes, or the timeout
    /// passes. Returns the index and text of the first matching line.
    pub fn wait_for_line(
        &self,
        from: usize,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap();
        let mut next = from;
        loop {
            while next < st.lines.len() {
                if pred(&st.lines[next]) {
                    return Some((next, st.lines[next].clone()));
                }
                next += 1;
            }
            if st.closed {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }
}

/// Removes ANSI escape sequences (tracing colours) from a line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters then one final byte in 0x40..=0x7e.
                for c2 in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c2) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// One flow decision line of netfence's log, picked apart.
#[derive(Clone, Debug)]
pub struct DecisionLine {
    pub action: String,
    pub reason: String,
    pub dst: String,
    pub line: String,
}

/// Reads `key=value` out of a tracing line (value ends at whitespace or comma; quotes stripped).
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut search = 0;
    while let Some(pos) = line[search..].find(&pat) {
        let start = search + pos;
        // Must be at a word boundary so `dst=` does not match `xdst=`.
        let boundary = start == 0
            || !line[..start]
                .chars()
                .next_back()
                .map(|c| c.is_alphanumeric() || c == '_')
                .unwrap_or(false);
        let vstart = start + pat.len();
        if boundary {
            let rest = &line[vstart..];
            let value = if let Some(stripped) = rest.strip_prefix('"') {
                stripped.split('"').next().unwrap_or("").to_string()
            } else {
                rest.split(|c: char| c.is_whitespace() || c == ',')
                    .next()
                    .unwrap_or("")
                    .to_string()
            };
            return Some(value);
        }
        search = vstart;
    }
    None
}

/// Builder for a netfence child with extra arguments and environment.
pub struct NetfenceBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    wait_listening: bool,
    wrapper: Vec<String>,
    socket: Option<PathBuf>,
}

impl NetfenceBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<S: AsRef<str>>(mut self, a: &[S]) -> Self {
        self.args.extend(a.iter().map(|s| s.as_ref().to_string()));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Runs netfence through a wrapper command: `wrapper... NETFENCE_BINARY run --socket ...`,
    /// e.g. `["sh", "-c", "ulimit -Sn 64 && exec \"$0\" \"$@\""]`: the binary and its
    /// arguments reach the shell as `$0` and `$@`, so the setup runs first (e.g. inside
    /// `unshare`'s new namespaces). The wrapper must end in an `exec` of netfence, so that killing
    /// the child kills netfence.
    pub fn wrapper<S: AsRef<str>>(mut self, w: &[S]) -> Self {
        self.wrapper = w.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// Listen on `path` instead of `nf.sock` in the instance's scratch directory.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Do not wait for `listening on` (for tests of argument errors).
    pub fn no_wait(mut self) -> Self {
        self.wait_listening = false;
        self
    }

    pub fn spawn(self) -> Netfence {
        let dir = TempDir::new("netfence");
        let socket = self.socket.unwrap_or_else(|| dir.path().join("nf.sock"));
        let binary = env!("CARGO_BIN_EXE_netfence");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        cmd.arg("run").arg("--socket").arg(&socket).args(&self.args);
        // Default log level: info, unless the caller's environment or the builder says otherwise.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // If the test process dies without running Drop (killed, aborted), take netfence along.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn netfence binary");
        let log = Arc::new(SharedLog::default());
        let stderr = child.stderr.take().expect("stderr piped");
        let stdout = child.stdout.take().expect("stdout piped");
        let reader = {
            let log = log.clone();
            thread::Builder::new()
                .name("netfence-stderr".into())
                .spawn(move || read_lines(stderr, &log, ""))
                .unwrap()
        };
        // stdout is not part of the contract, but keep it (prefixed) so nothing blocks on a pipe.
        let out_reader = {
            let log = log.clone();
            thread::Builder::new()
                .name("netfence-stdout".into())
                .spawn(move || read_lines(stdout, &log, "[stdout] "))
                .unwrap()
        };
        let nf = Netfence {
            child: Some(child),
            dir,
            socket,
            log,
            args: self.args,
            readers: vec![reader, out_reader],
        };
        if self.wait_listening {
            let sock = nf.socket.display().to_string();
            if nf
                .log
                .wait_for_line(0, START_TIMEOUT, |l| {
                    l.contains("listening on") && l.contains(&sock)
                })
                .is_none()
            {
                panic!(
                    "netfence did not log `listening on {sock}` within {START_TIMEOUT:?}\n{}",
                    nf.log_text()
                );
            }
        }
        nf
    }
}

/// Copies `r` line by line (ANSI codes stripped, `prefix` prepended) into `log`; closes the log
/// at EOF when `prefix` is empty (the stream whose end means "the child exited").
pub fn read_lines(r: impl Read, log: &SharedLog, prefix: &str) {
    let mut br = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match br.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let s = String::from_utf8_lossy(&buf);
                let s = s.trim_end_matches(['\n', '\r']);
                log.push(format!("{prefix}{}", strip_ansi(s)), n);
            }
        }
    }
    if prefix.is_empty() {
        log.close();
    }
}

/// A running netfence child process.
pub struct Netfence {
    child: Option<Child>,
    dir: TempDir,
    /// The vhost-user socket it listens on.
    pub socket: PathBuf,
    log: Arc<SharedLog>,
    args: Vec<String>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Netfence {
    /// Starts `netfence run --socket <tmp>/nf.sock <args>` and waits for `listening on`.
    pub fn spawn<S: AsRef<str>>(args: &[S]) -> Netfence {
        Netfence::builder().args(args).spawn()
    }

    pub fn builder() -> NetfenceBuilder {
        NetfenceBuilder {
            args: Vec::new(),
            env: Vec::new(),
            wait_listening: true,
            wrapper: Vec::new(),
            socket: None,
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Scratch directory of this instance (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Number of log lines so far; pass it to `wait_for_log_after` to only look at newer lines.
    pub fn log_mark(&self) -> usize {
        self.log.state.lock().unwrap().lines.len()
    }

    /// Blocks until a log line contains `needle` (or timeout / child exit). Returns the line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_log_after(0, needle, timeout)
    }

    pub fn wait_for_log_after(
        &self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> Option<String> {
        self.log
            .wait_for_line(mark, timeout, |l| l.contains(needle))
            .map(|(_, l)| l)
    }

    /// Blocks until a line satisfies `pred`.
    pub fn wait_for_line(
        &self,
        mark: usize,
        timeout: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        self.log.wait_for_line(mark, timeout, pred).map(|(_, l)| l)
    }

    /// Blocks until a flow decision line for `dst` (e.g. "10.1.2.3:80") appears.
    pub fn wait_for_decision(&self, dst: &str, timeout: Duration) -> Option<DecisionLine> {
        self.wait_for_line(0, timeout, |l| {
            l.contains("decision") && field(l, "dst").as_deref() == Some(dst)
        })
        .map(|l| parse_decision(&l))
    }

    /// Blocks until a flow decision line satisfying `pred` appears (e.g. a dst compared as an
    /// address rather than as text, which IPv6 spellings need).
    pub fn wait_for_decision_where(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&DecisionLine) -> bool,
    ) -> Option<DecisionLine> {
        self.wait_for_line(0, timeout, |l| {
            l.contains("decision") && l.contains("action=") && pred(&parse_decision(l))
        })
        .map(|l| parse_decision(&l))
    }

    /// Every flow decision logged so far.
    pub fn decisions(&self) -> Vec<DecisionLine> {
        self.log
            .lines()
            .iter()
            .filter(|l| l.contains("decision") && l.contains("action="))
            .map(|l| parse_decision(l))
            .collect()
    }

    /// Bytes the child has written to stderr and stdout so far (also those past
    /// [`MAX_KEPT_LINES`]).
    pub fn log_bytes(&self) -> u64 {
        self.log.state.lock().unwrap().bytes
    }

    /// CPU time (user + system, all threads) the child has used so far, from /proc/PID/stat.
    pub fn cpu_seconds(&self) -> f64 {
        let pid = self.pid().expect("netfence is running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
        // Fields after the command name (which may contain spaces) start after the last ')':
        // state is field 3, utime field 14 and stime field 15.
        let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> u64 { fields[i - 3].parse().expect("numeric stat field") };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks(14) + ticks(15)) as f64 / hz
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines()
    }

    /// The whole log for a failure message; runs of lines that differ only in their timestamp
    /// (a spinning worker logs the same error millions of times) are cut short.
    pub fn log_text(&self) -> String {
        let mut s = format!("---- netfence log (args {:?}) ----\n", self.args);
        s.push_str(&collapse_repeats(&self.log.lines(), REPEATS_SHOWN));
        let dropped = self.log.state.lock().unwrap().dropped_lines;
        if dropped > 0 {
            s.push_str(&format!("... and {dropped} more lines not kept\n"));
        }
        s.push_str("---- end of netfence log ----");
        s
    }

    /// Is the child still running?
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics unless the child is still running and has logged no panic; `after` names what
    /// the test did last, for the message.
    pub fn assert_running(&mut self, after: &str) {
        assert!(self.is_running(), "netfence exited after {after}");
        let panics: Vec<String> = self
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("panicked"))
            .collect();
        assert!(
            panics.is_empty(),
            "netfence panicked after {after}: {panics:?}"
        );
    }

    /// Waits for the child to exit on its own (stderr EOF is the event), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        // The stderr reader closes the log at EOF; wait for that, then reap.
        let _ = self.log.wait_for_line(usize::MAX, timeout, |_| false);
        if !self.log.state.lock().unwrap().closed {
            return None;
        }
        // stderr reached EOF: the process has exited (or is exiting); reap it.
        self.child.as_mut()?.wait().ok()
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many lines of a run of repeated lines [`collapse_repeats`] keeps.
pub const REPEATS_SHOWN: usize = 3;

/// `lines` joined with newlines, each run of lines equal but for their leading timestamp cut to
/// its first `keep` lines and a count of the rest.
pub fn collapse_repeats(lines: &[String], keep: usize) -> String {
    fn without_timestamp(l: &str) -> &str {
        // tracing's default format starts with an RFC 3339 timestamp: 2026-01-01T00:00:00.000Z
        match l.split_once(' ') {
            Some((first, rest)) if first.len() > 10 && first.as_bytes()[4] == b'-' => rest,
            _ => l,
        }
    }
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let key = without_timestamp(&lines[i]);
        let run = lines[i..]
            .iter()
            .take_while(|l| without_timestamp(l) == key)
            .count();
        for l in &lines[i..i + run.min(keep)] {
            out.push_str(l);
            out.push('\n');
        }
        if run > keep {
            out.push_str(&format!(
                "... {} more lines like the one above ({} bytes)\n",
                run - keep,
                lines[i + keep..i + run]
                    .iter()
                    .map(|l| l.len() + 1)
                    .sum::<usize>()
            ));
        }
        i += run;
    }
    out
}

fn parse_decision(l: &str) -> DecisionLine {
    DecisionLine {
        action: field(l, "action").unwrap_or_default(),
        reason: field(l, "reason").unwrap_or_default(),
        dst: field(l, "dst").unwrap_or_default(),
        line: l.to_string(),
    }
}

impl Drop for Netfence {
    fn drop(&mut self) {
        self.kill();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if thread::panicking() {
            eprintln!("{}", self.log_text());
        }
    }
}

/// What netfence counted on a link: the "link closed" line's `drops` (by reason) and its other
/// numeric fields (`denied_memo_hits`, `open_udp`, ...), under their names.
pub struct LinkCounts(pub HashMap<String, u64>);

impl LinkCounts {
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }
}

/// Drops the guest (the VMM leaves) and reads the "link closed" line logged after `mark`.
pub fn close_and_count(nf: &Netfence, g: Guest, mark: usize) -> LinkCounts {
    drop(g);
    let line = nf
        .wait_for_log_after(mark, "link closed", SHORT)
        .unwrap_or_else(|| panic!("no 'link closed' line\n{}", nf.log_text()));
    let mut counts = HashMap::new();
    for pair in field(&line, "drops").unwrap_or_default().split(',') {
        if let Some((k, v)) = pair.split_once('=') {
            counts.insert(k.to_string(), v.parse().unwrap_or(0));
        }
    }
    for key in [
        "tcp_buffered_peak",
        "denied_memo_hits",
        "decision_lines",
        "open_tcp",
        "open_udp",
        "open_echo",
        "open_dns_tcp",
    ] {
        if let Some(v) = field(&line, key).and_then(|v| v.parse().ok()) {
            counts.insert(key.to_string(), v);
        }
    }
    LinkCounts(counts)
}
