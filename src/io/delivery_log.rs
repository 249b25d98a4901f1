//! The delivery log: one line per recipient of each message whose outcome
//! arrived, in the shape operators know from Postfix, and the escaping that
//! makes client text in it safe for a terminal.
//!
//! Lines go through `tracing` (so `RUST_LOG` / `log.level` filter them), and
//! in the text format, when the binary installed a [`DeliverySink`], they
//! are formatted here and handed to it directly: the same bytes the
//! subscriber would write, without its per-field visitor, float formatting
//! and a timestamp per line. With 50 recipients a message has 50 lines, and
//! that machinery was several percent of a loaded server's CPU
//! (docs/BENCHMARKS.md).
//!
//! Must not: write client text unescaped, or write a line the filter drops.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{LogFormat, core};
use crate::envelope::CommitOutcome;

/// Takes one or more whole, formatted log lines (each with its newline): all
/// the lines of one message at once. Must not block.
pub type DeliverySink = Box<dyn Fn(&[u8]) + Send + Sync>;

static SINK: OnceLock<DeliverySink> = OnceLock::new();

/// Has text-format delivery lines written straight to `sink` instead of
/// through the `tracing` subscriber. For a subscriber that writes plain text
/// (no colours) in its default layout to the same place; false if a sink
/// was already set.
pub fn set_delivery_sink(sink: DeliverySink) -> bool {
    SINK.set(sink).is_ok()
}

/// `s` with every character a terminal could act on written as an escape
/// (`\x1b`, `\u{9b}`): C0 controls, DEL and the C1 controls U+0080 to
/// U+009F. Addresses are client-supplied: the parser admits no ASCII control,
/// but with SMTPUTF8 a C1 control is valid UTF-8. The log subscriber does not
/// sanitize (its character-by-character escaping cost several percent of a
/// loaded server's CPU), so client text is made safe here, borrowed when
/// already clean (the usual case).
pub fn log_safe(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control(); // Cc: U+0000-001F, U+007F-009F
    if !s.chars().any(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            use std::fmt::Write;
            let _ = if (c as u32) < 0x80 {
                write!(out, "\\x{:02x}", c as u32)
            } else {
                write!(out, "\\u{{{:x}}}", c as u32)
            };
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One log line per recipient of a message whose outcome arrived, under the
/// `delivery` target, in the shape operators know from Postfix:
///
/// ```text
/// 01JD3...: to=<alice@example.org>, client=192.0.2.7:41822, from=<s@example.net>, size=600,
///   delay=0.0042, delays=0.0001/0.0041, dsn=2.0.0, status=sent (250 2.0.0 <alice@example.org> 01JD3... Saved)
/// ```
///
/// `delay`: final dot to reply, in seconds; `delays`: waiting for room in
/// the spool's queue / write and fdatasync. `status` is `sent` (stored) or
/// `deferred` (the 4xx the client got; nothing stored, the queue id reads
/// `NOQUEUE`). With [`LogFormat::Json`] the same items are separate fields.
/// Stored messages log at `info`, others at `warn`.
pub fn log_delivery(shard: usize, format: LogFormat, d: &core::Delivered) {
    use crate::proto::reply;
    // Nothing to format when the filter drops these lines (perf showed the
    // formatting at 0.15% of a loaded server's CPU with RUST_LOG=warn).
    let enabled = match d.outcome {
        CommitOutcome::Committed(_) => tracing::enabled!(target: "delivery", tracing::Level::INFO),
        _ => tracing::enabled!(target: "delivery", tracing::Level::WARN),
    };
    if !enabled {
        return;
    }
    if format == LogFormat::Text
        && let Some(sink) = SINK.get()
    {
        write_text_lines(d, sink);
        return;
    }
    let (status, delivery) = status_and_reply(d.outcome);
    let queue_id = match d.outcome {
        CommitOutcome::Committed(id) => id.to_string(),
        _ => "NOQUEUE".to_string(),
    };
    let delay = (d.queue_latency + d.commit_latency).as_secs_f64();
    let delays = format!(
        "{:.4}/{:.4}",
        d.queue_latency.as_secs_f64(),
        d.commit_latency.as_secs_f64()
    );
    let session = format!("{:x}.{}", d.session_id, d.transaction);
    let sender = log_safe(&d.sender);
    let mut buf = Vec::with_capacity(128);
    for rcpt in &d.rcpts {
        // The reply's only client text is the address: build it from the
        // escaped one, and the whole line is safe.
        let rcpt = log_safe(rcpt);
        buf.clear();
        reply::delivery(&mut buf, &rcpt, delivery);
        let text = String::from_utf8_lossy(buf.trim_ascii_end());
        let dsn = text.split(' ').nth(1).unwrap_or("");
        match (format, status) {
            (LogFormat::Text, "sent") => tracing::info!(
                target: "delivery",
                "{queue_id}: to=<{rcpt}>, client={}, from={}, size={}, delay={delay:.4}, delays={delays}, dsn={dsn}, status={status} ({text})",
                d.peer, sender, d.body_bytes
            ),
            (LogFormat::Text, _) => tracing::warn!(
                target: "delivery",
                "{queue_id}: to=<{rcpt}>, client={}, from={}, size={}, delay={delay:.4}, delays={delays}, dsn={dsn}, status={status} ({text})",
                d.peer, sender, d.body_bytes
            ),
            (LogFormat::Json, "sent") => tracing::info!(
                target: "delivery",
                queue_id = %queue_id, to = %rcpt, client = %d.peer, from = %sender,
                size = d.body_bytes, delay, delays = %delays, dsn, status, reply = %text,
                shard, session = %session, "delivery"
            ),
            (LogFormat::Json, _) => tracing::warn!(
                target: "delivery",
                queue_id = %queue_id, to = %rcpt, client = %d.peer, from = %sender,
                size = d.body_bytes, delay, delays = %delays, dsn, status, reply = %text,
                shard, session = %session, "delivery"
            ),
        }
    }
}

/// The text lines for `d`, handed to `sink` together, laid out as the
/// `tracing` subscriber lays them out (`TIMESTAMP  INFO delivery: ...`).
fn write_text_lines(d: &core::Delivered, sink: &DeliverySink) {
    use crate::proto::reply;
    let (status, delivery) = status_and_reply(d.outcome);
    // Stored messages log at info, others at warn (as `log_delivery`).
    let level = match d.outcome {
        CommitOutcome::Committed(_) => " INFO",
        _ => " WARN",
    };
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_micros() as u64);
    // What every recipient's line shares, formatted once: the part before
    // the address and the part between the address and the reply.
    let mut head = Vec::with_capacity(96);
    crate::spool::timefmt::push_rfc3339_us(&mut head, now_us);
    head.push(b' ');
    head.extend_from_slice(level.as_bytes());
    head.extend_from_slice(b" delivery: ");
    match d.outcome {
        CommitOutcome::Committed(id) => {
            let _ = write!(head, "{id}");
        }
        _ => head.extend_from_slice(b"NOQUEUE"),
    }
    head.extend_from_slice(b": to=<");
    let mut mid = Vec::with_capacity(160);
    let _ = write!(
        mid,
        ">, client={}, from={}, size={}, delay=",
        d.peer,
        log_safe(&d.sender),
        d.body_bytes
    );
    secs4(&mut mid, d.queue_latency + d.commit_latency);
    mid.extend_from_slice(b", delays=");
    secs4(&mut mid, d.queue_latency);
    mid.push(b'/');
    secs4(&mut mid, d.commit_latency);
    mid.extend_from_slice(b", dsn=");
    // All of a message's lines go to the sink at once.
    let mut lines = Vec::with_capacity(d.rcpts.len() * 300);
    let mut text = Vec::with_capacity(128);
    for rcpt in &d.rcpts {
        let rcpt = log_safe(rcpt);
        text.clear();
        reply::delivery(&mut text, &rcpt, delivery);
        let text = text.trim_ascii_end();
        let dsn = text.split(|&b| b == b' ').nth(1).unwrap_or(b"");
        lines.extend_from_slice(&head);
        lines.extend_from_slice(rcpt.as_bytes());
        lines.extend_from_slice(&mid);
        lines.extend_from_slice(dsn);
        lines.extend_from_slice(b", status=");
        lines.extend_from_slice(status.as_bytes());
        lines.extend_from_slice(b" (");
        lines.extend_from_slice(text);
        lines.extend_from_slice(b")\n");
    }
    sink(&lines);
}

/// The log's status word and the reply each recipient got for `outcome`.
fn status_and_reply(outcome: CommitOutcome) -> (&'static str, crate::proto::reply::Delivery) {
    use crate::proto::reply::Delivery;
    match outcome {
        CommitOutcome::Committed(id) => ("sent", Delivery::Saved(id)),
        CommitOutcome::Failed => ("deferred", Delivery::TempFailure),
        CommitOutcome::StorageFull => ("deferred", Delivery::StorageFull),
    }
}

/// Seconds with four decimals (`0.0042`), rounded to the nearest 100 µs.
fn secs4(out: &mut Vec<u8>, d: Duration) {
    // u64 nanoseconds last 584 years; u128 formatting is slow.
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 50_000);
    let tenths_of_ms = (ns + 50_000) / 100_000;
    let whole = tenths_of_ms / 10_000;
    if whole < 10 {
        out.push(b'0' + whole as u8);
    } else {
        let _ = write!(out, "{whole}");
    }
    out.push(b'.');
    crate::spool::timefmt::push_digits(out, tenths_of_ms % 10_000, 4);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_safe_escapes_what_a_terminal_would_act_on() {
        assert!(matches!(
            log_safe("bob+x@example.org"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(log_safe("ü@exämple.org"), "ü@exämple.org");
        assert_eq!(log_safe("a\u{1b}[2Jb"), "a\\x1b[2Jb");
        assert_eq!(log_safe("a\u{9b}31mb\u{7f}"), "a\\u{9b}31mb\\x7f");
        assert_eq!(log_safe("\r\n"), "\\x0d\\x0a");
    }

    #[test]
    fn seconds_have_four_decimals_like_the_float_format() {
        let f = |d: Duration| {
            let mut v = Vec::new();
            secs4(&mut v, d);
            String::from_utf8(v).unwrap()
        };
        for us in [
            0u64, 1, 49, 51, 149, 151, 4_200, 99_999, 1_000_000, 12_345_678,
        ] {
            let d = Duration::from_micros(us);
            // Away from exact ties the two agree digit for digit (at a tie,
            // 150 us say, the float is a hair below and rounds down).
            assert_eq!(f(d), format!("{:.4}", d.as_secs_f64()), "{us} us");
        }
    }

    #[test]
    fn text_lines_have_the_subscribers_layout_and_escape_addresses() {
        use std::sync::{Arc, Mutex};
        let id = crate::spool::queue_id_from_parts(1_700_000_000_000, 0, 7);
        let d = core::Delivered {
            session_id: 1,
            peer: "192.0.2.7:41822".into(),
            transaction: 1,
            sender: "<s@example.net>".into(),
            recipients: 2,
            rcpts: vec!["a@example.org".into(), "b\u{9b}@example.org".into()],
            body_bytes: 600,
            outcome: CommitOutcome::Committed(id),
            queue_latency: Duration::from_micros(100),
            commit_latency: Duration::from_micros(4_100),
        };
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let sink: DeliverySink = Box::new(move |b| g.lock().unwrap().push(b.to_vec()));
        write_text_lines(&d, &sink);
        let chunks = got.lock().unwrap().clone();
        assert_eq!(chunks.len(), 1, "one hand-over per message");
        let text = String::from_utf8(chunks[0].clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        for (line, rcpt) in lines.iter().zip(["a@example.org", "b\\u{9b}@example.org"]) {
            let (stamp, rest) = line.split_once(' ').unwrap();
            assert_eq!(stamp.len(), "2026-11-21T09:30:00.123456Z".len(), "{line}");
            assert!(stamp.ends_with('Z'));
            assert_eq!(
                rest,
                format!(
                    " INFO delivery: {id}: to=<{rcpt}>, client=192.0.2.7:41822, \
                     from=<s@example.net>, size=600, delay=0.0042, delays=0.0001/0.0041, \
                     dsn=2.0.0, status=sent (250 2.0.0 <{rcpt}> {id} Saved)"
                )
            );
        }
    }
}
