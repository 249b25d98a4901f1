//! A simulated power cut at the block level. The spool runs on an ext4 image
//! mounted through a loop device; at random moments the test copies the
//! image file. The copy holds exactly what the loop device had been given
//! (data still in the spool file system's page cache is not in it), so each
//! copy is what the disk would hold if the power failed at that moment.
//! Each copy is then checked with e2fsck (journal replay), mounted, and
//! recovered: every message acknowledged before the copy began must be there,
//! byte-identical, and no torn record may remain.
//!
//! Unlike the kill -9 test, this catches a missing directory fsync or a
//! record left in the page cache: SIGKILL keeps the page cache, a power cut
//! does not. (Checked by hand on 2026-12-05: with the directory fsync after a
//! segment's rename removed, it failed in each of four runs.) It cannot see a
//! missing fdatasync of the records themselves: they go to the loop device
//! with `O_DIRECT`, and a loop device has no volatile cache for a power cut
//! to lose; `spool_faults.rs` catches that one (three of its tests fail
//! without the batch fdatasync). (The copy is not instantaneous, so it also
//! captures some writes made while it ran, like a disk that wrote some
//! unsynced blocks before the power went; see `IMAGE_BYTES` for its limits.)
//! Needs root, mkfs.ext4, e2fsck and loop mounts; otherwise it says why and
//! passes without checking.

mod spool_util;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lmtp_ingest::envelope::{CommitOutcome, QueueId};
use lmtp_ingest::spool::{FillPolicy, Spool, reader};
use spool_util::{config, message};

/// Unmounts what it names, then removes the test's directory (images
/// included) when dropped, also when the test fails.
struct Cleanup {
    mounts: Vec<PathBuf>,
    base: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn run(cmd: &mut Command) -> Result<std::process::ExitStatus, String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(o.status)
    } else {
        Err(format!(
            "{cmd:?}: {} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// What a mounted copy holds, for a failure message: the spool directory's
/// entries and what e2fsck moved to lost+found.
fn listing(m: &std::path::Path) -> String {
    let names = |d: PathBuf| match std::fs::read_dir(&d) {
        Ok(rd) => {
            let mut v: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            format!("{} entries: {}", v.len(), v.join(" "))
        }
        Err(e) => format!("unreadable ({e})"),
    };
    format!(
        "spool/: {}\nlost+found/: {}",
        names(m.join("spool")),
        names(m.join("lost+found"))
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The copies are not atomic: a copy reads the image front to back while
/// the file system goes on writing. That is like a disk that wrote some
/// unsynced blocks before the power went, except in one way a disk cannot
/// match: if ext4 checkpoints its journal during the copy (writes metadata in
/// place and then reuses or retires those journal blocks), the copy can hold
/// the old in-place block and not the journal entry that would replay it,
/// and e2fsck then clears directory entries whose inodes look unused. That
/// happened when the spool filled the file system (allocation retries force
/// journal commits) and with a larger image (a longer copy). So the image is
/// small (a quick copy), its journal large enough not to be checkpointed
/// during the test, and the spool capped below the file system's size: a full
/// file system is spool_enospc.rs's subject.
const IMAGE_BYTES: u64 = 64 << 20;
const JOURNAL_MIB: u32 = 16;
const SPOOL_CAP_BYTES: u64 = 32 << 20;

/// (acknowledged at, id, producer, n)
type Ack = (Instant, QueueId, u32, u32);

fn body_len(t: u32, n: u32) -> usize {
    100 + (t as usize * 997 + n as usize * 331) % 12_000
}

#[test]
fn power_cut_copies_of_the_disk_keep_every_acknowledged_message() {
    power_cuts("ahead", true, FillPolicy::Zeros);
}

/// Segments only allocated (`spool.segment_fill = "allocate"`): each
/// record's write turns unwritten blocks into written ones, and the
/// fdatasync before its acknowledgement must carry that metadata to the
/// disk (ext4's journal here), or the copy reads zeros where it was.
#[test]
fn power_cut_copies_with_allocated_segments() {
    power_cuts("allocated", true, FillPolicy::Allocate);
}

/// The same through the page cache (`spool.direct_io = false`): the blocks
/// turn written at writeback, which the batch's fdatasync starts and waits
/// for; here a missing sync of the records would show too (their pages
/// never reach the loop device without it).
#[test]
fn power_cut_copies_with_allocated_segments_written_through_the_page_cache() {
    power_cuts_with("allocated-buffered", true, FillPolicy::Allocate, false);
}

/// One writer, segments made inside the batch that needs them: here a
/// missing directory fsync after a segment's rename is not hidden by another
/// file's fsync (on ext4 any fsync commits the journal, a pending rename
/// included), so this case catches it.
#[test]
fn power_cut_copies_with_one_writer_and_segments_made_on_demand() {
    power_cuts("on-demand", false, FillPolicy::Zeros);
}

fn power_cuts(name: &str, prepare_ahead: bool, fill: FillPolicy) {
    power_cuts_with(name, prepare_ahead, fill, true);
}

fn power_cuts_with(name: &str, prepare_ahead: bool, fill: FillPolicy, direct_io: bool) {
    if !is_root() {
        eprintln!("skipped: loop mounts need root");
        return;
    }
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("powercut-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let image = base.join("disk.img");
    let mnt = base.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut cleanup = Cleanup {
        mounts: Vec::new(),
        base: base.clone(),
    };
    std::fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE_BYTES)
        .unwrap();
    if let Err(e) = run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-J", &format!("size={JOURNAL_MIB}")])
        .arg(&image))
    {
        eprintln!("skipped: cannot make an ext4 image ({e})");
        return;
    }
    if let Err(e) = run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mnt))
    {
        eprintln!("skipped: cannot loop-mount an image here ({e})");
        return;
    }
    cleanup.mounts.push(mnt.clone());

    let dir = mnt.join("spool");
    let mut cfg = config(&dir);
    cfg.writers = if prepare_ahead { 2 } else { 1 };
    cfg.segment_prepare_ahead = prepare_ahead;
    cfg.segment_fill = fill;
    cfg.direct_io = direct_io;
    cfg.spool_bytes_max = Some(SPOOL_CAP_BYTES);
    let (spool, _) = Spool::open(cfg).unwrap();
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for t in 0..4u32 {
        let p = spool.producer(None);
        let acks = acks.clone();
        let stop = stop.clone();
        producers.push(std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                while p.in_flight() < 4 {
                    p.submit(
                        n as u64,
                        message(61, t, n, body_len(t, n)),
                        SystemTime::now(),
                    )
                    .unwrap();
                    n += 1;
                }
                if let Some((ticket, CommitOutcome::Committed(id))) =
                    p.wait_completion(Duration::from_secs(5))
                {
                    acks.lock()
                        .unwrap()
                        .push((Instant::now(), id, t, ticket as u32));
                }
            }
        }));
    }
    let mut snapshots = Vec::new();
    let mut rng = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64)
        | 1;
    for k in 0..6 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(20 + rng % 80));
        let snap = base.join(format!("cut-{k}.img"));
        let t0 = Instant::now();
        std::fs::copy(&image, &snap).unwrap();
        snapshots.push((snap, t0));
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.join().unwrap();
    }
    spool.shutdown();
    let acks = acks.lock().unwrap().clone();

    let mut checked = 0;
    for (k, (snap, t0)) in snapshots.iter().enumerate() {
        let must: Vec<_> = acks.iter().filter(|a| a.0 < *t0).collect();
        // e2fsck: 0 clean, 1 errors corrected (journal replayed), 2 corrected,
        // reboot advised. Anything else means the file system copy itself is
        // broken, which says nothing about the spool: reported, not counted.
        let st = match Command::new("e2fsck").args(["-fy"]).arg(snap).output() {
            Ok(st) => st,
            Err(e) => {
                eprintln!("skipped: cannot run e2fsck ({e})");
                return;
            }
        };
        if !matches!(st.status.code(), Some(0..=2)) {
            eprintln!(
                "power cut {k}: e2fsck could not repair the copy ({}), not counted",
                st.status
            );
            continue;
        }
        let m = base.join(format!("mnt-{k}"));
        std::fs::create_dir_all(&m).unwrap();
        run(Command::new("mount").args(["-o", "loop"]).arg(snap).arg(&m)).unwrap();
        cleanup.mounts.push(m.clone());
        let sdir = m.join("spool");
        let (spool, report) = Spool::open(config(&sdir)).unwrap();
        drop(spool);
        // A real power cut leaves torn writes only, but this copy is not
        // instantaneous (see the top), so a block written while it ran can
        // show damage no power cut makes (a segment renamed before its
        // header was copied): reported, not asserted.
        if report.damage() {
            eprintln!("power cut {k}: the copy shows damage: {report}");
        }
        let (records, scans) = reader::read_all(&sdir).unwrap();
        for (info, scan) in &scans {
            assert!(
                scan.invalid.is_none(),
                "power cut {k}: torn record left in {}",
                info.id
            );
        }
        let by_id: std::collections::HashMap<QueueId, &reader::StoredRecord> =
            records.iter().map(|r| (r.header.queue_id, r)).collect();
        for (_, id, t, n) in &must {
            let r = by_id.get(id).unwrap_or_else(|| {
                panic!(
                    "power cut {k}: {id}, acknowledged before the cut, is missing; {report}\n\
                     e2fsck said: {}\n{}",
                    String::from_utf8_lossy(&st.stdout).trim(),
                    listing(&m)
                )
            });
            assert_eq!(r.message(), message(61, *t, *n, body_len(*t, *n)), "{id}");
        }
        eprintln!(
            "power cut {k}: {} acknowledged before it, {} recovered; {report}",
            must.len(),
            records.len()
        );
        let _ = Command::new("umount").arg(&m).status();
        cleanup.mounts.pop();
        checked += 1;
    }
    assert!(checked > 0, "no copy of the disk could be checked");
    assert!(
        acks.len() > 100,
        "too few acknowledgements to mean anything"
    );
    drop(cleanup);
}
