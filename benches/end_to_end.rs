//! End to end on loopback: the whole server in this process (spool with group
//! commit and fdatasync, one shard per CPU, the event loop the start-up probe
//! picks) loaded by the project's own pipelined client (`lmtp_ingest::load`,
//! 64 connections, 4 KiB messages, 1 and 50 recipients). Criterion measures
//! messages per second; every iteration checks that every message got a 250
//! for every recipient (which the server sends only after fdatasync), no
//! protocol error, and at the end the spool's own count of committed messages
//! must equal what the client sent. A broken server fails the bench.
//!
//! The server is started with `server::start` (what `serve` runs, minus the
//! signal handling), so the bench can stop it. The spool lives under target/
//! (the real disk, never tmpfs).
//!
//! Run: `cargo bench --bench end_to_end` (about a minute).

use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmtp_ingest::config::Config;
use lmtp_ingest::io::listen::ListenAddr;
use lmtp_ingest::load::{self, LoadConfig, Target};
use lmtp_ingest::server::{self, Running};

const CONNECTIONS: usize = 64;
const SIZE: usize = 4096;

struct InProcessServer {
    dir: PathBuf,
    port: u16,
    backend: &'static str,
    running: Running,
}

impl InProcessServer {
    fn start(name: &str) -> InProcessServer {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("e2e-bench")
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = Config::default();
        config.server.listen = vec!["127.0.0.1:0".into()];
        config.server.hostname = "bench.test".into();
        config.server.shutdown_grace_secs = 5;
        config.spool.dir = dir.join("spool");
        let running = server::start(&config).expect("start the server");
        let port = match running.bound.first() {
            Some(ListenAddr::Tcp(a)) => a.port(),
            other => panic!("expected a TCP listener, got {other:?}"),
        };
        InProcessServer {
            dir,
            port,
            backend: running.backend,
            running,
        }
    }

    /// Stops the server, removes the spool (gigabytes after a run); returns
    /// messages committed.
    fn stop(self) -> u64 {
        let committed = self.running.stop().messages_committed;
        let _ = std::fs::remove_dir_all(&self.dir);
        committed
    }
}

fn end_to_end(c: &mut Criterion) {
    for (rcpts, per_iter) in [(1usize, 2000u64), (50, 200)] {
        let server = InProcessServer::start(&format!("rcpt{rcpts}"));
        let mut cfg = LoadConfig::new(Target::Tcp(
            format!("127.0.0.1:{}", server.port).parse().unwrap(),
        ));
        cfg.connections = CONNECTIONS;
        cfg.recipients = rcpts;
        cfg.sizes = vec![(SIZE, 1)];
        let mut sent = 0u64;
        let mut group = c.benchmark_group("end_to_end");
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(2));
        group.measurement_time(Duration::from_secs(10));
        group.throughput(Throughput::Elements(per_iter));
        let name = format!(
            "{CONNECTIONS} pipelined connections, 4 KiB, {rcpts} rcpt ({})",
            server.backend
        );
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                cfg.messages = Some(per_iter * iters);
                let r = load::run(&cfg, &mut |_, _| {}).expect("load runs");
                assert_eq!(r.protocol_errors, 0, "{}", r.text());
                assert_eq!(r.messages_failed, 0, "{}", r.text());
                assert_eq!(r.messages, per_iter * iters, "{}", r.text());
                assert_eq!(r.recipients, per_iter * iters * rcpts as u64);
                sent += r.messages;
                Duration::from_secs_f64(r.seconds)
            })
        });
        group.finish();
        let committed = server.stop();
        assert_eq!(committed, sent, "the spool committed every message sent");
    }
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
