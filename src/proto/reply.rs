//! Reply texts and codes, written straight into the output buffer.
//!
//! One place for every reply the server sends, so codes stay consistent with
//! `docs/PROTOCOL.md` and `../shared/guide/LMTP-NOTES.md`. Enhanced status codes
//! (RFC 2034, RFC 3463) on every reply except the greeting and the LHLO reply.
//!
//! Must not: allocate (replies are appended to the caller's buffer) or do I/O.

use super::command::CommandError;
use super::limits::Limits;
use crate::envelope::QueueId;

// Fixed replies, CRLF included.
pub const MAIL_OK: &[u8] = b"250 2.1.0 OK\r\n";
pub const RCPT_OK: &[u8] = b"250 2.1.5 OK\r\n";
pub const OK: &[u8] = b"250 2.0.0 OK\r\n";
pub const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
pub const VRFY: &[u8] =
    b"252 2.3.3 Cannot VRFY user, but will accept message and attempt delivery\r\n";
pub const DATA_GO: &[u8] = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n";
pub const USE_LHLO: &[u8] = b"500 5.5.1 Use LHLO (this is LMTP, RFC 2033)\r\n";
pub const NEED_LHLO: &[u8] = b"503 5.5.1 Error: send LHLO first\r\n";
pub const NESTED_MAIL: &[u8] = b"503 5.5.1 Error: nested MAIL command\r\n";
pub const NEED_MAIL: &[u8] = b"503 5.5.1 Error: need MAIL command\r\n";
pub const NEED_RCPT: &[u8] = b"503 5.5.1 Error: no valid recipients\r\n";
pub const DATA_AFTER_BDAT: &[u8] =
    b"503 5.5.1 Error: DATA cannot follow BDAT in one transaction\r\n";
pub const BINARY_NEEDS_BDAT: &[u8] =
    b"503 5.5.1 Error: BODY=BINARYMIME requires BDAT, not DATA\r\n";
pub const TOO_MANY_RCPTS: &[u8] = b"452 4.5.3 Too many recipients\r\n";
/// MAIL while the spool is full (or at its size cap): come back later,
/// before sending the data.
pub const STORAGE_FULL: &[u8] = b"452 4.3.1 Insufficient system storage\r\n";
pub const SIZE_TOO_BIG: &[u8] = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n";
pub const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Line too long\r\n";
pub const UNKNOWN_COMMAND: &[u8] = b"500 5.5.2 Error: command not recognized\r\n";
pub const BAD_SENDER: &[u8] = b"501 5.1.7 Bad sender address syntax\r\n";
pub const BAD_RECIPIENT: &[u8] = b"501 5.1.3 Bad recipient address syntax\r\n";
pub const NEEDS_SMTPUTF8: &[u8] =
    b"553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n";
pub const UNKNOWN_PARAMETER: &[u8] = b"555 5.5.4 Unsupported parameter\r\n";

/// `220 host LMTP ready`.
pub fn greeting(out: &mut Vec<u8>, host: &str) {
    line(out, &["220 ", host, " LMTP ready"]);
}

/// The LHLO reply: our name, then the extensions (RFC 2033 section 4.1).
pub fn lhlo(out: &mut Vec<u8>, host: &str, limits: &Limits) {
    line(out, &["250-", host]);
    out.extend_from_slice(
        b"250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SIZE ",
    );
    push_u64(out, limits.message_bytes_max as u64);
    out.extend_from_slice(
        b"\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-SMTPUTF8\r\n250 LIMITS RCPTMAX=",
    );
    push_u64(out, limits.recipients_max as u64);
    out.extend_from_slice(b"\r\n");
}

/// The reply for a command the parser refused.
pub fn command_error(out: &mut Vec<u8>, e: &CommandError) {
    match e {
        CommandError::Unknown => out.extend_from_slice(UNKNOWN_COMMAND),
        CommandError::Syntax(text) | CommandError::BadParameter(text) => {
            line(out, &["501 5.5.4 ", text]);
        }
        CommandError::BadSender => out.extend_from_slice(BAD_SENDER),
        CommandError::BadRecipient => out.extend_from_slice(BAD_RECIPIENT),
        CommandError::NeedsSmtpUtf8 => out.extend_from_slice(NEEDS_SMTPUTF8),
        CommandError::UnknownParameter => out.extend_from_slice(UNKNOWN_PARAMETER),
    }
}

/// `550 5.1.1 <addr> User unknown`.
pub fn user_unknown(out: &mut Vec<u8>, addr: &str) {
    line(out, &["550 5.1.1 <", addr, "> User unknown"]);
}

/// `451 4.3.0 <addr> Temporary lookup failure` (the policy could not answer).
pub fn rcpt_tempfail(out: &mut Vec<u8>, addr: &str) {
    line(
        out,
        &[
            "451 4.3.0 <",
            addr,
            "> Temporary lookup failure, try again later",
        ],
    );
}

/// `250 2.0.0 n octets received`, for a BDAT chunk that is not the last.
pub fn bdat_chunk(out: &mut Vec<u8>, size: u64) {
    out.extend_from_slice(b"250 2.0.0 ");
    push_u64(out, size);
    out.extend_from_slice(b" octets received\r\n");
}

/// The per-recipient outcome of a message, one line per accepted recipient
/// after the data (RFC 2033 section 4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Saved(QueueId),
    TempFailure,
    StorageFull,
    TooBig,
    BareLineEnding,
    Nul,
}

pub fn delivery(out: &mut Vec<u8>, addr: &str, d: Delivery) {
    match d {
        Delivery::Saved(id) => {
            let mut idbuf = [0u8; QueueId::TEXT_LEN];
            id.encode(&mut idbuf);
            out.extend_from_slice(b"250 2.0.0 <");
            out.extend_from_slice(addr.as_bytes());
            out.extend_from_slice(b"> ");
            out.extend_from_slice(&idbuf);
            out.extend_from_slice(b" Saved\r\n");
        }
        Delivery::TempFailure => line(
            out,
            &["451 4.3.0 <", addr, "> Temporary failure, try again later"],
        ),
        Delivery::StorageFull => line(out, &["452 4.3.1 <", addr, "> Insufficient system storage"]),
        Delivery::TooBig => line(out, &["552 5.3.4 <", addr, "> Message too big"]),
        Delivery::BareLineEnding => line(
            out,
            &[
                "554 5.6.0 <",
                addr,
                "> Message contains bare CR or bare LF (only CRLF ends a line)",
            ],
        ),
        Delivery::Nul => line(
            out,
            &[
                "554 5.6.0 <",
                addr,
                "> Message contains NUL characters (allowed only with BODY=BINARYMIME)",
            ],
        ),
    }
}

/// `421 4.4.2 host Error: timeout exceeded`.
pub fn timeout(out: &mut Vec<u8>, host: &str) {
    line(
        out,
        &[
            "421 4.4.2 ",
            host,
            " Error: timeout exceeded, closing connection",
        ],
    );
}

/// `421 4.7.0 host Error: too many errors`.
pub fn too_many_errors(out: &mut Vec<u8>, host: &str) {
    line(
        out,
        &[
            "421 4.7.0 ",
            host,
            " Error: too many errors, closing connection",
        ],
    );
}

/// `421 4.3.2 host Shutting down`.
pub fn shutting_down(out: &mut Vec<u8>, host: &str) {
    line(
        out,
        &[
            "421 4.3.2 ",
            host,
            " Service shutting down, closing connection",
        ],
    );
}

fn line(out: &mut Vec<u8>, parts: &[&str]) {
    for p in parts {
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn push_u64(out: &mut Vec<u8>, v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lhlo_advertises_extensions_and_limits() {
        let mut out = Vec::new();
        lhlo(&mut out, "mx.test", &Limits::default());
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n\
             250-SIZE 52428800\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250-SMTPUTF8\r\n\
             250 LIMITS RCPTMAX=1000\r\n"
        );
    }

    #[test]
    fn numbers_and_ids() {
        let mut out = Vec::new();
        bdat_chunk(&mut out, 0);
        bdat_chunk(&mut out, u64::MAX);
        assert_eq!(
            out,
            b"250 2.0.0 0 octets received\r\n250 2.0.0 18446744073709551615 octets received\r\n"
        );
        out.clear();
        delivery(&mut out, "a@b", Delivery::Saved(QueueId(1)));
        assert_eq!(out, b"250 2.0.0 <a@b> 00000000000000000000000001 Saved\r\n");
    }
}
