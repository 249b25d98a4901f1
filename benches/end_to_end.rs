//! End to end on loopback: the whole server in this process (spool with group
//! commit and fdatasync, one shard per CPU, the event loop the start-up probe
//! picks) loaded by the project's own pipelined client (`lmtp_ingest::load`,
//! 64 connections, 4 KiB messages, 1 and 50 recipients). Criterion measures
//! messages per second; every iteration checks that every message got a 250
//! for every recipient (which the server sends only after fdatasync), no
//! protocol error, and at the end the spool's own count of committed messages
//! must equal what the client sent. A broken server fails the bench.
//!
//! The server is assembled from the library's pieces the way `server::run`
//! does it (spool, listeners, one `ShardCore` and event loop per shard), with
//! no signal handling, so the bench can stop it. The spool lives under
//! target/ (the real disk, never tmpfs).
//!
//! Run: `cargo bench --bench end_to_end` (about a minute).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmtp_ingest::config::Config;
use lmtp_ingest::io::core::ShardCore;
use lmtp_ingest::io::epoll::{self, ShardParams, Waker};
use lmtp_ingest::io::listen;
use lmtp_ingest::load::{self, LoadConfig, Target};
use lmtp_ingest::proto::SessionConfig;
use lmtp_ingest::spool::Spool;

const CONNECTIONS: usize = 64;
const SIZE: usize = 4096;

struct InProcessServer {
    dir: PathBuf,
    port: u16,
    backend: &'static str,
    shutdown: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    shards: Vec<JoinHandle<()>>,
    spool: Option<Spool>,
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
        config.spool.dir = dir.join("spool");
        let checked = config.check().expect("default config is valid");
        let mut session_cfg = SessionConfig::new("bench.test");
        session_cfg.limits = checked.limits.clone();
        session_cfg.bare_line_endings = checked.bare_line_endings;
        let session_cfg = Arc::new(session_cfg);
        let backend = if lmtp_ingest::io::uring::probe().is_ok() {
            "uring"
        } else {
            "epoll"
        };
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (spool, _) = Spool::open(config.spool_config()).expect("open the bench spool");
        let listeners =
            listen::open_all(&checked.listen, shards, checked.unix_socket_mode).expect("listen");
        let port = listen::local_port(&listeners[0][0]).expect("a TCP port");
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut wakers = Vec::new();
        let mut handles = Vec::new();
        for (shard_id, listeners) in listeners.into_iter().enumerate() {
            let waker = Waker::new().expect("eventfd");
            wakers.push(waker.clone());
            let w = waker.clone();
            let producer = spool.producer(Some(Arc::new(move || w.wake())));
            let core = ShardCore::new(
                session_cfg.clone(),
                producer,
                shard_id as u16,
                config.server.shard_inflight_bytes_max as usize,
            );
            let params = ShardParams {
                shard_id,
                listeners,
                waker,
                shutdown: shutdown.clone(),
                shutdown_grace: Duration::from_secs(5),
                connections_max: config.server.connections_max,
            };
            handles.push(std::thread::spawn(move || {
                let r = if backend == "uring" {
                    lmtp_ingest::io::uring::run_shard(core, params)
                } else {
                    epoll::run_shard(core, params)
                };
                r.expect("shard loop");
            }));
        }
        InProcessServer {
            dir,
            port,
            backend,
            shutdown,
            wakers,
            shards: handles,
            spool: Some(spool),
        }
    }

    /// Stops the shards and the spool, removes the spool (gigabytes after a
    /// run); returns messages committed.
    fn stop(mut self) -> u64 {
        self.shutdown.store(true, Ordering::Release);
        for w in &self.wakers {
            w.wake();
        }
        for h in self.shards.drain(..) {
            h.join().expect("shard thread");
        }
        let spool = self.spool.take().expect("running");
        let committed = spool.stats().messages_committed;
        spool.shutdown();
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
