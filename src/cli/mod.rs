//! Command-line parsing (clap derive) and dispatch to one file per
//! subcommand group. To add a group (`serve`, `load`, `doctor`): a variant in
//! [`Command`], a file beside this one with its `Args` and `run`, one match arm.
//!
//! Exit codes: 0 success, 1 the command ran and found a problem (e.g. `spool
//! verify` found corrupt records), 2 the command could not run (bad
//! arguments, unreadable spool).

mod doctor;
mod load;
mod logging;
mod serve;
mod spool;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "lmtp-ingest",
    version,
    about = "A fast, durable LMTP ingest server"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the LMTP server (the default when no command is given).
    Serve(serve::ServeArgs),
    /// Inspect, verify, export and follow a spool.
    Spool(spool::SpoolArgs),
    /// Load an LMTP server: pipelined clients, every reply checked, rates and latency.
    Load(load::LoadArgs),
    /// Check this machine for the server: io_uring, limits, sysctls, CPUs,
    /// the spool's file system and its measured fdatasync latency.
    Doctor(doctor::DoctorArgs),
}

/// What a subcommand reports back.
pub enum Outcome {
    Ok,
    /// Ran, and found a problem (exit 1).
    Problem,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve::run(serve::ServeArgs::default()),
        Some(Command::Serve(args)) => serve::run(args),
        Some(Command::Spool(args)) => {
            // A reader piped into `head` should just stop, like any Unix
            // tool. (The server keeps SIGPIPE ignored: it sends with
            // MSG_NOSIGNAL, and a closed log pipe must not kill it.)
            // SAFETY: restoring a signal's default disposition before any
            // thread is started.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            spool::run(args)
        }
        Some(Command::Load(args)) => load::run(args),
        Some(Command::Doctor(args)) => doctor::run(args),
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Problem) => ExitCode::from(1),
        Err(e) => {
            eprintln!("lmtp-ingest: {e}");
            ExitCode::from(2)
        }
    }
}
