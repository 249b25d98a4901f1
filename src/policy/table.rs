//! An address table: the set of deliverable addresses, loaded from a file and
//! looked up at every RCPT.
//!
//! File format: one address per line (`user@example.org`, no angle brackets);
//! blank lines and lines starting with `#` are ignored, and ` #...` after an
//! address is a comment (`#` is legal inside a local part, so it starts a
//! comment only at the start of a line or after white space). Each address is
//! checked with the same parser as `RCPT TO` (UTF-8 allowed).
//!
//! Matching: the domain is compared without regard to ASCII case; the local
//! part is compared exactly as written (RFC 5321 section 2.4 leaves its case
//! to the receiving host, and mailbox stores may treat `Bob` and `bob` as two
//! users), quotes included.
//!
//! Layout, for millions of entries: every key (`local@domain` with the domain
//! in lower case) is appended to one byte arena behind a 2-byte length, and an
//! open-addressing hash table (linear probing, load at most 5/8) holds, per
//! slot, 32 bits of the key's hash and the key's arena offset. A lookup hashes
//! the key once (keyed SipHash: clients choose the addresses they ask about),
//! compares the stored hash bits, and touches the arena only on a probable
//! hit: no allocation, usually one or two cache lines. About 10 bytes per
//! entry beyond the address text.
//!
//! Must not: allocate on lookup; accept a file that does not parse (the caller
//! keeps the old table instead).

use std::hash::BuildHasher;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::proto::address::parse_mailbox;

/// Longest line in a table file, comments included. An address is at most
/// 256 octets (RFC 5321 section 4.5.3.1.3, a path with its brackets).
pub const LINE_BYTES_MAX: usize = 1024;

/// Longest key (`local@domain`) kept; RFC 5321's path limit is 256.
pub const KEY_BYTES_MAX: usize = 512;

/// Why a table file was refused: the file, the line, what is wrong.
#[derive(Debug)]
pub struct TableError {
    pub file: String,
    /// 1-based; 0 when the problem is the file as a whole.
    pub line: usize,
    pub problem: String,
}

/// `FILE:LINE: problem`, or `FILE: problem` for the file as a whole (a
/// missing file has no line 0 to look at).
impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.file)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        write!(f, ": {}; the table was not loaded", self.problem)
    }
}

impl std::error::Error for TableError {}

/// A set of addresses.
pub struct AddressTable {
    /// `[len: u16 LE][key bytes]` for each entry.
    arena: Vec<u8>,
    /// `hash >> 32` in the high half, `arena offset + 1` in the low half; 0 is
    /// an empty slot.
    slots: Vec<u64>,
    entries: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for AddressTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressTable")
            .field("entries", &self.entries)
            .field("arena_bytes", &self.arena.len())
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// Builds `local@domain` with the domain in ASCII lower case into `buf`;
/// `None` when it does not fit (so cannot be in any table).
fn key_into<'a>(buf: &'a mut [u8; KEY_BYTES_MAX], local: &str, domain: &str) -> Option<&'a [u8]> {
    let len = local.len() + 1 + domain.len();
    if len > KEY_BYTES_MAX {
        return None;
    }
    buf[..local.len()].copy_from_slice(local.as_bytes());
    buf[local.len()] = b'@';
    let d = &mut buf[local.len() + 1..len];
    d.copy_from_slice(domain.as_bytes());
    d.make_ascii_lowercase();
    Some(&buf[..len])
}

impl AddressTable {
    /// An empty table with room for `entries` without growing.
    pub fn with_capacity(entries: usize) -> AddressTable {
        // Load factor at most 5/8: short probe sequences on a miss.
        let slots = (entries.saturating_mul(8) / 5 + 1)
            .next_power_of_two()
            .max(16);
        AddressTable {
            arena: Vec::new(),
            slots: vec![0; slots],
            entries: 0,
            hasher: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn key_at(&self, offset: usize) -> &[u8] {
        let len = u16::from_le_bytes([self.arena[offset], self.arena[offset + 1]]) as usize;
        &self.arena[offset + 2..offset + 2 + len]
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: &[u8]) -> (usize, u64) {
        let hash = self.hasher.hash_one(key);
        let tag = hash >> 32;
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        // The table is never full (load <= 5/8), so an empty slot ends
        // every probe sequence; the bound is the table size.
        for _ in 0..self.slots.len() {
            let s = self.slots[i];
            if s == 0 {
                return (i, tag);
            }
            if s >> 32 == tag && self.key_at((s as u32 - 1) as usize) == key {
                return (i, tag);
            }
            i = (i + 1) & mask;
        }
        unreachable!("address table full: load factor invariant broken");
    }

    /// Adds a key; false if it was there already.
    fn insert_key(&mut self, key: &[u8]) -> Result<bool, String> {
        assert!(key.len() <= KEY_BYTES_MAX);
        if (self.entries + 1) * 8 > self.slots.len() * 5 {
            self.grow();
        }
        let (i, tag) = self.find(key);
        if self.slots[i] != 0 {
            return Ok(false);
        }
        let offset = self.arena.len();
        // Offsets are stored in 32 bits (minus the empty marker).
        if offset + 2 + key.len() >= u32::MAX as usize {
            return Err(
                "the table holds more than 4 GiB of addresses; split it or use domains".into(),
            );
        }
        self.arena
            .extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.arena.extend_from_slice(key);
        self.slots[i] = (tag << 32) | (offset as u64 + 1);
        self.entries += 1;
        Ok(true)
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.slots = vec![0; old.len() * 2];
        let mask = self.slots.len() - 1;
        for s in old.into_iter().filter(|s| *s != 0) {
            let key = self.key_at((s as u32 - 1) as usize);
            let mut i = self.hasher.hash_one(key) as usize & mask;
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Adds `local@domain`; false if it was there already.
    pub fn insert(&mut self, local: &str, domain: &str) -> Result<bool, String> {
        let mut buf = [0u8; KEY_BYTES_MAX];
        let key = key_into(&mut buf, local, domain)
            .ok_or_else(|| format!("address longer than {KEY_BYTES_MAX} bytes"))?;
        self.insert_key(key)
    }

    /// Whether `local@domain` is in the table (domain in any ASCII case).
    pub fn contains(&self, local: &str, domain: &str) -> bool {
        let mut buf = [0u8; KEY_BYTES_MAX];
        match key_into(&mut buf, local, domain) {
            Some(key) => self.slots[self.find(key).0] != 0,
            None => false,
        }
    }

    /// Reads a table file. `entries_max` bounds the entries and, at
    /// [`LINE_BYTES_MAX`] each, the bytes read.
    pub fn load(path: &Path, entries_max: usize) -> Result<AddressTable, TableError> {
        let file = path.display().to_string();
        let err = |line: usize, problem: String| TableError {
            file: file.clone(),
            line,
            problem,
        };
        let f = std::fs::File::open(path).map_err(|e| {
            err(
                0,
                format!(
                    "cannot open: {e}; check that policy.table names the file and that the server's user may read it (replace the table by rename(2), never by removing it first)"
                ),
            )
        })?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        let bytes_max = entries_max.saturating_mul(LINE_BYTES_MAX) as u64;
        if size > bytes_max {
            return Err(err(
                0,
                format!(
                    "{size} bytes is more than policy.table_entries_max ({entries_max}) lines of {LINE_BYTES_MAX} bytes; raise table_entries_max"
                ),
            ));
        }
        // A rough size hint: ~24 bytes per line.
        let mut table = AddressTable::with_capacity((size / 24) as usize);
        // One byte over the line limit tells a long line from a full one.
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut line = Vec::with_capacity(LINE_BYTES_MAX + 1);
        let mut number = 0usize;
        let mut bytes_read = 0u64;
        loop {
            line.clear();
            let n = (&mut r)
                .take(LINE_BYTES_MAX as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| err(number + 1, format!("read error: {e}")))?;
            if n == 0 {
                break;
            }
            number += 1;
            // The file may grow while it is read; the bound holds anyway.
            bytes_read += n as u64;
            if bytes_read > bytes_max {
                return Err(err(
                    number,
                    format!(
                        "more than {bytes_max} bytes (policy.table_entries_max lines of {LINE_BYTES_MAX}); raise table_entries_max"
                    ),
                ));
            }
            if line.last() == Some(&b'\n') {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            } else if line.len() > LINE_BYTES_MAX {
                return Err(err(
                    number,
                    format!("line longer than {LINE_BYTES_MAX} bytes"),
                ));
            }
            let text = std::str::from_utf8(&line).map_err(|_| err(number, "not UTF-8".into()))?;
            let Some(addr) = strip_comment(text) else {
                continue;
            };
            let mb = parse_mailbox(addr.as_bytes(), true).map_err(|_| {
                err(
                    number,
                    format!("'{addr}' is not an address (write user@example.org, one per line)"),
                )
            })?;
            if table.entries >= entries_max {
                return Err(err(
                    number,
                    format!("more than policy.table_entries_max ({entries_max}) entries; raise it"),
                ));
            }
            table
                .insert(&mb.local, &mb.domain)
                .map_err(|problem| err(number, problem))?;
        }
        Ok(table)
    }
}

/// The address on a line, or `None` for a blank or comment line. Errors
/// (white space inside) surface as a parse failure of the returned text.
fn strip_comment(line: &str) -> Option<&str> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    // ` #` or `\t#` starts a trailing comment.
    let end = t
        .char_indices()
        .find(|&(i, c)| c == '#' && t[..i].ends_with([' ', '\t']))
        .map_or(t.len(), |(i, _)| i);
    Some(t[..end].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: impl AsRef<[u8]>) -> Result<AddressTable, TableError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rcpt");
        std::fs::write(&p, text).unwrap();
        AddressTable::load(&p, 1000)
    }

    #[test]
    fn lookups_fold_the_domain_not_the_local_part() {
        let t = load_text(
            "# users\n\nalice@Example.ORG\r\n  bob@example.org   # the builder\nfo#o@example.org\n\"j doe\"@example.org\n",
        )
        .unwrap();
        assert_eq!(t.len(), 4);
        assert!(t.contains("alice", "example.org"));
        assert!(t.contains("alice", "EXAMPLE.org"));
        assert!(!t.contains("Alice", "example.org"));
        assert!(t.contains("bob", "example.org"));
        assert!(t.contains("fo#o", "example.org"));
        assert!(t.contains("\"j doe\"", "example.org"));
        assert!(!t.contains("carol", "example.org"));
        assert!(!t.contains("alice", "example.net"));
        assert!(!t.contains(&"x".repeat(600), "example.org"));
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = load_text("a@example.org\nnot an address\n").unwrap_err();
        assert_eq!(e.line, 2);
        let s = e.to_string();
        assert!(s.contains("rcpt:2:") && s.contains("not an address"), "{s}");
        let e = load_text(format!("a@example.org\n{}@x.org\n", "a".repeat(2000))).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.problem.contains("longer than"), "{e}");
        let e = load_text(b"a@example.org\nb\xffc@x\n").unwrap_err();
        assert_eq!(e.line, 2);
        let dir = tempfile::tempdir().unwrap();
        // A missing file: the path and the OS error, no line number.
        let missing = dir.path().join("missing");
        let e = AddressTable::load(&missing, 10).unwrap_err();
        assert_eq!(e.line, 0);
        let s = e.to_string();
        assert!(
            s.starts_with(&format!("{}: cannot open: ", missing.display()))
                && s.contains("No such file")
                && s.contains("policy.table"),
            "{s}"
        );
        assert!(!s.contains(":0:"), "{s}");
    }

    #[test]
    fn entries_are_bounded() {
        let text: String = (0..20).map(|i| format!("u{i}@example.org\n")).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rcpt");
        std::fs::write(&p, &text).unwrap();
        let e = AddressTable::load(&p, 10).unwrap_err();
        assert!(e.problem.contains("table_entries_max"), "{e}");
        assert_eq!(AddressTable::load(&p, 20).unwrap().len(), 20);
    }

    #[test]
    fn grows_and_deduplicates() {
        let mut t = AddressTable::with_capacity(0);
        for i in 0..10_000 {
            assert!(t.insert(&format!("user{i}"), "Example.org").unwrap());
        }
        assert!(!t.insert("user7", "example.ORG").unwrap());
        assert_eq!(t.len(), 10_000);
        for i in 0..10_000 {
            assert!(t.contains(&format!("user{i}"), "example.org"));
            assert!(!t.contains(&format!("user{i}x"), "example.org"));
        }
    }
}
