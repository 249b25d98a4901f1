//! lmtp-ingest: a fast, durable LMTP (RFC 2033) ingest server.
//!
//! MTAs connect to per-core shard threads. Each shard runs its own completion loop
//! (io_uring, or epoll where io_uring is refused) and drives one [`proto::Session`]
//! per connection: a state machine with no I/O that parses commands, unstuffs the
//! data and produces replies. A complete message ([`envelope::Message`]) goes over
//! a bounded channel to a spool writer thread, which group-commits many messages
//! under one fdatasync and hands each a [`envelope::CommitOutcome`]. Only that
//! outcome lets the session emit the per-recipient `250`, so "a 250 means it is on
//! stable storage" is enforced by the API, not by convention.
//!
//! Parts: [`proto`] (LMTP without I/O), [`envelope`] (the data that crosses from
//! protocol to spool). The shard runtime, the spool and the operator tools are
//! added by later work; see docs/ARCHITECTURE.md.

pub mod access;
pub mod config;
pub mod doctor;
pub mod envelope;
pub mod io;
pub mod load;
pub mod metrics;
pub mod policy;
pub mod proto;
pub mod server;
pub mod spool;
#[cfg(test)]
mod test_util;
