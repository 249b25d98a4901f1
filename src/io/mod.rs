//! The shard runtime: per-core threads that own sockets and drive sessions.
//!
//! [`core`] holds what every backend shares (connections, sessions, the spool
//! hand-off, the memory bound, timeouts, shutdown) and does no system calls.
//! [`epoll`] is the portable backend, [`uring`] the io_uring one; [`listen`]
//! opens the sockets.

pub mod balance;
pub mod clock;
pub mod core;
pub mod epoll;
pub mod idle_poll;
pub mod listen;
pub mod sys;
// io_uring backend (branch uring).
pub mod uring;

use std::os::fd::{AsRawFd, OwnedFd};

use crate::access::AllowList;
use crate::envelope::CommitOutcome;
use crate::metrics::ShardMetrics;

/// Sends a one-line refusal on a socket about to be closed.
fn refuse(fd: &OwnedFd, msg: &'static [u8]) {
    // SAFETY: sends from a static buffer on a socket we own; a failure is
    // harmless (the socket is closed right after).
    unsafe {
        libc::send(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_NOSIGNAL,
        )
    };
}

/// What both backends do with a freshly accepted socket: refuse it with a
/// `554 5.7.1` when the listener's allow-list does not cover the peer, with a
/// `421` when the server already holds `connections_max`, else switch off Nagle
/// (replies are small and the client waits for them) and return the peer's
/// name (`ip:port`, `[ip6]:port` or `unix:`) for the session. `None`: the
/// caller drops (closes) the socket.
pub fn admit(
    fd: &OwnedFd,
    allow: &AllowList,
    metrics: &ShardMetrics,
    connections: &core::ConnectionLimit,
) -> Option<String> {
    let sock = socket2::SockRef::from(fd);
    let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
    if let Some(addr) = peer {
        if !allow.allows(addr.ip()) {
            tracing::info!(client = %addr, allow = %allow, "refused: client not in the listener's allow-list");
            refuse(fd, b"554 5.7.1 Access denied: client not allowed\r\n");
            crate::metrics::bump(&metrics.connections_refused_access, 1);
            return None;
        }
    }
    if connections.is_full() {
        refuse(fd, b"421 4.7.0 Too many connections, try again later\r\n");
        crate::metrics::bump(&metrics.connections_refused_limit, 1);
        return None;
    }
    match peer {
        Some(addr) => {
            let _ = sock.set_tcp_nodelay(true);
            Some(addr.to_string())
        }
        None => Some("unix:".to_string()),
    }
}

/// How delivery lines are written: Postfix-style text or JSON fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
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
    use crate::proto::reply::{self, Delivery};
    // Nothing to format when the filter drops these lines (perf showed the
    // formatting at 0.15% of a loaded server's CPU with RUST_LOG=warn).
    let enabled = match d.outcome {
        CommitOutcome::Committed(_) => tracing::enabled!(target: "delivery", tracing::Level::INFO),
        _ => tracing::enabled!(target: "delivery", tracing::Level::WARN),
    };
    if !enabled {
        return;
    }
    let (queue_id, status, delivery) = match d.outcome {
        CommitOutcome::Committed(id) => (id.to_string(), "sent", Delivery::Saved(id)),
        CommitOutcome::Failed => ("NOQUEUE".to_string(), "deferred", Delivery::TempFailure),
        CommitOutcome::StorageFull => ("NOQUEUE".to_string(), "deferred", Delivery::StorageFull),
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

#[cfg(test)]
mod tests {
    use super::log_safe;

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
}
