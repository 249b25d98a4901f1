//! A measured fdatasync latency on the spool's file system, in the spirit of
//! PostgreSQL's `pg_test_fsync`.
//!
//! Three modes, each given a quarter of the time budget (and at most
//! [`ITERATIONS_MAX`] rounds per stream), in temporary files in the spool
//! directory:
//! - `append`: write 4 KiB at the end of the file, then `fdatasync`. Each sync
//!   also commits the new file size (a journal commit on ext4/xfs), like
//!   `pg_test_fsync` and the shared `fsync_bench.py`.
//! - `overwrite`: the same writes into a file zero-filled and synced first,
//!   which is what the spool's writers do (segments are pre-zeroed so that
//!   fdatasync has no metadata to write), and like them past the page cache
//!   (`O_DIRECT`) where the file system allows it. This is the figure the
//!   advice uses.
//! - `parallel`: [`PARALLEL_STREAMS`] threads doing `overwrite` at once, each
//!   in its own file, as that many spool writers would. Their syncs per
//!   second together against one stream's say whether the device runs
//!   flushes in parallel (many NVMe drives, cloud volumes: more writers add
//!   commits) or one at a time (a spinning disk, some SATA SSDs: they do
//!   not), which is what the `writers` advice needs and what no `/sys` flag
//!   tells.
//!
//! It also tries `fallocate` once (1 MiB), which decides whether writers can
//! make segments by allocation (`spool.segment_fill`), and where it can,
//! spends the last quarter finding the batch size from which allocating
//! segments beats zero-filling them ([`super::fill`]).
//!
//! Must not: leave a file behind (a guard removes each on every path, panics
//! included), or write more than [`ITERATIONS_MAX`] x 4 KiB per stream.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Check;
use super::fill::{self, FillReport};
use crate::spool::fs::{AlignedBuf, RealStorage, Storage, StorageFile};

/// One write's size: a small message's record, and `pg_test_fsync`'s default.
pub const BLOCK_BYTES: usize = 4096;
/// Rounds per mode at most (64 MiB of appends), so a fast disk and a long
/// `--fsync-seconds` cannot fill the spool's file system.
pub const ITERATIONS_MAX: usize = 16_384;
/// The pre-zeroed file for `overwrite`: writes wrap around inside it.
const OVERWRITE_FILE_BYTES: u64 = 16 << 20;
/// Streams of the `parallel` mode: the second writer the advice is about.
pub const PARALLEL_STREAMS: usize = 2;

/// Latency of write + fdatasync, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyStats {
    pub iterations: usize,
    pub min_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Rounds per second of wall time: one writer's ceiling of syncs.
    pub syncs_per_s: f64,
}

/// [`PARALLEL_STREAMS`] overwrite streams at once.
#[derive(Clone, Debug, Serialize)]
pub struct ParallelStats {
    pub streams: usize,
    /// Syncs per second of all streams together.
    pub syncs_per_s: f64,
    /// The slowest stream's median write + fdatasync, in microseconds.
    pub median_us: f64,
    /// `syncs_per_s` over one stream's (the `overwrite` mode's): about 1 when
    /// the device flushes one request at a time, up to `streams` when it
    /// flushes them in parallel.
    pub gain: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FsyncReport {
    pub dir: PathBuf,
    pub block_bytes: usize,
    /// Appends (each sync commits a size change too).
    pub append: LatencyStats,
    /// Overwrites of a pre-zeroed file (what a spool segment sees).
    pub overwrite: LatencyStats,
    /// The overwrites went past the page cache (`O_DIRECT`), as the spool's
    /// writers do where the file system allows it (`spool.direct_io`).
    pub overwrite_direct: bool,
    /// Several overwrite streams at once (what more writers would see).
    pub parallel: ParallelStats,
    /// The file system takes `fallocate`, so writers can make segments by
    /// allocation under large batches (`spool.segment_fill = "auto"`);
    /// without it every segment is zero-filled.
    pub fallocate: bool,
    /// Allocated against zero-filled segments by batch size (where
    /// `fallocate` works and the measurement ran).
    pub fill: Option<FillReport>,
    /// Why `fill` is missing although `fallocate` works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fill_error: Option<String>,
}

/// Removes the temporary file however the measurement ends.
pub(super) struct TempFile {
    pub(super) path: PathBuf,
    file: File,
}

impl TempFile {
    pub(super) fn create(dir: &Path, tag: &str) -> io::Result<TempFile> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(
            ".lmtp-ingest-doctor-{tag}.{}.{nanos}.tmp",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(TempFile { path, file })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn fdatasync(f: &File) -> io::Result<()> {
    // SAFETY: fdatasync takes a descriptor we own for the call's duration.
    if unsafe { libc::fdatasync(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(mut lat_us: Vec<f64>, wall: Duration) -> LatencyStats {
    lat_us.sort_by(f64::total_cmp);
    let n = lat_us.len();
    LatencyStats {
        iterations: n,
        min_us: lat_us.first().copied().unwrap_or(0.0),
        median_us: percentile(&lat_us, 0.5),
        p99_us: percentile(&lat_us, 0.99),
        max_us: lat_us.last().copied().unwrap_or(0.0),
        syncs_per_s: n as f64 / wall.as_secs_f64().max(1e-9),
    }
}

/// Runs rounds of `step(i)` + fdatasync until the budget or the count runs
/// out (at least one round).
fn rounds(
    file: &File,
    budget: Duration,
    mut step: impl FnMut(usize) -> io::Result<()>,
) -> io::Result<LatencyStats> {
    let mut lat = Vec::with_capacity(1024);
    let start = Instant::now();
    while lat.len() < ITERATIONS_MAX && (lat.is_empty() || start.elapsed() < budget) {
        let t = Instant::now();
        step(lat.len())?;
        fdatasync(file)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(stats(lat, start.elapsed()))
}

/// One `overwrite` stream: a pre-zeroed file in `dir`, then rounds of a
/// 4 KiB write at the next slot + fdatasync for `budget`, starting together
/// with the other streams at `start` when given. Returns the stats and
/// whether the writes went past the page cache.
fn overwrite_stream(
    dir: &Path,
    tag: &str,
    budget: Duration,
    start: Option<&Barrier>,
) -> io::Result<(LatencyStats, bool)> {
    let block = pattern();
    let t = TempFile::create(dir, tag);
    // Every stream reaches the barrier, even one that failed to set up, so
    // that the others are not left waiting.
    let prepared = t.and_then(|t| {
        let zeros = vec![0u8; 1 << 20];
        let mut f: &File = &t.file;
        for _ in 0..OVERWRITE_FILE_BYTES / zeros.len() as u64 {
            f.write_all(&zeros)?;
        }
        t.file.sync_all()?;
        // As the spool writes: through its storage seam, past the page cache
        // where the file system allows it, from a block-aligned buffer.
        let storage = RealStorage.open(&t.path)?;
        Ok((t, storage))
    });
    if let Some(b) = start {
        b.wait();
    }
    let (t, mut f) = prepared?;
    let mut aligned = AlignedBuf::new();
    aligned.get(BLOCK_BYTES).copy_from_slice(&block);
    let mut direct = true;
    let slots = OVERWRITE_FILE_BYTES / BLOCK_BYTES as u64;
    let stats = rounds(&t.file, budget, |i| {
        let pos = (i as u64 % slots) * BLOCK_BYTES as u64;
        write(f.as_mut(), &aligned, BLOCK_BYTES, pos, &mut direct)
    })?;
    Ok((stats, direct))
}

/// Writes `len` bytes of `buf` at `pos`, past the page cache while the file
/// system allows it (`direct` is cleared, for this and later writes, the
/// first time it refuses), as the spool's writers do.
pub(super) fn write(
    f: &mut dyn StorageFile,
    buf: &AlignedBuf,
    len: usize,
    pos: u64,
    direct: &mut bool,
) -> io::Result<()> {
    if *direct {
        match f.write_direct_at(buf.as_slice(len), pos) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => *direct = false,
            r => return r,
        }
    }
    f.write_all_at(buf.as_slice(len), pos)
}

/// Not all zeros, in case the file system compresses or dedups.
fn pattern() -> Vec<u8> {
    let mut v = vec![0; BLOCK_BYTES];
    fill_pattern(&mut v);
    v
}

/// Fills `buf` with [`pattern`]'s bytes, at any length.
pub(super) fn fill_pattern(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
}

/// [`PARALLEL_STREAMS`] overwrite streams at once, for `budget`.
fn parallel(dir: &Path, budget: Duration, one_stream: &LatencyStats) -> io::Result<ParallelStats> {
    let start = Barrier::new(PARALLEL_STREAMS);
    let results: Vec<io::Result<(LatencyStats, bool)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PARALLEL_STREAMS)
            .map(|i| {
                let start = &start;
                s.spawn(move || overwrite_stream(dir, &format!("parallel{i}"), budget, Some(start)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a parallel stream panicked")))
            })
            .collect()
    });
    let mut syncs_per_s = 0.0;
    let mut median_us: f64 = 0.0;
    for r in results {
        let (s, _) = r?;
        syncs_per_s += s.syncs_per_s;
        median_us = median_us.max(s.median_us);
    }
    Ok(ParallelStats {
        streams: PARALLEL_STREAMS,
        syncs_per_s,
        median_us,
        gain: syncs_per_s / one_stream.syncs_per_s.max(1e-9),
    })
}

/// Measures the three modes and the segment fill in `dir`, `total` split
/// between them.
pub fn measure(dir: &Path, total: Duration) -> io::Result<FsyncReport> {
    let share = total / 4;
    let block = pattern();

    let append = {
        let t = TempFile::create(dir, "append")?;
        fdatasync(&t.file)?;
        let mut f: &File = &t.file;
        rounds(&t.file, share, |_| f.write_all(&block))?
    };
    let (overwrite, overwrite_direct) = overwrite_stream(dir, "overwrite", share, None)?;
    let parallel = parallel(dir, share, &overwrite)?;
    let fallocate = {
        let t = TempFile::create(dir, "fallocate")?;
        let mut f = RealStorage.open(&t.path)?;
        match f.allocate(1 << 20) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => false,
            Err(e) => return Err(e),
        }
    };
    let (fill, fill_error) = if fallocate {
        match fill::measure(dir, share) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, None)
    };

    Ok(FsyncReport {
        dir: dir.to_path_buf(),
        block_bytes: BLOCK_BYTES,
        append,
        overwrite,
        overwrite_direct,
        parallel,
        fallocate,
        fill,
        fill_error,
    })
}

pub fn ms(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn line(s: &LatencyStats) -> String {
    format!(
        "n={} min {} median {} p99 {} max {}",
        s.iterations,
        ms(s.min_us),
        ms(s.median_us),
        ms(s.p99_us),
        ms(s.max_us)
    )
}

/// Allocated against zero-filled segments, per batch size, in one phrase.
fn fill_line(f: &FillReport) -> String {
    let sizes: Vec<String> = f
        .sizes
        .iter()
        .map(|s| {
            format!(
                "{} {:.0} vs {:.0}",
                kib(s.bytes as u64),
                s.allocated_mb_s,
                s.zeros_mb_s
            )
        })
        .collect();
    format!(
        "batches stored into allocated vs zero-filled segments (MB/s, zero-fill of {:.0} MB/s counted): {}",
        f.zero_fill_mb_s,
        sizes.join(", ")
    )
}

/// `bytes` as KiB or MiB.
pub fn kib(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// Above this median a single sync stream limits commits for lock-step
/// clients to a few hundred a second (spinning disks, busy cloud volumes).
const SLOW_MEDIAN_US: f64 = 5_000.0;
/// Below this, flushes are either absorbed by a non-volatile cache (PLP) or
/// not passed down at all (a VM disk with cache=unsafe, a lying disk).
const SUSPICIOUSLY_FAST_US: f64 = 30.0;

/// The check line for the measurement.
pub fn check(r: &FsyncReport) -> Check {
    let o = &r.overwrite;
    let how = if r.overwrite_direct {
        "direct I/O"
    } else {
        "page cache: O_DIRECT refused here"
    };
    let p = &r.parallel;
    let fallocate = match (&r.fill, &r.fill_error) {
        (Some(f), _) => format!("fallocate works; {}", fill_line(f)),
        (None, Some(e)) => format!("fallocate works; allocated against zero-filled segments not measured: {e}"),
        (None, None) => "no fallocate here (every segment is zero-filled: large messages under load get about half the disk's write bandwidth)".into(),
    };
    let value = format!(
        "overwrite (spool-like, {how}) {}; append {}; {} overwrite streams at once {:.0} syncs/s together, {:.2}x one stream's {:.0}; {fallocate}",
        line(o),
        line(&r.append),
        p.streams,
        p.syncs_per_s,
        p.gain,
        o.syncs_per_s
    );
    if o.median_us > SLOW_MEDIAN_US {
        Check::warn(
            "spool_fsync",
            format!("{value}: slow; each lock-step client waits at least this per message"),
            "a disk with power-loss protection (enterprise NVMe/SSD) or a provisioned-IOPS volume; meanwhile more writers (see advice) and more client sessions keep throughput up",
        )
    } else if o.median_us < SUSPICIOUSLY_FAST_US {
        Check::ok(
            "spool_fsync",
            format!(
                "{value}: this fast means a non-volatile (PLP) write cache, or flushes that never reach the disk (a VM disk with cache=unsafe): confirm which"
            ),
        )
    } else {
        Check::ok("spool_fsync", value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn measures_and_cleans_up() {
        let dir =
            tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
        let r = measure(dir.path(), Duration::from_millis(100)).unwrap();
        for s in [&r.append, &r.overwrite] {
            assert!(s.iterations >= 1 && s.median_us > 0.0, "{s:?}");
            assert!(s.min_us <= s.median_us && s.median_us <= s.p99_us && s.p99_us <= s.max_us);
        }
        let p = &r.parallel;
        assert_eq!(p.streams, PARALLEL_STREAMS);
        assert!(p.syncs_per_s > 0.0 && p.median_us > 0.0, "{p:?}");
        let want = p.syncs_per_s / r.overwrite.syncs_per_s;
        assert!((p.gain - want).abs() < 1e-9, "{p:?}");
        assert!(r.fallocate, "ext4 under target/ takes fallocate");
        let f = r
            .fill
            .as_ref()
            .expect("the fill measured where fallocate works");
        assert_eq!(f.sizes.len(), fill::SIZES.len());
        assert!(r.fill_error.is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
