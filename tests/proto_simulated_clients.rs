//! Simulated MTAs against the sans-IO session, in memory, with no sockets and
//! no sleeps: a Postfix-style pipelining client, an Exim-style lock-step
//! client and a CHUNKING (BDAT) client deliver random messages to random
//! recipients (some refused by the policy), while a simulated spool answers
//! late and with random outcomes. Input arrives split at random places.
//!
//! Checked for every run: the exact sequence of reply codes (one reply per
//! command, one per accepted recipient after the data, in order, nothing after
//! the 221), that a `250` after the data names the recipient and the queue id
//! the spool gave, and that each stored message is byte-identical to what the
//! client meant to send, with exactly the accepted recipients.

use std::sync::Arc;
use std::time::Instant;

use lmtp_ingest::envelope::{CommitOutcome, Message, QueueId, Recipient};
use lmtp_ingest::proto::{RcptVerdict, RecipientPolicy, Session, SessionConfig};
use proptest::prelude::*;

/// Refuses local parts starting with "nobody".
struct Policy;
impl RecipientPolicy for Policy {
    fn check(&self, r: &Recipient) -> RcptVerdict {
        if r.mailbox.local.starts_with("nobody") {
            RcptVerdict::Unknown
        } else {
            RcptVerdict::Accept
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Style {
    /// Postfix lmtp: MAIL, RCPTs and DATA in one write; QUIT right after the dot.
    Pipelined,
    /// Exim lmtp transport: one command per write, waits for each reply.
    LockStep,
    /// Exim smtp with protocol = lmtp: BDAT chunks.
    Chunking,
}

#[derive(Clone, Debug)]
struct Txn {
    rcpts: Vec<String>,
    /// The message as the client means it (before dot-stuffing).
    body: Vec<u8>,
    /// 0: committed, 1: failed, 2: storage full.
    outcome: u8,
    /// How many input rounds the spool takes to answer.
    delay: u8,
    /// BDAT chunk sizes (Chunking only); the rest goes in the LAST chunk.
    chunks: Vec<usize>,
}

fn line_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => "[a-zA-Z0-9 :<>@.]{0,90}".prop_map(|s| s.into_bytes()),
        1 => Just(b".".to_vec()),
        1 => Just(b"..".to_vec()),
        1 => "\\.[a-z. ]{0,20}".prop_map(|s| s.into_bytes()),
        1 => Just(b"QUIT".to_vec()),
        1 => Just(b"MAIL FROM:<evil@x>".to_vec()),
    ]
}

fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(line_strategy(), 0..40).prop_map(|lines| {
        let mut b = Vec::new();
        for l in lines {
            b.extend_from_slice(&l);
            b.extend_from_slice(b"\r\n");
        }
        b
    })
}

fn txn_strategy() -> impl Strategy<Value = Txn> {
    (
        prop::collection::vec((0u8..4, 0u8..6), 1..8),
        body_strategy(),
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        0u8..3,
        prop::collection::vec(0usize..300, 0..4),
    )
        .prop_map(|(rcpts, body, outcome, delay, chunks)| {
            // The first recipient is always accepted so DATA is always allowed;
            // duplicates are likely (small name space).
            let mut names = vec![format!("user{}@example.com", rcpts[0].1)];
            for (kind, n) in &rcpts[1..] {
                names.push(match kind {
                    0 => format!("nobody{n}@example.com"),
                    1 => format!("user{n}+tag{kind}@example.com"),
                    _ => format!("user{n}@example.com"),
                });
            }
            Txn {
                rcpts: names,
                body,
                outcome,
                delay,
                chunks,
            }
        })
}

fn stuff(body: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(body.len() + 8);
    for line in body.split_inclusive(|&c| c == b'\n') {
        if line.first() == Some(&b'.') {
            w.push(b'.');
        }
        w.extend_from_slice(line);
    }
    w.extend_from_slice(b".\r\n");
    w
}

/// The client's writes, and the reply codes it must get, in order.
fn plan(style: Style, txns: &[Txn]) -> (Vec<Vec<u8>>, Vec<u16>) {
    let mut writes: Vec<Vec<u8>> = vec![b"LHLO sim.example\r\n".to_vec()];
    let mut codes = vec![220, 250];
    for t in txns {
        let mut cmds: Vec<Vec<u8>> =
            vec![b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n".to_vec()];
        codes.push(250);
        for r in &t.rcpts {
            cmds.push(format!("RCPT TO:<{r}>\r\n").into_bytes());
            codes.push(if r.starts_with("nobody") { 550 } else { 250 });
        }
        let accepted = t.rcpts.iter().filter(|r| !r.starts_with("nobody")).count();
        let final_code = [250, 451, 452][t.outcome as usize];
        match style {
            Style::Chunking => {
                let mut rest = &t.body[..];
                for &n in &t.chunks {
                    let n = n.min(rest.len());
                    let mut c = format!("BDAT {n}\r\n").into_bytes();
                    c.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    cmds.push(c);
                    codes.push(250);
                }
                let mut c = format!("BDAT {} LAST\r\n", rest.len()).into_bytes();
                c.extend_from_slice(rest);
                cmds.push(c);
            }
            _ => {
                cmds.push(b"DATA\r\n".to_vec());
                codes.push(354);
                cmds.push(stuff(&t.body));
            }
        }
        codes.extend(std::iter::repeat_n(final_code, accepted));
        match style {
            Style::LockStep => writes.extend(cmds),
            _ => writes.push(cmds.concat()),
        }
    }
    match style {
        // Postfix pipelines QUIT right after the final dot.
        Style::Pipelined => writes.last_mut().unwrap().extend_from_slice(b"QUIT\r\n"),
        _ => writes.push(b"QUIT\r\n".to_vec()),
    }
    codes.push(221);
    (writes, codes)
}

/// Splits server output into replies: (code, text of the last line).
fn replies(out: &[u8]) -> Vec<(u16, String)> {
    let text = std::str::from_utf8(out).expect("replies are UTF-8");
    assert!(text.ends_with("\r\n"), "output ends mid-line: {text:?}");
    let mut v = Vec::new();
    for line in text.split_terminator("\r\n") {
        let code: u16 = line[..3].parse().expect("a reply line starts with a code");
        match line.as_bytes()[3] {
            b' ' => v.push((code, line[4..].to_string())),
            b'-' => {}
            other => panic!("bad reply separator {other:?} in {line:?}"),
        }
    }
    v
}

struct Run {
    out: Vec<u8>,
    stored: Vec<(Message, CommitOutcome)>,
}

/// Feeds the client's writes, each split at the given cut points, through a
/// session; the spool answers after the planned delay.
fn run(txns: &[Txn], writes: &[Vec<u8>], cuts: &[usize]) -> Run {
    let mut cfg = SessionConfig::new("mx.sim");
    cfg.policy = Arc::new(Policy);
    let now = Instant::now();
    let mut s = Session::new(Arc::new(cfg), "198.51.100.1:2525".into(), 99, now);
    let mut out = Vec::new();
    let mut stored: Vec<(Message, CommitOutcome)> = Vec::new();
    let mut pending_input: Vec<u8> = Vec::new();
    // The request in flight and the rounds left before the spool answers.
    let mut in_flight: Option<(lmtp_ingest::proto::Ticket, u8)> = None;
    let mut cut = cuts.iter().cycle();
    let mut pieces: Vec<&[u8]> = Vec::new();
    for w in writes {
        let mut rest = &w[..];
        while !rest.is_empty() {
            let n = (*cut.next().unwrap_or(&usize::MAX)).clamp(1, rest.len());
            pieces.push(&rest[..n]);
            rest = &rest[n..];
        }
    }
    let mut pieces = pieces.into_iter();
    let mut guard = 0;
    loop {
        guard += 1;
        assert!(guard < 1_000_000, "no progress");
        // The spool's turn.
        if let Some((ticket, rounds)) = in_flight {
            if rounds == 0 {
                let (msg, outcome) = stored.last().unwrap();
                let _ = msg;
                assert!(s.handle_commit(now, ticket, *outcome));
                in_flight = None;
            } else {
                in_flight = Some((ticket, rounds - 1));
            }
        }
        // The client's turn: the next piece, if any.
        let more = pieces.next();
        if let Some(p) = more {
            pending_input.extend_from_slice(p);
        }
        let n = s.handle_input(now, &pending_input);
        pending_input.drain(..n);
        if let Some(req) = s.poll_spool() {
            assert!(in_flight.is_none(), "one message at a time per session");
            let t = &txns[stored.len()];
            let outcome = match t.outcome {
                0 => CommitOutcome::Committed(QueueId(1000 + stored.len() as u128)),
                1 => CommitOutcome::Failed,
                _ => CommitOutcome::StorageFull,
            };
            stored.push((req.message, outcome));
            in_flight = Some((req.ticket, t.delay));
        }
        s.poll_output(&mut out);
        if more.is_none() && in_flight.is_none() && pending_input.is_empty() {
            break;
        }
    }
    assert!(s.is_closing(), "the session ends with QUIT");
    Run { out, stored }
}

fn check(style: Style, txns: &[Txn], cuts: &[usize]) {
    let (writes, codes) = plan(style, txns);
    let r = run(txns, &writes, cuts);
    let got = replies(&r.out);
    let got_codes: Vec<u16> = got.iter().map(|(c, _)| *c).collect();
    assert_eq!(got_codes, codes, "{style:?}: reply codes");
    assert_eq!(
        r.stored.len(),
        txns.len(),
        "one stored message per transaction"
    );
    // The final replies carry the recipient and, on success, the queue id.
    let mut finals = got
        .iter()
        .filter(|(c, t)| (*c == 250 && t.starts_with("2.0.0 <")) || *c == 451 || *c == 452);
    for (i, (t, (msg, outcome))) in txns.iter().zip(&r.stored).enumerate() {
        assert_eq!(msg.body, t.body, "{style:?}: body of message {i}");
        let accepted: Vec<&String> = t
            .rcpts
            .iter()
            .filter(|r| !r.starts_with("nobody"))
            .collect();
        let env_rcpts: Vec<String> = msg
            .envelope
            .recipients
            .iter()
            .map(|r| r.mailbox.address())
            .collect();
        assert_eq!(env_rcpts.iter().collect::<Vec<_>>(), accepted);
        assert_eq!(msg.envelope.transaction.seq, i as u32);
        for addr in accepted {
            let (_, text) = finals.next().expect("a final reply per accepted recipient");
            assert!(
                text.contains(&format!("<{addr}>")),
                "{text} should name {addr}"
            );
            if let CommitOutcome::Committed(id) = outcome {
                assert!(text.contains(&id.to_string()), "{text} should carry {id}");
            }
        }
    }
    assert!(finals.next().is_none());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn pipelining_client(txns in prop::collection::vec(txn_strategy(), 1..5),
                         cuts in prop::collection::vec(1usize..200, 1..20)) {
        check(Style::Pipelined, &txns, &cuts);
    }

    #[test]
    fn lock_step_client(txns in prop::collection::vec(txn_strategy(), 1..5),
                        cuts in prop::collection::vec(1usize..4000, 1..5)) {
        check(Style::LockStep, &txns, &cuts);
    }

    #[test]
    fn chunking_client(txns in prop::collection::vec(txn_strategy(), 1..5),
                       cuts in prop::collection::vec(1usize..200, 1..20)) {
        check(Style::Chunking, &txns, &cuts);
    }
}

#[test]
fn whole_conversation_in_one_piece_and_byte_by_byte() {
    let txns = vec![Txn {
        rcpts: vec![
            "a@example.com".into(),
            "nobody@example.com".into(),
            "a@example.com".into(),
        ],
        body: b".\r\n..\r\n.x\r\nline\r\n".to_vec(),
        outcome: 0,
        delay: 2,
        chunks: vec![3, 0],
    }];
    for style in [Style::Pipelined, Style::LockStep, Style::Chunking] {
        check(style, &txns, &[usize::MAX]);
        check(style, &txns, &[1]);
    }
}
