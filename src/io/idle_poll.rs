//! Polling before sleeping: when a shard runs out of work it may look for
//! new completions for a short window before it blocks in the kernel.
//!
//! Why: with lock-step clients (smtp-source, Postfix and Exim without
//! PIPELINING, one command per round trip) a shard finds itself idle many
//! times per message, and the next command usually lands a few microseconds
//! later. Sleeping and being woken costs two context switches and, in a VM,
//! an inter-processor interrupt each time; measured on the 2-core VM
//! (docs/BENCHMARKS.md, "Idle polling"), polling for up to 30 µs takes 16
//! lock-step sessions from 0.78x to 0.96x of Postfix's smtp-sink at one
//! recipient and from 0.67x to 0.85x at fifty.
//!
//! It must not cost an idle or lightly loaded server anything, so it is
//! adaptive: the loop keeps the share of recent polls that found work within
//! the window, and polls only while that share is at least a half. Below
//! that it sleeps at once, except that every eighth idle moment it polls
//! anyway, to notice when gaps get short again. (Gaps measured by sleeping
//! cannot decide this: the wake-up latency, tens of microseconds in a VM,
//! would make every gap look long.) While polling it calls `sched_yield`
//! every few microseconds, so a client or another thread that shares the CPU
//! runs instead of waiting for the poller's time slice.
//!
//! Must not: poll longer than the configured window, or poll at all when the
//! window is zero.

use std::time::{Duration, Instant};

/// Largest accepted window (`server.idle_poll_us`): beyond this a sleep and
/// a wake-up are cheaper than the polling.
pub const WINDOW_MAX: Duration = Duration::from_millis(1);

/// EWMA weight of one gap: 1/16, so about the last 16 gaps count.
const SHIFT: u32 = 4;
/// Fixed point for the share of short gaps: 1.0 = 1 << 16.
const ONE: u32 = 1 << 16;
/// Poll while at least this share of recent polls found work. A miss costs
/// the whole window; one session in lock-step finds work in about 40% of
/// its polls, 16 sessions in 85% or more.
const POLL_AT: u32 = ONE / 2;
/// Below `POLL_AT`, poll once per this many idle moments to sample.
const PROBE_EVERY: u32 = 8;
/// Spin iterations between clock reads (and yields).
const SPINS_PER_CHECK: u32 = 16;

/// Whether to poll before the next sleep, learnt from the recent gaps.
#[derive(Debug)]
pub struct IdlePoll {
    window: Duration,
    /// Share of recent polls that found work (EWMA, 1/ONE).
    hit_share: u32,
    /// Idle moments since the last poll, while below `POLL_AT`.
    skipped: u32,
}

impl IdlePoll {
    /// `window` zero disables polling.
    pub fn new(window: Duration) -> Self {
        IdlePoll {
            window: window.min(WINDOW_MAX),
            // Start as if every poll had missed: an idle server only probes.
            hit_share: 0,
            skipped: 0,
        }
    }

    /// Called when the loop runs out of work: how long to poll before it
    /// sleeps (zero: sleep at once). A non-zero answer must be followed by
    /// `record`.
    pub fn next_window(&mut self) -> Duration {
        if self.window.is_zero() {
            return Duration::ZERO;
        }
        if self.hit_share >= POLL_AT {
            return self.window;
        }
        self.skipped += 1;
        if self.skipped >= PROBE_EVERY {
            self.skipped = 0;
            return self.window;
        }
        Duration::ZERO
    }

    /// Records whether a poll found work within the window.
    pub fn record(&mut self, hit: bool) {
        let target = if hit { ONE } else { 0 };
        // EWMA: share += (target - share) / 16, in integers.
        self.hit_share = self.hit_share - (self.hit_share >> SHIFT) + (target >> SHIFT);
    }
}

/// Spins until `ready()` says yes (true) or `window` has passed (false),
/// yielding the CPU every few iterations.
pub fn poll(window: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..SPINS_PER_CHECK {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= window {
            return false;
        }
        // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
        unsafe { libc::sched_yield() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_micros(30);

    /// Runs `n` idle moments whose polls (when asked for) find work if
    /// `hit(i)`; returns how many polled.
    fn run(p: &mut IdlePoll, n: usize, hit: impl Fn(usize) -> bool) -> usize {
        let mut polled = 0;
        for i in 0..n {
            if !p.next_window().is_zero() {
                polled += 1;
                p.record(hit(i));
            }
        }
        polled
    }

    #[test]
    fn an_idle_server_only_probes() {
        let mut p = IdlePoll::new(W);
        // Every wait ends in a tick: one poll in eight idle moments.
        assert_eq!(run(&mut p, 800, |_| false), 100);
    }

    #[test]
    fn short_gaps_turn_polling_on_and_long_ones_off() {
        let mut p = IdlePoll::new(W);
        // Probes (one idle moment in eight) that find work turn polling on
        // within a couple of hundred idle moments.
        run(&mut p, 200, |_| true);
        assert_eq!(p.next_window(), W);
        p.record(true);
        // A few misses do not stop it...
        run(&mut p, 3, |_| false);
        assert_eq!(p.next_window(), W);
        p.record(false);
        // ...a run of them does.
        run(&mut p, 64, |_| false);
        assert_eq!(run(&mut p, 80, |_| false), 10);
    }

    #[test]
    fn polling_continues_while_most_polls_hit() {
        let mut p = IdlePoll::new(W);
        run(&mut p, 200, |_| true);
        assert_eq!(run(&mut p, 3000, |i| i % 3 != 0), 3000);
    }

    #[test]
    fn polling_stops_when_fewer_than_half_hit() {
        let mut p = IdlePoll::new(W);
        run(&mut p, 200, |_| true);
        let polled = run(&mut p, 8000, |i| i % 3 == 0);
        assert!(polled < 8000 / 3, "polled {polled} of 8000");
    }

    #[test]
    fn a_zero_window_never_polls() {
        let mut p = IdlePoll::new(Duration::ZERO);
        assert_eq!(run(&mut p, 1000, |_| true), 0);
    }

    #[test]
    fn the_window_is_capped() {
        let mut p = IdlePoll::new(Duration::from_secs(1));
        run(&mut p, 200, |_| true);
        assert_eq!(p.next_window(), WINDOW_MAX);
    }

    #[test]
    fn poll_returns_when_ready_and_gives_up_after_the_window() {
        let mut calls = 0;
        let got = poll(Duration::from_secs(5), || {
            calls += 1;
            calls == 40
        });
        assert!(got);
        assert_eq!(calls, 40);

        let start = Instant::now();
        let window = Duration::from_micros(200);
        assert!(!poll(window, || false));
        assert!(start.elapsed() >= window);
    }
}
