//! Following the spool: named consumers that read each committed record once,
//! in order within each writer stream, and resume after a restart.
//!
//! A consumer is a file `DIR/consumers/<name>.json` holding, per writer
//! stream, the position of the next record to read (segment index, offset).
//! It is replaced atomically (write a temporary file, fsync, rename, fsync the
//! directory), so after a crash it holds the last position saved. Saving after
//! a record has been processed gives at-least-once processing; a consumer that
//! must not see a message twice dedupes by queue id.
//!
//! A follower reads only up to each stream's committed watermark, so it never
//! sees a record that is not covered by a successful fdatasync. Retention
//! removes only segments that every registered consumer has passed.
//!
//! One follower per consumer: [`Follower`] holds `flock(LOCK_EX | LOCK_NB)` on
//! `DIR/consumers/<name>.lock` for its life (the holder's pid is written into
//! it for the error message of the next one who tries). Without it, two
//! followers of one name hand the same messages out twice and race on the
//! temporary file of each other's saves. The lock is per consumer, not the
//! server's spool lock, so followers run beside the server and beside each
//! other. The file is left in place when the lock is dropped (removing it
//! would let a third follower lock a new file while a second still holds the
//! old one); only `*.json` files are consumers, so retention never reads it.
//!
//! Must not: write segments, or move a saved position backwards.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lock::{self, PidLockError};
use super::reader::{self, ReadAt, SegmentInfo, StoredRecord};
use super::segment::SEGMENT_HEADER_LEN;
use super::watermark::{self, Watermark};

/// Where a consumer stands in one writer stream: the next record to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// A consumer's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    pub name: String,
    /// Per writer stream; a stream not listed is read from its first segment.
    pub positions: BTreeMap<u16, Position>,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Start {
    /// Every record still in the spool.
    Beginning,
    /// Only records committed from now on.
    End,
}

/// Consumer names: 1 to 64 of `[A-Za-z0-9_-]` (they name a file).
pub fn valid_consumer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn consumers_dir(dir: &Path) -> PathBuf {
    dir.join("consumers")
}

/// Every registered consumer.
pub fn load_consumers(dir: &Path) -> io::Result<Vec<ConsumerState>> {
    let cdir = consumers_dir(dir);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&cdir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            out.push(load(&path)?);
        }
    }
    Ok(out)
}

fn load(path: &Path) -> io::Result<ConsumerState> {
    let bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a consumer state file: {e}", path.display()),
        )
    })
}

/// `err` with what was being done (`what`, naming the path) in front, and,
/// when the cause is a permission, who owns `dir` and what to do.
fn context(what: String, dir: &Path, err: io::Error) -> io::Error {
    let hint = match err.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            // SAFETY: geteuid has no preconditions and touches no memory.
            let uid = unsafe { libc::geteuid() };
            let owner = std::fs::metadata(dir)
                .map(|m| format!("owned by uid {}", m.uid()))
                .unwrap_or_else(|_| "owner unknown".into());
            format!(
                "; this follower runs as uid {uid} and cannot write in {} ({owner}): run it as the spool's owner, or fix that directory's permissions (chown or chmod)",
                dir.display()
            )
        }
        Some(libc::EROFS) => format!(
            "; {} is on a read-only file system: a follower must save its position there",
            dir.display()
        ),
        _ => String::new(),
    };
    io::Error::new(err.kind(), format!("{what}: {err}{hint}"))
}

/// Creates `DIR/consumers` if missing (and makes its entry durable).
fn create_consumers_dir(dir: &Path) -> io::Result<PathBuf> {
    let cdir = consumers_dir(dir);
    if !cdir.exists() {
        std::fs::create_dir_all(&cdir)
            .map_err(|e| context(format!("creating {}", cdir.display()), dir, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| context(format!("syncing {}", dir.display()), dir, e))?;
    }
    Ok(cdir)
}

fn save(dir: &Path, state: &ConsumerState) -> io::Result<()> {
    let cdir = create_consumers_dir(dir)?;
    let path = cdir.join(format!("{}.json", state.name));
    let tmp = cdir.join(format!(".{}.json.tmp", state.name));
    let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .map_err(|e| context(format!("writing {}", tmp.display()), &cdir, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        context(
            format!("renaming {} to {}", tmp.display(), path.display()),
            &cdir,
            e,
        )
    })?;
    File::open(&cdir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context(format!("syncing {}", cdir.display()), &cdir, e))
}

/// Takes consumer `name`'s lock, `DIR/consumers/<name>.lock`, without
/// waiting ([`lock::pid_lock`], as the spool's lock).
fn lock_consumer(dir: &Path, name: &str) -> io::Result<File> {
    let cdir = create_consumers_dir(dir)?;
    let path = cdir.join(format!("{name}.lock"));
    lock::pid_lock(&path).map_err(|e| match e {
        PidLockError::Open(e) => context(format!("opening {}", path.display()), &cdir, e),
        PidLockError::Busy { holder } => {
            // Empty when the holder has locked but not yet written its pid.
            let holder = if holder.is_empty() {
                "pid not yet written".to_string()
            } else {
                holder
            };
            io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "already followed by another process ({holder}, holding {}); run one follower per consumer: stop that one, or give this one another consumer name (--consumer)",
                    path.display()
                ),
            )
        }
        PidLockError::Flock(e) => context(format!("locking {}", path.display()), &cdir, e),
        PidLockError::Write(e) => context(format!("writing {}", path.display()), &cdir, e),
    })
}

/// Reads committed records for one named consumer.
pub struct Follower {
    dir: PathBuf,
    state: ConsumerState,
    saved: ConsumerState,
    open: HashMap<u16, (u64, File)>,
    /// The consumer's lock, held while this value lives.
    _lock: File,
}

impl Follower {
    /// Takes consumer `name`'s lock, then loads it, registering it (saved at
    /// once, so retention keeps what it has not read) if it is new. Fails
    /// with [`io::ErrorKind::ResourceBusy`], naming the holder's pid, while
    /// another follower of `name` (in any process) is open. Every error
    /// names the consumer.
    pub fn open(dir: &Path, name: &str, start: Start) -> io::Result<Follower> {
        if !valid_consumer_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("consumer name '{name}' must be 1 to 64 of A-Z a-z 0-9 _ -"),
            ));
        }
        let named = |e: io::Error| io::Error::new(e.kind(), format!("consumer {name}: {e}"));
        let lock = lock_consumer(dir, name).map_err(named)?;
        let path = consumers_dir(dir).join(format!("{name}.json"));
        let state = if path.exists() {
            load(&path).map_err(named)?
        } else {
            let mut positions = BTreeMap::new();
            let groups = group(reader::list_segments(dir).map_err(named)?);
            for (&w, segs) in &groups {
                let first = Position {
                    segment: segs[0].id.index,
                    offset: SEGMENT_HEADER_LEN,
                };
                let p = match (start, watermark::read(dir, w).map_err(named)?) {
                    (Start::End, Some(wm)) => Position {
                        segment: wm.segment,
                        offset: wm.offset,
                    },
                    _ => first,
                };
                positions.insert(w, p);
            }
            let s = ConsumerState {
                name: name.to_string(),
                positions,
            };
            save(dir, &s).map_err(named)?;
            s
        };
        Ok(Follower {
            dir: dir.to_path_buf(),
            saved: state.clone(),
            state,
            open: HashMap::new(),
            _lock: lock,
        })
    }

    /// The positions as read so far (saved or not).
    pub fn state(&self) -> &ConsumerState {
        &self.state
    }

    /// Saves the positions of everything returned by `poll` so far.
    pub fn save(&mut self) -> io::Result<()> {
        if self.state != self.saved {
            save(&self.dir, &self.state)?;
            self.saved = self.state.clone();
        }
        Ok(())
    }

    /// Up to `max` committed records not yet returned, stream by stream.
    /// Empty when the consumer has caught up.
    pub fn poll(&mut self, max: usize) -> io::Result<Vec<StoredRecord>> {
        let mut out = Vec::new();
        let groups = group(reader::list_segments(&self.dir)?);
        for (&w, segs) in &groups {
            let Some(wm) = watermark::read(&self.dir, w)? else {
                continue;
            };
            let pos = self.state.positions.entry(w).or_insert(Position {
                segment: segs[0].id.index,
                offset: SEGMENT_HEADER_LEN,
            });
            // Each turn returns a record or moves to a later segment: bounded
            // by the records and segments below the watermark.
            while out.len() < max && (pos.segment, pos.offset) < (wm.segment, wm.offset) {
                let Some(info) = segs.iter().find(|s| s.id.index == pos.segment) else {
                    // Removed by retention, or never created: go to the next.
                    if !next_segment(pos, segs) {
                        break;
                    }
                    continue;
                };
                let file = match self.open.get(&w) {
                    Some((idx, f)) if *idx == pos.segment => f,
                    _ => match File::open(&info.path) {
                        Ok(f) => {
                            self.open.insert(w, (pos.segment, f));
                            &self.open[&w].1
                        }
                        // Removed since the listing (by retention: every
                        // consumer, so also this one, had passed it).
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            if !next_segment(pos, segs) {
                                break;
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    },
                };
                match reader::read_record_at(file, info.id, pos.offset, info.len)? {
                    ReadAt::Record(r) => {
                        pos.offset += r.padded_len;
                        out.push(*r);
                    }
                    ReadAt::End | ReadAt::Invalid(_) => {
                        // The rest of a sealed segment (below the watermark's
                        // segment) holds no committed record.
                        if pos.segment >= wm.segment || !next_segment(pos, segs) {
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The committed watermark of every stream, for callers that report lag.
    pub fn watermarks(&self) -> io::Result<BTreeMap<u16, Watermark>> {
        let mut out = BTreeMap::new();
        for (w, _) in group(reader::list_segments(&self.dir)?) {
            if let Some(wm) = watermark::read(&self.dir, w)? {
                out.insert(w, wm);
            }
        }
        Ok(out)
    }
}

/// Moves `pos` to the start of the first segment after it; false if none.
fn next_segment(pos: &mut Position, segs: &[SegmentInfo]) -> bool {
    match segs.iter().find(|s| s.id.index > pos.segment) {
        Some(n) => {
            *pos = Position {
                segment: n.id.index,
                offset: SEGMENT_HEADER_LEN,
            };
            true
        }
        None => false,
    }
}

/// Segments grouped by writer stream, each group in index order.
pub(crate) fn group(segs: Vec<SegmentInfo>) -> BTreeMap<u16, Vec<SegmentInfo>> {
    let mut g: BTreeMap<u16, Vec<SegmentInfo>> = BTreeMap::new();
    for s in segs {
        g.entry(s.id.writer).or_default().push(s);
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_follower_of_a_name_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = Follower::open(dir.path(), "a", Start::Beginning).unwrap();
        let e = Follower::open(dir.path(), "a", Start::Beginning)
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        let msg = e.to_string();
        assert!(msg.starts_with("consumer a: "), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("a.lock"), "{msg}");
        // Another name is another lock.
        let b = Follower::open(dir.path(), "b", Start::End).unwrap();
        drop(a);
        Follower::open(dir.path(), "a", Start::Beginning).unwrap();
        drop(b);
    }

    #[test]
    fn lock_and_temporary_files_are_not_consumers() {
        let dir = tempfile::tempdir().unwrap();
        let f = Follower::open(dir.path(), "a", Start::Beginning).unwrap();
        let cdir = consumers_dir(dir.path());
        assert!(cdir.join("a.lock").exists());
        std::fs::write(cdir.join(".a.json.tmp"), b"{").unwrap();
        let all = load_consumers(dir.path()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name, "a");
        // Dropping the lock leaves its file; still not a consumer.
        drop(f);
        assert!(cdir.join("a.lock").exists());
        assert_eq!(load_consumers(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_permission_error_names_the_path_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = context(
            "writing x/consumers/.a.json.tmp".into(),
            dir.path(),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let msg = e.to_string();
        assert!(
            msg.starts_with("writing x/consumers/.a.json.tmp: "),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains("run it as the spool's owner"), "{msg}");
        // Other errors are passed on with only what was being done.
        let e = context(
            "writing y".into(),
            dir.path(),
            io::Error::from_raw_os_error(libc::EIO),
        );
        assert!(!e.to_string().contains("owner"), "{e}");
    }
}
