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
//! Must not: do I/O, allocate beyond the caller's body buffer, or write more
//! than `body_bytes_max` bytes into it. Input may be split anywhere, so the
//! state between calls is a handful of flags, never buffered input.
//!
//! This file holds the byte-at-a-time reference engine ([`NaiveUnstuffer`],
//! [`NaiveScanner`]): the oracle the fast engine is tested against and the
//! baseline the benchmark compares with.

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

/// Where the byte-loop engine stands between two bytes.
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

/// Appends `bytes` to the body unless that would pass `max`; from the first
/// refusal on, the body is marked oversize and nothing more is written.
#[inline]
fn emit(body: &mut Vec<u8>, stats: &mut BodyStats, max: usize, bytes: &[u8]) {
    stats.bytes_out += bytes.len() as u64;
    if stats.oversize {
        return;
    }
    // Written as `room < len` so it cannot overflow (body.len() <= max always).
    if max - body.len() < bytes.len() {
        stats.oversize = true;
        return;
    }
    body.extend_from_slice(bytes);
}

/// The byte-at-a-time DATA unstuffer: obviously right, slow. See the module
/// docs for the rules.
#[derive(Clone, Debug)]
pub struct NaiveUnstuffer {
    state: State,
    normalize: bool,
    body_bytes_max: usize,
    stats: BodyStats,
}

impl NaiveUnstuffer {
    pub fn new(normalize: bool, body_bytes_max: usize) -> Self {
        NaiveUnstuffer {
            state: State::LineStart,
            normalize,
            body_bytes_max,
            stats: BodyStats::default(),
        }
    }

    pub fn stats(&self) -> &BodyStats {
        &self.stats
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn bare_cr(&mut self, body: &mut Vec<u8>) {
        self.stats.bare_cr += 1;
        let out: &[u8] = if self.normalize { b"\r\n" } else { b"\r" };
        emit(body, &mut self.stats, self.body_bytes_max, out);
    }

    /// A byte inside a line (state `Mid`).
    fn mid(&mut self, b: u8, body: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                self.stats.bare_lf += 1;
                let out: &[u8] = if self.normalize { b"\r\n" } else { b"\n" };
                emit(body, &mut self.stats, self.body_bytes_max, out);
                self.state = State::Mid;
            }
            _ => {
                if b == 0 {
                    self.stats.nul += 1;
                }
                emit(body, &mut self.stats, self.body_bytes_max, &[b]);
                self.state = State::Mid;
            }
        }
    }

    /// A byte after a pending CR (state `Cr`).
    fn after_cr(&mut self, b: u8, body: &mut Vec<u8>) {
        match b {
            b'\n' => {
                emit(body, &mut self.stats, self.body_bytes_max, b"\r\n");
                self.state = State::LineStart;
            }
            b'\r' => {
                self.bare_cr(body);
                self.state = State::Cr;
            }
            _ => {
                self.bare_cr(body);
                self.mid(b, body);
            }
        }
    }

    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Feed {
        for (i, &b) in input.iter().enumerate() {
            match self.state {
                State::Done => {
                    return Feed {
                        consumed: i,
                        done: true,
                    };
                }
                State::LineStart => {
                    if b == b'.' {
                        self.state = State::Dot;
                    } else {
                        self.mid(b, body);
                    }
                }
                State::Mid => self.mid(b, body),
                State::Cr => self.after_cr(b, body),
                State::Dot => {
                    if b == b'\r' {
                        self.state = State::DotCr;
                    } else {
                        self.stats.dots_removed += 1;
                        self.mid(b, body);
                    }
                }
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::Done;
                    } else {
                        self.stats.dots_removed += 1;
                        self.state = State::Cr;
                        self.after_cr(b, body);
                    }
                }
            }
            self.stats.bytes_in += 1;
        }
        Feed {
            consumed: input.len(),
            done: self.state == State::Done,
        }
    }
}

/// The byte-at-a-time BDAT content scanner: no dots, no terminator; counts and
/// (optionally) normalizes bare CR / bare LF and counts NUL across chunks.
#[derive(Clone, Debug)]
pub struct NaiveScanner {
    inner: NaiveUnstuffer,
}

impl NaiveScanner {
    pub fn new(normalize: bool, body_bytes_max: usize) -> Self {
        let mut inner = NaiveUnstuffer::new(normalize, body_bytes_max);
        inner.state = State::Mid;
        NaiveScanner { inner }
    }

    pub fn stats(&self) -> &BodyStats {
        &self.inner.stats
    }

    /// Takes all of `input`.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) {
        for &b in input {
            match self.inner.state {
                State::Cr => self.inner.after_cr(b, body),
                _ => self.inner.mid(b, body),
            }
            // A CRLF puts the unstuffer at line start; content has no lines.
            if self.inner.state == State::LineStart {
                self.inner.state = State::Mid;
            }
            self.inner.stats.bytes_in += 1;
        }
    }

    /// The last chunk has been fed: a CR still pending at the very end is bare.
    pub fn finish(&mut self, body: &mut Vec<u8>) {
        if self.inner.state == State::Cr {
            self.inner.bare_cr(body);
            self.inner.state = State::Mid;
        }
    }
}

/// The engine the session uses for DATA. For now the reference engine; the
/// memchr engine replaces it behind the same methods.
pub type Unstuffer = NaiveUnstuffer;
/// The engine the session uses for BDAT content.
pub type ChunkScanner = NaiveScanner;

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], normalize: bool) -> (Feed, Vec<u8>, BodyStats) {
        let mut u = NaiveUnstuffer::new(normalize, usize::MAX);
        let mut body = Vec::new();
        let f = u.feed(input, &mut body);
        (f, body, *u.stats())
    }

    #[test]
    fn plain_body_and_terminator() {
        let (f, body, st) = run(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n", false);
        assert!(f.done);
        assert_eq!(f.consumed, 24);
        assert_eq!(body, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(st.bytes_in, 24);
    }

    #[test]
    fn empty_body() {
        let (f, body, _) = run(b".\r\nNOOP", false);
        assert_eq!(
            f,
            Feed {
                consumed: 3,
                done: true
            }
        );
        assert!(body.is_empty());
    }

    #[test]
    fn stuffed_dots_removed_only_after_crlf() {
        let (f, body, st) = run(b"..a\r\n..\r\n.b\nx.\r\n.\r\n", false);
        assert!(f.done);
        assert_eq!(body, b".a\r\n.\r\nb\nx.\r\n");
        assert_eq!(st.dots_removed, 3);
        assert_eq!(st.bare_lf, 1);
    }
}
