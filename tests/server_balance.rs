//! Connections are spread evenly over the shards, whichever shard the
//! kernel's SO_REUSEPORT hash (or the shared UNIX listener) gives them to:
//! a shard holding more than another hands a new socket over before the
//! greeting. Checked on each backend with the per-shard gauge, over TCP and
//! the UNIX socket, with mail delivered on every connection afterwards.

mod server_util;

use std::time::Duration;

use server_util::{Client, Server, backends, body_for, scrape, test_dir};

const SHARDS: usize = 2;

fn per_shard(metrics: &str) -> Vec<f64> {
    let m = scrape(metrics);
    (0..SHARDS)
        .map(|i| m[&format!("lmtp_ingest_shard_connections_open{{shard=\"{i}\"}}")])
        .collect()
}

/// Waits until the gauges add up to `total` (a handed-over socket is
/// opened when its new shard next wakes); returns them.
fn settle(metrics: &str, total: f64) -> Vec<f64> {
    for _ in 0..200 {
        let v = per_shard(metrics);
        if v.iter().sum::<f64>() == total {
            return v;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    per_shard(metrics)
}

#[test]
fn connections_are_spread_evenly_over_shards() {
    for io in backends() {
        let dir = test_dir(&format!("balance-{io}"));
        let c = dir.join("config.toml");
        std::fs::write(&c, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let shards = SHARDS.to_string();
        let mut server = Server::start_in(
            &dir,
            io,
            &["--config", &c.display().to_string(), "--shards", &shards],
        );
        server.owns_dir = true;
        let metrics = server.metrics_addr();
        // Three rounds of 64 TCP connections, each on fresh ports: with the
        // hash alone, a split within one of even happens in about a third
        // of rounds, so three in a row would pass by chance 1 time in 40.
        for round in 0..3 {
            let clients: Vec<_> = (0..64)
                .map(|_| Client::tcp(&server.addr()).unwrap())
                .collect();
            let v = settle(&metrics, 64.0);
            assert!(
                (v[0] - v[1]).abs() <= 1.0 && v.iter().sum::<f64>() == 64.0,
                "{io}, round {round}: {v:?}"
            );
            // Every connection works, wherever it ended up.
            for (n, mut c) in clients.into_iter().enumerate() {
                c.cmd("LHLO balance.test", "250").unwrap();
                let rcpts = vec![format!("u{n}@example.org")];
                c.deliver("s@example.net", &rcpts, &body_for(n as u64, 300))
                    .unwrap();
                c.cmd("QUIT", "221").unwrap();
            }
            settle(&metrics, 0.0);
        }
        // The UNIX listener is one socket shared by every shard.
        let clients: Vec<_> = (0..32)
            .map(|_| {
                let s = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                Client::greet(s).unwrap()
            })
            .collect();
        let v = settle(&metrics, 32.0);
        assert!((v[0] - v[1]).abs() <= 1.0, "{io}, UNIX: {v:?}");
        for mut c in clients {
            c.cmd("LHLO balance.test", "250").unwrap();
            c.cmd("QUIT", "221").unwrap();
        }
        assert!(server.stop().success());
        let stored = server_util::verify(&server.spool);
        assert_eq!(stored["messages"], 192, "{stored}");
    }
}
