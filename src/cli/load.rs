//! `lmtp-ingest load`: flags, validation, the progress line, and printing
//! what [`lmtp_ingest::load`] measured (text, or one JSON object with
//! `--json`); `--sweep` runs one load per value and writes a CSV and an SVG.
//!
//! Exit status: 0 clean; 1 a protocol error, or a message refused (unless
//! `--allow-failures`); 2 the load could not run (bad flags, no connection).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use lmtp_ingest::load::sweep::{self, Sweep};
use lmtp_ingest::load::{self as lib, LoadConfig, LoadReport, Target};

use super::Outcome;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Server to load: IP:PORT ([::1]:2424 for IPv6) or unix:/path.
    #[arg(long, value_name = "ADDR")]
    target: Target,
    /// Connections, each one transaction at a time (1 to 100000).
    #[arg(long, value_name = "N", default_value_t = 16)]
    connections: usize,
    /// Event-loop threads (default: min(connections, available CPUs)).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// on: MAIL, RCPTs and DATA in one write, the body after the 354.
    /// off: one command, one reply.
    #[arg(long, value_enum, value_name = "on|off", default_value = "on")]
    pipelining: OnOff,
    /// on: BDAT n LAST with the message instead of DATA (RFC 3030), as
    /// Exim's smtp transport sends when the server offers CHUNKING; with
    /// --pipelining on, the whole transaction goes in one write.
    #[arg(long, value_enum, value_name = "on|off", default_value = "off")]
    chunking: OnOff,
    /// Recipients per message, user0@DOMAIN upwards (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = 1)]
    recipients: usize,
    /// The recipients' domain: one the server accepts (its `policy.domains`,
    /// or with user0@DOMAIN... in its recipient table).
    #[arg(long, value_name = "DOMAIN", default_value = "example.com", value_parser = parse_domain)]
    rcpt_domain: String,
    /// Message size in bytes as stored, headers included (64 or more;
    /// default 4096 unless --size-dist is given).
    #[arg(long, value_name = "BYTES", conflicts_with = "size_dist")]
    size: Option<usize>,
    /// A mix of sizes: SIZE:WEIGHT,... e.g. "4096:70,65536:30".
    #[arg(long, value_name = "DIST", value_parser = parse_size_dist)]
    size_dist: Option<SizeDist>,
    /// Messages to send (default 10000 when --duration is not given either).
    #[arg(long, value_name = "N")]
    messages: Option<u64>,
    /// Seconds to run (with --messages: whichever comes first).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    duration: Option<Duration>,
    /// Open loop: start messages at this rate (per second, across all
    /// connections); latency is then also measured from each message's
    /// scheduled start. Needs --messages or --duration.
    #[arg(long, value_name = "MSGS_PER_S")]
    rate: Option<f64>,
    /// Seconds to wait for any one reply before calling it a protocol error.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "30")]
    timeout: Duration,
    /// Exit 0 even when the server refused messages (4xx/5xx); protocol
    /// errors still exit 1.
    #[arg(long)]
    allow_failures: bool,
    /// Print one JSON object (with --sweep: {"sweep": .., "points": [..]}).
    #[arg(long)]
    json: bool,
    /// Run once per value: connections=1,4,16,64,256 (or recipients=, size=).
    #[arg(long, value_name = "KEY=V1,V2,...")]
    sweep: Option<Sweep>,
    /// Where --sweep writes sweep-KEY.csv and sweep-KEY.svg.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.0..=1e7).contains(&v) {
        return Err(format!("'{s}': give seconds between 0 and 10000000"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `--size-dist` as parsed: (bytes, weight) pairs.
#[derive(Clone, Debug)]
pub struct SizeDist(Vec<(usize, u32)>);

fn parse_size_dist(s: &str) -> Result<SizeDist, String> {
    s.split(',')
        .map(|part| {
            let (size, weight) = part
                .split_once(':')
                .ok_or_else(|| format!("'{part}': give SIZE:WEIGHT, e.g. 4096:70,65536:30"))?;
            let size = size
                .trim()
                .parse()
                .map_err(|_| format!("'{size}' is not a size in bytes"))?;
            let weight = weight
                .trim()
                .parse()
                .map_err(|_| format!("'{weight}' is not a whole-number weight"))?;
            Ok((size, weight))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(SizeDist)
}

fn parse_domain(s: &str) -> Result<String, String> {
    if lmtp_ingest::load::message::valid_domain(s) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "'{s}' is not a domain: give dot-separated labels of letters, digits and hyphens, e.g. example.com"
        ))
    }
}

impl LoadArgs {
    fn config(&self) -> LoadConfig {
        let mut c = LoadConfig::new(self.target.clone());
        c.connections = self.connections;
        c.threads = self.threads;
        c.pipelining = self.pipelining == OnOff::On;
        c.chunking = self.chunking == OnOff::On;
        c.recipients = self.recipients;
        c.rcpt_domain = self.rcpt_domain.clone();
        c.sizes = match (&self.size_dist, self.size) {
            (Some(d), _) => d.0.clone(),
            (None, Some(s)) => vec![(s, 1)],
            (None, None) => vec![(4096, 1)],
        };
        c.messages = self.messages;
        c.duration = self.duration;
        c.rate = self.rate;
        c.reply_timeout = self.timeout;
        c
    }
}

/// A progress line on a terminal, a few times a second; nothing otherwise.
struct ProgressLine {
    on: bool,
    last_ms: u128,
    shown: bool,
    messages_max: Option<u64>,
    duration: Option<Duration>,
}

impl ProgressLine {
    fn new(cfg: &LoadConfig) -> ProgressLine {
        ProgressLine {
            on: std::io::stderr().is_terminal(),
            last_ms: 0,
            shown: false,
            messages_max: cfg.messages_max(),
            duration: cfg.duration,
        }
    }

    fn tick(&mut self, label: &str, messages: u64, elapsed: Duration) {
        let ms = elapsed.as_millis();
        if !self.on || ms < self.last_ms + 250 {
            return;
        }
        self.last_ms = ms;
        self.shown = true;
        let rate = messages as f64 / elapsed.as_secs_f64().max(1e-3);
        let mut e = std::io::stderr().lock();
        let of = match (self.messages_max, self.duration) {
            (Some(m), _) => format!(" of {}", lib::report::group(m)),
            _ => String::new(),
        };
        let left = self
            .duration
            .map(|d| format!(" of {:.0} s", d.as_secs_f64()))
            .unwrap_or_default();
        let _ = write!(
            e,
            "\r{label}{}{of} messages  {} msg/s  {:.1} s{left}   ",
            lib::report::group(messages),
            lib::report::group(rate as u64),
            elapsed.as_secs_f64()
        );
        let _ = e.flush();
    }

    fn finish(&mut self) {
        if self.shown {
            eprintln!();
        }
        self.shown = false;
        self.last_ms = 0;
    }
}

fn run_one(cfg: &LoadConfig, label: &str) -> Result<LoadReport, String> {
    let mut p = ProgressLine::new(cfg);
    let r = lib::run(cfg, &mut |m, e| p.tick(label, m, e));
    p.finish();
    r
}

pub fn run(args: LoadArgs) -> Result<Outcome, String> {
    let base = args.config();
    base.check()?;
    let Some(sw) = &args.sweep else {
        let r = run_one(&base, "")?;
        if args.json {
            emit(format!("{}\n", r.to_json()));
        } else {
            emit(r.text());
        }
        return Ok(verdict(&[&r], args.allow_failures));
    };
    sw.check(&base)?;
    std::fs::create_dir_all(&args.out).map_err(|e| {
        format!(
            "--out {}: cannot create it: {e}; pick a writable directory",
            args.out.display()
        )
    })?;
    let mut points = Vec::with_capacity(sw.values.len());
    for (i, &v) in sw.values.iter().enumerate() {
        let cfg = sw.apply(&base, v);
        let label = format!("[{}/{}] {}={v}: ", i + 1, sw.values.len(), sw.key.name());
        let r = run_one(&cfg, &label)?;
        if !args.json {
            emit(format!("== {}={v}\n", sw.key.name()));
            emit(r.text());
        }
        points.push((v, r));
    }
    let csv_path = sw.csv_path(&args.out);
    let svg_path = sw.svg_path(&args.out);
    let write = |p: &PathBuf, text: String| {
        std::fs::write(p, text).map_err(|e| format!("writing {}: {e}", p.display()))
    };
    write(&csv_path, sweep::csv(sw.key, &points))?;
    let title = format!(
        "lmtp-ingest load: throughput and p99 latency by {}",
        sw.key.name()
    );
    write(
        &svg_path,
        sweep::svg(sw.key, &points, &title, &subtitle(&base, sw)),
    )?;
    if args.json {
        let v = serde_json::json!({
            "sweep": sw.key.name(),
            "csv": csv_path.display().to_string(),
            "svg": svg_path.display().to_string(),
            "points": points.iter().map(|(v, r)| serde_json::json!({"value": v, "result": r.to_json()})).collect::<Vec<_>>(),
        });
        emit(format!("{v}\n"));
    } else {
        emit(format!(
            "wrote {} and {}\n",
            csv_path.display(),
            svg_path.display()
        ));
    }
    let reports: Vec<&LoadReport> = points.iter().map(|(_, r)| r).collect();
    Ok(verdict(&reports, args.allow_failures))
}

/// What stayed the same across a sweep, and when it ran.
fn subtitle(c: &LoadConfig, sw: &Sweep) -> String {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let when = lmtp_ingest::spool::timefmt::rfc3339_us(now_us);
    let mut parts = vec![format!("target {}", c.target)];
    if sw.key != sweep::Key::Connections {
        parts.push(format!("{} connections", c.connections));
    }
    parts.push(format!(
        "pipelining {}, {}",
        if c.pipelining { "on" } else { "off" },
        if c.chunking { "BDAT" } else { "DATA" }
    ));
    if sw.key != sweep::Key::Recipients {
        parts.push(format!("{} recipient(s)", c.recipients));
    }
    if sw.key != sweep::Key::Size {
        let sizes: Vec<String> = c.sizes.iter().map(|(s, _)| format!("{s} B")).collect();
        parts.push(sizes.join("/"));
    }
    match (c.messages_max(), c.duration) {
        (Some(m), _) => parts.push(format!("{m} messages per point")),
        (None, Some(d)) => parts.push(format!("{} s per point", d.as_secs_f64())),
        _ => {}
    }
    parts.push(when.get(..16).unwrap_or(&when).replace('T', " ") + " UTC");
    parts.join(", ")
}

/// Writes results to stdout. A reader that went away (`load ... | head`)
/// ends the run quietly with status 1, as a Unix tool would, instead of the
/// panic `println!` gives (SIGPIPE stays ignored: the generator's sockets
/// must not kill it when a server closes them).
fn emit(text: impl AsRef<str>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let r = out
        .write_all(text.as_ref().as_bytes())
        .and_then(|_| out.flush());
    if let Err(e) = r {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("lmtp-ingest load: writing the results: {e}");
        }
        std::process::exit(1);
    }
}

fn verdict(reports: &[&LoadReport], allow_failures: bool) -> Outcome {
    let errors: u64 = reports.iter().map(|r| r.protocol_errors).sum();
    let failed: u64 = reports.iter().map(|r| r.messages_failed).sum();
    if errors > 0 {
        eprintln!(
            "lmtp-ingest load: {errors} protocol error(s): replies that break LMTP, or connections lost mid-transaction (examples in the report: \"protocol errors\" in text, \"protocol_error_examples\" in JSON); exit 1"
        );
    }
    if reports
        .iter()
        .any(|r| r.failures.iter().any(|&(code, _)| code == 550))
    {
        eprintln!(
            "lmtp-ingest load: hint: 550 is the server refusing recipients (user0@DOMAIN upwards); pass --rcpt-domain with a domain it accepts, or list those addresses in its recipient table"
        );
    }
    if failed > 0 && !allow_failures {
        eprintln!(
            "lmtp-ingest load: {failed} message(s) refused by the server (failures by reply code above); exit 1 (use --allow-failures to accept refusals)"
        );
    }
    let closed: u64 = reports.iter().map(|r| r.connections_closed).sum();
    if closed > 0 && !allow_failures {
        eprintln!(
            "lmtp-ingest load: the server closed {closed} connection(s) with 421 (see its reply and log); exit 1 (use --allow-failures to accept that)"
        );
    }
    if reports.iter().any(|r| r.is_problem(allow_failures)) {
        Outcome::Problem
    } else {
        Outcome::Ok
    }
}
