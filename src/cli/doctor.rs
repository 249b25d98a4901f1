//! `lmtp-ingest doctor`: flags, then [`lmtp_ingest::doctor`], then the report
//! as aligned text or JSON. Exit status: 0 all ok, 1 a warn or fail, 2
//! doctor could not run (bad flags, an unreadable or invalid configuration).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use lmtp_ingest::config::Config;
use lmtp_ingest::doctor;

use super::Outcome;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Spool directory to check (default: the configuration's, else ./spool).
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// The server's TOML configuration file (default: built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Seconds to spend measuring fdatasync on the spool's file system
    /// (0.1 to 60).
    #[arg(long, value_name = "S", default_value_t = 2.0, value_parser = parse_seconds)]
    fsync_seconds: f64,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if (0.1..=60.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: use 0.1 to 60 seconds"))
    }
}

pub fn run(args: DoctorArgs) -> Result<Outcome, String> {
    let (mut config, config_source) = match &args.config {
        Some(path) => (
            Config::from_file(path).map_err(|e| e.to_string())?,
            path.display().to_string(),
        ),
        None => (Config::default(), "built-in defaults".to_string()),
    };
    if let Some(dir) = args.spool {
        config.spool.dir = dir;
    }
    let report = doctor::run(&doctor::Options {
        config,
        config_source,
        fsync_duration: Duration::from_secs_f64(args.fsync_seconds),
    })?;
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| format!("cannot encode the report as JSON: {e}"))?;
        println!("{text}");
    } else {
        print!("{}", doctor::render::text(&report));
    }
    Ok(if report.exit_status == 0 {
        Outcome::Ok
    } else {
        Outcome::Problem
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(parse_seconds("2"), Ok(2.0));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("61").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
