//! Fuzz target: whole sessions.
//!
//! The input is a client's byte stream (after two control bytes). It is fed
//! whole and in small pieces; both runs must give the same replies and the same
//! stored messages. Every reply is well-formed, the session never stores a body
//! over the limit, and each stored message is answered with exactly one reply
//! per accepted recipient. A full spool (MAIL refused with 452) comes and
//! goes with the stored messages.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use lmtp_ingest::envelope::{CommitOutcome, Message, QueueId};
use lmtp_ingest::proto::{BareLineEndings, Session, SessionConfig};

const BODY_MAX: usize = 1024;

fn config(policy_byte: u8) -> Arc<SessionConfig> {
    let mut c = SessionConfig::new("mx.fuzz");
    c.limits.message_bytes_max = BODY_MAX;
    c.limits.line_bytes_max = 512;
    c.limits.recipients_max = 4;
    c.limits.bad_commands_max = 64;
    c.bare_line_endings = match policy_byte % 3 {
        0 => BareLineEndings::Accept,
        1 => BareLineEndings::Normalize,
        _ => BareLineEndings::Reject,
    };
    Arc::new(c)
}

fn drive(
    cfg: &Arc<SessionConfig>,
    input: &[u8],
    piece: usize,
    outcome: u8,
) -> (Vec<u8>, Vec<Message>) {
    let now = Instant::now();
    let mut s = Session::new(cfg.clone(), "203.0.113.9:1".into(), 1, now);
    let mut out = Vec::new();
    let mut msgs = Vec::new();
    let mut pending = Vec::new();
    for chunk in input.chunks(piece.max(1)) {
        pending.extend_from_slice(chunk);
        loop {
            // A full spool after every other stored message (when the
            // outcome byte's top bit says so): MAIL is then refused. It
            // depends only on what was stored, so both runs agree.
            s.set_storage_full(outcome & 0x80 != 0 && msgs.len() % 2 == 1);
            let n = s.handle_input(now, &pending);
            pending.drain(..n);
            let Some(req) = s.poll_spool() else { break };
            assert!(req.message.body.len() <= BODY_MAX);
            let rcpts = req.message.envelope.recipients.len();
            assert!(rcpts >= 1 && rcpts <= 4);
            // Nothing goes out while the message waits for its outcome.
            assert!(!s.poll_output(&mut out), "a reply sent before the outcome");
            let o = match (outcome as usize + msgs.len()) % 3 {
                0 => CommitOutcome::Committed(QueueId(msgs.len() as u128)),
                1 => CommitOutcome::Failed,
                _ => CommitOutcome::StorageFull,
            };
            assert!(s.handle_commit(now, req.ticket, o));
            // Replies held while the message waited (the rest of its batch:
            // MAIL, RCPT, a 354) come first, then exactly one reply line per
            // accepted recipient, in order, and nothing after them.
            let mut finals = Vec::new();
            s.poll_output(&mut finals);
            let lines: Vec<&[u8]> = finals.split_inclusive(|&c| c == b'\n').collect();
            assert!(
                lines.len() >= rcpts,
                "{} replies for {rcpts} recipients",
                lines.len()
            );
            let own = &lines[lines.len() - rcpts..];
            for (line, r) in own.iter().zip(&req.message.envelope.recipients) {
                let want = format!("<{}>", r.mailbox.address());
                assert!(memchr::memmem::find(line, want.as_bytes()).is_some());
            }
            out.extend_from_slice(&finals);
            msgs.push(req.message);
        }
    }
    s.poll_output(&mut out);
    // Timeouts always end the session cleanly.
    if let Some(t) = s.poll_timeout() {
        s.handle_timeout(t + Duration::from_secs(1));
        assert!(s.is_closing());
        s.poll_output(&mut out);
    }
    (out, msgs)
}

fn well_formed(out: &[u8]) {
    assert!(out.is_empty() || out.ends_with(b"\r\n"));
    for line in out.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.len() >= 5 && line.ends_with(b"\r"), "{line:?}");
        assert!(line[..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert!(line[3] == b' ' || line[3] == b'-', "{line:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let [a, b, input @ ..] = data else { return };
    let cfg = config(*a);
    let whole = drive(&cfg, input, input.len(), *b);
    let pieces = drive(&cfg, input, (*a as usize >> 2) % 13 + 1, *b);
    assert_eq!(whole.0, pieces.0, "replies differ with chunking");
    assert_eq!(whole.1, pieces.1, "messages differ with chunking");
    well_formed(&whole.0);
});
