//! Advice derived from the measured fdatasync latency: how many spool
//! writers (from the sync time and whether two sync streams at once beat
//! one, i.e. whether the device flushes in parallel), whether a batch window
//! helps, and the ceiling of commits per second that the disk allows
//! (batches/s x batch size).
//!
//! The model (see `src/spool/mod.rs`): each writer takes every message
//! waiting, writes them as one batch and syncs once; messages arriving during
//! a sync form the next batch. So one writer commits at most
//! `syncs_per_s x batch size` messages a second, where the batch size is what
//! clients have in flight, capped by `batch_messages_max` and
//! `batch_bytes_max`. A lock-step client (Postfix's LMTP client, one message
//! per session at a time) has one message in flight per session.
//!
//! Must not: recommend a non-default value without saying why, measured.

use serde::Serialize;

use crate::config::Config;

use super::Check;
use super::fill;
use super::fsync::{BLOCK_BYTES, FsyncReport, kib, ms};
use super::spool::SpoolFound;

/// Medians above this make a second writer worth having on a device that
/// flushes in parallel: the write and the flush of one batch then take long
/// enough that a second stream overlaps useful work.
const WRITERS_MORE_ABOVE_US: f64 = 1_000.0;
/// Two sync streams making at least this many times one stream's syncs/s
/// mean the device flushes in parallel; one that flushes one request at a
/// time measures about 1.0-1.1 (bench/slow-sync's shim with
/// `SLOW_SYNC_SERIAL=1`: 1.08), one that flushes in parallel near 2 (this
/// project's virtio disk: 1.74-1.89; the shim without it: 1.99).
const PARALLEL_GAIN_MIN: f64 = 1.3;
/// Medians below this are NVMe-with-PLP class: a batch window can trade a
/// little latency for fewer syncs when batches stay tiny.
const WINDOW_MAY_HELP_BELOW_US: f64 = 50.0;
/// Medians from this up are where the writers regroup (the spool's
/// `regroup::SLOW_SYNC`, 0.4 ms).
const REGROUP_FROM_US: f64 = 400.0;

#[derive(Clone, Debug, Serialize)]
pub struct Advice {
    /// `writers`, `batch_window`, `commit_ceiling` or `segment_fill`.
    pub topic: String,
    pub text: String,
    /// The configuration line to use, when a change is advised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

fn advice(topic: &str, text: String, config: Option<String>) -> Advice {
    Advice {
        topic: topic.into(),
        text,
        config,
    }
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// The advice, and the checks of the configured values against it.
pub fn derive(
    config: &Config,
    fsync: Option<&FsyncReport>,
    spool: &SpoolFound,
) -> (Vec<Advice>, Vec<Check>) {
    let Some(f) = fsync else {
        return (
            vec![advice(
                "writers",
                "no fdatasync measurement (see the failed spool checks); keep writers = 1 and batch_delay_us_max = 0 until one is possible".into(),
                None,
            )],
            Vec::new(),
        );
    };
    let s = &config.spool;
    let t = f.overwrite.median_us;
    let syncs = f.overwrite.syncs_per_s;
    let mut out = Vec::new();
    let mut checks = Vec::new();

    // Writers: whether more help depends on whether the device flushes
    // requests in parallel, which the measurement's parallel mode shows.
    let gain = f.parallel.gain;
    let streams = f.parallel.streams;
    let flushes_in_parallel = gain >= PARALLEL_GAIN_MIN;
    let device = match (spool.rotational, spool.hw_queues) {
        (Some(true), _) => " (the device reports itself rotational)".to_string(),
        (_, Some(q)) if q > 1 => format!(" (the device has {q} hardware queues)"),
        _ => String::new(),
    };
    let (text, line) = if t > WRITERS_MORE_ABOVE_US && flushes_in_parallel {
        (
            format!(
                "2: a sync takes {} and {streams} sync streams at once made {gain:.2}x one stream's syncs/s, so this device flushes in parallel{device} and a second writer's flushes run beside the first's; with 2 ms syncs flushed in parallel a second writer measured +1-3% at 16 connections, +8-11% at 64 and +24-34% at 256 (docs/BENCHMARKS.md, \"Ninth session\"; a fourth added nothing, \"Eighth session\"); verify with the same load before and after (configured: {})",
                ms(t),
                s.writers
            ),
            (s.writers < 2).then(|| "writers = 2".to_string()),
        )
    } else if t > WRITERS_MORE_ABOVE_US {
        (
            format!(
                "1: a sync takes {} and {streams} sync streams at once made only {gain:.2}x one stream's syncs/s, so this device flushes one request at a time{device}; a second writer then halves each batch and waits its turn for the flush: with 2 ms syncs taken in turn it measured -37-38% at 16 connections and -23-26% at 64 (docs/BENCHMARKS.md, \"Ninth session\") (configured: {})",
                ms(t),
                s.writers
            ),
            (s.writers != 1).then(|| "writers = 1".to_string()),
        )
    } else {
        (
            format!(
                "1 is enough: at {} a sync one writer commits about {} batches/s, more than a few thousand messages/s even for lock-step clients. This disk would take more syncs from a second writer ({streams} sync streams at once made {gain:.2}x one stream's syncs/s), but with syncs this short the messages waiting during one form the next batch anyway, and on this project's disk (0.1-0.2 ms syncs, flushed in parallel) a second writer measured 4-6% fewer messages/s at 64 connections (docs/BENCHMARKS.md, fifth, seventh and ninth sessions): it adds a thread and a segment stream, not throughput (configured: {})",
                ms(t),
                rate(syncs),
                s.writers
            ),
            None,
        )
    };
    out.push(advice("writers", text, line));

    // Batch window.
    if t < WINDOW_MAY_HELP_BELOW_US {
        out.push(advice(
            "batch_window",
            format!(
                "0 (adaptive) unless the writer's batch mean stays below 4 under heavy load: syncs of {} end before many messages arrive, so batches stay small and the device does one flush per few messages; then batch_delay_us_max = {} (about one sync time) lets a batch wait that long, only while messages keep arriving",
                ms(t),
                (t.round() as u64).max(20)
            ),
            None,
        ));
    } else if t >= REGROUP_FROM_US && s.batch_delay_us_max == 0 {
        let text = format!(
            "0 (adaptive, the default), with batch_regroup = true: at {} a sync, connections would split into two cohorts (one synced while the other waits), each getting a message per two syncs; regrouping waits up to a quarter of a commit for the clients a commit answered, which measured +56-82% at 64 connections with 2-10 ms syncs (docs/BENCHMARKS.md, \"Eighth session\"); more MTA connections raise the rate further",
            ms(t)
        );
        if s.batch_regroup {
            out.push(advice("batch_window", text, None));
        } else {
            out.push(advice(
                "batch_window",
                format!("{text} (configured: batch_regroup = false)"),
                Some("batch_regroup = true".into()),
            ));
        }
    } else {
        out.push(advice(
            "batch_window",
            format!(
                "0 (adaptive, the default): at {} a sync, the messages that arrive during one sync already form the next batch; a fixed wait would add to every reply's latency without fewer syncs per message",
                ms(t)
            ),
            None,
        ));
    }
    if s.batch_delay_us_max > 0
        && (s.batch_delay_us_max as f64) > 2.0 * t.max(WINDOW_MAY_HELP_BELOW_US)
    {
        checks.push(Check::warn(
            "batch_window",
            format!(
                "batch_delay_us_max = {} µs is more than twice the measured sync ({}): every reply under load waits up to that long for no fewer syncs",
                s.batch_delay_us_max,
                ms(t)
            ),
            "batch_delay_us_max = 0 under [spool]",
        ));
    } else {
        checks.push(Check::ok(
            "batch_window",
            format!(
                "batch_delay_us_max = {} µs (0: adaptive, no added delay)",
                s.batch_delay_us_max
            ),
        ));
    }

    // The ceiling.
    let batch_max = s
        .batch_messages_max
        .min((s.batch_bytes_max / BLOCK_BYTES).max(1)) as f64;
    let w = s.writers as f64;
    let at = |inflight: f64| w * syncs * (inflight / w).clamp(1.0, batch_max);
    out.push(advice(
        "commit_ceiling",
        format!(
            "commits/s = writers x syncs/s x batch size, measured {} syncs/s per writer with 4 KiB writes: 1 lock-step session {} msg/s; 16 sessions {}; 64 {}; full batches of {} x 4 KiB {} (an upper bound: a full batch also writes {} KiB before its sync, and past a few tens of thousands a second the CPU limits first, see docs/BENCHMARKS.md)",
            rate(syncs),
            rate(syncs),
            rate(at(16.0)),
            rate(at(64.0)),
            batch_max,
            rate(w * syncs * batch_max),
            (batch_max as usize * BLOCK_BYTES) >> 10
        ),
        None,
    ));
    out.push(segment_fill(config, f));
    (out, checks)
}

/// A measured break-even this far (in log2, a factor of about 2.8) from
/// the configured line moves it. The sizes step by four and near the line
/// the two ways cost the same, so a closer one would flip between runs (a
/// journaled ext4 measured 512 KiB and 1 MiB in two runs); on this
/// project's disk the measured 128 KiB against the default 512 KiB gave
/// +7% for 16 lock-step sessions of 64 KiB messages and the same rate for
/// batches of 190-260 KiB (docs/BENCHMARKS.md, "Tenth session").
const FILL_LINE_MOVE_LOG2: f64 = 1.5;

/// `spool.segment_fill` / `allocate_from_batch_bytes` from the measured
/// allocated-against-zero-filled rates.
fn segment_fill(config: &Config, f: &FsyncReport) -> Advice {
    let s = &config.spool;
    let configured = format!(
        "configured: segment_fill = \"{}\", allocate_from_batch_bytes = {} ({})",
        s.segment_fill,
        s.allocate_from_batch_bytes,
        kib(s.allocate_from_batch_bytes)
    );
    let Some(r) = &f.fill else {
        let why = match &f.fill_error {
            Some(e) => format!("not measured ({e}); keep the default"),
            None => "zeros: this file system has no fallocate, so every segment is zero-filled whatever the setting".into(),
        };
        return advice("segment_fill", format!("{why} ({configured})"), None);
    };
    let forced = s.segment_fill != "auto";
    match (r.break_even_log2, r.allocate_wins_from) {
        (None, _) | (_, None) => advice(
            "segment_fill",
            format!(
                "zero-fill every segment: allocated segments stored batches slower than zero-filled ones at every size up to {} ({}), the zero-fill counted, so allocation never pays on this disk ({configured})",
                kib(*fill::SIZES.last().expect("sizes") as u64),
                measured(r)
            ),
            (s.segment_fill != "zeros").then(|| "segment_fill = \"zeros\"".to_string()),
        ),
        (Some(log2), Some(from)) => {
            let cur = (s.allocate_from_batch_bytes as f64).log2();
            let off = forced || (log2 - cur).abs() >= FILL_LINE_MOVE_LOG2;
            let verdict = if off {
                format!("set the line to {}", kib(from))
            } else {
                "keep the configured line".to_string()
            };
            let text = format!(
                "{verdict}: measured here, allocated segments store batches faster than zero-filled ones from about {} on, the zero-fill counted ({}); smaller batches commit more cheaply into zeroed blocks (docs/BENCHMARKS.md, \"Ninth session\" and \"Tenth session\") ({configured})",
                kib(from),
                measured(r)
            );
            let line = match (off, forced) {
                (false, _) => None,
                (true, false) => Some(format!("allocate_from_batch_bytes = {from}")),
                (true, true) => Some(format!(
                    "segment_fill = \"auto\" and allocate_from_batch_bytes = {from}"
                )),
            };
            advice("segment_fill", text, line)
        }
    }
}

/// The per-size rates, for the advice text.
fn measured(r: &fill::FillReport) -> String {
    let v: Vec<String> = r
        .sizes
        .iter()
        .map(|s| {
            format!(
                "{}: {:.2}x",
                kib(s.bytes as u64),
                s.allocated_mb_s / s.zeros_mb_s
            )
        })
        .collect();
    format!("allocated over zero-filled {}", v.join(", "))
}

#[cfg(test)]
mod tests {
    use super::super::fsync::{LatencyStats, ParallelStats};
    use super::*;

    fn report(median_us: f64) -> FsyncReport {
        report_with_gain(median_us, 1.9)
    }

    fn report_with_gain(median_us: f64, gain: f64) -> FsyncReport {
        let s = LatencyStats {
            iterations: 100,
            min_us: median_us / 2.0,
            median_us,
            p99_us: median_us * 3.0,
            max_us: median_us * 10.0,
            syncs_per_s: 1e6 / median_us,
        };
        FsyncReport {
            dir: "/x".into(),
            block_bytes: BLOCK_BYTES,
            append: s.clone(),
            parallel: ParallelStats {
                streams: 2,
                syncs_per_s: gain * s.syncs_per_s,
                median_us,
                gain,
            },
            overwrite: s,
            overwrite_direct: true,
            fallocate: true,
            fill: Some(fill_report(&[0.6, 0.9, 1.1, 1.3])),
            fill_error: None,
        }
    }

    /// A fill measurement where allocation stores `ratio[i]` times the
    /// zero-filled rate at `fill::SIZES[i]`.
    fn fill_report(ratio: &[f64]) -> fill::FillReport {
        let log2 = fill::break_even_log2(&fill::SIZES, ratio);
        let sizes = fill::SIZES
            .iter()
            .zip(ratio)
            .map(|(&n, &r)| fill::FillSize {
                bytes: n,
                rounds: 10,
                overwrite_median_us: 100.0,
                allocated_median_us: 100.0 / r,
                zeros_mb_s: 1000.0,
                allocated_mb_s: 1000.0 * r,
            })
            .collect();
        fill::FillReport {
            zero_fill_mb_s: 2000.0,
            direct: true,
            sizes,
            break_even_log2: log2,
            allocate_wins_from: log2.map(fill::power_of_two),
        }
    }

    fn fill_advice(config: &Config, f: &FsyncReport) -> Advice {
        let (a, _) = derive(config, Some(f), &SpoolFound::default());
        a.into_iter()
            .find(|a| a.topic == "segment_fill")
            .expect("segment_fill advice")
    }

    #[test]
    fn segment_fill_follows_the_measured_break_even() {
        let mut f = report(200.0);
        let c = Config::default();
        // Crossing at 512 KiB: the default line, nothing to change.
        let a = fill_advice(&c, &f);
        assert_eq!(a.config, None, "{}", a.text);
        assert!(
            a.text.contains("about 512 KiB") && a.text.contains("1 MiB: 1.10x"),
            "{}",
            a.text
        );
        // Winning from 64 KiB (XFS-like): a lower line.
        f.fill = Some(fill_report(&[1.05, 1.3, 1.5, 1.6]));
        let a = fill_advice(&c, &f);
        assert_eq!(
            a.config.as_deref(),
            Some("allocate_from_batch_bytes = 65536")
        );
        // From 1 MiB (twice the default): too close to move the line, as
        // two runs on one disk can differ that much.
        f.fill = Some(fill_report(&[0.5, 0.7, 1.0, 1.2]));
        let a = fill_advice(&c, &f);
        assert_eq!(a.config, None, "{}", a.text);
        assert!(a.text.contains("about 1 MiB"), "{}", a.text);
        // From 4 MiB: a higher line.
        f.fill = Some(fill_report(&[0.5, 0.7, 0.8, 1.0]));
        let a = fill_advice(&c, &f);
        assert_eq!(
            a.config.as_deref(),
            Some("allocate_from_batch_bytes = 4194304")
        );
        // Never winning: zeros.
        f.fill = Some(fill_report(&[0.5, 0.7, 0.8, 0.9]));
        let a = fill_advice(&c, &f);
        assert_eq!(a.config.as_deref(), Some("segment_fill = \"zeros\""));
        let z = Config::from_toml("[spool]\nsegment_fill = \"zeros\"\n").unwrap();
        assert_eq!(fill_advice(&z, &f).config, None);
        // A forced way, where auto would pick: back to auto.
        f.fill = Some(fill_report(&[0.6, 0.9, 1.1, 1.3]));
        let a = fill_advice(&z, &f);
        assert_eq!(
            a.config.as_deref(),
            Some("segment_fill = \"auto\" and allocate_from_batch_bytes = 524288")
        );
        // No fallocate, or the measurement failed: no change, and why.
        f.fill = None;
        f.fallocate = false;
        let a = fill_advice(&c, &f);
        assert!(
            a.config.is_none() && a.text.contains("no fallocate"),
            "{}",
            a.text
        );
        f.fallocate = true;
        f.fill_error = Some("No space left on device".into());
        let a = fill_advice(&c, &f);
        assert!(
            a.config.is_none() && a.text.contains("No space left"),
            "{}",
            a.text
        );
    }

    #[test]
    fn slow_disk_that_flushes_in_parallel_gets_a_second_writer() {
        let spool = SpoolFound::default();
        let (a, _) = derive(
            &Config::default(),
            Some(&report_with_gain(4000.0, 1.9)),
            &spool,
        );
        assert_eq!(a[0].config.as_deref(), Some("writers = 2"), "{}", a[0].text);
        assert!(a[0].text.contains("1.90x"), "{}", a[0].text);
        // Fast syncs: one writer, whatever the device's parallelism.
        let (a, _) = derive(
            &Config::default(),
            Some(&report_with_gain(200.0, 1.9)),
            &spool,
        );
        assert_eq!(a[0].config, None, "{}", a[0].text);
        assert!(a[0].text.starts_with("1 is enough"), "{}", a[0].text);
    }

    #[test]
    fn slow_disk_that_flushes_one_at_a_time_keeps_one_writer() {
        // The flag says parallel queues; the measurement says otherwise and wins.
        let spool = SpoolFound {
            rotational: Some(false),
            hw_queues: Some(8),
            ..SpoolFound::default()
        };
        let (a, _) = derive(
            &Config::default(),
            Some(&report_with_gain(4000.0, 1.05)),
            &spool,
        );
        assert_eq!(a[0].config, None, "already 1: {}", a[0].text);
        assert!(a[0].text.contains("one request at a time"), "{}", a[0].text);
        let mut c = Config::default();
        c.spool.writers = 4;
        let (a, _) = derive(&c, Some(&report_with_gain(4000.0, 1.05)), &spool);
        assert_eq!(a[0].config.as_deref(), Some("writers = 1"), "{}", a[0].text);
    }

    #[test]
    fn a_virtual_disk_that_says_rotational_is_judged_by_its_flushes() {
        let spool = SpoolFound {
            rotational: Some(true),
            ..SpoolFound::default()
        };
        let (a, _) = derive(
            &Config::default(),
            Some(&report_with_gain(150.0, 1.9)),
            &spool,
        );
        assert!(a[0].text.starts_with("1 is enough"), "{}", a[0].text);
        let (a, _) = derive(
            &Config::default(),
            Some(&report_with_gain(8000.0, 1.0)),
            &spool,
        );
        assert!(a[0].text.contains("rotational"), "{}", a[0].text);
        assert!(a[0].text.starts_with("1:"), "{}", a[0].text);
    }

    #[test]
    fn a_long_window_is_flagged_with_the_fix() {
        let mut c = Config::default();
        c.spool.batch_delay_us_max = 5_000;
        let (_, checks) = derive(&c, Some(&report(200.0)), &SpoolFound::default());
        assert_eq!(checks[0].status, super::super::Status::Warn);
        assert_eq!(
            checks[0].fix.as_deref(),
            Some("batch_delay_us_max = 0 under [spool]")
        );
    }

    #[test]
    fn slow_syncs_get_regrouping_and_its_fix_when_off() {
        let (a, _) = derive(
            &Config::default(),
            Some(&report(2000.0)),
            &SpoolFound::default(),
        );
        assert!(a[1].text.contains("batch_regroup = true"), "{}", a[1].text);
        assert_eq!(a[1].config, None, "on by default: nothing to change");
        let mut c = Config::default();
        c.spool.batch_regroup = false;
        let (a, _) = derive(&c, Some(&report(2000.0)), &SpoolFound::default());
        assert_eq!(a[1].config.as_deref(), Some("batch_regroup = true"));
        // Fast syncs: no word of it.
        let (a, _) = derive(
            &Config::default(),
            Some(&report(150.0)),
            &SpoolFound::default(),
        );
        assert!(!a[1].text.contains("regroup"), "{}", a[1].text);
    }

    #[test]
    fn ceiling_counts_batches() {
        let (a, _) = derive(
            &Config::default(),
            Some(&report(1000.0)),
            &SpoolFound::default(),
        );
        let c = &a[2].text;
        assert!(
            c.contains("1 lock-step session 1000 msg/s") && c.contains("16 sessions 16k"),
            "{c}"
        );
    }
}
