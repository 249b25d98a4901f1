//! The block kernel: from a position on, in 64-byte blocks, where is the first
//! byte that needs the exact state machine?
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
//! Invariant: a `Dispatch` only ever holds a kernel the running CPU supports;
//! that is what makes the `unsafe` calls below sound.
//!
//! No AVX-512 build: `#[target_feature(enable = "avx512bw")]` is stable only
//! since Rust 1.89 and the crate's `rust-version` is 1.85. Measured on the
//! development machine (docs/BENCHMARKS.md, roughly, under load), the same
//! generic code built for AVX-512BW was 15-35% faster than AVX2 on sparse mail;
//! add `Kernel::Avx512bw` (one more thin wrapper) when the MSRV moves.

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
    /// `hay[start + clean]` is dirty. When false, `clean` reaches the end.
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

    /// Scans `hay[start..]` for the first dirty byte. `look_behind` is the
    /// byte before `hay[start]`: `hay[start - 1]`, or at `start == 0` a byte
    /// that stands for the caller's state.
    #[inline]
    pub(super) fn scan<const DOTS: bool>(self, hay: &[u8], start: usize, look_behind: u8) -> Scan {
        match self.0 {
            Kernel::Generic => scan::<DOTS>(hay, start, look_behind),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // SAFETY: a `Dispatch` holds `Kernel::Avx2` only after
                // `is_x86_feature_detected!("avx2")` returned true (see
                // `Dispatch::new` and `Kernel::best`), so the AVX2 build runs
                // on a CPU that has AVX2.
                unsafe { scan_avx2::<DOTS>(hay, start, look_behind) }
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
unsafe fn scan_avx2<const DOTS: bool>(hay: &[u8], start: usize, look_behind: u8) -> Scan {
    scan::<DOTS>(hay, start, look_behind)
}

/// The kernel, written once. `#[inline(always)]` so each `#[target_feature]`
/// wrapper gets its own vectorized copy.
///
/// ```text
/// i = start; p0 = look_behind                // the byte before hay[start]
/// first block:
///     if start == 0 or fewer than 64 bytes are left:
///         copy p0 and up to 64 bytes into a 65-byte window padded with NUL
///         (NUL is dirty, so the padding stops the scan at the real end)
///     flags = byte i+k dirty? for k in 0..64, where for c = hay[j], p = hay[j-1]:
///         dirty = (c == LF) != (p == CR)     // bare LF, or a CR not followed by LF
///               | c == NUL
///               | DOTS & c == '.' & p == LF  // a dot at line start
///     if some real byte is dirty: return (its offset, dirty)
/// while two whole blocks hay[i .. i+128] exist:
///     OR the same rule over them (no branches); if any dirty: break
///     i += 128
/// for each remaining block (the last one padded as above):
///     if some real byte is dirty: return (i + its offset - start, dirty)
/// return (hay.len() - start, not dirty)      // clean to the end
/// ```
///
/// The first block goes alone because right after a dirty byte the next one
/// is often near (dot-dense mail) and the pair loop would be thrown away. `p`
/// is read with its own unaligned load rather than shuffled out of the `c`
/// vectors: loads are cheaper than cross-lane shuffles on x86.
#[inline(always)]
fn scan<const DOTS: bool>(hay: &[u8], start: usize, look_behind: u8) -> Scan {
    let dirty_at = |i: usize, k: usize| Scan {
        clean: i - start + k,
        dirty: true,
    };
    if start >= hay.len() {
        return Scan {
            clean: 0,
            dirty: false,
        };
    }
    let mut i = start;
    if i == 0 || hay.len() - i < BLOCK {
        if let Some(k) = padded_first_dirty::<DOTS>(look_behind, &hay[i..]) {
            return dirty_at(i, k);
        }
    } else if let Some(k) = whole_first_dirty::<DOTS>(hay, i) {
        return dirty_at(i, k);
    }
    i = (i + BLOCK).min(hay.len());
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
    while i < hay.len() {
        let found = if hay.len() - i < BLOCK {
            padded_first_dirty::<DOTS>(hay[i - 1], &hay[i..])
        } else {
            whole_first_dirty::<DOTS>(hay, i)
        };
        if let Some(k) = found {
            return dirty_at(i, k);
        }
        i = (i + BLOCK).min(hay.len());
    }
    Scan {
        clean: hay.len() - start,
        dirty: false,
    }
}

/// The first dirty byte in the whole block `hay[i .. i+64]` (`i >= 1`).
#[inline(always)]
fn whole_first_dirty<const DOTS: bool>(hay: &[u8], i: usize) -> Option<usize> {
    let prev: &[u8; BLOCK] = hay[i - 1..i - 1 + BLOCK].try_into().expect("BLOCK bytes");
    let cur: &[u8; BLOCK] = hay[i..i + BLOCK].try_into().expect("BLOCK bytes");
    first_dirty::<DOTS>(prev, cur)
}

/// The first dirty byte among the first (up to 64) bytes of `bytes`, with
/// `look_behind` before them, through a NUL-padded window on the stack.
#[inline(always)]
fn padded_first_dirty<const DOTS: bool>(look_behind: u8, bytes: &[u8]) -> Option<usize> {
    let n = bytes.len().min(BLOCK);
    let mut win = [0u8; BLOCK + 1];
    win[0] = look_behind;
    win[1..=n].copy_from_slice(&bytes[..n]);
    let prev: &[u8; BLOCK] = win[..BLOCK].try_into().expect("BLOCK bytes");
    let cur: &[u8; BLOCK] = win[1..].try_into().expect("BLOCK bytes");
    // The padding is NUL, hence dirty: a hit at `n` is the end, not a byte.
    first_dirty::<DOTS>(prev, cur).filter(|&k| k < n)
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
    fn dirty_at(p: u8, c: u8, dots: bool) -> bool {
        ((c == b'\n') != (p == b'\r')) || c == 0 || (dots && c == b'.' && p == b'\n')
    }

    fn expected_scan(hay: &[u8], start: usize, look_behind: u8, dots: bool) -> Scan {
        let prev = |j: usize| if j == start { look_behind } else { hay[j - 1] };
        match (start..hay.len()).find(|&j| dirty_at(prev(j), hay[j], dots)) {
            Some(j) => Scan {
                clean: j - start,
                dirty: true,
            },
            None => Scan {
                clean: hay.len() - start,
                dirty: false,
            },
        }
    }

    fn clean_body(len: usize) -> Vec<u8> {
        let line = b"Lorem ipsum dolor sit amet.\r\n";
        line.iter().copied().cycle().take(len).collect()
    }

    fn kernels() -> Vec<Dispatch> {
        let kernels: Vec<Dispatch> = Kernel::ALL.into_iter().filter_map(Dispatch::new).collect();
        assert!(kernels.contains(&Dispatch(Kernel::Generic)));
        kernels
    }

    fn check(hay: &[u8], start: usize, look_behind: u8) {
        for dots in [false, true] {
            let want = expected_scan(hay, start, look_behind, dots);
            for k in kernels() {
                let got = if dots {
                    k.scan::<true>(hay, start, look_behind)
                } else {
                    k.scan::<false>(hay, start, look_behind)
                };
                assert_eq!(
                    got,
                    want,
                    "{k:?} start {start} len {} dots {dots}",
                    hay.len()
                );
            }
        }
    }

    #[test]
    fn every_kernel_finds_every_anomaly_at_every_offset() {
        let base = clean_body(330);
        let anomalies: [&[u8]; 6] = [b"\0", b"\n", b"\r", b"x\rx", b"\r\n.", b"\n."];
        for start in (0..70).chain([127, 128, 129]) {
            for pos in start..start + 3 * BLOCK {
                for a in anomalies {
                    let mut hay = base.clone();
                    hay[pos..pos + a.len()].copy_from_slice(a);
                    let look_behind = if start == 0 { b'\n' } else { hay[start - 1] };
                    check(&hay, start, look_behind);
                }
            }
        }
    }

    #[test]
    fn short_tails_and_synthetic_look_behind() {
        let base = clean_body(200);
        for len in 0..200usize {
            for start in [0, 1, len.saturating_sub(70), len.saturating_sub(1), len] {
                let hay = &base[..len];
                if start > len {
                    continue;
                }
                for look_behind in [b'\r', b'\n', b' ', 0] {
                    if start == 0 || look_behind == hay[start - 1] {
                        check(hay, start, look_behind);
                    }
                }
                if start > 0 {
                    check(hay, start, hay[start - 1]);
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
