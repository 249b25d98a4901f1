//! The delivery log on the real server: one line per recipient, Postfix
//! style by default and JSON objects with `log.format = "json"`, each naming
//! the queue id the client got; the filter comes from `[log] level` when
//! `RUST_LOG` is unset. Format tests run on each backend.

mod server_util;

use std::time::Duration;

use server_util::{Client, Server, backends, body_for, test_dir};

/// Removes a test's directory when dropped: its spool holds preallocated
/// segments, and a full test run would otherwise leave gigabytes behind.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(name: &str, io: &str, config: &str) -> Server {
    let dir = test_dir(name);
    let c = dir.join("config.toml");
    std::fs::write(&c, config).unwrap();
    Server::start_in(&dir, io, &["--config", &c.display().to_string()])
}

fn deliver_two(server: &Server) -> String {
    let mut c = Client::tcp(&server.addr()).unwrap();
    c.cmd("LHLO log.test", "250").unwrap();
    let rcpts = ["a@example.org".to_string(), "b+x@example.org".to_string()];
    let id = c
        .deliver("s@example.net", &rcpts, &body_for(1, 500))
        .unwrap();
    c.cmd("QUIT", "221").unwrap();
    id
}

#[test]
fn one_postfix_style_line_per_recipient() {
    for io in backends() {
        let mut server = start(&format!("ops-log-text-{io}"), io, "");
        let _dir = RemoveOnDrop(server.dir.clone());
        let id = deliver_two(&server);
        for rcpt in ["a@example.org", "b+x@example.org"] {
            let line = server
                .wait_log(&format!("to=<{rcpt}>"), Duration::from_secs(10))
                .unwrap_or_else(|| panic!("no line for {rcpt}: {:#?}", server.log_lines));
            let want = [
                format!("delivery: {id}: to=<{rcpt}>, client=127.0.0.1:"),
                ", from=<s@example.net>, size=".to_string(),
                ", delay=".to_string(),
                ", delays=".to_string(),
                format!(", dsn=2.0.0, status=sent (250 2.0.0 <{rcpt}> {id} Saved)"),
            ];
            for w in &want {
                assert!(line.contains(w.as_str()), "{w:?} not in {line}");
            }
        }
        assert!(server.stop().success());
    }
}

#[test]
fn json_format_has_separate_fields() {
    for io in backends() {
        let mut server = start(
            &format!("ops-log-json-{io}"),
            io,
            "[log]\nformat = \"json\"\n",
        );
        let _dir = RemoveOnDrop(server.dir.clone());
        let id = deliver_two(&server);
        server.wait_log("b+x@example.org", Duration::from_secs(10));
        assert!(server.stop().success());
        let lines: Vec<serde_json::Value> = server
            .log_lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .filter(|v: &serde_json::Value| v["target"] == "delivery")
            .collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        for (v, rcpt) in lines.iter().zip(["a@example.org", "b+x@example.org"]) {
            let f = &v["fields"];
            assert_eq!(f["queue_id"], id.as_str());
            assert_eq!(f["to"], rcpt);
            assert_eq!(f["from"], "<s@example.net>");
            assert_eq!(f["status"], "sent");
            assert_eq!(f["dsn"], "2.0.0");
            assert_eq!(f["reply"], format!("250 2.0.0 <{rcpt}> {id} Saved"));
            assert!(f["size"].as_u64().unwrap() > 500);
            assert!(f["delay"].as_f64().unwrap() >= 0.0);
            assert!(f["client"].as_str().unwrap().starts_with("127.0.0.1:"));
        }
    }
}

/// Runs the server with `RUST_LOG` unset and `[log] level = LEVEL`, over a
/// UNIX socket only (the banner may be filtered out); delivers one message;
/// returns everything it logged.
/// Kills the server if the test fails before [`stop_and_collect`]: a server
/// whose stderr is full would otherwise outlive the test.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the server on a UNIX socket only, with `config`, its stderr a pipe
/// that nobody reads until the test collects it at the end; returns the
/// child and a client connected and greeted.
fn start_unread(
    dir: &std::path::Path,
    config: &str,
) -> (KillOnDrop, Client<std::os::unix::net::UnixStream>) {
    let socket = dir.join("lmtp.sock");
    let c = dir.join("config.toml");
    std::fs::write(&c, config).unwrap();
    let child = std::process::Command::new(server_util::BIN)
        .arg("serve")
        .arg("--config")
        .arg(&c)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--spool")
        .arg(dir.join("spool"))
        .args(["--segment-bytes", "4194304"])
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let child = KillOnDrop(Some(child));
    let mut waited = 0;
    let stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&socket) {
            break s;
        }
        assert!(waited < 1000, "the server did not open its socket");
        std::thread::sleep(Duration::from_millis(20));
        waited += 1;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut client = Client::greet(stream).unwrap();
    client.cmd("LHLO log.test", "250").unwrap();
    (child, client)
}

/// SIGTERM, then everything the server wrote to stderr.
fn stop_and_collect(mut child: KillOnDrop) -> String {
    let child = child.0.take().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn log_with_level(name: &str, level: &str) -> String {
    let dir = test_dir(name);
    let _dir = RemoveOnDrop(dir.clone());
    let (child, mut c) = start_unread(&dir, &format!("[log]\nlevel = \"{level}\"\n"));
    c.deliver("s@example.net", &["a@example.org".to_string()], b"x\r\n")
        .unwrap();
    c.cmd("QUIT", "221").unwrap();
    stop_and_collect(child)
}

/// A stderr that nobody drains (a stuck journald, a full pipe) must not
/// stall deliveries: 3,000 delivery lines are far more than a 64 KiB pipe
/// holds, and with the log written on the shard's thread the 250s stop
/// after a few hundred. They are queued instead, and none is lost when the
/// server stops.
#[test]
fn an_unread_stderr_does_not_stall_deliveries() {
    let dir = test_dir("ops-log-unread-stderr");
    let _dir = RemoveOnDrop(dir.clone());
    let (child, mut c) = start_unread(&dir, "[log]\nlevel = \"info\"\n");
    let rcpts = ["a@example.org".to_string(), "b@example.org".to_string()];
    for n in 0..1500 {
        c.deliver("s@example.net", &rcpts, &body_for(n, 200))
            .unwrap_or_else(|e| panic!("message {n}: {e} (is the shard blocked on stderr?)"));
    }
    c.cmd("QUIT", "221").unwrap();
    let log = stop_and_collect(child);
    let sent = log.lines().filter(|l| l.contains("status=sent")).count();
    assert_eq!(sent, 3000, "every delivery line reaches stderr at the stop");
    assert!(
        !log.contains("dropped"),
        "nothing dropped: {}",
        &log[..400.min(log.len())]
    );
}

#[test]
fn level_comes_from_the_config_when_rust_log_is_unset() {
    let quiet = log_with_level("ops-log-level-warn", "warn");
    assert!(!quiet.contains("to=<a@example.org>"), "{quiet}");
    assert!(!quiet.contains("lmtp-ingest ready"), "{quiet}");
    let deliveries = log_with_level("ops-log-level-delivery", "warn,delivery=info");
    assert!(deliveries.contains("to=<a@example.org>"), "{deliveries}");
    assert!(!deliveries.contains("lmtp-ingest ready"), "{deliveries}");
}

/// A client can put a C1 control character (valid UTF-8, so valid in an
/// SMTPUTF8 address) into the addresses that delivery lines repeat: the log
/// shows it escaped, never raw, so it cannot drive an operator's terminal.
#[test]
fn client_control_characters_are_escaped_in_delivery_lines() {
    let mut server = start("ops-log-escape", "epoll", "");
    let _dir = RemoveOnDrop(server.dir.clone());
    let mut c = Client::tcp(&server.addr()).unwrap();
    c.cmd("LHLO log.test", "250").unwrap();
    c.cmd("MAIL FROM:<s\u{9b}31m@example.net> SMTPUTF8", "250")
        .unwrap();
    c.cmd("RCPT TO:<a\u{9b}2J@example.org>", "250").unwrap();
    c.cmd("DATA", "354").unwrap();
    c.send(b"x\r\n.\r\n").unwrap();
    let r = c.reply().unwrap();
    assert!(r.starts_with("250 "), "{r}");
    c.cmd("QUIT", "221").unwrap();
    let line = server
        .wait_log("status=sent", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no delivery line: {:#?}", server.log_lines));
    assert!(line.contains("to=<a\\u{9b}2J@example.org>"), "{line}");
    assert!(line.contains("from=<s\\u{9b}31m@example.net>"), "{line}");
    assert!(
        !line.contains('\u{9b}'),
        "raw C1 control in the log: {line:?}"
    );
}
