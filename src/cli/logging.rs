//! The server's log output: each line is formatted on the thread that logs
//! and appended to one bounded buffer in memory; a `log-writer` thread writes
//! that buffer to stderr in large writes, at most about every
//! [`GATHER_FOR`]. So a slow reader of stderr (a busy journald, a full pipe,
//! a slow terminal) never stalls a shard, and a busy server makes one write
//! system call per [`GATHER_FOR`] instead of one per line (and wakes the
//! writer thread at most that often, not once per line).
//!
//! When the buffer holds [`BUFFER_BYTES_MAX`], further lines are dropped,
//! not waited for, and counted: [`LogGuard`] warns about drops while the
//! server runs and once more when it stops. The spool, not the log, is the
//! record of what was accepted.
//!
//! Must not: block a logging thread on stderr, or lose lines already
//! buffered when the server stops (dropping the guard writes them out).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lmtp_ingest::config::{self, Config};

/// Bytes of log waiting for stderr before new lines are dropped: at about
/// 300 bytes a delivery line, some 50,000 lines, seconds of a busy server.
const BUFFER_BYTES_MAX: usize = 16 << 20;
/// How long the writer collects lines after the first one arrives, before
/// one write: long enough to batch a busy server's lines, short enough that
/// a line shows up at once to a person watching.
const GATHER_FOR: Duration = Duration::from_millis(10);
/// How often dropped lines are reported, at most.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

struct Pending {
    bytes: Vec<u8>,
    closing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when the buffer stops being empty, and at close.
    ready: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave the bytes
        // inconsistent (appends are all-or-nothing): keep logging.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends whole lines (one, or a message's delivery lines), or drops
    /// and counts them when the buffer is full. Never blocks on I/O.
    fn push(&self, line: &[u8]) {
        let mut p = self.lock();
        if p.bytes.len() + line.len() > BUFFER_BYTES_MAX {
            drop(p);
            let lines = line.iter().filter(|&&b| b == b'\n').count().max(1);
            self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
            return;
        }
        let was_empty = p.bytes.is_empty();
        p.bytes.extend_from_slice(line);
        drop(p);
        if was_empty {
            self.ready.notify_one();
        }
    }
}

/// What `tracing_subscriber` writes each formatted event to (it formats a
/// whole event, then writes it with one `write_all`).
#[derive(Clone)]
struct Sink(Arc<Shared>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Sink;
    fn make_writer(&'a self) -> Sink {
        self.clone()
    }
}

/// Keeps the log writer alive; dropping it writes out what is buffered.
pub struct LogGuard {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.ready.notify_one();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        let n = self.shared.dropped.load(Ordering::Relaxed);
        if n > 0 {
            eprintln!(
                "lmtp-ingest: {n} log lines were dropped because stderr could not keep up; \
                 send stderr somewhere faster or raise log.level (e.g. \"warn\")"
            );
        }
    }
}

/// A bare word in `RUST_LOG` (no `=`) that is neither a level nor one of
/// this server's targets: `RUST_LOG=inof` would otherwise silence the log.
/// Directives with `=` or span filters are left to `tracing`.
fn rust_log_typo(v: &str) -> Option<String> {
    v.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains('=') && !d.contains('['))
        .find(|d| !config::is_log_level(d) && !config::is_log_target(d))
        .map(str::to_string)
}

/// Installs the subscriber: filter from `RUST_LOG`, else `log.level`
/// (default `info`, read by [`config::log_filter`], the same function that
/// checks it); `log.format = "json"` writes JSON objects. A bad `log.level`
/// logs at `info` here and is reported by `Config::check` (run by the
/// server right after), which stops the start.
pub fn init(config: &Config) -> LogGuard {
    let from_env = match std::env::var("RUST_LOG") {
        Ok(v) => match rust_log_typo(&v) {
            Some(word) => {
                // Taken as a target that no line has, it would turn every
                // line off, silently.
                eprintln!(
                    "lmtp-ingest: RUST_LOG={v:?}: '{word}' is not a log level, and as a target it matches no line of this server, so nothing would be logged; ignoring RUST_LOG, using log.level ({:?}); fix: RUST_LOG=info, or a directive such as \"warn,delivery=info\"",
                    config.log.level
                );
                None
            }
            None => tracing_subscriber::EnvFilter::try_from_default_env().ok(),
        },
        Err(_) => None,
    };
    let filter = from_env
        .map(Ok)
        .unwrap_or_else(|| config::log_filter(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            bytes: Vec::new(),
            closing: false,
        }),
        ready: Condvar::new(),
        dropped: AtomicU64::new(0),
    });
    // No ANSI sanitization in the subscriber: it escapes character by
    // character, several percent of a loaded server's CPU with a line per
    // recipient. Client-supplied text (the delivery lines' addresses) is
    // escaped where it is logged (`lmtp_ingest::io::log_safe`); every other
    // line holds the server's own text.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi_sanitization(false)
        .with_writer(Sink(shared.clone()));
    let _ = if config.log.format == "json" {
        fmt.json().try_init()
    } else {
        let ansi = std::io::stderr().is_terminal();
        if !ansi {
            // Plain text: delivery lines, one per recipient, skip the
            // subscriber's formatting and come here as finished lines.
            let s = shared.clone();
            lmtp_ingest::io::set_delivery_sink(Box::new(move |line| s.push(line)));
        }
        fmt.with_ansi(ansi).try_init()
    };
    let s = shared.clone();
    let writer = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_out(&s, &mut std::io::stderr()))
        .ok();
    LogGuard { shared, writer }
}

/// The writer thread: waits for a line, gathers for [`GATHER_FOR`], writes
/// everything buffered in one go; at close, writes the rest and returns.
/// Reports dropped lines (through the buffer itself) at most every
/// [`DROP_REPORT_EVERY`].
fn write_out(shared: &Shared, out: &mut dyn Write) {
    let mut spare = Vec::new();
    let mut reported = 0;
    let mut last_report = Instant::now();
    loop {
        let mut p = shared.lock();
        while p.bytes.is_empty() && !p.closing {
            p = shared.ready.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if p.bytes.is_empty() {
            return; // closing, nothing left
        }
        if !p.closing {
            drop(p);
            std::thread::sleep(GATHER_FOR);
            p = shared.lock();
        }
        std::mem::swap(&mut p.bytes, &mut spare);
        drop(p);
        // A failed write (stderr closed) loses these lines; there is
        // nowhere else to say so.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        if spare.capacity() > 1 << 20 {
            spare = Vec::new(); // give a burst's memory back
        }
        let dropped = shared.dropped.load(Ordering::Relaxed);
        if dropped > reported && last_report.elapsed() >= DROP_REPORT_EVERY {
            tracing::warn!(
                dropped = dropped - reported,
                total = dropped,
                "log lines dropped: stderr is not keeping up; send it somewhere faster or raise log.level (e.g. \"warn\")"
            );
            reported = dropped;
            last_report = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            pending: Mutex::new(Pending {
                bytes: Vec::new(),
                closing: false,
            }),
            ready: Condvar::new(),
            dropped: AtomicU64::new(0),
        })
    }

    /// Collects what the writer thread writes, counting the writes.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut o = self.0.lock().unwrap();
            o.0.extend_from_slice(buf);
            o.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_batched_and_all_written_at_close() {
        let s = shared();
        let out = Out::default();
        let (s2, mut o2) = (s.clone(), out.clone());
        let h = std::thread::spawn(move || write_out(&s2, &mut o2));
        let mut want = Vec::new();
        for i in 0..10_000 {
            let line = format!("line {i}\n");
            Sink(s.clone()).write_all(line.as_bytes()).unwrap();
            want.extend_from_slice(line.as_bytes());
        }
        s.lock().closing = true;
        s.ready.notify_one();
        h.join().unwrap();
        let o = out.0.lock().unwrap();
        assert_eq!(o.0, want, "every line, in order, nothing lost");
        assert!(o.1 < 100, "{} writes for 10,000 lines", o.1);
    }

    #[test]
    fn a_full_buffer_drops_and_counts_lines() {
        let s = shared();
        let line = vec![b'x'; 1 << 20];
        for _ in 0..(BUFFER_BYTES_MAX >> 20) {
            s.push(&line);
        }
        assert_eq!(s.dropped.load(Ordering::Relaxed), 0);
        s.push(b"one more\n");
        s.push(b"and another\n");
        assert_eq!(s.dropped.load(Ordering::Relaxed), 2);
        s.push(b"a message's\nthree delivery\nlines\n");
        assert_eq!(s.dropped.load(Ordering::Relaxed), 5);
        assert_eq!(s.lock().bytes.len(), BUFFER_BYTES_MAX);
    }

    #[test]
    fn rust_log_typos_are_caught_and_directives_left_alone() {
        assert_eq!(rust_log_typo("inof").as_deref(), Some("inof"));
        assert_eq!(rust_log_typo("warn,delivry").as_deref(), Some("delivry"));
        for ok in [
            "info",
            "WARN",
            "warn,delivery=info",
            "lmtp_ingest::spool",
            "io_uring=debug",
            "[span]=trace",
            "",
        ] {
            assert_eq!(rust_log_typo(ok), None, "{ok}");
        }
    }
}
