//! The block kernel: from a position on, in whole 64-byte blocks, where is the
//! first byte that needs the exact state machine?
//!
//! Job: answer that one question as fast as the CPU allows. A byte `c` with the
//! byte `p` just before it is *clean* (needs only a copy) when:
//! - `c` is LF exactly when `p` is CR (no bare LF, no bare CR: a CR is judged
//!   at the byte after it; a CR that ends the clean bytes is held as pending),
//! - `c` is not NUL,
//! - with `DOTS`, `c` is not a `.` right after an LF (a line-start dot).
//!
//! The check is branch-free over a block so LLVM vectorizes it (an OR over two
//! blocks on the fast path, 64 flags for a dirty block); the same
//! generic function is compiled once per CPU feature (thin `#[target_feature]`
//! wrappers, the memchr style) and the best one is picked at run time, once.
//!
//! Must not: decide anything about the body. A clean answer only means "copy
//! these bytes as they are"; anything else goes to the state machine, which is
//! exact. A false "dirty" costs speed, never correctness; a false "clean" would
//! be a bug, so the rule above is deliberately conservative (an LF that was
//! bare still makes a following dot dirty).
//!
//! Invariant: a [`Dispatch`] only ever holds a kernel the running CPU supports;
//! that is what makes the `unsafe` calls below sound.

use std::sync::OnceLock;

/// Bytes per block. 64 is one AVX-512 register, two AVX2 registers, four SSE2
/// registers; small enough that a block with a line-start dot in it costs
/// little, big enough that the per-block branch is cheap.
pub const BLOCK: usize = 64;

/// A build of the block kernel. Public so tests, the fuzzer and benchmarks can
/// force one; the session uses [`Kernel::best`] through `Unstuffer::new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Compiled for the crate's target (SSE2 on x86_64).
    Generic,
    /// Compiled with AVX2 (x86_64 only).
    Avx2,
}

impl Kernel {
    /// Every kernel, supported here or not.
    pub const ALL: [Kernel; 2] = [Kernel::Generic, Kernel::Avx2];

    /// Whether the running CPU can run this kernel.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => false,
        }
    }

    /// The fastest supported kernel, detected once per process.
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            if Kernel::Avx2.is_supported() {
                Kernel::Avx2
            } else {
                Kernel::Generic
            }
        })
    }
}

/// What a scan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Scan {
    /// Bytes from `start` on that need only a copy.
    pub(super) clean: usize,
    /// `hay[start + clean]` is dirty (within a whole block). When false, fewer
    /// than [`BLOCK`] bytes are left after the clean ones and were not looked at.
    pub(super) dirty: bool,
}

/// A kernel checked to be supported by this CPU. The only way to build one is
/// [`Dispatch::new`] / [`Dispatch::best`], which check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Dispatch(Kernel);

impl Dispatch {
    pub(super) fn new(kernel: Kernel) -> Option<Dispatch> {
        kernel.is_supported().then_some(Dispatch(kernel))
    }

    pub(super) fn best() -> Dispatch {
        Dispatch(Kernel::best())
    }

    /// Scans `hay[start..]` in whole blocks for the first dirty byte.
    /// `start >= 1`: the byte before `start` is the first block's look-behind.
    #[inline]
    pub(super) fn scan<const DOTS: bool>(self, hay: &[u8], start: usize) -> Scan {
        match self.0 {
            Kernel::Generic => scan::<DOTS>(hay, start),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // SAFETY: a `Dispatch` holds `Kernel::Avx2` only after
                // `is_x86_feature_detected!("avx2")` returned true (see
                // `Dispatch::new` and `Kernel::best`), so the AVX2 build runs
                // on a CPU that has AVX2.
                unsafe { scan_avx2::<DOTS>(hay, start) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => unreachable!("Dispatch::new refuses unsupported kernels"),
        }
    }
}

/// The AVX2 build of [`scan`].
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2<const DOTS: bool>(hay: &[u8], start: usize) -> Scan {
    scan::<DOTS>(hay, start)
}

/// The kernel, written once. `#[inline(always)]` so each `#[target_feature]`
/// wrapper gets its own vectorized copy.
///
/// ```text
/// i = start                                  // hay[i-1] exists: look-behind
/// first block alone, as in the last loop below
/// while two whole blocks hay[i .. i+128] exist:
///     for each byte c = hay[j], p = hay[j-1], j in them (no branches):
///         dirty |= (c == LF) != (p == CR)    // bare LF, or a CR not followed by LF
///                | c == NUL
///                | DOTS & c == '.' & p == LF // a dot at line start
///     if dirty: break                        // find it block by block below
///     i += 128
/// while a whole block hay[i .. i+64] exists:
///     flags = byte i+k dirty? for k in 0..64 (same rule, no branches)
///     if some flag is set: return (i + first set k - start, dirty)
///     i += 64
/// return (i - start, not dirty)              // fewer than 64 bytes left
/// ```
///
/// `p` is read with its own unaligned load rather than shuffled out of the `c`
/// vectors: loads are cheaper than cross-lane shuffles on x86.
#[inline(always)]
fn scan<const DOTS: bool>(hay: &[u8], start: usize) -> Scan {
    assert!(start >= 1, "the first block needs one byte of look-behind");
    let mut i = start;
    // The first block alone: right after a dirty byte the next one is often
    // near (dot-dense mail), and the pair loop would only be thrown away.
    if let Some(found) = block_at::<DOTS>(hay, start, i) {
        return found;
    }
    if i + BLOCK <= hay.len() {
        i += BLOCK;
    }
    while let (Some(prev), Some(cur)) =
        (hay.get(i - 1..i - 1 + 2 * BLOCK), hay.get(i..i + 2 * BLOCK))
    {
        let prev: &[u8; 2 * BLOCK] = prev.try_into().expect("2 * BLOCK bytes");
        let cur: &[u8; 2 * BLOCK] = cur.try_into().expect("2 * BLOCK bytes");
        if any_dirty::<DOTS, { 2 * BLOCK }>(prev, cur) {
            break;
        }
        i += 2 * BLOCK;
    }
    loop {
        if let Some(found) = block_at::<DOTS>(hay, start, i) {
            return found;
        }
        if i + BLOCK > hay.len() {
            return Scan {
                clean: i - start,
                dirty: false,
            };
        }
        i += BLOCK;
    }
}

/// Looks at the block `hay[i .. i+64]`: `Some` when the scan ends in it
/// (a dirty byte), `None` when it is clean or not whole (the caller tells
/// which by the length left).
#[inline(always)]
fn block_at<const DOTS: bool>(hay: &[u8], start: usize, i: usize) -> Option<Scan> {
    let (Some(prev), Some(cur)) = (hay.get(i - 1..i - 1 + BLOCK), hay.get(i..i + BLOCK)) else {
        return None;
    };
    let prev: &[u8; BLOCK] = prev.try_into().expect("BLOCK bytes");
    let cur: &[u8; BLOCK] = cur.try_into().expect("BLOCK bytes");
    first_dirty::<DOTS>(prev, cur).map(|k| Scan {
        clean: i - start + k,
        dirty: true,
    })
}

/// The rule for one byte `c` with look-behind `p`.
#[inline(always)]
fn is_dirty<const DOTS: bool>(p: u8, c: u8) -> bool {
    let pair_broken = (c == b'\n') ^ (p == b'\r');
    let nul = c == 0;
    let line_dot = DOTS & (c == b'.') & (p == b'\n');
    pair_broken | nul | line_dot
}

/// Whether any byte `cur[k]` (look-behind `prev[k]`) is dirty. No early exit
/// and no branches inside, so it compiles to vector compares and an OR.
#[inline(always)]
fn any_dirty<const DOTS: bool, const N: usize>(prev: &[u8; N], cur: &[u8; N]) -> bool {
    let mut acc = false;
    for k in 0..N {
        acc |= is_dirty::<DOTS>(prev[k], cur[k]);
    }
    acc
}

/// The offset of the first dirty byte `cur[k]`, if any. The flags are computed
/// branch-free for the whole block (vector compares); the first one is then
/// found eight flags at a time.
#[inline(always)]
fn first_dirty<const DOTS: bool>(prev: &[u8; BLOCK], cur: &[u8; BLOCK]) -> Option<usize> {
    let mut flags = [0u8; BLOCK];
    for k in 0..BLOCK {
        flags[k] = is_dirty::<DOTS>(prev[k], cur[k]) as u8;
    }
    for (w, word) in flags.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        if word != 0 {
            return Some(w * 8 + word.trailing_zeros() as usize / 8);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule, byte by byte, with no blocks: the oracle for the kernels.
    fn dirty_at(hay: &[u8], j: usize, dots: bool) -> bool {
        let (p, c) = (hay[j - 1], hay[j]);
        ((c == b'\n') != (p == b'\r')) || c == 0 || (dots && c == b'.' && p == b'\n')
    }

    fn expected_scan(hay: &[u8], start: usize, dots: bool) -> Scan {
        let whole = (hay.len() - start) / BLOCK * BLOCK;
        match (start..start + whole).find(|&j| dirty_at(hay, j, dots)) {
            Some(j) => Scan {
                clean: j - start,
                dirty: true,
            },
            None => Scan {
                clean: whole,
                dirty: false,
            },
        }
    }

    fn clean_body(len: usize) -> Vec<u8> {
        let line = b"Lorem ipsum dolor sit amet.\r\n";
        line.iter().copied().cycle().take(len).collect()
    }

    #[test]
    fn every_kernel_finds_every_anomaly_at_every_offset() {
        let kernels: Vec<Dispatch> = Kernel::ALL.into_iter().filter_map(Dispatch::new).collect();
        assert!(kernels.contains(&Dispatch(Kernel::Generic)));
        let base = clean_body(400);
        let anomalies: [&[u8]; 6] = [b"\0", b"\n", b"\r", b"x\rx", b"\r\n.", b"\n."];
        for start in 1..70 {
            for dots in [false, true] {
                for pos in start..start + 3 * BLOCK {
                    for a in anomalies {
                        let mut hay = base.clone();
                        hay[pos..pos + a.len()].copy_from_slice(a);
                        let want = expected_scan(&hay, start, dots);
                        for k in &kernels {
                            let got = if dots {
                                k.scan::<true>(&hay, start)
                            } else {
                                k.scan::<false>(&hay, start)
                            };
                            assert_eq!(got, want, "{k:?} start {start} pos {pos} {a:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn best_is_supported_and_stable() {
        assert!(Kernel::best().is_supported());
        assert_eq!(Kernel::best(), Kernel::best());
        assert!(Kernel::Generic.is_supported());
    }
}
