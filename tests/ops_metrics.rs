//! The metrics endpoint on the real server: scraped while clients deliver
//! and afterwards, its counters must match exactly what the clients sent
//! (messages, recipients, bytes, replies by code, bare LF, a message refused
//! for it) and the spool histograms must account for every message. Runs on
//! each backend.

mod server_util;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use server_util::{Client, Server, backends, body_for, http_get as get, scrape, test_dir};

/// Removes a test's directory when dropped: its spool holds preallocated
/// segments, and a full test run would otherwise leave gigabytes behind.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn scraped_counters_match_what_clients_sent() {
    const CLIENTS: u64 = 2;
    const MESSAGES: u64 = 40;
    const RCPTS: usize = 3;
    for io in backends() {
        let dir = test_dir(&format!("ops-metrics-{io}"));
        let c = dir.join("config.toml");
        std::fs::write(
            &c,
            "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[protocol]\nbare_line_endings = \"reject\"\n",
        )
        .unwrap();
        let mut server = Server::start_in(&dir, io, &["--config", &c.display().to_string()]);
        let _dir = RemoveOnDrop(server.dir.clone());
        let metrics = server.metrics_addr();

        let addr = server.addr();
        let sent_bytes = Arc::new(Mutex::new(0u64));
        let threads: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let (addr, sent_bytes) = (addr.clone(), sent_bytes.clone());
                std::thread::spawn(move || {
                    let mut c = Client::tcp(&addr).unwrap();
                    c.cmd("LHLO metrics.test", "250").unwrap();
                    let rcpts: Vec<String> =
                        (0..RCPTS).map(|r| format!("r{r}@example.org")).collect();
                    for i in 0..MESSAGES {
                        let body = body_for(t * 1000 + i, 300 + (i as usize % 5) * 700);
                        c.deliver("s@example.net", &rcpts, &body).unwrap();
                        *sent_bytes.lock().unwrap() += body.len() as u64;
                    }
                    c.cmd("QUIT", "221").unwrap();
                })
            })
            .collect();
        // Scrape while the clients deliver: the counters only grow.
        let mut last = 0.0;
        let mut scrapes = 0;
        while !threads.iter().all(|t| t.is_finished()) || scrapes < 2 {
            let m = scrape(&metrics);
            let n = m["lmtp_ingest_messages_total"];
            assert!(n >= last, "messages_total went back from {last} to {n}");
            last = n;
            scrapes += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        for t in threads {
            t.join().unwrap();
        }

        // One message with a bare LF: refused (reject policy), counted.
        let mut c = Client::tcp(&addr).unwrap();
        c.cmd("LHLO bare.test", "250").unwrap();
        c.cmd("MAIL FROM:<s@example.net>", "250 ").unwrap();
        c.cmd("RCPT TO:<a@example.org>", "250 ").unwrap();
        c.cmd("RCPT TO:<b@example.org>", "250 ").unwrap();
        c.cmd("DATA", "354 ").unwrap();
        c.send(b"Subject: x\nsmuggled\r\n.\r\n").unwrap();
        assert!(c.reply().unwrap().starts_with("554 5.6.0"));
        assert!(c.reply().unwrap().starts_with("554 5.6.0"));
        c.cmd("QUIT", "221").unwrap();

        // Connections close asynchronously; wait for the gauge to settle.
        let mut m = scrape(&metrics);
        for _ in 0..100 {
            if m["lmtp_ingest_connections_open"] == 0.0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            m = scrape(&metrics);
        }
        let messages = (CLIENTS * MESSAGES) as f64;
        let recipients = messages * RCPTS as f64;
        let bytes = *sent_bytes.lock().unwrap() as f64;
        let want = [
            ("lmtp_ingest_connections_opened_total", (CLIENTS + 1) as f64),
            ("lmtp_ingest_connections_open", 0.0),
            ("lmtp_ingest_messages_total", messages),
            ("lmtp_ingest_recipients_total", recipients),
            ("lmtp_ingest_received_bytes_total", bytes),
            ("lmtp_ingest_bare_lf_total", 1.0),
            ("lmtp_ingest_bare_cr_total", 0.0),
            ("lmtp_ingest_smuggling_rejected_total", 1.0),
            ("lmtp_ingest_inflight_bytes", 0.0),
            ("lmtp_ingest_writer_queue_depth", 0.0),
            (
                "lmtp_ingest_replies_total{code=\"220\"}",
                (CLIENTS + 1) as f64,
            ),
            (
                "lmtp_ingest_replies_total{code=\"221\"}",
                (CLIENTS + 1) as f64,
            ),
            ("lmtp_ingest_replies_total{code=\"354\"}", messages + 1.0),
            ("lmtp_ingest_replies_total{code=\"554\"}", 2.0),
            // LHLO, MAIL, RCPT, and one per recipient after the data.
            (
                "lmtp_ingest_replies_total{code=\"250\"}",
                (CLIENTS + 1) as f64 + (messages + 1.0) + (recipients + 2.0) + recipients,
            ),
            ("lmtp_ingest_dot_to_reply_seconds_count", messages),
            ("lmtp_ingest_batch_messages_sum", messages),
            ("lmtp_ingest_batch_bytes_sum", bytes),
        ];
        for (k, v) in want {
            assert_eq!(m.get(k), Some(&v), "{k}");
        }
        assert!(m["lmtp_ingest_spool_bytes"] > bytes);
        // Small batches: every segment so far zero-filled (the first, and
        // the prepared spare once taken into use).
        assert!(m["lmtp_ingest_segments_created_total{fill=\"zeros\"}"] >= 1.0);
        assert_eq!(
            m["lmtp_ingest_segments_created_total{fill=\"allocated\"}"],
            0.0
        );
        assert!(m["lmtp_ingest_fdatasync_seconds_count"] >= 1.0);
        assert_eq!(
            m["lmtp_ingest_batch_messages_count"],
            m["lmtp_ingest_batch_bytes_count"]
        );
        assert_eq!(
            m["lmtp_ingest_dot_to_reply_seconds_bucket{le=\"+Inf\"}"],
            messages
        );
        assert_eq!(get(&metrics, "/").0, "HTTP/1.1 404 Not Found");
        assert!(server.stop().success());
    }
}

#[test]
fn scraped_during_a_postfix_smtp_source_run() {
    const MESSAGES: u64 = 300;
    const RCPTS: u64 = 5;
    const SESSIONS: u64 = 4;
    let smtp_source = "/usr/sbin/smtp-source";
    assert!(
        std::path::Path::new(smtp_source).exists(),
        "{smtp_source} is missing: install Debian's postfix package (.ci/run does)"
    );
    for io in backends() {
        let dir = test_dir(&format!("ops-metrics-smtp-source-{io}"));
        let c = dir.join("config.toml");
        std::fs::write(&c, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let mut server = Server::start_in(&dir, io, &["--config", &c.display().to_string()]);
        let _dir = RemoveOnDrop(server.dir.clone());
        let metrics = server.metrics_addr();
        let mut child = std::process::Command::new(smtp_source)
            .args(["-L", "-s", &SESSIONS.to_string(), "-r", &RCPTS.to_string()])
            .args(["-l", "2048", "-m", &MESSAGES.to_string()])
            .args(["-f", "sender@example.org", "-t", "rcpt@example.com"])
            .arg(server.addr())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut during = Vec::new();
        let status = loop {
            during.push(scrape(&metrics)["lmtp_ingest_messages_total"]);
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "smtp-source failed");
        assert!(during.windows(2).all(|w| w[0] <= w[1]), "{during:?}");
        let m = scrape(&metrics);
        assert_eq!(m["lmtp_ingest_messages_total"], MESSAGES as f64);
        assert_eq!(m["lmtp_ingest_recipients_total"], (MESSAGES * RCPTS) as f64);
        // smtp-source opens one connection per message (SESSIONS at a time).
        assert_eq!(m["lmtp_ingest_connections_opened_total"], MESSAGES as f64);
        assert_eq!(
            m["lmtp_ingest_replies_total{code=\"220\"}"],
            MESSAGES as f64
        );
        assert_eq!(
            m["lmtp_ingest_replies_total{code=\"354\"}"],
            MESSAGES as f64
        );
        assert_eq!(m["lmtp_ingest_dot_to_reply_seconds_count"], MESSAGES as f64);
        assert_eq!(
            m["lmtp_ingest_received_bytes_total"],
            m["lmtp_ingest_batch_bytes_sum"]
        );
        assert!(server.stop().success());
        let v = server_util::verify(&server.spool);
        assert_eq!(v["messages"], MESSAGES, "{v}");
        assert_eq!(v["recipients"], MESSAGES * RCPTS, "{v}");
    }
}

/// The project's own load generator, scraped while it runs: the counters must
/// equal what `lmtp-ingest load --json` says it sent and got answered.
#[test]
fn scraped_during_our_load_generator_run() {
    for io in backends() {
        let dir = test_dir(&format!("ops-metrics-load-{io}"));
        let c = dir.join("config.toml");
        std::fs::write(&c, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let mut server = Server::start_in(&dir, io, &["--config", &c.display().to_string()]);
        server.owns_dir = true;
        let metrics = server.metrics_addr();
        let mut child = std::process::Command::new(server_util::BIN)
            .args(["load", "--target", &server.addr(), "--json"])
            .args(["--connections", "8", "--recipients", "4", "--size", "3000"])
            .args(["--messages", "400"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The JSON report is small: it fits the pipe while we poll.
        let mut during = Vec::new();
        while child.try_wait().unwrap().is_none() {
            during.push(scrape(&metrics)["lmtp_ingest_messages_total"]);
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "load failed");
        assert!(during.windows(2).all(|w| w[0] <= w[1]), "{during:?}");
        let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(sent["protocol_errors"], 0, "{sent}");
        let m = scrape(&metrics);
        assert_eq!(
            m["lmtp_ingest_messages_total"],
            sent["messages"].as_f64().unwrap()
        );
        assert_eq!(
            m["lmtp_ingest_recipients_total"],
            sent["recipients"].as_f64().unwrap()
        );
        assert_eq!(m["lmtp_ingest_connections_opened_total"], 8.0);
        assert_eq!(
            m["lmtp_ingest_dot_to_reply_seconds_count"],
            sent["messages"].as_f64().unwrap()
        );
        assert_eq!(
            m["lmtp_ingest_replies_total{code=\"250\"}"],
            // LHLO per connection; per message MAIL, 4 RCPT, 4 final replies.
            8.0 + 400.0 * 9.0
        );
        assert!(server.stop().success());
    }
}

/// An endpoint reachable from other machines starts (no mail can be
/// delivered through it), but the start-up log warns: no authentication,
/// and how to fix it. On loopback there is no warning.
#[test]
fn a_metrics_endpoint_off_loopback_is_warned_about() {
    for (listen, warned) in [("0.0.0.0:0", true), ("127.0.0.1:0", false)] {
        let dir = test_dir(&format!("ops-metrics-public-{warned}"));
        let c = dir.join("config.toml");
        std::fs::write(&c, format!("[metrics]\nlisten = \"{listen}\"\n")).unwrap();
        let mut server = Server::start_in(&dir, "epoll", &["--config", &c.display().to_string()]);
        let _dir = RemoveOnDrop(server.dir.clone());
        let line = server
            .wait_log("metrics endpoint listening", Duration::from_secs(10))
            .unwrap();
        let port = line.rsplit(':').next().unwrap().split('/').next().unwrap();
        // It serves (0.0.0.0 takes loopback connections too).
        let m = scrape(&format!("127.0.0.1:{port}"));
        assert!(m.contains_key("lmtp_ingest_messages_total"));
        let warning = server
            .log_lines
            .iter()
            .find(|l| l.contains("metrics.listen:"))
            .cloned();
        match (warned, warning) {
            (true, Some(w)) => assert!(
                w.contains("WARN")
                    && w.contains("0.0.0.0:0 is reachable from other machines")
                    && w.contains("no authentication")
                    && w.contains("127.0.0.1:9425")
                    && w.contains("firewall"),
                "{w}"
            ),
            (false, None) => {}
            (_, w) => panic!("{listen}: warning {w:?}; log: {:#?}", server.log_lines),
        }
        assert!(server.stop().success());
    }
}

/// A consumer's standing: segments it has not passed and the age of its
/// saved position, so a forgotten `spool follow --consumer` (which keeps
/// retention from removing anything) shows on a dashboard.
#[test]
fn consumers_show_how_far_behind_they_are() {
    let dir = test_dir("ops-metrics-consumers");
    let c = dir.join("config.toml");
    std::fs::write(&c, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let mut server = Server::start_in(&dir, "epoll", &["--config", &c.display().to_string()]);
    let _dir = RemoveOnDrop(server.dir.clone());
    let metrics = server.metrics_addr();
    assert!(
        !scrape(&metrics)
            .keys()
            .any(|k| k.starts_with("lmtp_ingest_consumer_")),
        "no consumer, no series"
    );
    let mut client = Client::tcp(&server.addr()).unwrap();
    client.cmd("LHLO t", "250").unwrap();
    for n in 0..3 {
        client
            .deliver("s@x.org", &["r@x.org".into()], &body_for(n, 500))
            .unwrap();
    }
    let o = std::process::Command::new(server_util::BIN)
        .args(["spool", "--spool"])
        .arg(&server.spool)
        .args(["follow", "--consumer", "archive", "--limit", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = scrape(&metrics);
    // No table here: the reload counters are there, at 0.
    assert_eq!(
        m["lmtp_ingest_table_reloads_total{result=\"refused\"}"],
        0.0
    );
    let behind = m["lmtp_ingest_consumer_segments_behind{consumer=\"archive\"}"];
    assert!(behind >= 1.0, "{m:?}");
    let age = m["lmtp_ingest_consumer_saved_age_seconds{consumer=\"archive\"}"];
    assert!(age < 60.0, "{age}");
    assert!(server.stop().success());
}
