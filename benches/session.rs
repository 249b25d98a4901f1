//! Whole LMTP transactions per second through the sans-IO session: MAIL, RCPT
//! (1 or 50), DATA, a dot-stuffed body, the spool outcome, the per-recipient
//! replies. Input arrives in 16 KiB pieces, as from a recv buffer ring. Every
//! iteration checks its result (one `250 2.0.0` per recipient, the stored body
//! length), so a broken session fails instead of looking fast.
//!
//! Run: `cargo bench --bench session`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmtp_ingest::envelope::{CommitOutcome, QueueId};
use lmtp_ingest::proto::{Session, SessionConfig};

const RECV_CHUNK: usize = 16 * 1024;

/// A body of `size` bytes of 76-character CRLF lines; every 40th line starts
/// with a dot, so the client stuffs it. Returns (wire form, stored form).
fn body(size: usize) -> (Vec<u8>, Vec<u8>) {
    let mut stored = Vec::with_capacity(size + 80);
    let mut line = 0usize;
    while stored.len() < size {
        if line % 40 == 0 {
            stored.push(b'.');
        }
        for k in 0..74 {
            stored.push(b'a' + ((line * 7 + k) % 26) as u8);
        }
        stored.extend_from_slice(b"\r\n");
        line += 1;
    }
    let mut wire = Vec::with_capacity(stored.len() + stored.len() / 40 + 8);
    for l in stored.split_inclusive(|&c| c == b'\n') {
        if l.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(l);
    }
    wire.extend_from_slice(b".\r\n");
    (wire, stored)
}

/// The bytes of one transaction from a pipelining client.
fn transaction(rcpts: usize, wire_body: &[u8]) -> Vec<u8> {
    let mut t = b"MAIL FROM:<sender@example.org> SIZE=4096 BODY=8BITMIME\r\n".to_vec();
    for i in 0..rcpts {
        t.extend_from_slice(format!("RCPT TO:<user{i}+tag@example.com>\r\n").as_bytes());
    }
    t.extend_from_slice(b"DATA\r\n");
    t.extend_from_slice(wire_body);
    t
}

/// Runs one transaction through `s`, answering its spool request at once;
/// returns the number of per-recipient 250 replies seen.
fn run_one(
    s: &mut Session,
    now: Instant,
    input: &[u8],
    out: &mut Vec<u8>,
    stored_len: usize,
) -> usize {
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + RECV_CHUNK).min(input.len());
        pos += s.handle_input(now, &input[pos..end]);
        if let Some(req) = s.poll_spool() {
            assert_eq!(req.message.body.len(), stored_len);
            s.handle_commit(now, req.ticket, CommitOutcome::Committed(QueueId(1)));
            black_box(req.message);
        }
    }
    out.clear();
    s.poll_output(out);
    memchr::memmem::find_iter(out, b"250 2.0.0 <").count()
}

fn bench(c: &mut Criterion) {
    let cfg = Arc::new(SessionConfig::new("mx.bench"));
    let mut g = c.benchmark_group("session");
    g.sample_size(30);
    g.measurement_time(std::time::Duration::from_secs(3));
    g.warm_up_time(std::time::Duration::from_secs(1));
    for (name, rcpts, size) in [
        ("txn_1rcpt_4KiB", 1, 4096),
        ("txn_50rcpt_4KiB", 50, 4096),
        ("txn_1rcpt_64KiB", 1, 65536),
    ] {
        let (wire, stored) = body(size);
        let input = transaction(rcpts, &wire);
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            let now = Instant::now();
            let mut s = Session::new(cfg.clone(), "127.0.0.1:1".into(), 1, now);
            let mut out = Vec::with_capacity(8192);
            s.handle_input(now, b"LHLO bench\r\n");
            s.poll_output(&mut out);
            b.iter(|| {
                let n = run_one(&mut s, now, black_box(&input), &mut out, stored.len());
                assert_eq!(n, rcpts);
            })
        });
    }
    // A whole connection: greeting, LHLO, one message, QUIT.
    let (wire, stored) = body(4096);
    let mut conn = b"LHLO bench\r\n".to_vec();
    conn.extend_from_slice(&transaction(1, &wire));
    conn.extend_from_slice(b"QUIT\r\n");
    g.bench_function("connection_1rcpt_4KiB", |b| {
        let now = Instant::now();
        let mut out = Vec::with_capacity(8192);
        b.iter(|| {
            let mut s = Session::new(cfg.clone(), "127.0.0.1:1".into(), 1, now);
            let mut pos = 0;
            while pos < conn.len() {
                pos += s.handle_input(now, &conn[pos..]);
                if let Some(req) = s.poll_spool() {
                    assert_eq!(req.message.body.len(), stored.len());
                    s.handle_commit(now, req.ticket, CommitOutcome::Committed(QueueId(1)));
                }
            }
            out.clear();
            s.poll_output(&mut out);
            assert!(s.is_closing() && out.ends_with(b"221 2.0.0 Bye\r\n"));
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
