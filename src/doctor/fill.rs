//! Where, on the spool's own disk, making a segment by `fallocate` alone
//! starts to store large batches faster than zero-filling it first: the
//! line `spool.segment_fill = "auto"` uses (`spool.allocate_from_batch_bytes`).
//!
//! The two ways cost differently (docs/BENCHMARKS.md, "Ninth session"): a
//! write plus `fdatasync` into blocks that were only allocated also writes
//! the extent change (and on a journaled file system commits it), so each
//! commit costs more; a zero-filled segment makes each commit cheap but has
//! the disk write every byte twice, the zeros ahead and the records later.
//! Which wins depends on the batch's size and on the file system and
//! device, which is what this measures, for batches of [`SIZES`]:
//! - `zero_fill`: zeros written into a new file, as a writer prepares its
//!   next segment (past the page cache where allowed), then `fsync`;
//! - for each size, rounds of one write into a zero-filled file and one
//!   into a file only `fallocate`d, each followed by `fdatasync`, taken in
//!   turn so both see the same moment of a noisy disk.
//!
//! A batch's cost per byte is then `overwrite / size + zero-fill per byte`
//! against `allocated / size`.
//!
//! Must not: leave a file behind (each is removed on every path), or write
//! more than [`REGION_BYTES`] into any one file.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::fsync::{TempFile, fill_pattern, write};
use crate::spool::fs::{AlignedBuf, DIRECT_ALIGN, RealStorage, Storage};

/// Batch sizes measured: from a few dozen small messages to the default
/// `batch_bytes_max`.
pub const SIZES: [usize; 4] = [64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// Each file's size: writes stop (or wrap, in the zero-filled file) there.
pub const REGION_BYTES: u64 = 32 << 20;
/// Free space the measurement leaves untouched: it writes two files of
/// [`REGION_BYTES`] at once, and doctor may run beside a live server whose
/// spool shares the disk.
pub const FREE_MIN_BYTES: u64 = 1 << 30;
/// Rounds per size at least, whatever the time budget.
const ROUNDS_MIN: usize = 3;
/// The zero-fill's chunk, as a writer's segment preparation writes it.
const ZERO_CHUNK: usize = 256 << 10;

/// One batch size's two medians.
#[derive(Clone, Debug, Serialize)]
pub struct FillSize {
    pub bytes: usize,
    pub rounds: usize,
    /// Median write + fdatasync into zero-filled blocks, microseconds.
    pub overwrite_median_us: f64,
    /// Median write + fdatasync into blocks only allocated, microseconds.
    pub allocated_median_us: f64,
    /// Bytes stored per second with zero-filled segments, the zero-fill
    /// counted: `bytes / (overwrite + bytes / zero_fill rate)`, MB/s.
    pub zeros_mb_s: f64,
    /// Bytes stored per second with allocated segments, MB/s.
    pub allocated_mb_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FillReport {
    /// Zeros written per second into a new file, synced, MB/s.
    pub zero_fill_mb_s: f64,
    /// The writes went past the page cache (`O_DIRECT`).
    pub direct: bool,
    pub sizes: Vec<FillSize>,
    /// log2 of the mean batch from which allocation stored faster: between
    /// the two measured sizes where it started to win (on a log scale); the
    /// smallest size when it won at all of them; `None` when it won at none.
    pub break_even_log2: Option<f64>,
    /// `break_even_log2` as bytes, rounded to a power of two: the
    /// `allocate_from_batch_bytes` this disk suggests.
    pub allocate_wins_from: Option<u64>,
}

fn timed(step: impl FnOnce() -> io::Result<()>) -> io::Result<f64> {
    let t = Instant::now();
    step()?;
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

/// Where `ratio` (allocation's rate over zero-fill's, per size) reaches 1
/// for good, as log2 of a size: interpolated on log2(size) between the last
/// size where allocation lost and the next; the smallest size when it won
/// at all; `None` when it lost at the largest. A win below a later loss (two
/// ways that tie at small sizes, measured on a noisy disk) does not count.
pub fn break_even_log2(sizes: &[usize], ratio: &[f64]) -> Option<f64> {
    let wins = |r: f64| r.is_finite() && r >= 1.0;
    let k = ratio.iter().rposition(|&r| !wins(r)).map_or(0, |i| i + 1);
    if k >= ratio.len() {
        return None;
    }
    let l1 = (sizes[k] as f64).log2();
    if k == 0 {
        return Some(l1);
    }
    let l0 = (sizes[k - 1] as f64).log2();
    let (r0, r1) = (ratio[k - 1], ratio[k]);
    if !r0.is_finite() {
        return Some(l1);
    }
    Some((l0 + (1.0 - r0) / (r1 - r0).max(1e-9) * (l1 - l0)).clamp(l0, l1))
}

/// `log2`'s size rounded to a power of two.
pub fn power_of_two(log2: f64) -> u64 {
    1u64 << log2.round().clamp(0.0, 62.0) as u32
}

/// Measures in `dir` for about `budget`. Fails with the file system's error
/// when `fallocate` or a write is refused (a full disk), and without writing
/// anything when less than [`FREE_MIN_BYTES`] plus its files are free.
pub fn measure(dir: &Path, budget: Duration) -> io::Result<FillReport> {
    let free = crate::spool::lock::free_bytes(dir)?;
    if free < FREE_MIN_BYTES + 2 * REGION_BYTES {
        return Err(io::Error::other(format!(
            "skipped: {} MiB free, and it writes {} MiB while leaving {} MiB for the spool",
            free >> 20,
            (2 * REGION_BYTES) >> 20,
            FREE_MIN_BYTES >> 20
        )));
    }
    let mut buf = AlignedBuf::new();
    let big = *SIZES.last().expect("sizes");
    // Not all zeros, in case the file system compresses or dedups.
    fill_pattern(buf.get(big.max(ZERO_CHUNK)));
    let mut zeros = AlignedBuf::new();
    zeros.get(ZERO_CHUNK).fill(0);
    let mut direct = true;

    // The zero-filled file, timed as a writer's preparation.
    let z = TempFile::create(dir, "zeros")?;
    let mut zf = RealStorage.open(&z.path)?;
    let fill_us = timed(|| {
        let mut at = 0;
        while at < REGION_BYTES {
            write(zf.as_mut(), &zeros, ZERO_CHUNK, at, &mut direct)?;
            at += ZERO_CHUNK as u64;
        }
        zf.sync_all()
    })?;
    let zero_fill_mb_s = REGION_BYTES as f64 / fill_us;

    let per_size = budget / SIZES.len() as u32;
    let mut sizes = Vec::with_capacity(SIZES.len());
    for &n in &SIZES {
        debug_assert_eq!(n % DIRECT_ALIGN, 0);
        let a = TempFile::create(dir, "allocated")?;
        let mut af = RealStorage.open(&a.path)?;
        af.allocate(REGION_BYTES)?;
        af.sync_all()?;
        let slots = (REGION_BYTES / n as u64) as usize;
        let (mut over, mut alloc) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while alloc.len() < slots && (alloc.len() < ROUNDS_MIN || start.elapsed() < per_size) {
            let pos = (alloc.len() * n) as u64;
            over.push(timed(|| {
                write(zf.as_mut(), &buf, n, pos, &mut direct)?;
                zf.sync_data()
            })?);
            alloc.push(timed(|| {
                write(af.as_mut(), &buf, n, pos, &mut direct)?;
                af.sync_data()
            })?);
        }
        let rounds = alloc.len();
        let (o, a) = (median(over), median(alloc));
        sizes.push(FillSize {
            bytes: n,
            rounds,
            overwrite_median_us: o,
            allocated_median_us: a,
            zeros_mb_s: n as f64 / (o + n as f64 / zero_fill_mb_s),
            allocated_mb_s: n as f64 / a,
        });
    }
    let ratio: Vec<f64> = sizes
        .iter()
        .map(|s| s.allocated_mb_s / s.zeros_mb_s)
        .collect();
    let log2 = break_even_log2(&SIZES, &ratio);
    Ok(FillReport {
        zero_fill_mb_s,
        direct,
        break_even_log2: log2,
        allocate_wins_from: log2.map(power_of_two),
        sizes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn break_even_interpolates_between_loss_and_win() {
        let s = SIZES;
        let at = |r: &[f64]| break_even_log2(&s, r).map(power_of_two);
        assert_eq!(at(&[0.5, 0.8, 0.9, 0.95]), None);
        assert_eq!(at(&[1.2, 1.5, 1.6, 1.7]), Some(64 << 10));
        // Crossing halfway between 256 KiB and 1 MiB (log scale): 512 KiB.
        assert_eq!(break_even_log2(&s, &[0.7, 0.9, 1.1, 1.3]), Some(19.0));
        assert_eq!(at(&[0.7, 0.9, 1.1, 1.3]), Some(512 << 10));
        // Just past the loss: its size; just before the win: the win's.
        assert_eq!(at(&[0.7, 0.99, 1.5, 1.6]), Some(256 << 10));
        assert_eq!(at(&[0.7, 0.5, 1.01, 1.6]), Some(1 << 20));
        // A win below a loss is a tie measured on a noisy disk.
        assert_eq!(at(&[1.02, 0.8, 0.9, 1.2]), Some(2 << 20));
        assert_eq!(at(&[1.1, 1.2, 0.9, 0.95]), None);
        assert_eq!(at(&[f64::NAN, 1.2, 1.3, 1.4]), Some(256 << 10));
    }

    #[test]
    fn medians_take_the_lower_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn measures_every_size_and_cleans_up() {
        let dir =
            tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
        let r = measure(dir.path(), Duration::from_millis(100)).unwrap();
        assert!(r.zero_fill_mb_s > 0.0, "{r:?}");
        assert_eq!(r.sizes.len(), SIZES.len());
        for (s, &n) in r.sizes.iter().zip(&SIZES) {
            assert_eq!(s.bytes, n);
            assert!(s.rounds >= ROUNDS_MIN, "{s:?}");
            assert!(s.overwrite_median_us > 0.0 && s.allocated_median_us > 0.0);
            assert!(s.zeros_mb_s > 0.0 && s.allocated_mb_s > 0.0);
            assert!(
                s.zeros_mb_s < r.zero_fill_mb_s,
                "the fill is counted: {s:?}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
