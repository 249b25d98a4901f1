//! One server per spool, and no spool on memory: the exclusive lock on
//! `DIR/lock` and the file-system type check.
//!
//! The lock is an `flock(LOCK_EX | LOCK_NB)` held for the life of the
//! [`SpoolLock`] value; the kernel drops it when the process dies, so a crash
//! never leaves a stale lock. The holder's pid is written into the file for
//! the error message of the next one who tries.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::SpoolError;

/// `statfs` magic numbers of file systems that live in memory (linux/magic.h).
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Holds the spool's exclusive lock until dropped.
#[derive(Debug)]
pub struct SpoolLock {
    _file: File,
}

/// Why [`pid_lock`] did not take its lock.
#[derive(Debug)]
pub(crate) enum PidLockError {
    /// Opening (or creating) the lock file failed.
    Open(io::Error),
    /// Another process holds it; what it wrote there (its pid), trimmed,
    /// empty when it has locked but not yet written.
    Busy { holder: String },
    /// `flock` itself failed.
    Flock(io::Error),
    /// Writing our pid failed.
    Write(io::Error),
}

/// Takes an exclusive `flock` on `path` (created if missing) without
/// waiting, and writes `pid N` into it for the next one who tries. Held
/// until the returned file is closed; the kernel drops it when the process
/// dies. std opens files close-on-exec, so child processes do not inherit
/// it. The spool's lock and each consumer's lock (`follow.rs`) are this.
pub(crate) fn pid_lock(path: &Path) -> Result<File, PidLockError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(PidLockError::Open)?;
    // SAFETY: flock takes a file descriptor we own (borrowed from `file`, which
    // outlives the call) and an integer; it touches no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            return Err(PidLockError::Busy {
                holder: holder.trim().to_string(),
            });
        }
        return Err(PidLockError::Flock(err));
    }
    file.set_len(0)
        .and_then(|_| writeln!(file, "pid {}", std::process::id()))
        .map_err(PidLockError::Write)?;
    Ok(file)
}

/// Takes the exclusive lock on `dir/lock` without waiting.
pub fn lock_spool(dir: &Path) -> Result<SpoolLock, SpoolError> {
    let path = dir.join("lock");
    let file = pid_lock(&path).map_err(|e| match e {
        PidLockError::Open(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            SpoolError::Permission {
                path: path.clone(),
                dir: dir.to_path_buf(),
                // SAFETY: geteuid has no preconditions and touches no memory.
                uid: unsafe { libc::geteuid() },
                // The lock file's owner when it exists (a spool first run by
                // another user), else the directory's.
                owner: std::fs::metadata(&path)
                    .or_else(|_| std::fs::metadata(dir))
                    .map(|m| std::os::unix::fs::MetadataExt::uid(&m).to_string())
                    .unwrap_or_else(|_| "unknown".into()),
            }
        }
        PidLockError::Open(e) => SpoolError::io(format!("open {}", path.display()), e),
        PidLockError::Busy { holder } => SpoolError::Locked {
            dir: dir.to_path_buf(),
            holder,
        },
        PidLockError::Flock(e) => SpoolError::io(format!("flock {}", path.display()), e),
        PidLockError::Write(e) => SpoolError::io(format!("write {}", path.display()), e),
    })?;
    Ok(SpoolLock { _file: file })
}

fn statfs(dir: &Path) -> io::Result<libc::statfs> {
    let mut c = dir.as_os_str().as_bytes().to_vec();
    c.push(0);
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that lives across the call, and
    // `st` is a valid, writable statfs the kernel fills in.
    let rc = unsafe { libc::statfs(c.as_ptr().cast(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// True when `dir` is on tmpfs or ramfs (contents lost at power off).
pub fn is_memory_fs(dir: &Path) -> io::Result<bool> {
    let st = statfs(dir)?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let t = st.f_type as i64;
    Ok(t == TMPFS_MAGIC || t == RAMFS_MAGIC)
}

/// Bytes an unprivileged writer can still allocate on `dir`'s file system.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = statfs(dir)?;
    #[allow(clippy::unnecessary_cast)] // field widths differ between targets
    Ok(st.f_bavail as u64 * st.f_bsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let l = lock_spool(dir.path()).unwrap();
        match lock_spool(dir.path()) {
            Err(SpoolError::Locked { holder, .. }) => {
                assert!(holder.contains(&std::process::id().to_string()))
            }
            other => panic!("{other:?}"),
        }
        drop(l);
        lock_spool(dir.path()).unwrap();
    }

    #[test]
    fn dev_shm_is_memory_when_present() {
        if Path::new("/dev/shm").exists() {
            assert!(is_memory_fs(Path::new("/dev/shm")).unwrap());
        }
    }
}
