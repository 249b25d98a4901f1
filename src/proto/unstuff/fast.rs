//! The fast engines the session uses: [`Unstuffer`] (DATA) and
//! [`ChunkScanner`] (BDAT content).
//!
//! Job: produce exactly what the reference engines in `naive.rs` produce (the
//! body bytes, every [`Feed`], every [`BodyStats`] field, after every call),
//! many times faster on ordinary mail. Ordinary mail is CRLF lines with few
//! line-start dots, so almost every 64-byte block needs nothing but a copy;
//! the block kernel (`kernel.rs`) finds those blocks and this file copies them
//! whole. Everything else goes through an exact state machine that is the
//! reference engine's, with memchr to skip the plain bytes inside a line.
//!
//! Must not: buffer input between calls (the state is a few flags), allocate
//! anything but the caller's body, or use `unsafe` (the only `unsafe` is the
//! kernel dispatch in `kernel.rs`).
//!
//! Invariants:
//! - The kernel runs only in a state that its look-behind byte can stand for:
//!   `Mid`, `LineStart` or `Cr`. At `i >= 1` that byte is `input[i - 1]`, and
//!   it tells the truth (`Cr` exactly when it is CR; `LineStart` only after an
//!   LF; an LF before `Mid` only makes a following dot falsely dirty); at
//!   `i == 0` it is made up from the state. In `Dot` / `DotCr` the state
//!   machine runs.
//! - A clean run leaves the state a function of its last byte: CR -> `Cr` (held,
//!   not emitted), LF -> `LineStart`, anything else -> `Mid`.
//! - Output goes out in whole units (`emit` / `emit_run`), so truncation at
//!   `body_bytes_max` cuts where the reference engine cuts.

use memchr::memchr3;

use super::kernel::{BLOCK, Dispatch, Kernel};
use super::{BodyStats, Feed, State, emit, emit_bare_cr, emit_bare_lf, emit_run};

/// The DATA unstuffer: same methods and results as [`super::NaiveUnstuffer`].
#[derive(Clone, Debug)]
pub struct Unstuffer {
    state: State,
    normalize: bool,
    body_bytes_max: usize,
    stats: BodyStats,
    kernel: Dispatch,
}

impl Unstuffer {
    pub fn new(normalize: bool, body_bytes_max: usize) -> Self {
        Self::build(normalize, body_bytes_max, Dispatch::best())
    }

    /// Like [`Unstuffer::new`] with a forced block kernel (tests, fuzzing,
    /// benchmarks); `None` when this CPU cannot run it.
    pub fn with_kernel(normalize: bool, body_bytes_max: usize, kernel: Kernel) -> Option<Self> {
        Dispatch::new(kernel).map(|k| Self::build(normalize, body_bytes_max, k))
    }

    fn build(normalize: bool, body_bytes_max: usize, kernel: Dispatch) -> Self {
        Unstuffer {
            state: State::LineStart,
            normalize,
            body_bytes_max,
            stats: BodyStats::default(),
            kernel,
        }
    }

    pub fn stats(&self) -> &BodyStats {
        &self.stats
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Unstuffs `input` into `body`; stops right after the terminator.
    ///
    /// ```text
    /// i = 0
    /// loop while input remains and the terminator has not been seen:
    ///     if state is Dot or DotCr:          // a dot held from the last call
    ///         state machine through input[i], then loop
    ///     p = input[i-1], or at i == 0 a byte standing for the state
    ///         (LineStart: LF, Cr: CR, Mid: a space)
    ///     (n, dirty) = kernel from i with look-behind p: clean bytes, and
    ///                  whether a dirty byte follows them (else n reaches the end)
    ///     if n > 0:
    ///         if state is Cr: emit the held CR with the LF at input[i]
    ///         emit input[i .. i+n] in one copy, except a CR at its end,
    ///           which is held (state Cr); else state from the last byte
    ///         i += n
    ///     if not dirty: done with this input
    ///     state machine from the dirty byte at i: just through it when it
    ///       came after >= 16 clean bytes, else through the next 64 bytes
    ///       (dense trouble: cheaper than a kernel call per byte); it always
    ///       goes on until the state is Mid, LineStart or Cr again
    /// ```
    ///
    /// Each round moves at least one byte (the state machine always does), so
    /// the loop is bounded by `input.len()` rounds.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Feed {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            let before = i;
            let look_behind = match (i.checked_sub(1), self.state) {
                (Some(j), _) => input[j],
                (None, State::LineStart) => b'\n',
                (None, State::Cr) => b'\r',
                (None, _) => b' ',
            };
            let until = match self.state {
                State::Mid | State::LineStart | State::Cr => {
                    let scan = self.kernel.scan::<true>(input, i, look_behind);
                    if scan.clean > 0 {
                        self.state = emit_clean(
                            body,
                            &mut self.stats,
                            self.body_bytes_max,
                            self.state == State::Cr,
                            &input[i..i + scan.clean],
                        );
                        i += scan.clean;
                    }
                    if !scan.dirty {
                        debug_assert_eq!(i, input.len());
                        break;
                    }
                    until_after_dirty(i, scan.clean)
                }
                // A dot held from the last call: settle it, then the kernel.
                _ => i + 1,
            };
            i = self.exact(input, i, until, body);
            debug_assert!(i > before || self.state == State::Done);
        }
        self.stats.bytes_in += i as u64;
        Feed {
            consumed: i,
            done: self.state == State::Done,
        }
    }

    /// The reference engine's state machine from `input[i]`, with memchr over
    /// the plain bytes inside a line. Runs until `i >= until` in a resumable
    /// state, the input ends, or the terminator is consumed; returns `i`.
    fn exact(&mut self, input: &[u8], mut i: usize, until: usize, body: &mut Vec<u8>) -> usize {
        let (max, normalize) = (self.body_bytes_max, self.normalize);
        let stats = &mut self.stats;
        // Bounded: every arm consumes a byte or moves to a state that does
        // (LineStart -> Mid, Cr -> Mid, Dot -> Mid, DotCr -> Cr -> Mid).
        while let Some(&b) = input.get(i) {
            match self.state {
                State::Mid => {
                    if i >= until {
                        break;
                    }
                    let plain = plain_len(&input[i..]);
                    if plain > 0 {
                        emit_run(body, stats, max, &input[i..i + plain]);
                        i += plain;
                    }
                    let Some(&special) = input.get(i) else { break };
                    i += 1;
                    match special {
                        b'\r' => self.state = State::Cr,
                        b'\n' => emit_bare_lf(body, stats, max, normalize),
                        _ => {
                            stats.nul += 1;
                            emit(body, stats, max, &[0]);
                        }
                    }
                }
                State::LineStart => {
                    if i >= until {
                        break;
                    }
                    if b == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Cr => {
                    if i >= until {
                        break;
                    }
                    if b == b'\n' {
                        emit(body, stats, max, b"\r\n");
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        // The held CR is bare; `b` is handled as in a line.
                        emit_bare_cr(body, stats, max, normalize);
                        self.state = State::Mid;
                    }
                }
                State::Dot => {
                    if b == b'\r' {
                        self.state = State::DotCr;
                        i += 1;
                    } else {
                        stats.dots_removed += 1;
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::Done;
                        i += 1;
                        break;
                    }
                    // `.` CR at line start but no LF: the dot was stuffing,
                    // the CR is held like any other.
                    stats.dots_removed += 1;
                    self.state = State::Cr;
                }
                State::Done => break,
            }
        }
        i
    }
}

/// Bytes before the first CR, LF or NUL in `rest`. Looks at the first few
/// bytes itself before calling memchr: the state machine runs where trouble
/// is dense, and there the answer is usually a byte or two away, well below
/// what a memchr call costs.
#[inline]
fn plain_len(rest: &[u8]) -> usize {
    const NEAR: usize = 16;
    let near = rest.len().min(NEAR);
    if let Some(k) = rest[..near]
        .iter()
        .position(|&b| matches!(b, b'\r' | b'\n' | 0))
    {
        return k;
    }
    near + memchr3(b'\r', b'\n', 0, &rest[near..]).unwrap_or(rest.len() - near)
}

/// Clean bytes before a dirty one for the kernel to be called again right
/// after that byte. Below this, dirty bytes are close together (hostile or binary
/// input) and a kernel call per byte would cost more than the state machine:
/// the state machine then takes a whole block. Dot-dense mail (a dot every
/// 20-80 bytes) stays above it.
const CLEAN_RUN_MIN: usize = 16;

/// How far the state machine must go from the dirty byte at `i`, which came
/// after `clean` clean bytes.
#[inline]
fn until_after_dirty(i: usize, clean: usize) -> usize {
    if clean >= CLEAN_RUN_MIN {
        i + 1
    } else {
        i + BLOCK
    }
}

/// Emits clean bytes (see `kernel.rs`) and returns the state after them.
/// `cr_held`: a CR from before the run is pending; the run then starts with
/// its LF. A CR at the run's end is held, not emitted.
#[inline]
fn emit_clean(
    body: &mut Vec<u8>,
    stats: &mut BodyStats,
    max: usize,
    cr_held: bool,
    run: &[u8],
) -> State {
    let mut run = run;
    if cr_held {
        debug_assert_eq!(run.first(), Some(&b'\n'), "clean after a CR means LF");
        emit(body, stats, max, b"\r\n");
        run = &run[1..];
    }
    let (bytes, state) = match run.split_last() {
        Some((b'\r', head)) => (head, State::Cr),
        Some((b'\n', _)) => (run, State::LineStart),
        Some(_) => (run, State::Mid),
        None => (run, State::LineStart),
    };
    emit_run(body, stats, max, bytes);
    state
}

/// The BDAT content scanner: same methods and results as
/// [`super::NaiveScanner`]. No dots, no terminator: only bare CR / bare LF /
/// NUL, with a CR at a chunk's end held until the next chunk (or `finish`).
#[derive(Clone, Debug)]
pub struct ChunkScanner {
    cr_held: bool,
    normalize: bool,
    body_bytes_max: usize,
    stats: BodyStats,
    kernel: Dispatch,
}

impl ChunkScanner {
    pub fn new(normalize: bool, body_bytes_max: usize) -> Self {
        Self::build(normalize, body_bytes_max, Dispatch::best())
    }

    /// Like [`ChunkScanner::new`] with a forced block kernel; `None` when this
    /// CPU cannot run it.
    pub fn with_kernel(normalize: bool, body_bytes_max: usize, kernel: Kernel) -> Option<Self> {
        Dispatch::new(kernel).map(|k| Self::build(normalize, body_bytes_max, k))
    }

    fn build(normalize: bool, body_bytes_max: usize, kernel: Dispatch) -> Self {
        ChunkScanner {
            cr_held: false,
            normalize,
            body_bytes_max,
            stats: BodyStats::default(),
            kernel,
        }
    }

    pub fn stats(&self) -> &BodyStats {
        &self.stats
    }

    /// Takes all of `input`. Same loop as [`Unstuffer::feed`] without dots
    /// (look-behind at `i == 0`: CR when one is held, else a space): clean
    /// bytes are copied whole, dirty ones go through `Self::exact`.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            let look_behind = match i.checked_sub(1) {
                Some(j) => input[j],
                None if self.cr_held => b'\r',
                None => b' ',
            };
            let scan = self.kernel.scan::<false>(input, i, look_behind);
            if scan.clean > 0 {
                let state = emit_clean(
                    body,
                    &mut self.stats,
                    self.body_bytes_max,
                    self.cr_held,
                    &input[i..i + scan.clean],
                );
                self.cr_held = state == State::Cr;
                i += scan.clean;
            }
            if !scan.dirty {
                debug_assert_eq!(i, input.len());
                break;
            }
            i = self.exact(input, i, until_after_dirty(i, scan.clean), body);
        }
        self.stats.bytes_in += input.len() as u64;
    }

    /// The last chunk has been fed: a CR still held at the very end is bare.
    pub fn finish(&mut self, body: &mut Vec<u8>) {
        if self.cr_held {
            self.cr_held = false;
            emit_bare_cr(body, &mut self.stats, self.body_bytes_max, self.normalize);
        }
    }

    /// The scanner's state machine from `input[i]` until `i >= until` (or the
    /// input ends); returns `i`.
    fn exact(&mut self, input: &[u8], mut i: usize, until: usize, body: &mut Vec<u8>) -> usize {
        let (max, normalize) = (self.body_bytes_max, self.normalize);
        let stats = &mut self.stats;
        while i < until {
            let Some(&b) = input.get(i) else { break };
            if self.cr_held {
                self.cr_held = false;
                if b == b'\n' {
                    emit(body, stats, max, b"\r\n");
                    i += 1;
                    continue;
                }
                emit_bare_cr(body, stats, max, normalize);
            }
            let plain = plain_len(&input[i..]);
            if plain > 0 {
                emit_run(body, stats, max, &input[i..i + plain]);
                i += plain;
            }
            let Some(&special) = input.get(i) else { break };
            i += 1;
            match special {
                b'\r' => self.cr_held = true,
                b'\n' => emit_bare_lf(body, stats, max, normalize),
                _ => {
                    stats.nul += 1;
                    emit(body, stats, max, &[0]);
                }
            }
        }
        i
    }
}
