//! The DATA dot-unstuffer and the BDAT content scanner.
//!
//! Job: turn the bytes that follow `354` into the stored body. Only
//! `<CRLF>.<CRLF>` ends the data (the data's start counts as following a CRLF);
//! a dot that starts a line (after a CRLF) is removed; every SMTP-smuggling
//! sequence (`<LF>.<LF>`, `<CR>.<CR>`, `<LF>.<CR><LF>`, `<CR><LF>.<LF>`, ...) is
//! plain content. Bare CR (a CR not followed by LF), bare LF (an LF not after a
//! CR) and NUL are counted; with `normalize` each bare CR or bare LF becomes
//! CRLF in the output. Deciding what to do about the counts (reject, accept) is
//! the session's job.
//!
//! Must not: do I/O, allocate beyond the caller's body buffer, or let the body
//! buffer grow past `body_bytes_max` bytes. Input may be split anywhere, so the
//! state between calls is a handful of flags, never buffered input.
//!
//! Parts:
//! - [`naive`]: the byte-at-a-time reference engines ([`NaiveUnstuffer`],
//!   [`NaiveScanner`]), the oracle the fast engines are tested against and the
//!   baseline the benchmark compares with. Their behaviour *is* the contract.
//! - [`fast`]: the engines the session uses ([`Unstuffer`], [`ChunkScanner`]):
//!   copy the clean bytes the kernel finds in one go, run an exact state machine
//!   (memchr over plain bytes) on the rest.
//! - [`kernel`]: the block check ("is this block free of anything that needs
//!   the state machine?"), written once and compiled per CPU feature.
//!
//! Invariants shared by all engines (the tests check them against each other):
//! - Output is emitted in *units*: a single byte, or a `CRLF` pair (a real one
//!   or a normalized bare CR / bare LF). A unit is written whole or not at all,
//!   so an oversize body never ends in the CR of a pair that did not fit.
//! - `stats.oversize` becomes true on the first unit that does not fit; from
//!   then on nothing is written but `bytes_out` keeps counting.
//! - A CR whose successor has not been seen yet is held in the state, not
//!   emitted and not counted in `bytes_out`.

pub mod fast;
pub mod kernel;
pub mod naive;

pub use fast::{ChunkScanner, Unstuffer};
pub use kernel::Kernel;
pub use naive::{NaiveScanner, NaiveUnstuffer};

#[cfg(test)]
mod tests;

/// What one call to `feed` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feed {
    /// Input bytes used. Less than the input only when `done`: the bytes after
    /// the terminator belong to the next command.
    pub consumed: usize,
    /// `<CRLF>.<CRLF>` has been seen (its last byte is within `consumed`).
    pub done: bool,
}

/// Counters for one body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyStats {
    /// Raw bytes consumed, the terminator included.
    pub bytes_in: u64,
    /// Body bytes produced, counting those dropped after the limit was hit.
    pub bytes_out: u64,
    /// CRs not followed by LF.
    pub bare_cr: u64,
    /// LFs not preceded by CR.
    pub bare_lf: u64,
    /// NUL bytes.
    pub nul: u64,
    /// Leading dots removed.
    pub dots_removed: u64,
    /// The body outgrew `body_bytes_max`; the buffer holds only a prefix.
    pub oversize: bool,
}

/// Where a DATA engine stands between two bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF, or at the start of the data).
    LineStart,
    /// Inside a line.
    Mid,
    /// Inside a line, after a CR whose successor is not yet known.
    Cr,
    /// A `.` at line start, successor not yet known.
    Dot,
    /// `.` CR at line start, successor not yet known.
    DotCr,
    /// The terminator has been consumed.
    Done,
}

/// Appends one output unit (one byte, or a CRLF pair) to the body unless that
/// would pass `max`; from the first refusal on, the body is marked oversize
/// and nothing more is written.
#[inline]
fn emit(body: &mut Vec<u8>, stats: &mut BodyStats, max: usize, unit: &[u8]) {
    stats.bytes_out += unit.len() as u64;
    if stats.oversize {
        return;
    }
    // `room < len`, not `len + used > max`: cannot overflow. Saturating, so a
    // caller's buffer already longer than `max` is "full", not a wrap-around.
    if max.saturating_sub(body.len()) < unit.len() {
        stats.oversize = true;
        return;
    }
    body.extend_from_slice(unit);
}

/// Appends a run of whole units (any CRLF inside `bytes` is one unit) with the
/// same result as calling [`emit`] on each unit in turn: when the run does not
/// fit, the largest prefix that ends on a unit boundary is written and the body
/// is marked oversize.
#[inline]
fn emit_run(body: &mut Vec<u8>, stats: &mut BodyStats, max: usize, bytes: &[u8]) {
    stats.bytes_out += bytes.len() as u64;
    if stats.oversize {
        return;
    }
    let room = max.saturating_sub(body.len());
    if bytes.len() <= room {
        body.extend_from_slice(bytes);
        return;
    }
    stats.oversize = true;
    // The unit that did not fit starts at `room`, or at `room - 1` when that
    // byte is the CR of a CRLF pair (`bytes[room]` exists: room < len).
    let mut fit = room;
    if fit > 0 && bytes[fit - 1] == b'\r' && bytes[fit] == b'\n' {
        fit -= 1;
    }
    body.extend_from_slice(&bytes[..fit]);
}

/// A CR turned out not to be followed by LF.
#[inline]
fn emit_bare_cr(body: &mut Vec<u8>, stats: &mut BodyStats, max: usize, normalize: bool) {
    stats.bare_cr += 1;
    let unit: &[u8] = if normalize { b"\r\n" } else { b"\r" };
    emit(body, stats, max, unit);
}

/// An LF not after a CR.
#[inline]
fn emit_bare_lf(body: &mut Vec<u8>, stats: &mut BodyStats, max: usize, normalize: bool) {
    stats.bare_lf += 1;
    let unit: &[u8] = if normalize { b"\r\n" } else { b"\n" };
    emit(body, stats, max, unit);
}
