//! The spool end to end on the real disk: group commit, outcomes and wakers,
//! recovery round trip, torn-tail cut, lock and tmpfs refusal, shutdown.

mod spool_util;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use lmtp_ingest::envelope::{CommitOutcome, QueueId};
use lmtp_ingest::spool::reader;
use lmtp_ingest::spool::{RejectReason, Spool, SpoolError};
use spool_util::{config, message, spool_dir, waker_counter};

#[test]
fn group_commit_many_producers_then_recover_byte_identical() {
    let dir = spool_dir("group");
    let mut cfg = config(&dir);
    cfg.writers = 2;
    let (spool, report) = Spool::open(cfg.clone()).unwrap();
    assert_eq!(report.records, 0);
    let threads = 8u32;
    let per = 150u32;
    let mut handles = Vec::new();
    for t in 0..threads {
        let (wakes, waker) = waker_counter();
        let p = spool.producer(Some(waker));
        handles.push(std::thread::spawn(move || {
            // Keep up to 8 in flight, like a shard with several sessions.
            let mut ids = HashMap::new();
            let mut next = 0u32;
            let mut done = Vec::new();
            while ids.len() < per as usize {
                while next < per && p.in_flight() < 8 {
                    let m = message(1, t, next, 200 + (next as usize * 37) % 9000);
                    p.try_submit(next as u64, m, SystemTime::now()).unwrap();
                    next += 1;
                }
                if let Some((ticket, outcome)) = p.wait_completion(Duration::from_secs(10)) {
                    match outcome {
                        CommitOutcome::Committed(id) => {
                            ids.insert(ticket as u32, id);
                        }
                        other => panic!("ticket {ticket}: {other:?}"),
                    }
                }
                p.drain(&mut done);
                for (ticket, outcome) in done.drain(..) {
                    let CommitOutcome::Committed(id) = outcome else {
                        panic!("{outcome:?}")
                    };
                    ids.insert(ticket as u32, id);
                }
            }
            assert!(wakes.load(Ordering::Relaxed) > 0, "waker never called");
            (t, ids)
        }));
    }
    let mut all: HashMap<QueueId, (u32, u32)> = HashMap::new();
    for h in handles {
        let (t, ids) = h.join().unwrap();
        for (n, id) in ids {
            assert!(all.insert(id, (t, n)).is_none(), "duplicate id {id}");
        }
    }
    let stats = spool.stats();
    assert_eq!(stats.messages_committed, (threads * per) as u64);
    assert!(
        stats.batches < stats.messages_committed,
        "no batching: {stats:?}"
    );
    assert!(stats.fsyncs <= stats.batches + stats.segments_created);
    spool.shutdown();

    let (spool, report) = Spool::open(cfg).unwrap();
    assert_eq!(report.records, (threads * per) as u64, "{report}");
    assert!(report.cut.is_empty(), "{report}");
    drop(spool);
    let (records, scans) = reader::read_all(&dir).unwrap();
    assert!(scans.len() > 2, "expected several segments");
    assert!(scans.iter().all(|(_, s)| s.invalid.is_none()));
    assert_eq!(records.len(), all.len());
    for r in records {
        let (t, n) = all[&r.header.queue_id];
        let want = message(1, t, n, 200 + (n as usize * 37) % 9000);
        assert_eq!(r.message(), want, "{}", r.header.queue_id);
    }
}

#[test]
fn ids_are_unique_and_increase_per_writer_across_restarts() {
    let dir = spool_dir("ids");
    let cfg = config(&dir);
    let mut seen = Vec::new();
    for round in 0..3 {
        let (spool, _) = Spool::open(cfg.clone()).unwrap();
        let mut p = spool.producer(None);
        for n in 0..20 {
            match p.commit(message(round, 0, n, 100)) {
                CommitOutcome::Committed(id) => seen.push(id),
                o => panic!("{o:?}"),
            }
        }
        spool.shutdown();
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "ids must increase");
    let texts: Vec<String> = seen.iter().map(|i| i.to_string()).collect();
    assert!(texts.windows(2).all(|w| w[0] < w[1]), "text sorts too");
}

#[test]
fn a_bad_record_below_the_committed_watermark_is_reported_as_damage() {
    let dir = spool_dir("damage");
    let cfg = config(&dir);
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut p = spool.producer(None);
    for n in 0..5 {
        let CommitOutcome::Committed(_) = p.commit(message(7, 0, n, 3000)) else {
            panic!()
        };
    }
    spool.shutdown();
    // One bit flips in the third record's body, on the disk, after its
    // batch was synced and answered.
    let (records, scans) = reader::read_all(&dir).unwrap();
    let third = &records[2];
    let (info, _) = &scans[0];
    let at = third.offset + third.padded_len / 2;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&info.path)
        .unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x10], at).unwrap();
    drop(f);

    let (spool, report) = Spool::open(cfg).unwrap();
    spool.shutdown();
    assert_eq!(report.records, 2, "{report}");
    assert_eq!(report.cut.len(), 1, "{report}");
    let c = &report.cut[0];
    assert_eq!(c.offset, third.offset);
    assert_eq!(c.valid_after, 2, "{report}");
    assert!(c.below_committed, "{report}");
    assert!(report.damage(), "{report}");
    let text = report.to_string();
    assert!(
        text.contains("below the committed watermark") && text.contains("saved to"),
        "{text}"
    );
    // Nothing is destroyed: the cut bytes, the damaged record first, are kept.
    let path = c.saved_to.as_ref().unwrap();
    assert!(
        path.to_string_lossy().ends_with("-damage.bin"),
        "named as damage, for spool verify: {path:?}"
    );
    let saved = std::fs::read(path).unwrap();
    assert_eq!(saved.len() as u64, c.bytes);
}

#[test]
fn torn_tail_is_cut_and_writing_continues_after_it() {
    let dir = spool_dir("torn");
    let cfg = config(&dir);
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut p = spool.producer(None);
    let mut ids = Vec::new();
    for n in 0..5 {
        let CommitOutcome::Committed(id) = p.commit(message(7, 0, n, 3000)) else {
            panic!()
        };
        ids.push(id);
    }
    spool.shutdown();
    // Simulate a crash in the middle of writing the next record: half of a
    // copy of the last record lands after the end.
    let (records, scans) = reader::read_all(&dir).unwrap();
    let last = records.last().unwrap();
    let (info, scan) = &scans[0];
    let bytes = std::fs::read(&info.path).unwrap();
    let rec = &bytes[last.offset as usize..(last.offset + last.padded_len) as usize];
    let half = &rec[..rec.len() / 2];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&info.path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, half, scan.end).unwrap();
    drop(f);

    let (spool, report) = Spool::open(cfg.clone()).unwrap();
    assert_eq!(report.records, 5);
    assert_eq!(report.cut.len(), 1, "{report}");
    assert_eq!(report.cut[0].offset, scan.end);
    assert!(report.cut[0].bytes >= half.len() as u64);
    let saved = report.cut[0].saved_to.clone().unwrap();
    assert_eq!(&std::fs::read(saved).unwrap()[..half.len()], half);
    assert!(!report.cut[0].below_committed, "a torn write: {report}");
    assert!(
        !report.cut[0].sealed,
        "in the stream's last segment: {report}"
    );
    assert!(!report.damage(), "{report}");
    let mut p = spool.producer(None);
    let CommitOutcome::Committed(id6) = p.commit(message(7, 0, 5, 3000)) else {
        panic!()
    };
    spool.shutdown();
    let (records, scans) = reader::read_all(&dir).unwrap();
    assert!(scans.iter().all(|(_, s)| s.invalid.is_none()));
    let got: Vec<QueueId> = records.iter().map(|r| r.header.queue_id).collect();
    ids.push(id6);
    assert_eq!(got, ids);
    assert_eq!(records[5].offset, scan.end, "continues where the cut was");
}

#[test]
fn large_message_gets_a_segment_of_its_own() {
    let dir = spool_dir("large");
    let cfg = config(&dir);
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut p = spool.producer(None);
    let big = message(3, 0, 1, 1 << 20);
    let CommitOutcome::Committed(id) = p.commit(big.clone()) else {
        panic!()
    };
    let CommitOutcome::Committed(_) = p.commit(message(3, 0, 2, 10)) else {
        panic!()
    };
    spool.shutdown();
    let r = reader::find(&dir, id).unwrap().unwrap();
    assert_eq!(r.message(), big);
}

#[test]
fn lock_and_tmpfs_are_enforced() {
    let dir = spool_dir("lock");
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    match Spool::open(config(&dir)) {
        Err(e @ SpoolError::Locked { .. }) => {
            assert!(e.to_string().contains("one server per spool"))
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    drop(spool);
    Spool::open(config(&dir)).unwrap();

    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipping tmpfs check: /dev/shm is missing");
        return;
    }
    let mem = shm.join(format!("spool-test-{}", std::process::id()));
    match Spool::open(config(&mem)) {
        Err(e @ SpoolError::Tmpfs(_)) => assert!(e.to_string().contains("tmpfs")),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let mut cfg = config(&mem);
    cfg.allow_tmpfs = true;
    let (spool, _) = Spool::open(cfg).unwrap();
    drop(spool);
    std::fs::remove_dir_all(&mem).unwrap();
}

#[test]
fn rejections_return_the_message_and_shutdown_answers_everything() {
    let dir = spool_dir("reject");
    let mut cfg = config(&dir);
    cfg.producer_inflight_max = 3;
    let (spool, _) = Spool::open(cfg).unwrap();
    let p = spool.producer(None);
    for n in 0..3 {
        p.try_submit(n, message(4, 0, n as u32, 50), SystemTime::now())
            .unwrap();
    }
    let m = message(4, 0, 99, 50);
    let rej = p.try_submit(99, m.clone(), SystemTime::now()).unwrap_err();
    assert_eq!(rej.reason, RejectReason::InFlightFull);
    assert_eq!(rej.message, m);
    spool.shutdown();
    let mut out = Vec::new();
    p.drain(&mut out);
    assert_eq!(out.len(), 3, "every accepted submission is answered");
    assert!(
        out.iter()
            .all(|(_, o)| matches!(o, CommitOutcome::Committed(_)))
    );
    let rej = p.try_submit(5, m, SystemTime::now()).unwrap_err();
    assert_eq!(rej.reason, RejectReason::Closed);
}

#[test]
fn adaptive_delay_does_not_hold_back_a_lone_producer() {
    let dir = spool_dir("delay");
    let mut cfg = config(&dir);
    // 50 ms: a lone producer delayed even once per commit would take >= 1 s.
    cfg.batch_delay_us_max = 50_000;
    let (spool, _) = Spool::open(cfg).unwrap();
    let mut p = spool.producer(None);
    let t = std::time::Instant::now();
    for n in 0..20 {
        assert!(matches!(
            p.commit(message(5, 0, n, 100)),
            CommitOutcome::Committed(_)
        ));
    }
    let lone = t.elapsed();
    assert!(
        lone < Duration::from_millis(500),
        "lone producer was delayed: {lone:?} for 20 commits"
    );
    spool.shutdown();
}

#[test]
fn fewer_writers_after_a_restart_keep_every_stream_readable() {
    let dir = spool_dir("writers");
    let mut cfg = config(&dir);
    cfg.writers = 3;
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    // Three producers: homes on writers 0, 1 and 2.
    let mut ids = Vec::new();
    for t in 0..3 {
        let mut p = spool.producer(None);
        for n in 0..4 {
            let CommitOutcome::Committed(id) = p.commit(message(8, t, n, 100)) else {
                panic!()
            };
            ids.push(id);
        }
    }
    spool.shutdown();
    let writers: std::collections::BTreeSet<u16> = ids
        .iter()
        .map(|id| lmtp_ingest::spool::queue_id_parts(*id).1)
        .collect();
    assert_eq!(writers.len(), 3);
    cfg.writers = 1;
    let (spool, report) = Spool::open(cfg).unwrap();
    assert_eq!(report.records, 12);
    let mut p = spool.producer(None);
    let CommitOutcome::Committed(new) = p.commit(message(8, 9, 0, 100)) else {
        panic!()
    };
    spool.shutdown();
    for id in ids.iter().chain([&new]) {
        assert!(reader::find(&dir, *id).unwrap().is_some(), "{id}");
    }
}

#[test]
fn a_damaged_segment_header_is_reported_and_left_alone() {
    let dir = spool_dir("damaged");
    let cfg = config(&dir);
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut p = spool.producer(None);
    assert!(matches!(
        p.commit(message(9, 0, 0, 100)),
        CommitOutcome::Committed(_)
    ));
    spool.shutdown();
    let seg = reader::list_segments(&dir).unwrap().remove(0);
    let mut bytes = std::fs::read(&seg.path).unwrap();
    bytes[20] ^= 0xFF; // inside the header's index field
    std::fs::write(&seg.path, &bytes).unwrap();
    let (spool, report) = Spool::open(cfg).unwrap();
    assert_eq!(report.damaged_segments.len(), 1, "{report}");
    let mut p = spool.producer(None);
    let CommitOutcome::Committed(id) = p.commit(message(9, 0, 1, 100)) else {
        panic!()
    };
    spool.shutdown();
    let r = reader::find(&dir, id).unwrap().unwrap();
    assert!(r.segment.index > seg.id.index, "written to a new segment");
    assert_eq!(
        r.header.seq, 1,
        "the damaged segment's sequence is not reused"
    );
    assert_eq!(std::fs::read(&seg.path).unwrap(), bytes, "left as it was");
}

#[test]
fn a_cut_in_a_segment_its_writer_had_left_is_not_called_a_crash_tail() {
    let dir = spool_dir("sealed-cut");
    let mut cfg = config(&dir);
    cfg.segment_bytes = 64 << 10;
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut p = spool.producer(None);
    for n in 0..40 {
        let CommitOutcome::Committed(_) = p.commit(message(8, 0, n, 3000)) else {
            panic!()
        };
    }
    spool.shutdown();
    let (_, scans) = reader::read_all(&dir).unwrap();
    assert!(scans.len() >= 2, "the writer moved to a second segment");
    // What a failed batch leaves behind in the segment it then left.
    let (first, scan) = &scans[0];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&first.path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 700], scan.end).unwrap();
    drop(f);
    let (spool, report) = Spool::open(cfg).unwrap();
    spool.shutdown();
    assert_eq!(report.cut.len(), 1, "{report}");
    let c = &report.cut[0];
    assert!(c.sealed && !c.below_committed, "{report}");
    assert!(!report.damage(), "{report}");
    assert!(
        report
            .to_string()
            .contains("in a segment its writer had left"),
        "{report}"
    );
}
