//! Transcript tests: every command and error path with its exact reply, each
//! transcript fed whole, byte by byte and split at every position, which must
//! all give the same replies and the same stored messages.

use super::*;
use crate::envelope::{Mailbox, QueueId};
use std::time::Duration;

/// Drives a session with a simulated client and spool, keeping unconsumed
/// input as a real caller would.
struct Harness {
    s: Session,
    now: Instant,
    pending: Vec<u8>,
    out: Vec<u8>,
    /// What the simulated spool answers for the n-th message.
    outcome: fn(u32) -> CommitOutcome,
    auto_commit: bool,
    messages: Vec<Message>,
    /// Output polls that returned data (coalescing checks).
    writes: usize,
}

fn committed(n: u32) -> CommitOutcome {
    CommitOutcome::Committed(QueueId(n as u128 + 1))
}

impl Harness {
    fn new(cfg: SessionConfig) -> Self {
        let now = Instant::now();
        let mut h = Harness {
            s: Session::new(Arc::new(cfg), "192.0.2.7:41822".into(), 7, now),
            now,
            pending: Vec::new(),
            out: Vec::new(),
            outcome: committed,
            auto_commit: true,
            messages: Vec::new(),
            writes: 0,
        };
        h.flush();
        h
    }

    fn flush(&mut self) {
        if self.s.poll_output(&mut self.out) {
            self.writes += 1;
        }
    }

    /// Feeds one chunk from the client, as a shard would on a recv.
    fn feed(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
        loop {
            let n = self.s.handle_input(self.now, &self.pending);
            self.pending.drain(..n);
            let mut progressed = n > 0;
            if let Some(req) = self.s.poll_spool() {
                let outcome = (self.outcome)(self.messages.len() as u32);
                self.messages.push(req.message);
                if self.auto_commit {
                    assert!(self.s.handle_commit(self.now, req.ticket, outcome));
                    progressed = true;
                }
            }
            if self.pending.is_empty() || !progressed {
                break;
            }
        }
        self.flush();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

fn cfg() -> SessionConfig {
    SessionConfig::new("mx.test")
}

const GREETING: &str = "220 mx.test LMTP ready\r\n";
const LHLO: &str = "250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n\
250-SIZE 52428800\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-SMTPUTF8\r\n250 LIMITS RCPTMAX=1000\r\n";

fn saved(addr: &str, n: u128) -> String {
    format!("250 2.0.0 <{addr}> {} Saved\r\n", QueueId(n))
}

/// Runs `input` through a fresh session three ways (whole, byte by byte, split
/// at every position) and asserts all agree; returns the whole-input run.
fn transcript_with(make: impl Fn() -> SessionConfig, input: &[u8]) -> Harness {
    let mut whole = Harness::new(make());
    whole.feed(input);
    let mut bytewise = Harness::new(make());
    for b in input {
        bytewise.feed(std::slice::from_ref(b));
    }
    assert_eq!(whole.text(), bytewise.text(), "byte-by-byte differs");
    assert_eq!(whole.messages, bytewise.messages);
    for i in 0..=input.len() {
        let mut split = Harness::new(make());
        split.feed(&input[..i]);
        split.feed(&input[i..]);
        assert_eq!(whole.text(), split.text(), "split at {i} differs");
        assert_eq!(whole.messages, split.messages, "split at {i}");
    }
    whole
}

fn transcript(input: &str) -> Harness {
    transcript_with(cfg, input.as_bytes())
}

#[test]
fn single_message_end_to_end() {
    let h = transcript(
        "LHLO client.test\r\nMAIL FROM:<sender@example.org> SIZE=18 BODY=8BITMIME\r\n\
         RCPT TO:<user+tag@example.com>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    );
    assert_eq!(
        h.text(),
        format!(
            "{GREETING}{LHLO}250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n{}221 2.0.0 Bye\r\n",
            saved("user+tag@example.com", 1)
        )
    );
    assert!(h.s.is_closing());
    assert_eq!(h.messages.len(), 1);
    let m = &h.messages[0];
    assert_eq!(m.body, b"Subject: hi\r\n\r\nbody\r\n");
    let e = &m.envelope;
    assert_eq!(e.reverse_path.to_string(), "<sender@example.org>");
    assert_eq!(e.params.size, Some(18));
    assert_eq!(e.params.body, Some(BodyType::EightBitMime));
    assert_eq!(e.client.lhlo, "client.test");
    assert_eq!(e.client.peer, "192.0.2.7:41822");
    assert_eq!(e.transaction, TransactionId { session: 7, seq: 0 });
    assert_eq!(e.recipients.len(), 1);
    let d = e.recipients[0].detail.as_ref().unwrap();
    assert_eq!((d.base.as_str(), d.tag.as_str()), ("user", "tag"));
    assert_eq!(e.recipients[0].base_address(), "user@example.com");
}

#[test]
fn one_reply_per_recipient_in_order_duplicates_included() {
    let h = transcript(
        "LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<a@x>\r\nDATA\r\nx\r\n.\r\n",
    );
    let t = h.text();
    let after = t
        .split("354 Start mail input; end with <CRLF>.<CRLF>\r\n")
        .nth(1)
        .unwrap();
    assert_eq!(
        after,
        format!("{}{}{}", saved("a@x", 1), saved("b@x", 1), saved("a@x", 1))
    );
    assert_eq!(h.messages[0].envelope.recipients.len(), 3);
    assert_eq!(h.messages[0].envelope.reverse_path, ReversePath::Null);
}

#[test]
fn pipelined_batch_is_one_write_and_quit_waits_for_the_replies() {
    let mut h = Harness::new(cfg());
    h.auto_commit = false;
    let writes_before = h.writes;
    h.feed(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n");
    assert_eq!(
        h.writes,
        writes_before + 1,
        "replies of one batch coalesce into one write"
    );
    h.feed(b"hello\r\n.\r\nQUIT\r\n");
    // The message is with the spool: no per-recipient reply and no 221 yet.
    assert!(h.s.is_awaiting_commit());
    assert_eq!(
        h.pending, b"QUIT\r\n",
        "input after the dot waits for the outcome"
    );
    assert!(!h.text().contains("221"));
    assert!(!h.text().contains("Saved"));
    assert_eq!(
        h.s.poll_timeout(),
        None,
        "no client timeout while the server commits"
    );
    // The outcome arrives; the caller feeds the rest again.
    assert!(h.s.handle_commit(h.now, Ticket(0), committed(0)));
    h.feed(b"");
    let t = h.text();
    let tail = t
        .split("354 Start mail input; end with <CRLF>.<CRLF>\r\n")
        .nth(1)
        .unwrap();
    assert_eq!(
        tail,
        format!("{}{}221 2.0.0 Bye\r\n", saved("a@x", 1), saved("b@x", 1))
    );
    assert!(h.s.is_closing());
}

#[test]
fn a_whole_transaction_in_one_batch_is_answered_in_one_write() {
    // Exim with CHUNKING: MAIL, RCPTs and BDAT LAST with the content in one
    // write. The envelope replies wait for the commit and go out with the
    // per-recipient replies, in order, in one write.
    let mut h = Harness::new(cfg());
    h.auto_commit = false;
    h.feed(b"LHLO c\r\n");
    let writes_before = h.writes;
    let out_before = h.out.len();
    h.feed(
        b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT 7 LAST\r\nhello\r\nQUIT\r\n",
    );
    assert!(h.s.is_awaiting_commit());
    assert_eq!(
        h.writes, writes_before,
        "nothing is sent before the outcome"
    );
    assert_eq!(h.out.len(), out_before);
    assert!(h.s.handle_commit(h.now, Ticket(0), committed(0)));
    h.feed(b"");
    assert_eq!(
        h.writes,
        writes_before + 1,
        "one write for the whole transaction"
    );
    assert_eq!(
        String::from_utf8_lossy(&h.out[out_before..]),
        format!(
            "250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n{}{}221 2.0.0 Bye\r\n",
            saved("a@x", 1),
            saved("b@x", 1)
        )
    );

    // The same with DATA and the body sent without waiting for the 354.
    let mut h = Harness::new(cfg());
    h.auto_commit = false;
    h.feed(b"LHLO c\r\n");
    let writes_before = h.writes;
    h.feed(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\nhello\r\n.\r\n");
    assert_eq!(h.writes, writes_before);
    assert!(!h.text().contains("354"));
    assert!(h.s.handle_commit(h.now, Ticket(0), committed(0)));
    h.feed(b"");
    assert_eq!(h.writes, writes_before + 1);
    assert!(h.text().ends_with(&format!(
        "250 2.1.5 OK\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n{}",
        saved("a@x", 1)
    )));

    // Replies that come before a message's data is complete are not held:
    // a client waiting for the 354, or for each reply in lock-step.
    let mut h = Harness::new(cfg());
    h.auto_commit = false;
    h.feed(b"LHLO c\r\nMAIL FROM:<s@x>\r\n");
    assert!(h.text().ends_with("250 2.1.0 OK\r\n"));
    h.feed(b"RCPT TO:<a@x>\r\nDATA\r\n");
    assert!(
        h.text()
            .ends_with("354 Start mail input; end with <CRLF>.<CRLF>\r\n")
    );
    h.feed(b"hello\r\n.\r\n");
    assert!(h.s.is_awaiting_commit());
    assert!(h.s.handle_commit(h.now, Ticket(0), committed(0)));
    h.feed(b"");
    assert!(h.text().ends_with(&saved("a@x", 1)));
}

#[test]
fn commit_failures_are_per_recipient() {
    let mut h = Harness::new(cfg());
    h.outcome = |_| CommitOutcome::Failed;
    h.feed(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nx\r\n.\r\n");
    assert!(h.text().ends_with(
        "451 4.3.0 <a@x> Temporary failure, try again later\r\n451 4.3.0 <b@x> Temporary failure, try again later\r\n"
    ));
    let mut h = Harness::new(cfg());
    h.outcome = |_| CommitOutcome::StorageFull;
    h.feed(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nx\r\n.\r\n");
    assert!(h.text().ends_with(
        "452 4.3.1 <a@x> Insufficient system storage\r\n452 4.3.1 <b@x> Insufficient system storage\r\n"
    ));
    // The session goes on after a failure.
    h.feed(b"MAIL FROM:<s@x>\r\n");
    assert!(h.text().ends_with("250 2.1.0 OK\r\n"));
}

#[test]
fn simple_commands() {
    let h =
        transcript("LHLO c\r\nNOOP\r\nNOOP hello\r\nRSET\r\nVRFY postmaster\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(
        h.text(),
        format!(
            "{GREETING}{LHLO}250 2.0.0 OK\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n\
             252 2.3.3 Cannot VRFY user, but will accept message and attempt delivery\r\n221 2.0.0 Bye\r\n"
        ),
        "input after QUIT is ignored"
    );
}

#[test]
fn helo_and_ehlo_are_refused() {
    let h = transcript("HELO c\r\nehlo c\r\n");
    assert_eq!(
        h.text(),
        format!(
            "{GREETING}500 5.5.1 Use LHLO (this is LMTP, RFC 2033)\r\n500 5.5.1 Use LHLO (this is LMTP, RFC 2033)\r\n"
        )
    );
}

#[test]
fn sequence_errors() {
    let h = transcript(
        "MAIL FROM:<s@x>\r\nLHLO c\r\nRCPT TO:<a@x>\r\nDATA\r\nMAIL FROM:<s@x>\r\nMAIL FROM:<s@x>\r\nDATA\r\n",
    );
    assert_eq!(
        h.text(),
        format!(
            "{GREETING}503 5.5.1 Error: send LHLO first\r\n{LHLO}503 5.5.1 Error: need MAIL command\r\n\
             503 5.5.1 Error: need MAIL command\r\n250 2.1.0 OK\r\n503 5.5.1 Error: nested MAIL command\r\n\
             503 5.5.1 Error: no valid recipients\r\n"
        )
    );
    assert!(h.messages.is_empty());
}

#[test]
fn syntax_errors_have_exact_codes() {
    let cases = [
        ("FOO\r\n", "500 5.5.2 Error: command not recognized"),
        ("STARTTLS\r\n", "500 5.5.2 Error: command not recognized"),
        ("LHLO\r\n", "501 5.5.4 Syntax: LHLO hostname"),
        (
            "MAIL FROM:s@x\r\n",
            "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]",
        ),
        (
            "MAIL FROM:<s x@y>\r\n",
            "501 5.1.7 Bad sender address syntax",
        ),
        (
            "MAIL FROM:<s@x> SIZE=abc\r\n",
            "501 5.5.4 Syntax: SIZE=number",
        ),
        (
            "MAIL FROM:<s@x> BODY=9BIT\r\n",
            "501 5.5.4 Syntax: BODY=7BIT|8BITMIME|BINARYMIME",
        ),
        (
            "MAIL FROM:<s@x> AUTH=<>\r\n",
            "555 5.5.4 Unsupported parameter",
        ),
        (
            "MAIL FROM:<jö@x>\r\n",
            "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL",
        ),
        ("DATA now\r\n", "501 5.5.4 Syntax: DATA"),
        ("RSET all\r\n", "501 5.5.4 Syntax: RSET"),
        ("QUIT now\r\n", "501 5.5.4 Syntax: QUIT"),
        ("\r\n", "500 5.5.2 Error: command not recognized"),
        (
            "MAIL FROM:<s@x> SMTPUTF8=1\r\n",
            "501 5.5.4 SMTPUTF8 takes no value",
        ),
        (
            "MAIL FROM:<s@x> SIZE=1 SIZE=1\r\n",
            "501 5.5.4 SIZE given twice",
        ),
        ("BDAT ten\r\n", "501 5.5.4 Syntax: BDAT size [LAST]"),
        ("VRFY\r\n", "501 5.5.4 Syntax: VRFY address"),
    ];
    for (input, want) in cases {
        let h = transcript(&format!("LHLO c\r\n{input}"));
        assert_eq!(h.text(), format!("{GREETING}{LHLO}{want}\r\n"), "{input:?}");
    }
    let cases = [
        (
            "RCPT TO:<a b@x>\r\n",
            "501 5.1.3 Bad recipient address syntax",
        ),
        ("RCPT TO:<>\r\n", "501 5.1.3 Bad recipient address syntax"),
        (
            "RCPT TO:<a@x> NOTIFY=NEVER\r\n",
            "555 5.5.4 Unsupported parameter",
        ),
        (
            "RCPT TO:<jö@x>\r\n",
            "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL",
        ),
        ("RCPT TO a@x\r\n", "501 5.5.4 Syntax: RCPT TO:<address>"),
    ];
    for (input, want) in cases {
        let h = transcript(&format!("LHLO c\r\nMAIL FROM:<s@x>\r\n{input}"));
        assert_eq!(
            h.text(),
            format!("{GREETING}{LHLO}250 2.1.0 OK\r\n{want}\r\n"),
            "{input:?}"
        );
    }
}

#[test]
fn utf8_addresses_after_smtputf8() {
    let h = transcript(
        "LHLO c\r\nMAIL FROM:<jösé@bücher.example> SMTPUTF8\r\nRCPT TO:<ñu@ejemplo.es>\r\nDATA\r\nx\r\n.\r\n",
    );
    assert!(
        h.text().ends_with(&saved("ñu@ejemplo.es", 1)),
        "{}",
        h.text()
    );
    assert!(h.messages[0].envelope.params.smtputf8);
}

#[test]
fn size_parameter_over_the_limit_is_refused_at_mail() {
    let h =
        transcript("LHLO c\r\nMAIL FROM:<s@x> SIZE=52428801\r\nMAIL FROM:<s@x> SIZE=52428800\r\n");
    assert_eq!(
        h.text(),
        format!(
            "{GREETING}{LHLO}552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.1.0 OK\r\n"
        )
    );
}

fn small_limits() -> SessionConfig {
    let mut c = cfg();
    c.limits.message_bytes_max = 1024;
    c.limits.recipients_max = 2;
    c.limits.line_bytes_max = 512;
    c.limits.bad_commands_max = 3;
    c
}

#[test]
fn oversize_data_is_drained_and_refused_per_recipient() {
    let mut input =
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n".to_vec();
    for _ in 0..40 {
        input.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
    }
    input.extend_from_slice(b".\r\nNOOP\r\n");
    let h = transcript_with(small_limits, &input);
    assert!(h.messages.is_empty(), "an oversize message is never stored");
    assert!(h.text().ends_with(
        "354 Start mail input; end with <CRLF>.<CRLF>\r\n552 5.3.4 <a@x> Message too big\r\n\
         552 5.3.4 <b@x> Message too big\r\n250 2.0.0 OK\r\n"
    ));
}

#[test]
fn recipient_limit() {
    let h = transcript_with(
        small_limits,
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\nx\r\n.\r\n",
    );
    let t = h.text();
    assert!(t.contains("250 2.1.5 OK\r\n250 2.1.5 OK\r\n452 4.5.3 Too many recipients\r\n354"));
    assert!(t.contains("LIMITS RCPTMAX=2\r\n"));
    assert!(t.ends_with(&format!("{}{}", saved("a@x", 1), saved("b@x", 1))));
}

#[test]
fn long_lines_are_refused_and_discarded() {
    // 510 bytes + CRLF = 512: exactly the limit, accepted.
    let ok = format!("NOOP {}\r\n", "x".repeat(505));
    assert_eq!(ok.len(), 512);
    let long = format!("NOOP {}\r\n", "x".repeat(506));
    let huge = format!("MAIL FROM:<{}@x>\r\n", "y".repeat(5000));
    let input = format!("LHLO c\r\n{ok}{long}{huge}NOOP\r\n");
    let h = transcript_with(small_limits, input.as_bytes());
    assert_eq!(
        h.text(),
        format!(
            "{GREETING}250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n\
             250-SIZE 1024\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-SMTPUTF8\r\n250 LIMITS RCPTMAX=2\r\n\
             250 2.0.0 OK\r\n500 5.5.2 Line too long\r\n500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"
        )
    );
    assert!(
        h.s.line.capacity() <= 512 + 64,
        "an over-long line is never buffered"
    );
}

#[test]
fn too_many_errors_drop_the_session() {
    let h = transcript_with(small_limits, b"FOO\r\nBAR\r\nHELO x\r\nLHLO c\r\n");
    assert_eq!(
        h.text(),
        format!(
            "{GREETING}500 5.5.2 Error: command not recognized\r\n500 5.5.2 Error: command not recognized\r\n\
             500 5.5.1 Use LHLO (this is LMTP, RFC 2033)\r\n421 4.7.0 mx.test Error: too many errors, closing connection\r\n"
        )
    );
    assert!(h.s.is_closing());
}

#[test]
fn idle_and_data_timeouts() {
    let mut h = Harness::new(cfg());
    let t0 = h.now;
    assert_eq!(h.s.poll_timeout(), Some(t0 + Duration::from_secs(300)));
    h.now = t0 + Duration::from_secs(10);
    h.feed(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\npartial");
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_secs(300)));
    h.s.handle_timeout(h.now + Duration::from_secs(299));
    assert!(!h.s.is_closing(), "not before the deadline");
    h.s.handle_timeout(h.now + Duration::from_secs(300));
    h.flush();
    assert!(
        h.text()
            .ends_with("421 4.4.2 mx.test Error: timeout exceeded, closing connection\r\n")
    );
    assert!(h.s.is_closing());
    assert_eq!(h.s.poll_timeout(), None);
    assert!(
        h.messages.is_empty(),
        "a message cut by a timeout is not stored"
    );

    let mut c = cfg();
    c.limits.idle_timeout = Duration::from_secs(5);
    c.limits.data_timeout = Duration::from_secs(60);
    let mut h = Harness::new(c);
    h.feed(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n");
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_secs(60)));
    h.feed(b".\r\n");
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_secs(5)));
}

struct Table;
impl RecipientPolicy for Table {
    fn check(&self, r: &Recipient) -> RcptVerdict {
        match r.base_address().as_str() {
            "known@x" => RcptVerdict::Accept,
            "flaky@x" => RcptVerdict::TempFail,
            _ => RcptVerdict::Unknown,
        }
    }
}

#[test]
fn policy_rejects_some_recipients_of_a_transaction() {
    let h = transcript_with(
        || {
            let mut c = cfg();
            c.policy = Arc::new(Table);
            c
        },
        b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@x>\r\nRCPT TO:<known+t@x>\r\nRCPT TO:<flaky@x>\r\nDATA\r\nx\r\n.\r\n",
    );
    let t = h.text();
    assert!(t.contains(
        "550 5.1.1 <nobody@x> User unknown\r\n250 2.1.5 OK\r\n\
         451 4.3.0 <flaky@x> Temporary lookup failure, try again later\r\n354"
    ));
    assert!(t.ends_with(&saved("known+t@x", 1)));
    assert_eq!(h.messages[0].envelope.recipients.len(), 1);
}

/// A pipelining MTA sends DATA (or BDAT) before it sees its RCPTs refused;
/// the `503` for a transaction whose every recipient was refused is not its
/// error, so a cached connection carrying many mails to unknown users is not
/// closed with `421` (Postfix's lmtp client pipelines exactly so). DATA
/// after no RCPT at all still counts.
#[test]
fn data_after_refused_recipients_is_not_a_client_error() {
    let limits = || {
        let mut c = small_limits();
        c.policy = Arc::new(Table);
        c
    };
    let mut input = b"LHLO c\r\n".to_vec();
    for _ in 0..5 {
        input.extend_from_slice(b"MAIL FROM:<s@x>\r\nRCPT TO:<nobody@x>\r\nDATA\r\nRSET\r\n");
        input.extend_from_slice(
            b"MAIL FROM:<s@x>\r\nRCPT TO:<flaky@x>\r\nBDAT 3 LAST\r\nabcRSET\r\n",
        );
    }
    input.extend_from_slice(b"MAIL FROM:<s@x>\r\nRCPT TO:<known@x>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n");
    let h = transcript_with(limits, &input);
    let t = h.text();
    assert!(!t.contains("421"), "{t}");
    assert_eq!(
        t.matches("503 5.5.1 Error: no valid recipients").count(),
        10,
        "{t}"
    );
    assert!(
        t.ends_with(&format!("{}221 2.0.0 Bye\r\n", saved("known@x", 1))),
        "{t}"
    );
    assert_eq!(h.messages.len(), 1);
    // Without any RCPT, DATA is a sequence error and counts (3 allowed).
    let h = transcript_with(
        limits,
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nDATA\r\nRSET\r\nMAIL FROM:<s@x>\r\nDATA\r\nRSET\r\nMAIL FROM:<s@x>\r\nDATA\r\n",
    );
    assert!(
        h.text()
            .ends_with("421 4.7.0 mx.test Error: too many errors, closing connection\r\n"),
        "{}",
        h.text()
    );
}

#[test]
fn callout_verification_stores_nothing() {
    let h = transcript_with(
        || {
            let mut c = cfg();
            c.policy = Arc::new(Table);
            c
        },
        b"LHLO verifier\r\nMAIL FROM:<>\r\nRCPT TO:<known@x>\r\nQUIT\r\n",
    );
    assert!(
        h.text()
            .ends_with("250 2.1.0 OK\r\n250 2.1.5 OK\r\n221 2.0.0 Bye\r\n")
    );
    assert!(h.messages.is_empty());
}

#[test]
fn bdat_chunks() {
    let h = transcript(
        "LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT 5\r\nhel\r\nBDAT 7 LAST\r\nlo\r\n.\r\nNOOP\r\n",
    );
    assert!(h.text().ends_with(&format!(
        "250 2.1.5 OK\r\n250 2.0.0 5 octets received\r\n{}{}250 2.0.0 OK\r\n",
        saved("a@x", 1),
        saved("b@x", 1)
    )));
    // No dot handling in BDAT: the content is stored as sent.
    assert_eq!(h.messages[0].body, b"hel\r\nlo\r\n.\r\n");
}

#[test]
fn bdat_zero_last_and_crlf_across_chunks() {
    let h = transcript(
        "LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 2\r\nx\rBDAT 1\r\n\nBDAT 0 LAST\r\n",
    );
    assert!(h.text().ends_with(&format!(
        "250 2.0.0 2 octets received\r\n250 2.0.0 1 octets received\r\n{}",
        saved("a@x", 1)
    )));
    assert_eq!(h.messages[0].body, b"x\r\n");
}

#[test]
fn bdat_without_transaction_is_read_and_refused() {
    // The chunk must be consumed, or its bytes would be taken for commands.
    let h = transcript(
        "LHLO c\r\nBDAT 12\r\nRSET\r\nQUIT\r\nNOOP\r\nMAIL FROM:<s@x>\r\nBDAT 6 LAST\r\nQUIT\r\n",
    );
    assert_eq!(
        h.text(),
        format!(
            "{GREETING}{LHLO}503 5.5.1 Error: need MAIL command\r\n250 2.0.0 OK\r\n250 2.1.0 OK\r\n\
             503 5.5.1 Error: no valid recipients\r\n"
        )
    );
    assert!(h.messages.is_empty());
}

#[test]
fn data_after_bdat_and_binarymime_with_data_are_refused() {
    let h = transcript("LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 1\r\nxDATA\r\n");
    assert!(
        h.text()
            .ends_with("503 5.5.1 Error: DATA cannot follow BDAT in one transaction\r\n")
    );
    let h = transcript("LHLO c\r\nMAIL FROM:<s@x> BODY=BINARYMIME\r\nRCPT TO:<a@x>\r\nDATA\r\n");
    assert!(
        h.text()
            .ends_with("503 5.5.1 Error: BODY=BINARYMIME requires BDAT, not DATA\r\n")
    );
}

#[test]
fn nul_is_refused_unless_binarymime() {
    let h = transcript("LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\na\0b\r\n.\r\n");
    assert!(h.text().ends_with(
        "554 5.6.0 <a@x> Message contains NUL characters (allowed only with BODY=BINARYMIME)\r\n"
    ));
    assert!(h.messages.is_empty());
    let h = transcript("LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 3 LAST\r\na\0b");
    assert!(h.text().ends_with(
        "554 5.6.0 <a@x> Message contains NUL characters (allowed only with BODY=BINARYMIME)\r\n"
    ));
    let h = transcript(
        "LHLO c\r\nMAIL FROM:<s@x> BODY=BINARYMIME\r\nRCPT TO:<a@x>\r\nBDAT 4 LAST\r\na\0\nb",
    );
    assert!(h.text().ends_with(&saved("a@x", 1)));
    assert_eq!(
        h.messages[0].body, b"a\0\nb",
        "binary content is stored as is"
    );
}

#[test]
fn bdat_oversize_is_refused_at_last_only() {
    let mut input = b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 800\r\n".to_vec();
    input.extend(std::iter::repeat_n(b'a', 800));
    input.extend_from_slice(b"BDAT 800 LAST\r\n");
    input.extend(std::iter::repeat_n(b'b', 800));
    let h = transcript_with(small_limits, &input);
    assert!(
        h.text()
            .ends_with("250 2.0.0 800 octets received\r\n552 5.3.4 <a@x> Message too big\r\n")
    );
    assert!(h.messages.is_empty());
}

const BARE: &str = "LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\none\ntwo\rthree\r\n.\r\n";

#[test]
fn bare_line_endings_policy() {
    let with = |p| {
        move || {
            let mut c = cfg();
            c.bare_line_endings = p;
            c
        }
    };
    let h = transcript_with(with(BareLineEndings::Accept), BARE.as_bytes());
    assert_eq!(h.messages[0].body, b"one\ntwo\rthree\r\n");
    assert_eq!((h.s.stats().bare_lf, h.s.stats().bare_cr), (1, 1));
    let h = transcript_with(with(BareLineEndings::Normalize), BARE.as_bytes());
    assert_eq!(h.messages[0].body, b"one\r\ntwo\r\nthree\r\n");
    let h = transcript_with(with(BareLineEndings::Reject), BARE.as_bytes());
    assert!(h.messages.is_empty());
    assert!(h.text().ends_with(
        "554 5.6.0 <a@x> Message contains bare CR or bare LF (only CRLF ends a line)\r\n\
         554 5.6.0 <b@x> Message contains bare CR or bare LF (only CRLF ends a line)\r\n"
    ));
}

/// SMTP smuggling: none of these end the data, so the "smuggled" commands are
/// content of the one message, and only the real terminator ends it.
#[test]
fn smuggling_sequences_are_content() {
    for fake_end in ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n", "\r\n.\r\r\n"] {
        let input = format!(
            "LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\nhead{fake_end}MAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\nDATA\r\nforged\r\n.\r\nNOOP\r\n"
        );
        let h = transcript_with(
            || {
                let mut c = cfg();
                c.bare_line_endings = BareLineEndings::Accept;
                c
            },
            input.as_bytes(),
        );
        assert_eq!(h.messages.len(), 1, "{fake_end:?}");
        let body = String::from_utf8(h.messages[0].body.clone()).unwrap();
        assert!(
            body.contains("MAIL FROM:<evil@x>"),
            "{fake_end:?}: {body:?}"
        );
        assert!(body.ends_with("forged\r\n"), "{fake_end:?}");
        assert!(
            h.text()
                .ends_with(&format!("{}250 2.0.0 OK\r\n", saved("a@x", 1))),
            "{fake_end:?}"
        );
    }
}

#[test]
fn dot_stuffing_is_undone() {
    let h = transcript(
        "LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n..\r\n..leading\r\nmid.dle\r\n.\r\n",
    );
    assert_eq!(h.messages[0].body, b".\r\n.leading\r\nmid.dle\r\n");
}

#[test]
fn lhlo_resets_the_transaction_and_several_messages_share_a_session() {
    let h = transcript(
        "LHLO c\r\nMAIL FROM:<s@x>\r\nLHLO c2\r\nRCPT TO:<a@x>\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n1\r\n.\r\n\
         MAIL FROM:<s@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n2\r\n.\r\nRSET\r\nMAIL FROM:<s@x>\r\nRSET\r\nRCPT TO:<c@x>\r\n",
    );
    let t = h.text();
    assert!(t.contains("503 5.5.1 Error: need MAIL command\r\n250 2.1.0 OK"));
    assert_eq!(h.messages.len(), 2);
    assert_eq!(h.messages[1].envelope.transaction.seq, 1);
    assert_eq!(h.messages[1].envelope.client.lhlo, "c2");
    assert!(t.contains(&saved("a@x", 1)));
    assert!(t.contains(&saved("b@x", 2)));
    assert!(t.ends_with(
        "250 2.0.0 OK\r\n250 2.1.0 OK\r\n250 2.0.0 OK\r\n503 5.5.1 Error: need MAIL command\r\n"
    ));
}

#[test]
fn shutdown_waits_for_the_transaction_in_flight() {
    let mut h = Harness::new(cfg());
    h.feed(b"LHLO c\r\n");
    h.s.begin_shutdown();
    h.flush();
    assert!(
        h.text()
            .ends_with("421 4.3.2 mx.test Service shutting down, closing connection\r\n")
    );
    assert!(h.s.is_closing());

    let mut h = Harness::new(cfg());
    h.auto_commit = false;
    h.feed(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\nbody\r\n");
    h.s.begin_shutdown();
    assert!(!h.s.is_closing(), "DATA in progress is allowed to finish");
    h.feed(b".\r\nMAIL FROM:<s@x>\r\n");
    assert!(!h.s.is_closing(), "the message is being committed");
    assert!(h.s.handle_commit(h.now, Ticket(0), committed(0)));
    h.flush();
    assert!(h.text().ends_with(&format!(
        "{}421 4.3.2 mx.test Service shutting down, closing connection\r\n",
        saved("a@x", 1)
    )));
    assert!(h.s.is_closing());
    assert_eq!(h.messages.len(), 1);
}

#[test]
fn stale_commit_is_refused() {
    let mut h = Harness::new(cfg());
    h.auto_commit = false;
    h.feed(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\nx\r\n.\r\n");
    // A ticket that is not pending changes nothing.
    assert!(!h.s.handle_commit(h.now, Ticket(5), committed(0)));
    assert!(h.s.is_awaiting_commit());
    h.flush();
    assert!(!h.text().contains("Saved"));
    assert!(h.s.handle_commit(h.now, Ticket(0), committed(0)));
    assert!(!h.s.is_awaiting_commit());
    // Nor does a second outcome for the same message.
    assert!(!h.s.handle_commit(h.now, Ticket(0), committed(0)));
}

#[test]
fn address_forms_reach_the_envelope() {
    let h = transcript(
        "LHLO c\r\nMAIL FROM:<@relay.example:s@x>\r\nRCPT TO:<\"john doe\"@[192.0.2.1]>\r\nRCPT TO:<u@[IPv6:2001:db8::1]>\r\nDATA\r\n.\r\n",
    );
    let e = &h.messages[0].envelope;
    assert_eq!(
        e.reverse_path,
        ReversePath::Mailbox(Mailbox {
            local: "s".into(),
            domain: "x".into()
        })
    );
    assert_eq!(
        e.recipients[0].mailbox.address(),
        "\"john doe\"@[192.0.2.1]"
    );
    assert_eq!(e.recipients[1].mailbox.domain, "[IPv6:2001:db8::1]");
    assert!(h.messages[0].body.is_empty());
}

#[test]
fn a_full_spool_refuses_mail_before_the_data() {
    let mut h = Harness::new(cfg());
    h.feed(b"LHLO c\r\n");
    // Open before the spool filled: this transaction goes on.
    h.feed(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\n");
    h.s.set_storage_full(true);
    h.feed(b"DATA\r\nx\r\n.\r\n");
    assert!(h.text().ends_with("354 Start mail input; end with <CRLF>.<CRLF>\r\n250 2.0.0 <a@x> 00000000000000000000000001 Saved\r\n"), "{}", h.text());
    assert_eq!(h.messages.len(), 1);
    // A new one is refused at MAIL; a pipelined BDAT's chunk is read and
    // dropped, never taken for commands.
    let before = h.out.len();
    h.feed(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 10 LAST\r\nQUIT\r\nxx\r\nNOOP\r\n");
    assert_eq!(
        &h.text()[before..],
        "452 4.3.1 Insufficient system storage\r\n503 5.5.1 Error: need MAIL command\r\n\
         503 5.5.1 Error: need MAIL command\r\n250 2.0.0 OK\r\n"
    );
    assert_eq!(h.messages.len(), 1, "nothing new was stored");
    // Room again: MAIL is taken.
    h.s.set_storage_full(false);
    h.feed(b"MAIL FROM:<s@x>\r\n");
    assert!(h.text().ends_with("250 2.1.0 OK\r\n"));
}
