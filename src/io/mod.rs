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

use crate::envelope::CommitOutcome;

/// What both backends do with a freshly accepted socket: refuse it with a
/// `421` when the shard already holds `connections_max`, else switch off Nagle
/// (replies are small and the client waits for them) and return the peer's
/// name (`ip:port`, `[ip6]:port` or `unix:`) for the session. `None`: the
/// caller drops (closes) the socket.
pub fn admit(fd: &OwnedFd, open_connections: usize, connections_max: usize) -> Option<String> {
    if open_connections >= connections_max {
        let msg = b"421 4.7.0 Too many connections, try again later\r\n";
        // SAFETY: sends from a static buffer on a socket we own; a failure
        // is harmless (the socket is closed right after).
        unsafe {
            libc::send(
                fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        return None;
    }
    let sock = socket2::SockRef::from(fd);
    match sock.peer_addr().ok().and_then(|a| a.as_socket()) {
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
