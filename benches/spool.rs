//! Spool throughput: group commit against one fdatasync per message, at 4 KiB
//! and 64 KiB bodies, with several producer threads (like shards, each with a
//! window of messages in flight), and two lock-step cases (one message in
//! flight per producer) for latency. Reports messages/s (criterion) and, per
//! case, MB/s, time per message, the batch sizes reached and the mean
//! fdatasync latency. Run one case with `cargo bench --bench spool -- NAME`.
//!
//! "One fdatasync per message" is the same spool with `batch_messages_max = 1`,
//! so the only difference measured is the batching.
//!
//! `record_encode_4k`, `record_encode_64k` and `record_encode_4k_50rcpt` time
//! what the writer does to each message before any I/O: encode its record (header, envelope, body, CRC32C)
//! and check that it parses back. CPU only, so they compare builds even on a
//! noisy disk.
//!
//! The spool lives under target/ (the real disk, never /tmp or tmpfs).
//! Every iteration checks that all its messages were committed, so a broken
//! spool fails the bench instead of looking fast.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmtp_ingest::envelope::{
    ClientInfo, CommitOutcome, Envelope, MailParams, Mailbox, Message, QueueId, Recipient,
    ReversePath, TransactionId,
};
use lmtp_ingest::spool::record::{self, Parsed};
use lmtp_ingest::spool::{Spool, SpoolConfig, SpoolStats};

const PRODUCERS: usize = 8;
/// Messages each producer keeps in flight (a shard with many sessions).
const WINDOW: usize = 16;

fn message(body_bytes: usize) -> Message {
    Message {
        envelope: Envelope {
            reverse_path: ReversePath::Mailbox(Mailbox {
                local: "sender".into(),
                domain: "example.net".into(),
            }),
            params: MailParams::default(),
            recipients: vec![Recipient {
                mailbox: Mailbox {
                    local: "user".into(),
                    domain: "example.org".into(),
                },
                detail: None,
            }],
            client: ClientInfo {
                peer: "192.0.2.1:25".into(),
                lhlo: "mx.example.net".into(),
            },
            transaction: TransactionId { session: 1, seq: 1 },
        },
        body: vec![b'x'; body_bytes],
    }
}

fn bench_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("spool-bench")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Commits `total` messages from `producers` threads, each keeping `window`
/// in flight; returns the time taken.
fn run(spool: &Spool, total: u64, body_bytes: usize, producers: usize, window: usize) -> Duration {
    let per = total.div_ceil(producers as u64);
    let start = Arc::new(Barrier::new(producers + 1));
    let handles: Vec<_> = (0..producers)
        .map(|_| {
            let p = spool.producer(None);
            let start = start.clone();
            let msg = message(body_bytes);
            std::thread::spawn(move || {
                start.wait();
                let (mut sent, mut done) = (0u64, 0u64);
                while done < per {
                    while sent < per && p.in_flight() < window {
                        p.submit(sent, msg.clone(), SystemTime::now()).unwrap();
                        sent += 1;
                    }
                    let (_, o) = p
                        .wait_completion(Duration::from_secs(30))
                        .expect("an outcome");
                    assert!(matches!(o, CommitOutcome::Committed(_)), "{o:?}");
                    done += 1;
                }
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    t.elapsed()
}

struct Case {
    label: &'static str,
    body_bytes: usize,
    producers: usize,
    window: usize,
    group_commit: bool,
}

fn case(c: &mut Criterion, k: &Case) {
    let mut spool: Option<Spool> = None;
    let mut before = SpoolStats::default();
    let mut measured = (0u64, Duration::ZERO);
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(if k.group_commit { 4 } else { 6 }));
    group.bench_function(k.label, |b| {
        // Opened on first use, so a name filter skips the other cases.
        let s = spool.get_or_insert_with(|| {
            let mut cfg = SpoolConfig::new(bench_dir(k.label));
            if !k.group_commit {
                cfg.batch_messages_max = 1;
            }
            let (s, _) = Spool::open(cfg).unwrap();
            before = s.stats();
            s
        });
        b.iter_custom(|iters| {
            let d = run(s, iters, k.body_bytes, k.producers, k.window);
            measured.0 += iters.div_ceil(k.producers as u64) * k.producers as u64;
            measured.1 += d;
            d
        })
    });
    group.finish();
    let Some(spool) = spool else { return };
    let st = spool.stats().since(&before);
    let secs = measured.1.as_secs_f64();
    println!(
        "{}: {:.0} msg/s, {:.1} MB/s of bodies, {:.0} us per message per producer; \
         batches: mean {:.1}, max {} messages; fdatasync: {} calls, mean {:.0} us, max {:.0} us; \
         {} segments created",
        k.label,
        measured.0 as f64 / secs,
        (measured.0 * k.body_bytes as u64) as f64 / secs / 1e6,
        secs * 1e6 * k.producers as f64 / measured.0 as f64,
        st.batch_messages_mean(),
        st.batch_messages_max,
        st.fsyncs,
        st.fsync_us_mean(),
        st.fsync_ns_max as f64 / 1000.0,
        st.segments_created,
    );
    spool.shutdown();
    let _ = std::fs::remove_dir_all(bench_dir(k.label));
}

/// The writer's CPU per record: encode (with its built-in check) into a
/// buffer that is reused, as the writer's is.
fn encode_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("spool");
    for (label, body_bytes, rcpts) in [
        ("record_encode_4k", 4 << 10, 1),
        ("record_encode_64k", 64 << 10, 1),
        ("record_encode_4k_50rcpt", 4 << 10, 50),
    ] {
        let mut msg = message(body_bytes);
        msg.envelope.recipients = (0..rcpts)
            .map(|i| Recipient {
                mailbox: Mailbox {
                    local: format!("user{i:05}"),
                    domain: "example.org".into(),
                },
                detail: None,
            })
            .collect();
        let mut buf = Vec::with_capacity(body_bytes + 4096);
        group.throughput(Throughput::Bytes(body_bytes as u64));
        group.bench_function(label, |b| {
            let mut seq = 0u64;
            b.iter(|| {
                buf.clear();
                seq += 1;
                let len = record::encode(&mut buf, seq, QueueId(seq as u128), 1, &msg)
                    .expect("a small message encodes");
                std::hint::black_box(&buf);
                len
            })
        });
        // The bench must measure a record that readers accept.
        assert!(matches!(record::parse(&buf), Parsed::Record(..)));
    }
    group.finish();
}

fn spool_benches(c: &mut Criterion) {
    let cases = [
        ("group_commit_4k", 4 << 10, PRODUCERS, WINDOW, true),
        ("fsync_per_message_4k", 4 << 10, PRODUCERS, WINDOW, false),
        ("group_commit_64k", 64 << 10, PRODUCERS, WINDOW, true),
        ("fsync_per_message_64k", 64 << 10, PRODUCERS, WINDOW, false),
        // One message in flight per producer: the latency of a lone 250, and
        // what group commit gathers from producers that each wait.
        ("lockstep_1_producer_4k", 4 << 10, 1, 1, true),
        ("lockstep_8_producers_4k", 4 << 10, PRODUCERS, 1, true),
    ];
    for (label, body_bytes, producers, window, group_commit) in cases {
        case(
            c,
            &Case {
                label,
                body_bytes,
                producers,
                window,
                group_commit,
            },
        );
    }
}

criterion_group!(benches, encode_benches, spool_benches);
criterion_main!(benches);
