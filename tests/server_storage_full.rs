//! A spool at its size cap on the real server: the message that finds no
//! room gets `452 4.3.1` per recipient after its data; from then on, until
//! room returns, MAIL itself answers `452 4.3.1`, so a client keeps its mail
//! queued without sending the data first; the server logs once what ran out
//! and the fix. Both backends.

mod server_util;

use std::time::Duration;

use server_util::{Client, Server, backends, body_for};

#[test]
fn at_the_cap_mail_is_refused_before_the_data() {
    for io in backends() {
        // One 1 MiB segment and no room for a spare: 64 KiB messages fill it
        // after about fifteen.
        let mut server = Server::start(
            &format!("storage-full-{io}"),
            io,
            &["--spool-bytes-max", "1048576"],
        );
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("LHLO full.test", "250 ").unwrap();
        let body = body_for(1, 64 * 1024);
        let rcpts = ["a@example.org".to_string()];
        let mut stored = 0;
        let refusal = loop {
            match c.deliver("s@example.net", &rcpts, &body) {
                Ok(_) => stored += 1,
                Err(e) => break e.to_string(),
            }
            assert!(stored < 40, "the cap was never reached");
        };
        // The first refusal comes after the data, per recipient.
        assert!(
            refusal.contains("452 4.3.1 <a@example.org> Insufficient system storage"),
            "{io}: {refusal}"
        );
        assert!(stored >= 10, "{io}: only {stored} stored");
        let line = server
            .wait_log("spool full:", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{io}: no spool-full line: {:#?}", server.log_lines));
        assert!(
            line.contains("WARN")
                && line.contains("spool.spool_bytes_max = 1048576")
                && line.contains("fix: "),
            "{io}: {line}"
        );

        // Now MAIL is refused at once, on this connection and a new one.
        c.cmd(
            "MAIL FROM:<s@example.net>",
            "452 4.3.1 Insufficient system storage",
        )
        .unwrap();
        c.cmd("RSET", "250 ").unwrap();
        let mut fresh = Client::tcp(&server.addr()).unwrap();
        fresh.cmd("LHLO full.test", "250 ").unwrap();
        fresh
            .cmd("MAIL FROM:<s@example.net> SIZE=100", "452 4.3.1")
            .unwrap();
        // The session stays usable: no transaction was opened.
        fresh.cmd("RCPT TO:<a@example.org>", "503 5.5.1").unwrap();
        fresh.cmd("NOOP", "250 ").unwrap();
        // Still full a maintenance pass later (nothing freed any room).
        std::thread::sleep(Duration::from_millis(1200));
        fresh.cmd("MAIL FROM:<s@example.net>", "452 4.3.1").unwrap();
        fresh.cmd("QUIT", "221 ").unwrap();
        c.cmd("QUIT", "221 ").unwrap();

        assert!(server.stop().success(), "{io}: {:#?}", server.log_lines);
        let full_lines = server
            .log_lines
            .iter()
            .filter(|l| l.contains("spool full:"))
            .count();
        assert_eq!(full_lines, 1, "{io}: logged once, not per refusal");

        let v = server_util::verify(&server.spool);
        assert_eq!(v["messages"], stored, "{io}: {v}");
    }
}
