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
    assert_eq!(arr[0]["sender"], "<>"); // message n=0 has the null sender
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
fn a_missing_spool_is_an_error_that_says_how_to_fix_it() {
    let o = cli(Path::new("/nonexistent/spool"), &["ls"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--spool DIR"));
}
