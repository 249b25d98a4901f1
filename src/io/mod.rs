//! The shard runtime: per-core threads that own sockets and drive sessions.
//!
//! [`core`] holds what every backend shares (connections, sessions, the spool
//! hand-off, the memory bound, timeouts, shutdown) and does no system calls.
//! [`epoll`] is the portable backend, [`uring`] the io_uring one; [`listen`]
//! opens the sockets.

pub mod balance;
pub mod clock;
pub mod core;
mod delivery_log;
pub mod epoll;
pub mod idle_poll;
pub mod listen;
pub mod sys;
// io_uring backend (branch uring).
pub mod uring;
pub mod waker;

pub use delivery_log::{DeliverySink, log_delivery, log_safe, set_delivery_sink};

use std::os::fd::{AsRawFd, OwnedFd};

use crate::access::AllowList;
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
