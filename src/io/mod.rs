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

use crate::envelope::CommitOutcome;

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
