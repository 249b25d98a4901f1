//! Latency histogram: an HDR histogram of microseconds (1 µs to 1 hour, three
//! significant digits), so p99.9 and the maximum are exact to 0.1% however
//! long the run, with a fixed footprint and no allocation per sample.
//!
//! Must not: allocate after construction (recording is on the hot path).

use hdrhistogram::Histogram;

/// Longest latency kept exactly: one hour. Longer samples saturate there.
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Microsecond latencies.
pub struct LatencyHist {
    h: Histogram<u64>,
}

/// The figures a report prints, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    pub fn new() -> LatencyHist {
        LatencyHist {
            h: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("constant bounds are valid"),
        }
    }

    /// Records one sample; 0 is counted as 1 µs (the histogram's floor).
    pub fn record_us(&mut self, us: u64) {
        self.h.saturating_record(us.max(1));
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// Adds another histogram's samples (one per thread, merged at the end).
    pub fn merge(&mut self, other: &LatencyHist) {
        self.h
            .add(&other.h)
            .expect("histograms with the same bounds always add");
    }

    /// All zeros when there are no samples.
    pub fn percentiles(&self) -> Percentiles {
        if self.h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: self.h.value_at_quantile(0.50),
            p90: self.h.value_at_quantile(0.90),
            p99: self.h.value_at_quantile(0.99),
            p999: self.h.value_at_quantile(0.999),
            max: self.h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_all_zero() {
        assert_eq!(LatencyHist::new().percentiles(), Percentiles::default());
    }

    #[test]
    fn percentiles_of_one_to_a_thousand() {
        let mut h = LatencyHist::new();
        for us in 1..=1000 {
            h.record_us(us);
        }
        let p = h.percentiles();
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500, 900, 990, 999, 1000)
        );
    }

    #[test]
    fn merge_adds_samples_and_zero_counts_as_one() {
        let mut a = LatencyHist::new();
        let mut b = LatencyHist::new();
        a.record_us(0);
        b.record_us(2_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.percentiles().p50, 1);
        // Three significant digits: within 0.1%.
        assert!(a.percentiles().max.abs_diff(2_000_000) <= 2_000);
    }
}
