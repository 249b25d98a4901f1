//! `lmtp-ingest load`: an LMTP load generator that is itself fast, and checks
//! every reply it gets.
//!
//! Parts: [`message`] builds the bytes once per run; [`conn`] is one
//! connection's LMTP client state machine (no I/O); [`driver`] runs several
//! threads, each an epoll loop over its share of connections; [`tally`] and
//! [`hist`] count; [`report`] prints text and JSON; [`sweep`] runs one load per
//! value of a parameter and writes a CSV and an SVG chart.
//!
//! A run is always bounded (a message count, a duration, or both), and every
//! connection waits for a reply at most `reply_timeout`.
//!
//! Must not: allocate per message on the hot path, or count a message the
//! server did not answer for.

pub mod conn;
#[cfg(test)]
mod conn_props;
pub mod driver;
pub mod hist;
pub mod message;
pub mod report;
pub mod sweep;
pub mod tally;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use driver::{Budget, ConnError, Shared};
use message::Templates;
use tally::Tally;

pub use report::LoadReport;

/// Where the load goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("--target unix: needs a path, e.g. unix:/run/lmtp.sock".into());
            }
            return Ok(Target::Unix(PathBuf::from(p)));
        }
        s.parse().map(Target::Tcp).map_err(|_| {
            format!("--target '{s}': give IP:PORT (127.0.0.1:2424, [::1]:2424) or unix:/path")
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Limits on the arguments, with their reasons.
pub const RECIPIENTS_MAX: usize = 1000; // RFC 5321 section 4.5.3.1.8 asks servers for >= 100
pub const CONNECTIONS_MAX: usize = 100_000; // descriptors, and ports on one loopback address
pub const SIZE_MAX: usize = 64 * 1024 * 1024; // built once per size, kept in memory
/// Messages when neither a count nor a duration is given.
pub const MESSAGES_DEFAULT: u64 = 10_000;

/// One load run's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadConfig {
    pub target: Target,
    pub connections: usize,
    /// None: min(connections, available CPUs).
    pub threads: Option<usize>,
    pub pipelining: bool,
    /// `BDAT n LAST` instead of `DATA` (the server must offer CHUNKING).
    pub chunking: bool,
    pub recipients: usize,
    /// The recipients are `user0@rcpt_domain` upwards.
    pub rcpt_domain: String,
    /// (message bytes, weight).
    pub sizes: Vec<(usize, u32)>,
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    /// Messages per second, open loop.
    pub rate: Option<f64>,
    /// Longest wait for any one reply.
    pub reply_timeout: Duration,
}

impl LoadConfig {
    /// The defaults of the CLI, against `target`.
    pub fn new(target: Target) -> LoadConfig {
        LoadConfig {
            target,
            connections: 16,
            threads: None,
            pipelining: true,
            chunking: false,
            recipients: 1,
            rcpt_domain: message::RCPT_DOMAIN.to_string(),
            sizes: vec![(4096, 1)],
            messages: None,
            duration: None,
            rate: None,
            reply_timeout: Duration::from_secs(30),
        }
    }

    /// The threads this run uses.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            self.connections.min(cpus)
        })
    }

    /// The message count bound: the given one, or the default when the run
    /// has no duration either.
    pub fn messages_max(&self) -> Option<u64> {
        match (self.messages, self.duration) {
            (None, None) => Some(MESSAGES_DEFAULT),
            (m, _) => m,
        }
    }

    /// Checks every setting; the error names the flag and the fix.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            return Err(format!(
                "--connections {}: give 1 to {CONNECTIONS_MAX}",
                self.connections
            ));
        }
        if let Some(t) = self.threads {
            if t == 0 {
                return Err(
                    "--threads 0: give at least 1 (or leave it out for one per CPU)".into(),
                );
            }
            if t > self.connections {
                return Err(format!(
                    "--threads {t} is more than --connections {}: every thread needs a connection; lower --threads or raise --connections",
                    self.connections
                ));
            }
        }
        if !(1..=RECIPIENTS_MAX).contains(&self.recipients) {
            return Err(format!(
                "--recipients {}: give 1 to {RECIPIENTS_MAX}",
                self.recipients
            ));
        }
        if self.sizes.is_empty() {
            return Err(
                "--size-dist: give at least one SIZE:WEIGHT pair, e.g. 4096:70,65536:30".into(),
            );
        }
        for &(size, weight) in &self.sizes {
            if !(message::SIZE_MIN..=SIZE_MAX).contains(&size) {
                return Err(format!(
                    "--size {size}: give {} to {SIZE_MAX} bytes (the message as stored, headers included)",
                    message::SIZE_MIN
                ));
            }
            if weight == 0 {
                return Err(format!(
                    "--size-dist: size {size} has weight 0; give weights of 1 or more, or leave the size out"
                ));
            }
        }
        if self.sizes.iter().map(|&(_, w)| w as u64).sum::<u64>() > u32::MAX as u64 {
            return Err("--size-dist: the weights add up to more than 2^32; use smaller weights (e.g. percentages)".into());
        }
        if self.messages == Some(0) {
            return Err("--messages 0: give at least 1".into());
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err("--duration 0: give at least 1 second".into());
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!(
                    "--rate {r}: give a positive number of messages per second"
                ));
            }
            if self.messages.is_none() && self.duration.is_none() {
                return Err("--rate needs a bound: add --messages N or --duration SECS (an open-loop load does not stop by itself)".into());
            }
        }
        if self.reply_timeout.is_zero() {
            return Err("--timeout 0: give at least 1 second".into());
        }
        Ok(())
    }
}

/// Runs one load. `on_tick` is called about four times a second with
/// (messages finished, elapsed) while the run goes on (for a progress line).
/// Errors: the run could not start (bad settings, no connection).
pub fn run(cfg: &LoadConfig, on_tick: &mut dyn FnMut(u64, Duration)) -> Result<LoadReport, String> {
    cfg.check()?;
    let threads = cfg.threads();
    let (soft, _) = crate::server::raise_nofile_limit();
    if soft < cfg.connections as u64 + 64 {
        return Err(format!(
            "--connections {} needs about {} open files, and the limit is {soft}: raise it (`ulimit -n`) or lower --connections",
            cfg.connections,
            cfg.connections + 64
        ));
    }
    let templates = Arc::new(Templates::new(&cfg.sizes, cfg.recipients, &cfg.rcpt_domain));
    let mut fds = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections {
        let fd = driver::connect(&cfg.target).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
                    "is the server running and listening there? (lmtp-ingest serve --listen ADDR)"
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "out of local ports: lower --connections or widen net.ipv4.ip_local_port_range"
                }
                _ => "check --target and the server",
            };
            format!(
                "connection {} of {} to {}: {e}; {hint}",
                i + 1,
                cfg.connections,
                cfg.target
            )
        })?;
        fds.push(fd);
    }

    let start = Instant::now();
    let shared = Arc::new(Shared {
        templates,
        style: conn::Style {
            pipelining: cfg.pipelining,
            chunking: cfg.chunking,
        },
        reply_timeout: cfg.reply_timeout,
        budget: Budget::new(
            cfg.messages_max(),
            cfg.duration.map(|d| start + d),
            cfg.rate.map(|r| (start, 1e9 / r)),
        ),
        progress: AtomicU64::new(0),
    });
    // Connections split as evenly as possible: thread t gets a contiguous share.
    let mut handles = Vec::with_capacity(threads);
    let mut rest = fds;
    let mut first = 0;
    for t in 0..threads {
        let share = (cfg.connections - first) / (threads - t);
        let tail = rest.split_off(share);
        let mine = std::mem::replace(&mut rest, tail);
        let sh = shared.clone();
        let first_id = first;
        first += share;
        let h = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || {
                driver::run_thread(&sh, mine, first_id, 0x9E37_79B9_7F4A_7C15 ^ t as u64)
            })
            .map_err(|e| format!("starting load thread {t}: {e}"))?;
        handles.push(h);
    }
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        on_tick(shared.progress.load(Ordering::Relaxed), start.elapsed());
    }
    let mut tally = Tally::default();
    let mut errors: Vec<ConnError> = Vec::new();
    let mut error_count = 0;
    for h in handles {
        let r = h
            .join()
            .map_err(|_| "a load thread panicked (a bug: please report it)".to_string())?
            .map_err(|e| format!("load thread: {e}"))?;
        tally.merge(&r.tally);
        error_count += r.error_count;
        errors.extend(r.errors);
    }
    errors.sort_by_key(|e| e.conn);
    errors.truncate(driver::ERRORS_KEPT);
    let end = tally.last_done.unwrap_or_else(Instant::now);
    let seconds = end.saturating_duration_since(start).as_secs_f64().max(1e-9);
    Ok(LoadReport::new(
        cfg,
        threads,
        &tally,
        seconds,
        error_count,
        errors,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "127.0.0.1:2424".parse::<Target>(),
            Ok(Target::Tcp("127.0.0.1:2424".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:2424".parse::<Target>(),
            Ok(Target::Tcp("[::1]:2424".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Target>(),
            Ok(Target::Unix("/run/x.sock".into()))
        );
        assert!(
            "localhost"
                .parse::<Target>()
                .unwrap_err()
                .contains("IP:PORT")
        );
        assert!("unix:".parse::<Target>().is_err());
    }

    #[test]
    fn checks_name_the_flag_and_the_fix() {
        let base = LoadConfig::new("127.0.0.1:1".parse().unwrap());
        assert!(base.check().is_ok());
        assert_eq!(base.messages_max(), Some(MESSAGES_DEFAULT));
        let bad = |f: &dyn Fn(&mut LoadConfig), want: &str| {
            let mut c = base.clone();
            f(&mut c);
            let e = c.check().unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad(&|c| c.recipients = 0, "--recipients 0");
        bad(&|c| c.recipients = 1001, "--recipients 1001");
        bad(&|c| c.sizes = vec![(63, 1)], "--size 63");
        bad(&|c| c.connections = 0, "--connections 0");
        bad(&|c| c.connections = 100_001, "--connections 100001");
        bad(&|c| c.threads = Some(17), "lower --threads");
        bad(
            &|c| c.rate = Some(100.0),
            "--rate needs a bound: add --messages N or --duration SECS",
        );
        bad(&|c| c.messages = Some(0), "--messages 0");
        bad(&|c| c.sizes = vec![(100, 0)], "weight 0");
        let mut c = base.clone();
        c.duration = Some(Duration::from_secs(1));
        assert_eq!(c.messages_max(), None);
        c.rate = Some(10.0);
        assert!(c.check().is_ok());
    }
}
