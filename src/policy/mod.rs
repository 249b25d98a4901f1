//! Recipient policy from the configuration: who is deliverable, asked at each
//! RCPT through [`crate::proto::RecipientPolicy`], so a callout (`MAIL
//! FROM:<>`, `RCPT TO`, `QUIT`) gets a truthful answer.
//!
//! Three modes (`[policy] recipients = ...`):
//! - `accept_all` (the default): every valid address;
//! - `domains`: any address at a listed domain (ASCII case ignored);
//! - `table`: the addresses listed in a file ([`table`] has the format). The
//!   recipient is looked up as given and, when it carries a detail
//!   (`user+tag@`, split at `protocol.detail_delimiters`), without it.
//!
//! `SIGHUP` calls [`Policy::reload`]: the file is read and parsed on the
//! caller's thread while the shards keep answering from the old table; only
//! a complete, valid table replaces it (a pointer swap under a write lock
//! held for nanoseconds). A file that fails to parse is refused with its file
//! and line, and the old table stays; so is a file with no address (likely
//! truncated: it would refuse every recipient), at start-up too.
//! Connections are untouched.
//!
//! Must not: read files on a shard thread; a lookup is in memory and does not
//! allocate.

pub mod table;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::envelope::Recipient;
use crate::proto::{RcptVerdict, RecipientPolicy};

pub use table::{AddressTable, TableError};

/// Which recipients are accepted, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySpec {
    AcceptAll,
    /// Lower-case domain names.
    Domains(Vec<String>),
    Table {
        path: PathBuf,
        entries_max: usize,
    },
}

enum Rules {
    AcceptAll,
    Domains(HashSet<String>),
    Table {
        path: PathBuf,
        entries_max: usize,
        current: RwLock<AddressTable>,
    },
}

/// The recipient policy the server runs with; shared by every shard.
pub struct Policy {
    rules: Rules,
    /// SIGHUP reloads of the table that took effect, and that were refused
    /// (the old table stayed), for the metrics endpoint.
    pub reloads_ok: std::sync::atomic::AtomicU64,
    pub reloads_refused: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What a table load did, for the log.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub entries: usize,
    pub took: Duration,
}

/// Longest domain name kept for lookup (RFC 1035 section 2.3.4: 255 octets).
const DOMAIN_BYTES_MAX: usize = 255;

impl Policy {
    fn with(rules: Rules) -> Policy {
        Policy {
            rules,
            reloads_ok: Default::default(),
            reloads_refused: Default::default(),
        }
    }

    /// Builds the policy; a table is loaded now (start-up refuses a bad one).
    pub fn new(spec: &PolicySpec) -> Result<(Policy, Option<Loaded>), TableError> {
        Ok(match spec {
            PolicySpec::AcceptAll => (Policy::with(Rules::AcceptAll), None),
            PolicySpec::Domains(d) => (
                Policy::with(Rules::Domains(
                    d.iter().map(|d| d.to_ascii_lowercase()).collect(),
                )),
                None,
            ),
            PolicySpec::Table { path, entries_max } => {
                let (table, loaded) = load(path, *entries_max)?;
                (
                    Policy::with(Rules::Table {
                        path: path.clone(),
                        entries_max: *entries_max,
                        current: RwLock::new(table),
                    }),
                    Some(loaded),
                )
            }
        })
    }

    /// One line for the banner and logs.
    pub fn describe(&self) -> String {
        match &self.rules {
            Rules::AcceptAll => "accept_all".into(),
            Rules::Domains(d) => format!("domains ({} listed)", d.len()),
            Rules::Table { path, current, .. } => format!(
                "table {} ({} addresses)",
                path.display(),
                current.read().map(|t| t.len()).unwrap_or(0)
            ),
        }
    }

    /// Re-reads the table file (on SIGHUP). `Ok(None)`: nothing to reload
    /// (no table configured). On error the old table stays in force.
    pub fn reload(&self) -> Result<Option<Loaded>, TableError> {
        let Rules::Table {
            path,
            entries_max,
            current,
        } = &self.rules
        else {
            return Ok(None);
        };
        let counted = |c: &std::sync::atomic::AtomicU64| {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let (table, loaded) = load(path, *entries_max).inspect_err(|_| {
            counted(&self.reloads_refused);
        })?;
        counted(&self.reloads_ok);
        let old = {
            let mut w = current.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *w, table)
        };
        // Freeing a large table takes milliseconds: outside the lock.
        drop(old);
        Ok(Some(loaded))
    }
}

/// Loads a table for the policy: as [`AddressTable::load`], and refuses a
/// table with no address, which would answer every recipient `550` (a
/// truncated or half-written file bounces all mail; `policy.domains = []`
/// is refused for the same reason).
fn load(path: &std::path::Path, entries_max: usize) -> Result<(AddressTable, Loaded), TableError> {
    let started = Instant::now();
    let table = AddressTable::load(path, entries_max)?;
    if table.is_empty() {
        return Err(TableError {
            file: path.display().to_string(),
            line: 0,
            problem: "no address in the file (empty, or only blank and comment lines), so every recipient would be refused with 550; if it was truncated or is still being written, write the full table beside it and rename(2) it into place; to accept every recipient, set policy.recipients = \"accept_all\"".into(),
        });
    }
    let loaded = Loaded {
        path: path.to_owned(),
        entries: table.len(),
        took: started.elapsed(),
    };
    Ok((table, loaded))
}

impl RecipientPolicy for Policy {
    fn check(&self, rcpt: &Recipient) -> RcptVerdict {
        let mb = &rcpt.mailbox;
        let known = match &self.rules {
            Rules::AcceptAll => true,
            Rules::Domains(set) => {
                let mut buf = [0u8; DOMAIN_BYTES_MAX];
                let d = mb.domain.as_bytes();
                d.len() <= DOMAIN_BYTES_MAX && {
                    let lower = &mut buf[..d.len()];
                    lower.copy_from_slice(d);
                    lower.make_ascii_lowercase();
                    // ASCII lower-casing keeps UTF-8 valid.
                    std::str::from_utf8(lower).is_ok_and(|s| set.contains(s))
                }
            }
            Rules::Table { current, .. } => {
                let t = current.read().unwrap_or_else(|p| p.into_inner());
                t.contains(&mb.local, &mb.domain)
                    || rcpt
                        .detail
                        .as_ref()
                        .is_some_and(|d| t.contains(&d.base, &mb.domain))
            }
        };
        if known {
            RcptVerdict::Accept
        } else {
            RcptVerdict::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Mailbox;
    use crate::proto::address::split_detail;

    fn rcpt(local: &str, domain: &str) -> Recipient {
        split_detail(
            Mailbox {
                local: local.into(),
                domain: domain.into(),
            },
            "+",
        )
    }

    #[test]
    fn domains_ignore_case() {
        let (p, _) = Policy::new(&PolicySpec::Domains(vec!["Example.org".into()])).unwrap();
        assert_eq!(p.check(&rcpt("x", "EXAMPLE.ORG")), RcptVerdict::Accept);
        assert_eq!(p.check(&rcpt("x", "example.net")), RcptVerdict::Unknown);
        let long = "a".repeat(300);
        assert_eq!(p.check(&rcpt("x", &long)), RcptVerdict::Unknown);
    }

    #[test]
    fn table_strips_detail_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rcpt");
        std::fs::write(&path, "alice@example.org\nbob+lists@example.org\n").unwrap();
        let spec = PolicySpec::Table {
            path: path.clone(),
            entries_max: 100,
        };
        let (p, loaded) = Policy::new(&spec).unwrap();
        assert_eq!(loaded.unwrap().entries, 2);
        assert_eq!(p.check(&rcpt("alice", "Example.org")), RcptVerdict::Accept);
        assert_eq!(
            p.check(&rcpt("alice+news", "example.org")),
            RcptVerdict::Accept
        );
        // A listed address with its detail matches as written.
        assert_eq!(
            p.check(&rcpt("bob+lists", "example.org")),
            RcptVerdict::Accept
        );
        assert_eq!(p.check(&rcpt("bob", "example.org")), RcptVerdict::Unknown);
        assert_eq!(p.check(&rcpt("carol", "example.org")), RcptVerdict::Unknown);

        std::fs::write(&path, "carol@example.org\n").unwrap();
        assert_eq!(p.reload().unwrap().unwrap().entries, 1);
        assert_eq!(p.check(&rcpt("carol", "example.org")), RcptVerdict::Accept);
        assert_eq!(p.check(&rcpt("alice", "example.org")), RcptVerdict::Unknown);

        // A bad file is refused, naming file and line; the old table stays.
        std::fs::write(&path, "dave@example.org\nbroken line\n").unwrap();
        let e = p.reload().unwrap_err().to_string();
        assert!(e.contains(&format!("{}:2:", path.display())), "{e}");
        assert_eq!(p.check(&rcpt("carol", "example.org")), RcptVerdict::Accept);
        assert_eq!(p.check(&rcpt("dave", "example.org")), RcptVerdict::Unknown);
    }

    #[test]
    fn empty_table_is_refused_at_start_and_on_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rcpt");
        let spec = PolicySpec::Table {
            path: path.clone(),
            entries_max: 100,
        };
        for text in ["", "# only comments\n\n   \n"] {
            std::fs::write(&path, text).unwrap();
            let e = Policy::new(&spec).unwrap_err();
            let s = e.to_string();
            assert_eq!(e.line, 0);
            assert!(
                s.starts_with(&format!("{}: no address", path.display()))
                    && s.contains("every recipient would be refused")
                    && s.contains("rename(2)"),
                "{s}"
            );
        }

        std::fs::write(&path, "alice@example.org\n").unwrap();
        let (p, _) = Policy::new(&spec).unwrap();
        // Truncated by a careless rewrite: refused, the old table stays.
        std::fs::write(&path, "").unwrap();
        let e = p.reload().unwrap_err().to_string();
        assert!(e.contains("no address"), "{e}");
        assert_eq!(p.check(&rcpt("alice", "example.org")), RcptVerdict::Accept);
        // Gone: the path and the OS error, no line number.
        std::fs::remove_file(&path).unwrap();
        let e = p.reload().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: cannot open: ", path.display())),
            "{e}"
        );
        assert_eq!(p.check(&rcpt("alice", "example.org")), RcptVerdict::Accept);
        // Counted for the metrics endpoint: two refused, then one taken.
        std::fs::write(&path, "bob@example.org\n").unwrap();
        p.reload().unwrap();
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((n(&p.reloads_ok), n(&p.reloads_refused)), (1, 2));
    }

    #[test]
    fn accept_all_has_nothing_to_reload() {
        let (p, _) = Policy::new(&PolicySpec::AcceptAll).unwrap();
        assert_eq!(
            p.check(&rcpt("anyone", "anywhere.example")),
            RcptVerdict::Accept
        );
        assert!(p.reload().unwrap().is_none());
    }
}
