//! The per-turn housekeeping that both event loops (epoll and io_uring) do
//! around their own I/O: deliver the spool's outcomes after a wake-up, start
//! a graceful shutdown, the once-a-second tick (session timeouts, listeners
//! resting after EMFILE), and decide when the loop is done. One copy, so the
//! two backends cannot drift apart.
//!
//! Must not: do socket I/O itself (it calls back into the loop for that).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::core::ShardCore;

/// How often a shard looks at timeouts and resting listeners: timeouts are
/// minutes, so every second is plenty.
pub const TICK: Duration = Duration::from_secs(1);

/// What the clock asks of a loop.
pub trait Turn {
    fn core(&mut self) -> &mut ShardCore;
    /// Writes the delivery log lines of the outcomes just delivered.
    fn log_deliveries(&mut self);
    fn stop_listening(&mut self);
    fn resume_listening(&mut self);
    /// When the listeners may accept again after EMFILE/ENFILE (`None`: now).
    fn accept_paused_until(&mut self) -> &mut Option<Instant>;
}

/// Why a loop ends.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Shutting down and no connection is left.
    Drained,
    /// Shutting down and the grace period is over: the loop closes what is
    /// left (messages still with the spool are committed by it; their
    /// clients are gone and will retry).
    GraceOver,
}

pub struct ShardClock {
    shard_id: usize,
    shutdown: Arc<AtomicBool>,
    grace: Duration,
    next_tick: Instant,
    shutdown_deadline: Option<Instant>,
}

impl ShardClock {
    pub fn new(shard_id: usize, shutdown: Arc<AtomicBool>, grace: Duration, now: Instant) -> Self {
        ShardClock {
            shard_id,
            shutdown,
            grace,
            next_tick: now + TICK,
            shutdown_deadline: None,
        }
    }

    /// How long the loop may sleep: until the next tick or the end of the
    /// grace period, whichever is first.
    pub fn wait_for(&self, now: Instant) -> Duration {
        let at = self
            .shutdown_deadline
            .map_or(self.next_tick, |d| d.min(self.next_tick));
        at.saturating_duration_since(now)
    }

    /// Right after the wait: the outcomes the spool delivered (when its
    /// waker fired), then the start of a shutdown if one was asked for.
    pub fn after_wait(&mut self, lp: &mut impl Turn, now: Instant, woke: bool) {
        if woke {
            lp.core().drain_completions(now);
            lp.log_deliveries();
        }
        if self.shutdown_deadline.is_none() && self.shutdown.load(Ordering::Acquire) {
            self.shutdown_deadline = Some(now + self.grace);
            lp.stop_listening();
            lp.core().begin_shutdown();
        }
    }

    /// Once a second: session timeouts, and listeners that rested after
    /// EMFILE/ENFILE listen again.
    pub fn tick(&mut self, lp: &mut impl Turn, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        lp.core().handle_timeouts(now);
        let rest = lp.accept_paused_until();
        if rest.is_some_and(|t| now >= t) {
            *rest = None;
            lp.resume_listening();
        }
    }

    /// At the end of a turn: whether the loop is done.
    pub fn end(&self, core: &ShardCore, now: Instant) -> Option<End> {
        let deadline = self.shutdown_deadline?;
        if core.slots_in_use() == 0 {
            return Some(End::Drained);
        }
        if now >= deadline {
            tracing::warn!(
                shard = self.shard_id,
                open = core.slots_in_use(),
                "shutdown grace period over; closing the remaining connections"
            );
            return Some(End::GraceOver);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_until_the_tick_or_the_end_of_the_grace_period() {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let mut c = ShardClock::new(0, stop, Duration::from_millis(300), t0);
        assert_eq!(c.wait_for(t0), TICK);
        assert_eq!(c.wait_for(t0 + TICK * 2), Duration::ZERO);
        // A shutdown that began at t0 ends its grace before the tick.
        c.shutdown_deadline = Some(t0 + Duration::from_millis(300));
        assert_eq!(c.wait_for(t0), Duration::from_millis(300));
    }
}
