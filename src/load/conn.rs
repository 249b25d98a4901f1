//! One client connection's LMTP state machine, with no I/O: the driver feeds
//! it the bytes it read and the time, and asks it what to write. It checks
//! every reply: the greeting, LHLO (PIPELINING offered when pipelining, a
//! `LIMITS RCPTMAX` no lower than our recipients), each envelope reply, the
//! `354`, and after the final dot exactly one reply per accepted recipient,
//! in RCPT order, each naming its recipient when it names an address at all
//! (RFC 2033 section 4.2; Postfix's `smtp-sink` names none, our server and
//! Dovecot do).
//!
//! Methods: inputs `handle_input`, `handle_eof`, `handle_timeout`; commands
//! `start_message`, `quit`; output `poll_transmit` (call it after every input
//! or command); getters `is_idle`, `is_closed`, `waiting_since`.
//!
//! Pipelining on: `MAIL`, every `RCPT`, `DATA` in one write; the body only
//! after the `354` (RFC 2920 section 3.1); one transaction at a time. Off:
//! one command, one reply.
//!
//! Chunking on (RFC 3030, what Exim's smtp transport sends over LMTP when
//! the server offers CHUNKING): `BDAT n LAST` and the unstuffed content take
//! the place of `DATA`, the `354` and the body. Pipelined, the whole
//! transaction is one write; the server answers the envelope, then once per
//! accepted recipient, or once in all when none was accepted (the BDAT is
//! refused). In lock-step the chunk follows the last RCPT's reply. Latency is
//! measured from the write that carries the chunk.
//!
//! Must not: do I/O, read the clock, or allocate per message (reply checks
//! compare against prebuilt addresses; errors, which end the connection, may
//! allocate).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::message::Templates;
use super::tally::Tally;

/// Longest reply line we accept (RFC 5321 section 4.5.3.1.5 says 512; some
/// servers send longer texts, none this long).
const REPLY_LINE_MAX: usize = 4096;
const LHLO: &[u8] = b"LHLO load.example.com\r\n";
const RSET: &[u8] = b"RSET\r\n";
const QUIT: &[u8] = b"QUIT\r\n";

/// Something the server did that a correct LMTP server does not do. Ends
/// the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError {
    /// What was wrong, and what the client was waiting for.
    pub what: String,
    /// The reply line involved, if any (lossy UTF-8, shortened).
    pub reply: String,
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reply.is_empty() {
            write!(f, "{}", self.what)
        } else {
            write!(f, "{} (reply: {:?})", self.what, self.reply)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Greeting,
    Lhlo,
    Idle,
    /// Waiting for the reply to envelope command `step`.
    Envelope,
    /// Waiting for per-recipient reply `finals` after the dot.
    Final,
    /// A refused transaction is being reset.
    Rset,
    Quit,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Send {
    Nothing,
    Lhlo,
    /// The whole envelope (pipelining).
    Envelope,
    /// One envelope command (lock-step).
    Command(usize),
    Body,
    Rset,
    Quit,
}

/// How a connection sends its transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    /// The envelope (and with chunking the content) in one write.
    pub pipelining: bool,
    /// `BDAT n LAST` instead of `DATA` (RFC 3030).
    pub chunking: bool,
}

pub struct ClientConn {
    templates: Arc<Templates>,
    pipelining: bool,
    chunking: bool,
    phase: Phase,
    send: Send,
    /// Partial reply line carried between reads.
    line: Vec<u8>,
    /// When the client started waiting for the current reply (None: idle).
    waiting_since: Option<Instant>,
    // The message in flight.
    size_idx: usize,
    /// Index of the envelope reply awaited: 0 MAIL, 1..=n RCPT, n+1 DATA.
    step: usize,
    mail_refused: Option<u16>,
    /// Recipients accepted at RCPT, in order (capacity reserved up front).
    accepted: Vec<u16>,
    /// Per-recipient replies seen after the dot.
    finals: usize,
    finals_ok: u64,
    /// Recipients of this message refused so far.
    refused: u64,
    dot_at: Option<Instant>,
    scheduled_at: Option<Instant>,
    // LHLO findings.
    offers_pipelining: bool,
    offers_chunking: bool,
    /// The LHLO reply offered SIZE: MAIL may carry `SIZE=`.
    offers_size: bool,
    rcpt_max: Option<usize>,
}

/// A parsed reply line.
struct Reply<'a> {
    code: u16,
    last: bool,
    line: &'a [u8],
}

fn parse_line(line: &[u8]) -> Option<Reply<'_>> {
    let d = |i: usize| line.get(i).filter(|c| c.is_ascii_digit()).map(|c| c - b'0');
    let (a, b, c) = (d(0)?, d(1)?, d(2)?);
    if !(1..=5).contains(&a) {
        return None;
    }
    let last = match line.get(3) {
        None | Some(b' ') => true,
        Some(b'-') => false,
        _ => return None,
    };
    Some(Reply {
        code: a as u16 * 100 + b as u16 * 10 + c as u16,
        last,
        line,
    })
}

/// The address between the first `<` and the next `>`, if any.
fn named_address(line: &[u8]) -> Option<&[u8]> {
    let start = memchr::memchr(b'<', line)? + 1;
    let len = memchr::memchr(b'>', &line[start..])?;
    Some(&line[start..start + len])
}

fn shown(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(&line[..line.len().min(200)]);
    s.trim_end().to_string()
}

impl ClientConn {
    /// A connection that has just been opened (awaiting the greeting).
    pub fn new(templates: Arc<Templates>, style: Style, now: Instant) -> ClientConn {
        let n = templates.recipients.len();
        ClientConn {
            templates,
            pipelining: style.pipelining,
            chunking: style.chunking,
            phase: Phase::Greeting,
            send: Send::Nothing,
            line: Vec::with_capacity(256),
            waiting_since: Some(now),
            size_idx: 0,
            step: 0,
            mail_refused: None,
            accepted: Vec::with_capacity(n),
            finals: 0,
            finals_ok: 0,
            refused: 0,
            dot_at: None,
            scheduled_at: None,
            offers_pipelining: false,
            offers_chunking: false,
            offers_size: false,
            rcpt_max: None,
        }
    }

    /// Ready for `start_message`.
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Idle && self.send == Send::Nothing
    }

    /// After QUIT was answered (or the connection ended): close the socket.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Since when a reply is awaited (None while idle).
    pub fn waiting_since(&self) -> Option<Instant> {
        self.waiting_since
    }

    /// Begins a message of template size `size_idx`. `scheduled_at`: when
    /// the rate schedule wanted it sent (`--rate`). Only when `is_idle`.
    pub fn start_message(&mut self, size_idx: usize, scheduled_at: Option<Instant>) {
        assert!(self.is_idle(), "start_message on a busy connection");
        self.size_idx = size_idx;
        self.scheduled_at = scheduled_at;
        self.step = 0;
        self.mail_refused = None;
        self.accepted.clear();
        self.finals = 0;
        self.finals_ok = 0;
        self.refused = 0;
        self.dot_at = None;
        self.phase = Phase::Envelope;
        self.send = if self.pipelining {
            Send::Envelope
        } else {
            Send::Command(0)
        };
    }

    /// Says goodbye (only when idle); the connection closes after the `221`.
    pub fn quit(&mut self) {
        assert!(self.is_idle(), "quit on a busy connection");
        self.phase = Phase::Quit;
        self.send = Send::Quit;
    }

    /// Appends what the connection wants written now to `out`; returns
    /// whether it appended anything. `now` is when the bytes will be written.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        let t = &self.templates.sizes[self.size_idx];
        match std::mem::replace(&mut self.send, Send::Nothing) {
            Send::Nothing => return false,
            Send::Lhlo => out.extend_from_slice(LHLO),
            Send::Envelope => {
                // Chunking: the RCPTs end the envelope, the chunk follows.
                let end = if self.chunking {
                    t.rcpts_end()
                } else {
                    t.envelope.len()
                };
                if self.offers_size {
                    out.extend_from_slice(&t.envelope[..end]);
                } else {
                    out.extend_from_slice(&t.mail_without_size);
                    out.extend_from_slice(&t.envelope[t.command_ends[0]..end]);
                }
                if self.chunking {
                    out.extend_from_slice(&t.bdat);
                    self.dot_at = Some(now);
                }
            }
            Send::Command(0) if !self.offers_size => out.extend_from_slice(&t.mail_without_size),
            Send::Command(k) => out.extend_from_slice(t.command(k)),
            Send::Body => {
                out.extend_from_slice(if self.chunking { &t.bdat } else { &t.body });
                self.dot_at = Some(now);
            }
            Send::Rset => out.extend_from_slice(RSET),
            Send::Quit => out.extend_from_slice(QUIT),
        }
        self.waiting_since = Some(now);
        true
    }

    /// Bytes read from the server. Counts finished messages into `tally`.
    pub fn handle_input(
        &mut self,
        now: Instant,
        mut bytes: &[u8],
        tally: &mut Tally,
    ) -> Result<(), ProtocolError> {
        while !bytes.is_empty() {
            let Some(nl) = memchr::memchr(b'\n', bytes) else {
                if REPLY_LINE_MAX - self.line.len() < bytes.len() {
                    return Err(self.error("reply line longer than 4096 bytes", bytes));
                }
                self.line.extend_from_slice(bytes);
                return Ok(());
            };
            let (head, rest) = bytes.split_at(nl + 1);
            bytes = rest;
            if self.line.is_empty() {
                self.handle_line(now, head, tally)?;
            } else {
                if REPLY_LINE_MAX - self.line.len() < head.len() {
                    return Err(self.error("reply line longer than 4096 bytes", head));
                }
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                let r = self.handle_line(now, &line, tally);
                line.clear();
                self.line = line;
                r?;
            }
        }
        Ok(())
    }

    /// The server closed the connection.
    pub fn handle_eof(&mut self) -> Result<(), ProtocolError> {
        let was = self.phase;
        self.phase = Phase::Closed;
        self.send = Send::Nothing;
        match was {
            Phase::Quit | Phase::Closed => Ok(()),
            _ => Err(ProtocolError {
                what: format!(
                    "the server closed the connection {}",
                    self.describe_wait(was)
                ),
                reply: String::new(),
            }),
        }
    }

    /// Fails the connection when a reply has been awaited longer than `limit`.
    pub fn handle_timeout(&mut self, now: Instant, limit: Duration) -> Result<(), ProtocolError> {
        match self.waiting_since {
            Some(since) if now.saturating_duration_since(since) > limit => {
                let was = self.phase;
                self.phase = Phase::Closed;
                let hint = if was == Phase::Final {
                    " (an LMTP server owes one reply per accepted recipient after the data, RFC 2033 section 4.2; a server that sends one reply for all leaves its client waiting)"
                } else {
                    ""
                };
                Err(ProtocolError {
                    what: format!(
                        "no reply within {} s {}{hint}; raise --timeout if the server is just slow",
                        limit.as_secs_f64(),
                        self.describe_wait(was)
                    ),
                    reply: String::new(),
                })
            }
            _ => Ok(()),
        }
    }

    fn describe_wait(&self, phase: Phase) -> String {
        let n = self.templates.recipients.len();
        match phase {
            Phase::Greeting => "before the greeting".into(),
            Phase::Lhlo => "while waiting for the LHLO reply".into(),
            Phase::Idle => "between messages".into(),
            Phase::Envelope => match self.step {
                0 => "while waiting for the reply to MAIL".into(),
                s if s <= n => format!("while waiting for the reply to RCPT {s} of {n}"),
                _ if self.chunking => "while waiting for the reply to BDAT".into(),
                _ => "while waiting for the reply to DATA".into(),
            },
            Phase::Final => format!(
                "while waiting for reply {} of {} after the data",
                self.finals + 1,
                self.accepted.len()
            ),
            Phase::Rset => "while waiting for the reply to RSET".into(),
            Phase::Quit | Phase::Closed => "after QUIT".into(),
        }
    }

    fn error(&mut self, what: &str, line: &[u8]) -> ProtocolError {
        let e = ProtocolError {
            what: format!("{what} {}", self.describe_wait(self.phase)),
            reply: shown(line),
        };
        self.phase = Phase::Closed;
        self.send = Send::Nothing;
        e
    }

    fn handle_line(
        &mut self,
        now: Instant,
        line: &[u8],
        tally: &mut Tally,
    ) -> Result<(), ProtocolError> {
        let Some(reply) = parse_line(line) else {
            return Err(self.error("malformed reply line", line));
        };
        self.waiting_since = Some(now);
        if self.phase == Phase::Lhlo {
            let text = line.get(4..).unwrap_or(&[]);
            if text.starts_with(b"PIPELINING") {
                self.offers_pipelining = true;
            }
            let keyword = text
                .split(|&c| c == b' ' || c == b'\r' || c == b'\n')
                .next()
                .unwrap_or(&[]);
            if keyword.eq_ignore_ascii_case(b"SIZE") {
                self.offers_size = true;
            }
            if keyword.eq_ignore_ascii_case(b"CHUNKING") {
                self.offers_chunking = true;
            }
            if let Some(v) = text.strip_prefix(b"LIMITS ") {
                for kv in v.split(|&c| c == b' ') {
                    if let Some(n) = kv.strip_prefix(b"RCPTMAX=") {
                        self.rcpt_max = std::str::from_utf8(n)
                            .ok()
                            .and_then(|s| s.trim_end().parse().ok());
                    }
                }
            }
        }
        if !reply.last {
            return Ok(());
        }
        self.handle_reply(now, reply, tally)
    }

    fn handle_reply(
        &mut self,
        now: Instant,
        r: Reply<'_>,
        tally: &mut Tally,
    ) -> Result<(), ProtocolError> {
        let n = self.templates.recipients.len();
        if r.code == 421 && self.phase != Phase::Quit {
            // The server is closing the session (busy, shutting down, too
            // many errors: RFC 5321 section 3.8). Not a protocol error: the
            // message in flight fails with 421 and the connection ends.
            if matches!(self.phase, Phase::Envelope | Phase::Final) {
                let left = (n as u64).saturating_sub(self.finals_ok + self.refused);
                tally.fail(421, left);
                self.refused += left;
                self.count(now, tally);
            }
            tally.connections_closed += 1;
            self.phase = Phase::Closed;
            self.send = Send::Nothing;
            self.waiting_since = None;
            return Ok(());
        }
        match self.phase {
            Phase::Greeting => {
                if r.code != 220 {
                    return Err(self.error("the greeting is not 220", r.line));
                }
                self.phase = Phase::Lhlo;
                self.send = Send::Lhlo;
            }
            Phase::Lhlo => {
                if r.code != 250 {
                    return Err(self.error("LHLO was refused", r.line));
                }
                if self.pipelining && !self.offers_pipelining {
                    return Err(self.error(
                        "the server does not offer PIPELINING; use --pipelining off",
                        r.line,
                    ));
                }
                if self.chunking && !self.offers_chunking {
                    return Err(self.error(
                        "the server does not offer CHUNKING (BDAT); use --chunking off",
                        r.line,
                    ));
                }
                if let Some(max) = self.rcpt_max.filter(|&m| m < n) {
                    let what = format!(
                        "the server allows {max} recipients per message (LIMITS RCPTMAX) and --recipients is {n}; use --recipients {max} or less, or raise the server's limit"
                    );
                    return Err(self.error(&what, r.line));
                }
                self.phase = Phase::Idle;
                self.waiting_since = None;
            }
            Phase::Idle | Phase::Closed => {
                return Err(self.error(
                    "a reply no command asked for (more replies than commands, e.g. more than one per recipient after the data)",
                    r.line,
                ));
            }
            Phase::Envelope => self.envelope_reply(now, r, tally)?,
            Phase::Final => {
                let idx = self.accepted[self.finals] as usize;
                let want = &self.templates.recipients[idx];
                // ASCII case aside: a server may fold the domain (which is
                // case-insensitive) when it echoes the recipient.
                if let Some(addr) = named_address(r.line)
                    && !addr.eq_ignore_ascii_case(want.as_bytes())
                {
                    let what = format!(
                        "reply {} of {} after the data names <{}>, expected <{want}> (one reply per recipient, in RCPT order)",
                        self.finals + 1,
                        self.accepted.len(),
                        String::from_utf8_lossy(addr)
                    );
                    return Err(self.error(&what, r.line));
                }
                match r.code / 100 {
                    2 => self.finals_ok += 1,
                    4 | 5 => {
                        tally.fail(r.code, 1);
                        self.refused += 1;
                    }
                    _ => {
                        return Err(
                            self.error("a per-recipient reply that is not 2xx, 4xx or 5xx", r.line)
                        );
                    }
                }
                self.finals += 1;
                if self.finals == self.accepted.len() {
                    if let Some(dot) = self.dot_at {
                        tally.latency.record_us(micros(now, dot));
                    }
                    if let Some(s) = self.scheduled_at {
                        tally.latency_scheduled.record_us(micros(now, s));
                    }
                    self.finish(now, tally);
                }
            }
            Phase::Rset => {
                if r.code != 250 {
                    return Err(self.error("RSET was refused", r.line));
                }
                self.phase = Phase::Idle;
                self.waiting_since = None;
            }
            Phase::Quit => {
                // 221 expected; anything else still ends the connection.
                self.phase = Phase::Closed;
                self.waiting_since = None;
            }
        }
        Ok(())
    }

    fn envelope_reply(
        &mut self,
        now: Instant,
        r: Reply<'_>,
        tally: &mut Tally,
    ) -> Result<(), ProtocolError> {
        let n = self.templates.recipients.len();
        let ok = r.code / 100 == 2;
        let data_go = !self.chunking && self.step == n + 1 && r.code == 354;
        if !(ok || data_go || matches!(r.code / 100, 4 | 5)) {
            return Err(self.error("an envelope reply that is not 2xx, 4xx or 5xx", r.line));
        }
        let step = self.step;
        self.step += 1;
        if step == 0 {
            if !ok {
                self.mail_refused = Some(r.code);
                tally.fail(r.code, n as u64);
                self.refused = n as u64;
                if !self.pipelining {
                    // Nothing else was sent: the message is over.
                    self.finish(now, tally);
                } // Pipelined: RCPT and DATA replies still to come.
            } else if !self.pipelining {
                self.send = Send::Command(1);
            }
            return Ok(());
        }
        if step <= n {
            if self.mail_refused.is_none() {
                if ok {
                    self.accepted.push((step - 1) as u16);
                } else {
                    tally.fail(r.code, 1);
                    self.refused += 1;
                }
            }
            if self.pipelining {
                // Chunking: the chunk went with the envelope. With a
                // recipient accepted the per-recipient replies come next;
                // otherwise one refusal of the BDAT (below).
                if self.chunking
                    && step == n
                    && self.mail_refused.is_none()
                    && !self.accepted.is_empty()
                {
                    self.phase = Phase::Final;
                }
            } else if step < n {
                self.send = Send::Command(step + 1);
            } else if self.accepted.is_empty() {
                // Every recipient refused: reset the open transaction.
                self.phase = Phase::Rset;
                self.send = Send::Rset;
                self.count(now, tally);
            } else if self.chunking {
                self.phase = Phase::Final;
                self.send = Send::Body;
            } else {
                self.send = Send::Command(n + 1);
            }
            return Ok(());
        }
        // The reply to DATA; chunking: the one reply to a BDAT sent when no
        // recipient was accepted.
        let may_send = self.mail_refused.is_none() && !self.accepted.is_empty();
        if self.chunking && ok {
            return Err(self.error(
                "BDAT accepted although no recipient was (RFC 3030 and RFC 2033: the data needs an accepted RCPT)",
                r.line,
            ));
        }
        if r.code == 354 {
            if !may_send {
                return Err(self.error(
                    "354 to DATA although no recipient was accepted (RFC 2033: DATA needs an accepted RCPT)",
                    r.line,
                ));
            }
            self.phase = Phase::Final;
            self.send = Send::Body;
            return Ok(());
        }
        if may_send {
            // DATA refused although recipients were accepted.
            tally.fail(r.code, self.accepted.len() as u64);
            self.refused += self.accepted.len() as u64;
        }
        if self.mail_refused.is_some() {
            self.finish(now, tally);
        } else {
            // MAIL was accepted: the transaction is open; reset it.
            self.phase = Phase::Rset;
            self.send = Send::Rset;
            self.count(now, tally);
        }
        Ok(())
    }

    /// Counts the message and returns to idle.
    fn finish(&mut self, now: Instant, tally: &mut Tally) {
        self.count(now, tally);
        self.phase = Phase::Idle;
        self.waiting_since = None;
    }

    fn count(&mut self, now: Instant, tally: &mut Tally) {
        if self.finals_ok > 0 {
            tally.messages += 1;
            tally.recipients += self.finals_ok;
            tally.bytes += self.templates.sizes[self.size_idx].size as u64;
        }
        if self.refused > 0 {
            tally.messages_failed += 1;
        }
        tally.last_done = Some(now);
    }
}

fn micros(now: Instant, then: Instant) -> u64 {
    now.saturating_duration_since(then).as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const LHLO_REPLY: &[u8] =
        b"250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE 52428800\r\n250-CHUNKING\r\n250 LIMITS RCPTMAX=1000\r\n";

    struct T {
        c: ClientConn,
        tally: Tally,
        now: Instant,
        out: Vec<u8>,
    }

    impl T {
        fn new(rcpts: usize, pipelining: bool) -> T {
            T::with(rcpts, with_data(pipelining))
        }
        fn with(rcpts: usize, style: Style) -> T {
            let now = Instant::now();
            let tpl = Arc::new(Templates::new(
                &[(100, 1)],
                rcpts,
                crate::load::message::RCPT_DOMAIN,
            ));
            T {
                c: ClientConn::new(tpl, style, now),
                tally: Tally::default(),
                now,
                out: Vec::new(),
            }
        }
        fn input(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
            self.now += Duration::from_micros(10);
            self.c.handle_input(self.now, bytes, &mut self.tally)
        }
        fn sent(&mut self) -> String {
            self.out.clear();
            self.c.poll_transmit(self.now, &mut self.out);
            String::from_utf8_lossy(&self.out).into_owned()
        }
        fn ready(rcpts: usize, pipelining: bool) -> T {
            T::ready_with(rcpts, with_data(pipelining))
        }
        fn ready_with(rcpts: usize, style: Style) -> T {
            let mut t = T::with(rcpts, style);
            assert_eq!(t.sent(), "");
            t.input(b"220 mx.test LMTP ready\r\n").unwrap();
            assert_eq!(t.sent(), "LHLO load.example.com\r\n");
            t.input(LHLO_REPLY).unwrap();
            assert!(t.c.is_idle());
            t
        }
        fn saved(i: usize) -> String {
            format!("250 2.0.0 <user{i}@example.com> ABCDEFGHIJKLMNOPQRSTUVWXYZ Saved\r\n")
        }
    }

    fn pipelined_envelope(t: &mut T) {
        t.c.start_message(0, None);
        let env = t.sent();
        assert!(env.starts_with(
            "MAIL FROM:<load@example.com> SIZE=100\r\nRCPT TO:<user0@example.com>\r\n"
        ));
        assert!(env.ends_with("DATA\r\n"));
    }

    #[test]
    fn pipelined_transaction_with_one_reply_per_recipient() {
        let mut t = T::ready(2, true);
        pipelined_envelope(&mut t);
        t.input(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n")
            .unwrap();
        assert_eq!(t.sent(), "", "the body waits for the 354");
        t.input(b"354 go ahead\r\n").unwrap();
        let body = t.sent();
        assert!(body.ends_with("\r\n.\r\n") && body.contains("\r\n.."));
        t.input(T::saved(0).as_bytes()).unwrap();
        assert!(!t.c.is_idle());
        t.input(T::saved(1).as_bytes()).unwrap();
        assert!(t.c.is_idle());
        assert_eq!(
            (t.tally.messages, t.tally.recipients, t.tally.bytes),
            (1, 2, 100)
        );
        assert_eq!(t.tally.latency.count(), 1);
        assert_eq!(t.tally.messages_failed, 0);
    }

    #[test]
    fn replies_split_at_every_byte() {
        let mut t = T::ready(3, true);
        pipelined_envelope(&mut t);
        let mut all =
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 go\r\n".to_vec();
        for b in &all {
            t.input(std::slice::from_ref(b)).unwrap();
        }
        assert!(t.sent().ends_with(".\r\n"));
        all.clear();
        for i in 0..3 {
            all.extend_from_slice(T::saved(i).as_bytes());
        }
        for b in &all {
            t.input(std::slice::from_ref(b)).unwrap();
        }
        assert!(t.c.is_idle());
        assert_eq!(t.tally.recipients, 3);
    }

    #[test]
    fn one_reply_for_many_recipients_times_out_naming_the_problem() {
        let mut t = T::ready(3, true);
        pipelined_envelope(&mut t);
        t.input(b"250 OK\r\n250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n")
            .unwrap();
        t.sent();
        t.input(b"250 2.0.0 Ok: queued\r\n").unwrap();
        assert!(t.c.handle_timeout(t.now, Duration::from_secs(1)).is_ok());
        let e =
            t.c.handle_timeout(t.now + Duration::from_secs(2), Duration::from_secs(1))
                .unwrap_err();
        assert!(e.what.contains("reply 2 of 3 after the data"), "{e}");
        assert!(e.what.contains("RFC 2033"), "{e}");
    }

    #[test]
    fn replies_out_of_order_or_extra_are_protocol_errors() {
        let mut t = T::ready(2, true);
        pipelined_envelope(&mut t);
        t.input(b"250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n")
            .unwrap();
        t.sent();
        let e = t.input(T::saved(1).as_bytes()).unwrap_err();
        assert!(
            e.what
                .contains("names <user1@example.com>, expected <user0@example.com>"),
            "{e}"
        );
        assert!(e.reply.starts_with("250 2.0.0 <user1"));

        let mut t = T::ready(1, true);
        pipelined_envelope(&mut t);
        t.input(b"250 OK\r\n250 OK\r\n354 go\r\n").unwrap();
        t.sent();
        let e = t
            .input(format!("{}{}", T::saved(0), T::saved(0)).as_bytes())
            .unwrap_err();
        assert!(e.what.contains("no command asked for"), "{e}");
    }

    #[test]
    fn replies_without_addresses_are_accepted() {
        // Postfix's smtp-sink answers `250 2.0.0 Ok` per recipient.
        let mut t = T::ready(2, true);
        pipelined_envelope(&mut t);
        t.input(b"250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n250 2.0.0 Ok\r\n")
            .unwrap();
        t.sent();
        t.input(b"250 2.0.0 Ok\r\n").unwrap();
        assert_eq!(t.tally.recipients, 2);
    }

    #[test]
    fn refusals_are_counted_by_code_not_errors() {
        let mut t = T::ready(3, true);
        pipelined_envelope(&mut t);
        t.input(b"250 OK\r\n250 OK\r\n550 5.1.1 <user1@example.com> User unknown\r\n250 OK\r\n354 go\r\n").unwrap();
        t.sent();
        // Two accepted recipients: user0 and user2, in that order.
        t.input(T::saved(0).as_bytes()).unwrap();
        t.input(b"451 4.3.0 <user2@example.com> Temporary failure\r\n")
            .unwrap();
        assert!(t.c.is_idle());
        assert_eq!(t.tally.failures_by_code(), vec![(451, 1), (550, 1)]);
        assert_eq!(
            (
                t.tally.messages,
                t.tally.recipients,
                t.tally.messages_failed
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn all_recipients_refused_resets_the_transaction() {
        let mut t = T::ready(1, true);
        pipelined_envelope(&mut t);
        t.input(b"250 OK\r\n550 5.1.1 no\r\n503 5.5.1 no valid recipients\r\n")
            .unwrap();
        assert_eq!(t.sent(), "RSET\r\n");
        t.input(b"250 2.0.0 OK\r\n").unwrap();
        assert!(t.c.is_idle());
        assert_eq!((t.tally.messages, t.tally.messages_failed), (0, 1));

        let mut t = T::ready(1, false);
        t.c.start_message(0, None);
        t.sent();
        t.input(b"250 OK\r\n").unwrap();
        assert_eq!(t.sent(), "RCPT TO:<user0@example.com>\r\n");
        t.input(b"550 5.1.1 no\r\n").unwrap();
        assert_eq!(t.sent(), "RSET\r\n");
        t.input(b"250 2.0.0 OK\r\n").unwrap();
        assert!(t.c.is_idle());
        assert_eq!(t.tally.failures_by_code(), vec![(550, 1)]);
    }

    #[test]
    fn a_421_ends_the_connection_and_fails_the_message_in_flight() {
        let mut t = T::ready(3, true);
        pipelined_envelope(&mut t);
        t.input(b"250 OK\r\n250 OK\r\n550 5.1.1 no\r\n250 OK\r\n354 go\r\n")
            .unwrap();
        t.sent();
        t.input(T::saved(0).as_bytes()).unwrap();
        t.input(b"421 4.3.2 Shutting down\r\n").unwrap();
        assert!(t.c.is_closed());
        assert_eq!(t.tally.failures_by_code(), vec![(421, 1), (550, 1)]);
        assert_eq!((t.tally.messages, t.tally.messages_failed), (1, 1));
        assert_eq!(t.tally.connections_closed, 1);
        assert!(t.c.handle_eof().is_ok());

        // Between messages: nothing fails, the connection just ends.
        let mut t = T::ready(1, true);
        t.input(b"421 4.4.2 mx.test Error: timeout exceeded\r\n")
            .unwrap();
        assert!(t.c.is_closed());
        assert_eq!(
            (t.tally.messages_failed, t.tally.connections_closed),
            (0, 1)
        );
    }

    #[test]
    fn lock_step_sends_one_command_per_reply() {
        let mut t = T::ready(2, false);
        t.c.start_message(0, None);
        assert_eq!(t.sent(), "MAIL FROM:<load@example.com> SIZE=100\r\n");
        assert_eq!(t.sent(), "");
        t.input(b"250 OK\r\n").unwrap();
        assert_eq!(t.sent(), "RCPT TO:<user0@example.com>\r\n");
        t.input(b"250 OK\r\n").unwrap();
        assert_eq!(t.sent(), "RCPT TO:<user1@example.com>\r\n");
        t.input(b"250 OK\r\n").unwrap();
        assert_eq!(t.sent(), "DATA\r\n");
        t.input(b"354 go\r\n").unwrap();
        assert!(t.sent().ends_with("\r\n.\r\n"));
        t.input(format!("{}{}", T::saved(0), T::saved(1)).as_bytes())
            .unwrap();
        assert!(t.c.is_idle());
        t.c.quit();
        assert_eq!(t.sent(), "QUIT\r\n");
        t.input(b"221 2.0.0 Bye\r\n").unwrap();
        assert!(t.c.is_closed());
        assert!(t.c.handle_eof().is_ok());
    }

    #[test]
    fn lhlo_checks_pipelining_and_rcptmax() {
        let mut t = T::new(1, true);
        t.input(b"220 x\r\n250-x\r\n250 8BITMIME\r\n").unwrap_err();
        let mut t = T::with(1, CHUNKED_LOCK_STEP);
        let e = t
            .input(b"220 x\r\n250-x\r\n250 PIPELINING\r\n")
            .unwrap_err();
        assert!(e.what.contains("--chunking off"), "{e}");
        let mut t = T::new(5, false);
        let e = t
            .input(b"220 x\r\n250-x\r\n250 LIMITS RCPTMAX=4\r\n")
            .unwrap_err();
        assert!(e.what.contains("--recipients 4 or less"), "{e}");
        let mut t = T::new(1, false);
        let e = t.input(b"554 go away\r\n").unwrap_err();
        assert!(e.what.contains("greeting"), "{e}");
    }

    #[test]
    fn no_size_parameter_unless_the_server_offers_size() {
        // Dovecot 2.3's LMTP offers no SIZE and answers SIZE= with 555.
        for pipelining in [true, false] {
            let mut t = T::new(2, pipelining);
            t.input(b"220 x\r\n").unwrap();
            assert_eq!(t.sent(), "LHLO load.example.com\r\n");
            t.input(b"250-x\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
                .unwrap();
            t.c.start_message(0, None);
            let sent = t.sent();
            assert!(
                sent.starts_with("MAIL FROM:<load@example.com>\r\n"),
                "{sent}"
            );
            assert!(!sent.contains("SIZE="), "{sent}");
            if pipelining {
                assert!(
                    sent.ends_with("RCPT TO:<user1@example.com>\r\nDATA\r\n"),
                    "{sent}"
                );
            }
        }
        // Offered with or without a number: SIZE= is sent.
        let mut t = T::new(1, true);
        t.input(b"220 x\r\n250-x\r\n250-PIPELINING\r\n250 SIZE\r\n")
            .unwrap();
        t.sent();
        t.c.start_message(0, None);
        assert!(
            t.sent()
                .starts_with("MAIL FROM:<load@example.com> SIZE=100\r\n")
        );
    }

    #[test]
    fn malformed_and_eof_mid_transaction() {
        let mut t = T::ready(1, true);
        pipelined_envelope(&mut t);
        let e = t.input(b"hello\r\n").unwrap_err();
        assert!(e.what.contains("malformed"), "{e}");
        let mut t = T::ready(1, true);
        pipelined_envelope(&mut t);
        let e = t.c.handle_eof().unwrap_err();
        assert!(e.what.contains("reply to MAIL"), "{e}");
    }

    fn with_data(pipelining: bool) -> Style {
        Style {
            pipelining,
            chunking: false,
        }
    }
    const CHUNKED: Style = Style {
        pipelining: true,
        chunking: true,
    };
    const CHUNKED_LOCK_STEP: Style = Style {
        pipelining: false,
        chunking: true,
    };

    /// What a chunking client sends after the envelope: BDAT and the
    /// content, unstuffed, with no final dot.
    fn assert_chunk(sent: &str) {
        let (head, content) = sent.split_once("BDAT 100 LAST\r\n").expect("a BDAT");
        assert!(!head.contains("DATA"), "{sent:?}");
        assert_eq!(content.as_bytes(), &crate::load::message::content(100)[..]);
    }

    #[test]
    fn chunking_pipelined_sends_one_write_and_counts_per_recipient_replies() {
        let mut t = T::ready_with(2, CHUNKED);
        t.c.start_message(0, None);
        let sent = t.sent();
        assert!(sent.starts_with("MAIL FROM:<load@example.com> SIZE=100\r\n"));
        assert!(sent.contains("RCPT TO:<user1@example.com>\r\nBDAT 100 LAST\r\n"));
        assert_chunk(&sent);
        t.input(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 <user1@example.com> unknown\r\n")
            .unwrap();
        assert_eq!(t.sent(), "", "nothing more to send");
        assert!(!t.c.is_idle());
        // One reply per accepted recipient: only user0's.
        t.input(T::saved(0).as_bytes()).unwrap();
        assert!(t.c.is_idle());
        assert_eq!((t.tally.messages, t.tally.recipients), (1, 1));
        assert_eq!(t.tally.latency.count(), 1);
        assert_eq!(t.tally.failures_by_code(), vec![(550, 1)]);
        // A second reply would be one too many.
        let e = t.input(T::saved(1).as_bytes()).unwrap_err();
        assert!(e.what.contains("no command asked for"), "{e}");
    }

    #[test]
    fn chunking_pipelined_with_every_recipient_refused_expects_one_bdat_refusal() {
        let mut t = T::ready_with(2, CHUNKED);
        t.c.start_message(0, None);
        t.sent();
        t.input(b"250 2.1.0 OK\r\n550 5.1.1 no\r\n550 5.1.1 no\r\n")
            .unwrap();
        assert!(!t.c.is_idle());
        t.input(b"503 5.5.1 No valid recipients\r\n").unwrap();
        assert_eq!(t.sent(), "RSET\r\n");
        t.input(b"250 2.0.0 OK\r\n").unwrap();
        assert!(t.c.is_idle());
        assert_eq!((t.tally.messages, t.tally.messages_failed), (0, 1));

        // MAIL refused: every RCPT and the BDAT are refused too, once each.
        t.c.start_message(0, None);
        t.sent();
        t.input(b"452 4.3.1 busy\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n")
            .unwrap();
        assert!(t.c.is_idle());
        assert_eq!(t.sent(), "");

        // A server that accepts the BDAT with no recipient is wrong.
        t.c.start_message(0, None);
        t.sent();
        t.input(b"250 2.1.0 OK\r\n550 5.1.1 no\r\n550 5.1.1 no\r\n")
            .unwrap();
        let e = t.input(b"250 2.0.0 fine\r\n").unwrap_err();
        assert!(e.what.contains("BDAT accepted"), "{e}");
        assert!(e.what.contains("reply to BDAT"), "{e}");
    }

    #[test]
    fn chunking_in_lock_step_sends_the_chunk_after_the_last_rcpt_reply() {
        let mut t = T::ready_with(2, CHUNKED_LOCK_STEP);
        t.c.start_message(0, None);
        assert_eq!(t.sent(), "MAIL FROM:<load@example.com> SIZE=100\r\n");
        t.input(b"250 2.1.0 OK\r\n").unwrap();
        assert_eq!(t.sent(), "RCPT TO:<user0@example.com>\r\n");
        t.input(b"250 2.1.5 OK\r\n").unwrap();
        assert_eq!(t.sent(), "RCPT TO:<user1@example.com>\r\n");
        t.input(b"250 2.1.5 OK\r\n").unwrap();
        let sent = t.sent();
        assert!(sent.starts_with("BDAT 100 LAST\r\n"));
        assert_chunk(&sent);
        t.input(format!("{}{}", T::saved(0), T::saved(1)).as_bytes())
            .unwrap();
        assert!(t.c.is_idle());
        assert_eq!((t.tally.messages, t.tally.recipients), (1, 2));
    }
}
