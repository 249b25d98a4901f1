//! `lmtp-ingest spool ...`: read-only tools over a spool directory (they take
//! no lock and may run beside a server).
//!
//! Must not: write into segments. Everything read goes through the spool's
//! reader, which checks each record's checksum before using it.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use lmtp_ingest::envelope::{QueueId, ReversePath};
use lmtp_ingest::spool::export::{Exporter, Format};
use lmtp_ingest::spool::reader::{self, StoredRecord};
use lmtp_ingest::spool::timefmt;

use super::Outcome;

#[derive(Args, Debug)]
pub struct SpoolArgs {
    /// The spool directory.
    #[arg(long, value_name = "DIR", global = true, default_value = "spool")]
    spool: PathBuf,
    #[command(subcommand)]
    command: SpoolCommand,
}

#[derive(Subcommand, Debug)]
enum SpoolCommand {
    /// List messages: id, time, sender, recipient count, size.
    Ls {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message: envelope, then the body.
    Show {
        /// The queue id (26 characters, as in the 250 reply).
        id: String,
    },
    /// Check every record; exit 0 only when all are sound.
    Verify {
        /// A JSON report instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Deliver messages into a directory, one copy per recipient, adding
    /// Return-Path: and Delivered-To: as a delivery agent would.
    Export {
        #[arg(long, value_enum)]
        format: Format,
        /// Target directory (created if missing).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Only this message (repeatable); all messages when absent.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
    },
}

pub fn run(args: SpoolArgs) -> Result<Outcome, String> {
    let dir = &args.spool;
    if !dir.is_dir() {
        return Err(format!(
            "spool directory {} does not exist (give it with --spool DIR)",
            dir.display()
        ));
    }
    match args.command {
        SpoolCommand::Ls { json } => ls(dir, json),
        SpoolCommand::Show { id } => show(dir, &id),
        SpoolCommand::Verify { json } => verify(dir, json),
        SpoolCommand::Export { format, to, ids } => export(dir, format, &to, &ids),
    }
}

fn sender(r: &ReversePath) -> String {
    match r {
        ReversePath::Null => "<>".to_string(),
        ReversePath::Mailbox(m) => m.address(),
    }
}

#[derive(serde::Serialize)]
struct LsEntry {
    id: String,
    received_at: String,
    sender: String,
    recipients: u32,
    size: u64,
}

fn out_err(e: std::io::Error) -> String {
    format!("writing to stdout: {e}")
}

fn ls(dir: &Path, json: bool) -> Result<Outcome, String> {
    let segments =
        reader::list_segments(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut first = true;
    if json {
        out.write_all(b"[").map_err(out_err)?;
    } else {
        writeln!(
            out,
            "{:<26}  {:<27}  {:>5}  {:>10}  SENDER",
            "ID", "RECEIVED", "RCPTS", "BYTES"
        )
        .map_err(out_err)?;
    }
    let mut write_err = None;
    for info in segments {
        reader::scan_segment(&info.path, |_, _, v| {
            if write_err.is_some() {
                return;
            }
            let env = v.envelope();
            let e = LsEntry {
                id: v.header.queue_id.to_string(),
                received_at: timefmt::rfc3339_us(v.header.received_at_us),
                sender: sender(&env.reverse_path),
                recipients: v.header.recipients,
                size: v.header.body_len,
            };
            let r = if json {
                let sep = if first { "\n" } else { ",\n" };
                first = false;
                serde_json::to_string(&e)
                    .map_err(std::io::Error::other)
                    .and_then(|s| write!(out, "{sep}{s}"))
            } else {
                writeln!(
                    out,
                    "{:<26}  {:<27}  {:>5}  {:>10}  <{}>",
                    e.id, e.received_at, e.recipients, e.size, e.sender
                )
            };
            if let Err(err) = r {
                write_err = Some(err);
            }
        })
        .map_err(|e| format!("reading {}: {e}", info.path.display()))?;
        if let Some(e) = write_err.take() {
            return Err(out_err(e));
        }
    }
    if json {
        out.write_all(b"\n]\n").map_err(out_err)?;
    }
    out.flush().map_err(out_err)?;
    Ok(Outcome::Ok)
}

fn parse_id(id: &str) -> Result<QueueId, String> {
    id.parse::<QueueId>()
        .map_err(|e| format!("'{id}' is not a queue id: {e}"))
}

/// The envelope of a record as header-like lines.
pub fn envelope_text(r: &StoredRecord) -> String {
    let e = &r.envelope;
    let mut s = String::new();
    s.push_str(&format!("Queue-Id: {}\n", r.header.queue_id));
    s.push_str(&format!(
        "Received-At: {}\n",
        timefmt::rfc3339_us(r.header.received_at_us)
    ));
    s.push_str(&format!(
        "Stored-In: {} offset {} sequence {}\n",
        r.segment, r.offset, r.header.seq
    ));
    s.push_str(&format!(
        "Client: {} (LHLO {})\n",
        e.client.peer, e.client.lhlo
    ));
    s.push_str(&format!("Transaction: {}\n", e.transaction));
    let mut mail = format!("Mail-From: {}", e.reverse_path);
    if let Some(size) = e.params.size {
        mail.push_str(&format!(" SIZE={size}"));
    }
    if let Some(b) = e.params.body {
        mail.push_str(&format!(" BODY={}", b.as_str()));
    }
    if e.params.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    s.push_str(&mail);
    s.push('\n');
    for rc in &e.recipients {
        s.push_str(&format!("Rcpt-To: <{}>", rc.mailbox));
        if let Some(d) = &rc.detail {
            s.push_str(&format!(
                " (base {}, detail {:?} after {:?})",
                rc.base_address(),
                d.tag,
                d.delimiter
            ));
        }
        s.push('\n');
    }
    s.push_str(&format!("Body-Bytes: {}\n", r.body.len()));
    s
}

fn show(dir: &Path, id: &str) -> Result<Outcome, String> {
    let qid = parse_id(id)?;
    let r = reader::find(dir, qid)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .ok_or_else(|| format!("no message {qid} in {}", dir.display()))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    out.write_all(envelope_text(&r).as_bytes())
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.write_all(&r.body))
        .and_then(|_| out.flush())
        .map_err(out_err)?;
    Ok(Outcome::Ok)
}

#[derive(serde::Serialize, Default)]
struct VerifyReport {
    spool: String,
    segments: u64,
    messages: u64,
    recipients: u64,
    /// Body bytes of the sound messages.
    bytes: u64,
    /// Record bytes, padding included.
    record_bytes: u64,
    /// Damage: bad records followed by sound ones, or damaged segment headers.
    corrupt: u64,
    /// Unfinished writes at the end of a segment (never acknowledged; cut by
    /// recovery at the next start).
    torn_tails: u64,
    problems: Vec<String>,
}

fn verify(dir: &Path, json: bool) -> Result<Outcome, String> {
    let mut rep = VerifyReport {
        spool: dir.display().to_string(),
        ..Default::default()
    };
    let segments =
        reader::list_segments(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for info in segments {
        rep.segments += 1;
        let scan = reader::scan_segment(&info.path, |_, _, v| {
            rep.messages += 1;
            rep.recipients += v.header.recipients as u64;
            rep.bytes += v.header.body_len;
        })
        .map_err(|e| format!("reading {}: {e}", info.path.display()))?;
        rep.record_bytes += scan.record_bytes;
        if let Err(e) = &scan.header {
            rep.corrupt += 1;
            rep.problems
                .push(format!("{}: damaged segment header: {e}", info.id));
            continue;
        }
        if let Some((offset, err)) = &scan.invalid {
            if scan.valid_after_invalid > 0 {
                rep.corrupt += 1;
                rep.problems.push(format!(
                    "{} offset {offset}: corrupt record ({err}) followed by {} sound records",
                    info.id, scan.valid_after_invalid
                ));
            } else {
                rep.torn_tails += 1;
                rep.problems.push(format!(
                    "{} offset {offset}: torn tail of {} bytes ({err}); never acknowledged, cut at the next start",
                    info.id,
                    scan.nonzero_end - offset
                ));
            }
        }
    }
    if json {
        let s = serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?;
        println!("{s}");
    } else {
        println!(
            "{}: {} messages, {} recipients, {} body bytes in {} segments; {} corrupt, {} torn tails",
            rep.spool,
            rep.messages,
            rep.recipients,
            rep.bytes,
            rep.segments,
            rep.corrupt,
            rep.torn_tails
        );
        for p in &rep.problems {
            println!("  {p}");
        }
    }
    Ok(if rep.corrupt == 0 {
        Outcome::Ok
    } else {
        Outcome::Problem
    })
}

fn export(dir: &Path, format: Format, to: &Path, ids: &[String]) -> Result<Outcome, String> {
    let wanted: Vec<QueueId> = ids.iter().map(|i| parse_id(i)).collect::<Result<_, _>>()?;
    let mut ex =
        Exporter::new(format, to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    let fail = |e: std::io::Error| format!("exporting to {}: {e}", to.display());
    if wanted.is_empty() {
        let segments =
            reader::list_segments(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
        for info in segments {
            let (records, _) = reader::read_segment_records(&info)
                .map_err(|e| format!("reading {}: {e}", info.path.display()))?;
            for r in &records {
                ex.export(r).map_err(fail)?;
            }
        }
    } else {
        for id in wanted {
            let r = reader::find(dir, id)
                .map_err(|e| format!("reading {}: {e}", dir.display()))?
                .ok_or_else(|| format!("no message {id} in {}", dir.display()))?;
            ex.export(&r).map_err(fail)?;
        }
    }
    let s = ex.finish().map_err(fail)?;
    eprintln!(
        "exported {} messages as {} deliveries to {} ({} already there)",
        s.messages,
        s.deliveries,
        to.display(),
        s.skipped
    );
    Ok(Outcome::Ok)
}
