//! The control socket (`run --control PATH`) and its client (`netfence ctl`).
//!
//! A unix socket, 0600 from its creation (only netfence's user may ask). One request per
//! connection: the client writes a command line (`status`, `flows`, `reload`, `metrics`) and
//! reads one JSON answer, `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`, then
//! the connection closes. Connections are served one at a time, each with read and write
//! timeouts, so a client that connects and says nothing holds the socket for at most
//! [`CLIENT_TIMEOUT`] and no client can make netfence hold more than one answer.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::{info, warn};

use super::hub::{Gathered, Hub, LinkSnapshot};
use super::metrics;
use super::reload::Reloader;
use crate::observe::LogGate;

/// How long one client may take to send its command and to read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest command line read.
const MAX_REQUEST: u64 = 256;
/// The largest answer `ctl` reads (a flows list of every link is well below).
const MAX_ANSWER: u64 = 64 << 20;

/// Binds the control socket at `path` (0600; a stale socket is replaced, a live one refused).
/// Serving starts with [`start`], after confinement, so that its thread is confined too.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    crate::server::bind_public(path).map_err(|e| e.to_string())
}

/// Serves the bound control socket on a thread of its own.
pub fn start(listener: UnixListener, hub: Arc<Hub>, reloader: Arc<Reloader>) -> Result<(), String> {
    let shown = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_default();
    std::thread::Builder::new()
        .name("netfence-control".to_string())
        .spawn(move || accept_loop(listener, hub, reloader))
        .map_err(|e| format!("cannot start its thread: {e}"))?;
    info!(path = %shown, "control socket ready (netfence ctl --control PATH)");
    Ok(())
}

/// The user id of the process at the other end of `stream` (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn accept_loop(listener: UnixListener, hub: Arc<Hub>, reloader: Arc<Reloader>) {
    let mut failures = LogGate::new(5, Duration::from_secs(60));
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(stream, &hub, &reloader) {
                    if let Some(suppressed) = failures.admit(std::time::Instant::now()) {
                        warn!(error = %e, suppressed, "control client failed");
                    }
                }
            }
            Err(e) => {
                if let Some(suppressed) = failures.admit(std::time::Instant::now()) {
                    warn!(error = %e, suppressed, "control socket accept failed");
                }
                // EMFILE and the like: do not spin on an error that repeats at once.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer(stream: UnixStream, hub: &Hub, reloader: &Reloader) -> std::io::Result<()> {
    // The socket is 0600 already; a peer of another user (root aside) got a descriptor some
    // other way and is not served.
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let peer = peer_uid(&stream)?;
    if peer != me && peer != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("control client of uid {peer} refused (netfence runs as uid {me})"),
        ));
    }
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let line = read_command(&stream)?;
    let reply = match line.trim() {
        "status" => Ok(status_json(&hub.snapshot())),
        "flows" => Ok(flows_json(&hub.snapshot())),
        "metrics" => Ok(Value::String(metrics::encode(&hub.snapshot()))),
        "reload" => reloader
            .reload()
            .map(|done| serde_json::to_value(done).unwrap_or(Value::Null)),
        other => Err(format!(
            "unknown command {other:?} (status, flows, reload, metrics)"
        )),
    };
    let body = match reply {
        Ok(result) => json!({ "ok": true, "result": result }),
        Err(error) => json!({ "ok": false, "error": error }),
    };
    let mut stream = stream;
    serde_json::to_writer(&mut stream, &body)?;
    stream.write_all(b"\n")
}

/// The command line, read whole within [`CLIENT_TIMEOUT`] (not per read: a client trickling a
/// byte at a time must not hold the socket for minutes).
fn read_command(mut stream: &UnixStream) -> std::io::Result<String> {
    let until = Instant::now() + CLIENT_TIMEOUT;
    let mut line = Vec::new();
    let mut byte = [0u8; 64];
    while !line.contains(&b'\n') && (line.len() as u64) < MAX_REQUEST {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "command not complete in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut byte)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&byte[..n]);
    }
    let end = line.iter().position(|b| *b == b'\n').unwrap_or(line.len());
    Ok(String::from_utf8_lossy(&line[..end]).into_owned())
}

/// The sum of the live links' and the retired links' counts.
pub fn totals(g: &Gathered) -> LinkSnapshot {
    let mut all = g.retired.clone();
    for link in &g.links {
        all.absorb_counts(link);
        for (k, v) in &link.open {
            *all.open.entry(k).or_default() += v;
        }
        for (k, v) in &link.tcp_states {
            *all.tcp_states.entry(k).or_default() += v;
        }
    }
    all
}

fn status_json(g: &Gathered) -> Value {
    let all = totals(g);
    let links: Vec<Value> = g
        .links
        .iter()
        .map(|l| {
            json!({
                "vm": l.vm, "pair": l.pair, "open": l.open, "tcp_states": l.tcp_states,
                "totals": l.totals,
                "rings": { "rx": l.rings[0], "tx": l.rings[1] },
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": g.uptime.as_secs(),
        "vmm_connections": g.vmm_connections,
        "settings_generation": g.settings_generation,
        "silent_links": g.silent,
        "links": links,
        "open": all.open,
        "totals": all.totals,
        "counters": all.counters,
        "dns": all.dns,
    })
}

fn flows_json(g: &Gathered) -> Value {
    let flows: Vec<_> = g.links.iter().flat_map(|l| l.flows.iter()).collect();
    json!({ "silent_links": g.silent, "flows": flows })
}

/// `netfence ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The control socket of the netfence to ask (its `run --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Print the answer as JSON (as netfence sent it) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(value_enum)]
    pub command: CtlCommand,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CtlCommand {
    /// Uptime, VMM connections, open flows and totals.
    Status,
    /// Every open flow: 5-tuple, kind, state, bytes each way, age, rule, domain.
    Flows,
    /// Re-read the config files (as SIGHUP does); denied open flows are reset.
    Reload,
    /// The Prometheus metrics, as the --metrics endpoint serves them.
    Metrics,
}

impl CtlCommand {
    fn wire(self) -> &'static str {
        match self {
            CtlCommand::Status => "status",
            CtlCommand::Flows => "flows",
            CtlCommand::Reload => "reload",
            CtlCommand::Metrics => "metrics",
        }
    }
}

/// Runs `ctl`; returns the exit status.
pub fn run_ctl(args: &CtlArgs) -> i32 {
    let answer = match ask(&args.control, args.command.wire()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("netfence ctl: {}: {e}", args.control.display());
            return 2;
        }
    };
    if answer["ok"] != Value::Bool(true) {
        let error = answer["error"].as_str().unwrap_or("no error text");
        eprintln!("netfence ctl: {error}");
        return 1;
    }
    let result = &answer["result"];
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(result).unwrap_or_default()
        );
        return 0;
    }
    match args.command {
        CtlCommand::Status => print_status(result),
        CtlCommand::Flows => print_flows(result),
        CtlCommand::Reload => println!(
            "reloaded (settings generation {}): applied by {} links ({} late), {} open flows denied and reset",
            result["generation"], result["links"], result["late"], result["flows_reset"]
        ),
        CtlCommand::Metrics => print!("{}", result.as_str().unwrap_or_default()),
    }
    0
}

fn ask(path: &Path, command: &str) -> Result<Value, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| format!("cannot connect: {e}"))?;
    // A reload or a report waits for every link (at most hub::ANSWER_TIMEOUT each phase).
    let timeout = Some(Duration::from_secs(30));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(timeout)
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut text = String::new();
    stream
        .take(MAX_ANSWER)
        .read_to_string(&mut text)
        .map_err(|e| format!("no answer: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("unreadable answer ({e}): {text:.200}"))
}

fn print_status(r: &Value) {
    println!(
        "netfence {}: up {} s, {} VMM connections, settings generation {}",
        r["version"].as_str().unwrap_or("?"),
        r["uptime_secs"],
        r["vmm_connections"],
        r["settings_generation"]
    );
    for link in r["links"].as_array().into_iter().flatten() {
        println!(
            "  vm {} pair {}: open {}  frames from/to guest {}/{}",
            link["vm"],
            link["pair"],
            compact(&link["open"]),
            link["totals"]["frames_from_guest"],
            link["totals"]["frames_to_guest"]
        );
        for name in ["rx", "tx"] {
            if let Some(line) = ring_line(&link["rings"][name]) {
                println!("    {name} ring: {line}");
            }
        }
    }
    if r["silent_links"].as_u64().unwrap_or(0) > 0 {
        println!("  {} links did not answer in time", r["silent_links"]);
    }
    println!("open flows: {}", compact(&r["open"]));
    println!(
        "bytes to host {}, to guest {} (all flows since start)",
        r["totals"]["flow_bytes_to_host"], r["totals"]["flow_bytes_to_guest"]
    );
    println!("counters: {}", compact(&r["counters"]));
    println!("dns: {}", compact(&r["dns"]));
}

/// One ring's positions as a line: what the guest offered, what netfence took and returned,
/// and who waits for whom.
fn ring_line(r: &Value) -> Option<String> {
    let n = |k: &str| r[k].as_u64();
    let (avail, taken, used) = (n("avail")?, n("taken")?, n("used")?);
    let mut line = format!(
        "size {}, guest offered {avail}, netfence took {taken} and returned {used}",
        r["size"]
    );
    match (n("used_event"), n("avail_event")) {
        (Some(ue), Some(ae)) => line += &format!("; call wanted past {ue}, kick asked past {ae}"),
        _ => {
            if r["guest_no_interrupt"].as_bool() == Some(true) {
                line += "; guest wants no calls";
            }
            if r["device_no_notify"].as_bool() == Some(true) {
                line += "; netfence wants no kicks";
            }
        }
    }
    if r["enabled"].as_bool() != Some(true) || r["ready"].as_bool() != Some(true) {
        line += " (not enabled or not started)";
    }
    Some(line)
}

/// `{"a":1,"b":2}` as `a=1 b=2`.
fn compact(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn print_flows(r: &Value) {
    let flows = r["flows"].as_array().cloned().unwrap_or_default();
    let rows: Vec<[String; 9]> = flows
        .iter()
        .map(|f| {
            let s = |k: &str| match &f[k] {
                Value::String(s) => s.clone(),
                Value::Null => "-".to_string(),
                other => other.to_string(),
            };
            [
                format!("{} {}", s("kind"), s("direction")),
                s("src"),
                s("dst"),
                s("state"),
                s("bytes_to_host"),
                s("bytes_to_guest"),
                format!("{:.0}s", f["age_secs"].as_f64().unwrap_or(0.0)),
                s("rule"),
                s("domain"),
            ]
        })
        .collect();
    let header = [
        "KIND", "SRC", "DST", "STATE", "TO-HOST", "TO-GUEST", "AGE", "RULE", "DOMAIN",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if r["silent_links"].as_u64().unwrap_or(0) > 0 {
        println!("({} links did not answer in time)", r["silent_links"]);
    }
}
