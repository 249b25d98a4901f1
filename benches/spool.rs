//! Spool throughput: group commit against one fdatasync per message, at 4 KiB
//! and 64 KiB bodies, with several producer threads (like shards, each with a
//! window of messages in flight). Reports messages/s (criterion) and, per
//! case, MB/s, the batch sizes reached and the mean fdatasync latency.
//!
//! "One fdatasync per message" is the same spool with `batch_messages_max = 1`,
//! so the only difference measured is the batching.
//!
//! The spool lives under target/ (the real disk, never /tmp or tmpfs).
//! Every iteration checks that all its messages were committed, so a broken
//! spool fails the bench instead of looking fast.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmtp_ingest::envelope::{
    ClientInfo, CommitOutcome, Envelope, MailParams, Mailbox, Message, Recipient, ReversePath,
    TransactionId,
};
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

/// Commits `total` messages from PRODUCERS threads; returns the time taken.
fn run(spool: &Spool, total: u64, body_bytes: usize) -> Duration {
    let per = total.div_ceil(PRODUCERS as u64);
    let start = Arc::new(Barrier::new(PRODUCERS + 1));
    let handles: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let p = spool.producer(None);
            let start = start.clone();
            let msg = message(body_bytes);
            std::thread::spawn(move || {
                start.wait();
                let (mut sent, mut done) = (0u64, 0u64);
                while done < per {
                    while sent < per && p.in_flight() < WINDOW {
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

fn case(c: &mut Criterion, body_bytes: usize, group_commit: bool) {
    let label = format!(
        "{}_{}k",
        if group_commit {
            "group_commit"
        } else {
            "fsync_per_message"
        },
        body_bytes >> 10
    );
    let mut cfg = SpoolConfig::new(bench_dir(&label));
    if !group_commit {
        cfg.batch_messages_max = 1;
    }
    let (spool, _) = Spool::open(cfg).unwrap();
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(if group_commit { 4 } else { 6 }));
    let mut measured = (0u64, Duration::ZERO);
    let before = spool.stats();
    group.bench_function(&label, |b| {
        b.iter_custom(|iters| {
            let d = run(&spool, iters, body_bytes);
            measured.0 += iters.div_ceil(PRODUCERS as u64) * PRODUCERS as u64;
            measured.1 += d;
            d
        })
    });
    group.finish();
    let s: SpoolStats = spool.stats().since(&before);
    let secs = measured.1.as_secs_f64();
    println!(
        "{label}: {:.0} msg/s, {:.1} MB/s of bodies; batches: mean {:.1}, max {} messages; \
         fdatasync: {} calls, mean {:.0} us, max {:.0} us; {} segments created",
        measured.0 as f64 / secs,
        (measured.0 * body_bytes as u64) as f64 / secs / 1e6,
        s.batch_messages_mean(),
        s.batch_messages_max,
        s.fsyncs,
        s.fsync_us_mean(),
        s.fsync_ns_max as f64 / 1000.0,
        s.segments_created,
    );
    spool.shutdown();
    let _ = std::fs::remove_dir_all(bench_dir(&label));
}

fn spool_benches(c: &mut Criterion) {
    for body_bytes in [4 << 10, 64 << 10] {
        case(c, body_bytes, true);
        case(c, body_bytes, false);
    }
}

criterion_group!(benches, spool_benches);
criterion_main!(benches);
