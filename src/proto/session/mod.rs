//! One LMTP connection as a state machine: bytes in, replies and messages out.
//!
//! The session never does I/O and never reads a clock. Its methods fall into
//! four kinds, as in quinn-proto:
//! - inputs: [`Session::handle_input`] (bytes from the client),
//!   [`Session::handle_commit`] (the spool's outcome for a message),
//!   [`Session::handle_timeout`] (the time has come);
//! - commands: [`Session::begin_shutdown`];
//! - outputs, polled after every input, in this order:
//!   [`Session::poll_spool`] (a complete message to hand to a spool writer),
//!   [`Session::poll_output`] (reply bytes to send, all replies of a pipelined
//!   batch coalesced), [`Session::poll_timeout`] (when to call
//!   `handle_timeout`), then [`Session::is_closing`] (close once the output is
//!   sent);
//! - getters.
//!
//! The durability promise lives in this API: the `250` after the data is only
//! ever written by `handle_commit` with [`CommitOutcome::Committed`]. While a
//! message waits for its outcome the session takes no further input:
//! `handle_input` returns how many bytes it consumed and the caller keeps the
//! rest (for example a pipelined QUIT) until the outcome has been handled, then
//! feeds them again. That keeps every reply in order (RFC 2033 section 4.2:
//! one reply per accepted recipient, in RCPT order, duplicates included, before
//! anything that follows) and bounds what a session holds to one message.
//!
//! Memory per session: the partial command line (at most
//! `Limits::line_bytes_max`), the replies not yet polled, and the body being
//! received (at most `Limits::message_bytes_max`).

use std::sync::Arc;
use std::time::Instant;

use super::address::split_detail;
use super::command::{self, Command};
use super::limits::{BareLineEndings, Limits};
use super::policy::{AcceptAll, RcptVerdict, RecipientPolicy};
use super::reply::{self, Delivery};
use super::unstuff::{BodyStats, ChunkScanner, Unstuffer};
use crate::envelope::{
    BodyType, ClientInfo, CommitOutcome, Envelope, MailParams, Message, Recipient, ReversePath,
    TransactionId,
};

#[cfg(test)]
mod tests;

/// Settings shared by every session of a server (behind an `Arc`).
pub struct SessionConfig {
    /// The name in the greeting, the LHLO reply and the 421s.
    pub hostname: String,
    pub limits: Limits,
    pub bare_line_endings: BareLineEndings,
    /// Characters that split `user+tag` local parts (Postfix's
    /// `recipient_delimiter`); empty: no split.
    pub detail_delimiters: String,
    pub policy: Arc<dyn RecipientPolicy>,
}

impl SessionConfig {
    /// Default limits and policies, under the given host name.
    pub fn new(hostname: impl Into<String>) -> Self {
        SessionConfig {
            hostname: hostname.into(),
            limits: Limits::default(),
            bare_line_endings: BareLineEndings::default(),
            detail_delimiters: "+".into(),
            policy: Arc::new(AcceptAll),
        }
    }
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("hostname", &self.hostname)
            .field("limits", &self.limits)
            .field("bare_line_endings", &self.bare_line_endings)
            .field("detail_delimiters", &self.detail_delimiters)
            .finish_non_exhaustive()
    }
}

/// Names one message handed to the spool, so its outcome finds its way back.
/// Unique within a session (the transaction's sequence number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(pub u32);

/// A complete message for a spool writer.
#[derive(Debug)]
pub struct SpoolRequest {
    pub ticket: Ticket,
    pub message: Message,
}

/// Where a BDAT transaction's content goes.
#[derive(Debug)]
enum BdatSink {
    /// 7BIT / 8BITMIME: bare CR / LF and NUL are counted (and normalized).
    Text(ChunkScanner),
    /// BINARYMIME: stored as is, only bounded.
    Binary(BodyStats),
}

/// The open mail transaction (after MAIL).
#[derive(Debug)]
struct Txn {
    reverse_path: ReversePath,
    params: MailParams,
    recipients: Vec<Recipient>,
    body: Vec<u8>,
    /// Set by the first BDAT; DATA is refused after it.
    bdat: Option<BdatSink>,
    /// A RCPT of this transaction was refused. A pipelining client sends
    /// DATA (or BDAT) without waiting for the RCPT replies (RFC 2920 section
    /// 3.1), so the `503` it then gets, when every recipient was refused, is
    /// no client error: it does not count toward `bad_commands_max` (else an
    /// MTA's cached connection is closed after 20 messages to unknown users).
    rcpt_refused: bool,
}

/// What the session is reading.
#[derive(Debug)]
enum Phase {
    /// Command lines.
    Command,
    /// Message data after `354`, up to `<CRLF>.<CRLF>`.
    Data(Unstuffer),
    /// A BDAT chunk: `remaining` bytes still to read. `refusal` is the reply
    /// owed instead of accepting it (no transaction); the chunk is read and
    /// dropped either way, as RFC 3030 requires.
    Bdat {
        size: u64,
        remaining: u64,
        last: bool,
        refusal: Option<&'static [u8]>,
    },
    /// A message is with the spool; input waits.
    AwaitCommit(Ticket),
    /// QUIT or a 421 was answered; input is ignored.
    Closed,
}

/// Initial body buffer: what `SIZE=` promises, within bounds. The cap keeps a
/// lying `SIZE=` from reserving the whole message limit up front.
const BODY_RESERVE_MAX: usize = 1024 * 1024;
const BODY_RESERVE_DEFAULT: usize = 16 * 1024;

/// One LMTP session. See the module docs for the calling order.
pub struct Session {
    cfg: Arc<SessionConfig>,
    client: ClientInfo,
    session_id: u64,
    /// Number of the next transaction.
    txn_seq: u32,
    lhlo_seen: bool,
    txn: Option<Txn>,
    phase: Phase,
    /// A command line that arrived in pieces, at most `line_bytes_max`.
    line: Vec<u8>,
    /// The current line passed `line_bytes_max`: drop it up to its LF.
    line_overflow: bool,
    out: Vec<u8>,
    spool: Option<SpoolRequest>,
    /// Addresses owed a reply when the pending commit outcome arrives.
    pending_rcpts: Vec<String>,
    bad_commands: u32,
    deadline: Option<Instant>,
    shutting_down: bool,
    /// The spool has no room: MAIL answers `452 4.3.1` (set by the caller).
    storage_full: bool,
    stats: SessionStats,
}

/// Counters of one session, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Messages handed to the spool.
    pub messages: u64,
    /// Messages refused after their data (too big, NUL, bare CR/LF).
    pub messages_refused: u64,
    /// Recipients in committed messages.
    pub recipients_delivered: u64,
    pub bare_cr: u64,
    pub bare_lf: u64,
    /// Messages refused because they held bare CR or LF (policy `reject`).
    pub messages_refused_bare_line_endings: u64,
    pub bad_commands: u64,
}

impl Session {
    /// A new session for a connection from `peer`; the greeting is queued.
    /// `session_id` names the connection in transaction ids and logs.
    pub fn new(cfg: Arc<SessionConfig>, peer: String, session_id: u64, now: Instant) -> Self {
        let mut out = Vec::with_capacity(256);
        reply::greeting(&mut out, &cfg.hostname);
        let deadline = Some(now + cfg.limits.idle_timeout);
        Session {
            cfg,
            client: ClientInfo {
                peer,
                lhlo: String::new(),
            },
            session_id,
            txn_seq: 0,
            lhlo_seen: false,
            txn: None,
            phase: Phase::Command,
            line: Vec::new(),
            line_overflow: false,
            out,
            spool: None,
            pending_rcpts: Vec::new(),
            bad_commands: 0,
            deadline,
            shutting_down: false,
            storage_full: false,
            stats: SessionStats::default(),
        }
    }

    // ---- getters -------------------------------------------------------------

    pub fn client(&self) -> &ClientInfo {
        &self.client
    }

    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// A message is with the spool and input is paused until its outcome.
    pub fn is_awaiting_commit(&self) -> bool {
        matches!(self.phase, Phase::AwaitCommit(_))
    }

    /// The session is over: send what `poll_output` gives, then close.
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    // ---- inputs --------------------------------------------------------------

    /// Takes bytes from the client and returns how many were consumed. All of
    /// `input` is consumed unless a message is waiting for its commit outcome:
    /// then the caller keeps the rest and feeds it again after
    /// `handle_commit`. After the session closed, input is consumed and
    /// ignored.
    pub fn handle_input(&mut self, now: Instant, input: &[u8]) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match &mut self.phase {
                Phase::Closed => pos = input.len(),
                Phase::AwaitCommit(_) => break,
                Phase::Command => pos += self.read_command(rest),
                Phase::Data(unstuffer) => {
                    let txn = self.txn.as_mut().expect("DATA phase has a transaction");
                    let feed = unstuffer.feed(rest, &mut txn.body);
                    pos += feed.consumed;
                    if feed.done {
                        let stats = *unstuffer.stats();
                        self.end_message(stats);
                    }
                }
                Phase::Bdat { remaining, .. } => {
                    let n = (*remaining).min(rest.len() as u64) as usize;
                    *remaining -= n as u64;
                    let chunk_done = *remaining == 0;
                    if let Some(txn) = self.txn.as_mut() {
                        match &mut txn.bdat {
                            Some(BdatSink::Text(scanner)) => {
                                scanner.feed(&rest[..n], &mut txn.body)
                            }
                            Some(BdatSink::Binary(stats)) => append_bounded(
                                &mut txn.body,
                                stats,
                                self.cfg.limits.message_bytes_max,
                                &rest[..n],
                            ),
                            None => {}
                        }
                    }
                    pos += n;
                    if chunk_done {
                        self.end_chunk();
                    }
                }
            }
        }
        if pos > 0 {
            self.refresh_deadline(now);
        }
        self.shutdown_if_idle();
        pos
    }

    /// The spool's outcome for the message `ticket`: queues one reply per
    /// accepted recipient, in order. Returns false (and changes nothing) if no
    /// message with that ticket is pending: a caller bug.
    pub fn handle_commit(&mut self, now: Instant, ticket: Ticket, outcome: CommitOutcome) -> bool {
        match self.phase {
            Phase::AwaitCommit(t) if t == ticket => {}
            _ => return false,
        }
        let delivery = match outcome {
            CommitOutcome::Committed(id) => {
                self.stats.recipients_delivered += self.pending_rcpts.len() as u64;
                Delivery::Saved(id)
            }
            CommitOutcome::Failed => Delivery::TempFailure,
            CommitOutcome::StorageFull => Delivery::StorageFull,
        };
        for addr in self.pending_rcpts.drain(..) {
            reply::delivery(&mut self.out, &addr, delivery);
        }
        self.phase = Phase::Command;
        self.refresh_deadline(now);
        self.shutdown_if_idle();
        true
    }

    /// Call when `poll_timeout`'s instant has passed: the session answers
    /// `421 4.4.2` and closes. A message being received is dropped, never
    /// stored. Waiting for a commit outcome never times out (the wait is the
    /// server's, not the client's).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) {
            reply::timeout(&mut self.out, &self.cfg.hostname);
            self.close();
        }
    }

    // ---- commands ------------------------------------------------------------

    /// Tells the session whether the spool has room. While it has none, MAIL
    /// answers `452 4.3.1` so the client keeps the message queued without
    /// sending its data first; a transaction already open goes on (its
    /// commit answers for itself). The caller sets this before feeding input.
    pub fn set_storage_full(&mut self, full: bool) {
        self.storage_full = full;
    }

    /// The server is stopping: an idle session gets `421 4.3.2` now; one in
    /// the middle of a transaction finishes it (the message is committed and
    /// answered) and gets the 421 then. The caller bounds how long it waits.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        self.shutdown_if_idle();
    }

    // ---- outputs -------------------------------------------------------------

    /// A complete message to hand to the spool; at most one at a time.
    pub fn poll_spool(&mut self) -> Option<SpoolRequest> {
        self.spool.take()
    }

    /// Appends the pending reply bytes to `out`; false if there were none.
    ///
    /// While a message waits for its commit outcome, the replies before it
    /// are held and go out with its per-recipient replies, in one write. A
    /// pipelining client that sent its whole transaction at once (Exim's
    /// `MAIL`, `RCPT`s and `BDAT n LAST` with the content; a client that
    /// sends the body without waiting for the `354`) waits for the last reply
    /// before it does anything else, so holding its envelope replies for the
    /// commit costs it nothing, and saves a send and a wake-up on both sides
    /// per message (RFC 2920 section 3.2 asks servers to send grouped
    /// replies as a unit). The server is not waiting for input meanwhile (it
    /// takes none until the outcome), so nobody waits on the other.
    pub fn poll_output(&mut self, out: &mut Vec<u8>) -> bool {
        if self.out.is_empty() || self.is_awaiting_commit() {
            return false;
        }
        if out.is_empty() {
            std::mem::swap(out, &mut self.out);
        } else {
            out.append(&mut self.out);
        }
        true
    }

    /// When `handle_timeout` must be called; `None` while waiting for the
    /// spool or once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    // ---- internals -----------------------------------------------------------

    fn refresh_deadline(&mut self, now: Instant) {
        let limits = &self.cfg.limits;
        self.deadline = match self.phase {
            Phase::Command => Some(now + limits.idle_timeout),
            Phase::Data(_) | Phase::Bdat { .. } => Some(now + limits.data_timeout),
            Phase::AwaitCommit(_) | Phase::Closed => None,
        };
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.txn = None;
        self.deadline = None;
        self.line = Vec::new();
    }

    /// During shutdown, close as soon as no transaction is open.
    fn shutdown_if_idle(&mut self) {
        if self.shutting_down
            && matches!(self.phase, Phase::Command)
            && self.txn.is_none()
            && self.line.is_empty()
        {
            reply::shutting_down(&mut self.out, &self.cfg.hostname);
            self.close();
        }
    }

    fn bad_command(&mut self) {
        self.bad_commands += 1;
        self.stats.bad_commands += 1;
        if self.bad_commands >= self.cfg.limits.bad_commands_max {
            reply::too_many_errors(&mut self.out, &self.cfg.hostname);
            self.close();
        }
    }

    /// Reads (part of) one command line from `rest`; returns bytes consumed.
    fn read_command(&mut self, rest: &[u8]) -> usize {
        let max = self.cfg.limits.line_bytes_max;
        let Some(lf) = memchr::memchr(b'\n', rest) else {
            // A partial line: keep it unless it is already too long. Written
            // as `room < len` so it cannot overflow.
            if !self.line_overflow {
                if max - self.line.len() < rest.len() {
                    self.line_overflow = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(rest);
                }
            }
            return rest.len();
        };
        let piece = &rest[..lf];
        // The limit counts the line with its line ending.
        if self.line_overflow || max - self.line.len() < piece.len() + 1 {
            self.line_overflow = false;
            self.line.clear();
            self.out.extend_from_slice(reply::LINE_TOO_LONG);
            self.bad_command();
        } else if self.line.is_empty() {
            // The common case: the whole line is in this input; no copy.
            self.execute(strip_cr(piece));
        } else {
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(piece);
            self.execute(strip_cr(&line));
            line.clear();
            // Keep the allocation unless a closed session dropped it.
            if !self.is_closing() {
                self.line = line;
            }
        }
        lf + 1
    }

    fn execute(&mut self, line: &[u8]) {
        let utf8 = self.txn.as_ref().is_some_and(|t| t.params.smtputf8);
        let cmd = match command::parse(line, utf8) {
            Ok(c) => c,
            Err(e) => {
                reply::command_error(&mut self.out, &e);
                self.bad_command();
                return;
            }
        };
        match cmd {
            Command::Lhlo(name) => {
                self.client.lhlo = name;
                self.lhlo_seen = true;
                self.txn = None;
                reply::lhlo(&mut self.out, &self.cfg.hostname, &self.cfg.limits);
            }
            Command::HeloEhlo => self.refuse(reply::USE_LHLO),
            Command::Mail { path, params } => self.mail(path, params),
            Command::Rcpt(mailbox) => self.rcpt(mailbox),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.txn = None;
                self.out.extend_from_slice(reply::OK);
            }
            Command::Noop => self.out.extend_from_slice(reply::OK),
            Command::Vrfy => self.out.extend_from_slice(reply::VRFY),
            Command::Quit => {
                self.out.extend_from_slice(reply::BYE);
                self.close();
            }
        }
    }

    /// A sequence or protocol error: the reply, and it counts as bad.
    fn refuse(&mut self, text: &[u8]) {
        self.out.extend_from_slice(text);
        self.bad_command();
    }

    /// DATA or BDAT refused: a bad command, unless every recipient was
    /// refused and the client could not have known (see `Txn::rcpt_refused`).
    fn refuse_data(&mut self, text: &[u8]) {
        let after_refused_rcpts = self
            .txn
            .as_ref()
            .is_some_and(|t| t.recipients.is_empty() && t.rcpt_refused);
        if after_refused_rcpts {
            self.out.extend_from_slice(text);
        } else {
            self.refuse(text);
        }
    }

    fn mail(&mut self, reverse_path: ReversePath, params: MailParams) {
        if !self.lhlo_seen {
            return self.refuse(reply::NEED_LHLO);
        }
        if self.txn.is_some() {
            return self.refuse(reply::NESTED_MAIL);
        }
        if params
            .size
            .is_some_and(|s| s > self.cfg.limits.message_bytes_max as u64)
        {
            self.out.extend_from_slice(reply::SIZE_TOO_BIG);
            return;
        }
        if self.storage_full {
            self.out.extend_from_slice(reply::STORAGE_FULL);
            return;
        }
        self.txn = Some(Txn {
            reverse_path,
            params,
            recipients: Vec::new(),
            body: Vec::new(),
            bdat: None,
            rcpt_refused: false,
        });
        self.out.extend_from_slice(reply::MAIL_OK);
    }

    fn rcpt(&mut self, mailbox: crate::envelope::Mailbox) {
        let Some(txn) = self.txn.as_mut() else {
            return self.refuse(reply::NEED_MAIL);
        };
        if txn.recipients.len() >= self.cfg.limits.recipients_max {
            txn.rcpt_refused = true;
            self.out.extend_from_slice(reply::TOO_MANY_RCPTS);
            return;
        }
        let rcpt = split_detail(mailbox, &self.cfg.detail_delimiters);
        match self.cfg.policy.check(&rcpt) {
            RcptVerdict::Accept => {
                txn.recipients.push(rcpt);
                self.out.extend_from_slice(reply::RCPT_OK);
            }
            RcptVerdict::Unknown => {
                txn.rcpt_refused = true;
                reply::user_unknown(&mut self.out, &rcpt.mailbox.address())
            }
            RcptVerdict::TempFail => {
                txn.rcpt_refused = true;
                reply::rcpt_tempfail(&mut self.out, &rcpt.mailbox.address())
            }
        }
    }

    fn data(&mut self) {
        let refusal = match &self.txn {
            None => Some(reply::NEED_MAIL),
            Some(t) if t.recipients.is_empty() => Some(reply::NEED_RCPT),
            Some(t) if t.bdat.is_some() => Some(reply::DATA_AFTER_BDAT),
            Some(t) if t.params.body == Some(BodyType::BinaryMime) => {
                Some(reply::BINARY_NEEDS_BDAT)
            }
            Some(_) => None,
        };
        if let Some(text) = refusal {
            return self.refuse_data(text);
        }
        let limits = &self.cfg.limits;
        let txn = self.txn.as_mut().expect("checked above");
        txn.body = Vec::with_capacity(body_reserve(txn.params.size, limits.message_bytes_max));
        let normalize = self.cfg.bare_line_endings == BareLineEndings::Normalize;
        self.phase = Phase::Data(Unstuffer::new(normalize, limits.message_bytes_max));
        self.out.extend_from_slice(reply::DATA_GO);
    }

    fn bdat(&mut self, size: u64, last: bool) {
        let refusal = match &self.txn {
            None => Some(reply::NEED_MAIL),
            Some(t) if t.recipients.is_empty() => Some(reply::NEED_RCPT),
            Some(_) => None,
        };
        if refusal.is_none() {
            let limits = &self.cfg.limits;
            let normalize = self.cfg.bare_line_endings == BareLineEndings::Normalize;
            let txn = self.txn.as_mut().expect("checked above");
            if txn.bdat.is_none() {
                txn.body = Vec::with_capacity(body_reserve(
                    txn.params.size.or(Some(size)),
                    limits.message_bytes_max,
                ));
                txn.bdat = Some(if txn.params.body == Some(BodyType::BinaryMime) {
                    BdatSink::Binary(BodyStats::default())
                } else {
                    BdatSink::Text(ChunkScanner::new(normalize, limits.message_bytes_max))
                });
            }
        }
        self.phase = Phase::Bdat {
            size,
            remaining: size,
            last,
            refusal,
        };
        if size == 0 {
            self.end_chunk();
        }
    }

    /// The current BDAT chunk has been read in full.
    fn end_chunk(&mut self) {
        let Phase::Bdat {
            size,
            last,
            refusal,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Command)
        else {
            unreachable!("end_chunk outside a BDAT chunk");
        };
        if let Some(text) = refusal {
            return self.refuse_data(text);
        }
        if !last {
            reply::bdat_chunk(&mut self.out, size);
            return;
        }
        let txn = self.txn.as_mut().expect("BDAT chunk has a transaction");
        let stats = match txn.bdat.as_mut().expect("BDAT sink set") {
            BdatSink::Text(scanner) => {
                scanner.finish(&mut txn.body);
                *scanner.stats()
            }
            BdatSink::Binary(stats) => *stats,
        };
        self.end_message(stats);
    }

    /// The data of the open transaction is complete: refuse it, or hand it to
    /// the spool and wait for the outcome.
    fn end_message(&mut self, stats: BodyStats) {
        let txn = self
            .txn
            .take()
            .expect("a message ends inside a transaction");
        let seq = self.txn_seq;
        self.txn_seq = self.txn_seq.wrapping_add(1);
        self.stats.bare_cr += stats.bare_cr;
        self.stats.bare_lf += stats.bare_lf;
        let binary = txn.params.body == Some(BodyType::BinaryMime);
        let refusal = if stats.oversize {
            Some(Delivery::TooBig)
        } else if stats.nul > 0 && !binary {
            Some(Delivery::Nul)
        } else if self.cfg.bare_line_endings == BareLineEndings::Reject
            && stats.bare_cr + stats.bare_lf > 0
        {
            Some(Delivery::BareLineEnding)
        } else {
            None
        };
        if let Some(d) = refusal {
            self.stats.messages_refused += 1;
            if d == Delivery::BareLineEnding {
                self.stats.messages_refused_bare_line_endings += 1;
            }
            for r in &txn.recipients {
                reply::delivery(&mut self.out, &r.mailbox.address(), d);
            }
            self.phase = Phase::Command;
            return;
        }
        self.stats.messages += 1;
        self.pending_rcpts.clear();
        self.pending_rcpts
            .extend(txn.recipients.iter().map(|r| r.mailbox.address()));
        let ticket = Ticket(seq);
        self.spool = Some(SpoolRequest {
            ticket,
            message: Message {
                envelope: Envelope {
                    reverse_path: txn.reverse_path,
                    params: txn.params,
                    recipients: txn.recipients,
                    client: self.client.clone(),
                    transaction: TransactionId {
                        session: self.session_id,
                        seq,
                    },
                },
                body: txn.body,
            },
        });
        self.phase = Phase::AwaitCommit(ticket);
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.session_id)
            .field("client", &self.client)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn body_reserve(size_hint: Option<u64>, max: usize) -> usize {
    match size_hint {
        Some(s) => (s.min(max as u64) as usize).min(BODY_RESERVE_MAX),
        None => BODY_RESERVE_DEFAULT.min(max),
    }
}

/// Appends BINARYMIME content, never growing `body` past `max`.
fn append_bounded(body: &mut Vec<u8>, stats: &mut BodyStats, max: usize, bytes: &[u8]) {
    stats.bytes_in += bytes.len() as u64;
    stats.bytes_out += bytes.len() as u64;
    if stats.oversize || max - body.len() < bytes.len() {
        stats.oversize = true;
        return;
    }
    body.extend_from_slice(bytes);
}
