//! Exporting spooled messages as a local delivery agent would: one copy per
//! recipient, with `Return-Path:` (the envelope sender) and `Delivered-To:`
//! (the recipient address as given, +detail included) added on top.
//!
//! Formats:
//! - `maildir`: `TO/<mailbox>/{tmp,new,cur}`; each file written in `tmp/`,
//!   synced, renamed into `new/`, directory synced (the Maildir protocol).
//!   File names are `<unix secs>.Q<queue id>R<recipient index>.<host>`, the
//!   same on every run, so exporting twice does not deliver twice.
//! - `mbox`: `TO/<mailbox>.mbox`, mboxrd (`>From ` quoting), one `From `
//!   line per message, synced after each run. Beside each, `TO/.<mailbox>.mbox.ids`
//!   lists the deliveries it holds (`<queue id>R<recipient index>`, one per
//!   line, appended only after the mbox is synced, every
//!   [`MBOX_IDS_EVERY`] deliveries and at the end), so exporting twice does
//!   not append twice either; a run killed in between appends those copies
//!   again on the next (a duplicate, never a loss).
//! - `eml`: `TO/<queue id>-<recipient index>.eml`, one RFC 5322 file per
//!   delivery, written under a temporary name and renamed.
//!
//! `<mailbox>` is the recipient's base address (the detail removed, the
//! domain in lower case) made safe
//! for any file system: bytes outside `[A-Za-z0-9@._+=-]` become `%XX`, a
//! leading dot is escaped (no `.`, `..` or hidden names), and a name longer
//! than 200 bytes is cut and given a checksum suffix. No recipient string can
//! name a path outside `TO`.
//!
//! Line endings: the spool keeps the body as received (CRLF). Maildir and
//! mbox files use LF, as Unix mail readers expect; eml keeps CRLF.
//!
//! Must not: change the spool.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::reader::StoredRecord;
use super::timefmt;
use crate::envelope::{Recipient, ReversePath};

/// An export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Maildir,
    Mbox,
    Eml,
}

/// Counts of one export run.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportSummary {
    pub messages: u64,
    /// Copies written (one per recipient).
    pub deliveries: u64,
    /// Copies already present from an earlier run.
    pub skipped: u64,
}

/// A file-system-safe name for an address (see the module doc).
pub fn safe_name(addr: &str) -> String {
    let mut s = String::with_capacity(addr.len());
    for (i, b) in addr.bytes().enumerate() {
        let ok = b.is_ascii_alphanumeric() || b"@_+=-".contains(&b) || (b == b'.' && i > 0);
        if ok {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    if s.is_empty() {
        s.push_str("%00");
    }
    if s.len() > 200 {
        let crc = crc32c::crc32c(addr.as_bytes());
        s.truncate(180);
        // Cut on a whole escape: `%XX` never straddles the cut.
        while s.ends_with('%') || s[..s.len() - 1].ends_with('%') {
            s.pop();
        }
        s.push_str(&format!("~{crc:08x}"));
    }
    s
}

fn sender_text(r: &ReversePath) -> String {
    r.to_string()
}

/// The mailbox a recipient is delivered to: its address without the detail.
/// The mailbox a delivery goes to: the base address with its domain in
/// lower case (domains are case-insensitive, RFC 5321 section 2.4; the local
/// part is kept as given, since only the receiving host may fold it).
fn mailbox_of(r: &Recipient) -> String {
    let local = r.detail.as_ref().map_or(&r.mailbox.local, |d| &d.base);
    let folded = crate::envelope::Mailbox {
        local: local.clone(),
        domain: r.mailbox.domain.to_ascii_lowercase(),
    };
    safe_name(&folded.address())
}

/// `Return-Path:` and `Delivered-To:` then the body, with `eol` line endings.
fn delivery_bytes(rec: &StoredRecord, rcpt: &Recipient, eol: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rec.body.len() + 200);
    out.extend_from_slice(b"Return-Path: ");
    out.extend_from_slice(sender_text(&rec.envelope.reverse_path).as_bytes());
    out.extend_from_slice(eol);
    out.extend_from_slice(b"Delivered-To: ");
    out.extend_from_slice(rcpt.mailbox.address().as_bytes());
    out.extend_from_slice(eol);
    if eol == b"\r\n" {
        out.extend_from_slice(&rec.body);
    } else {
        // CRLF -> LF; a lone CR or LF is kept as it is.
        let b = &rec.body;
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
                out.push(b'\n');
                i += 2;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

fn host_name() -> String {
    let raw =
        fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
    // Maildir: '/' and ':' in the host part are written \057 and \072.
    raw.trim().replace('/', "\\057").replace(':', "\\072")
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Deliveries appended to an mbox before it is synced and their keys
/// listed in its `.ids` file (bounds the keys held in memory per run).
pub const MBOX_IDS_EVERY: usize = 1024;

/// One mbox being appended to, with the deliveries it already holds.
struct MboxFile {
    mbox: File,
    ids: File,
    seen: HashSet<String>,
    /// Keys of deliveries appended but not yet synced and listed.
    pending: Vec<String>,
}

impl MboxFile {
    fn open(to: &Path, mailbox: &str) -> io::Result<MboxFile> {
        let mbox = OpenOptions::new()
            .create(true)
            .append(true)
            .open(to.join(format!("{mailbox}.mbox")))?;
        let ids_path = to.join(format!(".{mailbox}.mbox.ids"));
        let seen = match fs::read_to_string(&ids_path) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e),
        };
        let ids = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ids_path)?;
        Ok(MboxFile {
            mbox,
            ids,
            seen,
            pending: Vec::new(),
        })
    }

    /// Syncs the mbox, then lists what it now durably holds: a key never
    /// reaches `.ids` before its message is on disk, or a power cut could
    /// leave a key whose message is gone and no later run would write it.
    fn list_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.mbox.sync_data()?;
        let mut text = String::with_capacity(self.pending.len() * 32);
        for k in self.pending.drain(..) {
            text.push_str(&k);
            text.push('\n');
        }
        self.ids.write_all(text.as_bytes())
    }
}

/// Writes the deliveries of spooled records in one format.
pub struct Exporter {
    format: Format,
    to: PathBuf,
    host: String,
    mbox_files: HashMap<String, MboxFile>,
    made_dirs: HashMap<String, ()>,
    pub summary: ExportSummary,
}

impl Exporter {
    pub fn new(format: Format, to: &Path) -> io::Result<Exporter> {
        fs::create_dir_all(to)?;
        Ok(Exporter {
            format,
            to: to.to_path_buf(),
            host: host_name(),
            mbox_files: HashMap::new(),
            made_dirs: HashMap::new(),
            summary: ExportSummary::default(),
        })
    }

    /// Delivers one record to each of its recipients.
    pub fn export(&mut self, rec: &StoredRecord) -> io::Result<()> {
        self.summary.messages += 1;
        for (i, rcpt) in rec.envelope.recipients.iter().enumerate() {
            let written = match self.format {
                Format::Maildir => self.maildir(rec, i, rcpt)?,
                Format::Mbox => self.mbox(rec, i, rcpt)?,
                Format::Eml => self.eml(rec, i, rcpt)?,
            };
            if written {
                self.summary.deliveries += 1;
            } else {
                self.summary.skipped += 1;
            }
        }
        Ok(())
    }

    fn maildir(&mut self, rec: &StoredRecord, i: usize, rcpt: &Recipient) -> io::Result<bool> {
        let mailbox = mailbox_of(rcpt);
        let md = self.to.join(&mailbox);
        if !self.made_dirs.contains_key(&mailbox) {
            for sub in ["tmp", "new", "cur"] {
                fs::create_dir_all(md.join(sub))?;
            }
            sync_dir(&self.to)?;
            self.made_dirs.insert(mailbox.clone(), ());
        }
        let name = format!(
            "{}.Q{}R{}.{}",
            rec.header.received_at_us / 1_000_000,
            rec.header.queue_id,
            i,
            self.host
        );
        let new = md.join("new").join(&name);
        if new.exists() {
            return Ok(false);
        }
        let tmp = md.join("tmp").join(&name);
        let _ = fs::remove_file(&tmp); // a leftover of an interrupted run
        write_synced(&tmp, &delivery_bytes(rec, rcpt, b"\n"))?;
        fs::rename(&tmp, &new)?;
        sync_dir(&md.join("new"))?;
        Ok(true)
    }

    fn mbox(&mut self, rec: &StoredRecord, i: usize, rcpt: &Recipient) -> io::Result<bool> {
        let mailbox = mailbox_of(rcpt);
        if !self.mbox_files.contains_key(&mailbox) {
            let f = MboxFile::open(&self.to, &mailbox)?;
            self.mbox_files.insert(mailbox.clone(), f);
        }
        let f = self.mbox_files.get_mut(&mailbox).expect("inserted above");
        let key = format!("{}R{i}", rec.header.queue_id);
        if f.seen.contains(&key) {
            return Ok(false);
        }
        let from = match &rec.envelope.reverse_path {
            ReversePath::Null => "MAILER-DAEMON".to_string(),
            ReversePath::Mailbox(m) => m.address(),
        };
        let mut out = format!(
            "From {from} {}\n",
            timefmt::asctime(rec.header.received_at_us)
        )
        .into_bytes();
        let msg = delivery_bytes(rec, rcpt, b"\n");
        // mboxrd: any line that is `>*From ` gets one more `>`.
        for line in msg.split_inclusive(|&b| b == b'\n') {
            let stripped = line.iter().position(|&b| b != b'>').unwrap_or(line.len());
            if line[stripped..].starts_with(b"From ") {
                out.push(b'>');
            }
            out.extend_from_slice(line);
        }
        if !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        out.push(b'\n');
        f.mbox.write_all(&out)?;
        f.seen.insert(key.clone());
        f.pending.push(key);
        if f.pending.len() >= MBOX_IDS_EVERY {
            f.list_pending()?;
        }
        Ok(true)
    }

    fn eml(&mut self, rec: &StoredRecord, i: usize, rcpt: &Recipient) -> io::Result<bool> {
        let path = self.to.join(format!("{}-{i}.eml", rec.header.queue_id));
        if path.exists() {
            return Ok(false);
        }
        let tmp = self
            .to
            .join(format!(".{}-{i}.eml.tmp", rec.header.queue_id));
        let _ = fs::remove_file(&tmp);
        write_synced(&tmp, &delivery_bytes(rec, rcpt, b"\r\n"))?;
        fs::rename(&tmp, &path)?;
        Ok(true)
    }

    /// Syncs what is still open and the target directory.
    pub fn finish(mut self) -> io::Result<ExportSummary> {
        for (_, mut f) in self.mbox_files.drain() {
            f.list_pending()?;
            f.mbox.sync_all()?;
            f.ids.sync_all()?;
        }
        sync_dir(&self.to)?;
        Ok(self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailboxes_fold_the_domain_not_the_local_part() {
        let r = crate::proto::address::split_detail(
            crate::envelope::Mailbox {
                local: "Carol+news".into(),
                domain: "EXAMPLE.Org".into(),
            },
            "+",
        );
        assert_eq!(mailbox_of(&r), "Carol@example.org");
        let plain = Recipient {
            mailbox: crate::envelope::Mailbox {
                local: "carol".into(),
                domain: "Example.ORG".into(),
            },
            detail: None,
        };
        assert_eq!(mailbox_of(&plain), "carol@example.org");
    }

    #[test]
    fn safe_names_cannot_escape_or_hide() {
        assert_eq!(safe_name("user@example.org"), "user@example.org");
        assert_eq!(safe_name("../../etc/passwd"), "%2E.%2F..%2Fetc%2Fpasswd");
        assert_eq!(safe_name(".hidden@x"), "%2Ehidden@x");
        assert_eq!(safe_name("\"john doe\"@x"), "%22john%20doe%22@x");
        assert_eq!(safe_name("a\0b/c"), "a%00b%2Fc");
        assert_eq!(safe_name(""), "%00");
        assert_eq!(safe_name("ü@x"), "%C3%BC@x");
        let long = "x".repeat(300) + "@example.org";
        let s = safe_name(&long);
        assert!(s.len() <= 200 && s.contains('~'));
        assert_ne!(s, safe_name(&("x".repeat(301) + "@example.org")));
        for s in [safe_name(".."), safe_name("."), safe_name("/")] {
            assert!(!s.starts_with('.') && !s.contains('/'), "{s}");
        }
    }
}
