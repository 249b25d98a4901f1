//! The epoll system calls, wrapped once for the server's epoll backend and
//! the load generator's driver.
//!
//! Must not: interpret events; that is each loop's job. Every descriptor
//! given to `ctl` stays owned by the caller.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// An epoll instance.
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: no memory arguments; the descriptor is checked, then owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// `epoll_ctl(op, fd)` with `events` and `token` as the event's data.
    pub fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` lives across the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for events at most `timeout`, to the microsecond with
    /// `epoll_pwait2` (Linux 5.11; the load generator's `--rate` schedules
    /// need better than milliseconds), else with `epoll_wait` rounded up to a
    /// millisecond. `precise` starts true and is cleared, for good, when the
    /// kernel answers ENOSYS. An interrupted wait returns 0 events.
    pub fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout: Duration,
        precise: &mut bool,
    ) -> io::Result<usize> {
        let n = if *precise {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: the kernel writes at most `events.len()` entries into
            // the slice, mutably borrowed for the call, and only reads `ts`.
            let n = unsafe {
                libc::epoll_pwait2(
                    self.0.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    &ts,
                    std::ptr::null(),
                )
            };
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                *precise = false;
                return Ok(0);
            }
            n
        } else {
            // Round up so a wait for a scheduled start does not spin.
            let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: as above; the kernel writes at most `events.len()` entries.
            unsafe {
                libc::epoll_wait(
                    self.0.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    ms,
                )
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }
}
