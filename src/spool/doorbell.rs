//! How a spool writer waits for work: park at once, and let producers
//! unpark it only when it is parked.
//!
//! Why not the channel's own blocking `recv`: crossbeam spins and then calls
//! `sched_yield` up to four times before it parks. On a machine where the
//! writer shares its CPU with shards and clients, every one of those yields
//! is a context switch there and back; a profile of 16 lock-step sessions on
//! the 2-CPU VM put 3.4% of the server's CPU in them (docs/BENCHMARKS.md,
//! "Seventh session"). A writer with nothing queued has nothing to spin for:
//! the next message is a client round trip away.
//!
//! No wake is lost: the writer stores `parked` and then looks at the queue; a
//! producer puts its message in the queue and then loads `parked`, with a
//! sequentially consistent fence between each store and load, so at least
//! one side sees the other's store. A spurious or early unpark only sends
//! the writer round its loop once more.
//!
//! Must not: block a producer, or leave a writer parked with work queued.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::thread::Thread;
use std::time::Duration;

/// Longest single park: a safety net only (every producer rings), so that
/// even a missed wake would cost a pause, never a stuck writer.
pub(crate) const PARK_MAX: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct Doorbell {
    parked: AtomicBool,
    writer: OnceLock<Thread>,
}

impl Doorbell {
    /// Called by the writer thread before its first wait.
    pub(crate) fn register(&self) {
        let _ = self.writer.set(std::thread::current());
    }

    /// Producer side, after a message went into the writer's queue.
    pub(crate) fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed)
            && let Some(t) = self.writer.get()
        {
            t.unpark();
        }
    }

    /// Writer side: waits until `ready` returns `Some`. `ready` must look
    /// at the queue without blocking.
    pub(crate) fn wait<T>(&self, mut ready: impl FnMut() -> Option<T>) -> T {
        loop {
            if let Some(v) = ready() {
                return v;
            }
            self.parked.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if let Some(v) = ready() {
                self.parked.store(false, Ordering::Relaxed);
                return v;
            }
            std::thread::park_timeout(PARK_MAX);
            self.parked.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn no_wake_is_lost_between_the_check_and_the_park() {
        // A producer that queues at random moments against a writer that
        // parks whenever it finds nothing. A lost wake would leave it parked
        // with an item queued until the park's safety timeout.
        let bell = Arc::new(Doorbell::default());
        let (tx, rx) = crossbeam_channel::bounded::<u64>(4);
        const N: u64 = 50_000;
        let b2 = bell.clone();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<()>(1);
        let writer = std::thread::spawn(move || {
            b2.register();
            ready_tx.send(()).unwrap();
            for i in 0..N {
                let start = Instant::now();
                let v = b2.wait(|| rx.try_recv().ok());
                let took = start.elapsed();
                assert!(
                    took < PARK_MAX * 3 / 4,
                    "wait {i} took {took:?}: parked with work queued until the safety timeout"
                );
                assert_eq!(v, i);
            }
        });
        ready_rx.recv().unwrap();
        let mut x = 7u32;
        for i in 0..N {
            // Fails only once the writer has stopped (its panic is below).
            if tx.send(i).is_err() {
                break;
            }
            bell.ring();
            crate::test_util::random_spin(&mut x, 3000);
        }
        drop(tx);
        writer.join().expect("the writer saw every item in time");
    }

    #[test]
    fn ring_before_register_is_harmless() {
        let bell = Doorbell::default();
        bell.ring();
        bell.register();
        assert_eq!(bell.wait(|| Some(3)), 3);
    }
}
