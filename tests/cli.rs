//! The command line as a user meets it, through the real binary: exit codes (`check`: 0 allow,
//! 1 deny, 3 error; everything else: 0 ok, 1 runtime failure, 2 bad configuration or
//! arguments), argument errors that name the flag, the value and what is accepted, and the
//! vhost-user socket path (a live socket is never taken over, a stale one is replaced, the
//! socket is created 0600), and the interception CA's files (`ca generate`, `run --ca-out`).

mod common;

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;

/// What a finished `netfence` invocation left behind.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `netfence args...` to its end (stdin closed); panics if it is still running after
/// `SHORT` (it is killed then).
fn netfence(args: &[&str]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netfence"));
    cmd.args(args);
    run_to_end(cmd, args)
}

/// [`netfence`] under `umask 022` (the common default, under which a plainly created file is
/// readable by everyone).
fn netfence_umask_022(args: &[&str]) -> Outcome {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_netfence"))
        .args(args);
    run_to_end(cmd, args)
}

fn run_to_end(mut cmd: Command, args: &[&str]) -> Outcome {
    let mut child = cmd
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn netfence");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send((true, s));
    });
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        let _ = tx2.send((false, s));
    });
    // Both pipes reach EOF when the process exits.
    let (mut out, mut err) = (String::new(), String::new());
    for _ in 0..2 {
        match rx.recv_timeout(SHORT) {
            Ok((true, s)) => out = s,
            Ok((false, s)) => err = s,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("netfence {args:?} still running after {SHORT:?}; stderr so far: {err}");
            }
        }
    }
    let status = child.wait().expect("wait for netfence");
    Outcome {
        code: status.code(),
        stdout: out,
        stderr: err,
    }
}

fn assert_exit(o: &Outcome, code: i32, what: &str) {
    assert_eq!(o.code, Some(code), "{what}: {o}");
}

// ---- check: 0 allow, 1 deny, 3 error -----------------------------------------------------

#[test]
fn check_exits_0_allow_1_deny_3_error() {
    let allow = netfence(&["check", "egress", "tcp", "203.0.113.7:443"]);
    assert_exit(&allow, 0, "allowed flow");
    assert!(allow.stdout.starts_with("allow egress tcp"), "{allow}");

    let deny = netfence(&["check", "egress", "tcp", "10.0.0.1:80"]);
    assert_exit(&deny, 1, "denied flow");
    assert!(deny.stdout.starts_with("deny egress tcp"), "{deny}");

    // Errors of our own validation.
    let bad_dst = netfence(&["check", "egress", "tcp", "nowhere:80"]);
    assert_exit(&bad_dst, 3, "bad destination");
    assert!(bad_dst.stderr.contains("`nowhere:80`"), "{bad_dst}");
    let bad_file = netfence(&[
        "check",
        "--config",
        "/nonexistent/netfence.toml",
        "egress",
        "tcp",
        "10.0.0.1:80",
    ]);
    assert_exit(&bad_file, 3, "missing config file");

    // Errors clap finds (it would exit 2 by itself): a bad value, a missing argument, an
    // unknown flag.
    let bad_proto = netfence(&["check", "egress", "sctp", "10.0.0.1:80"]);
    assert_exit(&bad_proto, 3, "bad protocol");
    assert!(
        bad_proto
            .stderr
            .contains("expected tcp, udp, icmpv4 or icmpv6"),
        "{bad_proto}"
    );
    assert_exit(&netfence(&["check", "egress"]), 3, "missing arguments");
    assert_exit(
        &netfence(&["check", "--bogus", "egress", "tcp", "10.0.0.1:80"]),
        3,
        "unknown flag",
    );
    assert_exit(
        &netfence(&[
            "check",
            "--policy",
            "sideways",
            "egress",
            "tcp",
            "10.0.0.1:80",
        ]),
        3,
        "bad preset",
    );

    // Help is not an error, and it documents the codes.
    let help = netfence(&["check", "--help"]);
    assert_exit(&help, 0, "check --help");
    assert!(
        help.stdout
            .contains("Exit status: 0 allowed, 1 denied, 3 bad configuration or arguments"),
        "{help}"
    );
    let top = netfence(&["--help"]);
    assert_exit(&top, 0, "--help");
    assert!(
        top.stdout.contains("exit 0 allow, 1 deny, 3 error"),
        "{top}"
    );
}

#[test]
fn other_subcommands_keep_exit_2_for_bad_arguments() {
    assert_exit(
        &netfence(&["lint", "--policy", "sideways"]),
        2,
        "lint bad preset",
    );
    assert_exit(&netfence(&["config", "--bogus"]), 2, "config unknown flag");
    assert_exit(&netfence(&["run"]), 2, "run without --socket");
    assert_exit(&netfence(&["chek"]), 2, "unknown subcommand");
    assert_exit(&netfence(&[]), 2, "no subcommand");
    assert_exit(&netfence(&["lint"]), 0, "lint of the default policy");
}

// ---- lint: domain rules without DNS -----------------------------------------------------

#[test]
fn lint_says_net_rule_without_policy_leaves_domain_rules_blind() {
    let o = netfence(&["lint", "--net-rule", "allow@api.example.com:tcp:443"]);
    assert_exit(&o, 1, "lint finds a problem");
    for needle in [
        "rule 1 \"allow@api.example.com:tcp:443\": can never match",
        "denies DNS to the gateway",
        "add allow@host:udp:53,allow@host:tcp:53",
        "rules without --policy replace the public-only preset",
    ] {
        assert!(o.stdout.contains(needle), "lacks {needle:?}: {o}");
    }
    // The fix it names makes the finding go away.
    let fixed = netfence(&[
        "lint",
        "--net-rule",
        "allow@host:udp:53,allow@host:tcp:53",
        "--net-rule",
        "allow@api.example.com:tcp:443",
    ]);
    assert_exit(&fixed, 0, "lint after the fix");
    assert!(fixed.stdout.contains("no problems found"), "{fixed}");
}

// ---- run: --mtu and --lease-secs ---------------------------------------------------------

#[test]
fn mtu_below_1280_is_refused_because_ipv6_needs_it() {
    let dir = TempDir::new("netfence-cli");
    let sock = dir.path().join("nf.sock");
    let sock = sock.to_str().unwrap();
    for v in ["1279", "576", "1000"] {
        let o = netfence(&["run", "--socket", sock, "--mtu", v]);
        assert_exit(&o, 2, &format!("--mtu {v}"));
        for needle in ["--mtu", v, "1280", "IPv6", "65520"] {
            assert!(
                o.stderr.contains(needle),
                "--mtu {v}: lacks {needle:?}: {o}"
            );
        }
        assert!(!sock_exists(Path::new(sock)), "--mtu {v} bound the socket");
    }
    // 1280 itself is fine: netfence starts.
    let nf = Netfence::spawn(&["--mtu", "1280"]);
    drop(nf);
}

#[test]
fn lease_secs_zero_is_refused() {
    let dir = TempDir::new("netfence-cli");
    let sock = dir.path().join("nf.sock");
    let o = netfence(&[
        "run",
        "--socket",
        sock.to_str().unwrap(),
        "--lease-secs",
        "0",
    ]);
    assert_exit(&o, 2, "--lease-secs 0");
    for needle in ["--lease-secs", "'0'", "1-4294967295"] {
        assert!(o.stderr.contains(needle), "lacks {needle:?}: {o}");
    }
    let nf = Netfence::spawn(&["--lease-secs", "1"]);
    drop(nf);
}

// ---- run: the socket path ----------------------------------------------------------------

fn sock_exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

#[test]
fn a_live_socket_is_never_taken_over() {
    let first = Netfence::spawn::<&str>(&[]);
    let path = first.socket_path().to_str().unwrap().to_string();
    let second = netfence(&["run", "--socket", &path]);
    assert_exit(&second, 2, "second netfence on a live socket");
    assert!(
        second.stderr.contains(&path) && second.stderr.contains("in use"),
        "{second}"
    );
    // The first one's socket is still there and still answers.
    assert!(
        sock_exists(first.socket_path()),
        "the live socket was removed"
    );
    UnixStream::connect(first.socket_path()).expect("the first netfence still accepts");
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = TempDir::new("netfence-cli");
    let path = dir.path().join("stale.sock");
    // A socket file nobody listens on any more (connect gets ECONNREFUSED).
    drop(UnixListener::bind(&path).unwrap());
    assert!(sock_exists(&path));
    let nf = Netfence::builder().socket(&path).spawn();
    UnixStream::connect(nf.socket_path()).expect("netfence listens on the replaced socket");
}

#[test]
fn a_file_that_is_not_a_socket_is_refused() {
    let dir = TempDir::new("netfence-cli");
    let path = dir.path().join("file");
    std::fs::write(&path, "keep me").unwrap();
    let o = netfence(&["run", "--socket", path.to_str().unwrap()]);
    assert_exit(&o, 2, "--socket naming a regular file");
    assert!(o.stderr.contains("is not a socket"), "{o}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

#[test]
fn the_socket_is_created_0600() {
    // Under the common umask 022, a plain bind would make the socket 0755.
    let nf = Netfence::builder()
        .wrapper(&["sh", "-c", "umask 022 && exec \"$0\" \"$@\""])
        .spawn();
    let mode = std::fs::metadata(nf.socket_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {:o}", mode & 0o777);
}

/// A published port that cannot be bound stops `run` at start (exit 2), naming the binding,
/// before the VMM socket exists; so does one of a config file.
#[test]
fn a_published_port_in_use_is_refused_at_start() {
    let dir = TempDir::new("nf-ports");
    let socket = dir.path().join("nf.sock");
    let sock = socket.to_str().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let o = netfence(&["run", "--socket", sock, "-p", &format!("{port}:80")]);
    assert_exit(&o, 2, "-p in use");
    assert!(o.stderr.contains(&format!("127.0.0.1:{port}")), "{o}");
    assert!(o.stderr.contains("in use"), "{o}");
    let cfg = dir.path().join("ports.toml");
    std::fs::write(&cfg, format!("ports = [\"{port}:80\"]\n")).unwrap();
    let o = netfence(&["run", "--socket", sock, "--config", cfg.to_str().unwrap()]);
    assert_exit(&o, 2, "ports in use");
    assert!(o.stderr.contains("in use"), "{o}");
    assert!(!sock_exists(&socket), "the socket was bound anyway");
}

/// A privileged port (below net.ipv4.ip_unprivileged_port_start) without the right to bind it
/// stops `run` at start (exit 2) with the reason and the way out. Run as root, netfence is
/// started as `nobody` with every capability dropped (setpriv), so it lacks the right.
#[test]
fn a_privileged_port_without_the_right_is_refused_at_start() {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .expect("ip_unprivileged_port_start")
        .trim()
        .parse()
        .unwrap();
    assert!(
        start > 80,
        "this machine lets anyone bind port 80 (start = {start})"
    );
    let dir = TempDir::new("nf-priv");
    let socket = dir.path().join("nf.sock");
    let args = [
        "run",
        "--socket",
        socket.to_str().unwrap(),
        "-p",
        "127.0.0.1:80:80",
    ];
    let mut cmd;
    if unsafe { libc::geteuid() } == 0 {
        cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
        ])
        .arg(env!("CARGO_BIN_EXE_netfence"));
    } else {
        cmd = Command::new(env!("CARGO_BIN_EXE_netfence"));
    }
    cmd.args(args);
    let o = run_to_end(cmd, &args);
    assert_exit(&o, 2, "-p 127.0.0.1:80:80 without the right");
    assert!(o.stderr.contains("127.0.0.1:80"), "{o}");
    assert!(o.stderr.contains("needs privileges"), "{o}");
    assert!(o.stderr.contains("ip_unprivileged_port_start"), "{o}");
}

/// `[tls] enabled = false` with only the SNI ports is accepted: the process starts.
#[test]
fn tls_disabled_with_sni_ports_starts() {
    let dir = TempDir::new("nf-sni-ports");
    let cfg = dir.path().join("sni.toml");
    std::fs::write(
        &cfg,
        "[tls]\nenabled = false\nintercepted_ports = [443, 8443]\n",
    )
    .unwrap();
    let mut nf = Netfence::builder()
        .args(&["--config", cfg.to_str().unwrap()])
        .spawn();
    nf.assert_running("tls.enabled = false");
}

// ---- secrets ------------------------------------------------------------------------------

/// A config with an inline, an environment and a file secret, and a file that holds a value.
fn secrets_config(dir: &TempDir) -> std::path::PathBuf {
    let key_file = dir.path().join("key.txt");
    std::fs::write(&key_file, "file-VALUE-never-shown\n").unwrap();
    let cfg = dir.path().join("secrets.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[secrets]]\nenv_var = \"OPENAI_API_KEY\"\nvalue = \"inline-VALUE-never-shown\"\n\
             allowed_hosts = [\"api.openai.com\"]\n\
             [[secrets]]\nenv_var = \"GH_TOKEN\"\nvalue_env = \"NF_TEST_GH\"\nplaceholder = \"gh~placeholder-0123456789\"\n\
             allowed_hosts = [\"*.github.com\"]\n\
             [[secrets]]\nenv_var = \"FROM_FILE\"\nvalue_file = \"{}\"\nallowed_hosts = [\"api.example.com\"]\n",
            key_file.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn secrets_env_prints_shell_quoted_placeholders() {
    let dir = TempDir::new("nf-secrets-env");
    let cfg = secrets_config(&dir);
    let o = netfence(&["secrets", "env", "--config", cfg.to_str().unwrap()]);
    assert_exit(&o, 0, "secrets env");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{o}");
    assert!(
        lines[0].starts_with("OPENAI_API_KEY=NETFENCE_PLACEHOLDER_OPENAI_API_KEY_"),
        "{o}"
    );
    assert_eq!(
        lines[0].len(),
        "OPENAI_API_KEY=NETFENCE_PLACEHOLDER_OPENAI_API_KEY_".len() + 32
    );
    // `~` would be expanded by a shell after `=`: quoted.
    assert_eq!(lines[1], "GH_TOKEN='gh~placeholder-0123456789'");
    assert!(
        lines[2].starts_with("FROM_FILE=NETFENCE_PLACEHOLDER_FROM_FILE_"),
        "{o}"
    );
    assert!(!o.stdout.contains("VALUE-never-shown"), "{o}");
    // The same placeholders on every run (a launcher may compute or cache them).
    let again = netfence(&["secrets", "env", "--config", cfg.to_str().unwrap()]);
    assert_eq!(again.stdout, o.stdout);
    // A shell takes the lines as they are.
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!("{}\nprintf '%s' \"$GH_TOKEN\"", o.stdout))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sh.stdout),
        "gh~placeholder-0123456789"
    );
    // A bad config exits 2 and names the field.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\n").unwrap();
    let o = netfence(&["secrets", "env", "--config", bad.to_str().unwrap()]);
    assert_exit(&o, 2, "secrets env with a bad config");
    assert!(o.stderr.contains("secrets[0].allowed_hosts"), "{o}");
}

#[test]
fn config_never_prints_a_secret_value() {
    let dir = TempDir::new("nf-secrets-config");
    let cfg = secrets_config(&dir);
    let o = netfence(&["config", "--config", cfg.to_str().unwrap()]);
    assert_exit(&o, 0, "config");
    assert!(!o.stdout.contains("VALUE-never-shown"), "{o}");
    assert!(!o.stderr.contains("VALUE-never-shown"), "{o}");
    assert!(o.stdout.contains("value = \"<redacted>\""), "{o}");
    assert!(o.stdout.contains("value_env = \"NF_TEST_GH\""), "{o}");
    assert!(
        o.stdout.contains("key.txt"),
        "the file's name, not its content: {o}"
    );
    // An error about a value does not show it either.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"VALUE-never-shown\\n\"\nallowed_hosts = [\"a.example\"]\n",
    )
    .unwrap();
    let o = netfence(&["config", "--config", bad.to_str().unwrap()]);
    assert_exit(&o, 2, "config with a bad value");
    assert!(o.stderr.contains("secrets[0].value"), "{o}");
    assert!(!o.stderr.contains("VALUE-never-shown"), "{o}");
}

// ---- the interception CA's files -----------------------------------------------------------

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `ca generate` writes a CA that `tls.ca_cert` / `tls.ca_key` load, with the key 0600 even
/// under umask 022, and never replaces an existing file without `--force`.
#[test]
fn ca_generate_writes_a_loadable_ca_with_a_private_key_and_never_overwrites() {
    let dir = TempDir::new("nf-ca");
    let cert = dir.path().join("ca.pem");
    let key = dir.path().join("ca.key");
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let o = netfence_umask_022(&["ca", "generate", "--cert-out", c, "--key-out", k]);
    assert_exit(&o, 0, "ca generate");
    assert_eq!(mode_of(&key), 0o600, "key file mode");
    assert_eq!(mode_of(&cert), 0o644, "certificate file mode");
    let ca = netfence::tls::InterceptionCa::load(&cert, &key).expect("the pair loads as a CA");
    assert!(
        ca.subject().contains("netfence interception CA"),
        "{}",
        ca.subject()
    );
    assert!(o.stdout.contains("ca_cert") && o.stdout.contains(c), "{o}");
    let (cert_bytes, key_bytes) = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());

    // Again without --force: refused, exit 2, both files as they were.
    let o = netfence(&["ca", "generate", "--cert-out", c, "--key-out", k]);
    assert_exit(&o, 2, "ca generate over existing files");
    assert!(
        o.stderr.contains(c) && o.stderr.contains("exists") && o.stderr.contains("--force"),
        "{o}"
    );
    assert_eq!(std::fs::read(&cert).unwrap(), cert_bytes);
    assert_eq!(std::fs::read(&key).unwrap(), key_bytes);

    // Only the key exists: still refused, and no certificate is left behind.
    let cert2 = dir.path().join("new.pem");
    let o = netfence(&[
        "ca",
        "generate",
        "--cert-out",
        cert2.to_str().unwrap(),
        "--key-out",
        k,
    ]);
    assert_exit(&o, 2, "ca generate over an existing key");
    assert!(
        o.stderr.contains("--key-out") && o.stderr.contains(k),
        "{o}"
    );
    assert!(!cert2.exists(), "a certificate was written without its key");
    assert_eq!(std::fs::read(&key).unwrap(), key_bytes);

    // --force replaces both, and a key file that was world-readable becomes 0600.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = netfence_umask_022(&[
        "ca",
        "generate",
        "--cert-out",
        c,
        "--key-out",
        k,
        "--cn",
        "Acme sandbox CA",
        "--force",
    ]);
    assert_exit(&o, 0, "ca generate --force");
    assert_ne!(std::fs::read(&key).unwrap(), key_bytes);
    assert_eq!(mode_of(&key), 0o600, "key file mode after --force");
    let ca = netfence::tls::InterceptionCa::load(&cert, &key).expect("the new pair loads");
    assert!(ca.subject().contains("Acme sandbox CA"), "{}", ca.subject());
}

#[test]
fn ca_generate_bad_arguments_exit_2() {
    let dir = TempDir::new("nf-ca-args");
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (c, k) = (p("c.pem"), p("k.pem"));
    for (args, word) in [
        (vec!["ca", "generate", "--key-out", &k], "--cert-out"),
        (
            vec!["ca", "generate", "--cert-out", &c, "--key-out", &c],
            "two files",
        ),
        (
            vec![
                "ca",
                "generate",
                "--cert-out",
                &c,
                "--key-out",
                &k,
                "--cn",
                "",
            ],
            "--cn",
        ),
        (
            vec![
                "ca",
                "generate",
                "--cert-out",
                &c,
                "--key-out",
                &k,
                "--cn",
                &"x".repeat(65),
            ],
            "64",
        ),
        (vec!["ca"], "generate"),
    ] {
        let o = netfence(&args);
        assert_exit(&o, 2, &format!("{args:?}"));
        assert!(o.stderr.contains(word), "{args:?}: {o}");
    }
    assert!(!Path::new(&c).exists() && !Path::new(&k).exists());
    // A directory that does not exist is a failure to write (exit 1), named.
    let missing = p("no/such/dir/k.pem");
    let o = netfence(&["ca", "generate", "--cert-out", &c, "--key-out", &missing]);
    assert_exit(&o, 1, "unwritable --key-out");
    assert!(
        o.stderr.contains(&missing) && o.stderr.contains("cannot write"),
        "{o}"
    );
}

/// `--ca-out` writes the interception CA; without interception there is none to write, and
/// that is said (exit 2) before the socket is bound, not ignored.
#[test]
fn run_ca_out_without_interception_is_refused() {
    let dir = TempDir::new("nf-ca-out");
    let socket = dir.path().join("nf.sock");
    let out = dir.path().join("ca.pem");
    let o = netfence(&[
        "run",
        "--socket",
        socket.to_str().unwrap(),
        "--ca-out",
        out.to_str().unwrap(),
    ]);
    assert_exit(&o, 2, "--ca-out without [tls]");
    assert!(
        o.stderr.contains("--ca-out") && o.stderr.contains("interception is not enabled"),
        "{o}"
    );
    assert!(!out.exists(), "a CA file was written");
    assert!(!sock_exists(&socket), "the socket was bound anyway");
    // `enabled = false` is no interception either.
    let cfg = dir.path().join("off.toml");
    std::fs::write(&cfg, "[tls]\nenabled = false\n").unwrap();
    let o = netfence(&[
        "run",
        "--socket",
        socket.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--ca-out",
        out.to_str().unwrap(),
    ]);
    assert_exit(&o, 2, "--ca-out with enabled = false");
    assert!(o.stderr.contains("interception is not enabled"), "{o}");
    assert!(!out.exists());
}

/// With interception, `--ca-out` holds the CA (the configured one when `ca_cert` is set) by the
/// time the socket exists.
#[test]
fn run_ca_out_writes_the_ca_before_the_socket_is_bound() {
    let dir = TempDir::new("nf-ca-out-tls");
    let cert = dir.path().join("ca.pem");
    let key = dir.path().join("ca.key");
    let o = netfence(&[
        "ca",
        "generate",
        "--cert-out",
        cert.to_str().unwrap(),
        "--key-out",
        key.to_str().unwrap(),
    ]);
    assert_exit(&o, 0, "ca generate");
    for (name, toml) in [
        ("generated", "[tls]\nverify_upstream = false\n".to_string()),
        (
            "loaded",
            format!(
                "[tls]\nverify_upstream = false\nca_cert = {:?}\nca_key = {:?}\n",
                cert.display(),
                key.display()
            ),
        ),
    ] {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let out = dir.path().join(format!("{name}-out.pem"));
        let nf = Netfence::builder()
            .args(&[
                "--config",
                cfg.to_str().unwrap(),
                "--ca-out",
                out.to_str().unwrap(),
            ])
            .spawn();
        let written = std::fs::metadata(&out)
            .unwrap_or_else(|e| panic!("{name}: no --ca-out file once listening: {e}"));
        let bound = std::fs::symlink_metadata(nf.socket_path()).unwrap();
        assert!(
            written.modified().unwrap() <= bound.modified().unwrap(),
            "{name}: the CA file was written after the socket was bound"
        );
        let pem = std::fs::read_to_string(&out).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----"),
            "{name}: {pem}"
        );
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1, "{name}");
        if name == "loaded" {
            assert_eq!(pem, std::fs::read_to_string(&cert).unwrap());
        }
    }
}
