//! What `netfence run` does at start, through the real binary and the harness guest:
//!
//! - a host without a usable resolv.conf (no nameserver line, or unreadable) still serves every VMM: one
//!   warning at start, and the gateway DNS answers SERVFAIL to queries that need an upstream
//!   (netfence runs in a user + mount namespace where a file of ours is bind-mounted over
//!   /etc/resolv.conf; nothing on the host changes);
//! - the soft RLIMIT_NOFILE is raised to the hard limit (started with a soft limit of 64);
//! - the effective policy is logged in one line, as a warning when domain rules can never
//!   match because the policy denies DNS to the gateway.

mod common;
mod dnsfake;

use common::*;
use dnsfake::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// The start-up warning `dns_settings` logs when no nameserver is configured anywhere.
const NO_UPSTREAM_WARNING: &str =
    "the gateway DNS answers SERVFAIL to queries that need an upstream";

/// Runs netfence with `source` bind-mounted over /etc/resolv.conf in a private user and mount
/// namespace (`unshare` without `--fork` execs, so the child's pid is netfence's).
fn spawn_with_resolv_conf(source: &std::path::Path) -> Netfence {
    let script = format!(
        "mount --bind '{}' /etc/resolv.conf && exec \"$0\" \"$@\"",
        source.display()
    );
    Netfence::builder()
        .wrapper(&[
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            &script,
        ])
        .spawn()
}

/// Two VMMs in turn each get a guest whose lookups of a forwarded name get SERVFAIL, while a
/// host alias is still answered locally; the warning was logged once, at start.
fn assert_dns_servfails_without_upstream(nf: &mut Netfence) {
    for round in 0..2 {
        let mut g = guest_up(nf);
        let a = udp_lookup(&mut g, GATEWAY, "www.example.com", RecordType::A, SHORT)
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", nf.log_text()));
        assert_eq!(
            a.message.response_code,
            ResponseCode::ServFail,
            "round {round}"
        );
        let alias = udp_lookup(
            &mut g,
            GATEWAY,
            "host.microsandbox.internal",
            RecordType::A,
            SHORT,
        )
        .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", nf.log_text()));
        assert_eq!(alias.message.response_code, ResponseCode::NoError);
        drop(g);
        nf.assert_running(&format!("VMM {round} left"));
    }
    let lines = nf.log_lines();
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(NO_UPSTREAM_WARNING))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", nf.log_text());
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("/etc/resolv.conf"),
        "{}",
        warnings[0]
    );
    assert!(
        !lines.iter().any(|l| l.contains("cannot set up datapath")),
        "{}",
        nf.log_text()
    );
}

#[test]
fn empty_resolv_conf_gives_servfail_not_a_dead_link() {
    let dir = TempDir::new("netfence-resolv");
    let empty = dir.path().join("resolv.conf");
    std::fs::write(&empty, "# no nameserver here\nsearch example.internal\n").unwrap();
    let mut nf = spawn_with_resolv_conf(&empty);
    assert_dns_servfails_without_upstream(&mut nf);
    assert!(nf.log_text().contains("names no nameserver"));
}

#[test]
fn unreadable_resolv_conf_gives_servfail_not_a_dead_link() {
    // Bytes that are not text: reading the file fails, the same path as a missing file (a
    // bind mount can't make a file vanish, and a directory can't be mounted over a file).
    let dir = TempDir::new("netfence-resolv");
    let garbage = dir.path().join("resolv.conf");
    std::fs::write(&garbage, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let mut nf = spawn_with_resolv_conf(&garbage);
    assert_dns_servfails_without_upstream(&mut nf);
    assert!(nf.log_text().contains("can't be read"));
}

/// The soft and hard "Max open files" of a process, from /proc.
fn nofile_limits(pid: u32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut words = line["Max open files".len()..].split_whitespace();
    (
        words.next().unwrap_or_default().to_string(),
        words.next().unwrap_or_default().to_string(),
    )
}

#[test]
fn nofile_soft_limit_is_raised_to_the_hard_limit() {
    let nf = Netfence::builder()
        .wrapper(&["sh", "-c", "ulimit -Sn 64 && exec \"$0\" \"$@\""])
        .env("RUST_LOG", "debug")
        .spawn();
    let (soft, hard) = nofile_limits(nf.pid().expect("pid"));
    assert_ne!(
        hard, "64",
        "the hard limit is 64 itself: the test proves nothing"
    );
    assert_eq!(
        soft,
        hard,
        "soft RLIMIT_NOFILE not raised\n{}",
        nf.log_text()
    );
    let line = nf
        .wait_for_log("RLIMIT_NOFILE soft limit raised", SHORT)
        .unwrap_or_else(|| panic!("no debug line\n{}", nf.log_text()));
    assert!(
        line.contains("from=64") && line.contains(&format!("to={hard}")),
        "{line}"
    );
}

#[test]
fn effective_policy_is_logged_at_start() {
    let nf = Netfence::spawn::<&str>(&[]);
    let line = nf
        .wait_for_log("effective policy:", SHORT)
        .unwrap_or_else(|| panic!("no summary\n{}", nf.log_text()));
    assert!(line.contains("INFO"), "{line}");
    assert!(
        line.contains(
            "preset public-only (the default); default egress deny, ingress allow; 3 rules"
        ),
        "{line}"
    );
    assert!(line.contains("domain rules: none"), "{line}");

    // --net-rule without --policy: the preset (and its DNS rules) is gone, so the domain rule
    // can never match; the summary says so as a warning.
    let nf = Netfence::spawn(&["--net-rule", "allow@api.example.com:tcp:443", "--reject"]);
    let line = nf
        .wait_for_log("effective policy:", SHORT)
        .unwrap_or_else(|| panic!("no summary\n{}", nf.log_text()));
    assert!(line.contains("WARN"), "{line}");
    for needle in [
        "custom policy (no preset)",
        "1 rule;",
        "denied flows rejected",
        "DNS to port 53 of any address answered by the gateway",
        "domain rules: 1, which can never match",
        "add allow@host:udp:53,allow@host:tcp:53",
    ] {
        assert!(line.contains(needle), "lacks {needle:?}: {line}");
    }
    let summaries = nf
        .log_lines()
        .iter()
        .filter(|l| l.contains("effective policy:"))
        .count();
    assert_eq!(summaries, 1, "{}", nf.log_text());
}
