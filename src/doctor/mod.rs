//! `lmtp-ingest doctor`: checks that a machine can run the server well, and
//! says how to fix what it finds.
//!
//! Parts, one job each: [`checks`] (kernel, io_uring, limits, sysctls, CPUs,
//! cgroup memory: read-only looks at `/proc` and `/sys`), [`spool`] (the spool
//! directory, its file system, its free space), [`fsync`] (a measured
//! fdatasync latency on the spool's file system, like `pg_test_fsync`),
//! [`fill`] (allocated against zero-filled segments by batch size),
//! [`advice`] (writers, batch window, the commit ceiling and the segment
//! fill line derived from those measurements), [`render`] (aligned text for people; the JSON form is
//! [`Report`]'s serde form).
//!
//! Every check has a status (`ok`, `warn`, `fail`), the measured value, and
//! for every `warn` or `fail` the exact fix: a command or a configuration
//! line. Exit status of the command: 0 all ok, 1 a warn or fail, 2 could not
//! run.
//!
//! Must not: change the machine. The only things written are the fsync
//! and fill measurements' temporary files in the spool directory (or, when that does
//! not exist yet, in its nearest existing parent), removed before returning.
//! Doctor never takes the spool's lock and never reads its segments, so it
//! can run beside a live server (whose I/O then shows in the measurement).

pub mod advice;
pub mod checks;
pub mod fill;
pub mod fsync;
pub mod render;
pub mod spool;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One finding: what was looked at, what was found, and the fix when it is
/// not `ok`.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Short stable name, e.g. `io_uring`, `rlimit_nofile`, `spool_fs`.
    pub name: String,
    pub status: Status,
    /// The measured value, in words and numbers.
    pub value: String,
    /// The exact fix (a command or a configuration line); `None` when ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: &str, value: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Ok,
            value: value.into(),
            fix: None,
        }
    }

    pub fn warn(name: &str, value: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Warn,
            value: value.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(name: &str, value: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Fail,
            value: value.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What to run against.
#[derive(Clone, Debug)]
pub struct Options {
    /// The configuration the server would run with (file and defaults).
    pub config: Config,
    /// Where the configuration came from, for the report.
    pub config_source: String,
    /// How long the fdatasync measurement may take in all (both modes).
    pub fsync_duration: Duration,
}

/// Counts of each status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub warn: usize,
    pub fail: usize,
}

/// Everything doctor found. Its serde form is the `--json` output.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub config_source: String,
    pub spool_dir: PathBuf,
    pub checks: Vec<Check>,
    /// `None` when the spool's file system could not be written to (a failed
    /// check says why).
    pub fsync: Option<fsync::FsyncReport>,
    pub advice: Vec<advice::Advice>,
    pub summary: Summary,
    /// 0 all ok, 1 a warn or fail.
    pub exit_status: u8,
}

/// Runs every check and the measurement. `Err` only when doctor itself cannot
/// run (the caller exits 2); everything about the machine is a [`Check`].
pub fn run(opts: &Options) -> Result<Report, String> {
    let config = &opts.config;
    config
        .check()
        .map_err(|e| format!("the configuration does not pass the server's own checks: {e}"))?;
    let mut list = Vec::new();
    list.extend(checks::system(config));
    let spool_found = spool::inspect(config);
    list.extend(spool_found.checks.iter().cloned());
    let fsync = match &spool_found.measure_dir {
        Some(dir) => match fsync::measure(dir, opts.fsync_duration) {
            Ok(r) => {
                list.push(fsync::check(&r));
                Some(r)
            }
            Err(e) => {
                list.push(Check::fail(
                    "spool_fsync",
                    format!("could not measure in {}: {e}", dir.display()),
                    format!(
                        "make {} writable by the server's user (chown lmtp-ingest: {0}) and run doctor as that user",
                        dir.display()
                    ),
                ));
                None
            }
        },
        None => None,
    };
    let (advice, advice_checks) = advice::derive(config, fsync.as_ref(), &spool_found);
    list.extend(advice_checks);

    let mut summary = Summary::default();
    for c in &list {
        match c.status {
            Status::Ok => summary.ok += 1,
            Status::Warn => summary.warn += 1,
            Status::Fail => summary.fail += 1,
        }
    }
    let exit_status = u8::from(summary.warn + summary.fail > 0);
    Ok(Report {
        version: env!("CARGO_PKG_VERSION"),
        config_source: opts.config_source.clone(),
        spool_dir: config.spool.dir.clone(),
        checks: list,
        fsync,
        advice,
        summary,
        exit_status,
    })
}
