//! LMTP without I/O.
//!
//! Nothing in this folder touches a socket, a file, a thread or the clock:
//! bytes and `now` are passed in, replies and spool requests are polled out
//! (the quinn-proto style). Everything here is testable with byte strings.

pub mod unstuff;
