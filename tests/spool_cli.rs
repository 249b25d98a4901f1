//! The `lmtp-ingest spool ...` commands, run as a user would: the built
//! binary against a spool this test fills through the library.

mod spool_util;

use std::path::Path;
use std::process::{Command, Output};

use lmtp_ingest::envelope::{CommitOutcome, Message, QueueId};
use lmtp_ingest::spool::{Spool, reader};
use spool_util::{config, message, spool_dir};

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmtp-ingest"))
        .arg("spool")
        .arg("--spool")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn filled(name: &str, count: u32) -> (std::path::PathBuf, Vec<(QueueId, Message)>) {
    let dir = spool_dir(name);
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    let mut p = spool.producer(None);
    let mut out = Vec::new();
    for n in 0..count {
        let m = message(31, 0, n, 300 + n as usize * 50);
        let CommitOutcome::Committed(id) = p.commit(m.clone()) else {
            panic!()
        };
        out.push((id, m));
    }
    spool.shutdown();
    (dir, out)
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn ls_lists_every_message_as_table_and_json() {
    let (dir, msgs) = filled("cli-ls", 5);
    let o = cli(&dir, &["ls"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 6, "{text}");
    for (id, m) in &msgs {
        let line = text
            .lines()
            .find(|l| l.starts_with(&id.to_string()))
            .unwrap();
        assert!(line.contains(&m.body.len().to_string()), "{line}");
    }
    let o = cli(&dir, &["ls", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 5);
    assert_eq!(arr[0]["id"], msgs[0].0.to_string());
    assert_eq!(arr[0]["sender"], ""); // message n=0 has the null sender (empty address)
    assert_eq!(arr[1]["sender"], "sender0@example.net");
    assert_eq!(arr[1]["recipients"], 2);
    assert_eq!(arr[1]["size"], msgs[1].1.body.len());
    assert!(arr[0]["received_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn show_prints_envelope_then_exact_body() {
    let (dir, msgs) = filled("cli-show", 3);
    let (id, m) = &msgs[2];
    let o = cli(&dir, &["show", &id.to_string()]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&format!("Queue-Id: {id}")));
    assert!(text.contains("Mail-From: <sender0@example.net> SIZE=400 BODY=8BITMIME"));
    assert!(text.contains("Rcpt-To: <user0+box2@example.org> (base user0@example.org"));
    assert!(text.contains("Client: 192.0.2.1:2525 (LHLO mx.example.net)"));
    assert!(
        o.stdout.ends_with(&m.body),
        "body must be printed byte for byte"
    );
    let missing = "00000000000000000000000000";
    let o = cli(&dir, &["show", missing]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no message"));
    let o = cli(&dir, &["show", "not-an-id"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn verify_passes_a_sound_spool_and_fails_a_corrupt_one() {
    let (dir, msgs) = filled("cli-verify", 6);
    let o = cli(&dir, &["verify", "--json"]);
    assert!(o.status.success(), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["messages"], 6);
    assert_eq!(
        v["recipients"],
        msgs.iter()
            .map(|m| m.1.envelope.recipients.len())
            .sum::<usize>()
    );
    assert_eq!(
        v["bytes"],
        msgs.iter().map(|m| m.1.body.len()).sum::<usize>()
    );
    assert_eq!(v["corrupt"], 0);

    // A torn tail alone is not damage: it was never acknowledged.
    let (records, scans) = reader::read_all(&dir).unwrap();
    let (info, scan) = &scans[0];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&info.path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"LSPR\x01\x00garbage", scan.end).unwrap();
    let o = cli(&dir, &["verify", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["torn_tails"], 1);

    // A flipped bit in the middle of the log is.
    let mid = &records[2];
    let at = mid.offset + mid.padded_len / 2;
    let bytes = std::fs::read(&info.path).unwrap();
    let flipped = [bytes[at as usize] ^ 0x10];
    std::os::unix::fs::FileExt::write_all_at(&f, &flipped, at).unwrap();
    let o = cli(&dir, &["verify", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["corrupt"], 1);
    assert_eq!(v["messages"], 2);
    let o = cli(&dir, &["verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("corrupt record"));
}

#[test]
fn verify_finds_a_segment_copied_into_the_wrong_place() {
    let (dir, _) = filled("cli-verify-copy", 3);
    let segs = reader::list_segments(&dir).unwrap();
    let copy = dir.join("w000-000000000099.seg");
    std::fs::copy(&segs[0].path, &copy).unwrap();
    let o = cli(&dir, &["verify", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The header names another segment, and the stream's sequence goes back
    // at the copy's first record.
    assert_eq!(v["corrupt"], 2, "{v}");
    let problems = v["problems"].to_string();
    assert!(problems.contains("renamed or copied") && problems.contains("out of place"));
}

#[test]
fn a_missing_spool_is_an_error_that_says_how_to_fix_it() {
    let o = cli(Path::new("/nonexistent/spool"), &["ls"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--spool DIR"));
}

fn tree(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(tree(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A message whose recipients try to escape the target directory.
fn hostile_spool(name: &str) -> (std::path::PathBuf, QueueId, Message) {
    use lmtp_ingest::envelope::{Mailbox, Recipient};
    let dir = spool_dir(name);
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    let mut p = spool.producer(None);
    let mut m = message(41, 1, 1, 10);
    m.body = b"Subject: hi\r\n\r\nFrom the start\r\n>From quoted\r\nend\r\n".to_vec();
    m.envelope.recipients = vec![
        Recipient {
            mailbox: Mailbox {
                local: "../../../etc/evil".into(),
                domain: "x".into(),
            },
            detail: None,
        },
        Recipient {
            mailbox: Mailbox {
                local: "\".hidden/..\"".into(),
                domain: "[IPv6:::1]".into(),
            },
            detail: None,
        },
        m.envelope.recipients[0].clone(),
    ];
    let CommitOutcome::Committed(id) = p.commit(m.clone()) else {
        panic!()
    };
    spool.shutdown();
    (dir, id, m)
}

#[test]
fn export_maildir_is_safe_idempotent_and_adds_delivery_headers() {
    let (dir, id, m) = hostile_spool("cli-maildir");
    let to = dir.join("out-maildir");
    let o = cli(
        &dir,
        &[
            "export",
            "--format",
            "maildir",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files = tree(&to);
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        assert!(f.starts_with(&to));
        let rel = f.strip_prefix(&to).unwrap();
        let parts: Vec<_> = rel.components().collect();
        assert_eq!(parts.len(), 3, "mailbox/new/file: {rel:?}");
        assert_eq!(parts[1].as_os_str(), "new");
        assert!(!parts[0].as_os_str().to_str().unwrap().starts_with('.'));
        assert!(
            f.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .contains(&id.to_string())
        );
    }
    let base = to.join("user0@example.org").join("new");
    let f = std::fs::read_dir(&base)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(f).unwrap();
    assert!(text.starts_with(
        "Return-Path: <sender1@example.net>\nDelivered-To: user0+box1@example.org\nSubject: hi\n"
    ), "{text}");
    assert!(!text.contains('\r'));
    let body_lf = String::from_utf8(m.body.clone())
        .unwrap()
        .replace("\r\n", "\n");
    assert!(text.ends_with(&body_lf));
    // Exporting again delivers nothing twice.
    let o = cli(
        &dir,
        &[
            "export",
            "--format",
            "maildir",
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 already there"));
    assert_eq!(tree(&to).len(), 3);
}

#[test]
fn export_mbox_quotes_from_lines_and_eml_keeps_crlf() {
    let (dir, id, _) = hostile_spool("cli-mbox");
    let to = dir.join("out-mbox");
    let o = cli(
        &dir,
        &["export", "--format", "mbox", "--to", to.to_str().unwrap()],
    );
    assert!(o.status.success());
    let files = tree(&to);
    // Three mailboxes, each with its list of the deliveries it holds.
    assert_eq!(files.len(), 6, "{files:?}");
    assert!(files.iter().all(|f| f.parent() == Some(to.as_path())));
    let mbox = std::fs::read_to_string(to.join("user0@example.org.mbox")).unwrap();
    // Exporting again appends nothing.
    let again = cli(
        &dir,
        &["export", "--format", "mbox", "--to", to.to_str().unwrap()],
    );
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("0 deliveries") && stderr.contains("(3 already there)"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(to.join("user0@example.org.mbox")).unwrap(),
        mbox
    );
    assert!(mbox.starts_with("From sender1@example.net "));
    assert!(
        mbox.contains("\n>From the start\n>>From quoted\nend\n\n"),
        "{mbox}"
    );

    let to = dir.join("out-eml");
    let o = cli(
        &dir,
        &[
            "export",
            "--format",
            "eml",
            "--to",
            to.to_str().unwrap(),
            "--id",
            &id.to_string(),
        ],
    );
    assert!(o.status.success());
    let eml = std::fs::read(to.join(format!("{id}-2.eml"))).unwrap();
    assert!(eml.starts_with(
        b"Return-Path: <sender1@example.net>\r\nDelivered-To: user0+box1@example.org\r\nSubject: hi\r\n"
    ));
    assert_eq!(tree(&to).len(), 3);
}

#[test]
fn verify_and_ls_beside_a_running_server_find_no_damage() {
    let dir = spool_dir("cli-live");
    let mut cfg = config(&dir);
    cfg.writers = 2;
    cfg.segment_bytes = 64 << 10;
    let (spool, _) = Spool::open(cfg).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for t in 0..3u32 {
        let p = spool.producer(None);
        let stop = stop.clone();
        producers.push(std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                while p.in_flight() < 8 {
                    let m = message(33, t, n, 500 + (n as usize * 97) % 5000);
                    p.try_submit(n as u64, m, std::time::SystemTime::now())
                        .unwrap();
                    n += 1;
                }
                p.wait_completion(std::time::Duration::from_secs(5));
            }
        }));
    }
    for _ in 0..5 {
        let o = cli(&dir, &["verify", "--json"]);
        assert!(o.status.success(), "{}", stdout(&o));
        let o = cli(&dir, &["ls", "--json"]);
        assert!(o.status.success());
        let _: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        p.join().unwrap();
    }
    spool.shutdown();
    let o = cli(&dir, &["verify", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["torn_tails"], 0, "{v}");
}

#[test]
fn verify_keeps_reporting_damage_recovery_cut_and_refuses_a_directory_that_is_no_spool() {
    let (dir, _, _) = hostile_spool("cli-cutdamage");
    let o = cli(&dir, &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // A torn tail recovery cut is history, not a problem; a cut of damage
    // (named so by recovery) is reported until someone moves it out.
    let cut = dir.join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    std::fs::write(cut.join("w000-000000000001.seg-4096-1.bin"), b"torn").unwrap();
    let o = cli(&dir, &["verify", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["cut_files"].as_u64(), v["corrupt"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    std::fs::write(cut.join("w000-000000000001.seg-8192-2-damage.bin"), b"x").unwrap();
    let o = cli(&dir, &["verify"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("1 corrupt") && out.contains("2 files in cut/"),
        "{out}"
    );
    assert!(
        out.contains("-damage.bin: recovery cut these bytes from below the committed watermark"),
        "{out}"
    );

    let empty = dir.join("not-a-spool");
    std::fs::create_dir_all(&empty).unwrap();
    for args in [
        &["verify"][..],
        &["ls"],
        &["follow", "--consumer", "c", "--exit-when-idle"],
    ] {
        let o = cli(&empty, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("is not a spool"),
            "{args:?}"
        );
    }
    assert!(
        !empty.join("consumers").exists(),
        "follow made nothing in a directory that is no spool"
    );
    // Naming the directory that holds the spool gets a hint.
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::symlink(&dir, state.join("spool")).unwrap();
    let o = cli(&state, &["ls"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("did you mean") && err.contains("state/spool"),
        "{err}"
    );
}

#[test]
fn ls_says_when_damage_hides_messages() {
    let dir = spool_dir("cli-ls-damage");
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    let mut p = spool.producer(None);
    for n in 0..5 {
        let CommitOutcome::Committed(_) = p.commit(message(44, 0, n, 2000)) else {
            panic!()
        };
    }
    spool.shutdown();
    let (records, scans) = reader::read_all(&dir).unwrap();
    let third = &records[2];
    let at = third.offset + third.padded_len / 2;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&scans[0].0.path)
        .unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x01], at).unwrap();
    drop(f);
    let o = cli(&dir, &["ls"]);
    assert_eq!(o.status.code(), Some(1));
    let listed = String::from_utf8_lossy(&o.stdout).lines().count() - 1;
    assert_eq!(listed, 2, "the two before the damage");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("damaged record") && err.contains("spool verify"),
        "{err}"
    );
}
