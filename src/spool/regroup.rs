//! Regrouping: on a disk with slow syncs, a writer waits briefly for the
//! clients it has just answered, so that one batch holds them all again.
//!
//! Why: an MTA connection has one transaction in flight. A message that
//! arrives while a sync runs waits for it, then for its own. So with slow
//! syncs the connections settle into two cohorts, one being synced while the
//! other waits, and each message's cycle is two syncs: N connections make
//! N / (2 x sync) messages a second, in batches of N / 2. Measured with every
//! sync slowed by 2 ms (bench/slow-sync.sh; docs/BENCHMARKS.md, "Eighth
//! session"), regrouping raised 64 pipelined connections from 12,799 to
//! 19,998 msg/s and 16 lock-step `smtp-source` sessions from 3,331 to 5,260.
//!
//! How: after a commit, the next batch is expected to hold what arrived
//! during it plus one message from each client it answered. When the batch
//! gathered so far is short of that, the writer waits for it, up to a quarter
//! of its mean commit time. Only while the device's flushes are slow:
//! commits that are long because batches are large (hundreds of connections
//! on a fast disk, where the CPU is the limit) do not qualify; waiting there
//! cost 3-7% in measurements.
//!
//! The wait is learnt like the shards' idle polling: it is used while at
//! least half of the recent waits reached their target, else only as a
//! probe, every 8th commit at first and half as often after each probe that
//! misses (down to every 256th); a probe that hits makes waiting the rule
//! again. Clients whose next message takes longer than the window (fifty
//! recipients in lock step: 53 round trips; senders on a schedule of their
//! own) make the waits miss, and they stop.
//!
//! Must not: wait when flushes are fast (a mean under [`SLOW_SYNC`], where
//! the next messages already gather while a sync runs and a wait could only
//! add latency), wait longer than [`WAIT_MAX`], or wait for more than a batch
//! may hold.

use std::time::Duration;

/// Below this mean `fdatasync` time regrouping is off: flushes that fast
/// (NVMe, this project's VM at about 0.1 ms) end before answered clients
/// could send again.
pub(crate) const SLOW_SYNC: Duration = Duration::from_micros(400);
/// Longest single wait (a quarter of a 20 ms commit).
pub(crate) const WAIT_MAX: Duration = Duration::from_millis(5);

/// EWMA weights: 1/8 for commit times, 1/16 for the hit share.
const TIME_SHIFT: u32 = 3;
const HIT_SHIFT: u32 = 4;
/// Fixed point for the hit share: 1.0 = 1 << 16.
const ONE: u32 = 1 << 16;
/// Wait while at least this share of recent waits reached the target.
const WAIT_AT: u32 = ONE / 2;
/// Below `WAIT_AT`, wait once per this many commits to sample, at first...
const PROBE_EVERY: u32 = 8;
/// ...doubling after each probe that misses, up to this.
const PROBE_EVERY_MAX: u32 = 256;

#[derive(Debug)]
pub(crate) struct Regroup {
    enabled: bool,
    /// Mean commit time (write and sync), nanoseconds.
    commit_ewma_ns: u64,
    /// Mean `fdatasync` time, nanoseconds.
    sync_ewma_ns: u64,
    /// Share of recent waits that reached their target (EWMA, 1/ONE).
    hit_share: u32,
    /// Commits since the last wait, while below `WAIT_AT`.
    skipped: u32,
    /// Commits between probes now.
    probe_every: u32,
    /// The wait last planned is a probe.
    probing: bool,
    /// Messages the next batch is expected to hold.
    expected: usize,
}

impl Regroup {
    pub(crate) fn new(enabled: bool) -> Regroup {
        Regroup {
            enabled,
            commit_ewma_ns: 0,
            sync_ewma_ns: 0,
            // Start on the line: the first wait's outcome decides, so a
            // load whose waits miss stops after one, and one whose waits
            // hit keeps them.
            hit_share: WAIT_AT,
            skipped: 0,
            probe_every: PROBE_EVERY,
            probing: false,
            expected: 0,
        }
    }

    /// After a commit that took `took`, of which `sync` in `fdatasync`,
    /// answered `answered` messages, and ended with `queued` more already
    /// waiting.
    pub(crate) fn committed(
        &mut self,
        took: Duration,
        sync: Duration,
        answered: usize,
        queued: usize,
    ) {
        ewma(&mut self.commit_ewma_ns, took);
        ewma(&mut self.sync_ewma_ns, sync);
        self.expected = answered.saturating_add(queued);
    }

    /// The batch gathered so far has `have` messages (of at most `cap`):
    /// how long to wait for how many in all, or `None` not to wait. A
    /// `Some` must be followed by [`Regroup::record`].
    pub(crate) fn plan(&mut self, have: usize, cap: usize) -> Option<(Duration, usize)> {
        let commit = Duration::from_nanos(self.commit_ewma_ns);
        let sync = Duration::from_nanos(self.sync_ewma_ns);
        let target = self.expected.min(cap);
        if !self.enabled || sync < SLOW_SYNC || have >= target {
            return None;
        }
        self.probing = self.hit_share < WAIT_AT;
        if self.probing {
            self.skipped += 1;
            if self.skipped < self.probe_every {
                return None;
            }
        }
        self.skipped = 0;
        Some(((commit / 4).min(WAIT_MAX), target))
    }

    /// Whether the wait [`Regroup::plan`] asked for reached its target.
    pub(crate) fn record(&mut self, hit: bool) {
        let sample = if hit { ONE } else { 0 };
        self.hit_share = self.hit_share - (self.hit_share >> HIT_SHIFT) + (sample >> HIT_SHIFT);
        if self.probing {
            if hit {
                // The clients changed: wait again from the next commit.
                self.hit_share = self.hit_share.max(WAIT_AT);
                self.probe_every = PROBE_EVERY;
            } else {
                self.probe_every = (self.probe_every * 2).min(PROBE_EVERY_MAX);
            }
        }
    }
}

/// Moves the mean `mean_ns` towards `sample` by 1/8. It starts at zero, so
/// one slow first sync (a fresh segment's metadata) cannot switch waiting
/// on: 4 ms syncs do after one commit, 1 ms syncs after four.
fn ewma(mean_ns: &mut u64, sample: Duration) {
    let ns = sample.as_nanos().min(u64::MAX as u128) as u64;
    *mean_ns = *mean_ns - (*mean_ns >> TIME_SHIFT) + (ns >> TIME_SHIFT);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS2: Duration = Duration::from_millis(2);
    const US150: Duration = Duration::from_micros(150);

    /// `n` commits alike, the last answering `answered` with `queued` waiting.
    fn commits(
        r: &mut Regroup,
        n: usize,
        took: Duration,
        sync: Duration,
        answered: usize,
        queued: usize,
    ) {
        for _ in 0..n {
            r.committed(took, sync, answered, queued);
        }
    }

    /// Within 1% of `want` (the means approach their samples from below).
    fn about(got: Duration, want: Duration) -> bool {
        got <= want && got.as_nanos() * 100 >= want.as_nanos() * 99
    }

    #[test]
    fn slow_commits_wait_a_quarter_commit_for_the_answered_clients() {
        let mut r = Regroup::new(true);
        commits(&mut r, 40, MS2, MS2, 32, 32);
        let (wait, target) = r.plan(32, 1024).expect("slow syncs wait");
        assert!(about(wait, MS2 / 4), "{wait:?}");
        assert_eq!(target, 64);
        r.record(true);
        // Already as many as expected: no wait.
        assert_eq!(r.plan(64, 1024), None);
        // Never more than a batch may hold.
        assert_eq!(r.plan(10, 40).map(|p| p.1), Some(40));
    }

    #[test]
    fn fast_syncs_and_a_disabled_regroup_never_wait() {
        let mut r = Regroup::new(true);
        commits(&mut r, 100, US150, US150, 32, 32);
        assert_eq!(r.plan(1, 1024), None);
        let mut off = Regroup::new(false);
        commits(&mut off, 100, MS2, MS2, 32, 32);
        assert_eq!(off.plan(1, 1024), None);
    }

    #[test]
    fn long_commits_with_fast_flushes_do_not_wait() {
        // Large batches on a fast disk: the write is long, the flush is not.
        let mut r = Regroup::new(true);
        commits(&mut r, 100, MS2, US150, 128, 128);
        assert_eq!(r.plan(1, 1024), None);
    }

    #[test]
    fn the_wait_is_capped() {
        let mut r = Regroup::new(true);
        let long = Duration::from_millis(100);
        commits(&mut r, 40, long, long, 8, 0);
        assert_eq!(r.plan(1, 1024), Some((WAIT_MAX, 8)));
    }

    #[test]
    fn waits_that_miss_stop_except_for_probes_and_hits_bring_them_back() {
        let mut r = Regroup::new(true);
        commits(&mut r, 40, MS2, MS2, 16, 0);
        let mut waits = 0;
        for _ in 0..64 {
            r.committed(MS2, MS2, 16, 0);
            if r.plan(1, 1024).is_some() {
                waits += 1;
                r.record(false);
            }
        }
        // The first miss takes the share below a half; then probes after 8,
        // 16 and 32 more commits.
        assert_eq!(waits, 4);
        for _ in 0..1000 {
            r.committed(MS2, MS2, 16, 0);
            if r.plan(1, 1024).is_some() {
                waits += 1;
                r.record(false);
            }
        }
        // 64, 128, then every 256: a load that never comes back costs a
        // wait per 256 commits.
        assert!((8..=10).contains(&waits), "{waits} waits");
        // The next probe (at most 256 commits away) hits, and from then on
        // every commit waits.
        let mut in_a_row = 0;
        for _ in 0..600 {
            r.committed(MS2, MS2, 16, 0);
            if r.plan(1, 1024).is_some() {
                r.record(true);
                in_a_row += 1;
            } else {
                in_a_row = 0;
            }
        }
        assert!(
            in_a_row > 300,
            "hits make waiting the rule again: {in_a_row}"
        );
    }

    #[test]
    fn one_slow_sync_does_not_switch_waiting_on() {
        // A fresh segment's first sync can be slow; the mean starts at zero.
        let mut r = Regroup::new(true);
        r.committed(MS2, MS2, 1, 0);
        assert_eq!(r.plan(0, 1024), None);
        commits(&mut r, 50, US150, US150, 1, 0);
        r.committed(MS2, MS2, 2, 0);
        assert_eq!(r.plan(0, 1024), None);
        // Slow syncs that last do.
        commits(&mut r, 20, MS2, MS2, 2, 0);
        assert!(r.plan(1, 1024).is_some());
    }
}
