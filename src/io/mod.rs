//! The shard runtime: per-core threads that own sockets and drive sessions.
//!
//! [`core`] holds what every backend shares (connections, sessions, the spool
//! hand-off, the memory bound, timeouts, shutdown) and does no system calls.
//! [`epoll`] is the portable backend, [`uring`] the io_uring one; [`listen`]
//! opens the sockets.

pub mod core;
pub mod epoll;
pub mod listen;
// io_uring backend (branch uring).
pub mod uring;

use std::os::fd::{AsRawFd, OwnedFd};

use crate::access::AllowList;
use crate::envelope::CommitOutcome;

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
/// `421` when the shard already holds `connections_max`, else switch off Nagle
/// (replies are small and the client waits for them) and return the peer's
/// name (`ip:port`, `[ip6]:port` or `unix:`) for the session. `None`: the
/// caller drops (closes) the socket.
pub fn admit(
    fd: &OwnedFd,
    allow: &AllowList,
    open_connections: usize,
    connections_max: usize,
) -> Option<String> {
    let sock = socket2::SockRef::from(fd);
    let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
    if let Some(addr) = peer {
        if !allow.allows(addr.ip()) {
            tracing::info!(client = %addr, allow = %allow, "refused: client not in the listener's allow-list");
            refuse(fd, b"554 5.7.1 Access denied: client not allowed\r\n");
            return None;
        }
    }
    if open_connections >= connections_max {
        refuse(fd, b"421 4.7.0 Too many connections, try again later\r\n");
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

/// One log line per message: queue id, client, sender, recipients, size,
/// commit latency, outcome.
pub fn log_delivery(shard: usize, d: &core::Delivered) {
    let latency_us = d.commit_latency.as_micros() as u64;
    match d.outcome {
        CommitOutcome::Committed(id) => tracing::info!(
            target: "delivery",
            shard,
            queue_id = %id,
            client = %d.peer,
            session = format_args!("{:x}.{}", d.session_id, d.transaction),
            from = %d.sender,
            rcpts = d.recipients,
            size = d.body_bytes,
            commit_us = latency_us,
            "stored"
        ),
        other => tracing::warn!(
            target: "delivery",
            shard,
            client = %d.peer,
            session = format_args!("{:x}.{}", d.session_id, d.transaction),
            from = %d.sender,
            rcpts = d.recipients,
            size = d.body_bytes,
            commit_us = latency_us,
            outcome = ?other,
            "not stored"
        ),
    }
}
