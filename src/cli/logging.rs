//! The server's log output: formatted on the thread that logs, written to
//! stderr by one background thread, so a slow reader of stderr (a busy
//! journald, a full pipe, a slow terminal) never stalls a shard.
//!
//! The hand-over is bounded ([`LINES_MAX`] lines). When it is full a line is
//! dropped rather than blocking the shard, and counted: [`LogGuard`] warns
//! about drops while the server runs and once more when it stops. The spool,
//! not the log, is the record of what was accepted.
//!
//! Must not: block the logging thread on stderr, or lose lines already
//! queued when the server stops (the guard flushes them).

use std::io::{BufWriter, IsTerminal};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lmtp_ingest::config::Config;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines queued for stderr before new ones are dropped: at about 300 bytes a
/// delivery line, some 20 MiB, several seconds of a busy server's log.
const LINES_MAX: usize = 65_536;
/// How often a background check reports lines dropped since its last look.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Keeps the log writer alive; dropping it writes what is queued.
pub struct LogGuard {
    dropped: ErrorCounter,
    stop: Arc<AtomicBool>,
    // Last field: dropped after the final drop report was queued.
    _worker: WorkerGuard,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.dropped.dropped_lines();
        if n > 0 {
            // Straight to stderr: the queue may be the thing that is full.
            eprintln!(
                "lmtp-ingest: {n} log lines were dropped because stderr could not keep up; \
                 send stderr somewhere faster or raise log.level (e.g. \"warn\")"
            );
        }
    }
}

/// Installs the subscriber: filter from `RUST_LOG`, else `log.level`
/// (default `info`); `log.format = "json"` writes JSON objects. A bad value
/// is reported by `Config::check` (run by the server right after).
pub fn init(config: &Config) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let (writer, worker) = NonBlockingBuilder::default()
        .buffered_lines_limit(LINES_MAX)
        .lossy(true)
        .thread_name("log-writer")
        // Buffered: the worker flushes whenever its queue runs dry, so a
        // quiet server's lines appear at once and a busy one's go out in
        // large writes.
        .finish(BufWriter::with_capacity(64 << 10, std::io::stderr()));
    let dropped = writer.error_counter();
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = if config.log.format == "json" {
        fmt.json().try_init()
    } else {
        fmt.with_ansi(ansi).try_init()
    };
    let stop = Arc::new(AtomicBool::new(false));
    spawn_drop_reporter(dropped.clone(), stop.clone());
    LogGuard {
        dropped,
        stop,
        _worker: worker,
    }
}

/// Every [`DROP_REPORT_EVERY`], logs how many lines were dropped since the
/// last report (a warning, which itself may be dropped if the queue is still
/// full; the count is given again at exit).
fn spawn_drop_reporter(dropped: ErrorCounter, stop: Arc<AtomicBool>) {
    let _ = std::thread::Builder::new()
        .name("log-drops".into())
        .spawn(move || {
            let mut reported = 0;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(DROP_REPORT_EVERY);
                let n = dropped.dropped_lines();
                if n > reported {
                    tracing::warn!(
                        dropped = n - reported,
                        total = n,
                        "log lines dropped: stderr is not keeping up; send it somewhere faster or raise log.level (e.g. \"warn\")"
                    );
                    reported = n;
                }
            }
        });
}
