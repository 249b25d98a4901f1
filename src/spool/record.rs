//! The record: one committed message (envelope and body) as bytes in a
//! segment. Encoding, decoding and the checks on both.
//!
//! Layout (all integers little-endian; docs/SPOOL-FORMAT.md is the reference):
//!
//! ```text
//! 0   magic "LSPR"        4     24  queue id u128      16
//! 4   format version u16  2     40  received_at µs u64  8
//! 6   flags u16 (0)       2     48  envelope_len u32    4
//! 8   record_len u32      4     52  recipient count u32 4
//! 12  crc32c u32          4     56  body_len u64        8
//! 16  sequence u64        8     64  envelope, then body
//! ```
//!
//! `record_len = 64 + envelope_len + body_len`; the record is followed by zero
//! padding to a multiple of 8. The CRC32C covers bytes `[0, 12)` and
//! `[16, record_len)`: everything but itself and the padding. A header of 16
//! zero bytes marks the end of the written part of a segment (segments are
//! pre-zeroed).
//!
//! This file does no I/O. Invariant (TigerBeetle style): [`encode`] decodes
//! what it wrote before returning, and every reader decodes through [`parse`],
//! which checks the CRC and every length before anything is used.

mod envelope_bytes;

use crate::envelope::{Envelope, Message, QueueId};
use envelope_bytes::{Build, Same, Sound, Visit};

use super::stage::RecordOut;

/// First four bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"LSPR";
/// The record format this code writes and reads.
pub const RECORD_VERSION: u16 = 1;
/// Size of the fixed record header.
pub const RECORD_HEADER_LEN: usize = 64;
/// Records start on multiples of this.
pub const RECORD_ALIGN: usize = 8;
/// Largest record: `record_len` is a u32.
pub const RECORD_BYTES_MAX: usize = u32::MAX as usize;

/// Why bytes are not a sound record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("bad magic {0:02x?} (not the start of a record)")]
    Magic([u8; 4]),
    #[error("record format version {0}, this program reads version 1")]
    Version(u16),
    #[error("record length {0} is impossible (header is 64 bytes, or runs past the segment)")]
    Length(u64),
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("envelope is malformed: {0}")]
    Envelope(&'static str),
    #[error("message too large for one record ({0} bytes; the limit is 4 GiB)")]
    TooLarge(usize),
}

/// The fixed fields of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: u64,
    pub queue_id: QueueId,
    /// When the session finished receiving the data, microseconds since the
    /// Unix epoch.
    pub received_at_us: u64,
    pub recipients: u32,
    pub envelope_len: u32,
    pub body_len: u64,
}

/// A checked record, borrowed from the bytes it was parsed from.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub header: RecordHeader,
    pub envelope_bytes: &'a [u8],
    pub body: &'a [u8],
}

impl RecordView<'_> {
    /// Decodes the envelope (already known to be well-formed by [`parse`]).
    pub fn envelope(&self) -> Envelope {
        let mut b = Build::new();
        envelope_bytes::walk(self.envelope_bytes, self.header.recipients, &mut b)
            .expect("parse() checked the envelope");
        b.0
    }
}

/// What [`parse`] found at the start of a buffer.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// A sound record and its padded length (where the next one starts).
    Record(RecordView<'a>, usize),
    /// 16 zero bytes: nothing was written here.
    End,
    /// Not a sound record: torn, corrupt, or not a record at all.
    Invalid(RecordError),
    /// The buffer ends inside the record; `needed` bytes are required.
    Short { needed: usize },
}

/// Padded length of a record of `record_len` bytes.
pub fn padded_len(record_len: usize) -> usize {
    record_len.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// The record checksum of `rec` (a whole record, `record_len` bytes):
/// CRC32C over bytes `[0, 12)` then `[16, record_len)`, as SPOOL-FORMAT.md
/// describes. Public for tools and the fuzz target that build records.
pub fn checksum(rec: &[u8]) -> u32 {
    crc_of(rec)
}

fn crc_of(rec: &[u8]) -> u32 {
    let c = crc32c::crc32c(&rec[..12]);
    crc32c::crc32c_append(c, &rec[16..])
}

/// Appends the record of `msg` to `out`, padded to [`RECORD_ALIGN`], and
/// returns its padded length. The record is parsed back and compared with its
/// inputs before this returns (panics if that fails: a broken invariant).
pub fn encode(
    out: &mut impl RecordOut,
    seq: u64,
    queue_id: QueueId,
    received_at_us: u64,
    msg: &Message,
) -> Result<usize, RecordError> {
    let start = out.len();
    out.set_len_zeroed(start + RECORD_HEADER_LEN);
    envelope_bytes::encode(out, &msg.envelope);
    let envelope_len = out.len() - start - RECORD_HEADER_LEN;
    let record_len = RECORD_HEADER_LEN as u64 + envelope_len as u64 + msg.body.len() as u64;
    // On error nothing of this record stays in `out`.
    let recipients = u32::try_from(msg.envelope.recipients.len());
    if record_len > RECORD_BYTES_MAX as u64 || envelope_len > u32::MAX as usize {
        out.set_len_zeroed(start);
        return Err(RecordError::TooLarge(record_len as usize));
    }
    let Ok(recipients) = recipients else {
        out.set_len_zeroed(start);
        return Err(RecordError::TooLarge(record_len as usize));
    };
    out.put(&msg.body);
    {
        let h = &mut out[start..start + RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&RECORD_MAGIC);
        h[4..6].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&0u16.to_le_bytes());
        h[8..12].copy_from_slice(&(record_len as u32).to_le_bytes());
        h[16..24].copy_from_slice(&seq.to_le_bytes());
        h[24..40].copy_from_slice(&queue_id.0.to_le_bytes());
        h[40..48].copy_from_slice(&received_at_us.to_le_bytes());
        h[48..52].copy_from_slice(&(envelope_len as u32).to_le_bytes());
        h[52..56].copy_from_slice(&recipients.to_le_bytes());
        h[56..64].copy_from_slice(&(msg.body.len() as u64).to_le_bytes());
    }
    let crc = crc_of(&out[start..]);
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    let padded = padded_len(record_len as usize);
    out.set_len_zeroed(start + padded);

    // Check the record right before it is written: it must parse back to
    // exactly what was asked for. Its checksum is not computed again: it was
    // computed just above over the same bytes (the range is the same
    // `crc_of`; `any_message_round_trips` parses with the check), and a
    // second pass over the body was about 1% of the server's CPU at 64
    // pipelined connections (docs/BENCHMARKS.md, "Fourth session").
    // The envelope's one checking walk compares it, field by field, with the
    // message's, allocating nothing.
    let mut same = Same::new(&msg.envelope);
    match parse_with(&out[start..], false, &mut same) {
        Parsed::Record(v, len) => {
            assert_eq!(len, padded);
            assert_eq!(v.header.seq, seq);
            assert_eq!(v.header.queue_id, queue_id);
            assert_eq!(v.header.received_at_us, received_at_us);
            assert_eq!(v.body.len(), msg.body.len());
            assert!(same.matched(), "envelope did not round-trip");
        }
        other => panic!("record just encoded does not parse: {other:?}"),
    }
    Ok(padded)
}

/// Parses the record at the start of `buf`, checking magic, version, lengths,
/// checksum and envelope structure.
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    parse_with(buf, true, &mut Sound)
}

/// [`parse`], with the checksum verified only if `verify_crc`, and the
/// envelope's fields handed to `v` as its checking walk reads them.
fn parse_with<'a>(buf: &'a [u8], verify_crc: bool, v: &mut impl Visit<'a>) -> Parsed<'a> {
    if buf.len() < 16 {
        if buf.iter().all(|&b| b == 0) {
            return Parsed::End;
        }
        return Parsed::Short { needed: 16 };
    }
    if buf[..16].iter().all(|&b| b == 0) {
        return Parsed::End;
    }
    let magic: [u8; 4] = buf[0..4].try_into().expect("4 bytes");
    if magic != RECORD_MAGIC {
        return Parsed::Invalid(RecordError::Magic(magic));
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version != RECORD_VERSION {
        return Parsed::Invalid(RecordError::Version(version));
    }
    let record_len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
    if record_len < RECORD_HEADER_LEN {
        return Parsed::Invalid(RecordError::Length(record_len as u64));
    }
    if buf.len() < record_len {
        return Parsed::Short { needed: record_len };
    }
    let rec = &buf[..record_len];
    if verify_crc {
        let stored = u32::from_le_bytes(rec[12..16].try_into().expect("4 bytes"));
        let computed = crc_of(rec);
        if stored != computed {
            return Parsed::Invalid(RecordError::Checksum { stored, computed });
        }
    }
    let u64_at = |o: usize| u64::from_le_bytes(rec[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(rec[o..o + 4].try_into().expect("4 bytes"));
    let header = RecordHeader {
        seq: u64_at(16),
        queue_id: QueueId(u128::from_le_bytes(rec[24..40].try_into().expect("16"))),
        received_at_us: u64_at(40),
        envelope_len: u32_at(48),
        recipients: u32_at(52),
        body_len: u64_at(56),
    };
    let env_end = RECORD_HEADER_LEN as u64 + header.envelope_len as u64;
    if env_end + header.body_len != record_len as u64 {
        return Parsed::Invalid(RecordError::Length(record_len as u64));
    }
    let envelope_bytes = &rec[RECORD_HEADER_LEN..env_end as usize];
    if let Err(e) = envelope_bytes::walk(envelope_bytes, header.recipients, v) {
        return Parsed::Invalid(e);
    }
    let view = RecordView {
        header,
        envelope_bytes,
        body: &rec[env_end as usize..],
    };
    Parsed::Record(view, padded_len(record_len))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::envelope::{
        BodyType, ClientInfo, Detail, MailParams, Mailbox, Recipient, ReversePath, TransactionId,
    };

    pub(crate) fn sample_message(n: usize, body_len: usize) -> Message {
        let mut recipients = vec![Recipient {
            mailbox: Mailbox {
                local: format!("user{n}+tag"),
                domain: "example.org".into(),
            },
            detail: Some(Detail {
                base: format!("user{n}"),
                delimiter: '+',
                tag: "tag".into(),
            }),
        }];
        recipients.push(Recipient {
            mailbox: Mailbox {
                local: "\"john doe\"".into(),
                domain: "[IPv6:2001:db8::1]".into(),
            },
            detail: None,
        });
        let body: Vec<u8> = (0..body_len).map(|i| (i * 7 + n) as u8).collect();
        Message {
            envelope: Envelope {
                reverse_path: ReversePath::Mailbox(Mailbox {
                    local: "sender".into(),
                    domain: "example.net".into(),
                }),
                params: MailParams {
                    size: Some(body_len as u64),
                    body: Some(BodyType::EightBitMime),
                    smtputf8: n % 2 == 0,
                },
                recipients,
                client: ClientInfo {
                    peer: "192.0.2.7:41822".into(),
                    lhlo: "mx.example.net".into(),
                },
                transaction: TransactionId {
                    session: 0xdead_beef,
                    seq: n as u32,
                },
            },
            body,
        }
    }

    #[test]
    fn round_trip_checked_before_write_and_after_read() {
        for (n, len) in [(0, 0), (1, 1), (2, 7), (3, 4096), (4, 65_537)] {
            let msg = sample_message(n, len);
            let mut buf = vec![0xAA; 3]; // encode appends
            let padded = encode(&mut buf, 42 + n as u64, QueueId(7 << 90), 123_456, &msg).unwrap();
            assert_eq!(buf.len(), 3 + padded);
            assert_eq!(padded % RECORD_ALIGN, 0);
            match parse(&buf[3..]) {
                Parsed::Record(v, l) => {
                    assert_eq!(l, padded);
                    assert_eq!(v.header.seq, 42 + n as u64);
                    assert_eq!(v.header.queue_id, QueueId(7 << 90));
                    assert_eq!(v.envelope(), msg.envelope);
                    assert_eq!(v.body, &msg.body[..]);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn null_sender_and_no_params_round_trip() {
        let mut msg = sample_message(1, 10);
        msg.envelope.reverse_path = ReversePath::Null;
        msg.envelope.params = MailParams::default();
        msg.envelope.recipients[0].detail = Some(Detail {
            base: "u".into(),
            delimiter: 'é',
            tag: String::new(),
        });
        let mut buf = Vec::new();
        encode(&mut buf, 1, QueueId(1), 0, &msg).unwrap();
        let Parsed::Record(v, _) = parse(&buf) else {
            panic!()
        };
        assert_eq!(v.envelope(), msg.envelope);
    }

    #[test]
    fn a_size_value_without_size_given_is_invalid() {
        // The encoder writes 0 there; anything else would not survive a
        // decode and re-encode, so the reader refuses it.
        let mut msg = sample_message(1, 10);
        msg.envelope.reverse_path = ReversePath::Null;
        msg.envelope.params = MailParams::default();
        let mut buf = Vec::new();
        encode(&mut buf, 1, QueueId(1), 0, &msg).unwrap();
        // Header 64, session 8, transaction 4, null tag 1: has_size at 77.
        assert_eq!(buf[77], 0);
        buf[78] = 39;
        let len = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
        let crc = checksum(&buf[..len]);
        buf[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            parse(&buf),
            Parsed::Invalid(RecordError::Envelope("SIZE value without SIZE given"))
        ));
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_detected() {
        let msg = sample_message(5, 100);
        let mut buf = Vec::new();
        let padded = encode(&mut buf, 9, QueueId(99), 1, &msg).unwrap();
        let record_len = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
        for byte in 0..record_len {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    !matches!(parse(&b), Parsed::Record(..)),
                    "flip at byte {byte} bit {bit} not detected"
                );
            }
        }
        for cut in 0..record_len {
            let mut b = buf[..cut].to_vec();
            // A torn write leaves zeros (pre-zeroed segment) after the cut.
            b.resize(padded, 0);
            assert!(
                !matches!(parse(&b), Parsed::Record(..)),
                "truncation at {cut} not detected"
            );
        }
    }

    mod prop {
        use super::super::*;
        use crate::envelope::*;
        use proptest::prelude::*;

        fn mailbox() -> impl Strategy<Value = Mailbox> {
            (".{0,40}", ".{0,40}").prop_map(|(local, domain)| Mailbox { local, domain })
        }

        fn recipient() -> impl Strategy<Value = Recipient> {
            (
                mailbox(),
                proptest::option::of((".{0,20}", any::<char>(), ".{0,20}")),
            )
                .prop_map(|(mailbox, d)| Recipient {
                    mailbox,
                    detail: d.map(|(base, delimiter, tag)| Detail {
                        base,
                        delimiter,
                        tag,
                    }),
                })
        }

        fn message() -> impl Strategy<Value = Message> {
            (
                proptest::option::of(mailbox()),
                proptest::option::of(any::<u64>()),
                0u8..4,
                any::<bool>(),
                proptest::collection::vec(recipient(), 0..8),
                (".{0,30}", ".{0,30}", any::<u64>(), any::<u32>()),
                proptest::collection::vec(any::<u8>(), 0..2000),
            )
                .prop_map(|(rp, size, body_type, smtputf8, recipients, c, body)| {
                    Message {
                        envelope: Envelope {
                            reverse_path: rp.map_or(ReversePath::Null, ReversePath::Mailbox),
                            params: MailParams {
                                size,
                                body: [
                                    None,
                                    Some(BodyType::SevenBit),
                                    Some(BodyType::EightBitMime),
                                    Some(BodyType::BinaryMime),
                                ][body_type as usize],
                                smtputf8,
                            },
                            recipients,
                            client: ClientInfo {
                                peer: c.0,
                                lhlo: c.1,
                            },
                            transaction: TransactionId {
                                session: c.2,
                                seq: c.3,
                            },
                        },
                        body,
                    }
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]
            #[test]
            fn any_message_round_trips(
                m in message(),
                seq in any::<u64>(),
                id in any::<u128>(),
                at in any::<u64>(),
            ) {
                let mut buf = Vec::new();
                let len = encode(&mut buf, seq, QueueId(id), at, &m).unwrap();
                let Parsed::Record(v, l) = parse(&buf) else {
                    panic!("does not parse")
                };
                prop_assert_eq!(l, len);
                prop_assert_eq!(v.header.seq, seq);
                prop_assert_eq!(v.header.queue_id, QueueId(id));
                prop_assert_eq!(v.header.received_at_us, at);
                prop_assert_eq!(v.envelope(), m.envelope);
                prop_assert_eq!(v.body, &m.body[..]);
            }

            #[test]
            fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = parse(&bytes);
            }

            /// Damage to a sound record (any bytes overwritten, any cut) is
            /// either detected or, if the bytes happen to be rewritten to what
            /// they were, harmless; parsing never panics.
            #[test]
            fn damaged_records_are_rejected_without_panic(
                m in message(),
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut buf = Vec::new();
                encode(&mut buf, 1, QueueId(2), 3, &m).unwrap();
                let record_len = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
                let original = buf.clone();
                for (at, v) in &edits {
                    let i = at.index(record_len);
                    buf[i] = *v;
                }
                if buf[..record_len] != original[..record_len] {
                    prop_assert!(!matches!(parse(&buf), Parsed::Record(..)));
                }
                let _ = parse(&original[..cut.index(original.len())]);
            }
        }
    }

    #[test]
    fn crc32c_is_castagnoli_as_documented() {
        // The check value docs/SPOOL-FORMAT.md gives readers.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn zeros_are_the_end_and_garbage_is_invalid() {
        assert!(matches!(parse(&[0u8; 64]), Parsed::End));
        assert!(matches!(parse(&[]), Parsed::End));
        assert!(matches!(parse(&[0xFFu8; 64]), Parsed::Invalid(_)));
        let mut huge = [0u8; 64];
        huge[0..4].copy_from_slice(&RECORD_MAGIC);
        huge[4..6].copy_from_slice(&1u16.to_le_bytes());
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&huge), Parsed::Short { .. }));
    }
}
