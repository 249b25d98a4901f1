//! Retention: removing segments nobody needs any more.
//!
//! With consumers registered, a segment is removed once every consumer's
//! position in its stream is in a later segment. With none registered and an
//! age limit set, a segment is removed once its last write is older than the
//! limit. The last segment of each stream is never removed (a writer may be
//! appending to it), so a stream's sequence and watermark always survive.
//!
//! Must not: remove anything a registered consumer has not passed.

use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::follow::{self, group};
use super::fs::Storage;
use super::reader;

/// What one retention pass removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    pub removed: Vec<String>,
    pub bytes: u64,
}

/// Removes what the rules allow from the spool in `dir`.
pub fn run(
    dir: &Path,
    storage: &dyn Storage,
    age_max: Option<Duration>,
    now: SystemTime,
) -> io::Result<RetentionReport> {
    let consumers = follow::load_consumers(dir)?;
    let mut rep = RetentionReport::default();
    for (w, segs) in group(reader::list_segments(dir)?) {
        let Some((_, older)) = segs.split_last() else {
            continue;
        };
        for s in older {
            let remove = if !consumers.is_empty() {
                consumers
                    .iter()
                    .all(|c| c.positions.get(&w).is_some_and(|p| p.segment > s.id.index))
            } else if let Some(age) = age_max {
                let modified = std::fs::metadata(&s.path)?.modified()?;
                now.duration_since(modified).is_ok_and(|d| d > age)
            } else {
                false
            };
            if remove {
                storage.remove(&s.path)?;
                rep.removed.push(s.id.file_name());
                rep.bytes += s.len;
            }
        }
    }
    if !rep.removed.is_empty() {
        storage.sync_dir(dir)?;
    }
    Ok(rep)
}
