//! The storage seam: every file operation the spool's write path makes goes
//! through [`Storage`] and [`StorageFile`], so tests can inject write errors,
//! sync errors and ENOSPC exactly where they would happen on a real disk.
//!
//! [`RealStorage`] is the production implementation (plain `pwrite`,
//! `fdatasync`, `rename`, directory `fsync`). [`FaultyStorage`] wraps it for
//! tests: it fails chosen operations with a chosen errno and keeps a model of
//! which bytes a successful sync has made durable, so a test can check that no
//! record was reported committed before its bytes were synced.
//!
//! Readers (recovery scan, CLI, follow) read with plain `std::fs`: a read
//! cannot break durability, so it needs no seam.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// File-system operations the writer and recovery use.
pub trait Storage: Send + Sync + 'static {
    /// Creates a new file (fails if it exists) open for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Renames `from` to `to` (same directory).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// `fsync` of a directory, making created, renamed and removed entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open file.
pub trait StorageFile: Send {
    /// Writes all of `buf` at `offset` (loops over short writes).
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: the data written so far, and the metadata needed to read it
    /// back, are on stable storage when this returns `Ok`.
    fn sync_data(&mut self) -> io::Result<()>;
    /// `fsync`: data and all metadata (used once, after a segment is sized).
    fn sync_all(&mut self) -> io::Result<()>;
}

/// The production storage: the operating system's calls, nothing added.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

struct RealFile(File);

impl StorageFile for RealFile {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl Storage for RealStorage {
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Which operation a [`FaultyStorage`] fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// `write_all_at` on any file (segment data and segment pre-zeroing).
    Write,
    /// `sync_data` / `sync_all` on any file.
    Sync,
    /// Creating a file.
    Create,
}

#[derive(Default)]
struct FaultState {
    /// errno for each op (0: no fault), and how many more calls fail
    /// (`u64::MAX`: until cleared).
    errno: [AtomicI32; 3],
    remaining: [AtomicU64; 3],
    /// Per path: byte ranges written since the last sync, and ranges a
    /// successful sync covered.
    model: Mutex<HashMap<PathBuf, FileModel>>,
}

#[derive(Default, Clone)]
struct FileModel {
    pending: Vec<(u64, u64)>,
    durable: Vec<(u64, u64)>,
}

/// A [`Storage`] for tests: real files, with injected errors and a model of
/// which bytes are durable (written, then covered by a successful sync).
#[derive(Clone, Default)]
pub struct FaultyStorage {
    state: Arc<FaultState>,
}

fn op_index(op: FaultOp) -> usize {
    match op {
        FaultOp::Write => 0,
        FaultOp::Sync => 1,
        FaultOp::Create => 2,
    }
}

impl FaultyStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `count` calls of `op` fail with `errno`
    /// (`u64::MAX`: every call until [`FaultyStorage::clear`]).
    pub fn fail(&self, op: FaultOp, errno: i32, count: u64) {
        let i = op_index(op);
        self.state.errno[i].store(errno, Ordering::SeqCst);
        self.state.remaining[i].store(count, Ordering::SeqCst);
    }

    /// Ends every injected fault.
    pub fn clear(&self) {
        for i in 0..3 {
            self.state.remaining[i].store(0, Ordering::SeqCst);
        }
    }

    fn check(&self, op: FaultOp) -> io::Result<()> {
        let i = op_index(op);
        let r = &self.state.remaining[i];
        let mut cur = r.load(Ordering::SeqCst);
        loop {
            if cur == 0 {
                return Ok(());
            }
            let next = if cur == u64::MAX { cur } else { cur - 1 };
            match r.compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    let errno = self.state.errno[i].load(Ordering::SeqCst);
                    return Err(io::Error::from_raw_os_error(errno));
                }
                Err(v) => cur = v,
            }
        }
    }

    /// True when every byte of `[offset, offset + len)` of `path` was written
    /// and then covered by a successful sync of that file.
    pub fn is_durable(&self, path: &Path, offset: u64, len: u64) -> bool {
        let model = self.state.model.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = model.get(path) else {
            return false;
        };
        let mut ranges = m.durable.clone();
        ranges.sort_unstable();
        let (mut at, end) = (offset, offset + len);
        for (a, b) in ranges {
            if a <= at && b > at {
                at = b;
            }
            if at >= end {
                return true;
            }
        }
        at >= end
    }
}

struct FaultyFile {
    inner: RealFile,
    path: PathBuf,
    storage: FaultyStorage,
}

impl StorageFile for FaultyFile {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.storage.check(FaultOp::Write)?;
        self.inner.write_all_at(buf, offset)?;
        self.with_model(|m| m.pending.push((offset, offset + buf.len() as u64)));
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.failed_sync_loses_pending(FaultOp::Sync)?;
        self.inner.sync_data()?;
        self.mark_durable();
        Ok(())
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.failed_sync_loses_pending(FaultOp::Sync)?;
        self.inner.sync_all()?;
        self.mark_durable();
        Ok(())
    }
}

impl FaultyFile {
    /// As Linux does after a failed fsync (the dirty pages are marked clean),
    /// the model forgets the pending writes: a later successful sync of the
    /// same file does not make them durable.
    fn failed_sync_loses_pending(&mut self, op: FaultOp) -> io::Result<()> {
        let r = self.storage.check(op);
        if r.is_err() {
            self.with_model(|m| m.pending.clear());
        }
        r
    }

    fn mark_durable(&mut self) {
        self.with_model(|m| {
            let pending = std::mem::take(&mut m.pending);
            m.durable.extend(pending);
        });
    }

    /// This file's entry in the durability model, under the model's lock.
    fn with_model<R>(&self, f: impl FnOnce(&mut FileModel) -> R) -> R {
        let mut model = self
            .storage
            .state
            .model
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f(model.entry(self.path.clone()).or_default())
    }
}

impl Storage for FaultyStorage {
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        self.check(FaultOp::Create)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(FaultyFile {
            inner: RealFile(f),
            path: path.to_path_buf(),
            storage: self.clone(),
        }))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(FaultyFile {
            inner: RealFile(f),
            path: path.to_path_buf(),
            storage: self.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        let mut model = self.state.model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = model.remove(from) {
            model.insert(to.to_path_buf(), m);
        }
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)?;
        let mut model = self.state.model.lock().unwrap_or_else(|e| e.into_inner());
        model.remove(path);
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.check(FaultOp::Sync)?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faulty_storage_models_durability_and_injects_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = FaultyStorage::new();
        let p = dir.path().join("f");
        let mut f = s.create(&p).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        assert!(!s.is_durable(&p, 0, 5));
        f.sync_data().unwrap();
        assert!(s.is_durable(&p, 0, 5));
        f.write_all_at(b"world", 5).unwrap();
        s.fail(FaultOp::Sync, libc::EIO, 1);
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(!s.is_durable(&p, 0, 10));
        f.sync_data().unwrap();
        assert!(
            !s.is_durable(&p, 5, 5),
            "a failed sync loses its pending writes"
        );
        f.write_all_at(b"world", 5).unwrap();
        f.sync_data().unwrap();
        assert!(s.is_durable(&p, 0, 10));
        s.fail(FaultOp::Write, libc::ENOSPC, u64::MAX);
        assert!(f.write_all_at(b"x", 10).is_err());
        assert!(f.write_all_at(b"x", 10).is_err());
        s.clear();
        f.write_all_at(b"x", 10).unwrap();
    }
}
