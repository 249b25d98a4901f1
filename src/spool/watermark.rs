//! The committed watermark: per writer, the segment and offset up to which
//! every record is covered by a successful fdatasync. Followers read no
//! further, so they never stream a record that a failed sync could still lose.
//!
//! File `DIR/w<writer>.committed`, 24 bytes, little-endian: segment index
//! u64, offset u64, crc32c of the first 16 bytes u32, 4 zero bytes. The writer
//! rewrites it in place after each successful batch, through a shared memory
//! mapping of the file (a store into the page cache, no system call on the
//! reply's path; the first write after opening is a `pwrite`); it is never
//! synced, because it only informs live readers: recovery rewrites it
//! from what it finds on disk, and it can only lag the data (it is written
//! after the data's sync returned). Readers retry on a checksum mismatch (a
//! read that raced a write).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;

/// A position in one writer's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Watermark {
    pub segment: u64,
    pub offset: u64,
}

pub fn file_name(writer: u16) -> String {
    format!("w{writer:03}.committed")
}

fn encode(w: Watermark) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(&w.segment.to_le_bytes());
    b[8..16].copy_from_slice(&w.offset.to_le_bytes());
    let crc = crc32c::crc32c(&b[..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8; 24]) -> Option<Watermark> {
    let crc = u32::from_le_bytes(b[16..20].try_into().expect("4"));
    if crc != crc32c::crc32c(&b[..16]) {
        return None;
    }
    Some(Watermark {
        segment: u64::from_le_bytes(b[0..8].try_into().expect("8")),
        offset: u64::from_le_bytes(b[8..16].try_into().expect("8")),
    })
}

/// The writer's handle on its watermark file.
pub struct WatermarkFile {
    file: File,
    /// The file's first page, mapped shared once the file holds a whole
    /// watermark; `None` before that or where mapping failed (then `pwrite`).
    map: Option<NonNull<u8>>,
}

// SAFETY: the mapping is owned by this handle alone, like a Box<[u8]>.
unsafe impl Send for WatermarkFile {}

/// Length of the mapping: one page covers the 24 bytes.
const MAP_LEN: usize = 4096;

impl WatermarkFile {
    pub fn open(dir: &Path, writer: u16) -> io::Result<WatermarkFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(file_name(writer)))?;
        let mut w = WatermarkFile { file, map: None };
        w.try_map();
        Ok(w)
    }

    /// Maps the file if it is long enough that every byte written through
    /// the mapping is inside it (a store past the end would be lost, and a
    /// page past it would fault).
    fn try_map(&mut self) {
        if self.map.is_some() || !self.file.metadata().is_ok_and(|m| m.len() >= 24) {
            return;
        }
        // SAFETY: maps one page of our own open file, shared, at offset 0;
        // the kernel picks the address. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if p != libc::MAP_FAILED {
            self.map = NonNull::new(p.cast());
        }
    }

    pub fn publish(&mut self, w: Watermark) -> io::Result<()> {
        let bytes = encode(w);
        match self.map {
            Some(p) => {
                // SAFETY: `p` maps at least MAP_LEN >= 24 bytes of a file at
                // least 24 bytes long (checked before mapping; nothing here
                // shortens it), writable and owned by this handle. Readers in
                // other processes may see a torn value: they check the CRC and
                // read again.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.as_ptr(), bytes.len()) };
                Ok(())
            }
            None => {
                self.file.write_all_at(&bytes, 0)?;
                self.try_map();
                Ok(())
            }
        }
    }
}

impl Drop for WatermarkFile {
    fn drop(&mut self) {
        if let Some(p) = self.map.take() {
            // SAFETY: unmaps exactly the mapping made in `try_map`, once.
            unsafe { libc::munmap(p.as_ptr().cast(), MAP_LEN) };
        }
    }
}

/// Reads writer `writer`'s watermark; `None` when it has none yet.
pub fn read(dir: &Path, writer: u16) -> io::Result<Option<Watermark>> {
    let f = match File::open(dir.join(file_name(writer))) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // A bounded number of retries: a torn read needs a concurrent write.
    for _ in 0..100 {
        let mut b = [0u8; 24];
        match f.read_exact_at(&mut b, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        if let Some(w) = decode(&b) {
            return Ok(Some(w));
        }
        std::thread::yield_now();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path(), 2).unwrap(), None);
        let mut f = WatermarkFile::open(dir.path(), 2).unwrap();
        let w = Watermark {
            segment: 7,
            offset: 4096,
        };
        f.publish(w).unwrap();
        assert_eq!(read(dir.path(), 2).unwrap(), Some(w));
        // Later values go through the mapping; readers see each at once.
        assert!(f.map.is_some());
        for i in 1..100u64 {
            let w = Watermark {
                segment: 7 + i / 10,
                offset: 4096 + i * 100,
            };
            f.publish(w).unwrap();
            assert_eq!(read(dir.path(), 2).unwrap(), Some(w));
        }
        // Reopened (as after a restart), it maps at once.
        drop(f);
        let mut g = WatermarkFile::open(dir.path(), 2).unwrap();
        assert!(g.map.is_some());
        g.publish(w).unwrap();
        assert_eq!(read(dir.path(), 2).unwrap(), Some(w));
        assert_eq!(
            std::fs::metadata(dir.path().join(file_name(2)))
                .unwrap()
                .len(),
            24
        );
        let mut b = encode(w);
        b[3] ^= 1;
        assert_eq!(decode(&b), None);
    }
}
