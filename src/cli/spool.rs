//! `lmtp-ingest spool ...`: read-only tools over a spool directory (they take
//! no spool lock and may run beside a server; `follow` locks only its own
//! consumer, so that one follower at a time reads under a consumer name).
//!
//! Must not: write into segments. Everything read goes through the spool's
//! reader, which checks each record's checksum before using it.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use lmtp_ingest::envelope::{QueueId, ReversePath};
use lmtp_ingest::spool::export::{Exporter, Format};
use lmtp_ingest::spool::follow::{Follower, Start};
use lmtp_ingest::spool::reader::{self, StoredRecord};
use lmtp_ingest::spool::{queue_id_parts, timefmt, watermark};

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
        /// maildir: DIR/MAILBOX/new/ (one file per delivery, the Maildir
        /// protocol); mbox: DIR/MAILBOX.mbox (mboxrd, LF line ends);
        /// eml: DIR/QUEUEID-N.eml (RFC 5322, CRLF). MAILBOX is the
        /// recipient without its +detail, domain in lower case. Running
        /// twice delivers nothing twice.
        #[arg(long, value_enum)]
        format: Format,
        /// Target directory (created if missing).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Only this message (repeatable); all messages when absent.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
    },
    /// Stream committed messages for a named consumer, from its saved
    /// position, saving it as it goes (resumes after a restart).
    Follow(FollowArgs),
}

#[derive(Args, Debug)]
struct FollowArgs {
    /// The consumer's name (registered on first use; retention keeps what it
    /// has not read).
    #[arg(long, value_name = "NAME")]
    consumer: String,
    /// Where a new consumer starts.
    #[arg(long, value_enum, default_value = "beginning")]
    from: Start,
    /// Run this shell command for each message (message on stdin; envelope
    /// in LMTP_QUEUE_ID, LMTP_SENDER, LMTP_RECIPIENTS, LMTP_RECEIVED_AT). Its
    /// exit status alone decides, however much of stdin it read: the position
    /// is saved after it exits 0; a failure stops follow (exit 1) and the
    /// message is offered again next time. Without it, one JSON line per
    /// message goes to stdout.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// Exit once caught up instead of waiting for more.
    #[arg(long)]
    exit_when_idle: bool,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// How often to look for new commits when caught up.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    poll_ms: u64,
}

pub fn run(args: SpoolArgs) -> Result<Outcome, String> {
    let dir = &args.spool;
    if !dir.is_dir() {
        return Err(format!(
            "spool directory {} does not exist (give it with --spool DIR)",
            dir.display()
        ));
    }
    looks_like_a_spool(dir)?;
    match args.command {
        SpoolCommand::Ls { json } => ls(dir, json),
        SpoolCommand::Show { id } => show(dir, &id),
        SpoolCommand::Verify { json } => verify(dir, json),
        SpoolCommand::Export { format, to, ids } => export(dir, format, &to, &ids),
        SpoolCommand::Follow(f) => follow(dir, &f),
    }
}

/// A directory that no server ever opened (no `lock` file) and that holds
/// no segment is not a spool: most likely `--spool` names its parent (the
/// systemd unit's state directory holds `spool/`). Refused, so that `ls`
/// does not print nothing with exit 0 and `follow` does not make a
/// `consumers/` directory there and wait forever.
fn looks_like_a_spool(dir: &Path) -> Result<(), String> {
    if dir.join("lock").exists() {
        return Ok(());
    }
    let segments =
        reader::list_segments(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    if segments.is_empty() {
        let hint = if dir.join("spool").join("lock").exists() {
            format!(" (did you mean {}?)", dir.join("spool").display())
        } else {
            String::new()
        };
        return Err(format!(
            "{} is not a spool (no segments, and no lock file a server would have left){hint}: check --spool",
            dir.display()
        ));
    }
    Ok(())
}

fn sender(r: &ReversePath) -> String {
    match r {
        // The null sender is the empty address, as in Postfix's $sender.
        ReversePath::Null => String::new(),
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
    let mut damaged = false;
    for info in segments {
        let scanned = reader::scan_segment(&info.path, |_, _, v| {
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
        });
        let scan = match scanned {
            Ok(scan) => scan,
            Err(e) if reader::is_gone(&e) => continue, // removed by retention
            Err(e) => return Err(format!("reading {}: {e}", info.path.display())),
        };
        if let Some(e) = write_err.take() {
            return Err(out_err(e));
        }
        // Records after a bad one are not listed. Past the committed
        // watermark that is a batch being written (or a crash's tail); below
        // it, damage, and the listing is short: say so.
        if let Some((offset, err)) = &scan.invalid {
            if against_watermark(dir, &info, *offset) == Some(std::cmp::Ordering::Less) {
                damaged = true;
                eprintln!(
                    "lmtp-ingest: {} offset {offset}: damaged record ({err}); the messages after it in that segment are not listed: run `lmtp-ingest spool verify` (docs/DURABILITY.md, \"Damage\")",
                    info.id
                );
            }
        }
    }
    if json {
        out.write_all(b"\n]\n").map_err(out_err)?;
    }
    out.flush().map_err(out_err)?;
    Ok(if damaged {
        Outcome::Problem
    } else {
        Outcome::Ok
    })
}

/// Where `offset` of segment `info` lies against its stream's committed
/// watermark (`Less`: below it, synced and acknowledged); `None` when the
/// stream has no readable watermark.
fn against_watermark(
    dir: &Path,
    info: &reader::SegmentInfo,
    offset: u64,
) -> Option<std::cmp::Ordering> {
    let wm = watermark::read(dir, info.id.writer).ok().flatten()?;
    Some((info.id.index, offset).cmp(&(wm.segment, wm.offset)))
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
    /// Damage: bad records followed by sound ones below the committed
    /// watermark, records out of place, or damaged segment headers.
    corrupt: u64,
    /// Unfinished writes at the end of a segment (never acknowledged; cut by
    /// recovery at the next start).
    torn_tails: u64,
    /// Files in `cut/`: what recovery cut at earlier starts.
    cut_files: u64,
    /// Of those, cuts of damage (below the committed watermark), counted in
    /// `corrupt` until they are moved out of `cut/`.
    cut_damage_files: u64,
    problems: Vec<String>,
}

/// Counts `DIR/cut/`: every file recovery cut, and as corrupt those it cut
/// from below the committed watermark (damage), which stay reported until
/// someone has dealt with them and moved them out.
fn cut_files(dir: &Path, rep: &mut VerifyReport) -> Result<(), String> {
    let cut = dir.join("cut");
    let entries = match std::fs::read_dir(&cut) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("listing {}: {e}", cut.display())),
    };
    let mut damage = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", cut.display()))?;
        rep.cut_files += 1;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(lmtp_ingest::spool::recover::DAMAGE_SUFFIX) {
            damage.push(name);
        }
    }
    damage.sort();
    for name in damage {
        rep.cut_damage_files += 1;
        rep.corrupt += 1;
        rep.problems.push(format!(
            "cut/{name}: recovery cut these bytes from below the committed watermark: damage on the disk, and acknowledged mail may be in them (docs/DURABILITY.md, \"Damage\"); once dealt with, move the file out of {}",
            cut.display()
        ));
    }
    Ok(())
}

fn verify(dir: &Path, json: bool) -> Result<Outcome, String> {
    let mut rep = VerifyReport {
        spool: dir.display().to_string(),
        ..Default::default()
    };
    let segments =
        reader::list_segments(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    cut_files(dir, &mut rep)?;
    // Per writer stream: the last sequence number seen (they must increase).
    let mut last_seq: std::collections::HashMap<u16, u64> = std::collections::HashMap::new();
    for info in segments {
        let mut inconsistent = Vec::new();
        let scanned = reader::scan_segment(&info.path, |offset, _, v| {
            rep.messages += 1;
            rep.recipients += v.header.recipients as u64;
            rep.bytes += v.header.body_len;
            // The queue id must name this stream and this record's sequence,
            // and sequences must increase along the stream.
            let (_, writer, seq) = queue_id_parts(v.header.queue_id);
            let prev = last_seq.insert(info.id.writer, v.header.seq);
            if writer != info.id.writer
                || seq != v.header.seq
                || prev.is_some_and(|p| p >= v.header.seq)
            {
                inconsistent.push(format!(
                    "{} offset {offset}: record {} (sequence {}) is out of place in this stream",
                    info.id, v.header.queue_id, v.header.seq
                ));
            }
        });
        let scan = match scanned {
            Ok(scan) => scan,
            Err(e) if reader::is_gone(&e) => continue, // removed by retention
            Err(e) => return Err(format!("reading {}: {e}", info.path.display())),
        };
        rep.segments += 1;
        rep.corrupt += inconsistent.len() as u64;
        rep.problems.append(&mut inconsistent);
        rep.record_bytes += scan.record_bytes;
        match &scan.header {
            Err(e) => {
                rep.corrupt += 1;
                rep.problems
                    .push(format!("{}: damaged segment header: {e}", info.id));
                continue;
            }
            Ok(h) if h.id != info.id => {
                rep.corrupt += 1;
                rep.problems.push(format!(
                    "{}: header says it is {} (renamed or copied?)",
                    info.id, h.id
                ));
            }
            Ok(_) => {}
        }
        if let Some((offset, err)) = &scan.invalid {
            // Past the stream's committed watermark a batch may be in the
            // middle of being written (a server is running): whatever is
            // there was not acknowledged, so it is a tail, not damage.
            let uncommitted = against_watermark(dir, &info, *offset)
                .is_some_and(|o| o != std::cmp::Ordering::Less);
            if scan.valid_after_invalid > 0 && !uncommitted {
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
            "{}: {} messages, {} recipients, {} body bytes in {} segments; {} corrupt, {} torn tails, {} files in cut/",
            rep.spool,
            rep.messages,
            rep.recipients,
            rep.bytes,
            rep.segments,
            rep.corrupt,
            rep.torn_tails,
            rep.cut_files
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
            let records = match reader::read_segment_records(&info) {
                Ok((records, _)) => records,
                Err(e) if reader::is_gone(&e) => continue, // removed by retention
                Err(e) => return Err(format!("reading {}: {e}", info.path.display())),
            };
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

/// Standard base64 (RFC 4648 section 4) with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        s.push(A[(n >> 18) as usize & 63] as char);
        s.push(A[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

#[derive(serde::Serialize)]
struct FollowLine<'a> {
    id: String,
    received_at: String,
    sender: String,
    recipients: Vec<String>,
    client: &'a str,
    lhlo: &'a str,
    transaction: String,
    size: usize,
    body_base64: String,
}

/// Set by SIGTERM or SIGINT while `follow` runs: stop after the message in
/// hand (its command finished, its position saved).
static FOLLOW_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn follow_stop(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    FOLLOW_STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// SIGTERM and SIGINT set [`FOLLOW_STOP`] instead of killing the follower
/// mid-message (`systemctl stop`, Ctrl-C).
fn catch_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid value; the handler only
        // stores to an atomic; SA_RESTART resumes interrupted reads, writes
        // and waits.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = follow_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn stopping() -> bool {
    FOLLOW_STOP.load(std::sync::atomic::Ordering::SeqCst)
}

fn follow(dir: &Path, args: &FollowArgs) -> Result<Outcome, String> {
    // `cli::main` restores SIGPIPE's default for the spool tools (so that
    // `spool ls | head` just stops); a follower must not have it. An --exec
    // command that exits without reading all of its stdin would kill us
    // with it mid-message (exit 141, nothing said, position not saved, the
    // message offered again forever), and a closed stdout must stop us at a
    // point we choose, never in the middle of saving. With it ignored, both
    // are EPIPE errors, handled below. Commands we start get the default
    // back: std resets SIGPIPE in the child before exec.
    // SAFETY: setting a signal's disposition; follow starts no thread.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Its errors name the consumer (and, when another follower holds it,
    // that one's pid).
    let mut f = Follower::open(dir, &args.consumer, args.from).map_err(|e| e.to_string())?;
    catch_stop_signals();
    let stdout = std::io::stdout();
    let mut count = 0u64;
    let limit = args.limit.unwrap_or(u64::MAX);
    while count < limit {
        if stopping() {
            eprintln!(
                "lmtp-ingest: consumer {}: stopped by a signal after {count} message(s), position saved",
                args.consumer
            );
            break;
        }
        let want = (limit - count).min(if args.exec.is_some() { 1 } else { 256 }) as usize;
        let batch = f
            .poll(want)
            .map_err(|e| format!("reading {}: {e}", dir.display()))?;
        if batch.is_empty() {
            if args.exit_when_idle {
                break;
            }
            // In short steps, so that a stop signal is not kept waiting.
            let until = std::time::Instant::now() + std::time::Duration::from_millis(args.poll_ms);
            while !stopping() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            continue;
        }
        for r in &batch {
            match &args.exec {
                Some(cmd) => {
                    let status = run_exec(cmd, r)?;
                    if !status.success() {
                        // Not processed: leave its position unsaved.
                        eprintln!(
                            "lmtp-ingest: '{cmd}' failed for {} ({status}); stopping, it is offered again next time",
                            r.header.queue_id
                        );
                        return Ok(Outcome::Problem);
                    }
                }
                None => {
                    let e = &r.envelope;
                    let line = FollowLine {
                        id: r.header.queue_id.to_string(),
                        received_at: timefmt::rfc3339_us(r.header.received_at_us),
                        sender: sender(&e.reverse_path),
                        recipients: e.recipients.iter().map(|x| x.mailbox.address()).collect(),
                        client: &e.client.peer,
                        lhlo: &e.client.lhlo,
                        transaction: e.transaction.to_string(),
                        size: r.body.len(),
                        body_base64: base64(&r.body),
                    };
                    let mut out = stdout.lock();
                    let written = serde_json::to_writer(&mut out, &line)
                        .map_err(std::io::Error::from)
                        .and_then(|_| out.write_all(b"\n"));
                    if let Err(e) = written {
                        return follow_out_err(e);
                    }
                }
            }
        }
        if let Err(e) = stdout.lock().flush() {
            return follow_out_err(e);
        }
        count += batch.len() as u64;
        // After the output is flushed (or, with --exec, after the one message
        // of this poll was processed): at-least-once.
        f.save()
            .map_err(|e| format!("saving consumer {}: {e}", args.consumer))?;
    }
    Ok(Outcome::Ok)
}

/// A follower's stdout failed before its batch was saved: nothing of the
/// batch is saved, so the reader (or the next one) gets it again.
fn follow_out_err(e: std::io::Error) -> Result<Outcome, String> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // `follow | head`: the reader went away, like `ls | head`, but said
        // out loud, because what it did not get is not lost.
        eprintln!(
            "lmtp-ingest: stdout was closed (its reader exited); stopping without saving the position of the messages being written: they are offered again next time"
        );
        return Ok(Outcome::Problem);
    }
    Err(format!(
        "{}; stopping without saving the position of the messages being written: they are offered again next time",
        out_err(e)
    ))
}

/// Runs `cmd` for one message and returns how it exited.
fn run_exec(cmd: &str, r: &StoredRecord) -> Result<std::process::ExitStatus, String> {
    let e = &r.envelope;
    let rcpts: Vec<String> = e.recipients.iter().map(|x| x.mailbox.address()).collect();
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("LMTP_QUEUE_ID", r.header.queue_id.to_string())
        .env("LMTP_SENDER", sender(&e.reverse_path))
        .env("LMTP_RECIPIENTS", rcpts.join(" "))
        .env(
            "LMTP_RECEIVED_AT",
            timefmt::rfc3339_us(r.header.received_at_us),
        )
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| format!("running '{cmd}': {err}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    // EPIPE: the command closed its stdin (it exited, or it reads only the
    // headers, or nothing). That is its choice, not a failure of either of
    // us: its exit status decides. (SIGPIPE is ignored, see `follow`.)
    let written = match stdin.write_all(&r.body) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    };
    drop(stdin);
    let status = child
        .wait()
        .map_err(|err| format!("waiting for '{cmd}': {err}"))?;
    written.map_err(|err| {
        format!(
            "writing {} to '{cmd}': {err}; stopping, it is offered again next time",
            r.header.queue_id
        )
    })?;
    Ok(status)
}
