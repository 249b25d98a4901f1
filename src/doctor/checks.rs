//! The machine checks: kernel, io_uring, resource limits, network and file
//! sysctls, CPUs, cgroup memory.
//!
//! Each function looks (reads `/proc`, `/sys`, `getrlimit`, runs the same
//! io_uring probe the server runs at start) and returns [`Check`]s. Thresholds
//! come from what the server does: it asks for a listen backlog of 4096
//! (`src/io/listen.rs`), needs one descriptor per connection plus about 1024
//! for spool files and rings (the same margin `serve` warns about), and
//! holds up to `shard_inflight_bytes_max` of message bodies per shard.
//!
//! Must not: change a limit or a sysctl. The fix says how; the operator
//! decides.

use crate::config::{Config, IoChoice};

use super::Check;

/// Descriptors the server needs beyond one per connection (listeners, spool
/// segments, eventfds, rings, logs). Same margin as `serve`'s start-up warning.
const NOFILE_MARGIN: u64 = 1024;

/// The listen backlog the server asks for (`src/io/listen.rs`); the kernel
/// caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u64 = 4096;

/// Locked memory one shard's io_uring may need, generously: the SQ (1024 x
/// 64 B) and CQ (8192 x 16 B) rings and the provided-buffer ring's entries
/// (512 x 16 B), rounded up. Which of these a kernel charges to
/// RLIMIT_MEMLOCK rather than to the memory cgroup has changed between
/// versions, so doctor asks for room for all of them.
const MEMLOCK_PER_SHARD_BYTES: u64 = 256 << 10;

/// Reads `/proc/sys/<name with dots as slashes>`.
pub fn sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn sysctl_u64(name: &str) -> Option<u64> {
    sysctl(name)?.parse().ok()
}

/// CPUs this process may run on (its affinity mask), in order.
pub fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// The shard count the server would start with this configuration (the same
/// rule as `server::run`).
pub fn effective_shards(config: &Config, allowed: usize) -> usize {
    if !config.server.cpus.is_empty() {
        config.server.cpus.len()
    } else if config.server.shards == 0 {
        allowed.max(1)
    } else {
        config.server.shards
    }
}

/// `(major, minor)` of a release string like `6.18.0-1-amd64`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Every machine check, in the order the report shows them.
pub fn system(config: &Config) -> Vec<Check> {
    let allowed = allowed_cpus();
    let shards = effective_shards(config, allowed.len());
    let mut v = vec![kernel(), io_uring(config)];
    v.push(rlimit_nofile(config.server.connections_max as u64));
    v.push(rlimit_memlock(shards));
    v.extend(network(config.server.connections_max as u64));
    v.push(file_max(config.server.connections_max as u64));
    v.push(cpus(config, &allowed));
    if let Some(c) = cgroup_memory(config, shards) {
        v.push(c);
    }
    v
}

fn kernel() -> Check {
    let release = sysctl("kernel.osrelease").unwrap_or_else(|| "unknown".into());
    match parse_release(&release) {
        Some(v) if v >= (6, 1) => Check::ok(
            "kernel",
            format!("{release} (io_uring with SINGLE_ISSUER + DEFER_TASKRUN needs 6.1)"),
        ),
        Some(v) if v >= (6, 0) => Check::ok(
            "kernel",
            format!("{release} (io_uring runs with COOP_TASKRUN; 6.1 adds DEFER_TASKRUN)"),
        ),
        Some(_) => Check::warn(
            "kernel",
            format!(
                "{release}: older than 6.0, so the io_uring backend (multishot recv) cannot run; epoll is used"
            ),
            "upgrade to Linux 6.1 or later for the io_uring backend (epoll works meanwhile)",
        ),
        None => Check::warn(
            "kernel",
            format!("cannot read the release ({release})"),
            "check that /proc is mounted: mount -t proc proc /proc",
        ),
    }
}

/// `Seccomp:` of /proc/self/status: 0 none, 1 strict, 2 filter.
fn seccomp_mode() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

fn io_uring(config: &Config) -> Check {
    let disabled = sysctl("kernel.io_uring_disabled");
    let seccomp = seccomp_mode();
    let context = format!(
        "kernel.io_uring_disabled={}, seccomp={}",
        disabled.as_deref().unwrap_or("absent"),
        match seccomp {
            Some(0) => "none",
            Some(1) => "strict",
            Some(2) => "filter",
            _ => "unknown",
        }
    );
    match crate::io::uring::probe() {
        Ok(found) if config.server.io == IoChoice::Epoll => Check::warn(
            "io_uring",
            format!("available ({found}) but server.io = \"epoll\" in the configuration"),
            "set io = \"auto\" under [server] to use it (or keep epoll on purpose)",
        ),
        Ok(found) => Check::ok("io_uring", found),
        Err(why) => {
            let fix = if disabled.as_deref().is_some_and(|d| d != "0") {
                "sysctl -w kernel.io_uring_disabled=0 (and persist it in /etc/sysctl.d/), or accept epoll with io = \"epoll\" under [server]".to_string()
            } else if seccomp == Some(2) {
                "a seccomp filter refuses io_uring_setup (Docker's default profile does): run with a profile that allows io_uring_setup, io_uring_enter and io_uring_register (docker run --security-opt seccomp=PROFILE.json), or accept epoll with io = \"epoll\" under [server]".to_string()
            } else {
                "see tuning/README.md (Containers); or accept epoll with io = \"epoll\" under [server]".to_string()
            };
            let value = format!("not usable: {why} ({context}); the server falls back to epoll");
            if config.server.io == IoChoice::Uring {
                Check::fail(
                    "io_uring",
                    format!("{value}, but server.io = \"uring\" makes it refuse to start"),
                    fix,
                )
            } else if config.server.io == IoChoice::Epoll {
                Check::ok(
                    "io_uring",
                    format!("not usable ({why}); server.io = \"epoll\" does not need it"),
                )
            } else {
                Check::warn("io_uring", value, fix)
            }
        }
    }
}

fn getrlimit(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a live local struct.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return None;
    }
    Some((r.rlim_cur, r.rlim_max))
}

fn show_limit(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

fn rlimit_nofile(connections_max: u64) -> Check {
    let need = connections_max + NOFILE_MARGIN;
    let Some((soft, hard)) = getrlimit(libc::RLIMIT_NOFILE) else {
        return Check::warn(
            "rlimit_nofile",
            "getrlimit(RLIMIT_NOFILE) failed",
            "check with `ulimit -n -Hn`",
        );
    };
    let value = format!(
        "soft {} / hard {} for connections_max {connections_max} + {NOFILE_MARGIN} (this shell's limits; under systemd LimitNOFILE= sets them)",
        show_limit(soft),
        show_limit(hard)
    );
    let nr_open = sysctl_u64("fs.nr_open").unwrap_or(1 << 20);
    if hard >= need {
        Check::ok(
            "rlimit_nofile",
            if soft < need {
                format!("{value}; the server raises soft to hard at start")
            } else {
                value
            },
        )
    } else {
        let want = need.next_power_of_two().max(65536);
        let extra = if want > nr_open {
            format!(" and first sysctl -w fs.nr_open={want} (now {nr_open})")
        } else {
            String::new()
        };
        Check::fail(
            "rlimit_nofile",
            format!(
                "{value}: connections past about {} fail with EMFILE",
                hard.saturating_sub(NOFILE_MARGIN)
            ),
            format!(
                "LimitNOFILE={want} in the systemd unit (or `ulimit -Hn {want}` before starting){extra}; or lower connections_max under [server]"
            ),
        )
    }
}

fn rlimit_memlock(shards: usize) -> Check {
    let need = MEMLOCK_PER_SHARD_BYTES * shards as u64;
    let Some((soft, hard)) = getrlimit(libc::RLIMIT_MEMLOCK) else {
        return Check::warn(
            "rlimit_memlock",
            "getrlimit(RLIMIT_MEMLOCK) failed",
            "check with `ulimit -l -Hl`",
        );
    };
    let kib = |v: u64| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} KiB", v >> 10)
        }
    };
    let value = format!(
        "soft {} / hard {}; {shards} shard rings need up to {} KiB (rings are charged to the memory cgroup since 5.12, pinned pages to RLIMIT_MEMLOCK)",
        kib(soft),
        kib(hard),
        need >> 10
    );
    if soft >= need {
        Check::ok("rlimit_memlock", value)
    } else {
        Check::warn(
            "rlimit_memlock",
            value,
            "LimitMEMLOCK=64M in the systemd unit (or `ulimit -l 65536` before starting); otherwise io_uring_setup may fail with ENOMEM and the server falls back to epoll",
        )
    }
}

fn network(connections_max: u64) -> Vec<Check> {
    let mut v = Vec::new();
    match sysctl_u64("net.core.somaxconn") {
        Some(n) if n >= LISTEN_BACKLOG => v.push(Check::ok(
            "net.core.somaxconn",
            format!("{n} (the server asks for a backlog of {LISTEN_BACKLOG})"),
        )),
        Some(n) => v.push(Check::warn(
            "net.core.somaxconn",
            format!("{n}: caps the server's accept backlog of {LISTEN_BACKLOG}; a reconnect storm from the MTAs overflows it and clients wait for SYN retries (1 s, 3 s, ...)"),
            format!("sysctl -w net.core.somaxconn={LISTEN_BACKLOG} (persist: tuning/sysctl.d/60-lmtp-ingest.conf)"),
        )),
        None => v.push(Check::ok("net.core.somaxconn", "not readable here (no network namespace access); skipped")),
    }
    match sysctl_u64("net.ipv4.tcp_max_syn_backlog") {
        Some(n) if n >= LISTEN_BACKLOG => v.push(Check::ok(
            "net.ipv4.tcp_max_syn_backlog",
            n.to_string(),
        )),
        Some(n) => v.push(Check::warn(
            "net.ipv4.tcp_max_syn_backlog",
            format!("{n}: half-open connections beyond this are dropped (or answered with syncookies) during a connect burst"),
            format!("sysctl -w net.ipv4.tcp_max_syn_backlog={} (persist: tuning/sysctl.d/60-lmtp-ingest.conf)", LISTEN_BACKLOG * 2),
        )),
        None => {}
    }
    let rmem = sysctl("net.core.rmem_default").unwrap_or_else(|| "?".into());
    let wmem = sysctl("net.core.wmem_default").unwrap_or_else(|| "?".into());
    let tcp_rmem = sysctl("net.ipv4.tcp_rmem").unwrap_or_else(|| "?".into());
    let tcp_wmem = sysctl("net.ipv4.tcp_wmem").unwrap_or_else(|| "?".into());
    v.push(Check::ok(
        "socket buffers",
        format!(
            "rmem/wmem_default {rmem}/{wmem} (UNIX sockets), tcp_rmem [{tcp_rmem}], tcp_wmem [{tcp_wmem}]; buffers grow on demand, so idle connections cost little"
        ),
    ));
    if let Some(range) = sysctl("net.ipv4.ip_local_port_range") {
        let mut it = range
            .split_whitespace()
            .filter_map(|p| p.parse::<u64>().ok());
        if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
            let ports = hi.saturating_sub(lo) + 1;
            if ports >= connections_max {
                v.push(Check::ok(
                    "ip_local_port_range",
                    format!("{lo}-{hi}: {ports} source ports, enough for one client host (or `lmtp-ingest load`) to open connections_max {connections_max} connections to one address"),
                ));
            } else {
                v.push(Check::warn(
                    "ip_local_port_range",
                    format!("{lo}-{hi}: {ports} source ports, fewer than connections_max {connections_max}; one client host cannot open that many connections to one address (EADDRNOTAVAIL on the client)"),
                    "sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\" on the client hosts (and this one for load tests)",
                ));
            }
        }
    }
    v
}

fn file_max(connections_max: u64) -> Check {
    let need = connections_max + NOFILE_MARGIN;
    match sysctl_u64("fs.file-max") {
        Some(n) if n >= need * 2 => Check::ok("fs.file-max", n.to_string()),
        Some(n) => Check::warn(
            "fs.file-max",
            format!("{n}: the whole system's open files; the server alone needs {need}"),
            format!(
                "sysctl -w fs.file-max={} (persist: tuning/sysctl.d/60-lmtp-ingest.conf)",
                (need * 4).max(1 << 20)
            ),
        ),
        None => Check::ok("fs.file-max", "not readable; skipped"),
    }
}

fn cpus(config: &Config, allowed: &[usize]) -> Check {
    let isolated = std::fs::read_to_string("/sys/devices/system/cpu/isolated")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let quota = cgroup_cpu_quota();
    let mut value = format!("{} available to this process {allowed:?}", allowed.len());
    if !isolated.is_empty() {
        value.push_str(&format!(", isolated (isolcpus): {isolated}"));
    }
    if let Some(q) = quota {
        value.push_str(&format!(", cgroup CPU quota {q:.2} CPUs"));
    }
    let s = &config.server;
    if let Some(c) = s.cpus.iter().find(|c| !allowed.contains(c)) {
        return Check::fail(
            "cpus",
            format!(
                "{value}; server.cpus lists CPU {c}, which this process may not use (the server refuses to start)"
            ),
            format!(
                "cpus = {allowed:?} under [server], or widen the affinity (systemd CPUAffinity=, taskset)"
            ),
        );
    }
    if !s.cpus.is_empty() && s.shards != 0 && s.shards != s.cpus.len() {
        return Check::fail(
            "cpus",
            format!(
                "{value}; shards = {} but cpus lists {} (the server refuses to start)",
                s.shards,
                s.cpus.len()
            ),
            "shards = 0 under [server] (one shard per listed CPU)",
        );
    }
    let shards = effective_shards(config, allowed.len());
    value.push_str(&format!("; {shards} shard(s)"));
    if shards > allowed.len().max(1) {
        return Check::warn(
            "cpus",
            format!(
                "{value}: more shards than CPUs, so shards share CPUs and pay context switches"
            ),
            format!("shards = 0 under [server] (one per CPU: {})", allowed.len()),
        );
    }
    if let Some(q) = quota.filter(|q| shards as f64 > q + 0.5) {
        return Check::warn(
            "cpus",
            format!(
                "{value}: more shards than the cgroup's CPU quota, so the kernel throttles them every period (latency spikes)"
            ),
            format!(
                "shards = {} under [server], or raise the quota (systemd CPUQuota=, docker --cpus)",
                q.ceil().max(1.0) as usize
            ),
        );
    }
    Check::ok("cpus", value)
}

/// The process's cgroup path (v2 `0::/path`, or v1 for `controller`).
fn cgroup_path(controller: &str) -> Option<(bool, String)> {
    let s = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for l in s.lines() {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        if ctrls.split(',').any(|c| c == controller) {
            return Some((false, path.to_string()));
        }
    }
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| (true, p.to_string()))
}

/// Reads a cgroup file for this process: the v2 file, or the v1 one; tries
/// the process's own path first, then the mount's root (inside a container
/// the path names the host's hierarchy).
fn cgroup_read(controller: &str, v2_file: &str, v1_file: &str) -> Option<String> {
    let (v2, path) = cgroup_path(controller)?;
    let base = if v2 {
        "/sys/fs/cgroup".to_string()
    } else {
        format!("/sys/fs/cgroup/{controller}")
    };
    let file = if v2 { v2_file } else { v1_file };
    [format!("{base}{path}/{file}"), format!("{base}/{file}")]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
}

fn cgroup_cpu_quota() -> Option<f64> {
    if let Some(s) = cgroup_read("cpu", "cpu.max", "cpu.cfs_quota_us") {
        let mut it = s.split_whitespace();
        let quota = it.next()?;
        if quota == "max" || quota == "-1" {
            return None;
        }
        let quota: f64 = quota.parse().ok()?;
        let period: f64 = match it.next() {
            Some(p) => p.parse().ok()?,
            None => cgroup_read("cpu", "cpu.max", "cpu.cfs_period_us")?
                .parse()
                .ok()?,
        };
        return (period > 0.0).then_some(quota / period);
    }
    None
}

fn cgroup_memory(config: &Config, shards: usize) -> Option<Check> {
    let raw = cgroup_read("memory", "memory.max", "memory.limit_in_bytes")?;
    // v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages).
    let limit = match raw.parse::<u64>() {
        Ok(n) if n < 1 << 60 => n,
        _ => {
            return Some(Check::ok(
                "cgroup memory",
                "no limit on this process's memory cgroup",
            ));
        }
    };
    // Bodies held per shard, plus io_uring receive buffers (8 MiB a shard)
    // and a margin for the spool's batches and the allocator.
    let need = shards as u64 * (config.server.shard_inflight_bytes_max + (8 << 20)) + (256 << 20);
    let mib = |v: u64| v >> 20;
    let value = format!(
        "limit {} MiB; worst case {} MiB = {shards} shard(s) x (shard_inflight_bytes_max {} MiB + 8 MiB receive buffers) + 256 MiB",
        mib(limit),
        mib(need),
        mib(config.server.shard_inflight_bytes_max)
    );
    Some(if limit >= need {
        Check::ok("cgroup memory", value)
    } else {
        let per_shard = (limit.saturating_sub(256 << 20) / shards.max(1) as u64)
            .saturating_sub(8 << 20)
            .max(config.limits.message_bytes_max as u64);
        Check::warn(
            "cgroup memory",
            format!(
                "{value}: under full load the OOM killer may stop the server (the mail in flight is retried by the MTAs, but it is an outage)"
            ),
            format!(
                "shard_inflight_bytes_max = {per_shard} under [server], or raise the limit (systemd MemoryMax=, docker --memory)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(
            parse_release("5.15.167.4-microsoft-standard-WSL2"),
            Some((5, 15))
        );
        assert_eq!(parse_release("unknown"), None);
    }

    #[test]
    fn shard_count_follows_the_server_rule() {
        let mut c = Config::default();
        assert_eq!(effective_shards(&c, 4), 4);
        c.server.shards = 3;
        assert_eq!(effective_shards(&c, 4), 3);
        c.server.cpus = vec![0, 1];
        assert_eq!(effective_shards(&c, 4), 2);
    }

    #[test]
    fn a_low_open_files_limit_names_the_fix() {
        let c = rlimit_nofile(u64::MAX / 4);
        assert_eq!(c.status, super::super::Status::Fail);
        assert!(c.fix.unwrap().contains("LimitNOFILE="));
    }
}
