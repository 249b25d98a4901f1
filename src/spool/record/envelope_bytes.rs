//! The envelope's bytes inside a record: encoding, and decoding without
//! allocating.
//!
//! Why: every record is decoded more often than it is written (the writer's
//! check right after encoding, recovery, `spool verify`, export, followers),
//! and most of those decodes only need to know that the envelope is sound, or
//! whether it equals one in memory. Decoding into an owned [`Envelope`]
//! allocates two strings per recipient; at fifty recipients the writer's
//! check did that twice per message (docs/BENCHMARKS.md, "Fifth session").
//!
//! How: one walk over the bytes ([`walk`]) checks every length, tag and
//! string, and hands each field, borrowed, to a [`Visit`]or: [`Sound`] keeps
//! nothing, [`Build`] makes the owned envelope, [`Same`] compares with one.
//!
//! Layout (little-endian; `str` is a u32 byte length then UTF-8): session
//! u64, transaction seq u32, reverse-path tag u8 (0 `<>`, 1 mailbox) [local
//! str, domain str], has_size u8, size u64, body type u8 (0 unset, 1 7BIT, 2
//! 8BITMIME, 3 BINARYMIME), smtputf8 u8, peer str, lhlo str, then per
//! recipient: local str, domain str, has_detail u8 [delimiter u32 (a Unicode
//! scalar), base str, tag str].

use super::RecordError;
use crate::envelope::{
    BodyType, ClientInfo, Detail, Envelope, MailParams, Mailbox, Recipient, ReversePath,
    TransactionId,
};
use crate::spool::stage::RecordOut;

fn put_str(out: &mut impl RecordOut, s: &str) {
    out.put(&(s.len() as u32).to_le_bytes());
    out.put(s.as_bytes());
}

/// Appends the bytes of `e` to `out`.
pub(super) fn encode(out: &mut impl RecordOut, e: &Envelope) {
    out.put(&e.transaction.session.to_le_bytes());
    out.put(&e.transaction.seq.to_le_bytes());
    match &e.reverse_path {
        ReversePath::Null => out.put(&[0]),
        ReversePath::Mailbox(m) => {
            out.put(&[1]);
            put_str(out, &m.local);
            put_str(out, &m.domain);
        }
    }
    out.put(&[e.params.size.is_some() as u8]);
    out.put(&e.params.size.unwrap_or(0).to_le_bytes());
    out.put(&[match e.params.body {
        None => 0,
        Some(BodyType::SevenBit) => 1,
        Some(BodyType::EightBitMime) => 2,
        Some(BodyType::BinaryMime) => 3,
    }]);
    out.put(&[e.params.smtputf8 as u8]);
    put_str(out, &e.client.peer);
    put_str(out, &e.client.lhlo);
    for r in &e.recipients {
        put_str(out, &r.mailbox.local);
        put_str(out, &r.mailbox.domain);
        match &r.detail {
            None => out.put(&[0]),
            Some(d) => {
                out.put(&[1]);
                out.put(&(d.delimiter as u32).to_le_bytes());
                put_str(out, &d.base);
                put_str(out, &d.tag);
            }
        }
    }
}

/// A recipient's detail as it lies in the record: delimiter, base, tag.
pub(super) type DetailRef<'a> = (char, &'a str, &'a str);

/// Receives an envelope's fields in record order, borrowed from its bytes.
/// Called only with fields that passed their checks; [`walk`] fails before
/// handing out anything malformed, but may already have handed out the
/// fields before it.
pub(super) trait Visit<'a> {
    fn transaction(&mut self, t: TransactionId);
    /// `None`: the null reverse-path `<>`; else (local, domain).
    fn reverse_path(&mut self, mailbox: Option<(&'a str, &'a str)>);
    fn params(&mut self, params: MailParams);
    fn client(&mut self, peer: &'a str, lhlo: &'a str);
    /// How many recipients follow (bounded by the envelope's size already).
    fn recipients(&mut self, _count: usize) {}
    fn recipient(&mut self, local: &'a str, domain: &'a str, detail: Option<DetailRef<'a>>);
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Envelope("truncated"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn flag(&mut self) -> Result<bool, RecordError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(RecordError::Envelope("flag byte is neither 0 nor 1")),
        }
    }
    fn str(&mut self) -> Result<&'a str, RecordError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b).map_err(|_| RecordError::Envelope("string is not UTF-8"))
    }
}

/// Checks the envelope bytes `buf` (with `recipients` recipients, from the
/// record's header) and hands each field to `v`.
pub(super) fn walk<'a>(
    buf: &'a [u8],
    recipients: u32,
    v: &mut impl Visit<'a>,
) -> Result<(), RecordError> {
    let mut c = Cursor { buf };
    v.transaction(TransactionId {
        session: c.u64()?,
        seq: c.u32()?,
    });
    match c.u8()? {
        0 => v.reverse_path(None),
        1 => {
            let local = c.str()?;
            let domain = c.str()?;
            v.reverse_path(Some((local, domain)));
        }
        _ => return Err(RecordError::Envelope("unknown reverse-path tag")),
    }
    let has_size = c.flag()?;
    let size = c.u64()?;
    // One encoding per envelope: a value with no SIZE= would vanish when
    // the record is decoded and written again (found by the `record` fuzz
    // target).
    if !has_size && size != 0 {
        return Err(RecordError::Envelope("SIZE value without SIZE given"));
    }
    let body = match c.u8()? {
        0 => None,
        1 => Some(BodyType::SevenBit),
        2 => Some(BodyType::EightBitMime),
        3 => Some(BodyType::BinaryMime),
        _ => return Err(RecordError::Envelope("unknown BODY= type")),
    };
    let smtputf8 = c.flag()?;
    v.params(MailParams {
        size: has_size.then_some(size),
        body,
        smtputf8,
    });
    let peer = c.str()?;
    let lhlo = c.str()?;
    v.client(peer, lhlo);
    // Each recipient takes at least 9 bytes: a bound that bad input cannot
    // inflate (Build allocates from it).
    if recipients as usize > c.buf.len() / 9 {
        return Err(RecordError::Envelope(
            "recipient count exceeds envelope size",
        ));
    }
    v.recipients(recipients as usize);
    for _ in 0..recipients {
        let local = c.str()?;
        let domain = c.str()?;
        let detail = if c.flag()? {
            let delimiter = char::from_u32(c.u32()?)
                .ok_or(RecordError::Envelope("detail delimiter is not a character"))?;
            Some((delimiter, c.str()?, c.str()?))
        } else {
            None
        };
        v.recipient(local, domain, detail);
    }
    if !c.buf.is_empty() {
        return Err(RecordError::Envelope("bytes left after the last recipient"));
    }
    Ok(())
}

/// Keeps nothing: [`walk`] with it only checks.
pub(super) struct Sound;

impl<'a> Visit<'a> for Sound {
    fn transaction(&mut self, _: TransactionId) {}
    fn reverse_path(&mut self, _: Option<(&'a str, &'a str)>) {}
    fn params(&mut self, _: MailParams) {}
    fn client(&mut self, _: &'a str, _: &'a str) {}
    fn recipient(&mut self, _: &'a str, _: &'a str, _: Option<DetailRef<'a>>) {}
}

/// Builds the owned envelope.
pub(super) struct Build(pub(super) Envelope);

impl Build {
    /// Every field is set by a walk that succeeds.
    pub(super) fn new() -> Build {
        Build(Envelope {
            reverse_path: ReversePath::Null,
            params: MailParams::default(),
            recipients: Vec::new(),
            client: ClientInfo::default(),
            transaction: TransactionId { session: 0, seq: 0 },
        })
    }
}

impl<'a> Visit<'a> for Build {
    fn transaction(&mut self, t: TransactionId) {
        self.0.transaction = t;
    }
    fn reverse_path(&mut self, mailbox: Option<(&'a str, &'a str)>) {
        self.0.reverse_path = match mailbox {
            None => ReversePath::Null,
            Some((local, domain)) => ReversePath::Mailbox(Mailbox {
                local: local.into(),
                domain: domain.into(),
            }),
        };
    }
    fn params(&mut self, params: MailParams) {
        self.0.params = params;
    }
    fn client(&mut self, peer: &'a str, lhlo: &'a str) {
        self.0.client = ClientInfo {
            peer: peer.into(),
            lhlo: lhlo.into(),
        };
    }
    fn recipients(&mut self, count: usize) {
        self.0.recipients.reserve_exact(count);
    }
    fn recipient(&mut self, local: &'a str, domain: &'a str, detail: Option<DetailRef<'a>>) {
        self.0.recipients.push(Recipient {
            mailbox: Mailbox {
                local: local.into(),
                domain: domain.into(),
            },
            detail: detail.map(|(delimiter, base, tag)| Detail {
                base: base.into(),
                delimiter,
                tag: tag.into(),
            }),
        });
    }
}

/// Compares, field by field, with an envelope in memory; after a walk that
/// succeeded, [`Same::matched`] says whether every field and the recipient
/// count were equal.
pub(super) struct Same<'e> {
    want: &'e Envelope,
    /// No field differed so far.
    same: bool,
    /// Recipients seen so far.
    next: usize,
}

impl<'e> Same<'e> {
    pub(super) fn new(want: &'e Envelope) -> Same<'e> {
        Same {
            want,
            same: true,
            next: 0,
        }
    }

    /// Whether the walk found exactly `want`.
    pub(super) fn matched(&self) -> bool {
        self.same && self.next == self.want.recipients.len()
    }
}

impl<'a> Visit<'a> for Same<'_> {
    fn transaction(&mut self, t: TransactionId) {
        self.same &= t == self.want.transaction;
    }
    fn reverse_path(&mut self, mailbox: Option<(&'a str, &'a str)>) {
        self.same &= match (&self.want.reverse_path, mailbox) {
            (ReversePath::Null, None) => true,
            (ReversePath::Mailbox(m), Some((local, domain))) => {
                m.local == local && m.domain == domain
            }
            _ => false,
        };
    }
    fn params(&mut self, params: MailParams) {
        self.same &= params == self.want.params;
    }
    fn client(&mut self, peer: &'a str, lhlo: &'a str) {
        self.same &= self.want.client.peer == peer && self.want.client.lhlo == lhlo;
    }
    fn recipient(&mut self, local: &'a str, domain: &'a str, detail: Option<DetailRef<'a>>) {
        let Some(r) = self.want.recipients.get(self.next) else {
            self.same = false;
            return;
        };
        self.next += 1;
        self.same &= r.mailbox.local == local
            && r.mailbox.domain == domain
            && match (&r.detail, detail) {
                (None, None) => true,
                (Some(d), Some((delimiter, base, tag))) => {
                    d.delimiter == delimiter && d.base == base && d.tag == tag
                }
                _ => false,
            };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::record::tests::sample_message;

    fn encoded(e: &Envelope) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, e);
        out
    }

    fn matches(bytes: &[u8], n: usize, want: &Envelope) -> bool {
        let mut same = Same::new(want);
        walk(bytes, n as u32, &mut same).is_ok() && same.matched()
    }

    #[test]
    fn build_gives_back_what_was_encoded_and_same_agrees() {
        let mut e = sample_message(3, 0).envelope;
        e.recipients[0].detail = Some(Detail {
            base: "user3".into(),
            delimiter: 'é',
            tag: "tag".into(),
        });
        let bytes = encoded(&e);
        let mut b = Build::new();
        walk(&bytes, e.recipients.len() as u32, &mut b).unwrap();
        assert_eq!(b.0, e);
        assert!(matches(&bytes, e.recipients.len(), &e));
        walk(&bytes, e.recipients.len() as u32, &mut Sound).unwrap();
    }

    #[test]
    fn same_notices_every_field_that_differs() {
        let mut base = sample_message(4, 0).envelope;
        base.recipients[0].detail = Some(Detail {
            base: "user4".into(),
            delimiter: '+',
            tag: "tag".into(),
        });
        let n = base.recipients.len();
        assert!(n >= 2, "the sample needs two recipients");
        let bytes = encoded(&base);
        assert!(matches(&bytes, n, &base));
        type Change = fn(&mut Envelope);
        let changes: &[(&str, Change)] = &[
            ("session", |e| e.transaction.session += 1),
            ("transaction seq", |e| e.transaction.seq += 1),
            ("null sender", |e| e.reverse_path = ReversePath::Null),
            ("sender local", |e| {
                if let ReversePath::Mailbox(m) = &mut e.reverse_path {
                    m.local.push('x')
                }
            }),
            ("sender domain", |e| {
                if let ReversePath::Mailbox(m) = &mut e.reverse_path {
                    m.domain = "example.com".into()
                }
            }),
            ("size", |e| {
                e.params.size = e.params.size.map_or(Some(1), |s| Some(s + 1))
            }),
            ("body", |e| e.params.body = Some(BodyType::BinaryMime)),
            ("smtputf8", |e| e.params.smtputf8 = !e.params.smtputf8),
            ("peer", |e| e.client.peer.push('1')),
            ("lhlo", |e| e.client.lhlo = "other".into()),
            ("recipient local", |e| {
                e.recipients[1].mailbox.local.push('x')
            }),
            ("recipient domain", |e| {
                e.recipients[1].mailbox.domain.pop().map(drop).unwrap_or(())
            }),
            ("detail dropped", |e| e.recipients[0].detail = None),
            ("detail added", |e| {
                e.recipients[1].detail = Some(Detail {
                    base: "b".into(),
                    delimiter: '-',
                    tag: String::new(),
                })
            }),
            ("delimiter", |e| {
                e.recipients[0].detail.as_mut().unwrap().delimiter = '-'
            }),
            ("detail base", |e| {
                e.recipients[0].detail.as_mut().unwrap().base.push('x')
            }),
            ("detail tag", |e| {
                e.recipients[0].detail.as_mut().unwrap().tag.clear()
            }),
            ("one recipient more", |e| {
                let r = e.recipients[0].clone();
                e.recipients.push(r)
            }),
            ("one recipient fewer", |e| {
                e.recipients.pop();
            }),
            ("recipients reordered", |e| e.recipients.swap(0, 1)),
        ];
        for (what, change) in changes {
            let mut want = base.clone();
            change(&mut want);
            assert_ne!(want, base, "{what}: the change must change something");
            assert!(!matches(&bytes, n, &want), "{what}: not noticed");
        }
    }

    #[test]
    fn malformed_bytes_are_refused_before_anything_is_allocated_for_them() {
        let e = sample_message(1, 0).envelope;
        let bytes = encoded(&e);
        let n = e.recipients.len() as u32;
        // A count the bytes cannot hold, up to the largest a header can say.
        for count in [n + 1, 1 << 20, u32::MAX] {
            let mut b = Build::new();
            assert!(walk(&bytes, count, &mut b).is_err());
            assert!(b.0.recipients.capacity() < 1 << 20, "count {count}");
        }
        assert!(walk(&bytes[..bytes.len() - 1], n, &mut Sound).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(walk(&longer, n, &mut Sound).is_err());
        // A string that is not UTF-8: the peer's first byte.
        let mut bad = bytes.clone();
        let peer_at = bytes
            .windows(e.client.peer.len())
            .position(|w| w == e.client.peer.as_bytes())
            .unwrap();
        bad[peer_at] = 0xff;
        assert_eq!(
            walk(&bad, n, &mut Sound),
            Err(RecordError::Envelope("string is not UTF-8"))
        );
    }
}
