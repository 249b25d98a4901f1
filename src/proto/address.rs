//! RFC 5321 paths: `<local@domain>`, the null path `<>`, quoted local parts,
//! address literals, UTF-8 addresses (RFC 6531), and the `+detail` split.
//!
//! Grammar (RFC 5321 section 4.1.2, with RFC 6531 section 3.3's UTF-8 extension):
//! ```text
//! Path          = "<" [ A-d-l ":" ] Mailbox ">"     ; source route accepted, ignored
//! Mailbox       = Local-part "@" ( Domain / address-literal )
//! Local-part    = Dot-string / Quoted-string
//! Dot-string    = Atom *("." Atom)                  ; Atom = 1*atext
//! Quoted-string = DQUOTE *( qtextSMTP / "\" %d32-126 ) DQUOTE
//! Domain        = sub-domain *("." sub-domain)      ; Let-dig [Ldh-str]
//! address-literal = "[" ( IPv4 / "IPv6:" IPv6 / tag ":" 1*dcontent ) "]"
//! ```
//! With `utf8` allowed, any non-ASCII UTF-8 character counts as `atext`,
//! `qtextSMTP` and a sub-domain letter. No length caps beyond the command line's:
//! RFC 5321 section 4.5.3.1 asks servers not to impose them, and SRS/VERP
//! addresses exceed the nominal 64-byte local part.
//!
//! Must not: allocate for a path it rejects, do I/O, or lower-case anything
//! (the local part is case-sensitive; the address is kept as written).

use crate::envelope::{Detail, Mailbox, Recipient, ReversePath};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not a path by the grammar above.
    Syntax,
    /// Non-ASCII characters without `SMTPUTF8` on the MAIL command.
    NeedsSmtpUtf8,
}

/// `atext` of RFC 5322 section 3.2.3.
fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
}

/// Parses a dot-string local part at the start of `s`; returns its length.
fn dot_string(s: &[u8], utf8: bool) -> Option<usize> {
    let mut i = 0;
    let mut atom_len = 0;
    while i < s.len() {
        let c = s[i];
        if is_atext(c) || (utf8 && c >= 0x80) {
            atom_len += 1;
        } else if c == b'.' && atom_len > 0 {
            atom_len = 0;
        } else {
            break;
        }
        i += 1;
    }
    // An empty atom (leading, doubled or trailing dot) is not a dot-string.
    (atom_len > 0).then_some(i)
}

/// Parses a quoted string at the start of `s` (opening quote included);
/// returns its length including both quotes.
fn quoted_string(s: &[u8], utf8: bool) -> Option<usize> {
    if s.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i + 1),
            b'\\' => {
                let n = *s.get(i + 1)?;
                if !(32..=126).contains(&n) {
                    return None;
                }
                i += 2;
            }
            c if (32..=126).contains(&c) => i += 1,
            c if utf8 && c >= 0x80 => i += 1,
            _ => return None,
        }
    }
    None
}

/// A domain name: sub-domains of letters, digits and inner hyphens.
fn is_domain(s: &[u8], utf8: bool) -> bool {
    if s.is_empty() {
        return false;
    }
    s.split(|&c| c == b'.').all(|label| {
        let letdig = |c: u8| c.is_ascii_alphanumeric() || (utf8 && c >= 0x80);
        !label.is_empty()
            && letdig(label[0])
            && letdig(label[label.len() - 1])
            && label.iter().all(|&c| letdig(c) || c == b'-')
    })
}

/// The inside of an address literal, without its brackets.
fn is_address_literal(s: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(s) else {
        return false;
    };
    if let Some(v6) = text
        .strip_prefix("IPv6:")
        .or_else(|| text.strip_prefix("ipv6:"))
    {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    if text.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    // General-address-literal: Standardized-tag ":" 1*dcontent.
    match text.split_once(':') {
        Some((tag, content)) => {
            is_domain(tag.as_bytes(), false)
                && tag
                    .as_bytes()
                    .last()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                && !content.is_empty()
                && content
                    .bytes()
                    .all(|c| (33..=90).contains(&c) || (94..=126).contains(&c))
        }
        None => false,
    }
}

/// Skips an RFC 5321 source route (`@a.example,@b.example:`), which servers
/// must accept and ignore (section 4.1.2). Returns the rest.
fn skip_source_route(s: &[u8]) -> Result<&[u8], PathError> {
    if s.first() != Some(&b'@') {
        return Ok(s);
    }
    let colon = memchr::memchr(b':', s).ok_or(PathError::Syntax)?;
    for hop in s[..colon].split(|&c| c == b',') {
        match hop.split_first() {
            Some((b'@', d)) if is_domain(d, false) => {}
            _ => return Err(PathError::Syntax),
        }
    }
    Ok(&s[colon + 1..])
}

/// Parses `local@domain` (no brackets) as a whole.
pub fn parse_mailbox(s: &[u8], utf8_allowed: bool) -> Result<Mailbox, PathError> {
    // Parse with UTF-8 allowed, then refuse non-ASCII if it is not: that way
    // the client hears "needs SMTPUTF8" rather than "syntax error".
    let local_len = if s.first() == Some(&b'"') {
        quoted_string(s, true)
    } else {
        dot_string(s, true)
    }
    .ok_or(PathError::Syntax)?;
    if s.get(local_len) != Some(&b'@') {
        return Err(PathError::Syntax);
    }
    let domain = &s[local_len + 1..];
    let domain_ok = match domain {
        [b'[', inner @ .., b']'] => is_address_literal(inner),
        _ => is_domain(domain, true),
    };
    if !domain_ok {
        return Err(PathError::Syntax);
    }
    // Non-ASCII bytes must also be valid UTF-8.
    let text = std::str::from_utf8(s).map_err(|_| PathError::Syntax)?;
    if !text.is_ascii() && !utf8_allowed {
        return Err(PathError::NeedsSmtpUtf8);
    }
    Ok(Mailbox {
        local: text[..local_len].to_owned(),
        domain: text[local_len + 1..].to_owned(),
    })
}

/// Parses the `<...>` of a RCPT TO. Returns the mailbox and the bytes after `>`.
pub fn parse_forward_path(s: &[u8], utf8_allowed: bool) -> Result<(Mailbox, &[u8]), PathError> {
    let (inner, rest) = bracketed(s)?;
    let inner = skip_source_route(inner)?;
    Ok((parse_mailbox(inner, utf8_allowed)?, rest))
}

/// Parses the `<...>` of a MAIL FROM, `<>` included. Returns the path and the
/// bytes after `>`.
pub fn parse_reverse_path(s: &[u8], utf8_allowed: bool) -> Result<(ReversePath, &[u8]), PathError> {
    let (inner, rest) = bracketed(s)?;
    if inner.is_empty() {
        return Ok((ReversePath::Null, rest));
    }
    let inner = skip_source_route(inner)?;
    Ok((
        ReversePath::Mailbox(parse_mailbox(inner, utf8_allowed)?),
        rest,
    ))
}

/// Splits `<inside>rest`. The closing `>` is the first one outside a quoted
/// string (a quoted local part may contain `>`).
fn bracketed(s: &[u8]) -> Result<(&[u8], &[u8]), PathError> {
    if s.first() != Some(&b'<') {
        return Err(PathError::Syntax);
    }
    let mut i = 1;
    let mut quoted = false;
    while i < s.len() {
        match s[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Ok((&s[1..i], &s[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    Err(PathError::Syntax)
}

/// Splits `user+tag` at the first of the `delimiters`, as a delivery agent
/// would for plus-addressing. Quoted local parts and an empty base (`+tag`)
/// are not split. An empty `delimiters` disables splitting.
pub fn split_detail(mailbox: Mailbox, delimiters: &str) -> Recipient {
    let detail = if delimiters.is_empty() || mailbox.local.starts_with('"') {
        None
    } else {
        mailbox
            .local
            .char_indices()
            .find(|(_, c)| delimiters.contains(*c))
            .filter(|(i, _)| *i > 0)
            .map(|(i, c)| Detail {
                base: mailbox.local[..i].to_owned(),
                delimiter: c,
                tag: mailbox.local[i + c.len_utf8()..].to_owned(),
            })
    };
    Recipient { mailbox, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> Result<Mailbox, PathError> {
        parse_mailbox(s.as_bytes(), false)
    }

    #[test]
    fn plain_and_dotted_local_parts() {
        let m = mb("John.Doe@Example.ORG").unwrap();
        assert_eq!(m.local, "John.Doe");
        assert_eq!(m.domain, "Example.ORG");
        assert!(mb("a!#$%&'*+-/=?^_`{|}~@x.y").is_ok());
        for bad in [
            ".a@x", "a.@x", "a..b@x", "@x", "a@", "a", "a b@x", "a@x..y", "a@-x", "a@x-", "a@x_y",
            "a@@x",
        ] {
            assert_eq!(mb(bad), Err(PathError::Syntax), "{bad}");
        }
    }

    #[test]
    fn quoted_local_parts() {
        let m = mb(r#""john doe"@example.org"#).unwrap();
        assert_eq!(m.local, r#""john doe""#);
        assert!(mb(r#""a\"b"@x"#).is_ok());
        assert!(mb(r#""a@b>c"@x"#).is_ok());
        assert!(mb(r#"""@x"#).is_ok());
        assert_eq!(mb(r#""abc@x"#), Err(PathError::Syntax));
        assert_eq!(mb("\"a\tb\"@x"), Err(PathError::Syntax));
    }

    #[test]
    fn address_literals() {
        assert!(mb("a@[192.0.2.1]").is_ok());
        assert!(mb("a@[IPv6:2001:db8::1]").is_ok());
        assert!(mb("a@[x-tag:some.content]").is_ok());
        for bad in [
            "a@[300.0.0.1]",
            "a@[IPv6:zz::1]",
            "a@[192.0.2.1",
            "a@[]",
            "a@[tag:]",
        ] {
            assert_eq!(mb(bad), Err(PathError::Syntax), "{bad}");
        }
    }

    #[test]
    fn utf8_only_with_smtputf8() {
        let s = "jösé@bücher.example";
        assert_eq!(
            parse_mailbox(s.as_bytes(), false),
            Err(PathError::NeedsSmtpUtf8)
        );
        let m = parse_mailbox(s.as_bytes(), true).unwrap();
        assert_eq!(m.local, "jösé");
        assert_eq!(m.domain, "bücher.example");
        // Invalid UTF-8 is a syntax error either way.
        assert_eq!(parse_mailbox(b"a\xff@x", true), Err(PathError::Syntax));
    }

    #[test]
    fn paths_and_null_sender() {
        let (p, rest) = parse_reverse_path(b"<> SIZE=10", false).unwrap();
        assert_eq!(p, ReversePath::Null);
        assert_eq!(rest, b" SIZE=10");
        let (m, rest) =
            parse_forward_path(b"<@relay.example,@b.example:u@d.example>", false).unwrap();
        assert_eq!(m.address(), "u@d.example");
        assert!(rest.is_empty());
        let (m, _) = parse_forward_path(br#"<"a>b"@x>"#, false).unwrap();
        assert_eq!(m.local, r#""a>b""#);
        assert_eq!(parse_forward_path(b"<>", false), Err(PathError::Syntax));
        assert_eq!(parse_forward_path(b"u@d", false), Err(PathError::Syntax));
        assert_eq!(parse_forward_path(b"<u@d", false), Err(PathError::Syntax));
        assert_eq!(
            parse_forward_path(b"<@bad_route:u@d>", false),
            Err(PathError::Syntax)
        );
    }

    #[test]
    fn detail_split_keeps_both_forms() {
        let r = split_detail(mb("user+tag+x@d").unwrap(), "+");
        let d = r.detail.as_ref().unwrap();
        assert_eq!((d.base.as_str(), d.tag.as_str()), ("user", "tag+x"));
        assert_eq!(r.mailbox.address(), "user+tag+x@d");
        assert_eq!(r.base_address(), "user@d");
        let r = split_detail(mb("user-tag@d").unwrap(), "+-");
        assert_eq!(r.detail.unwrap().delimiter, '-');
        assert!(split_detail(mb("user@d").unwrap(), "+").detail.is_none());
        assert!(split_detail(mb("+tag@d").unwrap(), "+").detail.is_none());
        assert!(split_detail(mb("user+tag@d").unwrap(), "").detail.is_none());
        assert!(
            split_detail(mb(r#""a+b"@d"#).unwrap(), "+")
                .detail
                .is_none()
        );
        let r = split_detail(mb("user+@d").unwrap(), "+");
        assert_eq!(r.detail.unwrap().tag, "");
    }
}
