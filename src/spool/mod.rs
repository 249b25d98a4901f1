//! The durable spool: messages in, commit outcomes out, and only after an
//! `fdatasync` has covered them.
//!
//! ```text
//!  producer (shard thread)                      writer thread i (of N)
//!  try_submit(ticket, msg) --bounded channel--> take all waiting (bytes/count caps,
//!                                               optional adaptive delay), encode,
//!                                               ONE write + ONE fdatasync
//!  drain completions  <--per-producer queue---- push (ticket, outcome), call waker
//! ```
//!
//! Parts: [`record`] (bytes of one message), [`segment`] (files, creation),
//! `writer` (group commit), [`recover`] (start-up scan and torn-tail cut),
//! [`reader`] (scans for tools), [`lock`] (one server per spool, no tmpfs),
//! [`fs`] (the storage seam tests inject faults through), [`watermark`] (how
//! far each stream is committed), [`follow`] (named consumers),
//! [`retention`], [`export`], [`stats`], [`timefmt`].
//!
//! Invariants:
//! - A `CommitOutcome::Committed` is sent only after the `fdatasync` covering
//!   the record returned `Ok`, and the segment's directory entry was synced
//!   when the segment was created.
//! - Every accepted submission gets exactly one outcome, shutdown included.
//! - Nothing blocks a shard: `try_submit` never waits, and a writer never
//!   waits on a producer (completion queues are bounded by construction, see
//!   [`Producer`]).
//!
//! Use from a shard thread (non-blocking) and from simple callers:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::SystemTime;
//! use lmtp_ingest::envelope::{CommitOutcome, Message};
//! use lmtp_ingest::spool::{Spool, SpoolConfig};
//!
//! # fn demo(message: Message, other: Message) -> Result<(), Box<dyn std::error::Error>> {
//! let (spool, report) = Spool::open(SpoolConfig::new("/var/spool/lmtp-ingest"))?;
//! println!("{report}");
//! // A shard: its waker writes to the eventfd its ring watches.
//! let waker: Arc<dyn Fn() + Send + Sync> = Arc::new(|| { /* eventfd_write(fd, 1) */ });
//! let shard = spool.producer(Some(waker));
//! if let Err(rejected) = shard.try_submit(7, message, SystemTime::now()) {
//!     // Queue full: keep rejected.message, stop reading that socket, retry later.
//!     drop(rejected);
//! }
//! // ...when the eventfd fires:
//! let mut done = Vec::new();
//! shard.drain(&mut done);
//! for (ticket, outcome) in done {
//!     match outcome {
//!         CommitOutcome::Committed(id) => { /* 250 2.0.0 ... {id} */ }
//!         CommitOutcome::Failed => { /* 451 4.3.0 */ }
//!         CommitOutcome::StorageFull => { /* 452 4.3.1 */ }
//!     }
//!     let _ = ticket;
//! }
//! // A simple caller:
//! let mut tool = spool.producer(None);
//! let outcome = tool.commit(other);
//! # let _ = outcome;
//! spool.shutdown(); // commits what is queued, joins the writers
//! # Ok(()) }
//! ```
//!
//! Queue ids (128 bits, most significant first): 48 bits of Unix time in
//! milliseconds when the writer built the batch (never going backwards within a
//! writer), 16 bits of writer number, 64 bits of that writer's record sequence.
//! Unique because (writer, sequence) is; sortable by time as text.

mod append;
mod doorbell;
pub mod export;
pub mod follow;
pub mod fs;
pub mod lock;
pub mod reader;
pub mod record;
pub mod recover;
mod regroup;
pub mod retention;
pub mod segment;
pub mod stage;
pub mod stats;
pub mod timefmt;
pub mod watermark;
mod writer;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{SendError, Sender, TrySendError};

use crate::envelope::{CommitOutcome, Message, QueueId};
pub use recover::RecoveryReport;
pub use stats::{SpoolStats, WriterStats};

/// How writers make their next segment ready (`spool.segment_fill`; see
/// [`segment::SegmentFill`] for what each costs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillPolicy {
    /// Zero-filled while batches are small; only allocated while a writer's
    /// batches average `allocate_from_batch_bytes` or more (default
    /// [`writer::ALLOCATE_FROM_BATCH_BYTES`]; large
    /// messages under load), where zero-filling would spend as much of the
    /// disk's write bandwidth as the records themselves.
    Auto,
    /// Always zero-filled.
    Zeros,
    /// Always only allocated.
    Allocate,
}

impl FillPolicy {
    /// The configuration's spelling.
    pub fn parse(s: &str) -> Option<FillPolicy> {
        match s {
            "auto" => Some(FillPolicy::Auto),
            "zeros" => Some(FillPolicy::Zeros),
            "allocate" => Some(FillPolicy::Allocate),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FillPolicy::Auto => "auto",
            FillPolicy::Zeros => "zeros",
            FillPolicy::Allocate => "allocate",
        }
    }
}

/// Spool settings. Every bound has its reason beside it.
#[derive(Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Writer threads, each with its own segment stream and channel. One
    /// saturates a disk's fdatasync rate; more help when encoding or large
    /// bodies dominate. 1..=64.
    pub writers: usize,
    /// Size of each preallocated segment file. A record larger than this gets
    /// a segment of its own size.
    pub segment_bytes: u64,
    /// A batch stops growing once its message bodies reach this many bytes...
    pub batch_bytes_max: usize,
    /// ...or this many messages.
    pub batch_messages_max: usize,
    /// Longest a writer waits for more messages before syncing, and only when
    /// messages have been arriving closer together than this (adaptive, as
    /// PostgreSQL's commit_delay with commit_siblings). 0: never wait on
    /// purpose (RocksDB's choice); batches still form while a sync runs.
    pub batch_delay_us_max: u64,
    /// With `batch_delay_us_max` 0: when commits are slow (a mean of 0.4 ms
    /// or more), wait up to a quarter of a commit for the clients the last
    /// one answered, while such waits keep paying (see `regroup.rs`).
    pub batch_regroup: bool,
    /// Messages waiting in each writer's channel.
    pub queue_depth_max: usize,
    /// Submissions one producer may have without a drained outcome; bounds its
    /// completion queue.
    pub producer_inflight_max: usize,
    /// Spool size cap in bytes of segment files (each writer's prepared
    /// spare included); a new segment that would pass it is not made, and
    /// the mail that needed it gets `StorageFull`. `None`: only the disk.
    pub spool_bytes_max: Option<u64>,
    /// With no consumer registered, segments older than this are removed.
    pub retention_age_max: Option<Duration>,
    /// How often a full spool looks again for space, and retention runs.
    pub maintenance_interval: Duration,
    /// Prepare each writer's next segment on a helper thread ahead of need
    /// (costs one segment of disk per writer). Off: made when needed, inside
    /// the batch that needs it.
    pub segment_prepare_ahead: bool,
    /// Write records with `O_DIRECT` (past the page cache), falling back to
    /// buffered writes where the file system refuses it. Off: always
    /// buffered.
    pub direct_io: bool,
    /// How new segments are made ready: zero-filled or only allocated
    /// (`spool.segment_fill`).
    pub segment_fill: FillPolicy,
    /// Under [`FillPolicy::Auto`], batches averaging this many bytes or more
    /// make the next segment by allocation (`spool.allocate_from_batch_bytes`;
    /// `lmtp-ingest doctor` measures where allocation starts to win on the
    /// spool's own disk).
    pub allocate_from_batch_bytes: u64,
    /// Accept a spool on tmpfs/ramfs (not durable: tests only).
    pub allow_tmpfs: bool,
    /// The file operations (tests inject faults here).
    pub storage: Arc<dyn fs::Storage>,
}

impl SpoolConfig {
    /// Defaults for a spool in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            writers: 1,
            // 64 MiB: few files, and zero-filling one takes well under a second.
            segment_bytes: 64 << 20,
            // 4 MiB / 1024 messages: one sync covers many messages while a
            // batch still writes in a few milliseconds.
            batch_bytes_max: 4 << 20,
            batch_messages_max: 1024,
            batch_delay_us_max: 0,
            batch_regroup: true,
            queue_depth_max: 4096,
            producer_inflight_max: 4096,
            spool_bytes_max: None,
            retention_age_max: None,
            maintenance_interval: Duration::from_secs(1),
            segment_prepare_ahead: true,
            direct_io: true,
            segment_fill: FillPolicy::Auto,
            allocate_from_batch_bytes: writer::ALLOCATE_FROM_BATCH_BYTES,
            allow_tmpfs: false,
            storage: Arc::new(fs::RealStorage),
        }
    }

    fn check(&self) -> Result<(), SpoolError> {
        let bad = |what: &str| Err(SpoolError::Config(what.to_string()));
        if self.writers == 0 || self.writers > 64 {
            return bad("writers must be 1 to 64");
        }
        if self.segment_bytes < 4096 {
            return bad("segment_bytes must be at least 4096");
        }
        if self.batch_bytes_max == 0 || self.batch_messages_max == 0 {
            return bad("batch_bytes_max and batch_messages_max must be at least 1");
        }
        if self.queue_depth_max == 0 || self.producer_inflight_max == 0 {
            return bad("queue_depth_max and producer_inflight_max must be at least 1");
        }
        if self
            .retention_age_max
            .is_some_and(|a| a < Duration::from_secs(1))
        {
            // Shorter than a batch could take to write and sync.
            return bad("retention_age_max must be at least 1 second");
        }
        Ok(())
    }
}

impl std::fmt::Debug for SpoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolConfig")
            .field("dir", &self.dir)
            .field("writers", &self.writers)
            .field("segment_bytes", &self.segment_bytes)
            .field("batch_bytes_max", &self.batch_bytes_max)
            .field("batch_messages_max", &self.batch_messages_max)
            .field("batch_delay_us_max", &self.batch_delay_us_max)
            .field("batch_regroup", &self.batch_regroup)
            .field("spool_bytes_max", &self.spool_bytes_max)
            .finish_non_exhaustive()
    }
}

/// Why the spool cannot open or run.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "spool {dir} is locked by another process ({holder}); run one server per spool, or stop the other one"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error(
        "spool {0} is on tmpfs/ramfs, which loses everything at power off, so a 250 would be a lie; put the spool on a disk, or, for tests only, set `allow_tmpfs = true` under `[spool]`"
    )]
    Tmpfs(PathBuf),
    #[error("bad spool configuration: {0}")]
    Config(String),
    #[error(
        "{path}: permission denied: this process runs as uid {uid} and the spool's files are owned by uid {owner}; run the server (or tool) as the spool's owner (e.g. `runuser -u USER -- lmtp-ingest ...`), or give this user all of {dir} (`chown -R USER {dir}`: a spool first run as another user keeps that user's files)"
    )]
    Permission {
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
        owner: String,
    },
}

impl SpoolError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        SpoolError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Splits a queue id into (unix ms, writer, sequence).
pub fn queue_id_parts(id: QueueId) -> (u64, u16, u64) {
    ((id.0 >> 80) as u64, (id.0 >> 64) as u16, id.0 as u64)
}

/// Builds a queue id from (unix ms, writer, sequence).
pub fn queue_id_from_parts(unix_ms: u64, writer: u16, seq: u64) -> QueueId {
    QueueId(((unix_ms as u128 & ((1 << 48) - 1)) << 80) | ((writer as u128) << 64) | seq as u128)
}

/// What goes down a writer's channel.
// `Stop` is sent once per writer; boxing `Job` would cost an allocation per
// message to save channel slot bytes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum WriterMsg {
    Job(Job),
    /// Commit what is queued, then exit.
    Stop,
}

pub(crate) struct Job {
    pub ticket: u64,
    pub message: Message,
    pub received_at: SystemTime,
    pub submitted_at: Instant,
    pub producer: Arc<ProducerShared>,
}

/// The completion side of one producer, shared with the writers.
pub(crate) struct ProducerShared {
    completions: Mutex<VecDeque<(u64, CommitOutcome)>>,
    ready: Condvar,
    waker: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Submissions accepted whose outcome the producer has not drained yet.
    in_flight: AtomicUsize,
    /// Threads blocked on `ready` (changed under the `completions` lock).
    waiting: AtomicUsize,
}

impl ProducerShared {
    /// Queues outcomes without waking (the writer wakes once per batch).
    pub(crate) fn push(&self, ticket: u64, outcome: CommitOutcome) {
        let mut q = self.completions.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back((ticket, outcome));
    }

    pub(crate) fn wake(&self) {
        if let Some(w) = &self.waker {
            w();
        }
        // A notify is a futex call even with no one waiting, and a shard
        // never waits on the condvar (its waker is its event loop's eventfd).
        // A waiter counts itself under the queue's lock before it sleeps and
        // `push` took that lock after, so this load sees it.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.ready.notify_all();
        }
    }
}

/// State shared by the spool, its writers and its producers.
pub(crate) struct Shared {
    pub config: SpoolConfig,
    senders: Vec<Sender<WriterMsg>>,
    /// One per writer: rung after every message put into its queue (by
    /// `Shared::send` and `Shared::try_send`).
    pub doorbells: Vec<doorbell::Doorbell>,
    /// Set (under the write lock) when shutdown starts; submissions hold the
    /// read lock from the check to the send, so none slips in after.
    closed: RwLock<bool>,
    next_producer: AtomicUsize,
    pub stats: Vec<Arc<WriterStats>>,
    /// Bytes of segment files in the spool (for the size cap).
    pub spool_bytes: AtomicU64,
    /// Per writer: refusing work until space returns.
    pub full: Vec<AtomicBool>,
    /// Segments removed by retention so far.
    pub retention_removed: AtomicU64,
    maintenance_stop: (Mutex<bool>, Condvar),
}

impl Shared {
    /// Puts `m` in writer `w`'s queue, waiting for room, and rings its
    /// doorbell. Every message to a writer goes through here or
    /// [`Shared::try_send`]: a writer parks until rung. The error hands the
    /// message back, as crossbeam's does (see `WriterMsg` on its size).
    #[allow(clippy::result_large_err)]
    fn send(&self, w: usize, m: WriterMsg) -> Result<(), SendError<WriterMsg>> {
        self.senders[w].send(m)?;
        self.doorbells[w].ring();
        Ok(())
    }

    /// [`Shared::send`] without waiting for room.
    #[allow(clippy::result_large_err)]
    fn try_send(&self, w: usize, m: WriterMsg) -> Result<(), TrySendError<WriterMsg>> {
        self.senders[w].try_send(m)?;
        self.doorbells[w].ring();
        Ok(())
    }

    /// Any writer refusing work for lack of space (or the size cap).
    fn is_storage_full(&self) -> bool {
        self.full.iter().any(|f| f.load(Ordering::Relaxed))
    }
}

/// Read-only access to the spool's counters and queues for the metrics
/// endpoint; outlives nothing (the writers may stop while it is held).
pub struct MetricsSource {
    shared: Arc<Shared>,
}

/// One consumer's standing, for the metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerLag {
    pub name: String,
    /// Segments (in all streams) the consumer has not passed, the one it is
    /// reading included.
    pub segments_behind: u64,
    /// Seconds since its position was last saved.
    pub saved_age_s: u64,
}

impl MetricsSource {
    /// Each writer's counters.
    pub fn writers(&self) -> &[Arc<WriterStats>] {
        &self.shared.stats
    }

    /// Each registered consumer (`spool follow --consumer`): how many
    /// segments it has not yet passed (what retention keeps for it), and
    /// seconds since it last saved its position. Read from
    /// `consumers/*.json` on each call; a consumer file that cannot be read
    /// is left out.
    pub fn consumers(&self) -> Vec<ConsumerLag> {
        let dir = &self.shared.config.dir;
        let Ok(consumers) = follow::load_consumers(dir) else {
            return Vec::new();
        };
        let segments = reader::list_segments(dir).unwrap_or_default();
        let now = std::time::SystemTime::now();
        consumers
            .into_iter()
            // The name becomes a label value: only names `follow` accepts.
            .filter(|c| follow::valid_consumer_name(&c.name))
            .map(|c| {
                let behind = segments
                    .iter()
                    .filter(|s| {
                        c.positions
                            .get(&s.id.writer)
                            .is_none_or(|p| p.segment <= s.id.index)
                    })
                    .count() as u64;
                let file = follow::consumers_dir(dir).join(format!("{}.json", c.name));
                let saved_age_s = std::fs::metadata(file)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .map_or(0, |d| d.as_secs());
                ConsumerLag {
                    name: c.name,
                    segments_behind: behind,
                    saved_age_s,
                }
            })
            .collect()
    }

    /// Messages queued for the writers now.
    pub fn queue_depth(&self) -> usize {
        self.shared.senders.iter().map(|s| s.len()).sum()
    }

    /// Bytes of segment files now.
    pub fn spool_bytes(&self) -> u64 {
        self.shared.spool_bytes.load(Ordering::Relaxed)
    }
}

/// An open spool with its writer threads running.
pub struct Spool {
    shared: Arc<Shared>,
    writers: Vec<JoinHandle<()>>,
    maintenance: Option<JoinHandle<()>>,
    _lock: lock::SpoolLock,
}

impl Spool {
    /// Locks the spool directory (creating it if needed), refuses tmpfs unless
    /// allowed, runs recovery, and starts the writers.
    pub fn open(config: SpoolConfig) -> Result<(Spool, RecoveryReport), SpoolError> {
        config.check()?;
        let dir = config.dir.clone();
        if !dir.exists() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| {
                    SpoolError::io(
                        format!(
                            "create spool dir {} (create it as the server's user, e.g. `install -d -o lmtp-ingest {0}`, or choose another with --spool or spool.dir)",
                            dir.display()
                        ),
                        e,
                    )
                })?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                config
                    .storage
                    .sync_dir(parent)
                    .map_err(|e| SpoolError::io(format!("fsync {}", parent.display()), e))?;
            }
        }
        let is_mem = lock::is_memory_fs(&dir)
            .map_err(|e| SpoolError::io(format!("statfs {}", dir.display()), e))?;
        if is_mem && !config.allow_tmpfs {
            return Err(SpoolError::Tmpfs(dir));
        }
        let lock = lock::lock_spool(&dir)?;
        let recovered = recover::recover(&dir, config.storage.as_ref())?;

        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..config.writers {
            let (tx, rx) = crossbeam_channel::bounded(config.queue_depth_max);
            senders.push(tx);
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            stats: (0..config.writers)
                .map(|_| Arc::new(WriterStats::default()))
                .collect(),
            full: (0..config.writers)
                .map(|_| AtomicBool::new(false))
                .collect(),
            spool_bytes: AtomicU64::new(recovered.spool_bytes),
            retention_removed: AtomicU64::new(0),
            doorbells: (0..config.writers)
                .map(|_| doorbell::Doorbell::default())
                .collect(),
            config,
            senders,
            closed: RwLock::new(false),
            next_producer: AtomicUsize::new(0),
            maintenance_stop: (Mutex::new(false), Condvar::new()),
        });
        // Built first, so that a failure below stops (through Drop) the
        // writers already started instead of leaving them blocked forever.
        let mut spool = Spool {
            shared: shared.clone(),
            writers: Vec::new(),
            maintenance: None,
            _lock: lock,
        };
        for (i, rx) in receivers.into_iter().enumerate() {
            let mut w = writer::Writer::new(
                i as u16,
                shared.clone(),
                rx,
                recovered.streams.get(&(i as u16)).cloned(),
            )?;
            w.open_first_segment();
            let handle = std::thread::Builder::new()
                .name(format!("spool-writer-{i}"))
                .spawn(move || w.run())
                .map_err(|e| SpoolError::io("spawn writer thread", e))?;
            spool.writers.push(handle);
        }
        let maint_shared = shared.clone();
        let maintenance = std::thread::Builder::new()
            .name("spool-maintenance".into())
            .spawn(move || maintenance_loop(&maint_shared))
            .map_err(|e| SpoolError::io("spawn maintenance thread", e))?;
        spool.maintenance = Some(maintenance);
        Ok((spool, recovered.report))
    }

    /// Registers a producer. `waker` (if any) is called after new outcomes are
    /// queued for it, once per batch, from a writer thread: it must be quick,
    /// must not block and must not panic (write to an eventfd, unpark a
    /// thread).
    pub fn producer(&self, waker: Option<Arc<dyn Fn() + Send + Sync>>) -> Producer {
        let id = self.shared.next_producer.fetch_add(1, Ordering::Relaxed);
        Producer {
            home: id % self.shared.senders.len(),
            shared: self.shared.clone(),
            me: Arc::new(ProducerShared {
                completions: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                waker,
                in_flight: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
            }),
            next_ticket: u64::MAX / 2,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.shared.config.dir
    }

    /// True while any writer refuses work for lack of space (or the size cap):
    /// a session can answer `452 4.3.1` before taking the data. Cleared when a
    /// batch commits again, or when the periodic check (every
    /// `maintenance_interval`) sees room for a segment per writer on the file
    /// system and under the cap; if the next batch still fails (a quota, say),
    /// it is set again.
    pub fn is_storage_full(&self) -> bool {
        self.shared.is_storage_full()
    }

    /// What the metrics endpoint reads, from its own thread.
    pub fn metrics_source(&self) -> MetricsSource {
        MetricsSource {
            shared: self.shared.clone(),
        }
    }

    /// Counters of every writer so far.
    pub fn stats(&self) -> SpoolStats {
        let mut s = SpoolStats::collect(&self.shared.stats);
        s.segments_removed = self.shared.retention_removed.load(Ordering::Relaxed);
        s.spool_bytes = self.shared.spool_bytes.load(Ordering::Relaxed);
        s
    }

    /// Stops taking submissions, commits everything already queued, and joins
    /// the writer threads. Every accepted submission has its outcome queued
    /// when this returns.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        {
            let mut closed = self
                .shared
                .closed
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if *closed {
                return;
            }
            *closed = true;
        }
        for w in 0..self.shared.senders.len() {
            // A writer that died (a panic) has dropped its receiver; nothing to stop.
            let _ = self.shared.send(w, WriterMsg::Stop);
        }
        for h in self.writers.drain(..) {
            let _ = h.join();
        }
        {
            let (m, c) = &self.shared.maintenance_stop;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            c.notify_all();
        }
        if let Some(h) = self.maintenance.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn maintenance_loop(shared: &Shared) {
    let (m, c) = &shared.maintenance_stop;
    let mut stopped = m.lock().unwrap_or_else(|e| e.into_inner());
    while !*stopped {
        let (guard, _) = c
            .wait_timeout(stopped, shared.config.maintenance_interval)
            .unwrap_or_else(|e| e.into_inner());
        stopped = guard;
        if *stopped {
            break;
        }
        drop(stopped);
        run_maintenance(shared);
        stopped = m.lock().unwrap_or_else(|e| e.into_inner());
    }
}

/// Periodic work off the hot path: retention, then clear the storage-full
/// flags once there is
/// room for a new segment again, so sessions that check
/// [`Spool::is_storage_full`] before taking data resume. (A full writer also
/// tries again by itself when a batch comes, at most once per interval.)
fn run_maintenance(shared: &Shared) {
    let cfg = &shared.config;
    // A failed pass (an unreadable consumer file, say) removes nothing and
    // is tried again next interval.
    if let Ok(rep) = retention::run(
        &cfg.dir,
        cfg.storage.as_ref(),
        cfg.retention_age_max,
        SystemTime::now(),
    ) {
        shared.spool_bytes.fetch_sub(rep.bytes, Ordering::Relaxed);
        shared
            .retention_removed
            .fetch_add(rep.removed.len() as u64, Ordering::Relaxed);
    }
    if shared.is_storage_full() && has_room(shared) {
        for f in &shared.full {
            f.store(false, Ordering::Relaxed);
        }
    }
}

/// Room for one more segment per writer, on the disk and under the cap.
fn has_room(shared: &Shared) -> bool {
    let cfg = &shared.config;
    let need = cfg.segment_bytes.saturating_mul(cfg.writers as u64);
    if let Some(cap) = cfg.spool_bytes_max
        && cap.saturating_sub(shared.spool_bytes.load(Ordering::Relaxed)) < need
    {
        return false;
    }
    lock::free_bytes(&cfg.dir).is_ok_and(|free| free >= need)
}

/// Why a submission was not taken. The message comes back untouched, by value:
/// the reject path allocates nothing (hence `result_large_err` allowed below).
#[derive(Debug)]
pub struct Rejected {
    pub message: Message,
    pub reason: RejectReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Every writer's queue is full: try again after draining completions
    /// (or stop reading from sockets until then).
    QueueFull,
    /// This producer has `producer_inflight_max` outcomes not yet drained.
    InFlightFull,
    /// The spool is shutting down.
    Closed,
}

/// A producer's handle: submit messages, drain their outcomes.
///
/// Outcomes go to a queue owned by this producer. It is unbounded as a type
/// but bounded by construction: a submission is accepted only while fewer
/// than `producer_inflight_max` are outstanding, and the count drops only when
/// the producer drains an outcome. So a writer pushing an outcome never
/// blocks, and never loses one.
pub struct Producer {
    shared: Arc<Shared>,
    me: Arc<ProducerShared>,
    home: usize,
    next_ticket: u64,
}

#[allow(clippy::result_large_err)]
impl Producer {
    /// [`Spool::is_storage_full`], for the shard that owns this producer.
    pub fn is_storage_full(&self) -> bool {
        self.shared.is_storage_full()
    }

    /// Hands `message` to a writer without blocking: its home writer, or any
    /// other with room. Its outcome comes later with `ticket`.
    pub fn try_submit(
        &self,
        ticket: u64,
        message: Message,
        received_at: SystemTime,
    ) -> Result<(), Rejected> {
        self.submit_inner(ticket, message, received_at, false)
    }

    /// Like [`Producer::try_submit`], but waits for room in the home writer's
    /// queue. For callers that may block (tools, tests, the load generator).
    pub fn submit(
        &self,
        ticket: u64,
        message: Message,
        received_at: SystemTime,
    ) -> Result<(), Rejected> {
        self.submit_inner(ticket, message, received_at, true)
    }

    fn submit_inner(
        &self,
        ticket: u64,
        message: Message,
        received_at: SystemTime,
        block: bool,
    ) -> Result<(), Rejected> {
        // The non-blocking path must not wait even for shutdown: the lock is
        // only ever contended by a shutdown in progress, so "busy" = closed.
        let closed = if block {
            Some(self.shared.closed.read().unwrap_or_else(|e| e.into_inner()))
        } else {
            match self.shared.closed.try_read() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        };
        if closed.as_deref().is_none_or(|c| *c) {
            return Err(Rejected {
                message,
                reason: RejectReason::Closed,
            });
        }
        let max = self.shared.config.producer_inflight_max;
        if self.me.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
            self.me.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected {
                message,
                reason: RejectReason::InFlightFull,
            });
        }
        let mut job = WriterMsg::Job(Job {
            ticket,
            message,
            received_at,
            submitted_at: Instant::now(),
            producer: self.me.clone(),
        });
        let n = self.shared.senders.len();
        if block {
            match self.shared.send(self.home, job) {
                Ok(()) => return Ok(()),
                Err(e) => job = e.0,
            }
        } else {
            for k in 0..n {
                match self.shared.try_send((self.home + k) % n, job) {
                    Ok(()) => return Ok(()),
                    Err(TrySendError::Full(j)) | Err(TrySendError::Disconnected(j)) => job = j,
                }
            }
        }
        self.me.in_flight.fetch_sub(1, Ordering::AcqRel);
        let WriterMsg::Job(job) = job else {
            unreachable!("only jobs are sent here")
        };
        Err(Rejected {
            message: job.message,
            reason: if block {
                RejectReason::Closed
            } else {
                RejectReason::QueueFull
            },
        })
    }

    /// Moves every queued outcome into `out`; returns how many.
    pub fn drain(&self, out: &mut Vec<(u64, CommitOutcome)>) -> usize {
        let mut q = self
            .me
            .completions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = q.len();
        out.extend(q.drain(..));
        drop(q);
        self.me.in_flight.fetch_sub(n, Ordering::AcqRel);
        n
    }

    /// Waits up to `timeout` for an outcome and returns the oldest one.
    pub fn wait_completion(&self, timeout: Duration) -> Option<(u64, CommitOutcome)> {
        let deadline = Instant::now() + timeout;
        let mut q = self
            .me
            .completions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(c) = q.pop_front() {
                drop(q);
                self.me.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Some(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.me.waiting.fetch_add(1, Ordering::SeqCst);
            q = self
                .me
                .ready
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            self.me.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Submissions without a drained outcome.
    pub fn in_flight(&self) -> usize {
        self.me.in_flight.load(Ordering::Acquire)
    }

    /// Submits one message and waits for its outcome (other outcomes stay
    /// queued). For simple callers; a shard uses `try_submit` and `drain`.
    /// Uses tickets from 2^63 up: do not mix with `submit` tickets that high.
    pub fn commit(&mut self, message: Message) -> CommitOutcome {
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        if self.submit(ticket, message, SystemTime::now()).is_err() {
            return CommitOutcome::Failed;
        }
        let mut q = self
            .me
            .completions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(pos) = q.iter().position(|c| c.0 == ticket) {
                let (_, outcome) = q.remove(pos).expect("position is in range");
                drop(q);
                self.me.in_flight.fetch_sub(1, Ordering::AcqRel);
                return outcome;
            }
            self.me.waiting.fetch_add(1, Ordering::SeqCst);
            q = self.me.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            self.me.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_to_shard_and_metrics_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Spool>();
        send_sync::<Producer>();
        send_sync::<SpoolConfig>();
    }

    #[test]
    fn queue_id_parts_round_trip_and_sort_by_time() {
        let a = queue_id_from_parts(1_795_253_400_000, 3, 42);
        assert_eq!(queue_id_parts(a), (1_795_253_400_000, 3, 42));
        let b = queue_id_from_parts(1_795_253_400_001, 0, 0);
        assert!(a < b && a.to_string() < b.to_string());
    }
}
