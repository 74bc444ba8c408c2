//! packaging/netfence@.service passes `systemd-analyze verify` (unknown keys, bad values and a
//! missing binary all make it complain), with ExecStart pointed at the binary under test since
//! /usr/local/bin/netfence need not exist here.

mod common;

use std::process::Command;

use common::TempDir;

const UNIT: &str = include_str!("../packaging/netfence@.service");
const INSTALLED: &str = "/usr/local/bin/netfence";

/// The unit with ExecStart's binary replaced by `binary`.
fn unit_for(binary: &str) -> String {
    let exec_start: Vec<&str> = UNIT
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(exec_start.len(), 1, "one ExecStart line: {exec_start:?}");
    assert!(
        exec_start[0].starts_with(&format!("ExecStart={INSTALLED} run ")),
        "{}",
        exec_start[0]
    );
    UNIT.replace(
        &format!("ExecStart={INSTALLED} "),
        &format!("ExecStart={binary} "),
    )
}

/// Runs `systemd-analyze verify` on the unit text as instance `vm42`; (success, output).
fn verify(unit: &str) -> (bool, String) {
    let dir = TempDir::new("nf-unit");
    std::fs::write(dir.path().join("netfence@.service"), unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("netfence@vm42.service"))
        .output()
        .expect("systemd-analyze (Debian package systemd, installed by scripts/install-deps.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_template_unit_verifies_cleanly() {
    let (ok, output) = verify(&unit_for(env!("CARGO_BIN_EXE_netfence")));
    assert!(ok, "systemd-analyze verify failed:\n{output}");
    assert!(
        output.trim().is_empty(),
        "systemd-analyze verify complained:\n{output}"
    );
}

#[test]
fn verify_catches_what_it_should() {
    // The check above can fail: a misspelt key, and a binary that is not there.
    let (_, output) =
        verify(&unit_for(env!("CARGO_BIN_EXE_netfence")).replace("ProtectHome=", "ProtectHomes="));
    assert!(output.contains("ProtectHomes"), "{output}");
    let (ok, output) = verify(&unit_for("/nonexistent/netfence"));
    assert!(!ok, "{output}");
}

#[test]
fn the_unit_names_socket_config_and_reload_per_instance() {
    let exec_start = UNIT.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    assert!(
        exec_start.contains("--socket %t/netfence/%i/vhost-user.sock"),
        "{exec_start}"
    );
    assert!(
        exec_start.contains("--config /etc/netfence/%i.toml"),
        "{exec_start}"
    );
    assert!(
        exec_start.contains("--control %t/netfence/%i/control.sock"),
        "{exec_start}"
    );
    for line in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RuntimeDirectory=netfence/%i",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=~@privileged",
    ] {
        assert!(UNIT.lines().any(|l| l == line), "missing `{line}`");
    }
    assert!(UNIT.lines().any(|l| l.starts_with("MemoryMax=")));
    assert!(UNIT
        .lines()
        .any(|l| l.starts_with("SystemCallFilter=@system-service")));
}
