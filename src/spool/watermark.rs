//! The committed watermark: per writer, the segment and offset up to which
//! every record is covered by a successful fdatasync. Followers read no
//! further, so they never stream a record that a failed sync could still lose.
//!
//! File `DIR/w<writer>.committed`, 24 bytes, little-endian: segment index
//! u64, offset u64, crc32c of the first 16 bytes u32, 4 zero bytes. The writer
//! rewrites it in place with one `pwrite` after each successful batch; it is
//! never synced, because it only informs live readers: recovery rewrites it
//! from what it finds on disk, and it can only lag the data (it is written
//! after the data's sync returned). Readers retry on a checksum mismatch (a
//! read that raced a write).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

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
pub struct WatermarkFile(File);

impl WatermarkFile {
    pub fn open(dir: &Path, writer: u16) -> io::Result<WatermarkFile> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(file_name(writer)))?;
        Ok(WatermarkFile(f))
    }

    pub fn publish(&self, w: Watermark) -> io::Result<()> {
        self.0.write_all_at(&encode(w), 0)
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
        let f = WatermarkFile::open(dir.path(), 2).unwrap();
        let w = Watermark {
            segment: 7,
            offset: 4096,
        };
        f.publish(w).unwrap();
        assert_eq!(read(dir.path(), 2).unwrap(), Some(w));
        let mut b = encode(w);
        b[3] ^= 1;
        assert_eq!(decode(&b), None);
    }
}
