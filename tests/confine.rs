//! Confinement after start-up (src/confine.rs): the seccomp filter stops a forbidden system call
//! (kill) or lets it through and logs it (log), landlock refuses a file outside netfence's own,
//! `--user` drops root (and is refused without it) while a VMM is still served.
//!
//! The forbidden acts come from the hidden `--confine-selftest` option, which runs them right
//! after confinement, before `listening on`. Every other test in the suite runs netfence with the
//! defaults (seccomp kill, landlock best-effort), so the suite as a whole is the check that the
//! allow-list is complete.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A field of /proc/PID/status (`NoNewPrivs`, `Seccomp`, `Uid`...), its value as written.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The `confined:` line netfence logs once it is confined.
fn confined_line(nf: &Netfence) -> String {
    nf.wait_for_log("confined:", SHORT)
        .unwrap_or_else(|| panic!("no `confined:` line\n{}", nf.log_text()))
}

#[test]
fn by_default_a_forbidden_system_call_kills_the_process_with_sigsys() {
    let mut nf = Netfence::builder()
        .args(&["--confine-selftest", "execve"])
        .no_wait()
        .spawn();
    let status = nf
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("netfence still runs after execve\n{}", nf.log_text()));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "expected death by SIGSYS, got {status:?}\n{}",
        nf.log_text()
    );
    // (The `confined:` line may die with the process: the log writer is a thread of its own.)
    assert!(
        nf.wait_for_log("execve was not stopped", Duration::ZERO)
            .is_none(),
        "{}",
        nf.log_text()
    );
}

#[test]
fn a_listed_call_with_a_forbidden_argument_kills_too() {
    // socket() is allowed for unix and IP families; a netlink socket is not.
    let mut nf = Netfence::builder()
        .args(&["--confine-selftest", "netlink-socket"])
        .no_wait()
        .spawn();
    let status = nf.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "netfence still runs after socket(AF_NETLINK)\n{}",
            nf.log_text()
        )
    });
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{status:?}\n{}",
        nf.log_text()
    );

    // The same call goes through with the filter off.
    let nf = Netfence::spawn(&["--seccomp", "off", "--confine-selftest", "netlink-socket"]);
    nf.wait_for_log("a netlink socket was not stopped", SHORT)
        .unwrap_or_else(|| panic!("{}", nf.log_text()));
}

#[test]
fn seccomp_log_lets_the_call_through_and_serves() {
    let mut nf = Netfence::spawn(&["--seccomp", "log", "--confine-selftest", "execve"]);
    let line = nf
        .wait_for_log("execve was not stopped", SHORT)
        .unwrap_or_else(|| panic!("{}", nf.log_text()));
    // Allowed and run: the kernel found no path behind the null pointer.
    assert!(line.contains("Bad address"), "{line}");
    assert!(confined_line(&nf).contains("seccomp=log"));
    let pid = nf.pid().unwrap();
    assert_eq!(status_field(pid, "Seccomp"), "2", "a filter is installed");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Still a working backend.
    let _g = guest_up(&nf);
    nf.assert_running("a guest came up after a logged forbidden call");
}

#[test]
fn seccomp_off_installs_no_filter_but_keeps_no_new_privileges() {
    let mut nf = Netfence::spawn(&["--seccomp", "off", "--confine-selftest", "execve"]);
    nf.wait_for_log("execve was not stopped", SHORT)
        .unwrap_or_else(|| panic!("{}", nf.log_text()));
    let pid = nf.pid().unwrap();
    assert_eq!(status_field(pid, "Seccomp"), "0");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    nf.assert_running("execve with --seccomp off");
}

#[test]
fn the_default_filter_covers_every_thread() {
    let nf = Netfence::spawn::<&str>(&[]);
    let _g = guest_up(&nf);
    let pid = nf.pid().unwrap();
    // The log writer predates confinement, the device threads come after it: all filtered.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let mut threads = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
        };
        assert_eq!(field("Seccomp").as_deref(), Some("2"), "{status}");
        assert_eq!(field("NoNewPrivs").as_deref(), Some("1"), "{status}");
        threads += 1;
    }
    assert!(threads >= 3, "only {threads} threads");
}

#[test]
fn landlock_refuses_a_file_outside_netfences_own_and_allows_its_config() {
    let scratch = TempDir::new("nf-landlock");
    let config = scratch.path().join("net.toml");
    std::fs::write(&config, "policy = \"public-only\"\n").unwrap();
    let config = config.to_str().unwrap();
    let nf = Netfence::spawn(&["--config", config, "--confine-selftest", "read=/etc/passwd"]);
    let line = nf
        .wait_for_log("confine self-test: read /etc/passwd", SHORT)
        .unwrap_or_else(|| panic!("{}", nf.log_text()));
    assert!(
        line.contains("refused") && line.contains("errno 13"),
        "{line}"
    );
    assert!(confined_line(&nf).contains("landlock=enforced"));

    // The config file (and its directory) stays readable, for reload.
    let nf = Netfence::spawn(&[
        "--config",
        config,
        "--confine-selftest",
        &format!("read={config}"),
    ]);
    let line = nf
        .wait_for_log(&format!("confine self-test: read {config}"), SHORT)
        .unwrap_or_else(|| panic!("{}", nf.log_text()));
    assert!(line.contains("opened"), "{line}");

    // Without landlock the same file opens: the refusal above was landlock's.
    let nf = Netfence::spawn(&[
        "--landlock",
        "off",
        "--confine-selftest",
        "read=/etc/passwd",
    ]);
    let line = nf
        .wait_for_log("confine self-test: read /etc/passwd", SHORT)
        .unwrap_or_else(|| panic!("{}", nf.log_text()));
    assert!(line.contains("opened"), "{line}");
    assert!(confined_line(&nf).contains("landlock=off"));
}

#[test]
fn user_is_refused_when_not_started_as_root() {
    let dir = TempDir::new("nf-user");
    let socket = dir.path().join("nf.sock");
    let binary = env!("CARGO_BIN_EXE_netfence");
    let mut cmd;
    if is_root() {
        cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(binary);
    } else {
        cmd = Command::new(binary);
    }
    let out = cmd
        .args([
            "run",
            "--socket",
            socket.to_str().unwrap(),
            "--user",
            "nobody",
        ])
        .output()
        .expect("run netfence");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--user nobody"), "{stderr}");
    assert!(stderr.contains("not root"), "{stderr}");
    assert!(!socket.exists(), "nothing is bound before the refusal");
}

#[test]
fn an_unknown_user_is_a_bad_argument() {
    // Resolved before anything is bound; as root the name is looked up, otherwise --user is
    // refused outright: exit 2 either way.
    let mut nf = Netfence::builder()
        .args(&["--user", "no-such-user-nf"])
        .no_wait()
        .spawn();
    let status = nf.wait_exit(SHORT).expect("netfence exits");
    assert_eq!(status.code(), Some(2), "{}", nf.log_text());
    let expected = if is_root() {
        "no such user"
    } else {
        "not root"
    };
    assert!(nf.log_text().contains(expected), "{}", nf.log_text());
}

#[test]
fn started_as_root_user_drops_to_nobody_and_still_serves_a_guest() {
    assert!(
        is_root(),
        "this test starts netfence as root (scripts/test.sh runs as root)"
    );
    let echo = servers::TcpEchoServer::start();
    // Root's runtime directory (a TempDir is 0700), which nobody cannot write: netfence must
    // leave it for the temporary directory, and landlock must allow the one it uses.
    let root_runtime = TempDir::new("nf-xdg");
    let nf = Netfence::builder()
        .args(&[
            "--user".to_string(),
            "nobody".to_string(),
            "--map".to_string(),
            format!("{PUBLIC_IP}:80=127.0.0.1:{}", echo.port()),
        ])
        .env("XDG_RUNTIME_DIR", root_runtime.path().to_str().unwrap())
        .spawn();
    assert!(
        nf.wait_for_log("XDG_RUNTIME_DIR is not writable by nobody", Duration::ZERO)
            .is_some(),
        "{}",
        nf.log_text()
    );
    let pid = nf.pid().unwrap();
    assert_eq!(status_field(pid, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Gid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert!(confined_line(&nf).contains("user=nobody (65534:65534)"));
    // The socket is handed to the user netfence now runs as, still 0600.
    let meta = std::fs::metadata(nf.socket_path()).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(meta.mode() & 0o777, 0o600);
    // A VMM connects (the relay directory is made as nobody, under landlock) and a guest flow
    // goes through a host socket opened as nobody.
    let mut g = guest_up(&nf);
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).unwrap();
    g.tcp_send_all(h, b"as nobody", deadline(SHORT)).unwrap();
    assert_eq!(
        g.tcp_recv_exact(h, 9, deadline(SHORT)).unwrap(),
        b"as nobody"
    );
}

#[test]
fn socket_group_gives_the_socket_to_a_group() {
    assert!(
        is_root(),
        "this test names a group netfence is not in (scripts/test.sh runs as root)"
    );
    let nf = Netfence::spawn(&["--socket-group", "nogroup"]);
    let meta = std::fs::metadata(nf.socket_path()).unwrap();
    assert_eq!(meta.gid(), 65534);
    assert_eq!(meta.mode() & 0o777, 0o660);
    let _g = guest_up(&nf);
}

#[test]
fn under_landlock_a_config_replaced_by_rename_is_reloaded_at_sighup() {
    // Configuration management writes a new file and renames it over the old one: a new inode,
    // which a landlock rule on the file itself would not cover; the rule is on its directory.
    // SIGHUP is taken by the reload thread, started after confinement: under landlock on any
    // kernel that has it.
    let scratch = TempDir::new("nf-reload");
    let config = scratch.path().join("vm.toml");
    std::fs::write(&config, "policy = \"public-only\"\n").unwrap();
    let nf = Netfence::spawn(&["--config", config.to_str().unwrap()]);
    assert!(confined_line(&nf).contains("landlock=enforced"));
    let pid = nf.pid().unwrap() as libc::pid_t;
    let replace = |text: &str| {
        let next = scratch.path().join(".vm.toml.new");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &config).unwrap();
    };
    let reload = |expect: &str| {
        let mark = nf.log_mark();
        // SAFETY: kill with a valid signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        nf.wait_for_line(mark, SHORT, |l| {
            l.contains("config reloaded") || l.contains("reload refused")
        })
        .filter(|l| l.contains(expect))
        .unwrap_or_else(|| panic!("no `{expect}` after SIGHUP\n{}", nf.log_text()))
    };
    replace("policy = \"allow-all\"\n");
    reload("config reloaded");
    // The reload read the new file: a bad one is refused for its content, not by landlock.
    replace("policy = \"bogus\"\n");
    let line = reload("reload refused");
    assert!(line.contains("bogus"), "{line}");
    // And landlock is what it reads under: a config outside the rules cannot be read.
    std::fs::remove_file(&config).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &config).unwrap();
    let line = reload("reload refused");
    assert!(line.contains("Permission denied"), "{line}");
}
