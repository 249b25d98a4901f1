//! Real Exim 4.96 (Debian's exim4-daemon-light, unpacked by
//! tests/mta/fetch-exim.sh) delivering to our real server:
//!
//! - the `lmtp` transport over our UNIX socket with `batch_max = 200`;
//! - the `smtp` transport with `protocol = lmtp` over TCP with
//!   `max_rcpt = 200`, which must use BDAT (we offer CHUNKING);
//! - our recipients_max below Exim's batch (452 4.5.3 at RCPT);
//! - recipient callout verification in Exim's RCPT ACL answered by our
//!   recipient table, and Exim's callout cache across a table reload;
//! - our spool at its size cap: Exim gets 452, keeps the mail, and a forced
//!   queue run after space returns delivers every message exactly once.
//!
//! The configuration these tests prove is `mta_exim_util::INGEST_CONFIG`,
//! shown in docs/INTEGRATION.md. Without Exim unpacked the tests fail
//! and say to run `.ci/run`.

mod mta_exim_util;
mod server_util;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use mta_exim_util::{Exim, Stored, Target, message, stored};
use server_util::{Client, Server, backends, test_dir};

const SENDER: &str = "sender@sender.example";

/// Our server's configuration file: recipients from a table, 200 recipients
/// per transaction (Exim's batch_max / max_rcpt below), and a UNIX socket
/// Exim's transport user may open.
fn write_ingest_config(base: &Path, users: &[String]) -> String {
    let table = base.join("recipients");
    let mut t = String::from("# known users\n");
    for u in users {
        t.push_str(u);
        t.push('\n');
    }
    std::fs::write(&table, t).unwrap();
    let conf = base.join("ingest.toml");
    std::fs::write(
        &conf,
        format!(
            "[server]\nunix_socket_mode = \"0660\"\nunix_socket_group = \"Debian-exim\"\n\n\
             [limits]\nrecipients_max = 200\n\n\
             [policy]\nrecipients = \"table\"\ntable = \"{}\"\n",
            table.display()
        ),
    )
    .unwrap();
    conf.display().to_string()
}

fn users(domain: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user{i:03}@{domain}")).collect()
}

/// Our server on a fresh directory with the given extra flags, and an Exim
/// delivering to it.
fn start(name: &str, io: &str, extra: &[&str]) -> (Server, Exim) {
    let base = test_dir(&format!("exim-{name}-{io}"));
    let mut known = users("u.example", 250);
    known.extend(users("t.example", 250));
    known.push("alice@t.example".into());
    known.push("alice@u.example".into());
    let conf = write_ingest_config(&base, &known);
    let mut flags = vec!["--config", conf.as_str()];
    flags.extend_from_slice(extra);
    let mut server = Server::start_in(&base, io, &flags);
    server.owns_dir = true;
    let exim = Exim::new(&base.join("exim"), &target(&server), "");
    (server, exim)
}

fn target(server: &Server) -> Target {
    Target {
        port: server.port,
        socket: server.socket.clone(),
    }
}

/// (subject, recipient) -> how many times our spool holds it.
fn copies(all: &[Stored]) -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for s in all {
        let subject = s.subject().unwrap_or_default();
        for r in &s.rcpts {
            *m.entry((subject.clone(), r.clone())).or_default() += 1;
        }
    }
    m
}

/// The body Exim handed over holds ours: dot lines intact (Exim stuffed
/// them, or sent them raw in BDAT; we unstuffed), CRLF line endings.
fn assert_body_intact(s: &Stored, subject: &str, body_bytes: usize) {
    let original = String::from_utf8(message(subject, body_bytes)).unwrap();
    let (_, body) = original.split_once("\n\n").unwrap();
    let want = body.replace('\n', "\r\n");
    let got = String::from_utf8_lossy(&s.body);
    assert!(
        got.ends_with(&want),
        "stored body of {} does not end with what was sent:\n{got}",
        s.id
    );
    assert!(got.contains("\r\nReceived: ") || got.starts_with("Received: "));
}

/// Exim's `lmtp` transport over our UNIX socket: one message to 250 users
/// arrives as two LMTP transactions (batch_max = 200), each recipient once.
#[test]
fn lmtp_transport_unix_socket_batch_max_200() {
    for io in backends() {
        let (server, exim) = start("lmtp-unix", io, &[]);
        let rcpts = users("u.example", 250);
        let transcript = exim.submit(SENDER, &rcpts, &message("unix batch", 2000));
        assert_eq!(exim.queue_count(), 0, "{transcript}\n{}", exim.logs());
        // The lmtp transport speaks lock-step and uses DATA even though we
        // offer CHUNKING (its -v transcript: "LMTP>> ...").
        assert_eq!(transcript.matches("LMTP>> DATA").count(), 2, "{transcript}");
        assert!(!transcript.contains("BDAT"), "{transcript}");
        let all = stored(&server.spool);
        let mut sizes: Vec<usize> = all.iter().map(|s| s.rcpts.len()).collect();
        sizes.sort();
        assert_eq!(
            sizes,
            vec![50, 200],
            "batch_max = 200 splits 250 recipients into 200 + 50\n{}",
            exim.logs()
        );
        let c = copies(&all);
        assert_eq!(c.len(), 250);
        for r in &rcpts {
            assert_eq!(c.get(&("unix batch".into(), r.clone())), Some(&1), "{r}");
        }
        for s in &all {
            assert_eq!(s.sender, format!("<{SENDER}>"));
            assert_body_intact(s, "unix batch", 2000);
        }
        // Exim agrees: 250 successful deliveries by the lmtp transport.
        let log = exim.mainlog();
        let delivered = log
            .lines()
            .filter(|l| (l.contains(" => ") || l.contains(" -> ")) && l.contains("T=ingest_lmtp "))
            .count();
        assert_eq!(delivered, 250, "{}", exim.logs());
        exim.assert_paniclog_quiet();
    }
}

/// Exim's `smtp` transport with `protocol = lmtp` over TCP: LHLO sees our
/// CHUNKING, so the data goes as `BDAT n LAST` (never DATA), and max_rcpt =
/// 200 splits 250 recipients into two transactions.
#[test]
fn smtp_transport_lmtp_over_tcp_uses_bdat() {
    for io in backends() {
        let (server, exim) = start("lmtp-tcp", io, &[]);
        let rcpts = users("t.example", 250);
        let transcript = exim.submit(SENDER, &rcpts, &message("tcp bdat", 3000));
        assert_eq!(exim.queue_count(), 0, "{transcript}\n{}", exim.logs());
        // Exim's own account of the wire (-v): CHUNKING chosen, BDAT sent,
        // no DATA command.
        assert!(
            transcript.contains("250-CHUNKING"),
            "our LHLO reply offers CHUNKING:\n{transcript}"
        );
        assert!(
            transcript.contains("will write message using CHUNKING"),
            "{transcript}"
        );
        let bdat = transcript
            .lines()
            .filter(|l| l.contains("> BDAT ") && l.ends_with(" LAST"))
            .count();
        assert_eq!(bdat, 2, "one BDAT ... LAST per transaction:\n{transcript}");
        assert!(
            !transcript.lines().any(|l| l.trim_end().ends_with("> DATA")),
            "DATA was used:\n{transcript}"
        );
        // ...and its log: every delivery line carries K (CHUNKING used).
        let log = exim.mainlog();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                (l.contains(" => ") || l.contains(" -> ")) && l.contains("T=ingest_lmtp_tcp ")
            })
            .collect();
        assert_eq!(lines.len(), 250, "{}", exim.logs());
        assert!(lines.iter().all(|l| l.contains(" K ")), "{}", exim.logs());

        let all = stored(&server.spool);
        let mut sizes: Vec<usize> = all.iter().map(|s| s.rcpts.len()).collect();
        sizes.sort();
        assert_eq!(sizes, vec![50, 200], "{}", exim.logs());
        let c = copies(&all);
        assert_eq!(c.len(), 250);
        assert!(c.values().all(|&n| n == 1));
        for r in &rcpts {
            assert!(c.contains_key(&("tcp bdat".into(), r.clone())), "{r}");
        }
        for s in &all {
            assert_body_intact(s, "tcp bdat", 3000);
        }
        exim.assert_paniclog_quiet();
    }
}

/// SMTP into Exim's daemon, whose RCPT ACL does `verify =
/// recipient/callout`: our server's table decides, for both routes (the
/// UNIX-socket domain is verified over TCP by a `verify_only` router). An
/// unknown user is refused at RCPT with our 550 passed on; known ones are
/// accepted and delivered; the callouts (MAIL FROM:<>, no data) store
/// nothing.
#[test]
fn callout_rejects_unknown_accepts_known() {
    for io in backends() {
        let (server, mut exim) = start("callout", io, &[]);
        exim.start_daemon();
        let mut c = Client::tcp(&format!("127.0.0.1:{}", exim.smtp_port)).unwrap();
        c.cmd("EHLO client.test", "250 ").unwrap();
        c.cmd(&format!("MAIL FROM:<{SENDER}>"), "250 ").unwrap();
        for (rcpt, want) in [
            ("alice@t.example", "250 "),
            ("nobody@t.example", "550 "),
            ("user007@u.example", "250 "),
            ("nobody@u.example", "550 "),
        ] {
            let reply = c
                .cmd(&format!("RCPT TO:<{rcpt}>"), want)
                .unwrap_or_else(|e| panic!("{e}\n{}", exim.logs()));
            if want == "550 " {
                // Our own words, so the answer came from our table.
                assert!(
                    reply.contains(&format!("5.1.1 <{rcpt}> User unknown")),
                    "Exim passes on our 550 5.1.1: {reply}"
                );
            }
        }
        c.cmd("DATA", "354 ").unwrap();
        c.send(b"Subject: via callout\r\n\r\nhello\r\n.\r\n")
            .unwrap();
        let queued = c.reply().unwrap();
        assert!(queued.starts_with("250 "), "{queued}");
        c.cmd("QUIT", "221 ").unwrap();

        // The daemon delivers at once, one transaction per route.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut rcpts = loop {
            let all = stored(&server.spool);
            let ours: Vec<String> = all
                .iter()
                .filter(|s| s.subject().as_deref() == Some("via callout"))
                .flat_map(|s| s.rcpts.clone())
                .collect();
            if ours.len() >= 2 {
                // Nothing else was stored: the callouts left no message.
                assert_eq!(all.len(), 2, "{all:?}");
                break ours;
            }
            assert!(
                Instant::now() < deadline,
                "the accepted message did not arrive in 20 s\n{}",
                exim.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        rcpts.sort();
        assert_eq!(rcpts, vec!["alice@t.example", "user007@u.example"]);
        assert!(
            exim.wait_mainlog("Completed", 1, Duration::from_secs(10)),
            "{}",
            exim.logs()
        );
        let log = exim.mainlog();
        for (rcpt, transport) in [
            ("alice@t.example", "T=ingest_lmtp_tcp "),
            ("user007@u.example", "T=ingest_lmtp "),
        ] {
            assert!(
                // Local deliveries log "=> user007 <user007@u.example>".
                log.lines().any(|l| (l.contains(&format!("> {rcpt} "))
                    || l.contains(&format!(" <{rcpt}> R=")))
                    && l.contains(transport)),
                "{rcpt} delivered by {transport}\n{log}"
            );
        }
        for rcpt in ["nobody@t.example", "nobody@u.example"] {
            assert!(
                log.lines()
                    .any(|l| l.contains(&format!("rejected RCPT <{rcpt}>"))
                        && l.contains(&format!("after RCPT TO:<{rcpt}>: 550 5.1.1"))),
                "{log}"
            );
        }
        exim.assert_paniclog_quiet();
    }
}

/// Exim caches callout answers: after a user is added to our table and the
/// table reloaded (SIGHUP), Exim still refuses that user from its negative
/// cache while our server already accepts it. (docs/INTEGRATION.md
/// says so and suggests `callout_negative_expire` or `no_cache`.)
#[test]
fn callout_cache_outlives_a_table_reload() {
    let io = backends()[0];
    let (mut server, mut exim) = start("callout-cache", io, &[]);
    exim.start_daemon();
    let rcpt_via_exim = |want: &str| {
        let mut c = Client::tcp(&format!("127.0.0.1:{}", exim.smtp_port)).unwrap();
        c.cmd("EHLO client.test", "250 ").unwrap();
        c.cmd(&format!("MAIL FROM:<{SENDER}>"), "250 ").unwrap();
        let r = c
            .cmd("RCPT TO:<late@t.example>", want)
            .unwrap_or_else(|e| panic!("{e}\n{}", exim.logs()));
        c.cmd("QUIT", "221 ").unwrap();
        r
    };
    rcpt_via_exim("550 ");
    // Add the user and reload our table.
    let table = server.dir.join("recipients");
    let mut t = std::fs::read_to_string(&table).unwrap();
    t.push_str("late@t.example\n");
    std::fs::write(&table, t).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    assert!(
        server
            .wait_log("recipient table reloaded", Duration::from_secs(10))
            .is_some(),
        "{:#?}",
        server.log_lines
    );
    // Our server now accepts the user...
    let mut direct = Client::tcp(&server.addr()).unwrap();
    direct.cmd("LHLO test", "250 ").unwrap();
    direct.cmd("MAIL FROM:<>", "250 ").unwrap();
    direct.cmd("RCPT TO:<late@t.example>", "250 ").unwrap();
    // ...while Exim answers from its cache.
    let cached = rcpt_via_exim("550 ");
    assert!(
        cached.contains("Previous (cached) callout verification failure"),
        "{cached}"
    );
    exim.assert_paniclog_quiet();
}

/// Fills our spool to its size cap with 64 KiB messages from a plain LMTP
/// client, until one is refused with 452 4.3.1; returns how many fit. Exim's
/// messages are larger, so none of them fits in what is left.
fn fill_to_cap(server: &Server, max: usize) -> usize {
    let mut c = Client::tcp(&server.addr()).unwrap();
    c.cmd("LHLO filler.test", "250 ").unwrap();
    let body = server_util::body_for(1, 64 * 1024);
    for i in 0..max {
        match c.deliver("filler@sender.example", &["alice@u.example".into()], &body) {
            Ok(_) => continue,
            Err(e) if e.to_string().contains("452 4.3.1") => return i,
            Err(e) => panic!("filler {i}: {e}"),
        }
    }
    panic!("the spool took {max} filler messages without reaching its cap");
}

/// Submits 4 messages of 2 recipients each, two through each transport,
/// while our spool is at its cap: all deferred (452), all still queued,
/// none stored. Returns their subjects and recipients.
fn submit_while_full(server: &Server, exim: &Exim) -> Vec<(String, String)> {
    let mut want = Vec::new();
    for i in 0..4 {
        let domain = if i % 2 == 0 { "u.example" } else { "t.example" };
        let subject = format!("deferred {i}");
        let rcpts = vec![format!("user{i:03}@{domain}"), format!("alice@{domain}")];
        exim.submit(SENDER, &rcpts, &message(&subject, 80 * 1024));
        for r in rcpts {
            want.push((subject.clone(), r));
        }
    }
    assert_eq!(exim.queue_count(), 4, "{}", exim.logs());
    let log = exim.mainlog();
    let deferred = log
        .lines()
        .filter(|l| l.contains(" == ") && l.contains("452 4.3.1"))
        .count();
    assert_eq!(
        deferred, 8,
        "each recipient deferred with 452 4.3.1\n{}",
        log
    );
    assert!(
        stored(&server.spool)
            .iter()
            .all(|s| !s.subject().unwrap_or_default().starts_with("deferred")),
        "nothing of Exim's was stored"
    );
    // Another forced queue run while still full changes nothing.
    exim.queue_run();
    assert_eq!(exim.queue_count(), 4, "{}", exim.logs());
    want
}

/// After space returns: a forced queue run empties Exim's queue and every
/// (message, recipient) is in our spool exactly once; a second run adds
/// nothing.
fn redeliver_exactly_once(server: &Server, exim: &Exim, want: &[(String, String)]) {
    let transcript = exim.queue_run();
    assert_eq!(
        exim.queue_count(),
        0,
        "queue run after space returned:\n{transcript}\n{}",
        exim.logs()
    );
    let check = || {
        let c = copies(&stored(&server.spool));
        for w in want {
            assert_eq!(c.get(w), Some(&1), "{w:?} stored exactly once");
        }
        let ours = c.keys().filter(|(s, _)| s.starts_with("deferred")).count();
        assert_eq!(ours, want.len());
    };
    check();
    exim.queue_run();
    check();
}

/// At the size cap Exim gets 452 per recipient and keeps the mail; after a
/// restart of our server with a larger cap, `exim -qff` delivers each
/// message once.
#[test]
fn size_cap_defers_then_restart_with_larger_cap_delivers_once() {
    for io in backends() {
        // One 1 MiB segment, no room for a prepared spare.
        let (mut server, exim) = start("cap-restart", io, &["--spool-bytes-max", "1048576"]);
        let filled = fill_to_cap(&server, 40);
        assert!(filled >= 10, "{filled}");
        let want = submit_while_full(&server, &exim);

        let status = server.stop();
        assert!(status.success(), "{status:?}");
        let conf = server.dir.join("ingest.toml").display().to_string();
        let mut bigger = Server::start_in(
            &server.dir,
            io,
            &["--config", &conf, "--spool-bytes-max", "67108864"],
        );
        bigger.owns_dir = true;
        server.owns_dir = false;
        drop(server);
        // Same socket path; a new TCP port.
        exim.retarget(&target(&bigger));
        redeliver_exactly_once(&bigger, &exim, &want);
        exim.assert_paniclog_quiet();
    }
}

/// At the size cap, with the server left running: a consumer reads the
/// spool (`spool follow`), retention removes the segments it has passed,
/// the spool leaves its full state, and `exim -qff` delivers each message
/// once.
#[test]
fn size_cap_defers_then_consumer_frees_space_delivers_once() {
    for io in backends() {
        // Two 1 MiB segments: the first and the spare prepared ahead.
        let (server, exim) = start("cap-consumer", io, &["--spool-bytes-max", "2097152"]);
        let filled = fill_to_cap(&server, 80);
        assert!(filled >= 20, "{filled}");
        let want = submit_while_full(&server, &exim);

        let segments = |dir: &Path| {
            lmtp_ingest::spool::reader::list_segments(dir)
                .unwrap()
                .len()
        };
        let before = segments(&server.spool);
        assert!(before >= 2, "{before}");
        let (code, _) = server_util::spool_cmd(
            &server.spool,
            &["follow", "--consumer", "drain", "--exit-when-idle"],
        );
        assert_eq!(code, 0);
        // Retention runs once a second and clears the full state in the
        // same pass.
        let deadline = Instant::now() + Duration::from_secs(10);
        while segments(&server.spool) >= before {
            assert!(
                Instant::now() < deadline,
                "retention removed no segment after the consumer caught up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        redeliver_exactly_once(&server, &exim, &want);
        exim.assert_paniclog_quiet();
    }
}

/// Our `limits.recipients_max` (100 here) below Exim's batch_max /
/// max_rcpt (200): we answer 452 4.5.3 from the 101st RCPT on. Exim 4.96
/// does not read our `LIMITS RCPTMAX=100`. Its smtp transport (TCP) sends
/// the refused recipients at once in a new transaction; its lmtp transport
/// defers them to the next queue run. Either way each arrives once.
#[test]
fn recipients_max_below_exims_batch() {
    for io in backends() {
        let (server, exim) = start("rcpt-limit", io, &["--recipients-max", "100"]);
        let tcp = exim.submit(SENDER, &users("t.example", 250), &message("limit tcp", 100));
        assert!(tcp.contains("250 LIMITS RCPTMAX=100"), "{tcp}");
        assert!(tcp.contains("452 4.5.3 Too many recipients"), "{tcp}");
        let unix = exim.submit(
            SENDER,
            &users("u.example", 250),
            &message("limit unix", 100),
        );
        let sizes = |subject: &str| {
            let mut v: Vec<usize> = stored(&server.spool)
                .iter()
                .filter(|s| s.subject().as_deref() == Some(subject))
                .map(|s| s.rcpts.len())
                .collect();
            v.sort();
            v
        };
        // TCP: 200 RCPTs on one connection (100 taken, 100 refused, then
        // sent again in a second MAIL transaction) and 50 on another.
        assert_eq!(sizes("limit tcp"), vec![50, 100, 100], "{tcp}");
        // UNIX socket: 100 of the first batch of 200 wait in Exim's queue.
        assert_eq!(sizes("limit unix"), vec![50, 100], "{unix}");
        assert_eq!(exim.queue_count(), 1, "{}", exim.logs());
        let deferred = exim
            .mainlog()
            .lines()
            .filter(|l| {
                l.contains(" == ") && l.contains("T=ingest_lmtp ") && l.contains("452 4.5.3")
            })
            .count();
        assert_eq!(deferred, 100, "{}", exim.logs());
        exim.queue_run();
        assert_eq!(exim.queue_count(), 0, "{}", exim.logs());
        assert_eq!(sizes("limit unix"), vec![50, 100, 100]);
        let c = copies(&stored(&server.spool));
        assert_eq!(c.len(), 500);
        assert!(c.values().all(|&n| n == 1), "each recipient once");
        exim.assert_paniclog_quiet();
    }
}

/// docs/INTEGRATION.md shows the configuration these tests run, word
/// for word (with a production socket path and port).
#[test]
fn doc_shows_the_tested_configuration() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/INTEGRATION.md"))
            .unwrap();
    let shown = mta_exim_util::INGEST_CONFIG
        .replace("@SOCKET@", "/run/lmtp-ingest/lmtp.sock")
        .replace("@PORT@", "2424");
    assert!(
        doc.contains(&format!("```\n{}\n```", shown.trim_matches('\n'))),
        "docs/INTEGRATION.md must show INGEST_CONFIG from tests/mta_exim_util/mod.rs \
         as it is now; copy it over:\n{shown}"
    );
}
