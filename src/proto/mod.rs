//! LMTP without I/O.
//!
//! Nothing in this folder touches a socket, a file, a thread or the clock:
//! bytes and `now` are passed in, replies and spool requests are polled out
//! (the quinn-proto style). Everything here is testable with byte strings.
//!
//! - [`session`]: the per-connection state machine, the only public entry point
//!   a runtime needs;
//! - [`command`] and [`address`]: command lines and RFC 5321 paths;
//! - [`reply`]: every reply text and code;
//! - [`unstuff`]: the DATA dot-unstuffer and the BDAT content scanner;
//! - [`limits`] and [`policy`]: the bounds and the recipient question.

pub mod address;
pub mod command;
pub mod limits;
pub mod policy;
pub mod reply;
pub mod session;
pub mod unstuff;

pub use limits::{BareLineEndings, Limits};
pub use policy::{AcceptAll, RcptVerdict, RecipientPolicy};
pub use session::{Session, SessionConfig, SessionStats, SpoolRequest, Ticket};
