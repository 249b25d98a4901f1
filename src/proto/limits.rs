//! Every bound the protocol enforces, in one place, each with its reason.
//!
//! Pure data: the operator's configuration fills a [`Limits`], the session
//! reads it. `validate` refuses values that would break the protocol or the
//! memory bound, with the key, the problem and the fix.

use std::time::Duration;

/// Per-session and per-message bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest command line accepted, in bytes, the CRLF included. A longer line
    /// gets `500 5.5.2 Line too long` and is discarded up to its end without
    /// being buffered. RFC 5321 section 4.5.3.1.4 asks for at least 512; the
    /// default is Postfix's `line_length_limit` (2048), room for long SRS/VERP
    /// addresses and MAIL parameters.
    pub line_bytes_max: usize,
    /// Recipients per transaction; the next RCPT gets `452 4.5.3`, and the
    /// client sends the rest in a new transaction. Advertised as
    /// `LIMITS RCPTMAX=n` (RFC 9422). RFC 5321 section 4.5.3.1.8 asks for at
    /// least 100; 1000 covers Exim's `batch_max` and Postfix's
    /// `lmtp_destination_recipient_limit` as ISPs set them.
    pub recipients_max: usize,
    /// Largest message body, in bytes after unstuffing, advertised in `SIZE`.
    /// `SIZE=` above it is refused at MAIL (`552 5.3.4`); a body that grows past
    /// it is drained, never buffered beyond the limit, and each accepted
    /// recipient gets `552 5.3.4`. The whole body is held in memory until it is
    /// committed, so this also bounds memory per connection. 50 MiB: above the
    /// 10-40 MB limits large providers publish.
    pub message_bytes_max: usize,
    /// Errors (unknown commands, syntax errors, bad sequence, over-long lines)
    /// a session may make; at this count it gets `421 4.7.0` and is closed.
    /// 20 is Postfix's `smtpd_hard_error_limit`.
    pub bad_commands_max: u32,
    /// How long the server waits for the next command. RFC 5321 section
    /// 4.5.3.2.7 asks for at least 5 minutes.
    pub idle_timeout: Duration,
    /// How long the server waits for more message data (DATA or a BDAT chunk)
    /// once it has started. RFC 5321 section 4.5.3.2.6 (3 minutes per data
    /// block on the client side); the server waits the same 5 minutes.
    pub data_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            line_bytes_max: 2048,
            recipients_max: 1000,
            message_bytes_max: 50 * 1024 * 1024,
            bad_commands_max: 20,
            idle_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(300),
        }
    }
}

/// A limit value that cannot work, with the key and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("limits.{key} = {value}: {problem}; {fix}")]
pub struct LimitError {
    pub key: &'static str,
    pub value: String,
    pub problem: &'static str,
    pub fix: &'static str,
}

impl Limits {
    /// Refuses values that would break the protocol or the memory bound.
    pub fn validate(&self) -> Result<(), LimitError> {
        let err = |key, value: String, problem, fix| {
            Err(LimitError {
                key,
                value,
                problem,
                fix,
            })
        };
        if self.line_bytes_max < 512 {
            return err(
                "line_bytes_max",
                self.line_bytes_max.to_string(),
                "below the 512 bytes RFC 5321 requires every server to accept",
                "set it to 512 or more (default 2048)",
            );
        }
        if self.line_bytes_max > 1024 * 1024 {
            return err(
                "line_bytes_max",
                self.line_bytes_max.to_string(),
                "over 1 MiB per command line lets one client hold that much memory",
                "set it to at most 1048576 (default 2048)",
            );
        }
        if self.recipients_max == 0 {
            return err(
                "recipients_max",
                "0".into(),
                "no recipient could ever be accepted",
                "set it to 100 or more (default 1000)",
            );
        }
        if self.message_bytes_max < 1024 {
            return err(
                "message_bytes_max",
                self.message_bytes_max.to_string(),
                "smaller than the headers of a typical message",
                "set it to at least 1024 (default 52428800)",
            );
        }
        if self.bad_commands_max == 0 {
            return err(
                "bad_commands_max",
                "0".into(),
                "the first typo would drop the session",
                "set it to 1 or more (default 20)",
            );
        }
        if self.idle_timeout.is_zero() || self.data_timeout.is_zero() {
            return err(
                "idle_timeout/data_timeout",
                "0".into(),
                "every session would time out at once",
                "set both to a number of seconds (default 300)",
            );
        }
        Ok(())
    }
}

/// What to do with a bare CR or bare LF in a message body (SMTP smuggling
/// defence and downstream hygiene).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BareLineEndings {
    /// Store the body as sent; only count them.
    Accept,
    /// Store each bare CR and bare LF as CRLF. The default: no message is
    /// refused, and no stored body carries a line ending that a downstream
    /// reader could take for a different line structure than ours.
    #[default]
    Normalize,
    /// Refuse the message: `554 5.6.0` for each recipient.
    Reject,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn bad_values_name_key_and_fix() {
        let l = Limits {
            line_bytes_max: 100,
            ..Limits::default()
        };
        let e = l.validate().unwrap_err().to_string();
        assert!(e.contains("limits.line_bytes_max = 100"), "{e}");
        assert!(e.contains("512 or more"), "{e}");
        let l = Limits {
            recipients_max: 0,
            ..Limits::default()
        };
        assert_eq!(l.validate().unwrap_err().key, "recipients_max");
        let l = Limits {
            idle_timeout: Duration::ZERO,
            ..Limits::default()
        };
        assert!(l.validate().is_err());
    }
}
