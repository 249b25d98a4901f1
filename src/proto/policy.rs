//! The recipient policy: the question asked at each RCPT.
//!
//! The session consults a [`RecipientPolicy`] before it accepts a recipient, so
//! it can answer truthfully (MTAs verify recipients with callouts). The default
//! accepts everyone; tables and domain lists plug in behind the same trait.
//!
//! Must not: block. Implementations are called on a shard thread for every
//! RCPT: an in-memory lookup, never a file or network read.

use crate::envelope::Recipient;

/// The answer for one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RcptVerdict {
    /// `250 2.1.5`.
    Accept,
    /// `550 5.1.1 <addr> User unknown`.
    Unknown,
    /// `451 4.3.0`: the policy cannot answer now; the client retries later.
    TempFail,
}

/// Decides whether a recipient is accepted. `Send + Sync`: one policy is
/// shared by every session on every shard.
pub trait RecipientPolicy: Send + Sync {
    fn check(&self, rcpt: &Recipient) -> RcptVerdict;
}

/// Accepts every syntactically valid recipient. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcceptAll;

impl RecipientPolicy for AcceptAll {
    fn check(&self, _rcpt: &Recipient) -> RcptVerdict {
        RcptVerdict::Accept
    }
}
