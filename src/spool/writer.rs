//! A writer thread: group commit for one segment stream.
//!
//! Loop: block for the first message; take every message already waiting (up
//! to `batch_messages_max` / `batch_bytes_max`); on a disk with slow syncs,
//! wait briefly for the clients the last commit answered (`regroup.rs`); if
//! messages are arriving concurrently, wait up to `batch_delay_us_max` for
//! more (a fixed window, off by default, which replaces regrouping); encode the batch
//! into one buffer (each record checked as it is encoded); write it with one
//! `pwrite` into the preallocated segment, past the page cache where the file
//! system allows (`append`); ONE `fdatasync`; then queue an
//! outcome for every message and wake each producer once.
//!
//! Failure rules: any write or sync error fails every message of the batch
//! (never a success) and the writer abandons the segment (after a failed
//! fsync the page cache may claim data the disk does not have, so retrying on
//! the same file proves nothing); the next batch starts a fresh segment.
//! ENOSPC, EDQUOT or the spool size cap answer `StorageFull` and make the
//! writer refuse work, without I/O, until `maintenance_interval` has passed;
//! then the next batch tries again.
//!
//! Must not: report `Committed` before the sync returned, block on a producer,
//! or write past a segment's capacity (files never grow on the hot path).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, TryRecvError};

use super::append::Appender;
use super::lock;
use super::record;
use super::recover::{self, StreamEnd};
use super::regroup::Regroup;
use super::segment::{
    self, OpenSegment, PreparedSegment, SEGMENT_HEADER_LEN, SegmentFill, SegmentId,
};
use super::stage::{RecordOut, StageBuf};
use super::stats::WriterStats;
use super::watermark::{Watermark, WatermarkFile};
use super::{FillPolicy, Job, Shared, SpoolError, WriterMsg, queue_id_from_parts};
use crate::envelope::CommitOutcome;

/// Why a batch failed as a whole, and the cause in words for the log.
enum Fail {
    /// No space (disk or size cap): `StorageFull`.
    Full(String),
    /// Any other I/O error: `Failed`.
    Io(String),
}

/// `what` failed with `e`: a full disk or quota, or another I/O error.
fn classify(what: &str, e: &io::Error) -> Fail {
    let cause = format!("{what}: {e}");
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Fail::Full(cause),
        _ => Fail::Io(cause),
    }
}

/// The default of `spool.allocate_from_batch_bytes`: batches averaging this
/// many bytes or more make the next segment by allocation, not zero-filling
/// (`FillPolicy::Auto`). Measured with `fio` on
/// this project's disk (docs/BENCHMARKS.md, "Ninth session"): a write plus
/// `fdatasync` into unwritten blocks costs more than into zeroed ones (4 KiB:
/// 5,527 against 8,118 a second; 1 MiB: 1,344 against 1,778 MB/s), but the
/// zero-fill writes every byte once more; counting that, allocation wins
/// from writes of about 256 KiB (879 against 724 MB/s) and by 35% at 512 KiB
/// without a journal, from about 200 KiB on XFS, and from between 256 KiB
/// and 1 MiB on ext4 with its journal (where each sync then also commits
/// it).
pub(crate) const ALLOCATE_FROM_BATCH_BYTES: u64 = 512 << 10;

/// `mean` moved an eighth of the way to `x`.
fn ewma8(mean: u64, x: u64) -> u64 {
    mean - mean / 8 + x / 8
}

/// How to make the next segment under `policy`, given the mean batch and
/// the line from which `Auto` allocates.
fn fill_for(policy: FillPolicy, batch_bytes_mean: u64, allocate_from: u64) -> SegmentFill {
    match policy {
        FillPolicy::Zeros => SegmentFill::Zeros,
        FillPolicy::Allocate => SegmentFill::Allocate,
        FillPolicy::Auto if batch_bytes_mean >= allocate_from => SegmentFill::Allocate,
        FillPolicy::Auto => SegmentFill::Zeros,
    }
}

/// At most one log line per this interval for repeated write failures (a
/// dying disk fails every batch), with a count of those not logged.
const IO_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets one event through per interval and counts those held back.
#[derive(Debug, Default)]
struct LogLimit {
    last: Option<Instant>,
    held: u64,
}

impl LogLimit {
    /// `Some(held back since the last one let through)` when an event at
    /// `now` may be logged, else `None` (and it is counted).
    fn due(&mut self, now: Instant, every: Duration) -> Option<u64> {
        if self.last.is_some_and(|at| now.duration_since(at) < every) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

pub(crate) struct Writer {
    id: u16,
    shared: Arc<Shared>,
    stats: Arc<WriterStats>,
    rx: Receiver<WriterMsg>,
    segment: Option<OpenSegment>,
    next_index: u64,
    next_seq: u64,
    last_ms: u64,
    /// Set while refusing work for lack of space: when to look again.
    full_retry_at: Option<Instant>,
    /// The lack of space has been logged and its end not yet.
    full_logged: bool,
    /// Write failures logged, at most one line per [`IO_ERROR_LOG_EVERY`].
    io_error_log: LogLimit,
    buf: StageBuf,
    /// Writes `buf` into segments (directly where the file system allows).
    appender: Appender,
    /// Exponentially weighted mean gap between submissions, nanoseconds.
    gap_ewma_ns: u64,
    last_submitted: Option<Instant>,
    /// Messages found waiting when the previous batch was gathered.
    previous_batch_len: usize,
    /// Whether to wait for the clients the last commit answered.
    regroup: Regroup,
    /// Time in `fdatasync` during the last commit.
    last_sync: Duration,
    /// Messages queued when the last commit ended, before its outcomes.
    queued_after_commit: usize,
    /// Exponentially weighted mean of body bytes per batch (1/8 weight):
    /// how the next segment is made (`FillPolicy::Auto`).
    batch_bytes_ewma: u64,
    watermark: Option<WatermarkFile>,
    /// The next segment, being prepared on a helper thread (its capacity).
    spare: Option<(u64, JoinHandle<io::Result<PreparedSegment>>)>,
}

impl Writer {
    pub(crate) fn new(
        id: u16,
        shared: Arc<Shared>,
        rx: Receiver<WriterMsg>,
        end: Option<StreamEnd>,
    ) -> Result<Writer, SpoolError> {
        let next = recover::next_segment_id(id, end.as_ref());
        let mut segment = None;
        if let Some((info, offset, header)) = end.as_ref().and_then(|e| e.last.clone()) {
            let capacity = header.capacity.min(info.len);
            if offset + SEGMENT_HEADER_LEN < capacity {
                let file = shared.config.storage.open(&info.path).map_err(|e| {
                    SpoolError::io(format!("open {} for appending", info.path.display()), e)
                })?;
                segment = Some(OpenSegment {
                    id: info.id,
                    path: info.path.clone(),
                    file,
                    capacity,
                    write_offset: offset,
                });
            }
        }
        // Recovery has already published the stream's recovered end.
        let watermark = WatermarkFile::open(&shared.config.dir, id)
            .map_err(|e| SpoolError::io("open the committed watermark file", e))?;
        let direct_io = shared.config.direct_io;
        let regroup =
            Regroup::new(shared.config.batch_regroup && shared.config.batch_delay_us_max == 0);
        Ok(Writer {
            id,
            stats: shared.stats[id as usize].clone(),
            shared,
            rx,
            segment,
            next_index: next.index,
            next_seq: end.as_ref().map_or(0, |e| e.next_seq),
            last_ms: end.as_ref().map_or(0, |e| e.last_id_ms),
            full_retry_at: None,
            full_logged: false,
            io_error_log: LogLimit::default(),
            batch_bytes_ewma: 0,
            buf: StageBuf::new(),
            appender: Appender::new(direct_io),
            gap_ewma_ns: u64::MAX / 2,
            last_submitted: None,
            previous_batch_len: 0,
            regroup,
            last_sync: Duration::ZERO,
            queued_after_commit: 0,
            watermark: Some(watermark),
            spare: None,
        })
    }

    /// Opens a segment before the first batch, so the first message after a
    /// start does not wait while a segment is zero-filled and synced (about
    /// 0.25 s for 64 MiB here). Called by `Spool::open`, before the server
    /// accepts anyone. A failure is not fatal: the first batch tries again
    /// and answers with the failure's outcome.
    pub(crate) fn open_first_segment(&mut self) {
        if self.segment.is_none()
            && let Ok(seg) = self.new_segment(0)
        {
            self.segment = Some(seg);
        }
        self.prepare_spare();
    }

    fn note_arrival(&mut self, job: &Job) {
        if let Some(prev) = self.last_submitted {
            let gap = job.submitted_at.saturating_duration_since(prev).as_nanos() as u64;
            let ewma = self.gap_ewma_ns.min(u64::MAX / 2);
            self.gap_ewma_ns = ewma8(ewma, gap);
        }
        self.last_submitted = Some(job.submitted_at);
    }

    pub(crate) fn run(mut self) {
        // A panic here is a broken invariant (a record that does not read
        // back, say). Its batch's producers would wait forever for outcomes,
        // so stop the whole process instead: the MTAs retry, recovery runs.
        struct AbortOnPanic;
        impl Drop for AbortOnPanic {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    eprintln!("lmtp-ingest: spool writer hit a broken invariant; aborting");
                    std::process::abort();
                }
            }
        }
        let _guard = AbortOnPanic;
        let cfg = self.shared.config.clone();
        let mut batch: Vec<Job> = Vec::with_capacity(cfg.batch_messages_max.min(4096));
        let mut stopping = false;
        let shared = self.shared.clone();
        let bell = &shared.doorbells[self.id as usize];
        bell.register();
        while !stopping {
            // Parks at once when nothing is queued (see `doorbell`).
            let first = bell.wait(|| match self.rx.try_recv() {
                Ok(m) => Some(Some(m)),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(None),
            });
            let first = match first {
                Some(WriterMsg::Job(j)) => j,
                Some(WriterMsg::Stop) | None => break,
            };
            self.note_arrival(&first);
            let mut bytes = first.message.body.len();
            batch.push(first);
            // Take everything already waiting, within the caps.
            stopping = self.take_more(&mut batch, &mut bytes, cfg.batch_messages_max, None);
            // Slow commits: wait for the clients the last commit answered.
            if !stopping
                && let Some((wait, target)) = self.regroup.plan(batch.len(), cfg.batch_messages_max)
            {
                let deadline = Instant::now() + wait;
                stopping = self.take_more(&mut batch, &mut bytes, target, Some(deadline));
                let hit = batch.len() >= target;
                self.regroup.record(hit);
                let counter = if hit {
                    &self.stats.regroup_waits_hit
                } else {
                    &self.stats.regroup_waits_missed
                };
                self.stats.add(counter, 1);
            }
            // Adaptive delay: only when others are submitting concurrently
            // (the previous batch found more than one message waiting) and
            // the next message is expected within the window.
            let delay = Duration::from_micros(cfg.batch_delay_us_max);
            let concurrent = self.previous_batch_len > 1 || batch.len() > 1;
            if !stopping
                && !delay.is_zero()
                && concurrent
                && (self.gap_ewma_ns as u128) < delay.as_nanos()
            {
                let deadline = Instant::now() + delay;
                stopping = self.take_more(
                    &mut batch,
                    &mut bytes,
                    cfg.batch_messages_max,
                    Some(deadline),
                );
            }
            self.previous_batch_len = batch.len();
            let started = Instant::now();
            self.commit(&mut batch);
            self.regroup.committed(
                started.elapsed(),
                std::mem::take(&mut self.last_sync),
                self.previous_batch_len,
                self.queued_after_commit,
            );
            // One huge message must not pin its buffer for the writer's life.
            let keep = 2 * cfg.batch_bytes_max.max(1 << 20);
            if self.buf.capacity() > keep {
                self.buf = StageBuf::new();
            }
        }
        // A spare that will not be used: leave no `.prep` file behind.
        if let Some(p) = self.take_spare() {
            self.unreserve(p.capacity);
            segment::discard_segment(self.shared.config.storage.as_ref(), p);
        }
    }

    /// Moves queued messages into `batch` (their bodies counted in `bytes`)
    /// until it holds `up_to` messages or `batch_bytes_max` bytes, or the
    /// queue is empty (without `deadline`) or stays empty until `deadline`.
    /// True when a `Stop` came: the caller commits what it has and ends.
    fn take_more(
        &mut self,
        batch: &mut Vec<Job>,
        bytes: &mut usize,
        up_to: usize,
        deadline: Option<Instant>,
    ) -> bool {
        let bytes_max = self.shared.config.batch_bytes_max;
        while batch.len() < up_to && *bytes < bytes_max {
            let next = match deadline {
                None => self.rx.try_recv().ok(),
                Some(d) => self.rx.recv_deadline(d).ok(),
            };
            match next {
                Some(WriterMsg::Job(j)) => {
                    self.note_arrival(&j);
                    *bytes += j.message.body.len();
                    batch.push(j);
                }
                Some(WriterMsg::Stop) => return true,
                None => return false,
            }
        }
        false
    }

    /// Writes and syncs `batch`, then delivers every outcome.
    fn commit(&mut self, batch: &mut Vec<Job>) {
        let mut outcomes: Vec<Option<CommitOutcome>> = vec![None; batch.len()];
        // Refuse without I/O while full, until the retry time, or sooner if
        // the maintenance thread saw space come back and cleared the flag.
        let shared = self.shared.clone();
        let flag = &shared.full[self.id as usize];
        let refusing = flag.load(Ordering::Relaxed)
            && self.full_retry_at.is_some_and(|at| Instant::now() < at);
        let result = if refusing {
            Err(Fail::Full("still no room; waiting for it".into()))
        } else {
            self.write_batch(batch, &mut outcomes)
        };
        match &result {
            Ok(()) => {
                self.full_retry_at = None;
                flag.store(false, Ordering::Relaxed);
                if std::mem::take(&mut self.full_logged) {
                    tracing::info!(
                        writer = self.id,
                        "spool: room again; this writer accepts mail"
                    );
                }
                self.prepare_spare();
            }
            Err(Fail::Full(cause)) => {
                if !refusing {
                    let retry = self.shared.config.maintenance_interval;
                    self.full_retry_at = Some(Instant::now() + retry);
                }
                flag.store(true, Ordering::Relaxed);
                if !self.full_logged {
                    self.full_logged = true;
                    self.log_full(cause);
                }
            }
            Err(Fail::Io(cause)) => self.log_io_error(cause, batch.len()),
        }
        // What arrived during the commit, counted before any producer hears
        // its outcome and sends again (regroup.rs).
        self.queued_after_commit = self.rx.len();
        self.stats.record_batch(batch.len() as u64);
        let batch_bytes = batch.iter().map(|j| j.message.body.len() as u64).sum();
        self.stats.record_batch_bytes(batch_bytes);
        self.batch_bytes_ewma = ewma8(self.batch_bytes_ewma, batch_bytes);
        let mut to_wake: Vec<Arc<super::ProducerShared>> = Vec::new();
        for (job, slot) in batch.drain(..).zip(outcomes) {
            let outcome = match (&result, slot) {
                (Ok(()), Some(o)) => o,
                (Ok(()), None) => unreachable!("write_batch sets every slot on success"),
                (_, Some(CommitOutcome::Failed)) | (Err(Fail::Io(_)), _) => CommitOutcome::Failed,
                (Err(Fail::Full(_)), _) => CommitOutcome::StorageFull,
            };
            let counter = match outcome {
                CommitOutcome::Committed(_) => &self.stats.messages_committed,
                CommitOutcome::Failed => &self.stats.messages_failed,
                CommitOutcome::StorageFull => &self.stats.messages_storage_full,
            };
            self.stats.add(counter, 1);
            job.producer.push(job.ticket, outcome);
            if !to_wake.iter().any(|w| Arc::ptr_eq(w, &job.producer)) {
                to_wake.push(job.producer);
            }
        }
        for p in to_wake {
            p.wake();
        }
    }

    /// The first refusal for lack of space: what ran out, what the clients
    /// are told, and the fix.
    fn log_full(&self, cause: &str) {
        let cfg = &self.shared.config;
        let free = lock::free_bytes(&cfg.dir)
            .map_or_else(|e| format!("unknown ({e})"), |b| format!("{b} bytes"));
        tracing::warn!(
            writer = self.id,
            "spool full: {cause}; refusing mail with 452 4.3.1 (MTAs keep it queued and retry) until there is room for a new segment of {} bytes; free on {}: {free}; fix: free space on that file system, raise spool.spool_bytes_max, or let consumers catch up so that retention removes what they have read",
            cfg.segment_bytes,
            cfg.dir.display()
        );
    }

    /// A batch that failed for a reason other than space: logged at once,
    /// then at most once per [`IO_ERROR_LOG_EVERY`] with the count between.
    fn log_io_error(&mut self, cause: &str, messages: usize) {
        let Some(held) = self.io_error_log.due(Instant::now(), IO_ERROR_LOG_EVERY) else {
            return;
        };
        tracing::error!(
            writer = self.id,
            "spool write failed: {cause}; the batch's {messages} message(s) were answered 451 4.3.0 (MTAs retry) and its records abandoned ({held} more failed batches since the last such line); fix: check the disk (dmesg, smartctl) and the file system"
        );
    }

    /// Encodes, writes and syncs the batch. On `Ok`, `outcomes` holds
    /// `Committed` for every record written (or `Failed` for a message that
    /// cannot be a record) and the watermark moved. On `Err`, the segments
    /// touched are abandoned and what this batch wrote into them is zeroed,
    /// best effort, so that no reader sees its records.
    fn write_batch(
        &mut self,
        batch: &[Job],
        outcomes: &mut [Option<CommitOutcome>],
    ) -> Result<(), Fail> {
        let first = match self.segment.take() {
            Some(s) => s,
            None => self.new_segment(0)?,
        };
        let start = first.write_offset;
        // Each segment this batch writes into, with where the batch began in it.
        let mut segs = vec![(first, start)];
        match self.write_into(&mut segs, batch, outcomes) {
            Ok(()) => {
                let (seg, _) = segs.pop().expect("at least one segment");
                let w = Watermark {
                    segment: seg.id.index,
                    offset: seg.write_offset,
                };
                // Only informs live followers (see watermark.rs); a failure
                // makes them lag, it loses nothing.
                if let Some(f) = &mut self.watermark
                    && f.publish(w).is_err()
                {
                    self.stats.add(&self.stats.watermark_errors, 1);
                }
                self.segment = Some(seg);
                Ok(())
            }
            Err(fail) => {
                for (seg, from) in &mut segs {
                    let mut at = *from;
                    let zeros = [0u8; 64 << 10];
                    while at < seg.write_offset {
                        let n = (seg.write_offset - at).min(zeros.len() as u64) as usize;
                        if seg.file.write_all_at(&zeros[..n], at).is_err() {
                            break;
                        }
                        at += n as u64;
                    }
                }
                Err(fail)
            }
        }
    }

    fn write_into(
        &mut self,
        segs: &mut Vec<(OpenSegment, u64)>,
        batch: &[Job],
        outcomes: &mut [Option<CommitOutcome>],
    ) -> Result<(), Fail> {
        let now_ms = segment::unix_ms(SystemTime::now());
        let ms = now_ms.max(self.last_ms);
        self.last_ms = ms;
        // Records are encoded straight into the buffer the write takes, after
        // the `lead` the appender put first (see append.rs and stage.rs).
        let mut lead = {
            let seg = &mut segs.last_mut().expect("one segment").0;
            self.appender
                .begin(seg, &mut self.buf)
                .map_err(|e| classify("start the batch's write", &e))?
        };
        // File offset of buf[lead] in the last segment of `segs`.
        let mut base = segs.last().expect("one segment").0.write_offset;
        let mut records = 0u64;
        let mut bytes = 0u64;
        for (job, slot) in batch.iter().zip(outcomes.iter_mut()) {
            let start = self.buf.len();
            let id = queue_id_from_parts(ms, self.id, self.next_seq);
            let received_us = job
                .received_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            let len =
                match record::encode(&mut self.buf, self.next_seq, id, received_us, &job.message) {
                    Ok(len) => len,
                    Err(_) => {
                        *slot = Some(CommitOutcome::Failed);
                        continue;
                    }
                };
            let capacity = segs.last().expect("one segment").0.capacity;
            if base + (self.buf.len() - lead) as u64 > capacity {
                // This record does not fit: write what precedes it, seal the
                // segment (synced below, before any outcome), start another.
                // Rare (once a segment), so the record is simply copied.
                let record = self.buf[start..].to_vec();
                self.buf.set_len_zeroed(start);
                if start > lead {
                    let seg = &mut segs.last_mut().expect("one segment").0;
                    debug_assert_eq!(seg.write_offset, base);
                    bytes += (start - lead) as u64;
                    self.appender
                        .finish(seg, &mut self.buf, lead)
                        .map_err(|e| classify("write records", &e))?;
                }
                let mut fresh = self.new_segment(SEGMENT_HEADER_LEN + len as u64)?;
                base = fresh.write_offset;
                let begun = self.appender.begin(&mut fresh, &mut self.buf);
                segs.push((fresh, base));
                lead =
                    begun.map_err(|e| classify("start the batch's write in a new segment", &e))?;
                self.buf.put(&record);
            }
            *slot = Some(CommitOutcome::Committed(id));
            self.next_seq += 1;
            records += 1;
        }
        if records == 0 {
            return Ok(());
        }
        let seg = &mut segs.last_mut().expect("one segment").0;
        assert!(base + (self.buf.len() - lead) as u64 <= seg.capacity);
        if self.buf.len() > lead {
            debug_assert_eq!(seg.write_offset, base);
            bytes += (self.buf.len() - lead) as u64;
            self.appender
                .finish(seg, &mut self.buf, lead)
                .map_err(|e| classify("write records", &e))?;
        }
        for (s, _) in segs.iter_mut() {
            let t = Instant::now();
            s.file.sync_data().map_err(|e| classify("fdatasync", &e))?;
            let took = t.elapsed();
            self.last_sync += took;
            self.stats.record_fsync(took.as_nanos() as u64);
        }
        self.stats.add(&self.stats.bytes_written, bytes);
        Ok(())
    }

    /// Takes the next index for a segment of `capacity` bytes and counts it
    /// against the size cap.
    fn reserve(&mut self, capacity: u64) -> Result<SegmentId, Fail> {
        if let Some(cap) = self.shared.config.spool_bytes_max {
            let used = self.shared.spool_bytes.load(Ordering::Relaxed);
            if cap.saturating_sub(used) < capacity {
                return Err(Fail::Full(format!(
                    "the size cap spool.spool_bytes_max = {cap} bytes is reached ({used} in segments)"
                )));
            }
        }
        self.shared
            .spool_bytes
            .fetch_add(capacity, Ordering::Relaxed);
        let id = SegmentId {
            writer: self.id,
            index: self.next_index,
        };
        self.next_index += 1;
        Ok(id)
    }

    fn unreserve(&self, capacity: u64) {
        self.shared
            .spool_bytes
            .fetch_sub(capacity, Ordering::Relaxed);
    }

    /// Starts preparing the next segment on a helper thread, so a rotation
    /// costs a rename and a directory fsync instead of writing a whole
    /// segment of zeros in the middle of a batch.
    fn prepare_spare(&mut self) {
        if !self.shared.config.segment_prepare_ahead || self.spare.is_some() {
            return;
        }
        let capacity = self.shared.config.segment_bytes;
        let Ok(id) = self.reserve(capacity) else {
            return; // at the size cap: no spare
        };
        let storage = self.shared.config.storage.clone();
        let dir = self.shared.config.dir.clone();
        let direct = self.shared.config.direct_io;
        let fill = self.next_fill();
        let spawned = std::thread::Builder::new()
            .name(format!("spool-prep-{}", self.id))
            .spawn(move || {
                segment::prepare_segment(storage.as_ref(), &dir, id, capacity, direct, fill)
            });
        match spawned {
            Ok(h) => self.spare = Some((capacity, h)),
            Err(_) => self.unreserve(capacity),
        }
    }

    /// How the next segment is made, from the policy and recent batches.
    fn next_fill(&self) -> SegmentFill {
        let c = &self.shared.config;
        fill_for(
            c.segment_fill,
            self.batch_bytes_ewma,
            c.allocate_from_batch_bytes,
        )
    }

    /// Counts a segment taken into use.
    fn count_segment(&self, allocated: bool) {
        self.stats.add(&self.stats.segments_created, 1);
        if allocated {
            self.stats.add(&self.stats.segments_allocated, 1);
        }
    }

    /// Waits for the spare (if any) and returns it, or `None` if it failed.
    fn take_spare(&mut self) -> Option<PreparedSegment> {
        let (capacity, h) = self.spare.take()?;
        match h.join() {
            Ok(Ok(p)) => Some(p),
            Ok(Err(_)) | Err(_) => {
                self.unreserve(capacity);
                None
            }
        }
    }

    /// Creates the next segment of this stream, at least `min_bytes` large:
    /// the prepared spare when it is large enough, else made here.
    fn new_segment(&mut self, min_bytes: u64) -> Result<OpenSegment, Fail> {
        let cfg = self.shared.config.clone();
        let capacity = cfg.segment_bytes.max(min_bytes.div_ceil(4096) * 4096);
        if let Some(p) = self.take_spare() {
            if p.capacity >= capacity {
                let (cap, allocated) = (p.capacity, p.allocated);
                let seg =
                    segment::install_segment(cfg.storage.as_ref(), &cfg.dir, p).map_err(|e| {
                        self.unreserve(cap);
                        classify("install the prepared segment", &e)
                    })?;
                self.count_segment(allocated);
                return Ok(seg);
            }
            // Too small for this record: a larger one is made below.
            self.unreserve(p.capacity);
            segment::discard_segment(cfg.storage.as_ref(), p);
        }
        let id = self.reserve(capacity)?;
        // A segment made for one large record is written by that record
        // alone: allocated, whatever the recent batches.
        let fill = if capacity > cfg.segment_bytes {
            fill_for(cfg.segment_fill, u64::MAX, cfg.allocate_from_batch_bytes)
        } else {
            self.next_fill()
        };
        let made = segment::prepare_segment(
            cfg.storage.as_ref(),
            &cfg.dir,
            id,
            capacity,
            cfg.direct_io,
            fill,
        )
        .and_then(|p| {
            let allocated = p.allocated;
            segment::install_segment(cfg.storage.as_ref(), &cfg.dir, p).map(|s| (s, allocated))
        });
        let (seg, allocated) = made.map_err(|e| {
            self.unreserve(capacity);
            classify("create a segment", &e)
        })?;
        self.count_segment(allocated);
        Ok(seg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_lets_one_through_per_interval_and_counts_the_rest() {
        let every = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut l = LogLimit::default();
        assert_eq!(l.due(t0, every), Some(0), "the first is logged");
        assert_eq!(l.due(t0 + Duration::from_secs(1), every), None);
        assert_eq!(l.due(t0 + Duration::from_secs(9), every), None);
        assert_eq!(l.due(t0 + every, every), Some(2), "then with the count");
        assert_eq!(l.due(t0 + every + Duration::from_secs(1), every), None);
        assert_eq!(l.due(t0 + every * 3, every), Some(1));
    }

    #[test]
    fn auto_fill_follows_the_mean_batch() {
        let line = ALLOCATE_FROM_BATCH_BYTES;
        assert_eq!(fill_for(FillPolicy::Auto, 0, line), SegmentFill::Zeros);
        assert_eq!(
            fill_for(FillPolicy::Auto, line - 1, line),
            SegmentFill::Zeros
        );
        assert_eq!(
            fill_for(FillPolicy::Auto, line, line),
            SegmentFill::Allocate
        );
        // The configured line, not the default, decides.
        assert_eq!(
            fill_for(FillPolicy::Auto, 200 << 10, 128 << 10),
            SegmentFill::Allocate
        );
        assert_eq!(
            fill_for(FillPolicy::Auto, 2 << 20, 4 << 20),
            SegmentFill::Zeros
        );
        assert_eq!(
            fill_for(FillPolicy::Zeros, u64::MAX, line),
            SegmentFill::Zeros
        );
        assert_eq!(
            fill_for(FillPolicy::Allocate, 0, line),
            SegmentFill::Allocate
        );
        // Steady 4 MiB batches pass the line within a few commits; one huge
        // batch among small ones does not flip it for long.
        let mut m = 0;
        let mut commits = 0;
        while m < ALLOCATE_FROM_BATCH_BYTES {
            m = ewma8(m, 4 << 20);
            commits += 1;
        }
        assert_eq!(commits, 1, "an eighth of 4 MiB is already 512 KiB");
        let mut m = ewma8(16 << 10, 64 << 20);
        for _ in 0..32 {
            m = ewma8(m, 16 << 10);
        }
        assert!(m < ALLOCATE_FROM_BATCH_BYTES, "{m}");
    }

    #[test]
    fn full_disks_and_quotas_are_full_and_the_rest_io() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(
            matches!(classify("fdatasync", &full), Fail::Full(c) if c.starts_with("fdatasync: "))
        );
        let quota = io::Error::from_raw_os_error(libc::EDQUOT);
        assert!(matches!(classify("write", &quota), Fail::Full(_)));
        let eio = io::Error::from_raw_os_error(libc::EIO);
        assert!(
            matches!(classify("write records", &eio), Fail::Io(c) if c.contains("write records"))
        );
    }
}
