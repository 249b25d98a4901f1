//! `serve`: turns a checked configuration into a running server and stops it
//! cleanly.
//!
//! Start-up order: signals blocked (so only the main thread takes them), spool
//! opened (lock, recovery), listeners bound, shard threads started and
//! pinned, banner logged. Shutdown (SIGTERM/SIGINT): shards stop accepting,
//! let transactions in flight finish (bounded by `shutdown_grace_secs`), then
//! the spool commits what it holds and its writers stop. Exit status 0.
//!
//! Must not: touch sessions or sockets itself; that is the shards' job.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Config, IoChoice};
use crate::io::core::ShardCore;
use crate::io::epoll::{self, ShardParams};
use crate::io::listen;
use crate::io::waker::Waker;
use crate::policy::Policy;
use crate::proto::SessionConfig;
use crate::spool::Spool;

/// The machine's host name, for the greeting when none is configured.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// Which backend runs, and why (for the banner). `auto` takes io_uring when
/// the start-up probe passes, else epoll with the probe's reason.
fn choose_backend(choice: IoChoice) -> Result<(&'static str, String), String> {
    match choice {
        IoChoice::Epoll => Ok(("epoll", "forced with --io epoll".into())),
        IoChoice::Auto => Ok(match crate::io::uring::probe() {
            Ok(found) => ("uring", format!("io_uring available: {found}")),
            Err(why) => ("epoll", format!("{why}; falling back to epoll")),
        }),
        IoChoice::Uring => match crate::io::uring::probe() {
            Ok(found) => Ok(("uring", format!("forced with --io uring: {found}"))),
            Err(why) => Err(format!(
                "--io uring: {why}; use --io auto (falls back to epoll) or --io epoll"
            )),
        },
    }
}

/// Blocks the signals the server handles in the calling thread and in every
/// thread it starts afterwards; they are then taken with `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` was initialised by block_signals; `sig` is a live local.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// A started server: its shard threads, spool and metrics endpoint.
pub struct Running {
    /// The listen addresses as bound (port 0 resolved), in configuration order.
    pub bound: Vec<listen::ListenAddr>,
    /// `uring` or `epoll`.
    pub backend: &'static str,
    policy: Arc<Policy>,
    shutdown: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    handles: Vec<std::thread::JoinHandle<()>>,
    metrics: Option<crate::metrics::http::MetricsServer>,
    spool: Spool,
}

impl Running {
    /// SIGHUP: reloads the recipient table (the old one stays on error).
    pub fn reload(&self) {
        match self.policy.reload() {
            Ok(Some(l)) => tracing::info!(
                table = %l.path.display(),
                entries = l.entries,
                took_ms = l.took.as_millis() as u64,
                "SIGHUP: recipient table reloaded"
            ),
            Ok(None) => {
                tracing::info!("SIGHUP: no recipient table configured; nothing to reload")
            }
            Err(e) => tracing::error!(
                "SIGHUP: recipient table refused, the previous one stays in force: {e}"
            ),
        }
    }

    /// Graceful stop: shards stop accepting, let transactions in flight
    /// finish (bounded by the grace period), then the spool commits what it
    /// holds and its writers stop. Returns the spool's final counters.
    pub fn stop(self) -> crate::spool::SpoolStats {
        self.shutdown.store(true, Ordering::Release);
        for w in &self.wakers {
            w.wake();
        }
        for h in self.handles {
            let _ = h.join();
        }
        // The shards closed the listeners: remove our UNIX socket files, so
        // an MTA gets "no such file" rather than "connection refused" and
        // nothing stale is left. Only a socket nobody accepts on any more.
        for a in &self.bound {
            if let listen::ListenAddr::Unix(path) = a {
                use std::os::unix::fs::FileTypeExt;
                let is_socket =
                    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
                if is_socket && std::os::unix::net::UnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        if let Some(m) = self.metrics {
            m.stop();
        }
        let stats = self.spool.stats();
        self.spool.shutdown();
        stats
    }
}

/// `serve`: starts the server, then takes signals until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), String> {
    // Before any thread exists, so only this thread takes the signals.
    let sigset = block_signals();
    let running = start(&config)?;
    loop {
        match wait_signal(&sigset) {
            libc::SIGHUP => running.reload(),
            sig => {
                tracing::info!(
                    signal = sig,
                    "shutting down: no new connections, finishing transactions in flight"
                );
                break;
            }
        }
    }
    let stats = running.stop();
    tracing::info!("stopped; spool: {stats:?}");
    Ok(())
}

/// Opens the spool, binds the listeners, starts the shard threads and the
/// metrics endpoint, and logs the banner. A caller that wants signals handled
/// by one thread (as `run` does) blocks them before calling this.
pub fn start(config: &Config) -> Result<Running, String> {
    let checked = config.check().map_err(|e| e.to_string())?;
    let (backend, why) = choose_backend(config.server.io)?;

    let hostname = if config.server.hostname.is_empty() {
        host_name()
    } else {
        config.server.hostname.clone()
    };
    let mut session_cfg = SessionConfig::new(hostname.clone());
    session_cfg.limits = checked.limits.clone();
    session_cfg.bare_line_endings = checked.bare_line_endings;
    session_cfg.detail_delimiters = config.protocol.detail_delimiters.clone();
    let (policy, loaded) = Policy::new(&checked.policy).map_err(|e| e.to_string())?;
    if let Some(l) = &loaded {
        tracing::info!(
            table = %l.path.display(),
            entries = l.entries,
            took_ms = l.took.as_millis() as u64,
            "recipient table loaded"
        );
    }
    let policy = Arc::new(policy);
    session_cfg.policy = policy.clone();
    let session_cfg = Arc::new(session_cfg);

    let cpus_allowed = allowed_cpus();
    let cpus: Vec<usize> = if config.server.cpus.is_empty() {
        let n = if config.server.shards == 0 {
            cpus_allowed.len().max(1)
        } else {
            config.server.shards
        };
        (0..n)
            .map(|i| {
                cpus_allowed
                    .get(i % cpus_allowed.len().max(1))
                    .copied()
                    .unwrap_or(i)
            })
            .collect()
    } else {
        if let Some(c) = config
            .server
            .cpus
            .iter()
            .find(|c| !cpus_allowed.contains(c))
        {
            return Err(format!(
                "server.cpus: CPU {c} is not available to this process (allowed: {cpus_allowed:?}); pick from those"
            ));
        }
        if config.server.shards != 0 && config.server.shards != config.server.cpus.len() {
            return Err(format!(
                "server.shards = {} but server.cpus lists {} CPUs; give one CPU per shard or leave shards at 0",
                config.server.shards,
                config.server.cpus.len()
            ));
        }
        config.server.cpus.clone()
    };
    let shards = cpus.len();

    let spool_started = Instant::now();
    let (spool, report) = Spool::open(config.spool_config()).map_err(|e| e.to_string())?;
    let took_ms = spool_started.elapsed().as_millis() as u64;
    let dir = config.spool.dir.display();
    if report.damage() {
        tracing::error!(
            %dir,
            took_ms,
            "spool open: {report}: records that fail their checks lie below the committed watermark (bytes that had been synced) or in a segment header: damage on the disk, not a torn write, so the cut bytes may hold mail that was acknowledged; fix: check the disk (dmesg, smartctl), keep the files in {dir}/cut/ for the consumers' owners, and see docs/DURABILITY.md (\"Damage\")"
        );
    } else if report.cut.iter().any(|c| c.sealed) {
        tracing::warn!(
            %dir,
            took_ms,
            "spool open: {report}: a cut in a segment its writer had left is a batch whose write or sync failed (never acknowledged; the last run logged `spool write failed`), or damage on the disk if it logged no such failure; the bytes are kept in {dir}/cut/ (docs/DURABILITY.md, \"Damage\")"
        );
    } else if !report.cut.is_empty() {
        tracing::warn!(
            %dir,
            took_ms,
            "spool open: {report}: a torn write from a crash or a failed batch, never acknowledged"
        );
    } else {
        tracing::info!(%dir, took_ms, "spool open: {report}");
    }
    let unix_perms = listen::UnixPerms {
        mode: checked.unix_socket_mode,
        uid: Some(&config.server.unix_socket_owner)
            .filter(|s| !s.is_empty())
            .map(|s| listen::resolve_user(s))
            .transpose()
            .map_err(|e| format!("server.unix_socket_owner: {e}"))?,
        gid: Some(&config.server.unix_socket_group)
            .filter(|s| !s.is_empty())
            .map(|s| listen::resolve_group(s))
            .transpose()
            .map_err(|e| format!("server.unix_socket_group: {e}"))?,
    };
    let mut listeners = listen::open_all(&checked.listen, shards, unix_perms)?;
    // open_all keeps the order of `listen`, which `allow` follows.
    for shard in &mut listeners {
        for (l, allow) in shard.iter_mut().zip(&checked.allow) {
            l.allow = allow.clone();
        }
    }
    // The addresses as bound (a port 0 resolved), for the banner.
    let bound: Vec<listen::ListenAddr> = listeners
        .first()
        .map(|l| l.iter().map(|l| l.addr.clone()).collect())
        .unwrap_or_default();

    let metrics_listener = checked
        .metrics_listen
        .map(crate::metrics::http::MetricsServer::bind)
        .transpose()?;
    let mut shard_metrics = Vec::new();
    let shutdown = Arc::new(AtomicBool::new(false));
    let connections = crate::io::core::ConnectionLimit::new(config.server.connections_max);
    let mut handles = Vec::new();
    let wakers = (0..cpus.len())
        .map(|shard_id| Waker::new().map_err(|e| format!("eventfd for shard {shard_id}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let (balance, inboxes) = crate::io::balance::Balance::new(&wakers);
    for (shard_id, ((cpu, listeners), inbox)) in
        cpus.iter().copied().zip(listeners).zip(inboxes).enumerate()
    {
        let waker = wakers[shard_id].clone();
        let w = waker.clone();
        let producer = spool.producer(Some(Arc::new(move || w.wake())));
        let core = ShardCore::new(
            session_cfg.clone(),
            producer,
            shard_id as u16,
            config.server.shard_inflight_bytes_max as usize,
        )
        .with_connection_limit(connections.clone())
        .with_balance(balance.clone());
        shard_metrics.push(core.metrics());
        let params = ShardParams {
            shard_id,
            listeners,
            waker,
            shutdown: shutdown.clone(),
            shutdown_grace: Duration::from_secs(config.server.shutdown_grace_secs),
            delivery_log: checked.log_format,
            idle_poll: checked.idle_poll,
            inbox,
        };
        let handle = std::thread::Builder::new()
            .name(format!("shard-{shard_id}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                    tracing::warn!(
                        shard = shard_id,
                        cpu,
                        "could not pin to the CPU; running unpinned"
                    );
                }
                // Backend dispatch (io_uring branch).
                let result = if backend == "uring" {
                    crate::io::uring::run_shard(core, params)
                } else {
                    epoll::run_shard(core, params)
                };
                if let Err(e) = result {
                    tracing::error!(shard = shard_id, "shard stopped: {e}");
                }
            })
            .map_err(|e| format!("starting shard thread {shard_id}: {e}"))?;
        handles.push(handle);
    }
    let metrics = match metrics_listener {
        Some(listener) => {
            let registry = crate::metrics::Registry {
                shards: shard_metrics,
                spool: spool.metrics_source(),
                policy: policy.clone(),
            };
            let m = crate::metrics::http::MetricsServer::start(listener, registry)?;
            tracing::info!(addr = %m.addr, "metrics endpoint listening: http://{}/metrics", m.addr);
            Some(m)
        }
        None => None,
    };
    let addrs: Vec<String> = bound.iter().map(ToString::to_string).collect();
    let allow: Vec<String> = bound
        .iter()
        .zip(&checked.allow)
        .filter(|(a, _)| matches!(a, listen::ListenAddr::Tcp(_)))
        .map(|(a, l)| format!("{a} from {l}"))
        .collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        backend,
        why = %why,
        shards,
        cpus = ?cpus,
        writers = config.spool.writers,
        hostname = %hostname,
        listen = ?addrs,
        allow = ?allow,
        recipients = %policy.describe(),
        "lmtp-ingest ready"
    );

    Ok(Running {
        bound,
        backend,
        policy,
        shutdown,
        wakers,
        handles,
        metrics,
        spool,
    })
}

/// Raises the open-files soft limit to the hard limit (each connection is a
/// descriptor); returns (soft, hard) after the change, for the log.
pub fn raise_nofile_limit() -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit read and write a live local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r = want;
            }
        }
        (r.rlim_cur, r.rlim_max)
    }
}
