//! Cases that stress what differs between the backends: how `auto` picks
//! one, the per-shard memory bound (reads stop and resume; on io_uring the
//! armed multishot recvs are cancelled and re-armed), more data at once than
//! the provided buffer ring holds, a client leaving mid-DATA, and shutdown
//! answering idle sessions. Every behavioural case runs on each backend.

mod server_util;

use std::io::Read;
use std::time::Duration;

use server_util::{Client, Server, backends, body_for, spool_cmd, verify};

/// A directory with a config file in it, for servers that need one at start.
fn start_with(name: &str, io: &str, toml: &str) -> Server {
    let dir = server_util::test_dir(name);
    let path = dir.join("lmtp.toml");
    std::fs::write(&path, toml).unwrap();
    Server::start_in(&dir, io, &["--config", path.to_str().unwrap()])
}

#[test]
fn auto_takes_io_uring_when_the_probe_passes() {
    let mut server = Server::start("auto-probe", "auto", &[]);
    let banner = server
        .wait_log("lmtp-ingest ready", Duration::from_secs(5))
        .unwrap();
    match lmtp_ingest::io::uring::probe() {
        Ok(_) => assert!(banner.contains("backend=\"uring\""), "{banner}"),
        Err(why) => {
            assert!(banner.contains("backend=\"epoll\""), "{banner}");
            assert!(banner.contains(&why), "the banner says why: {banner}");
        }
    }
    assert!(server.stop().success());
}

#[test]
fn memory_bound_pauses_reading_and_every_message_still_arrives() {
    // One shard whose bound is one message: each body sent pauses reading
    // for every connection until its commit returns.
    const CLIENTS: u64 = 8;
    const EACH: u64 = 10;
    let toml = "[server]\nshards = 1\nshard_inflight_bytes_max = 65536\n\
                [limits]\nmessage_bytes_max = 65536\n";
    for io in backends() {
        let mut server = start_with(&format!("pause-{io}"), io, toml);
        let addr = server.addr();
        let threads: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = Client::tcp(&addr).unwrap();
                    c.cmd("LHLO t", "250").unwrap();
                    for i in 0..EACH {
                        let n = t * 1000 + i;
                        let body = body_for(n, 60_000);
                        c.deliver("s@x.org", &[format!("r{n}@x.org")], &body)
                            .unwrap();
                    }
                    c.cmd("QUIT", "221").unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let v = verify(&server.spool);
        assert_eq!(v["messages"], CLIENTS * EACH, "{v}");
        assert_eq!(v["corrupt"], 0, "{v}");
        assert!(server.stop().success());
    }
}

#[test]
fn more_data_at_once_than_the_buffer_ring_holds() {
    // 16 clients send 2 MB each at the same time into one shard: 32 MB is
    // four times the io_uring buffer ring, so recvs run it dry (ENOBUFS) and
    // must be re-armed; every byte must still arrive in order.
    const CLIENTS: u64 = 16;
    const BYTES: usize = 2 << 20;
    for io in backends() {
        let mut server = start_with(&format!("bulk-{io}"), io, "[server]\nshards = 1\n");
        let addr = server.addr();
        let threads: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = Client::tcp(&addr).unwrap();
                    c.cmd("LHLO t", "250").unwrap();
                    let id = c
                        .deliver("s@x.org", &[format!("r{t}@x.org")], &body_for(t, BYTES))
                        .unwrap();
                    c.cmd("QUIT", "221").unwrap();
                    (t, id)
                })
            })
            .collect();
        let ids: Vec<(u64, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let v = verify(&server.spool);
        assert_eq!(v["messages"], CLIENTS, "{v}");
        assert_eq!(v["corrupt"], 0, "{v}");
        for (t, id) in ids.iter().take(3) {
            let (code, shown) = spool_cmd(&server.spool, &["show", id]);
            assert_eq!(code, 0);
            let body = String::from_utf8(body_for(*t, BYTES)).unwrap();
            assert!(shown.ends_with(&body), "message {t} differs");
        }
        assert!(server.stop().success());
    }
}

#[test]
fn a_client_leaving_mid_data_leaves_nothing_and_others_go_on() {
    for io in backends() {
        let mut server = Server::start(&format!("middata-{io}"), io, &[]);
        {
            let mut c = Client::tcp(&server.addr()).unwrap();
            c.cmd("LHLO t", "250").unwrap();
            c.cmd("MAIL FROM:<s@x.org>", "250").unwrap();
            c.cmd("RCPT TO:<r@x.org>", "250").unwrap();
            c.cmd("DATA", "354").unwrap();
            c.send(b"Subject: cut short\r\n\r\nhalf a body").unwrap();
            // Dropped here: the connection closes mid-DATA.
        }
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("LHLO t", "250").unwrap();
        c.deliver("s@x.org", &["r@x.org".into()], &body_for(1, 1000))
            .unwrap();
        c.cmd("QUIT", "221").unwrap();
        let v = verify(&server.spool);
        assert_eq!(v["messages"], 1, "only the complete message: {v}");
        assert!(server.stop().success());
    }
}

#[test]
fn shutdown_answers_an_idle_session_421_and_exits_0() {
    for io in backends() {
        let mut server = Server::start(&format!("shutdown-{io}"), io, &[]);
        let stream = std::net::TcpStream::connect(server.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut c = Client::greet(stream.try_clone().unwrap()).unwrap();
        c.cmd("LHLO t", "250").unwrap();
        assert!(server.stop().success());
        let last = c.reply().unwrap();
        assert!(last.starts_with("421 4.3.2 "), "{last}");
        // And then the server closed the connection.
        let mut rest = Vec::new();
        let mut s = stream;
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
}
