//! The writer's batch buffer: records are encoded straight into memory that
//! a direct (`O_DIRECT`) write can take, so a batch is not copied again into
//! an aligned staging buffer before it is written.
//!
//! Why: that copy was about 2% of the server's CPU at 64 pipelined
//! connections with 4 KiB messages, and grows with message size
//! (docs/BENCHMARKS.md, "Fifth session").
//!
//! How: `StageBuf` is a byte buffer whose first byte is always on a 4 KiB
//! (`fs::DIRECT_ALIGN`) boundary: an `fs::AlignedBuf` and a length, grown
//! with its contents kept. [`RecordOut`] is what the record encoder writes
//! into: a plain `Vec<u8>` or a `StageBuf`.
//!
//! Must not: use unsafe code, or let its contents start anywhere but on a
//! block boundary.

use std::ops::{Deref, DerefMut};

use super::fs::AlignedBuf;
#[cfg(test)]
use super::fs::DIRECT_ALIGN;

/// A growable byte buffer the record encoder appends to.
pub trait RecordOut: DerefMut<Target = [u8]> {
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]);
    /// Shortens to `len`, or grows to it with zeros.
    fn set_len_zeroed(&mut self, len: usize);
}

impl RecordOut for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn set_len_zeroed(&mut self, len: usize) {
        self.resize(len, 0);
    }
}

/// Bytes starting on a block boundary; see the module comment.
#[derive(Default)]
pub(crate) struct StageBuf {
    buf: AlignedBuf,
    len: usize,
}

impl StageBuf {
    pub(crate) fn new() -> StageBuf {
        StageBuf::default()
    }

    /// Bytes it holds without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// Makes room for `additional` more bytes: at least twice the capacity,
    /// the contents kept.
    fn reserve(&mut self, additional: usize) {
        let need = self.len + additional;
        if need > self.capacity() {
            self.buf.grow(need.max(2 * self.capacity()), self.len);
        }
    }
}

impl Deref for StageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_slice(self.len)
    }
}

impl DerefMut for StageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.get(self.len)
    }
}

impl RecordOut for StageBuf {
    fn put(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        let end = self.len + bytes.len();
        self.buf.get(end)[self.len..].copy_from_slice(bytes);
        self.len = end;
    }
    fn set_len_zeroed(&mut self, len: usize) {
        if len > self.len {
            self.reserve(len - self.len);
            self.buf.get(len)[self.len..].fill(0);
        }
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_stay_aligned_and_intact_as_it_grows_and_shrinks() {
        let mut b = StageBuf::new();
        let mut model: Vec<u8> = Vec::new();
        assert_eq!(b.len(), 0);
        for round in 0..40u32 {
            let n = (round as usize * 2_731) % 20_000 + 1;
            let bytes: Vec<u8> = (0..n).map(|i| (i as u32 ^ round) as u8 | 1).collect();
            b.put(&bytes);
            model.put(&bytes);
            if round % 3 == 0 {
                let len = model.len() / 2 + 5;
                b.set_len_zeroed(len);
                model.set_len_zeroed(len);
            }
            if round % 7 == 0 {
                let len = model.len() + 4_099;
                b.set_len_zeroed(len);
                model.set_len_zeroed(len);
            }
            assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0, "round {round}");
            assert_eq!(&b[..], &model[..], "round {round}");
            assert!(b.capacity() >= b.len());
        }
        b[0] = 9;
        assert_eq!(b[0], 9);
        b.clear();
        assert_eq!(b.len(), 0);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
    }

    #[test]
    fn zeros_are_zeros_after_shrinking_over_old_bytes() {
        let mut b = StageBuf::new();
        b.put(&[0xAB; 5000]);
        b.set_len_zeroed(10);
        b.set_len_zeroed(5000);
        assert!(b[10..].iter().all(|&x| x == 0));
        assert!(b[..10].iter().all(|&x| x == 0xAB));
    }
}
