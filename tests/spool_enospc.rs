//! A real full disk: a small ext4 image mounted on a loop device, and a
//! size-limited tmpfs (allowed explicitly). The spool answers `StorageFull`,
//! keeps refusing until space returns, then commits again, and recovery finds
//! every committed message intact. Needs root and `mount`; without them each
//! test says why and passes without checking.

mod spool_util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lmtp_ingest::envelope::CommitOutcome;
use lmtp_ingest::spool::{Spool, reader};
use spool_util::{config, message};

/// Unmounts (and removes the image) when dropped, also when a test fails.
struct Mount {
    point: PathBuf,
    image: Option<PathBuf>,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.point).status();
        let _ = std::fs::remove_dir_all(&self.point);
        if let Some(i) = &self.image {
            let _ = std::fs::remove_file(i);
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

fn base(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()))
}

fn mount_ext4_image() -> Result<Mount, String> {
    let point = base("enospc-ext4");
    let image = point.with_extension("img");
    std::fs::create_dir_all(&point).map_err(|e| e.to_string())?;
    let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
    f.set_len(8 << 20).map_err(|e| e.to_string())?;
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
    let m = Mount {
        point: point.clone(),
        image: Some(image.clone()),
    };
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&point))?;
    Ok(m)
}

fn mount_tmpfs() -> Result<Mount, String> {
    let point = base("enospc-tmpfs");
    std::fs::create_dir_all(&point).map_err(|e| e.to_string())?;
    let m = Mount {
        point: point.clone(),
        image: None,
    };
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&point))?;
    Ok(m)
}

fn fill_until_full_then_recover(root: &Path, allow_tmpfs: bool) {
    // A filler file whose removal gives the space back later.
    let filler = root.join("filler");
    std::fs::write(&filler, vec![1u8; 1 << 20]).unwrap();
    let dir = root.join("spool");
    let mut cfg = config(&dir);
    cfg.allow_tmpfs = allow_tmpfs;
    let (spool, _) = Spool::open(cfg.clone()).unwrap();
    let mut p = spool.producer(None);
    let mut committed = Vec::new();
    let mut n = 0;
    let full = loop {
        assert!(n < 10_000, "the small file system never filled up");
        let m = message(21, 0, n, 16 << 10);
        match p.commit(m.clone()) {
            CommitOutcome::Committed(id) => committed.push((id, m)),
            CommitOutcome::StorageFull => break n,
            CommitOutcome::Failed => panic!("a full disk must say StorageFull, not Failed"),
        }
        n += 1;
    };
    assert!(!committed.is_empty());
    assert!(spool.is_storage_full());
    assert_eq!(
        p.commit(message(21, 0, full + 1, 16 << 10)),
        CommitOutcome::StorageFull
    );
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            !name.ends_with(".prep"),
            "half-made segment {name} left behind"
        );
    }
    // Space returns: the maintenance check clears the flag, and mail flows.
    std::fs::remove_file(&filler).unwrap();
    std::fs::File::open(root).unwrap().sync_all().unwrap();
    let t = std::time::Instant::now();
    while spool.is_storage_full() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "never noticed the space"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = message(21, 1, 0, 16 << 10);
    let CommitOutcome::Committed(id) = p.commit(m.clone()) else {
        panic!("space came back but commits still fail")
    };
    committed.push((id, m));
    spool.shutdown();

    let (spool, report) = Spool::open(cfg).unwrap();
    drop(spool);
    assert!(report.cut.is_empty(), "{report}");
    assert_eq!(report.records, committed.len() as u64, "{report}");
    let (records, scans) = reader::read_all(&dir).unwrap();
    assert!(scans.iter().all(|(_, s)| s.invalid.is_none()));
    for ((id, m), r) in committed.iter().zip(&records) {
        assert_eq!(r.header.queue_id, *id);
        assert_eq!(&r.message(), m);
    }
}

#[test]
fn enospc_on_a_loop_mounted_ext4_image() {
    if !is_root() {
        eprintln!("skipped: mounting a loop device needs root");
        return;
    }
    let mount = match mount_ext4_image() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: cannot make a small ext4 file system here ({e})");
            return;
        }
    };
    fill_until_full_then_recover(&mount.point, false);
}

#[test]
fn enospc_on_a_size_limited_tmpfs() {
    if !is_root() {
        eprintln!("skipped: mounting tmpfs needs root");
        return;
    }
    let mount = match mount_tmpfs() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: cannot mount a small tmpfs here ({e})");
            return;
        }
    };
    fill_until_full_then_recover(&mount.point, true);
}
