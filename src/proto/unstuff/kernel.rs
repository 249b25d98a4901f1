//! The block kernel: how many whole 64-byte blocks, from a position on, hold
//! nothing that needs the exact state machine.
//!
//! Job: answer that one question as fast as the CPU allows. A block is *clean*
//! when, for every byte `c` in it and the byte `p` just before it:
//! - `c` is LF exactly when `p` is CR (no bare LF, no bare CR: the CR at the
//!   block's last byte is judged by the next block, or held as pending),
//! - `c` is not NUL,
//! - with `DOTS`, `c` is not a `.` right after an LF (a line-start dot).
//!
//! The check is branch-free over the block so LLVM vectorizes it; the same
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

    /// Bytes of whole clean blocks in `hay[start..]`, a multiple of [`BLOCK`].
    /// `start >= 1`: the byte before `start` is the first block's look-behind.
    #[inline]
    pub(super) fn clean_len<const DOTS: bool>(self, hay: &[u8], start: usize) -> usize {
        match self.0 {
            Kernel::Generic => clean_len::<DOTS>(hay, start),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // SAFETY: a `Dispatch` holds `Kernel::Avx2` only after
                // `is_x86_feature_detected!("avx2")` returned true (see
                // `Dispatch::new` and `Kernel::best`), so the AVX2 build runs
                // on a CPU that has AVX2.
                unsafe { clean_len_avx2::<DOTS>(hay, start) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => unreachable!("Dispatch::new refuses unsupported kernels"),
        }
    }
}

/// The AVX2 build of [`clean_len`].
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn clean_len_avx2<const DOTS: bool>(hay: &[u8], start: usize) -> usize {
    clean_len::<DOTS>(hay, start)
}

/// The kernel, written once. `#[inline(always)]` so each `#[target_feature]`
/// wrapper gets its own vectorized copy.
///
/// ```text
/// i = start                                  // hay[i-1] exists: look-behind
/// while a whole block hay[i .. i+64] exists:
///     win = hay[i-1 .. i+64]                 // 65 bytes: p = win[k], c = win[k+1]
///     if any k: (c == LF) != (p == CR)       // bare LF, or a CR not followed by LF
///               or c == NUL
///               or DOTS and c == '.' and p == LF    // a dot at line start
///         stop                               // dirty: the state machine's turn
///     i += 64
/// return i - start
/// ```
#[inline(always)]
fn clean_len<const DOTS: bool>(hay: &[u8], start: usize) -> usize {
    assert!(start >= 1, "the first block needs one byte of look-behind");
    let mut i = start;
    while let Some(win) = hay.get(i - 1..i + BLOCK) {
        let win: &[u8; BLOCK + 1] = win.try_into().expect("BLOCK + 1 bytes");
        if block_dirty::<DOTS>(win) {
            break;
        }
        i += BLOCK;
    }
    i - start
}

/// Whether the block `win[1..]` (look-behind `win[0]`) is dirty. No early exit
/// and no branches inside, so it compiles to a few vector compares and an OR.
#[inline(always)]
fn block_dirty<const DOTS: bool>(win: &[u8; BLOCK + 1]) -> bool {
    let mut acc = 0u8;
    for k in 0..BLOCK {
        let p = win[k];
        let c = win[k + 1];
        let pair_broken = (c == b'\n') ^ (p == b'\r');
        let nul = c == 0;
        let line_dot = DOTS & (c == b'.') & (p == b'\n');
        acc |= (pair_broken | nul | line_dot) as u8;
    }
    acc != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule, byte by byte, with no blocks: the oracle for the kernels.
    fn dirty_at(hay: &[u8], j: usize, dots: bool) -> bool {
        let (p, c) = (hay[j - 1], hay[j]);
        ((c == b'\n') != (p == b'\r')) || c == 0 || (dots && c == b'.' && p == b'\n')
    }

    fn expected_clean_len(hay: &[u8], start: usize, dots: bool) -> usize {
        let mut i = start;
        while i + BLOCK <= hay.len() && !(i..i + BLOCK).any(|j| dirty_at(hay, j, dots)) {
            i += BLOCK;
        }
        i - start
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
        for start in 1..80 {
            for dots in [false, true] {
                for pos in start..300 {
                    for a in anomalies {
                        let mut hay = base.clone();
                        hay[pos..pos + a.len()].copy_from_slice(a);
                        let want = expected_clean_len(&hay, start, dots);
                        for k in &kernels {
                            let got = if dots {
                                k.clean_len::<true>(&hay, start)
                            } else {
                                k.clean_len::<false>(&hay, start)
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
