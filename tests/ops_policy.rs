//! Recipient tables on the real server: unknown recipients are refused at
//! RCPT while the others of the transaction are stored; a callout session
//! gets truthful answers and stores nothing; SIGHUP reloads the table under
//! load without losing a message; a bad table is refused with file:line and
//! the old one stays; an empty or missing table is refused at start and on
//! reload, naming the file. Every test runs on each backend, except those
//! of the reload and start-up checks, which do not touch the event loop.

mod server_util;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmtp_ingest::envelope::QueueId;
use server_util::{Client, Server, backends, body_for, test_dir};

/// Removes a test's directory when dropped: its spool holds preallocated
/// segments, and a full test run would otherwise leave gigabytes behind.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `config.toml` (a table policy) and the table; returns the flags.
fn table_config(dir: &Path, table: &str) -> Vec<String> {
    let t = dir.join("recipients");
    std::fs::write(&t, table).unwrap();
    let c = dir.join("config.toml");
    std::fs::write(
        &c,
        format!(
            "[policy]\nrecipients = \"table\"\ntable = \"{}\"\n",
            t.display()
        ),
    )
    .unwrap();
    vec!["--config".into(), c.display().to_string()]
}

fn start(name: &str, io: &str, table: &str) -> Server {
    let dir = test_dir(name);
    let flags = table_config(&dir, table);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start_in(&dir, io, &flags)
}

/// Replaces the table atomically (write + rename), as operators should.
fn rewrite_table(server: &Server, text: &str) {
    let tmp = server.dir.join("recipients.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, server.dir.join("recipients")).unwrap();
}

fn sighup(server: &Server) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
}

fn stored(server: &Server) -> Vec<lmtp_ingest::spool::reader::StoredRecord> {
    lmtp_ingest::spool::reader::read_all(&server.spool)
        .unwrap()
        .0
}

#[test]
fn unknown_recipient_refused_at_rcpt_others_stored() {
    for io in backends() {
        let mut server = start(
            &format!("ops-unknown-{io}"),
            io,
            "# known users\nalice@example.org\nbob@Example.ORG\n",
        );
        let _dir = RemoveOnDrop(server.dir.clone());
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("LHLO client.test", "250").unwrap();
        c.cmd("MAIL FROM:<sender@example.net>", "250 ").unwrap();
        c.cmd("RCPT TO:<alice@example.org>", "250 ").unwrap();
        let r = c.cmd("RCPT TO:<mallory@example.org>", "550 ").unwrap();
        assert_eq!(r, "550 5.1.1 <mallory@example.org> User unknown");
        // Domain case is folded; the detail is stripped before lookup.
        c.cmd("RCPT TO:<bob+lists@EXAMPLE.org>", "250 ").unwrap();
        // The local part is compared as written.
        c.cmd("RCPT TO:<Alice@example.org>", "550 5.1.1").unwrap();
        c.cmd("DATA", "354 ").unwrap();
        c.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n").unwrap();
        let a = c.reply().unwrap();
        let b = c.reply().unwrap();
        assert!(a.starts_with("250 2.0.0 <alice@example.org> "), "{a}");
        assert!(b.starts_with("250 2.0.0 <bob+lists@EXAMPLE.org> "), "{b}");
        c.cmd("QUIT", "221").unwrap();
        assert!(server.stop().success());
        let records = stored(&server);
        assert_eq!(records.len(), 1);
        let rcpts: Vec<String> = records[0]
            .envelope
            .recipients
            .iter()
            .map(|r| r.mailbox.address())
            .collect();
        assert_eq!(rcpts, ["alice@example.org", "bob+lists@EXAMPLE.org"]);
    }
}

#[test]
fn callout_answers_truthfully_and_stores_nothing() {
    for io in backends() {
        let mut server = start(&format!("ops-callout-{io}"), io, "alice@example.org\n");
        let _dir = RemoveOnDrop(server.dir.clone());
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("LHLO mx.example.net", "250").unwrap();
        c.cmd("MAIL FROM:<>", "250 ").unwrap();
        c.cmd("RCPT TO:<alice@example.org>", "250 ").unwrap();
        c.cmd(
            "RCPT TO:<nobody@example.org>",
            "550 5.1.1 <nobody@example.org> User unknown",
        )
        .unwrap();
        c.cmd("QUIT", "221").unwrap();
        assert!(server.stop().success());
        assert!(stored(&server).is_empty());
    }
}

#[test]
fn reload_under_load_loses_nothing_and_takes_effect() {
    const CLIENTS: usize = 3;
    for io in backends() {
        let mut server = start(&format!("ops-reload-{io}"), io, "user@example.org\n");
        let _dir = RemoveOnDrop(server.dir.clone());
        let addr = server.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
        let threads: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let (addr, stop, acked) = (addr.clone(), stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let mut c = Client::tcp(&addr).unwrap();
                    c.cmd("LHLO load.test", "250").unwrap();
                    let rcpts = ["user@example.org".to_string()];
                    let mut n = t as u64;
                    while !stop.load(Ordering::Relaxed) {
                        let id = c
                            .deliver("s@example.net", &rcpts, &body_for(n, 600))
                            .expect("a listed recipient is accepted through every reload");
                        acked.lock().unwrap().push((id, n));
                        n += CLIENTS as u64;
                    }
                    c.cmd("QUIT", "221").unwrap();
                })
            })
            .collect();

        std::thread::sleep(Duration::from_millis(200));
        for round in 1..=5 {
            let mut table = String::from("user@example.org\n");
            for i in 0..round * 1000 {
                table.push_str(&format!("new{i}@example.org\n"));
            }
            rewrite_table(&server, &table);
            sighup(&server);
            let needle = format!("entries={}", round * 1000 + 1);
            server
                .wait_log(&needle, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("reload {round} not logged: {:#?}", server.log_lines));
            std::thread::sleep(Duration::from_millis(100));
        }
        // The new entries take effect on a new connection.
        let mut c = Client::tcp(&addr).unwrap();
        c.cmd("LHLO check.test", "250").unwrap();
        c.cmd("MAIL FROM:<>", "250 ").unwrap();
        c.cmd("RCPT TO:<new4999@example.org>", "250 ").unwrap();
        c.cmd("RCPT TO:<new5000@example.org>", "550 5.1.1").unwrap();
        c.cmd("QUIT", "221").unwrap();

        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        assert!(server.stop().success());
        let acked = acked.lock().unwrap();
        assert!(
            acked.len() >= 20,
            "the load ran ({} acknowledged)",
            acked.len()
        );
        let records = stored(&server);
        let by_id: HashMap<QueueId, _> = records.iter().map(|r| (r.header.queue_id, r)).collect();
        assert_eq!(records.len(), acked.len());
        for (id, n) in acked.iter() {
            let r = by_id
                .get(&id.parse::<QueueId>().unwrap())
                .unwrap_or_else(|| panic!("acknowledged message {id} is missing"));
            assert!(r.body == body_for(*n, 600), "message {id} differs");
        }
    }
}

#[test]
fn bad_table_on_reload_keeps_the_old_one_and_names_file_and_line() {
    for io in backends() {
        let mut server = start(&format!("ops-badtable-{io}"), io, "alice@example.org\n");
        let _dir = RemoveOnDrop(server.dir.clone());
        rewrite_table(&server, "bob@example.org\n# fine so far\nnot an address\n");
        sighup(&server);
        let path = server.dir.join("recipients");
        let line = server
            .wait_log("recipient table refused", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no refusal logged: {:#?}", server.log_lines));
        assert!(line.contains(&format!("{}:3:", path.display())), "{line}");
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("LHLO check.test", "250").unwrap();
        c.cmd("MAIL FROM:<>", "250 ").unwrap();
        c.cmd("RCPT TO:<alice@example.org>", "250 ").unwrap();
        c.cmd("RCPT TO:<bob@example.org>", "550 5.1.1").unwrap();
        c.cmd("QUIT", "221").unwrap();
        assert!(server.stop().success());
    }
}

#[test]
fn a_bad_table_at_start_up_is_refused() {
    let err = refused_at_start("ops-badstart", Some("ok@example.org\nbad@\n"));
    assert!(err.contains("recipients:2:"), "{err}");
}

/// Runs `serve` with a table policy over `table`, expecting it to refuse to
/// start; returns stderr.
fn refused_at_start(name: &str, table: Option<&str>) -> String {
    let dir = test_dir(name);
    let _dir = RemoveOnDrop(dir.clone());
    let flags = table_config(&dir, table.unwrap_or(""));
    if table.is_none() {
        std::fs::remove_file(dir.join("recipients")).unwrap();
    }
    let out = std::process::Command::new(server_util::BIN)
        .arg("serve")
        .args(&flags)
        .args(["--listen", "127.0.0.1:0", "--spool"])
        .arg(dir.join("spool"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "serve should refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_empty_or_missing_table_at_start_up_is_refused() {
    // Empty, or nothing but comments (a truncated file): every recipient
    // would get 550.
    for (i, table) in ["", "# users\n\n"].into_iter().enumerate() {
        let err = refused_at_start(&format!("ops-emptystart-{i}"), Some(table));
        assert!(
            err.contains("recipients: no address in the file")
                && err.contains("every recipient would be refused")
                && err.contains("accept_all"),
            "{err}"
        );
        assert!(!err.contains("lmtp-ingest ready"), "{err}");
    }
    let err = refused_at_start("ops-missingstart", None);
    assert!(
        err.contains("recipients: cannot open: ") && err.contains("policy.table"),
        "{err}"
    );
    assert!(!err.contains("recipients:0:"), "{err}");
}

#[test]
fn an_empty_or_missing_table_on_reload_keeps_the_old_one() {
    let io = "epoll";
    let mut server = start(&format!("ops-emptyreload-{io}"), io, "alice@example.org\n");
    let _dir = RemoveOnDrop(server.dir.clone());
    let path = server.dir.join("recipients");
    let accepts_alice = |server: &Server| {
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("LHLO check.test", "250").unwrap();
        c.cmd("MAIL FROM:<>", "250 ").unwrap();
        c.cmd("RCPT TO:<alice@example.org>", "250 ").unwrap();
        c.cmd("QUIT", "221").unwrap();
    };

    // Truncated (as by `> recipients` before a rewrite): refused, logged
    // as an ERROR naming the file and the fix; alice is still accepted.
    std::fs::write(&path, "").unwrap();
    sighup(&server);
    let line = server
        .wait_log("no address in the file", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no refusal logged: {:#?}", server.log_lines));
    assert!(
        line.contains("ERROR")
            && line.contains("previous one stays in force")
            && line.contains(&format!("{}: no address", path.display()))
            && line.contains("rename(2)"),
        "{line}"
    );
    assert!(
        !server.log_lines.iter().any(|l| l.contains("entries=0")),
        "{:#?}",
        server.log_lines
    );
    accepts_alice(&server);

    // Removed: the path and the OS error, no line number.
    std::fs::remove_file(&path).unwrap();
    sighup(&server);
    let line = server
        .wait_log("cannot open", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no refusal logged: {:#?}", server.log_lines));
    assert!(
        line.contains("ERROR")
            && line.contains(&format!("{}: cannot open: ", path.display()))
            && line.contains("No such file")
            && line.contains("policy.table"),
        "{line}"
    );
    assert!(!line.contains(":0:"), "{line}");
    accepts_alice(&server);
    assert!(server.stop().success());
}
