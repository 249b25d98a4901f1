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
//! Must not: write segments, or move a saved position backwards.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a consumer state file: {e}", path.display()),
        )
    })
}

fn save(dir: &Path, state: &ConsumerState) -> io::Result<()> {
    let cdir = consumers_dir(dir);
    if !cdir.exists() {
        std::fs::create_dir_all(&cdir)?;
        File::open(dir)?.sync_all()?;
    }
    let path = cdir.join(format!("{}.json", state.name));
    let tmp = cdir.join(format!(".{}.json.tmp", state.name));
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    File::open(&cdir)?.sync_all()
}

/// Reads committed records for one named consumer.
pub struct Follower {
    dir: PathBuf,
    state: ConsumerState,
    saved: ConsumerState,
    open: HashMap<u16, (u64, File)>,
}

impl Follower {
    /// Loads consumer `name`, registering it (saved at once, so retention
    /// keeps what it has not read) if it is new.
    pub fn open(dir: &Path, name: &str, start: Start) -> io::Result<Follower> {
        if !valid_consumer_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("consumer name '{name}' must be 1 to 64 of A-Z a-z 0-9 _ -"),
            ));
        }
        let path = consumers_dir(dir).join(format!("{name}.json"));
        let state = if path.exists() {
            load(&path)?
        } else {
            let mut positions = BTreeMap::new();
            let groups = group(reader::list_segments(dir)?);
            for (&w, segs) in &groups {
                let first = Position {
                    segment: segs[0].id.index,
                    offset: SEGMENT_HEADER_LEN,
                };
                let p = match (start, watermark::read(dir, w)?) {
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
            save(dir, &s)?;
            s
        };
        Ok(Follower {
            dir: dir.to_path_buf(),
            saved: state.clone(),
            state,
            open: HashMap::new(),
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
