//! Recovery at start: find every segment, check every record, cut torn tails,
//! and tell each writer where its stream ends and which sequence comes next.
//!
//! A torn tail is whatever follows the last sound record of a segment when it
//! is not zeros: a batch whose write was cut by a crash, or a batch whose write
//! or sync failed (the writer then moved to a fresh segment). None of it was
//! acknowledged, because acknowledgement waits for the fdatasync that covers
//! the whole batch, and the batch is written after every earlier record.
//! Recovery copies the cut bytes to `DIR/cut/` (for inspection; nothing is
//! destroyed), then zeros them in place and syncs, so readers see a clean end.
//!
//! A cut is not always a torn write. When the first bad record lies below the
//! committed watermark the last run left in the same segment (`watermark.rs`:
//! written only after a sync returned, so never ahead of the data; never
//! synced, so after a power cut it may lag, which only hides damage), the cut
//! bytes had been synced and their mail acknowledged: damage on the disk. The
//! report says so ([`RecoveryReport::damage`]) and the server logs it as an
//! error. Sound records after a bad one prove nothing on their own: a torn
//! batch whose pages reached the disk out of order looks the same. An older
//! segment's tail can be a batch whose write failed, so only the segment the
//! watermark is in is judged.
//!
//! Must not: accept any record that fails its checks, or touch a segment whose
//! header is damaged (reported, left as it is, skipped by the writers).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::fs::Storage;
use super::reader::{self, SegmentInfo};
use super::segment::{PREP_SUFFIX, SegmentHeader, SegmentId};
use super::watermark::{self, Watermark, WatermarkFile};
use super::{SpoolError, queue_id_parts};

/// What recovery found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    /// Bytes of sound records, padding included.
    pub record_bytes: u64,
    /// Torn tails cut, one per segment that had one.
    pub cut: Vec<CutTail>,
    /// Segments whose header is damaged: left untouched and not written to.
    pub damaged_segments: Vec<String>,
    /// Half-made segments (`.seg.prep`) removed.
    pub removed_prep: Vec<String>,
}

impl RecoveryReport {
    pub fn cut_bytes(&self) -> u64 {
        self.cut.iter().map(|c| c.bytes).sum()
    }

    /// Whether recovery found damage rather than only torn writes: a cut
    /// below the committed watermark, or a damaged segment header.
    pub fn damage(&self) -> bool {
        !self.damaged_segments.is_empty() || self.cut.iter().any(|c| c.below_committed)
    }
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recovered {} records ({} bytes) in {} segments",
            self.records, self.record_bytes, self.segments
        )?;
        for c in &self.cut {
            write!(
                f,
                "; cut {} bytes at {}+{} ({}{})",
                c.bytes,
                c.segment,
                c.offset,
                c.reason,
                if c.valid_after > 0 {
                    format!(", {} sound-looking records after it", c.valid_after)
                } else {
                    String::new()
                }
            )?;
            if c.below_committed {
                write!(f, ", below the committed watermark")?;
            } else if c.sealed {
                write!(f, ", in a segment its writer had left")?;
            }
            if let Some(p) = &c.saved_to {
                write!(f, ", saved to {}", p.display())?;
            }
        }
        for d in &self.damaged_segments {
            write!(f, "; damaged segment header: {d}")?;
        }
        Ok(())
    }
}

/// One torn tail that recovery cut.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CutTail {
    pub segment: String,
    pub offset: u64,
    pub bytes: u64,
    pub reason: String,
    /// Sound-looking records after the cut point (part of the same unsynced
    /// batch when pages reached the disk out of order; otherwise damage).
    pub valid_after: u64,
    /// Where the cut bytes were saved.
    pub saved_to: Option<PathBuf>,
    /// The cut starts below the committed watermark the last run left:
    /// those bytes had been synced (and their mail acknowledged), so this
    /// is damage, not a torn write.
    pub below_committed: bool,
    /// The cut is in a segment its writer had left for a newer one: there
    /// it is a batch whose write or sync failed (the writer logged `spool
    /// write failed`), or damage, which recovery cannot tell apart.
    pub sealed: bool,
}

/// Where one writer stream stands after recovery.
#[derive(Debug, Clone)]
pub(crate) struct StreamEnd {
    /// The last segment and the offset where its sound records end, when its
    /// header is sound (a writer continues appending there).
    pub last: Option<(SegmentInfo, u64, SegmentHeader)>,
    pub max_index: u64,
    pub next_seq: u64,
    /// Highest millisecond time in this stream's queue ids.
    pub last_id_ms: u64,
}

pub(crate) struct Recovered {
    pub report: RecoveryReport,
    pub streams: BTreeMap<u16, StreamEnd>,
    pub spool_bytes: u64,
}

/// Runs recovery over `dir` (the caller holds the lock).
pub(crate) fn recover(dir: &Path, storage: &dyn Storage) -> Result<Recovered, SpoolError> {
    let mut report = RecoveryReport::default();
    let mut streams: BTreeMap<u16, StreamEnd> = BTreeMap::new();
    let io = |what: String| move |e| SpoolError::io(what, e);

    // Half-made segments never held a record.
    let mut removed_any = false;
    for entry in std::fs::read_dir(dir).map_err(io(format!("read {}", dir.display())))? {
        let entry = entry.map_err(io(format!("read {}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(PREP_SUFFIX) {
            storage
                .remove(&entry.path())
                .map_err(io(format!("remove {}", entry.path().display())))?;
            report.removed_prep.push(name);
            removed_any = true;
        }
    }
    if removed_any {
        storage
            .sync_dir(dir)
            .map_err(io(format!("fsync {}", dir.display())))?;
    }

    let segments = reader::list_segments(dir).map_err(io(format!("list {}", dir.display())))?;
    // What the last run had synced, per writer (read before it is rewritten
    // below; unreadable or absent: nothing known).
    let mut committed: BTreeMap<u16, Option<Watermark>> = BTreeMap::new();
    let mut spool_bytes = 0;
    for info in segments {
        report.segments += 1;
        spool_bytes += info.len;
        let mut max_seq = None::<u64>;
        let mut max_ms = 0u64;
        let scan = reader::scan_segment(&info.path, |_, _, v| {
            max_seq = Some(max_seq.map_or(v.header.seq, |m: u64| m.max(v.header.seq)));
            max_ms = max_ms.max(queue_id_parts(v.header.queue_id).0);
        })
        .map_err(io(format!("read {}", info.path.display())))?;
        let stream = streams.entry(info.id.writer).or_insert(StreamEnd {
            last: None,
            max_index: 0,
            next_seq: 0,
            last_id_ms: 0,
        });
        stream.max_index = stream.max_index.max(info.id.index);
        if let Some(s) = max_seq {
            stream.next_seq = stream.next_seq.max(s + 1);
        }
        stream.last_id_ms = stream.last_id_ms.max(max_ms);
        let header = match &scan.header {
            Ok(h) => *h,
            Err(e) => {
                report
                    .damaged_segments
                    .push(format!("{}: {e}", info.id.file_name()));
                stream.last = None;
                continue;
            }
        };
        report.records += scan.records;
        report.record_bytes += scan.record_bytes;
        if let Some((offset, err)) = &scan.invalid {
            let bytes = scan.nonzero_end.saturating_sub(*offset);
            let was = *committed
                .entry(info.id.writer)
                .or_insert_with(|| watermark::read(dir, info.id.writer).ok().flatten());
            let at = Watermark {
                segment: info.id.index,
                offset: *offset,
            };
            let below_committed =
                was.is_some_and(|w| w.segment == at.segment && at.offset < w.offset);
            let saved_to = save_cut(dir, storage, &info, *offset, bytes, below_committed)?;
            zero_range(storage, &info.path, *offset, bytes)?;
            report.cut.push(CutTail {
                segment: info.id.file_name(),
                offset: *offset,
                bytes,
                reason: err.to_string(),
                valid_after: scan.valid_after_invalid,
                saved_to,
                below_committed,
                sealed: false,
            });
        }
        stream.last = Some((info.clone(), scan.end, header));
    }
    for c in &mut report.cut {
        c.sealed = !streams.values().any(|s| {
            s.last
                .as_ref()
                .is_some_and(|(info, _, _)| info.id.file_name() == c.segment)
        });
    }
    // What survived is what followers may read, up to each stream's end.
    // That end may lie past what the last run synced: a batch written but
    // not yet synced when the process died is still in the page cache (or
    // the disk's cache), reads back sound, and was never acknowledged. Sync
    // each stream's last segment (the only one a writer had unsynced bytes
    // in) before the watermark says so, or a power cut could take back
    // records a follower has already read past, and make a later start see
    // damage below the watermark where there was only a torn write.
    for stream in streams.values() {
        if let Some((info, _, _)) = &stream.last {
            storage
                .open(&info.path)
                .and_then(|mut f| f.sync_data())
                .map_err(io(format!("fdatasync {}", info.path.display())))?;
        }
    }
    for (writer, stream) in &streams {
        if let Some((info, end, _)) = &stream.last {
            let w = Watermark {
                segment: info.id.index,
                offset: *end,
            };
            WatermarkFile::open(dir, *writer)
                .and_then(|mut f| f.publish(w))
                .map_err(io(format!("write {}", watermark::file_name(*writer))))?;
        }
    }
    Ok(Recovered {
        report,
        streams,
        spool_bytes,
    })
}

/// What the name of a cut file ends with when the cut was damage (below the
/// committed watermark), so that `spool verify` keeps reporting it after
/// the restart that cut it.
pub const DAMAGE_SUFFIX: &str = "-damage.bin";

/// Copies `[offset, offset + len)` of a segment to `DIR/cut/`, synced;
/// named with [`DAMAGE_SUFFIX`] when it is `damage`.
fn save_cut(
    dir: &Path,
    storage: &dyn Storage,
    info: &SegmentInfo,
    offset: u64,
    len: u64,
    damage: bool,
) -> Result<Option<PathBuf>, SpoolError> {
    if len == 0 {
        return Ok(None);
    }
    let bytes = std::fs::read(&info.path).map_err(|e| SpoolError::io("read segment", e))?;
    let end = (offset + len).min(bytes.len() as u64) as usize;
    let cut_dir = dir.join("cut");
    if !cut_dir.exists() {
        std::fs::create_dir(&cut_dir)
            .map_err(|e| SpoolError::io(format!("mkdir {}", cut_dir.display()), e))?;
        storage
            .sync_dir(dir)
            .map_err(|e| SpoolError::io("fsync spool dir", e))?;
    }
    let stamp = super::segment::unix_ms(std::time::SystemTime::now());
    let end_name = if damage { DAMAGE_SUFFIX } else { ".bin" };
    let path = cut_dir.join(format!(
        "{}-{offset}-{stamp}{end_name}",
        info.id.file_name()
    ));
    let mut f = std::fs::File::create(&path)
        .map_err(|e| SpoolError::io(format!("create {}", path.display()), e))?;
    f.write_all(&bytes[offset as usize..end])
        .and_then(|_| f.sync_all())
        .map_err(|e| SpoolError::io(format!("write {}", path.display()), e))?;
    storage
        .sync_dir(&cut_dir)
        .map_err(|e| SpoolError::io("fsync cut dir", e))?;
    Ok(Some(path))
}

fn zero_range(storage: &dyn Storage, path: &Path, offset: u64, len: u64) -> Result<(), SpoolError> {
    if len == 0 {
        return Ok(());
    }
    let mut f = storage
        .open(path)
        .map_err(|e| SpoolError::io(format!("open {}", path.display()), e))?;
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)
            .map_err(|e| SpoolError::io(format!("zero torn tail of {}", path.display()), e))?;
        at += n as u64;
    }
    f.sync_data()
        .map_err(|e| SpoolError::io(format!("fdatasync {}", path.display()), e))?;
    Ok(())
}

/// The segment id following a stream's last one.
pub(crate) fn next_segment_id(writer: u16, end: Option<&StreamEnd>) -> SegmentId {
    SegmentId {
        writer,
        index: end.map_or(1, |s| s.max_index + 1),
    }
}
