//! Reading segments: listing them, scanning every record of one, and reading
//! one record at an offset (for `follow`). Used by recovery, the CLI and the
//! follower.
//!
//! Must not: write anything. Every record goes through [`record::parse`], so a
//! reader never hands out bytes whose checksum and lengths were not checked.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::record::{self, Parsed, RECORD_ALIGN, RECORD_MAGIC, RecordError, RecordHeader};
use super::segment::{SEGMENT_HEADER_LEN, SegmentHeader, SegmentHeaderError, SegmentId};
use crate::envelope::{Envelope, Message};

/// A segment file found in the spool directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub id: SegmentId,
    pub path: PathBuf,
    pub len: u64,
}

/// Segment files of `dir`, sorted by writer then index.
pub fn list_segments(dir: &Path) -> io::Result<Vec<SegmentInfo>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(SegmentId::parse_file_name) else {
            continue;
        };
        // Retention may remove a segment between the listing and this look.
        let len = match entry.metadata() {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        out.push(SegmentInfo {
            id,
            path: entry.path(),
            len,
        });
    }
    out.sort_by_key(|s| s.id);
    Ok(out)
}

/// A record read back from the spool, with where it lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub segment: SegmentId,
    pub offset: u64,
    /// Bytes the record takes in the segment, padding included.
    pub padded_len: u64,
    pub header: RecordHeader,
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

impl StoredRecord {
    pub fn received_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.header.received_at_us)
    }

    pub fn message(&self) -> Message {
        Message {
            envelope: self.envelope.clone(),
            body: self.body.clone(),
        }
    }
}

/// What a scan of one segment found.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    pub header: Result<SegmentHeader, SegmentHeaderError>,
    /// Sound records before the end (or before the first invalid record).
    pub records: u64,
    /// Their bytes, padding included.
    pub record_bytes: u64,
    /// Where the sound records end: the next record would go here.
    pub end: u64,
    /// The first invalid record, if the records did not end cleanly with
    /// zeros or the end of the file.
    pub invalid: Option<(u64, RecordError)>,
    /// Sound-looking records found after `invalid` (a torn write leaves
    /// none or a few from the same unsynced batch; many suggest damage).
    pub valid_after_invalid: u64,
    /// End of the last non-zero 8-byte word at or after `end` (equal to `end`
    /// when everything after it is zero).
    pub nonzero_end: u64,
}

/// Reads and checks every record of a segment, calling `each` for each sound
/// one in order, and stops at the first zero header or invalid record.
pub fn scan_segment(
    path: &Path,
    each: impl FnMut(u64, usize, &record::RecordView<'_>),
) -> io::Result<SegmentScan> {
    let bytes = std::fs::read(path)?;
    Ok(scan_bytes(&bytes, each))
}

/// [`scan_segment`] over a segment's bytes already in memory (the whole
/// file). Any bytes: it never panics, and everything it reports lies within
/// `bytes` (the `record` fuzz target checks both).
pub fn scan_bytes(
    bytes: &[u8],
    mut each: impl FnMut(u64, usize, &record::RecordView<'_>),
) -> SegmentScan {
    let header = SegmentHeader::parse(bytes);
    let mut scan = SegmentScan {
        header: header.clone(),
        records: 0,
        record_bytes: 0,
        end: SEGMENT_HEADER_LEN,
        invalid: None,
        valid_after_invalid: 0,
        nonzero_end: SEGMENT_HEADER_LEN,
    };
    // A damaged header is reported through `header`; the records after it
    // are still read (their sequence numbers and ids must not be reused).
    if bytes.len() < SEGMENT_HEADER_LEN as usize {
        scan.end = 0;
        scan.nonzero_end = bytes.len() as u64;
        return scan;
    }
    let mut at = SEGMENT_HEADER_LEN as usize;
    // Every loop turn advances `at` by at least 8 bytes: bounded by the file.
    while at < bytes.len() {
        match record::parse(&bytes[at..]) {
            Parsed::Record(v, len) => {
                each(at as u64, len, &v);
                scan.records += 1;
                scan.record_bytes += len as u64;
                at += len;
            }
            Parsed::End => break,
            Parsed::Invalid(e) => {
                scan.invalid = Some((at as u64, e));
                break;
            }
            Parsed::Short { needed } => {
                scan.invalid = Some((at as u64, RecordError::Length(needed as u64)));
                break;
            }
        }
    }
    at = at.min(bytes.len());
    scan.end = at as u64;
    if scan.invalid.is_some() {
        let mut probe = at + RECORD_ALIGN;
        while probe + 16 <= bytes.len() {
            if bytes[probe..probe + 4] == RECORD_MAGIC
                && let Parsed::Record(_, len) = record::parse(&bytes[probe..])
            {
                scan.valid_after_invalid += 1;
                probe += len;
                continue;
            }
            probe += RECORD_ALIGN;
        }
    }
    let tail = &bytes[at..];
    let last_nonzero = last_nonzero(tail);
    scan.nonzero_end = match last_nonzero {
        Some(p) => (at + (p / RECORD_ALIGN + 1) * RECORD_ALIGN).min(bytes.len()) as u64,
        None => at as u64,
    };
    scan
}

/// Index of the last non-zero byte. A segment is mostly zeros past its last
/// record: whole 64 KiB blocks are compared with a zero block (a `memcmp`),
/// and only the last block that differs is searched byte by byte.
fn last_nonzero(bytes: &[u8]) -> Option<usize> {
    const BLOCK: usize = 64 * 1024;
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    let mut end = bytes.len();
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &bytes[start..end];
        if block != &ZEROS[..block.len()] {
            return block.iter().rposition(|&b| b != 0).map(|p| start + p);
        }
        end = start;
    }
    None
}

/// True for the error of reading a segment that retention removed after it
/// was listed: callers skip it.
pub fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Every sound record of a segment, owned.
pub fn read_segment_records(info: &SegmentInfo) -> io::Result<(Vec<StoredRecord>, SegmentScan)> {
    let mut out = Vec::new();
    let scan = scan_segment(&info.path, |offset, len, v| {
        out.push(StoredRecord {
            segment: info.id,
            offset,
            padded_len: len as u64,
            header: v.header,
            envelope: v.envelope(),
            body: v.body.to_vec(),
        })
    })?;
    Ok((out, scan))
}

/// What is at an offset of a segment being appended to.
#[derive(Debug)]
pub enum ReadAt {
    Record(Box<StoredRecord>),
    /// Zeros: nothing written here (yet).
    End,
    /// Bytes that are not (or not yet) a sound record.
    Invalid(RecordError),
}

/// Reads the record at `offset` of an open segment file of `len` bytes.
pub fn read_record_at(file: &File, id: SegmentId, offset: u64, len: u64) -> io::Result<ReadAt> {
    if offset + 16 > len {
        return Ok(ReadAt::End);
    }
    let mut head = [0u8; record::RECORD_HEADER_LEN];
    let n = (len - offset).min(head.len() as u64) as usize;
    file.read_exact_at(&mut head[..n], offset)?;
    let needed = match record::parse(&head[..n]) {
        Parsed::End => return Ok(ReadAt::End),
        Parsed::Invalid(e) => return Ok(ReadAt::Invalid(e)),
        Parsed::Short { needed } => needed,
        Parsed::Record(..) => n,
    };
    if offset + needed as u64 > len {
        return Ok(ReadAt::Invalid(RecordError::Length(needed as u64)));
    }
    let mut buf = vec![0u8; needed];
    file.read_exact_at(&mut buf, offset)?;
    Ok(match record::parse(&buf) {
        Parsed::Record(v, padded) => ReadAt::Record(Box::new(StoredRecord {
            segment: id,
            offset,
            padded_len: padded as u64,
            header: v.header,
            envelope: v.envelope(),
            body: v.body.to_vec(),
        })),
        Parsed::End => ReadAt::End,
        Parsed::Invalid(e) => ReadAt::Invalid(e),
        Parsed::Short { needed } => ReadAt::Invalid(RecordError::Length(needed as u64)),
    })
}

/// Each segment with what its scan found.
pub type SegmentScans = Vec<(SegmentInfo, SegmentScan)>;

/// Every sound record of the spool in `dir`, segment by segment, with each
/// segment's scan (to report torn or damaged parts).
pub fn read_all(dir: &Path) -> io::Result<(Vec<StoredRecord>, SegmentScans)> {
    let mut records = Vec::new();
    let mut scans = Vec::new();
    for info in list_segments(dir)? {
        let (mut r, scan) = match read_segment_records(&info) {
            Ok(x) => x,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(e),
        };
        records.append(&mut r);
        scans.push((info, scan));
    }
    Ok((records, scans))
}

/// The record with queue id `id`, if the spool has it. The writer number in
/// the id narrows the search to that writer's segments.
pub fn find(dir: &Path, id: crate::envelope::QueueId) -> io::Result<Option<StoredRecord>> {
    let (_, writer, _) = super::queue_id_parts(id);
    for info in list_segments(dir)?
        .into_iter()
        .filter(|s| s.id.writer == writer)
    {
        let mut found = None;
        let scanned = scan_segment(&info.path, |offset, len, v| {
            if found.is_none() && v.header.queue_id == id {
                found = Some(StoredRecord {
                    segment: info.id,
                    offset,
                    padded_len: len as u64,
                    header: v.header,
                    envelope: v.envelope(),
                    body: v.body.to_vec(),
                });
            }
        });
        match scanned {
            Ok(_) => {}
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(e),
        }
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_nonzero_across_blocks() {
        let mut v = vec![0u8; 200_000];
        assert_eq!(last_nonzero(&v), None);
        assert_eq!(last_nonzero(&[]), None);
        for at in [0, 1, 65_535, 65_536, 131_071, 199_999] {
            v[at] = 7;
            assert_eq!(last_nonzero(&v), Some(at), "{at}");
        }
    }
}
