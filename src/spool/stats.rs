//! Counters the writers keep, for benches and a later metrics endpoint.
//!
//! Plain relaxed atomics written by one writer thread each and read by
//! anyone; a snapshot is not atomic across counters, which is fine for
//! monitoring.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets of the batch-size histogram: bucket `i` counts batches of
/// `2^i ..= 2^(i+1) - 1` messages; the last takes everything larger.
pub const BATCH_HISTOGRAM_BUCKETS: usize = 16;

/// One writer's counters.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub messages_committed: AtomicU64,
    pub messages_failed: AtomicU64,
    pub messages_storage_full: AtomicU64,
    pub bytes_written: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_ns_total: AtomicU64,
    pub fsync_ns_max: AtomicU64,
    pub batch_messages_max: AtomicU64,
    pub segments_created: AtomicU64,
    /// Of those, made by allocating their blocks instead of zero-filling
    /// them (`spool.segment_fill`).
    pub segments_allocated: AtomicU64,
    /// Watermark updates that failed (followers lag; nothing is lost).
    pub watermark_errors: AtomicU64,
    /// Waits for answered clients (`regroup.rs`) that reached their target,
    /// and that ran out.
    pub regroup_waits_hit: AtomicU64,
    pub regroup_waits_missed: AtomicU64,
    pub batch_histogram: [AtomicU64; BATCH_HISTOGRAM_BUCKETS],
    /// Each fdatasync's latency (for the metrics endpoint).
    pub fsync_ns: crate::metrics::Histogram,
    /// Bytes written per batch (for the metrics endpoint).
    pub batch_bytes: crate::metrics::Histogram,
}

impl WriterStats {
    pub(crate) fn add(&self, c: &AtomicU64, n: u64) {
        let _ = self;
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn record_batch(&self, messages: u64) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_messages_max
            .fetch_max(messages, Ordering::Relaxed);
        let bucket =
            (63 - messages.max(1).leading_zeros() as usize).min(BATCH_HISTOGRAM_BUCKETS - 1);
        self.batch_histogram[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_fsync(&self, ns: u64) {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.fsync_ns_total.fetch_add(ns, Ordering::Relaxed);
        self.fsync_ns_max.fetch_max(ns, Ordering::Relaxed);
        self.fsync_ns.observe(crate::metrics::LATENCY_BOUNDS_NS, ns);
    }

    pub(crate) fn record_batch_bytes(&self, bytes: u64) {
        self.batch_bytes
            .observe(crate::metrics::BYTES_BOUNDS, bytes);
    }
}

/// A snapshot summed over all writers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpoolStats {
    pub batches: u64,
    pub messages_committed: u64,
    pub messages_failed: u64,
    pub messages_storage_full: u64,
    pub bytes_written: u64,
    pub fsyncs: u64,
    pub fsync_ns_total: u64,
    pub fsync_ns_max: u64,
    pub batch_messages_max: u64,
    pub segments_created: u64,
    pub segments_allocated: u64,
    pub watermark_errors: u64,
    pub regroup_waits_hit: u64,
    pub regroup_waits_missed: u64,
    /// Segments removed by retention (spool-wide).
    pub segments_removed: u64,
    /// Bytes of segment files now (spool-wide).
    pub spool_bytes: u64,
    pub batch_histogram: [u64; BATCH_HISTOGRAM_BUCKETS],
}

impl SpoolStats {
    pub(crate) fn collect(all: &[Arc<WriterStats>]) -> SpoolStats {
        let mut s = SpoolStats::default();
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for w in all {
            s.batches += ld(&w.batches);
            s.messages_committed += ld(&w.messages_committed);
            s.messages_failed += ld(&w.messages_failed);
            s.messages_storage_full += ld(&w.messages_storage_full);
            s.bytes_written += ld(&w.bytes_written);
            s.fsyncs += ld(&w.fsyncs);
            s.fsync_ns_total += ld(&w.fsync_ns_total);
            s.fsync_ns_max = s.fsync_ns_max.max(ld(&w.fsync_ns_max));
            s.batch_messages_max = s.batch_messages_max.max(ld(&w.batch_messages_max));
            s.segments_created += ld(&w.segments_created);
            s.segments_allocated += ld(&w.segments_allocated);
            s.watermark_errors += ld(&w.watermark_errors);
            s.regroup_waits_hit += ld(&w.regroup_waits_hit);
            s.regroup_waits_missed += ld(&w.regroup_waits_missed);
            for (a, b) in s.batch_histogram.iter_mut().zip(&w.batch_histogram) {
                *a += ld(b);
            }
        }
        s
    }

    /// Mean messages per batch (committed or not).
    pub fn batch_messages_mean(&self) -> f64 {
        let m = self.messages_committed + self.messages_failed + self.messages_storage_full;
        if self.batches == 0 {
            0.0
        } else {
            m as f64 / self.batches as f64
        }
    }

    /// Mean fdatasync latency in microseconds.
    pub fn fsync_us_mean(&self) -> f64 {
        if self.fsyncs == 0 {
            0.0
        } else {
            self.fsync_ns_total as f64 / self.fsyncs as f64 / 1000.0
        }
    }

    /// The counters that grew between `earlier` and `self` (maxima kept).
    pub fn since(&self, earlier: &SpoolStats) -> SpoolStats {
        let mut d = self.clone();
        d.batches -= earlier.batches;
        d.messages_committed -= earlier.messages_committed;
        d.messages_failed -= earlier.messages_failed;
        d.messages_storage_full -= earlier.messages_storage_full;
        d.bytes_written -= earlier.bytes_written;
        d.fsyncs -= earlier.fsyncs;
        d.fsync_ns_total -= earlier.fsync_ns_total;
        d.segments_created -= earlier.segments_created;
        d.segments_allocated -= earlier.segments_allocated;
        d.regroup_waits_hit -= earlier.regroup_waits_hit;
        d.regroup_waits_missed -= earlier.regroup_waits_missed;
        for (a, b) in d.batch_histogram.iter_mut().zip(&earlier.batch_histogram) {
            *a -= b;
        }
        d
    }
}
