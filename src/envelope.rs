//! The message as it crosses from the protocol to the spool: envelope, body,
//! the queue id the spool assigns, and the commit outcome it reports back.
//!
//! Plain data only. `proto` builds these values and `spool` stores them; neither
//! part needs the other's insides, only this file. Nothing here does I/O.

use std::fmt;
use std::str::FromStr;

/// A mailbox as the client wrote it inside `<...>`: `local@domain`.
///
/// `local` keeps its written form, quotes included (`"john doe"`), so the address
/// can be reproduced byte for byte. `domain` is a domain name or an address
/// literal in brackets (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mailbox {
    pub local: String,
    pub domain: String,
}

impl Mailbox {
    /// `local@domain`, exactly as written by the client.
    pub fn address(&self) -> String {
        let mut s = String::with_capacity(self.local.len() + 1 + self.domain.len());
        s.push_str(&self.local);
        s.push('@');
        s.push_str(&self.domain);
        s
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The reverse path of `MAIL FROM`: a mailbox or the null sender `<>` (bounces,
/// callout verification).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReversePath {
    Null,
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    /// The path with its angle brackets: `<>` or `<user@example.org>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// `BODY=` of `MAIL FROM` (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    BinaryMime,
}

impl BodyType {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
            BodyType::BinaryMime => "BINARYMIME",
        }
    }
}

/// The `MAIL FROM` parameters the server understood, as the client gave them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MailParams {
    /// `SIZE=n` (RFC 1870): the client's estimate, in bytes.
    pub size: Option<u64>,
    /// `BODY=`; `None` when the client did not say (7bit by RFC 5321).
    pub body: Option<BodyType>,
    /// `SMTPUTF8` (RFC 6531) was given: addresses may be UTF-8.
    pub smtputf8: bool,
}

/// A recipient `local+detail@domain` split at the configured delimiter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Detail {
    /// The local part before the delimiter (`user` of `user+tag`).
    pub base: String,
    /// The delimiter that split it (`+`).
    pub delimiter: char,
    /// What follows the delimiter (`tag`); may be empty (`user+@...`).
    pub tag: String,
}

/// One accepted recipient. Both forms are kept: the address as given and, when
/// the local part carried a detail, its base and tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Recipient {
    pub mailbox: Mailbox,
    pub detail: Option<Detail>,
}

impl Recipient {
    /// The address without its detail (`user@example.org` for
    /// `user+tag@example.org`); the address itself when there is none.
    pub fn base_address(&self) -> String {
        match &self.detail {
            Some(d) => format!("{}@{}", d.base, self.mailbox.domain),
            None => self.mailbox.address(),
        }
    }
}

/// Where the message came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientInfo {
    /// The peer: `192.0.2.7:41822`, `[2001:db8::7]:41822` or `unix:`.
    pub peer: String,
    /// The name the client gave in `LHLO`.
    pub lhlo: String,
}

/// Identifies one mail transaction of one connection, for logs and the spool
/// record: the connection's session id and the transaction's number in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId {
    pub session: u64,
    pub seq: u32,
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}.{}", self.session, self.seq)
    }
}

/// Everything known of a message except its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub reverse_path: ReversePath,
    pub params: MailParams,
    /// Accepted recipients in RCPT order, duplicates included: the server owes
    /// exactly one reply per entry after the data (RFC 2033 section 4.2).
    pub recipients: Vec<Recipient>,
    pub client: ClientInfo,
    pub transaction: TransactionId,
}

/// A complete message: envelope and the unstuffed body, stored once however many
/// recipients it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

/// The spool's answer for one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// On stable storage (write and fdatasync done); the id goes in each `250`.
    Committed(QueueId),
    /// The write or the sync failed; nothing is promised (`451 4.3.0`).
    Failed,
    /// The spool is full or at its size cap (`452 4.3.1`).
    StorageFull,
}

/// A unique, sortable message id, assigned by the spool when it commits a
/// message. Its text form is 26 characters of Crockford base32 (the ULID
/// alphabet), most significant first, so ids sort as text the same way they
/// sort as numbers. How the 128 bits are made (time, writer, sequence) is the
/// spool's business; see docs/SPOOL-FORMAT.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u128);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl QueueId {
    /// Length of the text form.
    pub const TEXT_LEN: usize = 26;

    /// Writes the 26-character text form into `out`.
    pub fn encode(self, out: &mut [u8; Self::TEXT_LEN]) {
        // 26 digits of 5 bits hold 130 bits; the first digit carries the top 3.
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (Self::TEXT_LEN - 1 - i);
            *slot = CROCKFORD[((self.0 >> shift) & 0x1f) as usize];
        }
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; Self::TEXT_LEN];
        self.encode(&mut buf);
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

/// Why a queue id's text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueIdError {
    #[error("a queue id has 26 characters, this one has {0}")]
    Length(usize),
    #[error("'{0}' is not a Crockford base32 digit (0-9, A-Z without I, L, O, U)")]
    Digit(char),
    #[error("the first digit of a queue id is at most 7 (128 bits)")]
    Overflow,
}

impl FromStr for QueueId {
    type Err = QueueIdError;

    /// Reads the text form; lower case is accepted, as are `I`/`L` for 1 and
    /// `O` for 0, as Crockford's alphabet allows.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != Self::TEXT_LEN {
            return Err(QueueIdError::Length(s.chars().count()));
        }
        let mut v: u128 = 0;
        for (i, c) in s.chars().enumerate() {
            let d = match c.to_ascii_uppercase() {
                c @ '0'..='9' => c as u32 - '0' as u32,
                'O' => 0,
                'I' | 'L' => 1,
                c => match CROCKFORD.iter().position(|&a| a as char == c) {
                    Some(p) => p as u32,
                    None => return Err(QueueIdError::Digit(c)),
                },
            };
            if i == 0 && d > 7 {
                return Err(QueueIdError::Overflow);
            }
            v = (v << 5) | d as u128;
        }
        Ok(QueueId(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_id_round_trips_and_sorts_as_text() {
        let ids = [0u128, 1, 31, 32, u64::MAX as u128, u128::MAX - 1, u128::MAX];
        let mut prev: Option<String> = None;
        for v in ids {
            let s = QueueId(v).to_string();
            assert_eq!(s.len(), QueueId::TEXT_LEN);
            assert_eq!(s.parse::<QueueId>().unwrap(), QueueId(v));
            if let Some(p) = prev {
                assert!(p < s, "{p} !< {s}");
            }
            prev = Some(s);
        }
        assert_eq!(QueueId(0).to_string(), "00000000000000000000000000");
        assert_eq!(QueueId(u128::MAX).to_string(), "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
    }

    #[test]
    fn queue_id_rejects_bad_text() {
        assert_eq!("abc".parse::<QueueId>(), Err(QueueIdError::Length(3)));
        assert_eq!(
            "8ZZZZZZZZZZZZZZZZZZZZZZZZZ".parse::<QueueId>(),
            Err(QueueIdError::Overflow)
        );
        assert_eq!(
            "0000000000000000000000000U".parse::<QueueId>(),
            Err(QueueIdError::Digit('U'))
        );
        assert_eq!(
            "0000000000000000000000000o".parse::<QueueId>(),
            Ok(QueueId(0))
        );
    }

    #[test]
    fn addresses_print_as_written() {
        let r = Recipient {
            mailbox: Mailbox {
                local: "user+tag".into(),
                domain: "example.org".into(),
            },
            detail: Some(Detail {
                base: "user".into(),
                delimiter: '+',
                tag: "tag".into(),
            }),
        };
        assert_eq!(r.mailbox.address(), "user+tag@example.org");
        assert_eq!(r.base_address(), "user@example.org");
        assert_eq!(ReversePath::Null.to_string(), "<>");
    }
}
