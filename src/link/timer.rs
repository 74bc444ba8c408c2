//! A non-blocking timerfd for the link's deadlines (smoltcp retransmissions, timeouts).
//!
//! The timer is re-armed only when the next deadline moves (an earlier one, or any once the
//! armed one has passed), not on every event.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub struct Timer {
    fd: OwnedFd,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
}

impl Timer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        Ok(Timer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: None,
        })
    }

    /// Fires at `deadline` (or within a millisecond of it); a no-op when it is already armed
    /// for that deadline and it has not passed.
    pub fn arm_at(&mut self, deadline: Instant, now: Instant) {
        if let Some(armed) = self.armed {
            let same = armed.max(deadline) - armed.min(deadline) < Duration::from_millis(1);
            if armed > now && (same || armed < deadline) {
                return;
            }
        }
        self.armed = Some(deadline);
        self.arm(deadline.saturating_duration_since(now));
    }

    /// Fires once after `after` (at least 1 ms, so that zero never disarms it).
    pub fn arm(&mut self, after: Duration) {
        let after = after.max(Duration::from_millis(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid fd and a fully initialised itimerspec.
        unsafe {
            libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut());
        }
    }

    /// Clears the expiry count (never blocks).
    pub fn consume(&mut self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from a non-blocking timerfd.
        unsafe {
            libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
        }
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
