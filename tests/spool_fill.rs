//! How writers make new segments (`spool.segment_fill`), on the real disk:
//! with `auto`, batches of large messages make the next segments by
//! allocation and batches of small ones keep zero-filling; forced either
//! way, every committed message reads back byte-identical, the segments
//! scan clean, and a reopened spool recovers them all and goes on.

mod spool_util;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use lmtp_ingest::envelope::{CommitOutcome, QueueId};
use lmtp_ingest::spool::{FillPolicy, Spool, SpoolStats, reader};
use spool_util::{config, message, spool_dir};

/// Commits `per_producer` messages of `body_len` bytes from 4 producers,
/// each keeping `inflight` submitted; returns the ids with what each holds,
/// and the spool's statistics.
fn commit(
    dir: &std::path::Path,
    fill: FillPolicy,
    body_len: usize,
    inflight: usize,
    per_producer: u32,
) -> (HashMap<QueueId, (u32, u32)>, SpoolStats) {
    commit_with(dir, fill, true, body_len, inflight, per_producer)
}

fn commit_with(
    dir: &std::path::Path,
    fill: FillPolicy,
    direct_io: bool,
    body_len: usize,
    inflight: usize,
    per_producer: u32,
) -> (HashMap<QueueId, (u32, u32)>, SpoolStats) {
    let mut cfg = config(dir);
    // Several segments per run, each holding a few batches.
    cfg.segment_bytes = 4 << 20;
    cfg.segment_fill = fill;
    cfg.direct_io = direct_io;
    let (spool, _) = Spool::open(cfg).unwrap();
    let mut handles = Vec::new();
    for t in 0..4u32 {
        let p = spool.producer(None);
        handles.push(std::thread::spawn(move || {
            let mut ids = Vec::new();
            let mut n = 0u32;
            while ids.len() < per_producer as usize {
                while n < per_producer && p.in_flight() < inflight {
                    p.submit(n as u64, message(5, t, n, body_len), SystemTime::now())
                        .unwrap();
                    n += 1;
                }
                match p.wait_completion(Duration::from_secs(10)) {
                    Some((ticket, CommitOutcome::Committed(id))) => {
                        ids.push((id, t, ticket as u32))
                    }
                    other => panic!("producer {t}: {other:?}"),
                }
            }
            ids
        }));
    }
    let mut acked = HashMap::new();
    for h in handles {
        for (id, t, n) in h.join().unwrap() {
            acked.insert(id, (t, n));
        }
    }
    let stats = spool.stats();
    spool.shutdown();
    (acked, stats)
}

/// Every acknowledged message is in the spool, byte-identical, and no
/// segment holds a torn or invalid record.
fn check_all_there(dir: &std::path::Path, acked: &HashMap<QueueId, (u32, u32)>, body_len: usize) {
    let (records, scans) = reader::read_all(dir).unwrap();
    for (info, scan) in &scans {
        assert!(scan.invalid.is_none(), "{}: {:?}", info.id, scan.invalid);
    }
    let by_id: HashMap<QueueId, &reader::StoredRecord> =
        records.iter().map(|r| (r.header.queue_id, r)).collect();
    for (id, (t, n)) in acked {
        let r = by_id.get(id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(r.message(), message(5, *t, *n, body_len), "{id}");
    }
}

#[test]
fn auto_allocates_under_large_batches_and_zero_fills_under_small_ones() {
    // 4 producers x 8 in flight x 128 KiB: batches of up to 4 MiB (the
    // batch byte cap), far above the 512 KiB at which auto allocates.
    let dir = spool_dir("fill-auto-large");
    let (acked, stats) = commit(&dir, FillPolicy::Auto, 128 << 10, 8, 60);
    assert!(
        stats.segments_allocated > 0 && stats.segments_allocated < stats.segments_created,
        "the first segments are zero-filled (no batch seen yet), later ones allocated: {stats:?}"
    );
    check_all_there(&dir, &acked, 128 << 10);

    // One 4 KiB message in flight per producer: batches of at most 16 KiB.
    let dir = spool_dir("fill-auto-small");
    let (acked, stats) = commit(&dir, FillPolicy::Auto, 4096, 1, 800);
    assert!(stats.segments_created >= 2, "{stats:?}");
    assert_eq!(stats.segments_allocated, 0, "{stats:?}");
    check_all_there(&dir, &acked, 4096);
}

#[test]
fn forced_allocation_stores_and_recovers_every_message() {
    let dir = spool_dir("fill-allocate");
    let (mut acked, stats) = commit(&dir, FillPolicy::Allocate, 20_000, 2, 200);
    assert_eq!(
        stats.segments_allocated, stats.segments_created,
        "every segment allocated: {stats:?}"
    );
    check_all_there(&dir, &acked, 20_000);
    // Reopened: recovery scans the allocated segments (their unwritten
    // tails read as zeros), finds every record, and the spool goes on
    // writing into the last one.
    let (more, _) = commit(&dir, FillPolicy::Allocate, 20_000, 2, 50);
    acked.extend(more);
    check_all_there(&dir, &acked, 20_000);

    // Through the page cache: writeback, not the direct write, turns the
    // blocks written, and the batch's fdatasync still covers it.
    let dir = spool_dir("fill-allocate-buffered");
    let (acked, stats) = commit_with(&dir, FillPolicy::Allocate, false, 20_000, 2, 100);
    assert_eq!(
        stats.segments_allocated, stats.segments_created,
        "{stats:?}"
    );
    check_all_there(&dir, &acked, 20_000);

    // Forced zeros: none allocated.
    let dir = spool_dir("fill-zeros");
    let (acked, stats) = commit(&dir, FillPolicy::Zeros, 128 << 10, 8, 30);
    assert_eq!(stats.segments_allocated, 0, "{stats:?}");
    check_all_there(&dir, &acked, 128 << 10);
}
