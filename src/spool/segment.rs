//! Segment files: naming, the 64-byte header, and creating a segment the way
//! that keeps every later `fdatasync` cheap.
//!
//! A segment is created under a temporary name (`.prep`), filled with zeros to
//! its full capacity (so every block is allocated and written: no unwritten
//! extents whose first write would be a metadata change), given its header,
//! `fsync`ed, renamed to its final name, and then the directory is `fsync`ed.
//! Only then may a record be written into it. Writes never grow the file.
//! The first part (prepare) is slow and runs ahead of need on a helper
//! thread; the second (install: rename, directory fsync) is quick.
//!
//! The zeros go past the page cache where the file system allows it, in
//! chunks of [`ZERO_CHUNK_BYTES`]. Through the page cache, the closing
//! `fsync` sent the whole segment to the disk at once, and the writers'
//! `fdatasync` calls waited behind it (25-38 ms on the 2-core VM, where 64
//! pipelined connections lost 13-21% of their throughput to it;
//! docs/BENCHMARKS.md, "Fifth session").
//!
//! Must not: write records (that is the writer's job) or read them (reader).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::fs::{AlignedBuf, DIRECT_ALIGN, Storage, StorageFile};

/// First eight bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"LMTPSPOL";
/// The segment format this code writes and reads.
pub const SEGMENT_VERSION: u16 = 1;
/// Size of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: u64 = 64;
/// File name suffix of a segment in use.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// File name suffix of a segment being prepared (removed by recovery).
pub const PREP_SUFFIX: &str = ".seg.prep";
/// Zero-fill chunk: one write of this many bytes at a time, so the disk's
/// queue never holds much of a segment ahead of a writer's sync (256 KiB
/// measured better at the tail than 1 and 4 MiB, and as well as 64 KiB).
pub const ZERO_CHUNK_BYTES: usize = 256 << 10;

/// Identifies a segment: the writer stream it belongs to and its index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub writer: u16,
    pub index: u64,
}

impl SegmentId {
    /// `w003-000000000017.seg`: writer and index in fixed-width decimal, so
    /// names sort in write order within a writer.
    pub fn file_name(self) -> String {
        format!("w{:03}-{:012}{SEGMENT_SUFFIX}", self.writer, self.index)
    }

    pub fn prep_name(self) -> String {
        format!("w{:03}-{:012}{PREP_SUFFIX}", self.writer, self.index)
    }

    /// Parses a segment file name (not a `.prep` one).
    pub fn parse_file_name(name: &str) -> Option<SegmentId> {
        let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
        let rest = stem.strip_prefix('w')?;
        let (w, i) = rest.split_once('-')?;
        if w.len() != 3 || i.len() != 12 {
            return None;
        }
        if !w.bytes().all(|b| b.is_ascii_digit()) || !i.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(SegmentId {
            writer: w.parse().ok()?,
            index: i.parse().ok()?,
        })
    }
}

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.file_name())
    }
}

/// The fields of a segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub id: SegmentId,
    /// File length, fixed at creation.
    pub capacity: u64,
    pub created_unix_ms: u64,
}

/// Why a segment header is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentHeaderError {
    #[error("not a spool segment (bad magic)")]
    Magic,
    #[error("segment format version {0}, this program reads version 1")]
    Version(u16),
    #[error("segment header checksum mismatch")]
    Checksum,
    #[error("segment header is shorter than 64 bytes")]
    Short,
}

impl SegmentHeader {
    /// Layout (little-endian): magic `LMTPSPOL` (8), version u16, writer u16,
    /// header_len u32 (64), index u64, capacity u64, created_unix_ms u64,
    /// 20 zero bytes, crc32c of bytes [0, 60) as u32.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
        h[0..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&self.id.writer.to_le_bytes());
        h[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.id.index.to_le_bytes());
        h[24..32].copy_from_slice(&self.capacity.to_le_bytes());
        h[32..40].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    pub fn parse(b: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
        if b.len() < SEGMENT_HEADER_LEN as usize {
            return Err(SegmentHeaderError::Short);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(SegmentHeaderError::Magic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != SEGMENT_VERSION {
            return Err(SegmentHeaderError::Version(version));
        }
        let stored = u32::from_le_bytes(b[60..64].try_into().expect("4"));
        if stored != crc32c::crc32c(&b[..60]) {
            return Err(SegmentHeaderError::Checksum);
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        Ok(SegmentHeader {
            id: SegmentId {
                writer: u16::from_le_bytes([b[10], b[11]]),
                index: u64_at(16),
            },
            capacity: u64_at(24),
            created_unix_ms: u64_at(32),
        })
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A segment open for appending.
pub struct OpenSegment {
    pub id: SegmentId,
    pub path: PathBuf,
    pub file: Box<dyn StorageFile>,
    pub capacity: u64,
    /// Where the next record goes.
    pub write_offset: u64,
}

impl OpenSegment {
    /// Bytes left for records.
    pub fn remaining(&self) -> u64 {
        self.capacity - self.write_offset
    }
}

/// A segment made ready and synced under its `.prep` name: complete, but not
/// yet visible to recovery, readers or followers.
pub struct PreparedSegment {
    pub id: SegmentId,
    pub capacity: u64,
    /// Its blocks were allocated, not zero-filled ([`SegmentFill::Allocate`]
    /// and a file system with `fallocate`).
    pub allocated: bool,
    prep: PathBuf,
    file: Box<dyn StorageFile>,
}

/// How a new segment's blocks are made ready before any record goes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentFill {
    /// Zeros written over the whole capacity: every block allocated *and
    /// written*, so a record's write later changes no metadata and its
    /// `fdatasync` flushes data only. Costs writing the capacity once more,
    /// ahead of need on a helper thread: free while the disk has bandwidth
    /// to spare, half of it when records alone could fill it.
    Zeros,
    /// `fallocate` only: the blocks are reserved (and read as zeros) but
    /// unwritten, so nothing is written ahead; each record's write then
    /// marks its blocks written, a metadata change its `fdatasync` writes
    /// too. Falls back to [`SegmentFill::Zeros`] where the file system has no
    /// `fallocate`.
    Allocate,
}

/// Steps 1-3 of making a segment: create `.prep`, make its blocks ready to
/// `capacity` (`fill`), write the header, `fsync`. With zeros it is slow (it
/// writes `capacity` bytes), so writers run it ahead of need on another
/// thread. `direct`: write the zeros past the page cache (`O_DIRECT`) where
/// the file system allows it (the configuration's `spool.direct_io`); else,
/// and for a last chunk that does not end on a block, through it. On error
/// the `.prep` file is removed (best effort).
pub fn prepare_segment(
    storage: &dyn Storage,
    dir: &Path,
    id: SegmentId,
    capacity: u64,
    direct: bool,
    fill: SegmentFill,
) -> io::Result<PreparedSegment> {
    assert!(capacity > SEGMENT_HEADER_LEN);
    let prep = dir.join(id.prep_name());
    let result = (|| {
        let mut file = storage.create(&prep)?;
        let allocated = match fill {
            SegmentFill::Allocate => match file.allocate(capacity) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::Unsupported => false,
                Err(e) => return Err(e),
            },
            SegmentFill::Zeros => false,
        };
        let mut zeros = AlignedBuf::new();
        zeros.get(ZERO_CHUNK_BYTES).fill(0);
        let mut direct = direct;
        let mut at = if allocated { capacity } else { 0 };
        while at < capacity {
            let n = (capacity - at).min(ZERO_CHUNK_BYTES as u64) as usize;
            let chunk = zeros.as_slice(n);
            if direct && n % DIRECT_ALIGN == 0 {
                match file.write_direct_at(chunk, at) {
                    Ok(()) => {
                        at += n as u64;
                        continue;
                    }
                    // This file system takes no direct writes: the page
                    // cache for the rest (the file's size is settled by
                    // the fsync below either way).
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => direct = false,
                    Err(e) => return Err(e),
                }
            }
            file.write_all_at(chunk, at)?;
            at += n as u64;
        }
        let header = SegmentHeader {
            id,
            capacity,
            created_unix_ms: unix_ms(SystemTime::now()),
        };
        file.write_all_at(&header.encode(), 0)?;
        // fsync, not fdatasync: the file size is metadata we rely on.
        file.sync_all()?;
        Ok((file, allocated))
    })();
    match result {
        Ok((file, allocated)) => Ok(PreparedSegment {
            id,
            capacity,
            allocated,
            prep,
            file,
        }),
        Err(e) => {
            let _ = storage.remove(&prep);
            Err(e)
        }
    }
}

/// Steps 4-5: rename to the final name and `fsync` the directory. Only after
/// this may a record be written into it.
pub fn install_segment(
    storage: &dyn Storage,
    dir: &Path,
    p: PreparedSegment,
) -> io::Result<OpenSegment> {
    let path = dir.join(p.id.file_name());
    let result = storage
        .rename(&p.prep, &path)
        .and_then(|_| storage.sync_dir(dir));
    if let Err(e) = result {
        // Whichever name it has now, it holds no record: remove it.
        let _ = storage.remove(&p.prep);
        let _ = storage.remove(&path);
        return Err(e);
    }
    Ok(OpenSegment {
        id: p.id,
        path,
        file: p.file,
        capacity: p.capacity,
        write_offset: SEGMENT_HEADER_LEN,
    })
}

/// Removes a prepared segment that will not be used.
pub fn discard_segment(storage: &dyn Storage, p: PreparedSegment) {
    let _ = storage.remove(&p.prep);
}

/// Creates segment `id` of `capacity` bytes in `dir`, its blocks made ready
/// (`fill`) and synced, with its directory entry synced ([`prepare_segment`]
/// then [`install_segment`]). On any error nothing under the final name
/// exists.
pub fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    id: SegmentId,
    capacity: u64,
    direct: bool,
    fill: SegmentFill,
) -> io::Result<OpenSegment> {
    let p = prepare_segment(storage, dir, id, capacity, direct, fill)?;
    install_segment(storage, dir, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::fs::RealStorage;

    #[test]
    fn names_round_trip_and_sort() {
        let a = SegmentId {
            writer: 3,
            index: 17,
        };
        assert_eq!(a.file_name(), "w003-000000000017.seg");
        assert_eq!(SegmentId::parse_file_name(&a.file_name()), Some(a));
        assert_eq!(SegmentId::parse_file_name(&a.prep_name()), None);
        assert_eq!(SegmentId::parse_file_name("w3-1.seg"), None);
        let b = SegmentId {
            writer: 3,
            index: 100,
        };
        assert!(a.file_name() < b.file_name());
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = SegmentHeader {
            id: SegmentId {
                writer: 1,
                index: 2,
            },
            capacity: 1 << 20,
            created_unix_ms: 1_700_000_000_000,
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::parse(&b), Ok(h));
        b[20] ^= 1;
        assert_eq!(SegmentHeader::parse(&b), Err(SegmentHeaderError::Checksum));
    }

    #[test]
    fn segments_are_zeroed_full_size_direct_or_not_at_any_size() {
        let chunk = ZERO_CHUNK_BYTES as u64;
        for fill in [SegmentFill::Zeros, SegmentFill::Allocate] {
            for direct in [true, false] {
                // Below one chunk and not on a block; whole chunks; chunks, a
                // block and a tail that is not one.
                for capacity in [100_000, 3 * chunk, 2 * chunk + 4096 + 100] {
                    let dir = tempfile::tempdir().unwrap();
                    let id = SegmentId {
                        writer: 0,
                        index: 7,
                    };
                    let seg = create_segment(&RealStorage, dir.path(), id, capacity, direct, fill)
                        .unwrap();
                    drop(seg);
                    let bytes = std::fs::read(dir.path().join(id.file_name())).unwrap();
                    assert_eq!(bytes.len() as u64, capacity, "{fill:?} direct {direct}");
                    assert_eq!(SegmentHeader::parse(&bytes).unwrap().capacity, capacity);
                    assert!(
                        bytes[SEGMENT_HEADER_LEN as usize..].iter().all(|&b| b == 0),
                        "{fill:?} direct {direct}, capacity {capacity}"
                    );
                }
            }
        }
    }

    /// Blocks of the file that hold data (not holes), from `stat`.
    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn allocated_segments_reserve_their_blocks_without_writing_zeros() {
        // On the real disk (tmpfs may not count fallocated blocks the same).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let dir = tempfile::tempdir_in(root).unwrap();
        let id = SegmentId {
            writer: 0,
            index: 1,
        };
        let capacity = 8 << 20;
        let seg = create_segment(
            &RealStorage,
            dir.path(),
            id,
            capacity,
            true,
            SegmentFill::Allocate,
        )
        .unwrap();
        drop(seg);
        let path = dir.path().join(id.file_name());
        // The space is reserved (ENOSPC comes at preparation, not at a
        // record's write), whichever way the file system did it.
        assert!(
            allocated_bytes(&path) >= capacity,
            "{}",
            allocated_bytes(&path)
        );
    }

    /// Prepares a segment through `s` (whose refusals the caller set) and
    /// checks that it is all durable, reads as zeros past the header, and
    /// that discarding it removes the `.prep` file.
    fn prepared_segment_is_durable_zeros(
        s: &crate::spool::fs::FaultyStorage,
        fill: SegmentFill,
        what: &str,
    ) {
        let capacity = 2 * ZERO_CHUNK_BYTES as u64 + 12_345;
        let dir = tempfile::tempdir().unwrap();
        let id = SegmentId {
            writer: 1,
            index: 2,
        };
        let p = prepare_segment(s, dir.path(), id, capacity, true, fill).unwrap();
        let prep = dir.path().join(id.prep_name());
        assert!(s.is_durable(&prep, 0, capacity), "{what}");
        let bytes = std::fs::read(&prep).unwrap();
        assert_eq!(bytes.len() as u64, capacity, "{what}");
        assert!(
            bytes[SEGMENT_HEADER_LEN as usize..].iter().all(|&b| b == 0),
            "{what}"
        );
        discard_segment(s, p);
        assert!(!prep.exists(), "{what}");
    }

    #[test]
    fn without_fallocate_allocate_falls_back_to_durable_zeros() {
        for refuse in [false, true] {
            let s = crate::spool::fs::FaultyStorage::new();
            s.refuse_allocate(refuse);
            let what = format!("fallocate refused: {refuse}");
            prepared_segment_is_durable_zeros(&s, SegmentFill::Allocate, &what);
        }
    }

    #[test]
    fn a_full_disk_at_allocation_leaves_no_prep_file() {
        use crate::spool::fs::{FaultOp, FaultyStorage};
        let dir = tempfile::tempdir().unwrap();
        let s = FaultyStorage::new();
        s.fail(FaultOp::Write, libc::ENOSPC, 1);
        let id = SegmentId {
            writer: 0,
            index: 4,
        };
        let r = prepare_segment(&s, dir.path(), id, 1 << 20, true, SegmentFill::Allocate);
        assert_eq!(r.err().and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn prepared_zeros_are_durable_with_or_without_direct_io() {
        for refuse in [false, true] {
            let s = crate::spool::fs::FaultyStorage::new();
            s.refuse_direct_io(refuse);
            let what = format!("O_DIRECT refused: {refuse}");
            prepared_segment_is_durable_zeros(&s, SegmentFill::Zeros, &what);
        }
    }

    #[test]
    fn a_failed_zero_fill_leaves_no_prep_file() {
        use crate::spool::fs::{FaultOp, FaultyStorage};
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let s = FaultyStorage::new();
            s.fail(FaultOp::Write, libc::EIO, 1);
            let id = SegmentId {
                writer: 0,
                index: 3,
            };
            let r = prepare_segment(&s, dir.path(), id, 1 << 20, direct, SegmentFill::Zeros);
            assert_eq!(r.err().and_then(|e| e.raw_os_error()), Some(libc::EIO));
            assert!(!dir.path().join(id.prep_name()).exists());
        }
    }

    #[test]
    fn created_segment_is_zeroed_full_size_with_header() {
        let dir = tempfile::tempdir().unwrap();
        let id = SegmentId {
            writer: 0,
            index: 1,
        };
        let seg = create_segment(
            &RealStorage,
            dir.path(),
            id,
            100_000,
            true,
            SegmentFill::Zeros,
        )
        .unwrap();
        assert_eq!(seg.write_offset, SEGMENT_HEADER_LEN);
        let bytes = std::fs::read(dir.path().join(id.file_name())).unwrap();
        assert_eq!(bytes.len(), 100_000);
        assert_eq!(SegmentHeader::parse(&bytes).unwrap().id, id);
        assert!(bytes[64..].iter().all(|&b| b == 0));
        assert!(!dir.path().join(id.prep_name()).exists());
    }
}
