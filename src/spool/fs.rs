//! The storage seam: every file operation the spool's write path makes goes
//! through [`Storage`] and [`StorageFile`], so tests can inject write errors,
//! sync errors and ENOSPC exactly where they would happen on a real disk.
//!
//! [`RealStorage`] is the production implementation (plain `pwrite`, direct
//! `pwrite` through a second `O_DIRECT` descriptor, `fdatasync`, `rename`,
//! directory `fsync`). [`FaultyStorage`] wraps it for
//! tests: it fails chosen operations with a chosen errno and keeps a model of
//! which bytes a successful sync has made durable, so a test can check that no
//! record was reported committed before its bytes were synced.
//!
//! Readers (recovery scan, CLI, follow) read with plain `std::fs`: a read
//! cannot break durability, so it needs no seam.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
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

/// Alignment of direct writes: buffer address, file offset and length are
/// multiples of this. 4096 suits every block device in use (512-byte and
/// 4 KiB logical blocks) and is what page-cache writeback writes anyway.
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer whose start is aligned to [`DIRECT_ALIGN`], as direct writes
/// need: the aligned part of a `Vec` one block longer than asked for (no
/// allocator of its own, no unsafe code).
#[derive(Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
}

impl AlignedBuf {
    pub(crate) fn new() -> AlignedBuf {
        AlignedBuf::default()
    }

    /// Bytes available without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.raw.len().saturating_sub(DIRECT_ALIGN)
    }

    fn start(&self) -> usize {
        if self.raw.is_empty() {
            return 0; // nothing allocated: an empty slice at 0
        }
        // For a byte pointer and a power-of-two alignment this is exact.
        self.raw.as_ptr().align_offset(DIRECT_ALIGN)
    }

    /// The first `len` bytes (contents left from earlier use), grown in
    /// whole blocks to fit.
    pub(crate) fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.capacity() {
            self.grow(len, 0);
        }
        let at = self.start();
        &mut self.raw[at..at + len]
    }

    /// Grows to at least `capacity` bytes (whole blocks; a new zeroed
    /// allocation), moving the first `keep` bytes to its aligned start.
    pub(crate) fn grow(&mut self, capacity: usize, keep: usize) {
        let mut raw = vec![0u8; capacity.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN + DIRECT_ALIGN];
        let to = raw.as_ptr().align_offset(DIRECT_ALIGN);
        raw[to..to + keep].copy_from_slice(self.as_slice(keep));
        self.raw = raw;
    }

    pub(crate) fn as_slice(&self, len: usize) -> &[u8] {
        let at = self.start();
        &self.raw[at..at + len]
    }
}

/// One open file.
pub trait StorageFile: Send {
    /// Writes all of `buf` at `offset` (loops over short writes).
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` past the page cache (`O_DIRECT`). The
    /// address of `buf`, its length and `offset` must be multiples of
    /// [`DIRECT_ALIGN`]. Durable, like `write_all_at`, only after
    /// `sync_data`. `ErrorKind::Unsupported` when this file cannot take
    /// direct writes (the file system refused `O_DIRECT`): write through the
    /// page cache instead.
    fn write_direct_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Allocates `[0, len)` without writing it (`fallocate`, mode 0): the
    /// file is then `len` bytes long and reads as zeros; on ext4 and XFS the
    /// blocks are *unwritten* extents, so a later write into them also
    /// changes metadata, which its `sync_data` then writes too. Durable after
    /// `sync_all`. `ErrorKind::Unsupported` where the file system has no
    /// `fallocate`: write zeros instead.
    fn allocate(&mut self, len: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: the data written so far, and the metadata needed to read it
    /// back, are on stable storage when this returns `Ok`.
    fn sync_data(&mut self) -> io::Result<()>;
    /// `fsync`: data and all metadata (used once, after a segment is sized).
    fn sync_all(&mut self) -> io::Result<()>;
}

/// The production storage: the operating system's calls, nothing added.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

/// A file with two descriptors: one through the page cache (zero-filling,
/// headers, reads) and, where the file system allows it, one opened with
/// `O_DIRECT` for records. Both are opened by path at once, so a later
/// rename (`.prep` to `.seg`) does not matter.
struct RealFile {
    file: File,
    direct: Option<File>,
}

impl RealFile {
    fn open(path: &Path, create: bool) -> io::Result<RealFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)?;
        // EINVAL (no O_DIRECT on this file system) or anything else: the
        // page cache will do.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(RealFile { file, direct })
    }
}

impl StorageFile for RealFile {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn write_direct_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some(d) = &self.direct else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the file system refused O_DIRECT",
            ));
        };
        debug_assert_eq!(buf.as_ptr() as usize % DIRECT_ALIGN, 0);
        debug_assert_eq!(buf.len() % DIRECT_ALIGN, 0);
        debug_assert_eq!(offset % DIRECT_ALIGN as u64, 0);
        match d.write_all_at(buf, offset) {
            // Opened, but this file system turns direct writes down.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct = None;
                Err(io::Error::new(io::ErrorKind::Unsupported, e))
            }
            r => r,
        }
    }
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length past off_t"))?;
        // SAFETY: fallocate on a descriptor this struct owns; no memory is
        // passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, e))
            }
            _ => Err(e),
        }
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
}

impl Storage for RealStorage {
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(RealFile::open(path, true)?))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(RealFile::open(path, false)?))
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
    /// `write_all_at` on any file (segment data and segment pre-zeroing),
    /// and `allocate`.
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
    /// Direct writes answer `Unsupported`, as on a file system without
    /// `O_DIRECT`.
    refuse_direct: AtomicBool,
    /// `allocate` answers `Unsupported`, as on a file system without
    /// `fallocate`.
    refuse_allocate: AtomicBool,
    /// Per file: byte ranges written since the last sync, and ranges a
    /// successful sync covered since they were last written.
    model: Mutex<Model>,
}

#[derive(Default)]
struct Model {
    /// Files by the number given when created or opened; their records
    /// follow renames through `names`.
    files: HashMap<u64, FileModel>,
    names: HashMap<PathBuf, u64>,
    next: u64,
}

impl Model {
    /// The file now called `path`, with a model of its own if it has none.
    fn file_id(&mut self, path: &Path) -> u64 {
        if let Some(&id) = self.names.get(path) {
            return id;
        }
        self.next += 1;
        self.names.insert(path.to_path_buf(), self.next);
        self.next
    }
}

#[derive(Default, Clone)]
struct FileModel {
    pending: Vec<(u64, u64)>,
    durable: Vec<(u64, u64)>,
}

impl FileModel {
    /// A write of `[from, to)` whose bytes differ from what the file held
    /// at `changed` (ranges): no earlier sync covers those. Bytes rewritten
    /// with the same value (the partial block a direct append rewrites, the
    /// page writeback rewrites) keep what they had.
    fn written(&mut self, from: u64, to: u64, changed: &[(u64, u64)]) {
        for &(a, b) in changed {
            self.changed(a, b);
        }
        self.pending.push((from, to));
    }

    fn changed(&mut self, from: u64, to: u64) {
        let mut kept = Vec::with_capacity(self.durable.len() + 1);
        for &(a, b) in &self.durable {
            if b <= from || a >= to {
                kept.push((a, b));
                continue;
            }
            if a < from {
                kept.push((a, from));
            }
            if b > to {
                kept.push((to, b));
            }
        }
        self.durable = kept;
    }
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

    fn file_id(&self, path: &Path) -> u64 {
        let mut model = self.state.model.lock().unwrap_or_else(|e| e.into_inner());
        model.file_id(path)
    }

    /// Makes direct writes answer `Unsupported` (`true`), as a file system
    /// without `O_DIRECT` would, or work again (`false`).
    pub fn refuse_direct_io(&self, refuse: bool) {
        self.state.refuse_direct.store(refuse, Ordering::SeqCst);
    }

    /// Makes `allocate` answer `Unsupported` (`true`), as a file system
    /// without `fallocate` would, or work again (`false`).
    pub fn refuse_allocate(&self, refuse: bool) {
        self.state.refuse_allocate.store(refuse, Ordering::SeqCst);
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
    /// (last written, if written more than once)
    /// and then covered by a successful sync of that file.
    pub fn is_durable(&self, path: &Path, offset: u64, len: u64) -> bool {
        let model = self.state.model.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = model.names.get(path).and_then(|id| model.files.get(id)) else {
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
    /// This file in the model (its path may change by rename).
    id: u64,
    storage: FaultyStorage,
}

impl StorageFile for FaultyFile {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.storage.check(FaultOp::Write)?;
        let changed = self.changed_ranges(buf, offset);
        self.inner.write_all_at(buf, offset)?;
        self.with_model(|m| m.written(offset, offset + buf.len() as u64, &changed));
        Ok(())
    }
    fn write_direct_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.storage.state.refuse_direct.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "direct I/O off"));
        }
        self.storage.check(FaultOp::Write)?;
        let changed = self.changed_ranges(buf, offset);
        self.inner.write_direct_at(buf, offset)?;
        self.with_model(|m| m.written(offset, offset + buf.len() as u64, &changed));
        Ok(())
    }
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        if self.storage.state.refuse_allocate.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "fallocate off"));
        }
        // A fault here is what ENOSPC at allocation looks like.
        self.storage.check(FaultOp::Write)?;
        let old = self.inner.file.metadata()?.len();
        self.inner.allocate(len)?;
        // As zeros written past the old end: they read back as zeros and are
        // durable after the next sync (the bytes before keep their state).
        if len > old {
            self.with_model(|m| m.written(old, len, &[(old, len)]));
        }
        Ok(())
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
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
    /// The ranges where writing `buf` at `offset` changes the file's bytes
    /// (all of it where the file is shorter).
    fn changed_ranges(&self, buf: &[u8], offset: u64) -> Vec<(u64, u64)> {
        let mut old = vec![0u8; buf.len()];
        let n = read_up_to(&self.inner.file, &mut old, offset);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &b) in buf.iter().enumerate() {
            if i < n && old[i] == b {
                continue;
            }
            let at = offset + i as u64;
            match out.last_mut() {
                Some(last) if last.1 == at => last.1 = at + 1,
                _ => out.push((at, at + 1)),
            }
        }
        out
    }

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
        f(model.files.entry(self.id).or_default())
    }
}

/// Reads what there is of `buf.len()` bytes at `offset`; how many.
fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

impl Storage for FaultyStorage {
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        self.check(FaultOp::Create)?;
        let inner = RealFile::open(path, true)?;
        Ok(Box::new(FaultyFile {
            inner,
            id: self.file_id(path),
            storage: self.clone(),
        }))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let inner = RealFile::open(path, false)?;
        Ok(Box::new(FaultyFile {
            inner,
            id: self.file_id(path),
            storage: self.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        let mut model = self.state.model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = model.names.remove(from) {
            model.names.insert(to.to_path_buf(), id);
        }
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)?;
        let mut model = self.state.model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = model.names.remove(path) {
            model.files.remove(&id);
        }
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

    #[test]
    fn aligned_buffers_start_on_a_block_and_keep_their_bytes() {
        let mut b = AlignedBuf::new();
        assert_eq!(b.capacity(), 0);
        for len in [1, 4096, 5000, 100, 70_000] {
            let s = b.get(len);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
            s[len - 1] = 7;
            assert_eq!(b.as_slice(len)[len - 1], 7);
            assert!(b.capacity() >= len);
        }
    }

    #[test]
    fn an_overwrite_is_not_durable_until_synced_and_renames_keep_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let s = FaultyStorage::new();
        let prep = dir.path().join("a.prep");
        let seg = dir.path().join("a.seg");
        let mut f = s.create(&prep).unwrap();
        // Zero-filled and synced, as a prepared segment is.
        f.write_all_at(&[0u8; 100], 0).unwrap();
        f.sync_all().unwrap();
        s.rename(&prep, &seg).unwrap();
        assert!(s.is_durable(&seg, 0, 100));
        // A record written over the zeros through the handle opened under
        // the old name: those bytes are new, and not durable before a sync.
        f.write_all_at(b"record", 40).unwrap();
        assert!(!s.is_durable(&seg, 40, 6));
        assert!(s.is_durable(&seg, 0, 40) && s.is_durable(&seg, 46, 54));
        f.sync_data().unwrap();
        assert!(s.is_durable(&seg, 0, 100));
        assert!(!s.is_durable(&prep, 0, 1), "the old name is gone");
    }
}
