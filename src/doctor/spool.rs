//! The spool directory as the server would find it: exists or can be made,
//! writable, on which file system and mount options, on which block device,
//! and how much room it has against the configured segments and cap.
//!
//! A spool on tmpfs/ramfs fails (a `250` there would be a lie: power off
//! loses it) unless `spool.allow_tmpfs` is set, and then it is still a
//! warning. A mount with cache flushes switched off (`nobarrier`,
//! `barrier=0`) fails for the same reason.
//!
//! Must not: create the spool, take its lock, or read its records.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

use super::Check;

/// What [`inspect`] found, for the report and for the advice.
#[derive(Clone, Debug, Default)]
pub struct SpoolFound {
    pub checks: Vec<Check>,
    /// Where the fsync measurement may write (the spool, or its nearest
    /// existing parent when the spool does not exist yet); `None` when
    /// nothing there is writable.
    pub measure_dir: Option<PathBuf>,
    /// File system type, e.g. `ext4`.
    pub fs_type: String,
    /// `Some(true)` for a spinning disk (from `/sys/dev/block/.../queue/rotational`).
    pub rotational: Option<bool>,
    /// Hardware queues of a blk-mq device (NVMe: one per CPU or more).
    pub hw_queues: Option<usize>,
    /// Bytes free to an unprivileged writer.
    pub free_bytes: Option<u64>,
}

/// `statfs` magic numbers (linux/magic.h) and their names.
const FS_NAMES: &[(i64, &str)] = &[
    (0xEF53, "ext2/3/4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0x8584_58f6, "ramfs"),
    (0x794c_7630, "overlayfs"),
    (0x6969, "nfs"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x6573_5546, "fuse"),
    (0x2FC1_2FC1, "zfs"),
    (0xF2F5_2010, "f2fs"),
    (0x0102_1997, "9p"),
];

fn statfs(dir: &Path) -> std::io::Result<libc::statfs> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path alive across the call; `st` is a
    // writable statfs the kernel fills in.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

fn writable(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path alive across the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// One line of /proc/self/mountinfo that matters here.
#[derive(Clone, Debug, PartialEq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub dev: String,
    pub fs_type: String,
    pub source: String,
    /// Per-mount and per-superblock options, joined.
    pub options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount that holds `path` (already canonical): the longest mount point
/// that is a prefix of it; the last such line wins (mounts stack).
pub fn find_mount(mountinfo: &str, path: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if f.len() < 6 || r.len() < 3 {
            continue;
        }
        let mount_point = PathBuf::from(unescape(f[4]));
        if !path.starts_with(&mount_point) {
            continue;
        }
        let longer = best
            .as_ref()
            .is_none_or(|b| mount_point.as_os_str().len() >= b.mount_point.as_os_str().len());
        if longer {
            best = Some(Mount {
                mount_point,
                dev: f[2].to_string(),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
                options: format!("{},{}", f[5], r[2]),
            });
        }
    }
    best
}

/// `rotational` and the count of blk-mq hardware queues of the device
/// `major:minor`, looking at the partition's parent when needed.
fn block_device(dev: &str) -> (Option<bool>, Option<usize>) {
    let base = PathBuf::from(format!("/sys/dev/block/{dev}"));
    for d in [base.clone(), base.join("..")] {
        if let Ok(r) = std::fs::read_to_string(d.join("queue/rotational")) {
            let queues = std::fs::read_dir(d.join("mq")).ok().map(|it| it.count());
            return (Some(r.trim() == "1"), queues);
        }
    }
    (None, None)
}

/// Sum of the sizes of the regular files directly in `dir` (segments live
/// there); bounded to the first 100,000 entries.
fn used_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.take(100_000)
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn gib(v: u64) -> String {
    format!("{:.1} GiB", v as f64 / (1u64 << 30) as f64)
}

/// Looks at the configured spool directory.
pub fn inspect(config: &Config) -> SpoolFound {
    let s = &config.spool;
    let dir = if s.dir.is_absolute() {
        s.dir.clone()
    } else {
        std::env::current_dir().unwrap_or_default().join(&s.dir)
    };
    let mut found = SpoolFound::default();

    // 1. The directory itself.
    let install = format!(
        "install -d -o lmtp-ingest -g lmtp-ingest -m 0750 {}",
        dir.display()
    );
    let target = if dir.is_dir() {
        if writable(&dir) {
            found.checks.push(Check::ok(
                "spool_dir",
                format!("{} exists and is writable", dir.display()),
            ));
            Some(dir.clone())
        } else {
            found.checks.push(Check::fail(
                "spool_dir",
                format!("{} exists but this user cannot write to it", dir.display()),
                format!(
                    "chown -R lmtp-ingest: {} (the server's user), and run doctor as that user",
                    dir.display()
                ),
            ));
            None
        }
    } else if dir.exists() {
        found.checks.push(Check::fail(
            "spool_dir",
            format!("{} exists and is not a directory", dir.display()),
            format!("point dir under [spool] at a directory, or move the file away and {install}"),
        ));
        None
    } else {
        let parent = dir.ancestors().skip(1).find(|p| p.is_dir());
        match parent {
            Some(p) if writable(p) => {
                found.checks.push(Check::ok(
                    "spool_dir",
                    format!(
                        "{} does not exist yet; serve creates it ({} is writable; measured there)",
                        dir.display(),
                        p.display()
                    ),
                ));
                Some(p.to_path_buf())
            }
            Some(p) => {
                found.checks.push(Check::fail(
                    "spool_dir",
                    format!(
                        "{} does not exist and {} is not writable, so serve cannot create it",
                        dir.display(),
                        p.display()
                    ),
                    install,
                ));
                None
            }
            None => {
                found.checks.push(Check::fail(
                    "spool_dir",
                    format!("{}: no existing parent directory", dir.display()),
                    install,
                ));
                None
            }
        }
    };
    // Where to look at the file system even when nothing is writable.
    let look = target
        .clone()
        .or_else(|| dir.ancestors().find(|p| p.is_dir()).map(Path::to_path_buf));
    let Some(look) = look else {
        return found;
    };

    // 2. The file system and its mount.
    let st = match statfs(&look) {
        Ok(st) => st,
        Err(e) => {
            found.checks.push(Check::fail(
                "spool_fs",
                format!("statfs {}: {e}", look.display()),
                "check the path and its permissions",
            ));
            return found;
        }
    };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as i64;
    let canonical = look.canonicalize().unwrap_or_else(|_| look.clone());
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| find_mount(&m, &canonical));
    let fs_type = mount
        .as_ref()
        .map(|m| m.fs_type.clone())
        .or_else(|| {
            FS_NAMES
                .iter()
                .find(|(m, _)| *m == magic)
                .map(|(_, n)| (*n).to_string())
        })
        .unwrap_or_else(|| format!("unknown (magic {magic:#x})"));
    found.fs_type = fs_type.clone();
    let where_ = match &mount {
        Some(m) => format!(
            "{fs_type} on {} ({}, mounted at {}, options {})",
            m.source,
            m.dev,
            m.mount_point.display(),
            m.options
        ),
        None => fs_type.clone(),
    };
    if let Some(m) = &mount {
        let (rot, queues) = block_device(&m.dev);
        found.rotational = rot;
        found.hw_queues = queues;
    }
    let opts: Vec<&str> = mount
        .as_ref()
        .map(|m| m.options.split(',').collect())
        .unwrap_or_default();
    let memory = magic == 0x0102_1994 || magic == 0x8584_58f6;
    let check = if memory && !s.allow_tmpfs {
        Check::fail(
            "spool_fs",
            format!(
                "{where_}: memory, lost at power off, so a 250 would not mean stored (the server refuses it)"
            ),
            "put dir under [spool] on a disk file system (ext4, xfs), e.g. /var/lib/lmtp-ingest/spool",
        )
    } else if memory {
        Check::warn(
            "spool_fs",
            format!("{where_}: memory, allowed by allow_tmpfs = true; NOT durable"),
            "allow_tmpfs = false and dir on a disk under [spool], except in tests",
        )
    } else if opts.iter().any(|o| *o == "nobarrier" || *o == "barrier=0") {
        Check::fail(
            "spool_fs",
            format!(
                "{where_}: cache flushes are switched off, so fdatasync returns before a disk with a volatile cache has the data"
            ),
            format!(
                "remount with barriers: mount -o remount,barrier {} (and drop nobarrier from /etc/fstab)",
                mount
                    .as_ref()
                    .map_or(String::new(), |m| m.mount_point.display().to_string())
            ),
        )
    } else if fs_type == "overlay" || magic == 0x794c_7630 {
        Check::warn(
            "spool_fs",
            format!("{where_}: a container's writable layer: slow, and gone with the container"),
            "mount a volume at the spool (docker run -v /var/lib/lmtp-ingest:/var/lib/lmtp-ingest)",
        )
    } else if ["nfs", "nfs4", "cifs", "smb3", "fuse", "9p"]
        .iter()
        .any(|t| fs_type.starts_with(t))
    {
        Check::warn(
            "spool_fs",
            format!(
                "{where_}: a network or FUSE file system; its fdatasync may not reach stable storage and its latency varies"
            ),
            "put the spool on a local disk",
        )
    } else {
        Check::ok("spool_fs", where_)
    };
    found.checks.push(check);

    // 3. Room: segments for every writer (the active one and the one
    // prepared ahead), against the cap and the disk.
    #[allow(clippy::unnecessary_cast)] // field widths differ between targets
    let free = st.f_bavail as u64 * st.f_bsize as u64;
    found.free_bytes = Some(free);
    let need = s.segment_bytes * s.writers as u64 * 2;
    let used = if dir.is_dir() { used_bytes(&dir) } else { 0 };
    let cap = s.spool_bytes_max;
    let value = format!(
        "{} free, spool uses {}; {} writer(s) x 2 segments of {} MiB need {}; cap {}",
        gib(free),
        gib(used),
        s.writers,
        s.segment_bytes >> 20,
        gib(need),
        if cap == 0 {
            "none (the disk is the limit)".to_string()
        } else {
            gib(cap)
        }
    );
    let space = if free < need {
        Check::fail(
            "spool_space",
            format!("{value}: no room for new segments, so mail gets 452 4.3.1"),
            format!(
                "free space on {} (consume and prune the spool: `lmtp-ingest spool` commands), or segment_bytes = {} under [spool]",
                look.display(),
                (free / 2 / s.writers.max(1) as u64).max(4096)
            ),
        )
    } else if cap > 0 && cap < need {
        Check::fail(
            "spool_space",
            format!(
                "{value}: the cap is below what the writers' segments take, so mail gets 452 4.3.1"
            ),
            format!("spool_bytes_max = {need} or more under [spool]"),
        )
    } else if cap > 0 && cap > free + used {
        Check::warn(
            "spool_space",
            format!("{value}: the disk fills before the cap is reached"),
            format!(
                "spool_bytes_max = {} under [spool] (90% of free + used), or free space",
                (free + used) / 10 * 9
            ),
        )
    } else if cap == 0 && free < need * 8 {
        Check::warn(
            "spool_space",
            format!("{value}: less than 8 segments' worth left"),
            format!("free space on {}", look.display()),
        )
    } else {
        Check::ok("spool_space", value)
    };
    found.checks.push(space);
    found.measure_dir = target;
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684084k
40 27 8:17 / /var/lib/my\\040spool rw,noatime - xfs /dev/sdb1 rw,nobarrier
";

    #[test]
    fn the_longest_mount_point_wins() {
        let m = find_mount(MOUNTINFO, Path::new("/dev/shm/x")).unwrap();
        assert_eq!(m.fs_type, "tmpfs");
        let m = find_mount(MOUNTINFO, Path::new("/work/spool")).unwrap();
        assert_eq!((m.fs_type.as_str(), m.dev.as_str()), ("ext4", "254:0"));
        let m = find_mount(MOUNTINFO, Path::new("/var/lib/my spool/a")).unwrap();
        assert_eq!(m.source, "/dev/sdb1");
        assert!(m.options.contains("nobarrier"));
        // A path that only shares a prefix of characters is not inside.
        let m = find_mount(MOUNTINFO, Path::new("/dev/shmx")).unwrap();
        assert_eq!(m.fs_type, "ext4");
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape("plain\\"), "plain\\");
    }
}
