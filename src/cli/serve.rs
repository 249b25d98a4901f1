//! `lmtp-ingest serve`: flags, the configuration file, logging set-up, then
//! the server. Also what runs when no subcommand is given.

use std::path::PathBuf;

use clap::Args;
use lmtp_ingest::config::{Config, IoChoice};

use super::Outcome;

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file; flags below override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on: IP:PORT or unix:/path (repeatable; replaces the
    /// file's list). Default 127.0.0.1:2424.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Spool directory. Default ./spool.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// Shard threads (0: one per available CPU).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// CPUs to pin shards to, e.g. 0-3,6 (one shard per CPU).
    #[arg(long, value_name = "LIST", value_parser = parse_cpus)]
    cpus: Option<Vec<usize>>,
    /// Spool writer threads.
    #[arg(long, value_name = "N")]
    writers: Option<usize>,
    /// Event loop: auto (io_uring if the kernel allows), uring or epoll.
    #[arg(long, value_enum)]
    io: Option<IoChoice>,
    /// Host name in the greeting and replies (default: the machine's).
    #[arg(long)]
    hostname: Option<String>,
    /// Recipients per transaction (advertised as LIMITS RCPTMAX).
    #[arg(long, value_name = "N")]
    recipients_max: Option<usize>,
    /// Largest message in bytes (advertised as SIZE).
    #[arg(long, value_name = "BYTES")]
    message_bytes_max: Option<usize>,
    /// Seconds to wait for a command, or for more message data.
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// How long an idle shard polls for work before sleeping, in
    /// microseconds (adaptive; 0: never).
    #[arg(long, value_name = "US")]
    idle_poll_us: Option<u64>,
    /// Longest a spool writer waits to grow a batch, in microseconds.
    #[arg(long, value_name = "US")]
    batch_delay_us_max: Option<u64>,
    /// On slow disks, wait up to a quarter of a commit for the clients the
    /// last commit answered (true, the default; adaptive).
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    batch_regroup: Option<bool>,
    /// Size of each preallocated spool segment file, in bytes.
    #[arg(long, value_name = "BYTES")]
    segment_bytes: Option<u64>,
    /// How new segments are made ready: auto (zero-filled, or only allocated
    /// while batches average 512 KiB or more), zeros or allocate.
    #[arg(long, value_name = "HOW", value_parser = ["auto", "zeros", "allocate"])]
    segment_fill: Option<String>,
    /// Cap on the spool's size in bytes (0: the disk is the limit).
    #[arg(long, value_name = "BYTES")]
    spool_bytes_max: Option<u64>,
    /// Accept a spool on tmpfs (NOT durable: for tests only).
    #[arg(long)]
    allow_tmpfs: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{t}' is not a CPU number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("'{part}': a range goes from low to high"));
                }
                v.extend(a..=b);
            }
            None => v.push(num(part)?),
        }
    }
    if v.is_empty() {
        return Err("give at least one CPU, e.g. 0-3".into());
    }
    Ok(v)
}

impl ServeArgs {
    fn apply(self, mut c: Config) -> (Config, bool) {
        if !self.listen.is_empty() {
            c.server.listen = self.listen;
        }
        if let Some(v) = self.spool {
            c.spool.dir = v;
        }
        if let Some(v) = self.shards {
            c.server.shards = v;
        }
        if let Some(v) = self.cpus {
            c.server.cpus = v;
        }
        if let Some(v) = self.writers {
            c.spool.writers = v;
        }
        if let Some(v) = self.io {
            c.server.io = v;
        }
        if let Some(v) = self.hostname {
            c.server.hostname = v;
        }
        if let Some(v) = self.recipients_max {
            c.limits.recipients_max = v;
        }
        if let Some(v) = self.message_bytes_max {
            c.limits.message_bytes_max = v;
        }
        if let Some(v) = self.idle_timeout {
            c.limits.idle_timeout_secs = v;
            c.limits.data_timeout_secs = v;
        }
        if let Some(v) = self.idle_poll_us {
            c.server.idle_poll_us = v;
        }
        if let Some(v) = self.batch_delay_us_max {
            c.spool.batch_delay_us_max = v;
        }
        if let Some(v) = self.batch_regroup {
            c.spool.batch_regroup = v;
        }
        if let Some(v) = self.segment_bytes {
            c.spool.segment_bytes = v;
        }
        if let Some(v) = &self.segment_fill {
            c.spool.segment_fill = v.clone();
        }
        if let Some(v) = self.spool_bytes_max {
            c.spool.spool_bytes_max = v;
        }
        if self.allow_tmpfs {
            c.spool.allow_tmpfs = true;
        }
        (c, self.print_config)
    }
}

pub fn run(args: ServeArgs) -> Result<Outcome, String> {
    let base = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let (config, print) = args.apply(base);
    if print {
        let checked = config.check().map_err(|e| e.to_string())?;
        for w in &checked.warnings {
            eprintln!("lmtp-ingest: warning: {w}");
        }
        print!("{}", config.to_toml());
        return Ok(Outcome::Ok);
    }
    let _log = super::logging::init(&config);
    // An invalid configuration is reported by the server's own check, next.
    if let Ok(checked) = config.check() {
        for w in &checked.warnings {
            tracing::warn!("{w}");
        }
    }
    let (soft, hard) = lmtp_ingest::server::raise_nofile_limit();
    if soft < config.server.connections_max as u64 + 1024 {
        tracing::warn!(
            soft,
            hard,
            connections_max = config.server.connections_max,
            "the open-files limit is below server.connections_max + 1024: raise LimitNOFILE (systemd) or `ulimit -n`, or lower connections_max"
        );
    }
    lmtp_ingest::server::run(config)?;
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("0-3,6"), Ok(vec![0, 1, 2, 3, 6]));
        assert_eq!(parse_cpus("2"), Ok(vec![2]));
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("x").is_err());
        assert!(parse_cpus("").is_err());
    }
}
