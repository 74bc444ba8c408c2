//! Confinement: once start-up is done, netfence keeps only what relaying a guest's flows needs.
//!
//! A netfence process parses guest frames, DNS messages and TLS records, all hostile input. If a
//! bug ever lets a guest run code in it, that code should find a process that can do no more
//! than netfence already does: open host sockets and read its own files. [`confine`] runs after
//! start-up (config, CA and secret files read; VMM socket and published ports bound; just before
//! the first VMM is accepted) and, in this order:
//!
//! 1. `--user NAME` (started as root only): hands the VMM socket to NAME (`hand_over_socket` says
//!    why), then initgroups/setresgid/setresuid to NAME, and checks that root cannot be had back.
//! 2. landlock (`--landlock`): file access limited to what [`FileAccess`] lists: reading the
//!    config, CA and secret files (their directories, so a file replaced by rename is still read
//!    at reload), writing the record files (pcap, audit: their directories, for rotation),
//!    making and removing the per-VMM relay directory (`server::relay_dir_base`), removing the
//!    VMM socket at exit, `/etc/resolv.conf` and `/dev/null`. Everything else (exec, every other
//!    file, abstract unix sockets, signals to other processes) is refused. Landlock restricts
//!    the calling thread and the threads it starts later (the reload thread, every VMM
//!    connection's device threads, the control and metrics listeners, which bind before and
//!    start after); threads started before confinement (the log writer, the record writers) are covered
//!    only on kernels whose landlock can restrict all threads (ABI 8, Linux 7.0); the log line
//!    names them.
//! 3. `PR_SET_NO_NEW_PRIVS`, always, and a seccomp filter (`--seccomp`, rust-vmm's
//!    `seccompiler`) applied to every thread at once (TSYNC), inherited by threads started later:
//!    an allow-list of the system calls netfence makes ([`allowed_syscalls`], grouped by who
//!    needs them), some narrowed by argument: sockets only of the unix and IP families and of
//!    the stream and datagram types, `clone` only for threads, `fcntl` and `ioctl` only the
//!    commands netfence uses, `prctl` only thread names, `tgkill` only to itself.
//!    Anything else kills the process (`kill`, SIGSYS), or is allowed and logged by the kernel
//!    (`log`: SECCOMP_RET_LOG, audit type 1326 lines in the kernel log) so an operator can find
//!    a call missing from the list.
//!
//! The order matters: dropping the user needs setgroups/setuid and landlock needs its own
//! system calls, neither of which the seccomp filter allows afterwards.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use landlock::{
    Access, AccessFs, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    RestrictSelfAttr, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use tracing::{info, warn};

use crate::config::NetworkConfig;

/// What a system call outside the allow-list does (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SeccompMode {
    /// The process is killed (SIGSYS).
    Kill,
    /// The call goes through and the kernel logs it (SECCOMP_RET_LOG): for finding a call
    /// missing from the list.
    Log,
    /// No seccomp filter (no-new-privileges is still set).
    Off,
}

/// How landlock is used (`--landlock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LandlockMode {
    Off,
    /// Restrict file access as far as the kernel's landlock can; without landlock, log one
    /// line and go on.
    BestEffort,
    /// Refuse to serve (exit 1) unless the kernel enforces the file rules.
    Required,
}

/// The confinement options of `netfence run`.
#[derive(Args, Clone, Debug)]
pub struct ConfineArgs {
    /// What a system call outside netfence's allow-list does once netfence serves: `kill` the
    /// process (SIGSYS), `log` it (the kernel logs it, audit type 1326, and lets it through:
    /// for finding a missing call) or `off` (no filter).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,
    /// Limit file access with landlock to the config, CA, secret and record files, the relay
    /// directory and the socket: `best-effort` (go on without landlock when the kernel has
    /// none), `required` (exit 1 then) or `off`.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = LandlockMode::BestEffort)]
    pub landlock: LandlockMode,
    /// When started as root: run as this user (and its groups) once the socket and published
    /// ports are bound. The VMM socket is handed to the user (owner NAME, its primary group,
    /// mode 0600), so a VMM running as NAME (or as root) can connect. Refused when not root.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Give the VMM socket to this group, mode 0660, so a VMM running as another user in the
    /// group can connect (netfence must be root or a member of the group).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Test hook: after confining, try `execve` or `netlink-socket` (forbidden by seccomp) or
    /// `read=PATH` (open a file for reading) and log what happened.
    #[arg(long, hide = true, value_name = "ACTION")]
    pub confine_selftest: Option<String>,
}

/// A user netfence runs as after `--user`: names resolved at start, before anything is bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// `--user` and `--socket-group` resolved, checked before anything is bound.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub user: Option<Identity>,
    pub socket_group: Option<libc::gid_t>,
}

impl ConfineArgs {
    /// Resolves `--user` and `--socket-group`; errors are bad arguments (exit 2).
    pub fn prepare(&self) -> Result<Prepared, String> {
        let user = match &self.user {
            None => None,
            Some(name) => {
                // SAFETY: geteuid cannot fail.
                let euid = unsafe { libc::geteuid() };
                if euid != 0 {
                    return Err(format!(
                        "--user {name}: netfence runs as uid {euid}, not root; only root can \
                         change to another user (start netfence as root, or drop --user)"
                    ));
                }
                Some(lookup_user(name)?)
            }
        };
        let socket_group = match &self.socket_group {
            None => None,
            Some(name) => Some(lookup_group(name)?),
        };
        Ok(Prepared { user, socket_group })
    }
}

/// Why confinement failed (exit 1: the process was ready to serve and could not be confined).
#[derive(Debug)]
pub struct ConfineError(pub String);

impl std::fmt::Display for ConfineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The files and directories netfence touches after start-up; what landlock lets through.
#[derive(Clone, Debug, Default)]
pub struct FileAccess {
    /// Files read again later (config reload): each file's directory is readable (files, not
    /// listings), so a file replaced by rename (config management, Kubernetes config maps)
    /// is still read.
    pub read_dirs_of: Vec<PathBuf>,
    /// Files netfence reads by a fixed name (`/etc/resolv.conf`): the file alone.
    pub read_files: Vec<PathBuf>,
    /// Record files (pcap, audit): their directories allow writing, creating, truncating,
    /// listing and removing regular files (rotation renames within the directory).
    pub records: Vec<PathBuf>,
    /// Directories where directories and sockets are made and removed at run time. The base
    /// of the per-VMM relay directories (`server::relay_dir_base`) is added by [`confine`]
    /// itself, after `--user`, which may change it.
    pub runtime_dirs: Vec<PathBuf>,
    /// The VMM socket: its directory allows removing it (`--once` removes it at exit).
    pub socket: Option<PathBuf>,
}

impl FileAccess {
    /// What `netfence run` needs: the config file, the CA, upstream CA and secret files it
    /// names, the host's resolver config, `/dev/null`, the VMM socket.
    /// `records` are the record files (pcap, audit) to be written.
    pub fn for_run(
        socket: &Path,
        config_file: Option<&Path>,
        config: &NetworkConfig,
        records: &[PathBuf],
    ) -> FileAccess {
        let mut read_dirs_of: Vec<PathBuf> = config_file.into_iter().map(Into::into).collect();
        read_dirs_of.extend(config.tls.ca_cert.iter().cloned());
        read_dirs_of.extend(config.tls.ca_key.iter().cloned());
        read_dirs_of.extend(config.tls.upstream_ca_certs.iter().cloned());
        read_dirs_of.extend(config.secrets.iter().filter_map(|s| s.value_file.clone()));
        FileAccess {
            read_dirs_of,
            read_files: vec![
                PathBuf::from(crate::dns::upstream::RESOLV_CONF),
                // policy::local keeps a descriptor of /dev/null in reserve and reopens it.
                PathBuf::from("/dev/null"),
                // glibc's malloc reads it when it shrinks a thread's heap.
                PathBuf::from("/proc/sys/vm/overcommit_memory"),
            ],
            records: records.to_vec(),
            runtime_dirs: Vec::new(),
            socket: Some(socket.to_path_buf()),
        }
    }
}

/// What [`confine`] did, for the start-up log line and the tests.
#[derive(Clone, Debug, Default)]
pub struct Confined {
    pub seccomp_syscalls: Option<usize>,
    pub landlock: String,
    pub user: Option<String>,
}

/// Confines the process: user, landlock, no-new-privileges, seccomp (see the module comment).
/// `socket` is the bound VMM socket (chowned for `--user` and `--socket-group`).
pub fn confine(
    args: &ConfineArgs,
    prepared: &Prepared,
    socket: &Path,
    files: &FileAccess,
) -> Result<Confined, ConfineError> {
    let mut done = Confined::default();
    hand_over_socket(socket, prepared)?;
    if let Some(user) = &prepared.user {
        drop_to(user)?;
        done.user = Some(format!("{} ({}:{})", user.name, user.uid, user.gid));
        check_relay_base(user)?;
    }
    let mut files = files.clone();
    files.runtime_dirs.push(crate::server::relay_dir_base());
    let threads_before = thread_names();
    done.landlock = match args.landlock {
        LandlockMode::Off => "off".into(),
        mode => landlock(&files, mode == LandlockMode::Required, &threads_before)?,
    };
    // SAFETY: prctl with these arguments only sets a flag of the calling thread; seccomp's
    // TSYNC below carries it to every other thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError(format!(
            "cannot set no-new-privileges: {}",
            io::Error::last_os_error()
        )));
    }
    done.seccomp_syscalls = match args.seccomp {
        SeccompMode::Off => None,
        mode => Some(seccomp(mode == SeccompMode::Log)?),
    };
    info!(
        seccomp = %match (args.seccomp, done.seccomp_syscalls) {
            (SeccompMode::Off, _) | (_, None) => "off".to_string(),
            (mode, Some(n)) => format!("{} ({n} system calls allowed)", mode_name(mode)),
        },
        landlock = %done.landlock,
        user = %done.user.as_deref().unwrap_or("unchanged"),
        "confined: no new privileges"
    );
    if let Some(action) = &args.confine_selftest {
        self_test(action);
    }
    Ok(done)
}

fn mode_name(mode: SeccompMode) -> &'static str {
    match mode {
        SeccompMode::Kill => "kill",
        SeccompMode::Log => "log",
        SeccompMode::Off => "off",
    }
}

// --- user ---------------------------------------------------------------------------------

fn lookup_user(name: &str) -> Result<Identity, String> {
    let cname = CString::new(name).map_err(|_| format!("--user {name:?}: not a user name"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data; getpwnam_r fills it, pointing into `buf`.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if found.is_null() {
        let why = if rc == 0 {
            "no such user".to_string()
        } else {
            io::Error::from_raw_os_error(rc).to_string()
        };
        return Err(format!(
            "--user {name}: {why}; expected the name of a user in the password database"
        ));
    }
    Ok(Identity {
        name: name.to_string(),
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

fn lookup_group(name: &str) -> Result<libc::gid_t, String> {
    let cname =
        CString::new(name).map_err(|_| format!("--socket-group {name:?}: not a group name"))?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: group is plain data; getgrnam_r fills it, pointing into `buf`.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if found.is_null() {
        let why = if rc == 0 {
            "no such group".to_string()
        } else {
            io::Error::from_raw_os_error(rc).to_string()
        };
        return Err(format!(
            "--socket-group {name}: {why}; expected the name of a group in the group database"
        ));
    }
    Ok(gr.gr_gid)
}

/// Ownership of the VMM socket. netfence binds it 0600 as the user it starts as. With `--user`
/// it becomes NAME's (owner NAME, group NAME's primary group): the socket belongs to the user
/// who serves it, as when netfence is started as that user, so a VMM running as NAME (a launcher
/// that runs both as one per-VM user) can connect, and root can as ever. A VMM running as a
/// third user is given the socket through a group: `--socket-group GROUP` sets the group and
/// mode 0660 (chown first, then chmod: the socket is never open wider than asked).
fn hand_over_socket(socket: &Path, prepared: &Prepared) -> Result<(), ConfineError> {
    let owner = prepared.user.as_ref().map(|u| u.uid);
    let group = prepared
        .socket_group
        .or(prepared.user.as_ref().map(|u| u.gid));
    if owner.is_none() && group.is_none() {
        return Ok(());
    }
    std::os::unix::fs::chown(socket, owner, group).map_err(|e| {
        ConfineError(format!(
            "cannot give the socket {} to uid {} gid {}: {e}",
            socket.display(),
            owner.map_or("(unchanged)".into(), |u| u.to_string()),
            group.map_or("(unchanged)".into(), |g| g.to_string()),
        ))
    })?;
    if prepared.socket_group.is_some() {
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).map_err(|e| {
            ConfineError(format!(
                "cannot make the socket {} mode 0660: {e}",
                socket.display()
            ))
        })?;
    }
    Ok(())
}

/// initgroups, setresgid, setresuid (glibc applies each to every thread), then proves root is
/// gone: setresuid(0) must fail.
fn drop_to(user: &Identity) -> Result<(), ConfineError> {
    let fail = |what: &str| {
        ConfineError(format!(
            "--user {}: {what} failed: {}",
            user.name,
            io::Error::last_os_error()
        ))
    };
    let name = CString::new(user.name.as_str())
        .map_err(|_| ConfineError(format!("--user {:?}: not a user name", user.name)))?;
    // SAFETY: name is NUL-terminated; these calls take plain integers otherwise.
    unsafe {
        if libc::initgroups(name.as_ptr(), user.gid) != 0 {
            return Err(fail("initgroups"));
        }
        if libc::setresgid(user.gid, user.gid, user.gid) != 0 {
            return Err(fail("setresgid"));
        }
        if libc::setresuid(user.uid, user.uid, user.uid) != 0 {
            return Err(fail("setresuid"));
        }
        if user.uid != 0 && libc::setresuid(0, 0, 0) == 0 {
            return Err(ConfineError(format!(
                "--user {}: root could be regained after dropping to uid {}",
                user.name, user.uid
            )));
        }
    }
    Ok(())
}

/// After `--user`, the relay directory's base must be writable by the new user: root's
/// `XDG_RUNTIME_DIR` (e.g. /run/user/0) is not, so it is dropped for the temporary directory.
fn check_relay_base(user: &Identity) -> Result<(), ConfineError> {
    let writable = |dir: &Path| {
        CString::new(dir.as_os_str().as_bytes()).is_ok_and(|c| {
            // SAFETY: c is NUL-terminated.
            unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
        })
    };
    let base = crate::server::relay_dir_base();
    if writable(&base) {
        return Ok(());
    }
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        info!(
            dir = %base.display(),
            "XDG_RUNTIME_DIR is not writable by {}; the VMM relay directories go to the temporary directory",
            user.name
        );
        // Only the log writer runs beside this thread, and it reads no environment.
        std::env::remove_var("XDG_RUNTIME_DIR");
    }
    let base = crate::server::relay_dir_base();
    if writable(&base) {
        Ok(())
    } else {
        Err(ConfineError(format!(
            "--user {}: {} is not writable by that user; netfence makes a private directory \
             there for each VMM connection (set TMPDIR or XDG_RUNTIME_DIR to one it can write)",
            user.name,
            base.display()
        )))
    }
}

/// Names of this process's threads (from /proc/self/task), read before landlock.
fn thread_names() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    // SAFETY: gettid cannot fail.
    let me = unsafe { libc::gettid() }.to_string();
    tasks
        .flatten()
        .filter(|t| t.file_name().to_str() != Some(me.as_str()))
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| t.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

// --- landlock -----------------------------------------------------------------------------

/// The landlock ABI whose rights netfence asks for (Linux 6.12): every file right of ABI 5
/// (truncate, refer, device ioctl) and ABI 6's scopes (abstract unix sockets, signals). An
/// older kernel enforces what it knows.
const LANDLOCK_ABI: ABI = ABI::V6;

/// Applies the [`FileAccess`] rules; returns how far they are enforced, for the log.
fn landlock(
    files: &FileAccess,
    required: bool,
    threads_before: &[String],
) -> Result<String, ConfineError> {
    let err = |e: &dyn std::fmt::Display| ConfineError(format!("landlock: {e}"));
    let read_file = AccessFs::ReadFile;
    let record_dir = AccessFs::WriteFile
        | AccessFs::MakeReg
        | AccessFs::RemoveFile
        | AccessFs::Truncate
        | AccessFs::ReadDir;
    let runtime_dir = AccessFs::MakeDir
        | AccessFs::RemoveDir
        | AccessFs::MakeSock
        | AccessFs::RemoveFile
        | AccessFs::ReadDir;
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = Vec::new();
    for f in &files.read_dirs_of {
        rules.push((parent_of(f), read_file.into()));
    }
    for f in &files.read_files {
        rules.push((f.clone(), read_file.into()));
    }
    for f in &files.records {
        rules.push((parent_of(f), record_dir));
    }
    for d in &files.runtime_dirs {
        rules.push((d.clone(), runtime_dir));
    }
    if let Some(s) = &files.socket {
        rules.push((parent_of(s), AccessFs::RemoveFile.into()));
    }
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .map_err(|e| err(&e))?
        .scope(Scope::from_all(LANDLOCK_ABI))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    for (path, access) in rules {
        let fd = match PathFd::new(&path) {
            Ok(fd) => fd,
            // A file that is not there (no /etc/resolv.conf) needs no rule.
            Err(e) => {
                info!(path = %path.display(), "landlock: no rule for a path that cannot be opened: {e}");
                continue;
            }
        };
        // A file takes only file rights; a rule for a non-directory with directory rights
        // would be refused.
        let access = if path.is_dir() {
            access
        } else {
            access & AccessFs::from_file(LANDLOCK_ABI)
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| err(&e))?;
    }
    // All threads at once where the kernel can (ABI 8); else this thread and those it starts.
    let ruleset = ruleset.all_threads(true).map_err(|e| err(&e))?;
    let status = ruleset.restrict_self().map_err(|e| err(&e))?;
    // Partial enforcement also comes from `all_threads` alone (ABI 8); the ABI tells whether
    // every requested file right and scope is enforced.
    let how = match (status.ruleset, status.landlock) {
        (RulesetStatus::NotEnforced, _)
        | (_, LandlockStatus::NotEnabled | LandlockStatus::NotImplemented) => {
            if required {
                return Err(ConfineError(
                    "landlock: --landlock required, but this kernel does not enforce landlock \
                     (not built in, or not in the lsm= boot list)"
                        .into(),
                ));
            }
            warn!("landlock: not available in this kernel; file access is not restricted (--landlock best-effort)");
            return Ok("unavailable".into());
        }
        (_, LandlockStatus::Available { effective_abi, .. }) if effective_abi >= LANDLOCK_ABI => {
            format!("enforced (ABI {})", effective_abi as i32)
        }
        (_, LandlockStatus::Available { effective_abi, .. }) => format!(
            "partly enforced (ABI {} < {}: not every right is restricted)",
            effective_abi as i32, LANDLOCK_ABI as i32
        ),
    };
    let reach = if status.all_threads || threads_before.is_empty() {
        "all threads".to_string()
    } else {
        format!(
            "this thread and those it starts; not the {} started before ({})",
            threads_before.len(),
            threads_before.join(", ")
        )
    };
    Ok(format!("{how}, {reach}"))
}

/// The directory a file is in (`.` for a bare name).
fn parent_of(f: &Path) -> PathBuf {
    match f.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

// --- seccomp ------------------------------------------------------------------------------

/// A condition on the 32-bit argument `arg` (an int: socket domains, fcntl and prctl
/// commands, ioctl requests, a process id).
fn arg32_eq(arg: u8, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("argument index below 6")
}

/// `arg & mask == value` (flags: clone's CLONE_THREAD, a socket's type without its flags).
fn arg_masked(arg: u8, mask: u64, value: u64) -> SeccompCondition {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .expect("argument index below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("at least one condition")
}

/// One rule per value: the call is allowed when argument `arg` is any of `values`.
fn any_of(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|v| rule(vec![arg32_eq(arg, *v)]))
        .collect()
}

/// The system calls netfence makes once it serves, each group with who needs it. A call with
/// rules is allowed only when one rule matches; an empty rule list allows it outright.
///
/// Found by reading the code, then measured: `strace -f` over every netfence the test suite
/// starts (233 confined processes: harness, dpdk-testpmd and QEMU guest tests) saw 55 distinct
/// calls after confinement, all listed here; the whole suite also passes with `--seccomp log`
/// without one kernel log line. The rest of the list is what the code does on paths the suite
/// does not take (config reload, record files, signals, a clock without vDSO) or another
/// architecture's name for a listed call. When netfence gains a call, `--seccomp log` names it
/// (audit type 1326, `syscall=N`): add it here, to the group of the code that needs it.
pub fn allowed_syscalls() -> Vec<(i64, Vec<SeccompRule>)> {
    type Calls = Vec<(i64, Vec<SeccompRule>)>;
    fn allow(calls: &mut Calls, group: &[i64]) {
        calls.extend(group.iter().map(|n| (*n, Vec::new())));
    }
    let mut calls: Calls = Vec::new();

    // Memory: the allocator (brk, mmap, mremap, madvise when it gives memory back), thread
    // stacks and their guard pages (mprotect), guest memory mapped from the VMM's fds and
    // unmapped when it goes, the TCP flows' ring buffers (madvise returns their pages).
    allow(
        &mut calls,
        &[
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
        ],
    );
    // Threads: every VMM connection starts a fresh device (vring workers, control relay,
    // teardown thread); std::thread and glibc's pthread_create (rseq, robust list, signal
    // stack for std's overflow guard, CPU affinity), locks and channels (futex, sched_yield in
    // crossbeam's back-off), thread and process exit.
    allow(
        &mut calls,
        &[
            libc::SYS_futex,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_sigaltstack,
            libc::SYS_rt_sigprocmask,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // clone3's flags sit in a struct seccomp cannot read: a second filter makes it
            // fail with ENOSYS (`clone3_enosys`) and glibc falls back to clone, checked below.
            // Allowed here so that the caller gets that ENOSYS, not the kill.
            libc::SYS_clone3,
        ],
    );
    // clone only for threads: no new processes.
    let clone_thread = libc::CLONE_THREAD as u64;
    calls.push((
        libc::SYS_clone,
        vec![rule(vec![arg_masked(0, clone_thread, clone_thread)])],
    ));
    // Rust names its threads with PR_SET_NAME; no other prctl.
    calls.push((
        libc::SYS_prctl,
        any_of(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64]),
    ));
    // Signals: the reload thread waits for SIGHUP (sigwait: rt_sigtimedwait); handlers that
    // run (std's stack-overflow handler) return through rt_sigreturn, an interrupted call
    // restarts through restart_syscall; abort() signals itself, and only itself (tgkill to
    // this process id).
    allow(
        &mut calls,
        &[
            libc::SYS_rt_sigtimedwait,
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigreturn,
            libc::SYS_restart_syscall,
        ],
    );
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    calls.push((libc::SYS_tgkill, vec![rule(vec![arg32_eq(0, pid)])]));
    // Time: clock_gettime and gettimeofday are answered by the vDSO, but reach the kernel on a
    // clocksource without one; sleeps; the links' timers (timerfd).
    allow(
        &mut calls,
        &[
            libc::SYS_clock_gettime,
            libc::SYS_gettimeofday,
            libc::SYS_clock_nanosleep,
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
        ],
    );
    // Randomness: hash seeds, TCP initial sequence numbers, DNS query ids and source ports,
    // TLS (ring), leaf certificate keys.
    allow(&mut calls, &[libc::SYS_getrandom]);
    // Event loops: each vring worker's epoll (kick eventfds, host sockets, timerfds), the
    // published ports' poll, the link's wake-up eventfds.
    allow(
        &mut calls,
        &[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_eventfd2,
            libc::SYS_ppoll,
        ],
    );
    // Descriptors: reads and writes on sockets, eventfds, stderr (the log writer thread) and
    // record files; close.
    allow(
        &mut calls,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
        ],
    );
    // fcntl: descriptor and status flags (non-blocking mode, close-on-exec) and dup with
    // close-on-exec (try_clone); not F_SETOWN/F_SETSIG, which would aim signals elsewhere.
    calls.push((
        libc::SYS_fcntl,
        any_of(
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        ),
    ));
    // ioctl: only non-blocking mode (std's set_nonblocking), close-on-exec, bytes readable,
    // and the interface index of a scoped IPv6 nameserver (if_nametoindex, config reload).
    calls.push((
        libc::SYS_ioctl,
        any_of(
            1,
            &[
                libc::FIONBIO,
                libc::FIOCLEX,
                libc::FIONCLEX,
                libc::FIONREAD,
                libc::SIOCGIFINDEX,
            ],
        ),
    ));
    // Sockets: host flows (TCP; UDP, sent and read in batches with sendmmsg and recvmmsg;
    // unprivileged ICMP, a datagram socket), the local-address probe (a UDP bind), published
    // ports' and the VMM socket's listeners (accept4), the vhost-user relay (unix streams, fds
    // passed with sendmsg and recvmsg), the control socket and metrics listener. Unix and IP
    // families, stream and datagram types only: no raw, packet or netlink sockets.
    let mut socket_rules = Vec::new();
    for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
        for kind in [libc::SOCK_STREAM, libc::SOCK_DGRAM] {
            socket_rules.push(rule(vec![
                arg32_eq(0, family as u64),
                // The type without SOCK_NONBLOCK and SOCK_CLOEXEC.
                arg_masked(1, 0xf, kind as u64),
            ]));
        }
    }
    calls.push((libc::SYS_socket, socket_rules));
    calls.push((libc::SYS_socketpair, any_of(0, &[libc::AF_UNIX as u64])));
    allow(
        &mut calls,
        &[
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendmmsg,
            libc::SYS_recvmmsg,
            libc::SYS_shutdown,
        ],
    );
    // Files: the per-VMM relay directory and socket (mkdir, unlink, then remove_dir_all:
    // openat, getdents64, unlinkat), the VMM socket removed at exit, /dev/null reopened by the
    // local-address probe, config and secret files read at reload, record files written,
    // synced and rotated (rename). Landlock decides which paths.
    allow(
        &mut calls,
        &[
            libc::SYS_openat,
            libc::SYS_mkdirat,
            libc::SYS_unlinkat,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_getdents64,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_ftruncate,
        ],
    );
    // The same calls by the older names glibc uses on x86-64 (aarch64 has only the above).
    #[cfg(target_arch = "x86_64")]
    allow(
        &mut calls,
        &[
            libc::SYS_mkdir,
            libc::SYS_unlink,
            libc::SYS_rename,
            libc::SYS_poll,
            libc::SYS_epoll_wait,
        ],
    );
    // Identity, read only: the control socket compares its peers' uid (SO_PEERCRED) with its
    // own.
    allow(
        &mut calls,
        &[
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getegid,
        ],
    );
    calls
}

/// The architecture the filter is compiled for (seccompiler checks it in the filter).
fn target_arch() -> Result<TargetArch, ConfineError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| ConfineError(format!("seccomp: {e:?}")))
}

/// The allow-list as a BPF program: mismatches kill the process, or are logged.
pub fn allow_list_program(log: bool) -> Result<(BpfProgram, usize), ConfineError> {
    let calls = allowed_syscalls();
    let count = calls.len();
    let mismatch = if log {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    };
    let filter = SeccompFilter::new(
        calls.into_iter().collect(),
        mismatch,
        SeccompAction::Allow,
        target_arch()?,
    )
    .map_err(|e| ConfineError(format!("seccomp: {e}")))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e| ConfineError(format!("seccomp: {e}")))?;
    Ok((program, count))
}

/// A second filter: clone3 fails with ENOSYS (everything else is left to the allow-list), so
/// glibc creates threads with clone, whose flags the allow-list can check.
fn clone3_enosys() -> Result<BpfProgram, ConfineError> {
    let filter = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch()?,
    )
    .map_err(|e| ConfineError(format!("seccomp: {e}")))?;
    filter
        .try_into()
        .map_err(|e| ConfineError(format!("seccomp: {e}")))
}

/// Installs both filters on every thread (TSYNC); returns how many calls are allowed.
fn seccomp(log: bool) -> Result<usize, ConfineError> {
    let (allow_list, count) = allow_list_program(log)?;
    let clone3 = clone3_enosys()?;
    for program in [&clone3, &allow_list] {
        seccompiler::apply_filter_all_threads(program)
            .map_err(|e| ConfineError(format!("seccomp: cannot install the filter: {e}")))?;
    }
    Ok(count)
}

// --- test hook ----------------------------------------------------------------------------

/// `--confine-selftest`: tries something confinement forbids and logs the outcome (the
/// process is gone before the log line when seccomp kills it).
fn self_test(action: &str) {
    if action == "execve" {
        // A null path: were execve allowed it would fail with EFAULT and run nothing.
        // SAFETY: the kernel reads no memory from a null pointer; it returns EFAULT.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_execve,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<*const libc::c_char>(),
                std::ptr::null::<*const libc::c_char>(),
            )
        };
        let e = io::Error::last_os_error();
        warn!("confine self-test: execve was not stopped (returned {rc}: {e})");
    } else if action == "netlink-socket" {
        // A socket family outside the list (the call itself is listed, for other families).
        // SAFETY: socket takes plain integers; a descriptor it returns is closed at once.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
        let e = io::Error::last_os_error();
        if fd >= 0 {
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
        }
        warn!("confine self-test: a netlink socket was not stopped (returned {fd}: {e})");
    } else if let Some(path) = action.strip_prefix("read=") {
        match std::fs::File::open(path) {
            Ok(_) => warn!("confine self-test: read {path}: opened"),
            Err(e) => warn!(
                "confine self-test: read {path}: refused ({e}; errno {})",
                e.raw_os_error().unwrap_or(0)
            ),
        }
    } else {
        warn!("confine self-test: unknown action {action:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_machine() {
        let (kill, n) = allow_list_program(false).unwrap();
        let (log, m) = allow_list_program(true).unwrap();
        assert_eq!(n, m);
        assert!(n > 55, "{n} calls");
        assert_eq!(kill.len(), log.len());
        assert!(!clone3_enosys().unwrap().is_empty());
    }

    #[test]
    fn every_call_is_listed_once() {
        let mut numbers: Vec<i64> = allowed_syscalls().iter().map(|(n, _)| *n).collect();
        let total = numbers.len();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), total, "a system call is listed twice");
        #[cfg(target_arch = "x86_64")]
        for forbidden in [libc::SYS_fork, libc::SYS_vfork] {
            assert!(!numbers.contains(&forbidden), "system call {forbidden}");
        }
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_setgroups,
            libc::SYS_seccomp,
            libc::SYS_landlock_restrict_self,
            libc::SYS_io_uring_setup,
            libc::SYS_memfd_create,
            libc::SYS_process_vm_writev,
            libc::SYS_setresuid,
            libc::SYS_mount,
            libc::SYS_bpf,
            libc::SYS_kill,
        ] {
            assert!(
                !numbers.contains(&forbidden),
                "system call {forbidden} must not be allowed"
            );
        }
    }

    #[test]
    fn file_access_covers_the_config_and_its_files() {
        let config: NetworkConfig = crate::config::parse_str(
            "[tls]\nca_cert = \"/srv/nf/ca.pem\"\nca_key = \"/srv/nf/keys/ca.key\"\n",
            crate::config::Format::Toml,
        )
        .unwrap();
        let access = FileAccess::for_run(
            Path::new("/run/nf/vm.sock"),
            Some(Path::new("/etc/netfence/vm.toml")),
            &config,
            &[PathBuf::from("/var/log/nf/vm.pcap")],
        );
        let dirs: Vec<PathBuf> = access.read_dirs_of.iter().map(|f| parent_of(f)).collect();
        assert!(dirs.contains(&PathBuf::from("/etc/netfence")));
        assert!(dirs.contains(&PathBuf::from("/srv/nf")));
        assert!(dirs.contains(&PathBuf::from("/srv/nf/keys")));
        assert_eq!(parent_of(Path::new("bare.toml")), PathBuf::from("."));
        assert_eq!(access.records, vec![PathBuf::from("/var/log/nf/vm.pcap")]);
        assert_eq!(access.socket, Some(PathBuf::from("/run/nf/vm.sock")));
    }
}
