//! What one driver thread counts: messages, recipients, bytes, refusals by
//! reply code, latencies. One per thread, merged at the end, so the hot path
//! touches no shared memory.
//!
//! Must not: allocate per message (refusals are counted in a fixed array
//! indexed by reply code).

use std::time::Instant;

use super::hist::LatencyHist;

/// Reply codes are three digits with a first digit of 1 to 5 (RFC 5321
/// section 4.2); the array covers 0..600.
const CODES: usize = 600;

pub struct Tally {
    /// Messages with at least one recipient delivered (what the server stored).
    pub messages: u64,
    /// Messages with at least one recipient not delivered.
    pub messages_failed: u64,
    /// Recipients that got a 2xx after the data.
    pub recipients: u64,
    /// Message bytes (as stored, before dot-stuffing) of delivered messages.
    pub bytes: u64,
    /// Recipients not delivered, by the code of the reply that refused them
    /// (MAIL, RCPT, DATA or the per-recipient reply after the data).
    pub failures: [u64; CODES],
    /// From the final dot's write to the last per-recipient reply.
    pub latency: LatencyHist,
    /// With `--rate`: from the message's scheduled start to its last reply
    /// (includes any wait for a free connection: no coordinated omission).
    pub latency_scheduled: LatencyHist,
    /// Connections the server ended with a 421.
    pub connections_closed: u64,
    /// When the last message finished.
    pub last_done: Option<Instant>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            messages: 0,
            messages_failed: 0,
            recipients: 0,
            bytes: 0,
            failures: [0; CODES],
            latency: LatencyHist::new(),
            latency_scheduled: LatencyHist::new(),
            connections_closed: 0,
            last_done: None,
        }
    }
}

impl Tally {
    /// `n` recipients refused with `code` (a checked 1xx-5xx code).
    pub fn fail(&mut self, code: u16, n: u64) {
        self.failures[code as usize % CODES] += n;
    }

    /// (code, count) for every code that refused something, ascending.
    pub fn failures_by_code(&self) -> Vec<(u16, u64)> {
        (0..CODES)
            .filter(|&c| self.failures[c] != 0)
            .map(|c| (c as u16, self.failures[c]))
            .collect()
    }

    pub fn merge(&mut self, o: &Tally) {
        self.messages += o.messages;
        self.messages_failed += o.messages_failed;
        self.recipients += o.recipients;
        self.bytes += o.bytes;
        for (a, b) in self.failures.iter_mut().zip(o.failures.iter()) {
            *a += b;
        }
        self.latency.merge(&o.latency);
        self.latency_scheduled.merge(&o.latency_scheduled);
        self.connections_closed += o.connections_closed;
        self.last_done = match (self.last_done, o.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sums_and_lists_codes() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        a.messages = 3;
        a.fail(451, 2);
        b.messages = 4;
        b.fail(451, 1);
        b.fail(552, 5);
        a.merge(&b);
        assert_eq!(a.messages, 7);
        assert_eq!(a.failures_by_code(), vec![(451, 3), (552, 5)]);
    }
}
