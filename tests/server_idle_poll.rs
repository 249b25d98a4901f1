//! Idle polling (`server.idle_poll_us`) on the real server, on each backend:
//! lock-step clients (one command, one reply) make the shards poll, and the
//! polls find work; a client slower than the window turns polling off; `0`
//! turns it off for good; and a server left idle after busy traffic does not
//! keep a CPU busy polling.

mod server_util;

use std::time::{Duration, Instant};

use server_util::{Client, Server, backends, scrape, test_dir};

const HIT: &str = "lmtp_ingest_shard_idle_polls_total{result=\"hit\"}";
const MISS: &str = "lmtp_ingest_shard_idle_polls_total{result=\"miss\"}";
const SLEEPS: &str = "lmtp_ingest_shard_sleeps_total";

fn start(name: &str, io: &str, poll_us: u64) -> (Server, String) {
    let dir = test_dir(name);
    let c = dir.join("config.toml");
    std::fs::write(
        &c,
        format!("[server]\nidle_poll_us = {poll_us}\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let mut server = Server::start_in(&dir, io, &["--config", &c.display().to_string()]);
    server.owns_dir = true;
    let metrics = server.metrics_addr();
    (server, metrics)
}

/// `clients` threads, each `round_trips` NOOPs in lock-step, with a short
/// pause (a sleep of 20 µs, some 50-100 µs in practice) before each: the
/// shard has always sent its reply and gone idle before the next command
/// comes. (Without it, a shard's own send on loopback can take as long as
/// the client's turnaround, and how often it idles is a matter of timing.)
fn lock_step(addr: &str, clients: usize, round_trips: usize) {
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let addr = addr.to_string();
            std::thread::spawn(move || {
                let mut c = Client::tcp(&addr).unwrap();
                c.cmd("LHLO poll.test", "250").unwrap();
                for _ in 0..round_trips {
                    std::thread::sleep(Duration::from_micros(20));
                    c.cmd("NOOP", "250").unwrap();
                }
                c.cmd("QUIT", "221").unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The server's CPU time so far (user + system, all threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn lock_step_clients_make_the_shards_poll_and_an_idle_server_stops() {
    for io in backends() {
        // The largest window (1 ms), so that a loaded test machine still
        // delivers the next command inside it.
        let (mut server, metrics) = start(&format!("idle-poll-{io}"), io, 1000);
        // Each lone lock-step client leaves its shard idle after every
        // reply: after a warm-up of probes (one idle moment in eight), the
        // shard polls and finds the next command.
        lock_step(&server.addr(), 2, 1000);
        let m = scrape(&metrics);
        // Most idle moments were polled and found the next command (a
        // server that only probed, one idle moment in eight, would be far
        // below a third).
        assert!(
            m[HIT] >= m[SLEEPS] / 3.0 && m[HIT] > 0.0,
            "{io}: polls did not find work: {m:?}"
        );

        // Idle now: polling must die down by itself. Polling without end
        // would cost a whole CPU per shard (3 s each); ticks and probes cost
        // next to nothing.
        std::thread::sleep(Duration::from_millis(200));
        let pid = server.child.id();
        let (t0, c0) = (Instant::now(), cpu_ticks(pid));
        std::thread::sleep(Duration::from_secs(3));
        let ticks = cpu_ticks(pid) - c0;
        let hz = 100.0; // USER_HZ on Linux
        let cpu = ticks as f64 / hz;
        assert!(
            cpu < 0.3,
            "{io}: idle server used {cpu:.2} s of CPU in {:?}",
            t0.elapsed()
        );
        let idle = scrape(&metrics);
        let polls = idle[HIT] + idle[MISS] - m[HIT] - m[MISS];
        assert!(polls < 50.0, "{io}: {polls} polls while idle");
        server.stop();
    }
}

#[test]
fn a_slow_client_turns_polling_off() {
    for io in backends() {
        let (mut server, metrics) = start(&format!("idle-poll-slow-{io}"), io, 30);
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("LHLO poll.test", "250").unwrap();
        // Each gap (3 ms) is far longer than the window (30 µs): polls
        // miss, so the shard stops polling and only probes.
        for _ in 0..200 {
            c.cmd("NOOP", "250").unwrap();
            std::thread::sleep(Duration::from_millis(3));
        }
        let m = scrape(&metrics);
        assert!(
            m[MISS] < m[SLEEPS] / 3.0,
            "{io}: kept polling a slow client: {m:?}"
        );
        server.stop();
    }
}

#[test]
fn zero_turns_polling_off() {
    for io in backends() {
        let (mut server, metrics) = start(&format!("idle-poll-off-{io}"), io, 0);
        lock_step(&server.addr(), 1, 300);
        let m = scrape(&metrics);
        assert_eq!((m[HIT], m[MISS]), (0.0, 0.0), "{io}");
        // The shard slept before (nearly) every command of the lone client
        // instead.
        assert!(m[SLEEPS] >= 150.0, "{io}: {m:?}");
        server.stop();
    }
}
