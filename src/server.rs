//! Accepting VMM connections: one vhost-user device per connection, then the next one.
//!
//! netfence listens on the user's socket path. Each VMM connection gets a fresh backend (a new
//! datapath: no state survives a VM restart) and is passed to it through the control-channel
//! relay (see `device::control_shim`) over a private socket in a 0700 directory of our own.
//! When the VMM goes away the device is torn down and, unless `--once`, the next VMM is served.
//!
//! Teardown is bounded: the device's threads are stopped and joined on a helper thread, and the
//! accept loop waits for that at most [`TEARDOWN_TIMEOUT`] after the VMM hung up. A device that
//! does not stop in time (a bug) is logged and left behind, with its threads and sockets, rather
//! than blocking every VMM after it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use tracing::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::{control_shim, DeviceSettings, NetBackend};
use crate::link::{Link, LinkSettings, Terminator};

/// How long the device of a VMM that hung up may take to stop before it is abandoned.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Work running on a thread of its own whose result is awaited with a bound.
struct Background<T> {
    result: mpsc::Receiver<T>,
}

impl<T: Send + 'static> Background<T> {
    fn spawn(name: &str, work: impl FnOnce() -> T + Send + 'static) -> io::Result<Self> {
        let (done, result) = mpsc::channel();
        thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _ = done.send(work());
            })?;
        Ok(Background { result })
    }

    /// The result, if the work finishes within `timeout`; otherwise its thread is left running.
    fn wait(self, timeout: Duration) -> Option<T> {
        self.result.recv_timeout(timeout).ok()
    }
}

/// Why [`bind_public`] did not bind.
#[derive(Debug)]
pub enum BindError {
    /// The path is taken: a socket a live process listens on, or a file that is not a socket.
    /// The user named a path they cannot have (exit 2, like any bad argument).
    InUse(String),
    /// The system refused (permissions, no such directory, ...): a runtime failure.
    Failed(String),
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindError::InUse(m) | BindError::Failed(m) => f.write_str(m),
        }
    }
}

/// Binds the VMM-facing socket at `path`, mode 0600 from its creation on.
///
/// An existing socket file is replaced only when it is stale: `connect()` to it fails with
/// ECONNREFUSED (nobody listens). If the connect succeeds (or the listener's backlog is full)
/// another process, e.g. another netfence, is serving there and we refuse rather than cut it
/// off from its next VMM; that process sees a client that connects and leaves at once. Any
/// other connect error (e.g. EACCES) is refused too. Any other kind of file is never replaced.
///
/// The socket is bound under umask 0177, so the kernel creates it 0600 and no moment exists
/// where it is wider (a chmod after bind would leave one). umask is process-wide: this runs
/// from `main` (the VMM socket, then the control socket) and the old umask is restored right
/// after; the only threads that may create files meanwhile are the record writers (`--pcap`,
/// `--audit`), whose files are 0600 anyway, which a umask of 0177 leaves as it is.
pub fn bind_public(path: &Path) -> Result<UnixListener, BindError> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::InUse(format!(
                "{} exists and is not a socket; refusing to replace it (choose another --socket)",
                path.display()
            )));
        }
        let in_use = || {
            BindError::InUse(format!(
                "{} is in use: another process (another netfence?) is listening on it; \
                 stop it or choose another --socket",
                path.display()
            ))
        };
        match probe_connect(path) {
            Ok(()) => return Err(in_use()),
            // A listener whose backlog is full: alive too.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(in_use()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("replacing stale socket {}", path.display());
                fs::remove_file(path).map_err(|e| {
                    BindError::Failed(format!(
                        "cannot remove stale socket {}: {e}",
                        path.display()
                    ))
                })?;
            }
            Err(e) => {
                return Err(BindError::Failed(format!(
                    "{} exists and cannot be probed ({e}); refusing to replace it",
                    path.display()
                )))
            }
        }
    }
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; restores the caller's mask.
    unsafe { libc::umask(old_mask) };
    bound.map_err(|e| {
        let message = format!("cannot listen on {}: {e}", path.display());
        if e.kind() == io::ErrorKind::AddrInUse {
            // Another process bound it between our probe and our bind.
            BindError::InUse(message)
        } else {
            BindError::Failed(message)
        }
    })
}

/// Connects to the unix socket at `path` without blocking (a blocking connect would wait
/// while a live listener's backlog is full) and closes the connection at once.
fn probe_connect(path: &Path) -> io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::UNIX,
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    socket.connect(&socket2::SockAddr::unix(path)?)
}

/// Where the private relay directories are made: `XDG_RUNTIME_DIR` when it is a directory,
/// else the temporary directory. `confine` lets landlock allow making them there.
pub fn relay_dir_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// A private directory for the backend side of the relay, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> io::Result<Self> {
        let base = relay_dir_base();
        for attempt in 0..100u32 {
            let dir = base.join(format!("netfence-{}-{attempt}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(PrivateDir(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("no free private directory name"))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Serves VMM connections on `public` (bound at `path` by [`bind_public`]) until an error, or
/// after one connection with `once`.
pub fn serve(
    public: UnixListener,
    path: &Path,
    once: bool,
    settings: LinkSettings,
) -> Result<Served, String> {
    info!(
        "listening on {} (guest {}/{}, gateway {}; IPv6 prefix {}, gateway {} and {})",
        path.display(),
        settings.addressing.v4.guest,
        settings.addressing.v4.prefix_len,
        settings.addressing.v4.gateway,
        settings.addressing.v6.prefix,
        settings.addressing.v6.gateway,
        settings.addressing.v6.link_local
    );
    loop {
        let (vmm, _) = public
            .accept()
            .map_err(|e| format!("accept on {} failed: {e}", path.display()))?;
        info!("VMM connected");
        let terminated = match serve_connection(vmm, &settings) {
            Ok(terminated) => terminated,
            Err(e) => {
                warn!("VMM connection failed: {e}");
                false
            }
        };
        if once {
            let _ = fs::remove_file(path);
            return Ok(if terminated {
                Served::Terminated
            } else {
                Served::Done
            });
        }
    }
}

/// How `serve` ended (with `--once`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Done,
    /// A secret's `block_and_terminate` took the VM's network down (exit status 3).
    Terminated,
}

/// Serves one VMM connection; `Ok(true)` when the link ended it (`block_and_terminate`).
fn serve_connection(vmm: UnixStream, settings: &LinkSettings) -> Result<bool, String> {
    let terminator = Terminator::new(vmm.try_clone().ok());
    // The settings in force now (a reload may have changed them since start-up).
    let mut settings = settings.clone();
    if let Some(hub) = &settings.hub {
        let (generation, flows) = hub.current_settings();
        settings.flows = (*flows).clone();
        settings.settings_generation = generation;
        settings.vm = hub.vmm_connected();
    }
    let settings = &settings;
    let links = Link::for_pairs(settings, &terminator, settings.pairs)
        .map_err(|e| format!("cannot set up the link: {e}"))?;
    let device = DeviceSettings {
        guest_mac: settings.guest_mac,
        mtu: settings.mtu,
    };
    let backend = Arc::new(
        NetBackend::new(device, links).map_err(|e| format!("cannot create backend: {e}"))?,
    );
    let mut daemon = VhostUserDaemon::new(
        "netfence".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("cannot create vhost-user daemon: {e}"))?;
    {
        // One worker thread per queue pair, in pair order; each watches its own link's fds.
        let handlers = daemon.get_epoll_handlers();
        if handlers.len() != usize::from(backend.pairs()) {
            return Err(format!(
                "vhost-user daemon has {} worker threads for {} queue pairs",
                handlers.len(),
                backend.pairs()
            ));
        }
        for (pair, worker) in handlers.iter().enumerate() {
            for (fd, id) in backend.extra_fds(pair) {
                worker
                    .register_listener(fd, EventSet::IN, u64::from(id))
                    .map_err(|e| format!("cannot watch a link fd: {e}"))?;
            }
        }
    }
    // The backend end of the relay: a private socket, connected (queued in its backlog), then
    // accepted by the daemon; the directory is removed as soon as that is done.
    let backend_side = {
        let private_dir =
            PrivateDir::new().map_err(|e| format!("cannot create private dir: {e}"))?;
        let private_path = private_dir.0.join("backend.sock");
        let mut private = Listener::new(&private_path, true)
            .map_err(|e| format!("cannot listen on {}: {e}", private_path.display()))?;
        let backend_side = UnixStream::connect(&private_path)
            .map_err(|e| format!("cannot reach the backend socket: {e}"))?;
        daemon
            .start(&mut private)
            .map_err(|e| format!("starting the device failed: {e}"))?;
        backend_side
    };
    let vmm_side = vmm
        .try_clone()
        .map_err(|e| format!("cannot keep a handle on the VMM socket: {e}"))?;
    let relays = control_shim::relay(vmm, backend_side, backend.num_queues())
        .map_err(|e| format!("cannot start the control relay: {e}"))?;
    // The connection ends from either side: the VMM hangs up (the relay then closes the
    // backend's end and the daemon's request thread ends), or the daemon drops the connection
    // (a request it refused; the VMM's socket is then shut down so that the relay ends too).
    // The device's threads are stopped and joined beside the accept loop, which waits for
    // that only so long once the relay has ended.
    let device = Background::spawn("netfence-device", move || {
        let result = daemon.wait();
        let _ = vmm_side.shutdown(std::net::Shutdown::Both);
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        drop(daemon);
        result.map_err(|e| e.to_string())
    })
    .map_err(|e| format!("cannot start the device thread: {e}"))?;
    for r in relays {
        let _ = r.join();
    }
    let result = device.wait(TEARDOWN_TIMEOUT);
    match result {
        Some(Ok(())) => info!("VMM disconnected"),
        // The VMM closing its socket (VM shut down or killed) is the normal end of a connection.
        Some(Err(e)) if e.contains("disconnected") => info!("VMM disconnected"),
        Some(Err(e)) => warn!("VMM connection ended: {e}"),
        None => error!(
            "the device of the VMM that left did not stop within {TEARDOWN_TIMEOUT:?}; \
             abandoning it (its threads and host sockets stay until netfence exits)"
        ),
    }
    Ok(terminator.requested())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn background_work_is_awaited_with_a_bound() {
        let quick = Background::spawn("quick", || 7).unwrap();
        assert_eq!(quick.wait(Duration::from_secs(5)), Some(7));
        // Work that never finishes (a device worker that does not stop) is given up on.
        let (_keep, never) = mpsc::channel::<()>();
        let stuck = Background::spawn("stuck", move || never.recv()).unwrap();
        let start = Instant::now();
        assert_eq!(stuck.wait(Duration::from_millis(100)), None);
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
