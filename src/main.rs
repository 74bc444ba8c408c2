//! netfence command line: `run` serves a VMM on a vhost-user socket; `check`, `lint` and
//! `config` explain a policy (src/explain.rs); `ca generate` makes a stable TLS interception CA;
//! `secrets env` prints the guest's placeholders.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or arguments. `check` answers with
//! its exit code (0 allow, 1 deny), so its errors, clap's included, exit 3 instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tracing::{debug, error, info, warn};

use netfence::config::addressing::{Addressing, LinkAddrs, LinkAddrs6};
use netfence::config::cli::NetworkArgs;
use netfence::control::hub::Hub;
use netfence::control::reload::{flow_settings, Fixed, Reloader};
use netfence::ingress::PublishedPorts;
use netfence::limits::{self, Limits};
use netfence::link::LinkSettings;
use netfence::observe::records::{RecordArgs, Records};
use netfence::server::BindError;
use netfence::tls::{InterceptionCa, TlsSettings, DEFAULT_CA_CN};

#[derive(Parser)]
#[command(
    name = "netfence",
    version,
    about = "vhost-user-net backend that applies a network policy to every flow of a VM guest",
    long_about = "netfence is a vhost-user-net backend. QEMU (-netdev vhost-user) or \
cloud-hypervisor (--net vhost_user=true) attach to its unix socket; netfence answers the \
guest as its gateway (ARP, DHCP, ping), decides every new flow with a first-match-wins policy \
and carries the allowed ones over ordinary host sockets. No root, TAP or firewall rules.\n\n\
Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve VMM connections on a vhost-user socket.
    #[command(after_help = "Examples:\n  \
netfence run --socket /tmp/netfence.sock\n  \
netfence run --socket /tmp/nf.sock --map 203.0.113.7:80=127.0.0.1:8080\n  \
netfence run --socket /tmp/nf.sock --policy allow-all --once", after_long_help = run_after_help())]
    Run(Box<RunArgs>),
    /// Decide one flow against a policy and say which rule or default decided it (exit 0 allow, 1 deny, 3 error).
    Check(netfence::explain::CheckArgs),
    /// Find rules that can never match, contradict a preset, or have empty port ranges (exit 1 if any).
    Lint(netfence::explain::LintArgs),
    /// Print the effective policy (presets expanded, command line merged) as TOML.
    Config(netfence::explain::ConfigArgs),
    /// Make the CA that signs the certificates TLS interception shows the guest.
    Ca(CaArgs),
    /// Secrets: the placeholders the guest's environment needs (`secrets env`).
    ///
    /// The guest holds placeholders; netfence puts the real values into HTTP/1.1 requests to
    /// each secret's allowed_hosts. A placeholder bound anywhere else is a violation, handled
    /// by the secret's `on_violation`, else `on_secret_violation`: block (reset the
    /// connection), block_and_log (also log host, port and secret name; the default, as the
    /// Python reference has it, where the Rust reference says block) or block_and_terminate
    /// (log an error and stop serving the VM).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Ask a running netfence (started with --control PATH): status, flows, reload, metrics.
    #[command(after_help = "Examples:\n  \
netfence ctl --control /run/netfence/vm42.ctl status\n  \
netfence ctl --control /run/netfence/vm42.ctl flows --json\n  \
netfence ctl --control /run/netfence/vm42.ctl reload\n\n\
Exit status: 0 done, 1 netfence answered with an error (e.g. a reload it refused), 2 bad \
arguments or no netfence at PATH.")]
    Ctl(netfence::control::socket::CtlArgs),
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Print `ENV_VAR=placeholder` for each secret (shell-quoted), for the launcher to put into
    /// the guest's environment. Reads no secret value.
    #[command(after_help = "The placeholder of a secret without `placeholder` is \
NETFENCE_PLACEHOLDER_<ENV_VAR>_<first 32 hex digits of SHA-256(\"netfence-placeholder-v1:<ENV_VAR>\")>, \
the same on every start.\n\nExample:\n  netfence secrets env --config net.toml > guest.env")]
    Env(netfence::secrets::EnvArgs),
}

#[derive(Args)]
struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Generate a CA (ECDSA P-256, valid for ten years) to keep across restarts: point
    /// `tls.ca_cert` and `tls.ca_key` at its files and install the certificate in the guest.
    #[command(after_help = "Example:\n  \
netfence ca generate --cert-out /etc/netfence/ca.pem --key-out /etc/netfence/ca.key\n\n\
The key file is created 0600; neither file is overwritten unless --force is given.")]
    Generate(CaGenerateArgs),
}

#[derive(Args)]
struct CaGenerateArgs {
    /// Where to write the CA certificate (PEM; the file the guest trusts).
    #[arg(long, value_name = "FILE")]
    cert_out: PathBuf,
    /// Where to write the CA private key (PEM, PKCS#8; created 0600).
    #[arg(long, value_name = "FILE")]
    key_out: PathBuf,
    /// The CA's common name (1-64 characters).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CA_CN, value_parser = parse_cn)]
    cn: String,
    /// Overwrite the files if they exist.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Path of the vhost-user unix socket to listen on (the VMM connects to it).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Serve one VMM connection, then exit (default: accept the next one, e.g. a restarted VM).
    #[arg(long)]
    once: bool,
    /// Which guest slot this link serves: the N-th /30 of ipv4_pool (gateway +1, guest +2) and
    /// the N-th /64 of ipv6_pool (gateway ::1, advertised to the guest for SLAAC).
    #[arg(long, default_value_t = 0, value_name = "N")]
    slot: u32,
    /// The guest's MAC address (virtio config space and DHCP). Enforced: frames from any other
    /// source MAC are dropped, so the VMM must give the guest this MAC (QEMU `-device
    /// virtio-net-pci,mac=MAC`, cloud-hypervisor `--net ...,mac=MAC`).
    #[arg(long, value_name = "MAC", default_value = "52:54:00:4e:46:02", value_parser = parse_mac)]
    guest_mac: [u8; 6],
    /// Link MTU offered to the guest (virtio MTU feature, DHCP option 26, router
    /// advertisements): 1280-65520, since IPv6 (always on) needs at least 1280.
    #[arg(long, default_value_t = 1500, value_parser = parse_mtu)]
    mtu: u16,
    /// Virtqueue pairs offered to the guest (VIRTIO_NET_F_MQ), one worker thread each: 1-16.
    /// QEMU: `-netdev vhost-user,...,queues=N` and `-device virtio-net-pci,...,mq=on`;
    /// cloud-hypervisor: `--net vhost_user=true,...,num_queues=2N`. A guest uses at most one
    /// pair per vCPU.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = parse_queues)]
    queues: u16,
    /// DHCP lease time in seconds: 1-4294967295.
    #[arg(long, default_value_t = 3600, value_name = "SECS", value_parser = parse_lease_secs)]
    lease_secs: u32,
    /// Change one bound on guest-driven state (repeatable), e.g. `--limit tcp-flows=1000`;
    /// the names and defaults are listed below.
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    limits: Vec<String>,
    /// Write the TLS interception CA's certificate (PEM) to FILE before the socket is bound,
    /// for the launcher to install in the guest (needs `[tls]` interception; with
    /// `trust_host_cas = true` the host's trusted roots follow it). Replaced at every start.
    #[arg(long, value_name = "FILE")]
    ca_out: Option<PathBuf>,
    /// Serve the control socket at PATH (created 0600): `netfence ctl --control PATH
    /// status|flows|reload|metrics`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at ADDR:PORT (`/metrics`); a bare PORT listens on
    /// 127.0.0.1. Anyone who can reach it sees the flow counts: keep it on loopback.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_metrics_addr)]
    metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    records: RecordArgs,
    #[command(flatten)]
    net: NetworkArgs,
    #[command(flatten)]
    confine: netfence::confine::ConfineArgs,
}

fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not PORT or ADDR:PORT (e.g. 9464, 127.0.0.1:9464 or [::1]:9464)")
    })
}

/// Blocks SIGHUP in this thread and every thread started after it, so that only the reload
/// thread ([`reload_on_sighup`]) takes it. Called first thing in `run`'s process.
fn block_sighup() {
    // SAFETY: sigset_t is plain data filled by sigemptyset/sigaddset; pthread_sigmask only
    // changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// A thread that reloads the config at each SIGHUP (blocked everywhere by [`block_sighup`]).
fn reload_on_sighup(reloader: Arc<Reloader>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("netfence-sighup".to_string())
        .spawn(move || loop {
            // SAFETY: as in block_sighup; sigwait only reads the set and writes `sig`.
            let sig = unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGHUP);
                let mut sig = 0;
                libc::sigwait(&set, &mut sig);
                sig
            };
            if sig == libc::SIGHUP {
                info!("SIGHUP: reloading the config");
                let _ = reloader.reload();
            }
        })?;
    Ok(())
}

/// The examples and the table of `--limit` names for `run --help`.
fn run_after_help() -> String {
    format!(
        "Examples:\n  \
netfence run --socket /tmp/netfence.sock\n  \
netfence run --socket /tmp/nf.sock --map 203.0.113.7:80=127.0.0.1:8080\n  \
netfence run --socket /tmp/nf.sock --policy allow-all --once\n  \
netfence run --socket /tmp/nf.sock --limit tcp-flows=1000 --limit udp-idle-secs=20\n  \
netfence run --socket /tmp/nf.sock --config nf.toml --control /tmp/nf.ctl --metrics 9464\n\n\
Reload: SIGHUP (or `netfence ctl --control PATH reload`) re-reads the config file; new flows \
follow it at once, open flows it denies are reset, the rest keep flowing. A config that does \
not validate is refused and the running one stays; ipv4_pool, ipv6_pool, ports, dns, tls and \
trust_host_cas cannot change while netfence runs.\n\n\
Limits (--limit NAME=VALUE; counts are per guest, times in seconds; with --queues N, tcp-flows,\n\
udp-flows, icmp-flows and inbound-tcp hold for the whole guest, the other counts per queue pair):\n{}",
        limits::help_table()
    )
}

/// The gateway's own MAC address (locally administered).
const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x4e, 0x46, 0x01];

/// The smallest MTU IPv6 allows (RFC 8200 section 5). netfence always serves IPv6 (every
/// slot has a /64 of `ipv6_pool`; there is no switch to turn it off), so this is the floor.
const IPV6_MIN_MTU: u16 = 1280;
/// The largest MTU `--mtu` accepts (unchanged from before the IPv6 floor).
const MAX_MTU: u16 = 65520;

/// `--mtu`: clap names the flag and the value in front of the message.
fn parse_mtu(s: &str) -> Result<u16, String> {
    let accepted = format!("expected {IPV6_MIN_MTU}-{MAX_MTU}");
    let mtu: u32 = s.parse().map_err(|_| format!("not a number; {accepted}"))?;
    if mtu < u32::from(IPV6_MIN_MTU) {
        return Err(format!(
            "IPv6 is always on and needs a link MTU of at least {IPV6_MIN_MTU}; {accepted}"
        ));
    }
    u16::try_from(mtu)
        .ok()
        .filter(|m| *m <= MAX_MTU)
        .ok_or_else(|| format!("too large; {accepted}"))
}

/// `--queues`: 1 to the device's most pairs.
fn parse_queues(s: &str) -> Result<u16, String> {
    let max = netfence::device::MAX_PAIRS;
    let accepted = format!("expected 1-{max} (queue pairs)");
    let n: u32 = s.parse().map_err(|_| format!("not a number; {accepted}"))?;
    u16::try_from(n)
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| format!("out of range; {accepted}"))
}

/// `--lease-secs`: a lease of 0 seconds would expire as it is granted.
fn parse_lease_secs(s: &str) -> Result<u32, String> {
    let accepted = format!("expected 1-{} seconds", u32::MAX);
    match s.parse::<u32>() {
        Ok(0) => Err(format!(
            "a lease of 0 seconds expires as it is granted; {accepted}"
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("not a number of seconds; {accepted}")),
    }
}

/// `--cn`: what `tls.ca_cn` accepts.
fn parse_cn(s: &str) -> Result<String, String> {
    netfence::config::check_ca_common_name(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("{e}; expected a name of 1-64 characters"))
}

/// Why a file could not be written.
enum WriteError {
    /// It exists and `--force` was not given (a bad argument: exit 2).
    Exists,
    /// Anything else (exit 1).
    Io(std::io::Error),
}

/// Creates `path` with `mode` and writes `contents`; an existing file is refused unless
/// `force`, and then replaced with `mode` (whatever its mode was).
fn write_new_file(
    path: &std::path::Path,
    contents: &str,
    mode: u32,
    force: bool,
) -> Result<(), WriteError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut file = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => WriteError::Exists,
        _ => WriteError::Io(e),
    })?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(WriteError::Io)?;
    file.write_all(contents.as_bytes())
        .map_err(WriteError::Io)?;
    file.sync_all().map_err(WriteError::Io)
}

/// `netfence ca generate`: exit 0 written, 2 bad arguments (a file exists without --force,
/// the same path twice), 1 when a file cannot be written.
fn ca_generate(args: &CaGenerateArgs) -> ExitCode {
    if args.cert_out == args.key_out {
        eprintln!(
            "netfence: --cert-out and --key-out are both {}: the certificate and the key need two files",
            args.cert_out.display()
        );
        return ExitCode::from(2);
    }
    if !args.force {
        for (flag, path) in [("--cert-out", &args.cert_out), ("--key-out", &args.key_out)] {
            if std::fs::symlink_metadata(path).is_ok() {
                eprintln!(
                    "netfence: {flag} {}: the file exists; refusing to overwrite it (pass --force to replace it)",
                    path.display()
                );
                return ExitCode::from(2);
            }
        }
    }
    let ca = match InterceptionCa::generate(&args.cn) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("netfence: --cn: {e}");
            return ExitCode::from(2);
        }
    };
    let report = |flag: &str, path: &std::path::Path, e: WriteError| match e {
        WriteError::Exists => {
            eprintln!(
                "netfence: {flag} {}: the file exists; refusing to overwrite it (pass --force to replace it)",
                path.display()
            );
            ExitCode::from(2)
        }
        WriteError::Io(e) => {
            eprintln!("netfence: {flag} {}: cannot write: {e}", path.display());
            ExitCode::from(1)
        }
    };
    // The key first: a certificate without its key would be useless.
    if let Err(e) = write_new_file(&args.key_out, &ca.key_pem(), 0o600, args.force) {
        return report("--key-out", &args.key_out, e);
    }
    if let Err(e) = write_new_file(&args.cert_out, &ca.cert_pem(), 0o644, args.force) {
        let _ = std::fs::remove_file(&args.key_out);
        return report("--cert-out", &args.cert_out, e);
    }
    println!(
        "wrote the CA certificate to {} and its key to {} ({})\n\
         use them with:  [tls]  ca_cert = {:?}  ca_key = {:?}\n\
         and install {} in the guest's trust store (see the README)",
        args.cert_out.display(),
        args.key_out.display(),
        ca.subject(),
        args.cert_out.display(),
        args.key_out.display(),
        args.cert_out.display()
    );
    ExitCode::SUCCESS
}

/// `--ca-out`: writes `pem` to a temporary file beside `path` and renames it over `path`, so a
/// launcher never reads half a file.
fn write_ca_out(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = match write_new_file(&tmp, pem, 0o644, true) {
        Ok(()) => std::fs::rename(&tmp, path),
        Err(WriteError::Io(e)) => Err(e),
        Err(WriteError::Exists) => Err(std::io::ErrorKind::AlreadyExists.into()),
    };
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Raises the soft limit on open files to the hard limit: every guest flow holds a host
/// socket, and a default soft limit of 1024 would make flows fail long before the per-kind
/// caps. netfence waits with epoll, so descriptors above 1024 are fine.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        debug!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            "RLIMIT_NOFILE soft limit already at the hard limit"
        );
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads `lim`, a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), soft = before, hard = lim.rlim_max, "cannot raise RLIMIT_NOFILE");
        return;
    }
    debug!(
        from = before,
        to = lim.rlim_cur,
        "RLIMIT_NOFILE soft limit raised to the hard limit"
    );
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "`{s}` is not a MAC address; expected six hex bytes like 52:54:00:12:34:56"
        ));
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| format!("`{s}` is not a MAC address; `{part}` is not a hex byte"))?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!(
            "`{s}` is a multicast MAC address; a guest needs a unicast one"
        ));
    }
    Ok(mac)
}

/// Lines the log writer holds while stderr is slow; beyond them lines are dropped, never
/// waited for: a guest must not be able to stall its link through the log.
const LOG_BUFFER_LINES: usize = 16 * 1024;

/// Libraries that log about the bytes they parse, once per message, outside our log gates:
/// hickory-proto warns about every malformed EDNS option of a guest's DNS query (with the
/// option's bytes in the line) and about odd records in upstream answers. A guest would write
/// the host's log at will through them, so below `error` they are silent unless `RUST_LOG`
/// names them.
const QUIET_LIBRARIES: &[&str] = &["hickory_proto"];

/// `RUST_LOG` (default `info`), with [`QUIET_LIBRARIES`] at `error` unless it names them.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let env = std::env::var("RUST_LOG").ok();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for library in QUIET_LIBRARIES {
        if env.as_deref().is_some_and(|e| e.contains(library)) {
            continue;
        }
        if let Ok(directive) = format!("{library}=error").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
        block_sighup();
    }
    let (writer, _log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("netfence-log")
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(writer)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return argument_error(&e),
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Check(a) => exit_code(netfence::explain::run_check(&a)),
        Command::Lint(a) => exit_code(netfence::explain::run_lint(&a)),
        Command::Config(a) => exit_code(netfence::explain::run_config(&a)),
        Command::Secrets(SecretsCommand::Env(a)) => exit_code(netfence::secrets::run_env(&a)),
        Command::Ctl(a) => exit_code(netfence::control::socket::run_ctl(&a)),
        Command::Ca(CaArgs {
            command: CaCommand::Generate(a),
        }) => ca_generate(&a),
    }
}

/// Prints clap's message (help and version too) and picks the exit code: clap's own (0 for
/// help, 2 for errors), except that errors of `check` exit 3, since 1 means "denied" there.
fn argument_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    // The top level takes no options but --help and --version, so a subcommand can only be
    // the first argument.
    let is_check = std::env::args_os().nth(1).is_some_and(|a| a == "check");
    if e.use_stderr() && is_check {
        exit_code(netfence::explain::CHECK_ERROR_EXIT)
    } else {
        exit_code(e.exit_code())
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run(args: RunArgs) -> ExitCode {
    let confinement = match args.confine.prepare() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("netfence: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match args.net.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("netfence: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let tls_settings = match TlsSettings::from_config(&config.tls, config.trust_host_cas) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("netfence: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &args.ca_out {
        let Some(interception) = tls_settings.interception() else {
            eprintln!(
                "netfence: --ca-out {}: writes the TLS interception CA, but interception is not \
                 enabled; add a [tls] table to the config (--config FILE), or drop --ca-out",
                path.display()
            );
            return ExitCode::from(2);
        };
        if let Err(e) = write_ca_out(path, &interception.guest_trust_pem()) {
            eprintln!("netfence: --ca-out {}: cannot write: {e}", path.display());
            return ExitCode::from(1);
        }
        info!(path = %path.display(), "interception CA certificate written (--ca-out)");
    }
    let addrs = LinkAddrs::for_slot(config.ipv4_pool_or_default(), args.slot);
    let addrs6 = LinkAddrs6::for_slot(config.ipv6_pool_or_default(), args.slot);
    let addressing = match (addrs, addrs6) {
        (Ok(v4), Ok(v6)) => Addressing { v4, v6 },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("netfence: --slot: {e}");
            return ExitCode::from(2);
        }
    };
    let mut limits = Limits::default();
    for assignment in &args.limits {
        if let Err(e) = limits.apply(assignment) {
            eprintln!("netfence: {e}");
            return ExitCode::from(2);
        }
    }
    // Created now: a path that cannot be written is an argument error, before any VMM comes.
    // Dropped last, when the records queued so far are written.
    let records = match Records::open(&args.records, &limits) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netfence: {e}");
            return ExitCode::from(2);
        }
    };
    let fixed = Fixed {
        net: args.net.clone(),
        slot: args.slot,
        mtu: args.mtu,
        addressing,
        limits,
    };
    // Validate everything before binding anything.
    let mut flows = match flow_settings(&fixed, &config, tls_settings, None) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("netfence: {}", e.message);
            return ExitCode::from(e.exit_code);
        }
    };
    let published = if config.ports.is_empty() {
        None
    } else {
        match PublishedPorts::bind(&config.ports) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("netfence: {e}");
                return ExitCode::from(2);
            }
        }
    };
    flows.published = published.clone();
    let hub = Hub::new(flows.clone());
    let settings = LinkSettings {
        addressing,
        gateway_mac: GATEWAY_MAC,
        guest_mac: args.guest_mac,
        mtu: args.mtu,
        lease_secs: args.lease_secs,
        flows,
        pairs: args.queues,
        hub: Some(hub.clone()),
        settings_generation: 0,
        vm: 0,
        pcap: records.pcap.clone(),
        audit: records.audit.clone(),
    };
    raise_nofile_limit();
    let public = match netfence::server::bind_public(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("netfence: --socket: {e}");
            return match e {
                BindError::InUse(_) => ExitCode::from(2),
                BindError::Failed(_) => ExitCode::from(1),
            };
        }
    };
    // What landlock will let through once serving (see confine::FileAccess).
    let record_files: Vec<PathBuf> = [&args.records.pcap, &args.records.audit]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let files = netfence::confine::FileAccess::for_run(
        &args.socket,
        args.net.config.as_deref(),
        &config,
        &record_files,
    );
    let reloader = Arc::new(Reloader::new(fixed, hub.clone(), config));
    let control = match args.control.as_deref().map(netfence::control::socket::bind) {
        None => None,
        Some(Ok(listener)) => Some(listener),
        Some(Err(e)) => {
            let path = args.control.as_deref().unwrap_or(std::path::Path::new(""));
            eprintln!("netfence: --control {}: {e}", path.display());
            let _ = std::fs::remove_file(&args.socket);
            return ExitCode::from(2);
        }
    };
    let metrics = match args.metrics.map(netfence::control::metrics::bind) {
        None => None,
        Some(Ok(listener)) => Some(listener),
        Some(Err(e)) => {
            eprintln!(
                "netfence: --metrics {}: {e}",
                args.metrics.unwrap_or(([0; 4], 0).into())
            );
            let _ = std::fs::remove_file(&args.socket);
            return ExitCode::from(2);
        }
    };
    // Everything is read and bound: from here on netfence keeps only what serving needs.
    // Threads started from here on (the reload thread, the published ports' thread, every
    // VMM's device) inherit the landlock rules; those started before get them only where the
    // kernel restricts all threads (the `confined:` line names them).
    if let Err(e) = netfence::confine::confine(&args.confine, &confinement, &args.socket, &files) {
        eprintln!("netfence: {e}");
        let _ = std::fs::remove_file(&args.socket);
        return ExitCode::from(1);
    }
    if let Err(e) = reload_on_sighup(reloader.clone()) {
        eprintln!("netfence: cannot start the reload thread: {e}");
        return ExitCode::from(1);
    }
    if let Some(listener) = control {
        if let Err(e) = netfence::control::socket::start(listener, hub.clone(), reloader.clone()) {
            eprintln!("netfence: --control: {e}");
            return ExitCode::from(1);
        }
    }
    if let Some(listener) = metrics {
        match netfence::control::metrics::start(listener, hub.clone()) {
            Ok(bound) => info!("metrics at http://{bound}/metrics"),
            Err(e) => {
                eprintln!("netfence: --metrics: cannot start its thread: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if let Some(ports) = &published {
        if let Err(e) = ports.start_refuser() {
            eprintln!("netfence: published ports: cannot start their thread: {e}");
            return ExitCode::from(1);
        }
    }
    let served = netfence::server::serve(public, &args.socket, args.once, settings);
    records.finish();
    match served {
        Ok(netfence::server::Served::Done) => ExitCode::SUCCESS,
        Ok(netfence::server::Served::Terminated) => {
            error!("exiting with status 3: a secret's block_and_terminate ended the VM's network");
            ExitCode::from(3)
        }
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}
