//! The part of a shard that is the same for every I/O backend: the table of
//! connections, their sessions, the hand-off to the spool and back, the
//! per-shard memory bound, timeouts and shutdown.
//!
//! The backend (io_uring or epoll) owns the sockets and does the system calls;
//! it tells the core what happened (`open`, `input`, `hang_up`, a wake-up from
//! the spool, the time) and asks it what to do (`take_output`, `wants_read`,
//! `should_close`). The core never touches a file descriptor, so its logic is
//! tested without sockets.
//!
//! Invariants:
//! - a connection whose message is with the spool reads nothing more: its
//!   unconsumed input is `held`, and it is fed again after the outcome;
//! - `inflight_bytes` is the sum of the bodies handed to the spool and not yet
//!   answered, plus bodies waiting for room in the spool's queue; while it is
//!   at or over `inflight_bytes_max`, `wants_read` is false for everyone, so
//!   TCP pushes back on the clients instead of memory growing;
//! - a connection that goes away while its message is with the spool keeps its
//!   slot (without a session) until the outcome arrives, so tickets stay
//!   unambiguous and the byte count stays exact.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::envelope::{CommitOutcome, Message};
use crate::metrics::{ShardMetrics, bump};
use crate::proto::{Session, SessionConfig, SpoolRequest, Ticket};
use crate::spool::{Producer, RejectReason};

/// Index of a connection in its shard's table.
pub type Slot = usize;

/// One message of one connection, as logged when its outcome arrives.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub session_id: u64,
    pub peer: String,
    pub transaction: u32,
    pub sender: String,
    pub recipients: usize,
    /// The recipients' addresses as given, for the per-recipient log line.
    pub rcpts: Vec<String>,
    pub body_bytes: usize,
    pub outcome: CommitOutcome,
    /// From the final dot until the spool took the message (longer when
    /// the spool's queues were full).
    pub queue_latency: std::time::Duration,
    pub commit_latency: std::time::Duration,
}

struct Conn {
    /// `None` once the client has gone while its message was with the spool.
    session: Option<Session>,
    /// Input the session did not take yet (it was waiting for an outcome).
    held: Vec<u8>,
    /// The message with the spool: its session ticket, body size, when it went,
    /// and what the log line needs.
    in_spool: Option<InSpool>,
    /// A message the spool's queues had no room for; retried after outcomes.
    waiting: Option<(Ticket, Message)>,
    /// When the waiting message's final dot arrived.
    waiting_since: Instant,
    /// The session's (bare CR, bare LF, refused for bare line endings)
    /// counts already added to the shard's metrics.
    counted: [u64; 3],
    generation: u32,
}

/// Adds what a session counted since the last call to the shard's metrics.
fn count_session(m: &ShardMetrics, counted: &mut [u64; 3], session: &Session) {
    let s = session.stats();
    let now = [s.bare_cr, s.bare_lf, s.messages_refused_bare_line_endings];
    let targets = [
        &m.bare_cr,
        &m.bare_lf,
        &m.messages_refused_bare_line_endings,
    ];
    for ((seen, n), c) in counted.iter_mut().zip(now).zip(targets) {
        if n > *seen {
            bump(c, n - *seen);
            *seen = n;
        }
    }
}

struct InSpool {
    ticket: Ticket,
    body_bytes: usize,
    submitted: Instant,
    dot: Instant,
    sender: String,
    rcpts: Vec<String>,
}

/// Shard-wide counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoreStats {
    pub connections_opened: u64,
    pub connections_open: u64,
    pub messages_committed: u64,
    pub messages_failed: u64,
    pub spool_queue_full: u64,
}

/// The server-wide count of open connections, shared by every shard, against
/// `server.connections_max`. SO_REUSEPORT does not spread connections evenly
/// over shards, so a per-shard share of the limit would refuse clients early.
/// Two shards admitting at the same moment can pass the check together, so the
/// count may exceed the limit by at most shards - 1.
#[derive(Debug)]
pub struct ConnectionLimit {
    open: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit {
            open: std::sync::atomic::AtomicUsize::new(0),
            max,
        })
    }

    /// No room for another connection: refuse it (`421`).
    pub fn is_full(&self) -> bool {
        self.open.load(std::sync::atomic::Ordering::Relaxed) >= self.max
    }

    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn opened(&self) {
        self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub struct ShardCore {
    cfg: Arc<SessionConfig>,
    producer: Producer,
    conns: Vec<Option<Conn>>,
    free: Vec<Slot>,
    /// Generation counter so a ticket never names a reused slot.
    generation: u32,
    shard_id: u16,
    session_seq: u64,
    inflight_bytes: usize,
    inflight_bytes_max: usize,
    /// Connections with a message waiting for room in the spool, oldest first.
    retry: VecDeque<Slot>,
    /// Connections whose state changed since the backend last looked: they may
    /// have output, want to read again, or want to close.
    dirty: Vec<Slot>,
    completions: Vec<(u64, CommitOutcome)>,
    delivered: Vec<Delivered>,
    shutting_down: bool,
    stats: CoreStats,
    /// Read by the metrics endpoint; written only here.
    metrics: Arc<ShardMetrics>,
    /// Open connections of the whole server (all shards).
    connections: Arc<ConnectionLimit>,
    /// How connections are spread over the shards (`None`: a lone shard).
    balance: Option<Arc<super::balance::Balance>>,
}

impl ShardCore {
    pub fn new(
        cfg: Arc<SessionConfig>,
        producer: Producer,
        shard_id: u16,
        inflight_bytes_max: usize,
    ) -> Self {
        ShardCore {
            cfg,
            producer,
            conns: Vec::new(),
            free: Vec::new(),
            generation: 0,
            shard_id,
            session_seq: 0,
            inflight_bytes: 0,
            inflight_bytes_max,
            retry: VecDeque::new(),
            dirty: Vec::new(),
            completions: Vec::new(),
            delivered: Vec::new(),
            shutting_down: false,
            stats: CoreStats::default(),
            metrics: Arc::new(ShardMetrics::default()),
            connections: ConnectionLimit::new(usize::MAX),
            balance: None,
        }
    }

    /// Joins the shards' connection balancing (`io::balance`): sessions
    /// that end here are counted off this shard.
    pub fn with_balance(mut self, balance: Arc<super::balance::Balance>) -> Self {
        self.balance = Some(balance);
        self
    }

    /// Where a connection this shard just accepted should go (see
    /// `Balance::place`): `Some` to open it here.
    pub fn place(
        &self,
        fd: std::os::fd::OwnedFd,
        listener: usize,
    ) -> Option<super::balance::Handoff> {
        match &self.balance {
            Some(b) => b.place(self.shard_id as usize, fd, listener),
            None => Some(super::balance::Handoff { fd, listener }),
        }
    }

    /// A connection counted on this shard by `place` ended: refused before
    /// it became a session (allow-list, connection limit), or closed.
    pub fn release_placement(&self) {
        if let Some(b) = &self.balance {
            b.release(self.shard_id as usize);
        }
    }

    /// The server-wide connection count this shard counts into.
    pub fn connection_limit(&self) -> &ConnectionLimit {
        &self.connections
    }

    /// Shares `limit` with the other shards: every connection this shard
    /// opens or closes counts against the server-wide `connections_max`.
    pub fn with_connection_limit(mut self, limit: Arc<ConnectionLimit>) -> Self {
        self.connections = limit;
        self
    }

    /// This shard's counters, for the metrics endpoint.
    pub fn metrics(&self) -> Arc<ShardMetrics> {
        self.metrics.clone()
    }

    /// The same, borrowed (for `io::admit`).
    pub fn metrics_ref(&self) -> &ShardMetrics {
        &self.metrics
    }

    /// Publishes the gauges (one relaxed store each).
    fn publish_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics
            .connections_open
            .store(self.stats.connections_open, Relaxed);
        self.metrics
            .inflight_bytes
            .store(self.inflight_bytes as u64, Relaxed);
    }

    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    /// Bytes of message bodies handed over and not yet answered.
    pub fn inflight_bytes(&self) -> usize {
        self.inflight_bytes
    }

    /// The memory bound is reached: nobody reads until outcomes return.
    pub fn is_paused(&self) -> bool {
        self.inflight_bytes >= self.inflight_bytes_max
    }

    /// Open connections (zombies waiting for an outcome excluded).
    pub fn open_connections(&self) -> usize {
        self.stats.connections_open as usize
    }

    /// Slots in use, zombies included: the backend may stop only at zero.
    pub fn slots_in_use(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    /// A new connection from `peer`; its greeting is queued.
    pub fn open(&mut self, now: Instant, peer: String) -> Slot {
        self.session_seq += 1;
        let session_id = ((self.shard_id as u64) << 48) | (self.session_seq & ((1 << 48) - 1));
        let mut session = Session::new(self.cfg.clone(), peer, session_id, now);
        if self.shutting_down {
            session.begin_shutdown();
        }
        self.generation = self.generation.wrapping_add(1);
        let conn = Conn {
            session: Some(session),
            held: Vec::new(),
            in_spool: None,
            waiting: None,
            waiting_since: now,
            counted: [0; 3],
            generation: self.generation,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.stats.connections_opened += 1;
        self.stats.connections_open += 1;
        self.connections.opened();
        bump(&self.metrics.connections_opened, 1);
        self.publish_gauges();
        self.dirty.push(slot);
        slot
    }

    /// Bytes read from `slot`'s socket. The backend calls this only while
    /// `wants_read(slot)` is true, but a few bytes more (already received)
    /// are kept, not lost.
    pub fn input(&mut self, now: Instant, slot: Slot, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(session) = conn.session.as_mut() else {
            return;
        };
        session.set_storage_full(self.producer.is_storage_full());
        if conn.held.is_empty() {
            let n = session.handle_input(now, bytes);
            if n < bytes.len() {
                conn.held.extend_from_slice(&bytes[n..]);
            }
            count_session(&self.metrics, &mut conn.counted, session);
        } else {
            conn.held.extend_from_slice(bytes);
        }
        self.after_input(now, slot);
        self.publish_gauges();
        self.dirty.push(slot);
    }

    /// Takes what the session produced: a message for the spool.
    fn after_input(&mut self, now: Instant, slot: Slot) {
        let conn = self.conns[slot].as_mut().expect("live slot");
        let Some(session) = conn.session.as_mut() else {
            return;
        };
        if let Some(SpoolRequest { ticket, message }) = session.poll_spool() {
            self.inflight_bytes += message.body.len();
            conn.waiting = Some((ticket, message));
            conn.waiting_since = now;
            self.submit(now, slot);
        }
    }

    /// Hands `slot`'s waiting message to the spool, or queues it for a retry.
    fn submit(&mut self, now: Instant, slot: Slot) {
        let conn = self.conns[slot].as_mut().expect("live slot");
        let Some((ticket, message)) = conn.waiting.take() else {
            return;
        };
        let spool_ticket = ((slot as u64) << 32) | conn.generation as u64;
        let info = InSpool {
            ticket,
            body_bytes: message.body.len(),
            submitted: now,
            dot: conn.waiting_since,
            sender: message.envelope.reverse_path.to_string(),
            rcpts: message
                .envelope
                .recipients
                .iter()
                .map(|r| r.mailbox.address())
                .collect(),
        };
        match self
            .producer
            .try_submit(spool_ticket, message, SystemTime::now())
        {
            Ok(()) => conn.in_spool = Some(info),
            Err(rejected) => match rejected.reason {
                RejectReason::QueueFull | RejectReason::InFlightFull => {
                    self.stats.spool_queue_full += 1;
                    conn.waiting = Some((ticket, rejected.message));
                    self.retry.push_back(slot);
                }
                RejectReason::Closed => {
                    // The spool is stopping: the message is not stored.
                    self.inflight_bytes -= info.body_bytes;
                    if let Some(s) = conn.session.as_mut() {
                        s.handle_commit(now, ticket, CommitOutcome::Failed);
                    }
                    self.dirty.push(slot);
                }
            },
        }
    }

    /// The spool woke us: applies every outcome, feeds held input again,
    /// retries messages that found the spool's queues full.
    pub fn drain_completions(&mut self, now: Instant) {
        self.completions.clear();
        self.producer.drain(&mut self.completions);
        let completions = std::mem::take(&mut self.completions);
        for &(spool_ticket, outcome) in &completions {
            let slot = (spool_ticket >> 32) as usize;
            let generation = spool_ticket as u32;
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                debug_assert!(false, "outcome for an empty slot");
                continue;
            };
            if conn.generation != generation {
                debug_assert!(false, "outcome for a reused slot");
                continue;
            }
            let Some(info) = conn.in_spool.take() else {
                debug_assert!(false, "outcome without a message in the spool");
                continue;
            };
            self.inflight_bytes -= info.body_bytes;
            match outcome {
                CommitOutcome::Committed(_) => {
                    self.stats.messages_committed += 1;
                    bump(&self.metrics.messages, 1);
                    bump(&self.metrics.recipients, info.rcpts.len() as u64);
                    bump(&self.metrics.bytes, info.body_bytes as u64);
                }
                _ => self.stats.messages_failed += 1,
            }
            self.metrics.dot_to_reply_ns.observe(
                crate::metrics::LATENCY_BOUNDS_NS,
                now.saturating_duration_since(info.dot).as_nanos() as u64,
            );
            let Some(session) = conn.session.as_mut() else {
                // The client left while we were committing: free the slot now.
                self.conns[slot] = None;
                self.free.push(slot);
                continue;
            };
            self.delivered.push(Delivered {
                session_id: session.session_id(),
                peer: session.client().peer.clone(),
                transaction: info.ticket.0,
                sender: info.sender,
                recipients: info.rcpts.len(),
                rcpts: info.rcpts,
                body_bytes: info.body_bytes,
                outcome,
                queue_latency: info.submitted.saturating_duration_since(info.dot),
                commit_latency: now.saturating_duration_since(info.submitted),
            });
            session.handle_commit(now, info.ticket, outcome);
            // Feed the input that waited; it may complete another message.
            if !conn.held.is_empty() {
                let held = std::mem::take(&mut conn.held);
                session.set_storage_full(self.producer.is_storage_full());
                let n = session.handle_input(now, &held);
                count_session(&self.metrics, &mut conn.counted, session);
                conn.held = held;
                conn.held.drain(..n);
                self.after_input(now, slot);
            }
            self.dirty.push(slot);
        }
        self.completions = completions;
        self.publish_gauges();
        let retries = self.retry.len();
        for _ in 0..retries {
            let Some(slot) = self.retry.pop_front() else {
                break;
            };
            if self.conns[slot]
                .as_ref()
                .is_some_and(|c| c.waiting.is_some())
            {
                self.submit(now, slot);
            }
        }
    }

    /// Per-message results since the last call, for the delivery log.
    pub fn take_delivered(&mut self) -> std::vec::Drain<'_, Delivered> {
        self.delivered.drain(..)
    }

    /// Slots to look at (output, read interest, close), each at most once.
    pub fn take_dirty(&mut self, out: &mut Vec<Slot>) {
        self.dirty.sort_unstable();
        self.dirty.dedup();
        out.append(&mut self.dirty);
    }

    /// Appends `slot`'s pending reply bytes to `out`.
    pub fn take_output(&mut self, slot: Slot, out: &mut Vec<u8>) -> bool {
        let from = out.len();
        let got = self
            .conns
            .get_mut(slot)
            .and_then(Option::as_mut)
            .and_then(|c| c.session.as_mut())
            .is_some_and(|s| s.poll_output(out));
        if got {
            self.metrics.count_replies(&out[from..]);
        }
        got
    }

    /// Whether the backend should read from `slot` now.
    pub fn wants_read(&self, slot: Slot) -> bool {
        !self.is_paused()
            && self
                .conns
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|c| {
                    c.held.is_empty()
                        && c.in_spool.is_none()
                        && c.waiting.is_none()
                        && c.session.as_ref().is_some_and(|s| !s.is_closing())
                })
    }

    /// The server owes this connection something: a message is with the
    /// spool or waiting for room, or input waits to be fed. A client that
    /// half-closed is kept until it is not busy.
    pub fn is_busy(&self, slot: Slot) -> bool {
        self.conns
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.in_spool.is_some() || c.waiting.is_some() || !c.held.is_empty())
    }

    /// The session is over: close once its output has been sent.
    pub fn should_close(&self, slot: Slot) -> bool {
        self.conns
            .get(slot)
            .and_then(Option::as_ref)
            .and_then(|c| c.session.as_ref())
            .is_some_and(Session::is_closing)
    }

    /// The client hung up or the socket failed, or the backend closed it after
    /// `should_close`. A message being received is dropped; one with the spool
    /// is still committed (the slot waits for its outcome).
    pub fn hang_up(&mut self, slot: Slot) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if conn.session.take().is_none() {
            return;
        }
        self.stats.connections_open -= 1;
        self.connections.closed();
        if let Some(b) = &self.balance {
            b.release(self.shard_id as usize);
        }
        conn.held = Vec::new();
        if let Some((_, message)) = conn.waiting.take() {
            // Never reached the spool: nothing stored, nothing owed. Its
            // retry entry goes too, or a reuse of the slot would be queued
            // twice (rare: only when the spool's queues were full).
            self.inflight_bytes -= message.body.len();
            self.retry.retain(|&s| s != slot);
        }
        if conn.in_spool.is_none() {
            self.conns[slot] = None;
            self.free.push(slot);
        }
        self.publish_gauges();
    }

    /// When the next session deadline falls.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .filter_map(|c| c.as_ref()?.session.as_ref()?.poll_timeout())
            .min()
    }

    /// Lets every session whose deadline passed answer `421 4.4.2`.
    pub fn handle_timeouts(&mut self, now: Instant) {
        for (slot, c) in self.conns.iter_mut().enumerate() {
            if let Some(s) = c.as_mut().and_then(|c| c.session.as_mut()) {
                if s.poll_timeout().is_some_and(|d| now >= d) {
                    s.handle_timeout(now);
                    self.dirty.push(slot);
                }
            }
        }
    }

    /// Server shutdown: idle sessions get `421 4.3.2` now, busy ones after
    /// their transaction.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        for (slot, c) in self.conns.iter_mut().enumerate() {
            if let Some(s) = c.as_mut().and_then(|c| c.session.as_mut()) {
                s.begin_shutdown();
                self.dirty.push(slot);
            }
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Spool, SpoolConfig};
    use std::time::Duration;

    fn spool(name: &str, tweak: impl FnOnce(&mut SpoolConfig)) -> (Spool, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("lmtp-core-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = SpoolConfig::new(&dir);
        c.segment_bytes = 1 << 20;
        // Logic under test here, not durability: any filesystem will do.
        c.allow_tmpfs = true;
        tweak(&mut c);
        (Spool::open(c).unwrap().0, dir)
    }

    fn core(spool: &Spool, inflight_max: usize) -> ShardCore {
        let cfg = Arc::new(SessionConfig::new("mx.core"));
        ShardCore::new(cfg, spool.producer(None), 3, inflight_max)
    }

    fn output(core: &mut ShardCore, slot: Slot) -> String {
        let mut out = Vec::new();
        core.take_output(slot, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// Waits (bounded) until `done` holds, draining outcomes meanwhile.
    fn settle(core: &mut ShardCore, done: impl Fn(&ShardCore) -> bool) {
        for _ in 0..5000 {
            core.drain_completions(Instant::now());
            if done(core) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no outcome within 5 s");
    }

    const TXN: &[u8] = b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n";

    #[test]
    fn message_is_answered_after_commit_and_quit_waits() {
        let (spool, dir) = spool("basic", |_| {});
        let mut core = core(&spool, 1 << 20);
        let now = Instant::now();
        let slot = core.open(now, "127.0.0.1:9".into());
        assert!(output(&mut core, slot).starts_with("220 mx.core"));
        core.input(now, slot, TXN);
        assert!(
            !core.wants_read(slot),
            "no reading while the message is with the spool"
        );
        assert_eq!(core.inflight_bytes(), 7);
        // The whole transaction came in one batch: its replies are held for
        // the outcome and go out together (see `Session::poll_output`).
        assert_eq!(output(&mut core, slot), "");
        settle(&mut core, |c| c.inflight_bytes() == 0);
        let after = output(&mut core, slot);
        let (envelope, finals) = after
            .split_once("354 Start mail input; end with <CRLF>.<CRLF>\r\n")
            .expect("the envelope replies come first");
        assert!(envelope.starts_with("250-mx.core"), "{envelope}");
        let lines: Vec<&str> = finals.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 3, "{after}");
        assert!(lines[0].starts_with("250 2.0.0 <a@x> ") && lines[0].ends_with(" Saved"));
        assert!(lines[1].starts_with("250 2.0.0 <b@x> "));
        assert_eq!(
            lines[2], "221 2.0.0 Bye",
            "the held QUIT runs after the outcome"
        );
        assert!(core.should_close(slot));
        let d: Vec<Delivered> = core.take_delivered().collect();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].recipients, d[0].body_bytes), (2, 7));
        assert_eq!(d[0].sender, "<s@x>");
        core.hang_up(slot);
        assert_eq!(core.slots_in_use(), 0);
        assert_eq!(core.stats().messages_committed, 1);
        drop(spool);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn client_gone_during_commit_keeps_the_slot_until_the_outcome() {
        let (spool, dir) = spool("gone", |_| {});
        let mut core = core(&spool, 1 << 20);
        let now = Instant::now();
        let slot = core.open(now, "127.0.0.1:9".into());
        core.input(now, slot, TXN);
        core.hang_up(slot);
        assert_eq!(core.open_connections(), 0);
        assert_eq!(core.slots_in_use(), 1, "the slot waits for its outcome");
        settle(&mut core, |c| c.slots_in_use() == 0);
        assert_eq!(core.inflight_bytes(), 0);
        // A new connection may reuse the slot; it starts clean.
        let again = core.open(now, "127.0.0.1:10".into());
        assert_eq!(again, slot);
        assert!(output(&mut core, again).starts_with("220 "));
        drop(spool);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_client_leaving_mid_data_leaves_nothing() {
        let (spool, dir) = spool("middata", |_| {});
        let mut core = core(&spool, 1 << 20);
        let now = Instant::now();
        let slot = core.open(now, "127.0.0.1:9".into());
        core.input(
            now,
            slot,
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\npartial body",
        );
        core.hang_up(slot);
        assert_eq!((core.slots_in_use(), core.inflight_bytes()), (0, 0));
        drop(spool);
        assert!(crate::spool::reader::read_all(&dir).unwrap().0.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn memory_bound_pauses_reading_until_outcomes_return() {
        let (spool, dir) = spool("pause", |_| {});
        // Room for less than one body: the first message pauses the shard.
        let mut core = core(&spool, 4);
        let now = Instant::now();
        let a = core.open(now, "127.0.0.1:1".into());
        let b = core.open(now, "127.0.0.1:2".into());
        assert!(core.wants_read(a) && core.wants_read(b));
        core.input(now, a, TXN);
        assert!(core.is_paused());
        assert!(!core.wants_read(b), "every connection stops reading");
        settle(&mut core, |c| !c.is_paused());
        assert!(core.wants_read(b));
        drop(spool);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn full_spool_queue_is_retried_not_failed() {
        let (spool, dir) = spool("retry", |c| c.producer_inflight_max = 1);
        let mut core = core(&spool, 1 << 20);
        let now = Instant::now();
        let a = core.open(now, "127.0.0.1:1".into());
        let b = core.open(now, "127.0.0.1:2".into());
        core.input(now, a, TXN);
        core.input(now, b, TXN);
        assert_eq!(
            core.stats().spool_queue_full,
            1,
            "the second waits for room"
        );
        assert_eq!(core.inflight_bytes(), 14);
        settle(&mut core, |c| c.stats().messages_committed == 2);
        for slot in [a, b] {
            let out = output(&mut core, slot);
            assert_eq!(out.matches(" Saved\r\n").count(), 2, "{out}");
            assert!(out.ends_with("221 2.0.0 Bye\r\n"));
        }
        assert_eq!(core.inflight_bytes(), 0);
        drop(spool);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn shutdown_and_timeouts() {
        let (spool, dir) = spool("shutdown", |_| {});
        let mut core = core(&spool, 1 << 20);
        let now = Instant::now();
        let idle = core.open(now, "127.0.0.1:1".into());
        let busy = core.open(now, "127.0.0.1:2".into());
        core.input(
            now,
            busy,
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n",
        );
        core.begin_shutdown();
        assert!(core.should_close(idle));
        assert!(
            output(&mut core, idle)
                .ends_with("421 4.3.2 mx.core Service shutting down, closing connection\r\n")
        );
        assert!(
            !core.should_close(busy),
            "a transaction in flight finishes first"
        );
        let late = core.open(now, "127.0.0.1:3".into());
        assert!(
            core.should_close(late),
            "new connections during shutdown get the 421"
        );
        // The busy one times out if its client stalls.
        let later = now + Duration::from_secs(301);
        assert!(core.next_deadline().is_some_and(|d| d <= later));
        core.handle_timeouts(later);
        assert!(core.should_close(busy));
        assert!(
            output(&mut core, busy)
                .ends_with("421 4.4.2 mx.core Error: timeout exceeded, closing connection\r\n")
        );
        drop(spool);
        let _ = std::fs::remove_dir_all(dir);
    }
}
