//! Prometheus metrics: counters the hot path bumps, and the text exposition
//! a scrape reads (served by [`http`]).
//!
//! Cheap on the hot path: every shard owns a [`ShardMetrics`] and every spool
//! writer its `WriterStats`; each is written by that one thread only, with
//! relaxed atomic adds on cache lines no other writer touches. A scrape
//! (another thread, rarely) loads and sums them. Values are not a consistent
//! snapshot across counters, which monitoring does not need.
//!
//! Must not: lock or allocate on the hot path; the names and their meaning
//! are documented in `docs/METRICS.md`, keep the two in step.

pub mod http;

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spool::{ConsumerLag, MetricsSource, WriterStats};

/// Bucket capacity of a [`Histogram`] (bounds plus the `+Inf` bucket).
const BUCKETS_MAX: usize = 24;

/// Upper bounds for latencies, in nanoseconds: 50 us to 10 s, roughly
/// 1-2.5-5 per decade (fdatasync on NVMe is tens of microseconds, on
/// spinning disks or network storage milliseconds to seconds).
pub const LATENCY_BOUNDS_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Upper bounds for batch sizes in bytes: 4 KiB to 64 MiB, powers of 4.
pub const BYTES_BOUNDS: &[u64] = &[
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
];

/// A histogram with fixed bounds given at each call (so the struct has a
/// `Default` and fits in plain counter structs). One writer thread.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_MAX],
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records `value` (in the bounds' unit).
    pub fn observe(&self, bounds: &[u64], value: u64) {
        debug_assert!(bounds.len() < BUCKETS_MAX);
        let i = bounds.partition_point(|b| *b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn add_to(&self, acc: &mut HistogramSnapshot) {
        for (a, b) in acc.buckets.iter_mut().zip(&self.buckets) {
            *a += b.load(Ordering::Relaxed);
        }
        acc.sum += self.sum.load(Ordering::Relaxed);
        acc.count += self.count.load(Ordering::Relaxed);
    }
}

/// Summed histogram values, per bucket (not cumulative).
#[derive(Debug, Default)]
struct HistogramSnapshot {
    buckets: [u64; BUCKETS_MAX],
    sum: u64,
    count: u64,
}

/// Reply codes counted one by one: 200 to 599.
const REPLY_CODES: usize = 400;

/// One shard's counters; written by the shard thread only.
#[derive(Debug)]
pub struct ShardMetrics {
    pub connections_opened: AtomicU64,
    /// Gauge.
    pub connections_open: AtomicU64,
    /// Refused with `554 5.7.1`: not in the listener's allow-list.
    pub connections_refused_access: AtomicU64,
    /// Refused with `421`: the server held `connections_max` already.
    pub connections_refused_limit: AtomicU64,
    pub messages: AtomicU64,
    pub recipients: AtomicU64,
    pub bytes: AtomicU64,
    pub bare_cr: AtomicU64,
    pub bare_lf: AtomicU64,
    pub messages_refused_bare_line_endings: AtomicU64,
    /// Gauge.
    pub inflight_bytes: AtomicU64,
    /// Idle polls (`io::idle_poll`) that found work, and that gave up.
    pub idle_polls_hit: AtomicU64,
    pub idle_polls_missed: AtomicU64,
    /// Times the event loop blocked in the kernel waiting for work.
    pub idle_sleeps: AtomicU64,
    replies: Box<[AtomicU64; REPLY_CODES]>,
    pub dot_to_reply_ns: Histogram,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            connections_opened: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connections_refused_access: AtomicU64::new(0),
            connections_refused_limit: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            recipients: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            bare_cr: AtomicU64::new(0),
            bare_lf: AtomicU64::new(0),
            messages_refused_bare_line_endings: AtomicU64::new(0),
            inflight_bytes: AtomicU64::new(0),
            idle_polls_hit: AtomicU64::new(0),
            idle_polls_missed: AtomicU64::new(0),
            idle_sleeps: AtomicU64::new(0),
            replies: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            dot_to_reply_ns: Histogram::default(),
        }
    }
}

/// Adds `n` to a counter only this thread writes.
pub fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What one shard did, for the line it logs when it stops: the share of
/// the load it carried and how often it polled or slept, so an imbalance
/// between shards shows without a metrics scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardWork {
    pub connections: u64,
    pub messages: u64,
    pub recipients: u64,
    pub idle_polls_hit: u64,
    pub idle_polls_missed: u64,
    pub sleeps: u64,
}

impl ShardMetrics {
    /// The totals [`ShardWork`] reports.
    pub fn work(&self) -> ShardWork {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ShardWork {
            connections: get(&self.connections_opened),
            messages: get(&self.messages),
            recipients: get(&self.recipients),
            idle_polls_hit: get(&self.idle_polls_hit),
            idle_polls_missed: get(&self.idle_polls_missed),
            sleeps: get(&self.idle_sleeps),
        }
    }

    /// Counts the replies in `out` (whole lines, as sessions write them):
    /// one per final line (`250 ...`, not `250-...`).
    pub fn count_replies(&self, out: &[u8]) {
        for line in out.split(|&c| c == b'\n') {
            if line.len() >= 4 && line[3] == b' ' {
                let code = line[..3].iter().try_fold(0usize, |a, &d| {
                    d.is_ascii_digit().then(|| a * 10 + usize::from(d - b'0'))
                });
                if let Some(code @ 200..=599) = code {
                    self.replies[code - 200].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Everything a scrape reads.
pub struct Registry {
    pub shards: Vec<Arc<ShardMetrics>>,
    pub spool: MetricsSource,
    /// The recipient policy (its table's reload counts).
    pub policy: Arc<crate::policy::Policy>,
}

fn counter(out: &mut String, name: &str, help: &str, kind: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Writes a counter split by one label: one line per `(value, count)`.
fn labelled_counter(out: &mut String, name: &str, help: &str, label: &str, lines: &[(&str, u64)]) {
    labelled(out, name, help, "counter", label, lines);
}

/// Writes a metric of `kind` split by one label: one line per `(value, n)`.
fn labelled(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    label: &str,
    lines: &[(&str, u64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (value, n) in lines {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// Writes a histogram; dividing by `divisor` turns the bounds' unit into
/// the exposed one (a division keeps `50000 / 1e9` printing as `0.00005`).
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[u64],
    divisor: f64,
    h: &HistogramSnapshot,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (b, n) in bounds.iter().zip(&h.buckets) {
        cumulative += n;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *b as f64 / divisor
        );
    }
    cumulative += h.buckets[bounds.len()..].iter().sum::<u64>();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", h.sum as f64 / divisor);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

impl Registry {
    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        let sum = |f: fn(&ShardMetrics) -> &AtomicU64| -> u64 {
            self.shards
                .iter()
                .map(|s| f(s).load(Ordering::Relaxed))
                .sum()
        };
        let writers_sum = |f: fn(&WriterStats) -> &AtomicU64| -> u64 {
            self.spool
                .writers()
                .iter()
                .map(|w| f(w).load(Ordering::Relaxed))
                .sum()
        };
        counter(
            &mut out,
            "lmtp_ingest_connections_opened_total",
            "Connections accepted and admitted (allow-list and connection limit passed).",
            "counter",
            sum(|s| &s.connections_opened),
        );
        counter(
            &mut out,
            "lmtp_ingest_connections_open",
            "Connections open now.",
            "gauge",
            sum(|s| &s.connections_open),
        );
        let _ = writeln!(
            out,
            "# HELP lmtp_ingest_shard_connections_open Connections open now on each shard (new connections go to the shard with the fewest).\n# TYPE lmtp_ingest_shard_connections_open gauge"
        );
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "lmtp_ingest_shard_connections_open{{shard=\"{i}\"}} {}",
                s.connections_open.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lmtp_ingest_connections_refused_total Connections refused before a session: reason=\"access\" (554 5.7.1, not in the allow-list), reason=\"limit\" (421, connections_max reached).\n# TYPE lmtp_ingest_connections_refused_total counter"
        );
        let _ = writeln!(
            out,
            "lmtp_ingest_connections_refused_total{{reason=\"access\"}} {}",
            sum(|s| &s.connections_refused_access)
        );
        let _ = writeln!(
            out,
            "lmtp_ingest_connections_refused_total{{reason=\"limit\"}} {}",
            sum(|s| &s.connections_refused_limit)
        );
        counter(
            &mut out,
            "lmtp_ingest_messages_total",
            "Messages stored (committed to the spool).",
            "counter",
            sum(|s| &s.messages),
        );
        counter(
            &mut out,
            "lmtp_ingest_recipients_total",
            "Recipients of stored messages.",
            "counter",
            sum(|s| &s.recipients),
        );
        counter(
            &mut out,
            "lmtp_ingest_received_bytes_total",
            "Body bytes of stored messages (after dot-unstuffing).",
            "counter",
            sum(|s| &s.bytes),
        );
        counter(
            &mut out,
            "lmtp_ingest_bare_cr_total",
            "Bare CR characters seen in message data.",
            "counter",
            sum(|s| &s.bare_cr),
        );
        counter(
            &mut out,
            "lmtp_ingest_bare_lf_total",
            "Bare LF characters seen in message data.",
            "counter",
            sum(|s| &s.bare_lf),
        );
        counter(
            &mut out,
            "lmtp_ingest_smuggling_rejected_total",
            "Messages refused for bare line endings (protocol.bare_line_endings = \"reject\"), the raw material of SMTP smuggling.",
            "counter",
            sum(|s| &s.messages_refused_bare_line_endings),
        );
        counter(
            &mut out,
            "lmtp_ingest_inflight_bytes",
            "Body bytes handed to the spool and not yet committed.",
            "gauge",
            sum(|s| &s.inflight_bytes),
        );
        labelled_counter(
            &mut out,
            "lmtp_ingest_shard_idle_polls_total",
            "Times a shard out of work polled for more before sleeping (server.idle_poll_us): result=\"hit\" (work came within the window), result=\"miss\" (it slept after all).",
            "result",
            &[
                ("hit", sum(|s| &s.idle_polls_hit)),
                ("miss", sum(|s| &s.idle_polls_missed)),
            ],
        );
        counter(
            &mut out,
            "lmtp_ingest_shard_sleeps_total",
            "Times a shard blocked in the kernel waiting for work (each costs a wake-up later).",
            "counter",
            sum(|s| &s.idle_sleeps),
        );
        counter(
            &mut out,
            "lmtp_ingest_writer_queue_depth",
            "Messages queued for the spool writers.",
            "gauge",
            self.spool.queue_depth() as u64,
        );
        counter(
            &mut out,
            "lmtp_ingest_spool_bytes",
            "Bytes of spool segment files.",
            "gauge",
            self.spool.spool_bytes(),
        );

        labelled_counter(
            &mut out,
            "lmtp_ingest_table_reloads_total",
            "SIGHUP reloads of the recipient table (policy.recipients = \"table\"): result=\"ok\" (the new table answers from now on), result=\"refused\" (it did not parse or was empty; the previous table stays, and the log says why).",
            "result",
            &[
                ("ok", self.policy.reloads_ok.load(Ordering::Relaxed)),
                (
                    "refused",
                    self.policy.reloads_refused.load(Ordering::Relaxed),
                ),
            ],
        );

        let consumers = self.spool.consumers();
        if !consumers.is_empty() {
            let per = |f: fn(&ConsumerLag) -> u64| -> Vec<(&str, u64)> {
                consumers.iter().map(|c| (c.name.as_str(), f(c))).collect()
            };
            labelled(
                &mut out,
                "lmtp_ingest_consumer_segments_behind",
                "Spool segments a registered consumer (spool follow --consumer) has not passed, the one it reads included: retention keeps them for it. Growing without end: the consumer is stuck or forgotten.",
                "gauge",
                "consumer",
                &per(|c| c.segments_behind),
            );
            labelled(
                &mut out,
                "lmtp_ingest_consumer_saved_age_seconds",
                "Seconds since a registered consumer last saved its position.",
                "gauge",
                "consumer",
                &per(|c| c.saved_age_s),
            );
        }

        let _ = writeln!(
            out,
            "# HELP lmtp_ingest_replies_total Replies sent, by code (final lines only).\n# TYPE lmtp_ingest_replies_total counter"
        );
        for code in 0..REPLY_CODES {
            let n: u64 = self
                .shards
                .iter()
                .map(|s| s.replies[code].load(Ordering::Relaxed))
                .sum();
            if n > 0 {
                let _ = writeln!(
                    out,
                    "lmtp_ingest_replies_total{{code=\"{}\"}} {n}",
                    code + 200
                );
            }
        }

        labelled_counter(
            &mut out,
            "lmtp_ingest_regroup_waits_total",
            "Times a spool writer with slow syncs waited for the clients its last commit answered (spool.batch_regroup): result=\"hit\" (they came within a quarter of a commit), result=\"miss\" (it committed without them).",
            "result",
            &[
                ("hit", writers_sum(|w| &w.regroup_waits_hit)),
                ("miss", writers_sum(|w| &w.regroup_waits_missed)),
            ],
        );
        let created = writers_sum(|w| &w.segments_created);
        let allocated = writers_sum(|w| &w.segments_allocated);
        labelled_counter(
            &mut out,
            "lmtp_ingest_segments_created_total",
            "Spool segments taken into use, by how they were made ready (spool.segment_fill): fill=\"zeros\" (zero-filled) or fill=\"allocated\" (fallocate only, under large batches).",
            "fill",
            &[("zeros", created - allocated), ("allocated", allocated)],
        );

        let mut dot = HistogramSnapshot::default();
        for s in &self.shards {
            s.dot_to_reply_ns.add_to(&mut dot);
        }
        histogram(
            &mut out,
            "lmtp_ingest_dot_to_reply_seconds",
            "From a message's final dot to its replies (spool queue, write, fdatasync).",
            LATENCY_BOUNDS_NS,
            1e9,
            &dot,
        );

        let (mut fsync, mut batch_bytes) =
            (HistogramSnapshot::default(), HistogramSnapshot::default());
        let mut batch_messages = HistogramSnapshot::default();
        for w in self.spool.writers() {
            w.fsync_ns.add_to(&mut fsync);
            w.batch_bytes.add_to(&mut batch_bytes);
            for (i, b) in w.batch_histogram.iter().enumerate() {
                batch_messages.buckets[i] += b.load(Ordering::Relaxed);
            }
            batch_messages.count += w.batches.load(Ordering::Relaxed);
            batch_messages.sum += w.messages_committed.load(Ordering::Relaxed)
                + w.messages_failed.load(Ordering::Relaxed)
                + w.messages_storage_full.load(Ordering::Relaxed);
        }
        histogram(
            &mut out,
            "lmtp_ingest_fdatasync_seconds",
            "Latency of each fdatasync of a spool segment.",
            LATENCY_BOUNDS_NS,
            1e9,
            &fsync,
        );
        // The writers' batch histogram: bucket i holds 2^i to 2^(i+1)-1.
        let message_bounds: Vec<u64> = (0..crate::spool::stats::BATCH_HISTOGRAM_BUCKETS - 1)
            .map(|i| (2u64 << i) - 1)
            .collect();
        histogram(
            &mut out,
            "lmtp_ingest_batch_messages",
            "Messages per group commit (one write and fdatasync).",
            &message_bounds,
            1.0,
            &batch_messages,
        );
        histogram(
            &mut out,
            "lmtp_ingest_batch_bytes",
            "Bytes written per group commit.",
            BYTES_BOUNDS,
            1.0,
            &batch_bytes,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for v in [1, 40_000, 60_000, 2_000_000_000, 20_000_000_000] {
            h.observe(LATENCY_BOUNDS_NS, v);
        }
        let mut s = HistogramSnapshot::default();
        h.add_to(&mut s);
        let mut out = String::new();
        histogram(&mut out, "x_seconds", "help", LATENCY_BOUNDS_NS, 1e9, &s);
        assert!(
            out.contains("x_seconds_bucket{le=\"0.00005\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_bucket{le=\"0.0001\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"2.5\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_seconds_count 5\n"), "{out}");
    }

    #[test]
    fn replies_counted_by_final_line() {
        let m = ShardMetrics::default();
        m.count_replies(b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE\r\n550 5.1.1 <x@y> User unknown\r\n354 go\r\nxyz\r\n");
        let get = |c: usize| m.replies[c - 200].load(Ordering::Relaxed);
        assert_eq!((get(250), get(550), get(354)), (1, 1, 1));
    }
}
