//! Waking a shard's event loop from other threads, with a store where the
//! loop is awake and an eventfd write only where it may be asleep. Both
//! backends use it: the epoll loop watches the eventfd, the io_uring loop
//! keeps a read armed on it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Wakes a shard's loop: spool writers (outcomes ready), other shards (a
/// socket handed over) and shutdown call [`Waker::wake`].
///
/// A wake sets `notified`, which the loop checks every turn and while it
/// polls before sleeping; only when the loop may be blocked in the kernel
/// (`sleeping`) does a wake also write the eventfd the loop watches. So a busy
/// or polling shard is told with a store instead of an eventfd write, a
/// completion and a read. No wake is lost: the loop stores `sleeping` and then
/// loads `notified`, a waker stores `notified` and then loads `sleeping`, all
/// sequentially consistent, so at least one of the two sees the other's store.
pub struct Waker {
    fd: OwnedFd,
    notified: AtomicBool,
    sleeping: AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Arc<Waker>> {
        // SAFETY: eventfd has no memory arguments; the returned descriptor is
        // checked and then owned by the OwnedFd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Arc::new(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            notified: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Wakes the loop. Never blocks: at worst the counter is already set.
    pub fn wake(&self) {
        self.notified.store(true, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live local to our own eventfd.
            unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// A wake has come since the last [`Waker::take`] (cheap: for polling).
    pub fn pending(&self) -> bool {
        self.notified.load(Ordering::Relaxed)
    }

    /// Whether a wake came since the last call; clears it. Call before
    /// looking for the work the wake announced.
    pub fn take(&self) -> bool {
        self.notified.load(Ordering::Relaxed) && self.notified.swap(false, Ordering::SeqCst)
    }

    /// The loop is about to block in the kernel: from now on wakes write the
    /// eventfd. False when a wake is already pending, and the loop must not
    /// block. Either way [`Waker::awake`] must follow.
    pub fn prepare_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        !self.notified.load(Ordering::SeqCst)
    }

    /// Back from the kernel (or not gone): wakes need not write the eventfd.
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Drains the eventfd after it was seen readable.
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from our own eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Blocks on the eventfd for up to `ms`; true if it became readable.
    fn block_on(w: &Waker, ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: w.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one live pollfd on the stack.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            w.clear();
        }
        n > 0
    }

    #[test]
    fn no_wake_is_lost_between_the_check_and_the_sleep() {
        // A loop that sleeps the way a shard does, against a thread that
        // posts work and wakes it at random moments. A lost wake leaves the
        // loop blocked with work posted: it then sleeps the whole 5 s and
        // the test fails, rather than waiting for a tick as a shard would.
        let w = Waker::new().unwrap();
        let posted = Arc::new(AtomicU64::new(0));
        const N: u64 = 20_000;
        let (w2, p2) = (w.clone(), posted.clone());
        let poster = std::thread::spawn(move || {
            let mut x = 1u32;
            for i in 1..=N {
                p2.store(i, Ordering::SeqCst);
                w2.wake();
                crate::test_util::random_spin(&mut x, 2000);
                // Wait until the loop took it, so every wake matters.
                while p2.load(Ordering::SeqCst) != 0 {
                    std::hint::spin_loop();
                }
            }
        });
        let mut seen = 0;
        let mut eventfd_wakes = 0;
        while seen < N {
            if w.take() {
                if posted.swap(0, Ordering::SeqCst) != 0 {
                    seen += 1;
                }
                continue;
            }
            if w.prepare_sleep() {
                // The poster always has more work coming within
                // microseconds: only a lost wake lets this time out.
                let woke = block_on(&w, 5_000);
                w.awake();
                assert!(woke, "slept 5 s with a wake pending after {seen} wakes");
                eventfd_wakes += 1;
            } else {
                w.awake();
            }
        }
        poster.join().unwrap();
        assert!(eventfd_wakes > 0, "the sleeping path was exercised");
    }

    #[test]
    fn a_polling_loop_is_woken_without_the_eventfd() {
        let w = Waker::new().unwrap();
        w.wake();
        assert!(w.pending());
        assert!(!block_on(&w, 0), "nobody slept: no eventfd write");
        assert!(w.take());
        assert!(!w.take());
        assert!(w.prepare_sleep());
        w.wake();
        assert!(block_on(&w, 1_000), "a sleeping loop gets the eventfd");
        w.awake();
        assert!(w.take());
    }
}
