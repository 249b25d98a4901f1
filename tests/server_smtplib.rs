//! The real server with real clients: Python's smtplib over TCP and over the
//! UNIX socket, single and multi-recipient messages, pipelining with QUIT
//! right after the final dot. Every stored message is checked with
//! `lmtp-ingest spool verify --json` and `spool show`.

mod server_util;

use server_util::{Server, backends, python, spool_cmd, verify};

fn check_stored(server: &Server, delivered: &serde_json::Value) {
    for m in delivered.as_array().unwrap() {
        let id = m["id"].as_str().unwrap();
        let (code, shown) = spool_cmd(&server.spool, &["show", id]);
        assert_eq!(code, 0, "spool show {id}");
        assert!(shown.contains(&format!("Queue-Id: {id}")), "{shown}");
        for r in m["rcpts"].as_array().unwrap() {
            assert!(
                shown.contains(&format!("Rcpt-To: <{}>", r.as_str().unwrap())),
                "{shown}"
            );
        }
        let body = m["body"].as_str().unwrap();
        assert!(
            shown.ends_with(body),
            "stored body differs:\n{shown}\nwanted:\n{body}"
        );
    }
}

#[test]
fn smtplib_over_tcp_and_unix() {
    for io in backends() {
        let mut server = Server::start(&format!("smtplib-{io}"), io, &[]);
        let tcp: serde_json::Value =
            serde_json::from_str(&python("lmtp_client.py", &["deliver", &server.addr()])).unwrap();
        let unix_target = format!("unix:{}", server.socket.display());
        let unix: serde_json::Value =
            serde_json::from_str(&python("lmtp_client.py", &["deliver", &unix_target])).unwrap();
        let piped: serde_json::Value =
            serde_json::from_str(&python("lmtp_client.py", &["pipelined", &server.addr()]))
                .unwrap();
        let piped_unix: serde_json::Value =
            serde_json::from_str(&python("lmtp_client.py", &["pipelined", &unix_target])).unwrap();
        // Each of the 250s was answered after the spool synced; the spool
        // must hold all of them, intact.
        let v = verify(&server.spool);
        assert_eq!(v["messages"], 6, "{v}");
        assert_eq!(v["recipients"], 2 * (1 + 3) + 2 * 3, "{v}");
        assert_eq!(v["corrupt"], 0, "{v}");
        for d in [&tcp, &unix, &piped, &piped_unix] {
            check_stored(&server, d);
        }
        let log = server.wait_log("client=unix:", std::time::Duration::from_secs(5));
        assert!(
            log.is_some(),
            "one delivery log line per message names the client"
        );
        let status = server.stop();
        assert!(
            status.success(),
            "SIGTERM ends the server with status 0: {status:?}"
        );
        assert!(server.log_lines.iter().any(|l| l.contains("stopped")));
        assert!(
            !server.socket.exists(),
            "a clean stop removes the UNIX socket file"
        );
    }
}
