//! LMTP command lines to [`Command`] values.
//!
//! Input is one line without its line ending. Verbs and keywords are
//! case-insensitive (RFC 5321 section 2.4); arguments keep their case. Each
//! refusal is a [`CommandError`] that names the reply to give.
//!
//! Must not: know the session state (sequence errors are the session's), do
//! I/O, or allocate for a line it refuses.

use super::address::{self, PathError};
use crate::envelope::{BodyType, MailParams, Mailbox, ReversePath};

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `LHLO name`.
    Lhlo(String),
    /// `HELO` or `EHLO`: refused in LMTP (RFC 2033 section 4.1).
    HeloEhlo,
    /// `MAIL FROM:<path> [SIZE=n] [BODY=...] [SMTPUTF8]`.
    Mail {
        path: ReversePath,
        params: MailParams,
    },
    /// `RCPT TO:<path>`.
    Rcpt(Mailbox),
    Data,
    /// `BDAT size [LAST]` (RFC 3030).
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
}

/// Why a line is not a command we take, and so which reply it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// `500 5.5.2`: not a verb we know.
    Unknown,
    /// `501 5.5.4`: a known verb with bad arguments; the text says the syntax.
    Syntax(&'static str),
    /// `501 5.1.7`: the MAIL path is malformed.
    BadSender,
    /// `501 5.1.3`: the RCPT path is malformed.
    BadRecipient,
    /// `553 5.6.7`: a UTF-8 address without `SMTPUTF8`.
    NeedsSmtpUtf8,
    /// `555 5.5.4`: a MAIL or RCPT parameter we do not support.
    UnknownParameter,
    /// `501 5.5.4`: a parameter we know with a bad value, or given twice.
    BadParameter(&'static str),
}

/// Strips a case-insensitive ASCII `prefix`.
fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

fn trim_spaces(mut s: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' '] = s {
        s = rest;
    }
    s
}

/// Parses one command line (no CRLF). `rcpt_utf8` says whether the current
/// transaction's MAIL carried `SMTPUTF8`, which decides if RCPT may be UTF-8.
pub fn parse(line: &[u8], rcpt_utf8: bool) -> Result<Command, CommandError> {
    let verb_end = line.iter().position(|&c| c == b' ').unwrap_or(line.len());
    let (verb, args) = line.split_at(verb_end);
    let args = args.strip_prefix(b" ").unwrap_or(args);
    if verb.len() != 4 {
        return Err(CommandError::Unknown);
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(verb);
    v.make_ascii_uppercase();
    match &v {
        b"LHLO" => parse_lhlo(args),
        b"HELO" | b"EHLO" => Ok(Command::HeloEhlo),
        b"MAIL" => parse_mail(args),
        b"RCPT" => parse_rcpt(args, rcpt_utf8),
        b"DATA" => no_args(args, Command::Data, "Syntax: DATA"),
        b"BDAT" => parse_bdat(args),
        b"RSET" => no_args(args, Command::Rset, "Syntax: RSET"),
        b"QUIT" => no_args(args, Command::Quit, "Syntax: QUIT"),
        // NOOP may carry an argument, which is ignored (RFC 5321 4.1.1.9).
        b"NOOP" => Ok(Command::Noop),
        b"VRFY" if trim_spaces(args).is_empty() => {
            Err(CommandError::Syntax("Syntax: VRFY address"))
        }
        b"VRFY" => Ok(Command::Vrfy),
        _ => Err(CommandError::Unknown),
    }
}

fn no_args(args: &[u8], cmd: Command, syntax: &'static str) -> Result<Command, CommandError> {
    if trim_spaces(args).is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::Syntax(syntax))
    }
}

fn parse_lhlo(args: &[u8]) -> Result<Command, CommandError> {
    let name = trim_spaces(args);
    // A domain or address literal; we record it, we do not judge it, but it
    // must be one printable token.
    if name.is_empty() || !name.iter().all(|&c| (33..=126).contains(&c)) {
        return Err(CommandError::Syntax("Syntax: LHLO hostname"));
    }
    // All printable ASCII, so this is valid UTF-8.
    Ok(Command::Lhlo(String::from_utf8_lossy(name).into_owned()))
}

/// `FROM:` or `TO:`, then optional spaces (tolerated: common and harmless).
fn after_keyword<'a>(args: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let rest = strip_prefix_ci(args, keyword)?;
    Some(trim_start(rest))
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    s
}

fn parse_mail(args: &[u8]) -> Result<Command, CommandError> {
    let syntax = CommandError::Syntax("Syntax: MAIL FROM:<address> [parameters]");
    let rest = after_keyword(args, b"FROM:").ok_or(syntax.clone())?;
    // Parameters first: SMTPUTF8 among them decides whether the path may be UTF-8.
    let (path, params_text) = match address::parse_reverse_path(rest, true) {
        Ok(v) => v,
        Err(_) => {
            return Err(if rest.first() == Some(&b'<') {
                CommandError::BadSender
            } else {
                syntax
            });
        }
    };
    if !params_text.is_empty() && params_text[0] != b' ' {
        return Err(CommandError::BadSender);
    }
    let params = parse_mail_params(params_text)?;
    if !params.smtputf8 {
        if let ReversePath::Mailbox(m) = &path {
            if !m.local.is_ascii() || !m.domain.is_ascii() {
                return Err(CommandError::NeedsSmtpUtf8);
            }
        }
    }
    Ok(Command::Mail { path, params })
}

fn parse_mail_params(text: &[u8]) -> Result<MailParams, CommandError> {
    let mut p = MailParams::default();
    let (mut seen_size, mut seen_body) = (false, false);
    for param in text.split(|&c| c == b' ').filter(|s| !s.is_empty()) {
        let (key, value) = match param.iter().position(|&c| c == b'=') {
            Some(i) => (&param[..i], Some(&param[i + 1..])),
            None => (param, None),
        };
        if key.eq_ignore_ascii_case(b"SIZE") {
            let v = value.ok_or(CommandError::BadParameter("Syntax: SIZE=number"))?;
            if seen_size {
                return Err(CommandError::BadParameter("SIZE given twice"));
            }
            seen_size = true;
            p.size =
                Some(parse_decimal(v).ok_or(CommandError::BadParameter("Syntax: SIZE=number"))?);
        } else if key.eq_ignore_ascii_case(b"BODY") {
            if seen_body {
                return Err(CommandError::BadParameter("BODY given twice"));
            }
            seen_body = true;
            let v = value.ok_or(CommandError::BadParameter(
                "Syntax: BODY=7BIT|8BITMIME|BINARYMIME",
            ))?;
            p.body = Some(if v.eq_ignore_ascii_case(b"7BIT") {
                BodyType::SevenBit
            } else if v.eq_ignore_ascii_case(b"8BITMIME") {
                BodyType::EightBitMime
            } else if v.eq_ignore_ascii_case(b"BINARYMIME") {
                BodyType::BinaryMime
            } else {
                return Err(CommandError::BadParameter(
                    "Syntax: BODY=7BIT|8BITMIME|BINARYMIME",
                ));
            });
        } else if key.eq_ignore_ascii_case(b"SMTPUTF8") {
            if value.is_some() {
                return Err(CommandError::BadParameter("SMTPUTF8 takes no value"));
            }
            if p.smtputf8 {
                return Err(CommandError::BadParameter("SMTPUTF8 given twice"));
            }
            p.smtputf8 = true;
        } else {
            return Err(CommandError::UnknownParameter);
        }
    }
    Ok(p)
}

/// A decimal number of at most 20 digits that fits a u64.
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        acc.checked_mul(10)?.checked_add((c - b'0') as u64)
    })
}

fn parse_rcpt(args: &[u8], utf8: bool) -> Result<Command, CommandError> {
    let syntax = CommandError::Syntax("Syntax: RCPT TO:<address>");
    let rest = after_keyword(args, b"TO:").ok_or(syntax.clone())?;
    let (mailbox, params) = match address::parse_forward_path(rest, utf8) {
        Ok(v) => v,
        Err(PathError::NeedsSmtpUtf8) => return Err(CommandError::NeedsSmtpUtf8),
        Err(PathError::Syntax) if rest.first() == Some(&b'<') => {
            return Err(CommandError::BadRecipient);
        }
        Err(PathError::Syntax) => return Err(syntax),
    };
    match trim_spaces(params) {
        [] => Ok(Command::Rcpt(mailbox)),
        // We offer no RCPT parameters (no DSN), so any is unknown.
        _ if params[0] == b' ' => Err(CommandError::UnknownParameter),
        _ => Err(CommandError::BadRecipient),
    }
}

fn parse_bdat(args: &[u8]) -> Result<Command, CommandError> {
    let syntax = CommandError::Syntax("Syntax: BDAT size [LAST]");
    let mut words = args.split(|&c| c == b' ').filter(|w| !w.is_empty());
    let size = words.next().and_then(parse_decimal).ok_or(syntax.clone())?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return Err(syntax),
    };
    if words.next().is_some() {
        return Err(syntax);
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, CommandError> {
        parse(s.as_bytes(), false)
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(p("lhlo mx.example"), Ok(Command::Lhlo("mx.example".into())));
        assert_eq!(p("DaTa"), Ok(Command::Data));
        assert_eq!(p("rset"), Ok(Command::Rset));
        assert_eq!(p("quit"), Ok(Command::Quit));
        assert_eq!(p("NOOP anything"), Ok(Command::Noop));
        assert_eq!(p("vrfy postmaster"), Ok(Command::Vrfy));
        assert_eq!(p("helo x"), Ok(Command::HeloEhlo));
        assert_eq!(p("EHLO x"), Ok(Command::HeloEhlo));
    }

    #[test]
    fn unknown_and_bad_syntax() {
        assert_eq!(p("STARTTLS"), Err(CommandError::Unknown));
        assert_eq!(p(""), Err(CommandError::Unknown));
        assert_eq!(p("XYZW"), Err(CommandError::Unknown));
        assert!(matches!(p("LHLO"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("DATA x"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("QUIT now"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("VRFY"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("MAIL TO:<a@b>"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("RCPT FROM:<a@b>"), Err(CommandError::Syntax(_))));
        assert!(matches!(p("MAIL FROM:a@b"), Err(CommandError::Syntax(_))));
    }

    #[test]
    fn mail_with_parameters() {
        let c = p("MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME").unwrap();
        let Command::Mail { path, params } = c else {
            panic!()
        };
        assert_eq!(path.to_string(), "<a@b.example>");
        assert_eq!(params.size, Some(1234));
        assert_eq!(params.body, Some(BodyType::EightBitMime));
        assert!(!params.smtputf8);
        let Command::Mail { path, params } = p("mail from: <> body=binarymime smtputf8").unwrap()
        else {
            panic!()
        };
        assert_eq!(path, ReversePath::Null);
        assert_eq!(params.body, Some(BodyType::BinaryMime));
        assert!(params.smtputf8);
    }

    #[test]
    fn mail_parameter_errors() {
        assert_eq!(
            p("MAIL FROM:<a@b> FOO=1"),
            Err(CommandError::UnknownParameter)
        );
        assert!(matches!(
            p("MAIL FROM:<a@b> SIZE=x"),
            Err(CommandError::BadParameter(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b> SIZE="),
            Err(CommandError::BadParameter(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b> SIZE=99999999999999999999999"),
            Err(CommandError::BadParameter(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b> SIZE=1 SIZE=2"),
            Err(CommandError::BadParameter(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b> BODY=9BIT"),
            Err(CommandError::BadParameter(_))
        ));
        assert!(matches!(
            p("MAIL FROM:<a@b> SMTPUTF8=yes"),
            Err(CommandError::BadParameter(_))
        ));
        assert_eq!(p("MAIL FROM:<a b@c>"), Err(CommandError::BadSender));
        assert_eq!(p("MAIL FROM:<a@b>x"), Err(CommandError::BadSender));
    }

    #[test]
    fn utf8_sender_needs_smtputf8() {
        assert_eq!(p("MAIL FROM:<jö@b>"), Err(CommandError::NeedsSmtpUtf8));
        assert!(p("MAIL FROM:<jö@b> SMTPUTF8").is_ok());
        assert_eq!(p("RCPT TO:<jö@b>"), Err(CommandError::NeedsSmtpUtf8));
        assert!(parse("RCPT TO:<jö@b>".as_bytes(), true).is_ok());
    }

    #[test]
    fn rcpt() {
        let Command::Rcpt(m) = p("RCPT TO:<User+x@Example.org>").unwrap() else {
            panic!()
        };
        assert_eq!(m.address(), "User+x@Example.org");
        assert!(p("rcpt to: <a@b>").is_ok());
        assert_eq!(
            p("RCPT TO:<a@b> NOTIFY=NEVER"),
            Err(CommandError::UnknownParameter)
        );
        assert_eq!(p("RCPT TO:<>"), Err(CommandError::BadRecipient));
        assert_eq!(p("RCPT TO:<a@b>junk"), Err(CommandError::BadRecipient));
    }

    #[test]
    fn bdat() {
        assert_eq!(
            p("BDAT 100"),
            Ok(Command::Bdat {
                size: 100,
                last: false
            })
        );
        assert_eq!(
            p("bdat 0 last"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        for bad in [
            "BDAT",
            "BDAT x",
            "BDAT -1",
            "BDAT 1 FIRST",
            "BDAT 1 LAST x",
            "BDAT 99999999999999999999999",
        ] {
            assert!(matches!(p(bad), Err(CommandError::Syntax(_))), "{bad}");
        }
    }
}
