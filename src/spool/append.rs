//! Appending a batch's records to a segment, past the page cache.
//!
//! Why: a buffered `pwrite` copies every record into the page cache and the
//! `fdatasync` then has ext4 find, map and write back those pages, with a
//! writeback completion per page on some CPU; with `O_DIRECT` the records
//! go from our buffer to the device and the sync only flushes the device's
//! cache. Measured on the 2-core VM (docs/BENCHMARKS.md), about a third less
//! CPU per write-and-sync and a shorter sync.
//!
//! How: direct writes must start and end on [`DIRECT_ALIGN`] boundaries, and
//! a batch rarely ends on one. So the appender keeps the bytes of the
//! partial block before the segment's write offset (the *tail*: records
//! already committed, or the header), and each append writes tail + new
//! records + zeros up to the next boundary, from one aligned buffer: [`Appender::begin`]
//! puts the tail first, the writer encodes its records behind it (stage.rs),
//! [`Appender::finish`] pads and writes.
//! Rewriting the tail with the same bytes is safe: a torn write leaves each
//! of its bytes old or new, and old and new are equal there; the zeros past
//! the records are what the zero-filled segment already holds, so readers and
//! recovery still find the end of data where the records end. (PostgreSQL
//! rewrites its WAL's partial last page the same way.) Page-cache writeback
//! writes whole 4 KiB pages, so this writes no more than the buffered path.
//!
//! Falls back to the buffered `pwrite` when the file system refuses
//! `O_DIRECT` (from then on), when direct I/O is off in the configuration,
//! and for an append whose padding would pass the segment's end (files
//! never grow).
//!
//! Must not: write anything but zeros past the new end of data, change a
//! committed byte, or report a write as done before it returned.

use std::io;

use super::fs::DIRECT_ALIGN;
use super::segment::{OpenSegment, SegmentId};
use super::stage::{RecordOut, StageBuf};

/// Writes records at the end of segments, directly where it can.
pub(crate) struct Appender {
    direct: bool,
    /// The partial block before the write offset of the segment last
    /// appended to: (segment, offset of the block, its bytes up to the
    /// write offset). `None`: read it back from the file first.
    tail: Option<(SegmentId, u64, Vec<u8>)>,
}

impl Appender {
    /// `direct`: try `O_DIRECT` writes (the configuration's
    /// `spool.direct_io`).
    pub(crate) fn new(direct: bool) -> Appender {
        Appender { direct, tail: None }
    }

    /// Whether appends still go past the page cache.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// Starts an append to `seg` in `buf`: clears it and, for a direct
    /// write, puts the bytes of the partial block before the write offset
    /// first. Returns how many bytes that is (the *lead*); the caller puts
    /// the records after them and calls [`Appender::finish`].
    pub(crate) fn begin(&mut self, seg: &mut OpenSegment, buf: &mut StageBuf) -> io::Result<usize> {
        buf.clear();
        if !self.direct {
            return Ok(0);
        }
        let at = seg.write_offset;
        let align = DIRECT_ALIGN as u64;
        let block = at - at % align;
        let head = (at - block) as usize;
        buf.set_len_zeroed(head);
        match &self.tail {
            Some((id, off, bytes)) if *id == seg.id && *off == block && bytes.len() == head => {
                buf.copy_from_slice(bytes);
            }
            _ => {
                if let Err(e) = seg.file.read_exact_at(buf, block) {
                    self.tail = None;
                    buf.clear();
                    return Err(e);
                }
            }
        }
        Ok(head)
    }

    /// Writes `buf[lead..]` (after [`Appender::begin`] for the same segment
    /// and offset) at `seg.write_offset` and moves the offset past it. The
    /// offset moves before the write, so that after an error it covers
    /// everything the failed write may have touched. Durable only after the
    /// segment's `sync_data`. A direct write pads `buf` with zeros to the
    /// next block and writes all of it from the block before the offset.
    pub(crate) fn finish(
        &mut self,
        seg: &mut OpenSegment,
        buf: &mut StageBuf,
        lead: usize,
    ) -> io::Result<()> {
        let len = buf.len() - lead;
        if len == 0 {
            return Ok(());
        }
        let at = seg.write_offset;
        let end = at + len as u64;
        assert!(end <= seg.capacity, "a write must not grow the segment");
        seg.write_offset = end;
        let align = DIRECT_ALIGN as u64;
        let block = at - at % align;
        let padded_end = end.div_ceil(align) * align;
        if !self.direct || padded_end > seg.capacity {
            self.tail = None;
            return seg.file.write_all_at(&buf[lead..], at);
        }
        assert_eq!(
            lead as u64,
            at - block,
            "begin() was called for this offset"
        );
        // The records, then zeros to the block boundary.
        buf.set_len_zeroed((padded_end - block) as usize);
        // The next tail, taken before the write so nothing is kept from a
        // failed one (it is dropped below).
        let next_block = end - end % align;
        let next = buf[(next_block - block) as usize..(end - block) as usize].to_vec();
        match seg.file.write_direct_at(buf, block) {
            Ok(()) => {
                self.tail = Some((seg.id, next_block, next));
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                tracing::info!(
                    "spool: the file system refused a direct write ({e}); writing through the page cache from now on"
                );
                self.direct = false;
                self.tail = None;
                seg.file.write_all_at(&buf[lead..lead + len], at)
            }
            Err(e) => {
                self.tail = None;
                Err(e)
            }
        }
    }

    /// Writes `data` at `seg.write_offset` and moves the offset past it
    /// ([`Appender::begin`] and [`Appender::finish`] with a copy of `data`).
    #[cfg(test)]
    pub(crate) fn append(&mut self, seg: &mut OpenSegment, data: &[u8]) -> io::Result<()> {
        let mut buf = StageBuf::new();
        let lead = self.begin(seg, &mut buf)?;
        buf.put(data);
        self.finish(seg, &mut buf, lead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::fs::{FaultOp, FaultyStorage, RealStorage, Storage};
    use crate::spool::segment::{SEGMENT_HEADER_LEN, SegmentFill, create_segment};

    fn id(index: u64) -> SegmentId {
        SegmentId { writer: 0, index }
    }

    /// Bytes `seed, seed+1, ...` (never all zero), `n` long.
    fn data(seed: u8, n: usize) -> Vec<u8> {
        (0..n).map(|i| seed.wrapping_add(i as u8) | 1).collect()
    }

    fn appends_match_the_file(storage: &dyn Storage, direct: bool, capacity: u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = create_segment(
            storage,
            dir.path(),
            id(1),
            capacity,
            true,
            SegmentFill::Zeros,
        )
        .unwrap();
        let header = std::fs::read(&seg.path).unwrap()[..64].to_vec();
        let mut a = Appender::new(direct);
        let mut expect = header.clone();
        // Sizes that end on, before and after block boundaries, and span
        // several blocks.
        let sizes = [1, 4031, 1, 4096, 8192, 3, 12_000, 4095, 4097, 50_000, 7];
        let mut seed = 0u8;
        for n in sizes {
            if seg.write_offset + n as u64 > capacity {
                break;
            }
            seed = seed.wrapping_add(37);
            let d = data(seed, n);
            a.append(&mut seg, &d).unwrap();
            expect.extend_from_slice(&d);
            assert_eq!(seg.write_offset, expect.len() as u64);
            let file = std::fs::read(&seg.path).unwrap();
            assert_eq!(file.len() as u64, capacity, "the file never grows");
            assert_eq!(&file[..expect.len()], &expect[..], "after {n} bytes");
            assert!(file[expect.len()..].iter().all(|&b| b == 0));
        }
        seg.file.sync_data().unwrap();
        assert_eq!(a.is_direct(), direct);
    }

    #[test]
    fn direct_appends_keep_every_byte_and_only_zeros_after() {
        appends_match_the_file(&RealStorage, true, 1 << 20);
    }

    #[test]
    fn buffered_appends_do_the_same() {
        appends_match_the_file(&RealStorage, false, 1 << 20);
    }

    #[test]
    fn a_segment_whose_end_is_not_on_a_block_boundary_takes_its_last_records_buffered() {
        // 100,000 is not a multiple of 4096: the last appends cannot pad.
        let dir = tempfile::tempdir().unwrap();
        let cap = 100_000u64;
        let mut seg = create_segment(
            &RealStorage,
            dir.path(),
            id(2),
            cap,
            true,
            SegmentFill::Zeros,
        )
        .unwrap();
        let mut a = Appender::new(true);
        let first = data(5, 90_000);
        a.append(&mut seg, &first).unwrap();
        let last = data(9, (cap - SEGMENT_HEADER_LEN) as usize - first.len());
        a.append(&mut seg, &last).unwrap();
        assert_eq!(seg.write_offset, cap);
        let file = std::fs::read(&seg.path).unwrap();
        assert_eq!(file.len() as u64, cap);
        assert_eq!(&file[64..64 + first.len()], &first[..]);
        assert_eq!(&file[64 + first.len()..], &last[..]);
        assert!(
            a.is_direct(),
            "one buffered append does not turn direct off"
        );
    }

    #[test]
    fn a_new_appender_reads_the_tail_back_from_the_segment() {
        // As after a restart: the partial block's bytes come from the file.
        let dir = tempfile::tempdir().unwrap();
        let mut seg = create_segment(
            &RealStorage,
            dir.path(),
            id(3),
            1 << 20,
            true,
            SegmentFill::Zeros,
        )
        .unwrap();
        let one = data(1, 5000);
        Appender::new(true).append(&mut seg, &one).unwrap();
        let two = data(2, 300);
        Appender::new(true).append(&mut seg, &two).unwrap();
        let file = std::fs::read(&seg.path).unwrap();
        assert_eq!(&file[64..5064], &one[..]);
        assert_eq!(&file[5064..5364], &two[..]);
        assert!(file[5364..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_file_system_without_direct_io_gets_buffered_writes() {
        let s = FaultyStorage::new();
        s.refuse_direct_io(true);
        let dir = tempfile::tempdir().unwrap();
        let mut seg =
            create_segment(&s, dir.path(), id(4), 1 << 20, true, SegmentFill::Zeros).unwrap();
        let mut a = Appender::new(true);
        let d = data(3, 10_000);
        a.append(&mut seg, &d).unwrap();
        assert!(!a.is_direct(), "refused once, buffered from then on");
        s.refuse_direct_io(false);
        a.append(&mut seg, &d).unwrap();
        seg.file.sync_data().unwrap();
        let file = std::fs::read(&seg.path).unwrap();
        assert_eq!(&file[64..10_064], &d[..]);
        assert_eq!(&file[10_064..20_064], &d[..]);
        assert!(s.is_durable(&seg.path, 64, 20_000));
    }

    /// A 1 MiB segment on fault-injecting storage, and a direct appender.
    fn faulty_segment(index: u64) -> (FaultyStorage, tempfile::TempDir, OpenSegment, Appender) {
        let s = FaultyStorage::new();
        let dir = tempfile::tempdir().unwrap();
        let seg =
            create_segment(&s, dir.path(), id(index), 1 << 20, true, SegmentFill::Zeros).unwrap();
        (s, dir, seg, Appender::new(true))
    }

    #[test]
    fn a_failed_direct_write_is_an_error_and_the_next_append_rereads_the_tail() {
        let (s, _dir, mut seg, mut a) = faulty_segment(5);
        a.append(&mut seg, &data(1, 100)).unwrap();
        s.fail(FaultOp::Write, libc::EIO, 1);
        let e = a.append(&mut seg, &data(2, 100)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(seg.write_offset, 264, "the offset covers the failed write");
        // Direct writes are still on: only Unsupported turns them off.
        assert!(a.is_direct());
        assert!(a.tail.is_none());
        let d = data(3, 100);
        a.append(&mut seg, &d).unwrap();
        let file = std::fs::read(&seg.path).unwrap();
        assert_eq!(&file[264..364], &d[..]);
    }

    #[test]
    fn direct_writes_are_durable_only_after_the_sync_in_the_model() {
        let (s, _dir, mut seg, mut a) = faulty_segment(6);
        a.append(&mut seg, &data(1, 9000)).unwrap();
        assert!(!s.is_durable(&seg.path, 64, 9000));
        seg.file.sync_data().unwrap();
        assert!(s.is_durable(&seg.path, 64, 9000));
    }
}
