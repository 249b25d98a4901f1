//! The shard's provided buffer ring: `count` buffers of `buf_bytes` each that
//! the kernel picks from when a multishot recv has data (buffer group `bgid`).
//!
//! Ownership of a buffer moves in a circle:
//! - on the ring (after `new` or `recycle`): the kernel's; it may write into
//!   it at any time, so we never read it;
//! - named by a recv CQE (`IORING_CQE_F_BUFFER`, buffer id in the flags):
//!   ours; we read the `res` bytes, hand a copy to the shard core, and put the
//!   buffer back with `recycle` before the next wait for completions.
//!
//! Because no more than `count` buffers ever exist, and a buffer goes back on
//! the ring only after the kernel gave it to us, the ring never holds more
//! than `count` entries and `recycle` cannot overrun the kernel's head.
//!
//! Memory: the entry array and the buffers are anonymous mappings of our
//! own, not Rust allocations, so no Rust reference ever points at memory the
//! kernel may write. They are unmapped on drop, which the owner must only
//! let happen once the kernel cannot write any more: the group unregistered
//! (or the ring closed) and no recv in flight. Otherwise call `leak`.
//!
//! Must not: hand out a buffer that is on the ring, or recycle one twice.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// Entry index for a given tail: the ring is a power of two, indexed by the
/// low bits of a free-running 16-bit tail (the kernel does the same with its
/// head).
pub fn entry_index(tail: u16, count: u16) -> usize {
    debug_assert!(count.is_power_of_two());
    (tail & (count - 1)) as usize
}

/// Byte offset of buffer `bid` in the data mapping.
pub fn buffer_offset(bid: u16, buf_bytes: usize) -> usize {
    bid as usize * buf_bytes
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    bytes: usize,
}

impl Mapping {
    fn new(bytes: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping aliases nothing; the result is
        // checked before use and unmapped only by Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            bytes,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`bytes` are exactly what mmap returned; the owner
        // (BufRing) guarantees the kernel no longer uses the memory.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

pub struct BufRing {
    entries: Mapping,
    data: Mapping,
    count: u16,
    buf_bytes: usize,
    /// Our producer index; published to the kernel with a Release store.
    tail: u16,
    bgid: u16,
    registered: bool,
}

impl BufRing {
    /// Maps `count` (a power of two, at most 32768) buffers of `buf_bytes`
    /// and puts all of them on the ring. Not yet registered.
    pub fn new(count: u16, buf_bytes: usize, bgid: u16) -> io::Result<BufRing> {
        assert!(count.is_power_of_two() && count <= 32768, "ring size");
        assert!(buf_bytes > 0 && buf_bytes <= u32::MAX as usize);
        let entries = Mapping::new(count as usize * std::mem::size_of::<BufRingEntry>())?;
        let data = Mapping::new(count as usize * buf_bytes)?;
        let mut ring = BufRing {
            entries,
            data,
            count,
            buf_bytes,
            tail: 0,
            bgid,
            registered: false,
        };
        for bid in 0..count {
            ring.put(bid);
        }
        ring.publish();
        Ok(ring)
    }

    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Registers the ring as buffer group `bgid` of `submitter`'s ring.
    ///
    /// # Safety
    /// The caller keeps `self` alive (and does not move its mappings, which
    /// it cannot) until `unregister` is called or the io_uring is closed and
    /// no recv using the group is in flight.
    pub unsafe fn register(&mut self, submitter: &io_uring::Submitter<'_>) -> io::Result<()> {
        // SAFETY: the entry array is a page-aligned mapping of `count`
        // entries that this struct owns; the caller's contract keeps it alive
        // for as long as the kernel may use it.
        unsafe {
            submitter.register_buf_ring_with_flags(
                self.entries.ptr as u64,
                self.count,
                self.bgid,
                0,
            )?
        };
        self.registered = true;
        Ok(())
    }

    /// Takes the group away from the kernel; after this it picks no buffer.
    pub fn unregister(&mut self, submitter: &io_uring::Submitter<'_>) -> io::Result<()> {
        if self.registered {
            submitter.unregister_buf_ring(self.bgid)?;
            self.registered = false;
        }
        Ok(())
    }

    /// The `len` bytes the kernel wrote into buffer `bid`.
    ///
    /// # Safety
    /// `bid` was named by a completion and has not been recycled since: the
    /// kernel does not touch it until `recycle(bid)`.
    pub unsafe fn data(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.count && len <= self.buf_bytes, "buffer {bid}");
        // SAFETY: in bounds of our mapping (checked above); the caller's
        // contract says the kernel is not writing this buffer.
        unsafe {
            std::slice::from_raw_parts(self.data.ptr.add(buffer_offset(bid, self.buf_bytes)), len)
        }
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.count, "buffer {bid}");
        self.put(bid);
        self.publish();
    }

    /// Writes the entry for `bid` at the tail and advances our tail; the
    /// kernel sees it only after `publish`.
    fn put(&mut self, bid: u16) {
        let at = entry_index(self.tail, self.count);
        let base = self.entries.ptr.cast::<BufRingEntry>();
        // SAFETY: `at < count`, inside the entry mapping. The kernel reads
        // entries only between its head and our published tail; this one is
        // at or past the published tail, so it is ours to write. The tail
        // field (resv of entry 0) is not touched by the setters.
        let entry = unsafe { &mut *base.add(at) };
        entry.set_addr(self.data.ptr as u64 + buffer_offset(bid, self.buf_bytes) as u64);
        entry.set_len(self.buf_bytes as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        let base = self.entries.ptr.cast::<BufRingEntry>();
        // SAFETY: `tail` points at a u16 inside our entry mapping, suitably
        // aligned; the kernel reads it with an acquire load, so a release
        // store makes the entries written before it visible.
        unsafe {
            let tail = BufRingEntry::tail(base).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The kernel may still use the memory (shutdown could not wait for
    /// every recv to end): keep the mappings for the life of the process.
    pub fn leak(self) {
        std::mem::forget(self);
    }

    #[cfg(test)]
    fn entry(&self, at: usize) -> (u64, u32, u16) {
        // SAFETY: test only, not registered: nobody else touches the array.
        let e = unsafe { &*self.entries.ptr.cast::<BufRingEntry>().add(at) };
        (e.addr(), e.len(), e.bid())
    }

    #[cfg(test)]
    fn published_tail(&self) -> u16 {
        // SAFETY: as in `publish`.
        unsafe {
            (*BufRingEntry::tail(self.entries.ptr.cast::<BufRingEntry>()).cast::<AtomicU16>())
                .load(Ordering::Acquire)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_arithmetic_wraps_with_the_tail() {
        assert_eq!(entry_index(0, 8), 0);
        assert_eq!(entry_index(7, 8), 7);
        assert_eq!(entry_index(8, 8), 0);
        assert_eq!(entry_index(u16::MAX, 8), 7);
        assert_eq!(entry_index(u16::MAX.wrapping_add(1), 8), 0);
        assert_eq!(entry_index(12345, 32768), 12345);
        assert_eq!(buffer_offset(0, 16384), 0);
        assert_eq!(buffer_offset(3, 16384), 3 * 16384);
        assert_eq!(buffer_offset(u16::MAX, 1 << 16), (u16::MAX as usize) << 16);
    }

    #[test]
    fn new_ring_holds_every_buffer_once() {
        let ring = BufRing::new(8, 4096, 3).unwrap();
        assert_eq!(ring.published_tail(), 8);
        let base = ring.data.ptr as u64;
        for at in 0..8 {
            let (addr, len, bid) = ring.entry(at);
            assert_eq!(bid as usize, at);
            assert_eq!(len, 4096);
            assert_eq!(addr, base + at as u64 * 4096);
        }
    }

    #[test]
    fn recycled_buffers_go_behind_the_tail_in_any_order() {
        let mut ring = BufRing::new(4, 64, 0).unwrap();
        // The kernel used buffers 2 and 0; they come back in that order and
        // land in the slots after the tail (which wrap to 0 and 1).
        ring.recycle(2);
        ring.recycle(0);
        assert_eq!(ring.published_tail(), 6);
        let base = ring.data.ptr as u64;
        assert_eq!(ring.entry(0), (base + 2 * 64, 64, 2));
        assert_eq!(ring.entry(1), (base, 64, 0));
        // Many laps: the tail wraps past u16::MAX without drifting.
        for i in 0..70_000u32 {
            ring.recycle((i % 4) as u16);
        }
        assert_eq!(ring.published_tail(), 6u16.wrapping_add(70_000u32 as u16));
    }

    #[test]
    fn data_reads_the_named_buffer() {
        let ring = BufRing::new(2, 16, 0).unwrap();
        // Stand in for the kernel writing into buffer 1.
        // SAFETY: test only; buffer 1 lies inside the data mapping.
        unsafe { std::ptr::copy_nonoverlapping(b"hello".as_ptr(), ring.data.ptr.add(16), 5) };
        // SAFETY: not registered; nobody else writes the buffer.
        assert_eq!(unsafe { ring.data(1, 5) }, b"hello");
    }
}
