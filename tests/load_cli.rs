//! `lmtp-ingest load` end to end: against the real server over TCP and a UNIX
//! socket (counts checked against `spool verify`), with BDAT instead of DATA
//! (what the server stored compared byte for byte), against a fake server that
//! sends one reply where LMTP owes one per recipient, with bad arguments, and
//! as a sweep writing its CSV and SVG.

mod server_util;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::Duration;

use server_util::{BIN, Server, backends, spool_cmd, test_dir, verify};

fn load(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("load")
        .args(args)
        .output()
        .expect("run lmtp-ingest load")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "load failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: no progress line, nothing on stderr.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

#[test]
fn counts_match_the_spool_over_tcp_and_unix() {
    let mut server = Server::start("load-counts", "epoll", &[]);
    let tcp = load(&[
        "--target",
        &server.addr(),
        "--connections",
        "8",
        "--recipients",
        "3",
        "--messages",
        "400",
        "--json",
    ]);
    let v = json(&tcp);
    assert_eq!(v["messages"], 400, "{v}");
    assert_eq!(v["recipients"], 1200, "{v}");
    assert_eq!(v["bytes"], 400 * 4096, "{v}");
    assert_eq!(v["protocol_errors"], 0, "{v}");
    assert_eq!(v["failures"], serde_json::json!({}), "{v}");
    assert!(v["latency_us"]["p50"].as_u64().unwrap() > 0, "{v}");
    assert!(v["messages_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["config"]["threads"], 8.min(num_cpus()), "{v}");

    let unix = format!("unix:{}", server.socket.display());
    let v = json(&load(&[
        "--target",
        &unix,
        "--connections",
        "3",
        "--pipelining",
        "off",
        "--size-dist",
        "200:1,70000:1",
        "--messages",
        "60",
        "--json",
    ]));
    assert_eq!(
        (v["messages"].as_u64(), v["recipients"].as_u64()),
        (Some(60), Some(60)),
        "{v}"
    );

    // Open loop: 200 messages/s for half a second.
    let v = json(&load(&[
        "--target",
        &server.addr(),
        "--connections",
        "4",
        "--rate",
        "200",
        "--duration",
        "0.5",
        "--json",
    ]));
    let paced = v["messages"].as_u64().unwrap();
    assert!((50..=101).contains(&paced), "{v}");
    assert!(
        v["latency_from_schedule_us"]["p99"].as_u64().is_some(),
        "{v}"
    );

    // Many connections over more threads than CPUs, lock-step.
    let v = json(&load(&[
        "--target",
        &server.addr(),
        "--connections",
        "200",
        "--threads",
        "3",
        "--pipelining",
        "off",
        "--messages",
        "500",
        "--json",
    ]));
    assert_eq!(v["messages"], 500, "{v}");
    assert_eq!(v["config"]["threads"], 3, "{v}");

    let s = verify(&server.spool);
    assert_eq!(
        s["messages"].as_u64().unwrap(),
        400 + 60 + paced + 500,
        "{s}"
    );
    assert_eq!(
        s["recipients"].as_u64().unwrap(),
        1200 + 60 + paced + 500,
        "{s}"
    );
    assert_eq!(s["corrupt"], 0, "{s}");
    assert!(server.stop().success());
}

/// `--chunking on`: the server gets `BDAT n LAST` and the unstuffed content
/// (pipelined: the whole transaction in one write; lock-step: after the last
/// RCPT reply), answers once per recipient, and stores the content exactly.
#[test]
fn chunking_stores_the_content_exactly_pipelined_and_in_lock_step() {
    for io in backends() {
        let mut server = Server::start(&format!("load-bdat-{io}"), io, &[]);
        let v = json(&load(&[
            "--target",
            &server.addr(),
            "--connections",
            "4",
            "--recipients",
            "2",
            "--chunking",
            "on",
            "--size",
            "5000",
            "--messages",
            "40",
            "--json",
        ]));
        assert_eq!(v["config"]["chunking"], true, "{v}");
        assert_eq!(
            (v["messages"].as_u64(), v["recipients"].as_u64()),
            (Some(40), Some(80)),
            "{v}"
        );
        // Lock-step, with a body far larger than one receive buffer.
        let unix = format!("unix:{}", server.socket.display());
        let v = json(&load(&[
            "--target",
            &unix,
            "--connections",
            "2",
            "--pipelining",
            "off",
            "--chunking",
            "on",
            "--size",
            "300000",
            "--messages",
            "4",
            "--json",
        ]));
        assert_eq!(v["messages"], 4, "{v}");
        assert!(server.stop().success());

        let s = verify(&server.spool);
        assert_eq!(
            (s["messages"].as_u64(), s["corrupt"].as_u64()),
            (Some(44), Some(0)),
            "{s}"
        );
        let to = server.spool.parent().unwrap().join("eml");
        let (rc, out) = spool_cmd(
            &server.spool,
            &["export", "--format", "eml", "--to", to.to_str().unwrap()],
        );
        assert_eq!(rc, 0, "{out}");
        let (mut small, mut large) = (0, 0);
        for e in std::fs::read_dir(&to).unwrap() {
            let eml = std::fs::read(e.unwrap().path()).unwrap();
            // Return-Path and Delivered-To, then the generator's content.
            let content = if eml.len() > 300_000 {
                large += 1;
                lmtp_ingest::load::message::content(300_000)
            } else {
                small += 1;
                lmtp_ingest::load::message::content(5000)
            };
            assert!(eml.starts_with(b"Return-Path: <load@example.com>\r\nDelivered-To: user"));
            assert!(eml.ends_with(&content), "{io}: stored content differs");
            assert!(eml.len() < content.len() + 100);
        }
        // One copy per recipient.
        assert_eq!((small, large), (80, 4), "{io}");
    }
}

fn num_cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// A server that answers everything correctly except after the data, where
/// it sends a single reply for all recipients (the bug LMTP-NOTES warns of).
fn one_reply_server() -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(b"220 fake LMTP ready\r\n").unwrap();
        let mut in_data = false;
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let reply: &[u8] = if in_data {
                if line != ".\r\n" {
                    continue;
                }
                in_data = false;
                b"250 2.0.0 Ok: queued as 12345\r\n"
            } else if line.starts_with("LHLO") {
                b"250-fake\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
            } else if line.starts_with("DATA") {
                in_data = true;
                b"354 go ahead\r\n"
            } else if line.starts_with("QUIT") {
                b"221 2.0.0 Bye\r\n"
            } else {
                b"250 2.0.0 Ok\r\n"
            };
            if w.write_all(reply).is_err() {
                return;
            }
        }
    });
    (addr, h)
}

#[test]
fn one_reply_instead_of_one_per_recipient_fails_naming_the_problem() {
    let (addr, server) = one_reply_server();
    let out = load(&[
        "--target",
        &addr,
        "--connections",
        "1",
        "--recipients",
        "3",
        "--messages",
        "1",
        "--timeout",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("protocol errors: 1"), "{stdout}");
    assert!(
        stdout.contains("waiting for reply 2 of 3 after the data"),
        "{stdout}"
    );
    assert!(stdout.contains("RFC 2033"), "{stdout}");
    assert!(stderr.contains("protocol error"), "{stderr}");
    server.join().unwrap();
}

#[test]
fn bad_arguments_are_refused_naming_the_flag_and_the_fix() {
    let cases: &[(&[&str], &str)] = &[
        (&["--recipients", "0"], "--recipients 0: give 1 to 1000"),
        (&["--recipients", "1001"], "--recipients 1001"),
        (&["--size", "10"], "--size 10: give 64"),
        (&["--connections", "0"], "--connections 0"),
        (&["--connections", "4", "--threads", "8"], "lower --threads"),
        (
            &["--rate", "100"],
            "--rate needs a bound: add --messages N or --duration SECS",
        ),
        (&["--messages", "0"], "--messages 0"),
        (&["--size-dist", "4096:0"], "weight 0"),
        (&["--sweep", "threads=1,2"], "unknown key 'threads'"),
        (&["--sweep", "recipients=1,2000"], "--sweep recipients=2000"),
    ];
    for (args, want) in cases {
        let mut all = vec!["--target", "127.0.0.1:9"];
        all.extend_from_slice(args);
        let out = load(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
    }
    let out = load(&["--target", "localhost:2424"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("IP:PORT"));
    // Nothing listens on the discard port here.
    let out = load(&["--target", "127.0.0.1:9", "--messages", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is the server running"), "{stderr}");
}

#[test]
fn sweep_writes_a_csv_row_per_value_and_an_svg_chart() {
    let mut server = Server::start("load-sweep", "epoll", &[]);
    let out_dir = test_dir("load-sweep-out");
    let out = load(&[
        "--target",
        &server.addr(),
        "--messages",
        "40",
        "--sweep",
        "connections=1,2,4",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    let v = json(&out);
    assert_eq!(v["sweep"], "connections");
    assert_eq!(v["points"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["points"][2]["value"], 4);
    assert_eq!(v["points"][2]["result"]["config"]["connections"], 4);
    let csv = std::fs::read_to_string(out_dir.join("sweep-connections.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 4, "{csv}");
    assert_eq!(
        rows[0],
        "connections,messages_per_s,recipients_per_s,mb_per_s,p50_us,p99_us"
    );
    for (row, value) in rows[1..].iter().zip(["1", "2", "4"]) {
        let cols: Vec<&str> = row.split(',').collect();
        assert_eq!(cols.len(), 6, "{row}");
        assert_eq!(cols[0], value);
        assert!(cols[1].parse::<f64>().unwrap() > 0.0, "{row}");
    }
    let svg = std::fs::read_to_string(out_dir.join("sweep-connections.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2, "one per series");
    assert!(svg.contains("throughput (messages/s)") && svg.contains("p99 latency"));
    let s = verify(&server.spool);
    assert_eq!(s["messages"], 120, "{s}");
    assert!(server.stop().success());
}

#[test]
fn refusals_are_counted_by_code_and_fail_the_run_unless_allowed() {
    // Messages over 2,000 bytes are refused at MAIL (SIZE=), with 552.
    let mut server = Server::start("load-refusals", "epoll", &["--message-bytes-max", "2000"]);
    let addr = server.addr();
    for allow in [false, true] {
        let mut args = vec![
            "--target",
            &addr,
            "--connections",
            "4",
            "--pipelining",
            "off",
            "--size-dist",
            "1000:1,4096:1",
            "--messages",
            "100",
            "--json",
        ];
        if allow {
            args.push("--allow-failures");
        }
        let out = load(&args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let failed = v["messages_failed"].as_u64().unwrap();
        assert_eq!(v["messages"].as_u64().unwrap() + failed, 100, "{v}");
        assert!(failed > 10, "about half are too big: {v}");
        assert_eq!(v["failures"]["552"].as_u64(), Some(failed), "{v}");
        assert_eq!(v["protocol_errors"], 0, "{v}");
        assert_eq!(out.status.code(), Some(if allow { 0 } else { 1 }), "{v}");
        if !allow {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("--allow-failures"), "{stderr}");
        }
    }
    // Pipelined, a refused MAIL costs three errors (552, then 503 for RCPT
    // and DATA); after 20 the server says 421 and closes (Postfix's
    // smtpd_hard_error_limit). That is no protocol error, but it fails the run.
    let out = load(&[
        "--target",
        &addr,
        "--connections",
        "2",
        "--size",
        "4096",
        "--messages",
        "100",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["connections_closed_by_server"], 2, "{v}");
    assert_eq!(v["protocol_errors"], 0, "{v}");
    assert_eq!(v["messages"], 0, "{v}");
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("421"));
    assert!(server.stop().success());
}

#[test]
fn recipients_in_a_domain_the_server_accepts() {
    let dir = test_dir("load-domain");
    let conf = dir.join("lmtp.toml");
    std::fs::write(
        &conf,
        "[policy]\nrecipients = \"domains\"\ndomains = [\"mx.test\"]\n",
    )
    .unwrap();
    let mut server = Server::start_in(&dir, "epoll", &["--config", conf.to_str().unwrap()]);
    let addr = server.addr();
    let ok = load(&[
        "--target",
        &addr,
        "--connections",
        "2",
        "--recipients",
        "2",
        "--rcpt-domain",
        "MX.test",
        "--messages",
        "50",
        "--json",
    ]);
    let v = json(&ok);
    assert_eq!(v["messages"], 50, "{v}");
    assert_eq!(v["recipients"], 100, "{v}");
    // The default domain is refused at RCPT, and the run says what to do.
    let refused = load(&[
        "--target",
        &addr,
        "--connections",
        "1",
        "--pipelining",
        "off",
        "--messages",
        "5",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(v["failures"]["550"].as_u64(), Some(5), "{v}");
    assert_eq!(refused.status.code(), Some(1), "{v}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--rcpt-domain"), "{stderr}");
    let bad = load(&["--target", &addr, "--rcpt-domain", "a b", "--messages", "1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a domain"));
    assert_eq!(verify(&server.spool)["messages"], 50);
    assert!(server.stop().success());
}
