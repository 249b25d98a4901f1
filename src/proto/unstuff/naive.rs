//! The byte-at-a-time reference engines: [`NaiveUnstuffer`] (DATA) and
//! [`NaiveScanner`] (BDAT content).
//!
//! Job: be obviously right. One `match` per input byte, one output unit per
//! `emit`. These engines define the contract (see the parent module): the fast
//! engines are tested and fuzzed against them, and the benchmark uses them as
//! the baseline.
//!
//! Must not: be clever. Speed belongs in `fast.rs`; a change here changes the
//! contract and must be matched there.
//!
//! Invariants: the state never holds input bytes other than a pending CR or a
//! pending line-start dot (`Cr`, `Dot`, `DotCr`); `body.len() <= body_bytes_max`
//! after every call when the body started within the limit.

use super::{BodyStats, Feed, State, emit, emit_bare_cr, emit_bare_lf};

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
        emit_bare_cr(body, &mut self.stats, self.body_bytes_max, self.normalize);
    }

    /// A byte inside a line (state `Mid`).
    fn mid(&mut self, b: u8, body: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                emit_bare_lf(body, &mut self.stats, self.body_bytes_max, self.normalize);
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

    /// A body buffer that already holds more than the limit is full: no
    /// write, no wrap-around of `max - len` (which a release build would
    /// have turned into "unlimited" before the room check saturated).
    #[test]
    fn prefilled_body_past_the_limit_is_full() {
        let mut u = NaiveUnstuffer::new(false, 2);
        let mut body = b"prefix".to_vec();
        let f = u.feed(b"abc\r\n.\r\n", &mut body);
        assert!(f.done);
        assert_eq!(body, b"prefix");
        assert!(u.stats().oversize);
        assert_eq!(u.stats().bytes_out, 5);
    }
}
