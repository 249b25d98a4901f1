//! The server's configuration: a TOML file, command-line overrides, defaults
//! that work on a laptop (`127.0.0.1:2424`, spool in `./spool`), and
//! validation that names the key, the problem and the fix.
//!
//! Must not: open sockets or files other than the configuration file itself.
//! Turning a valid `Config` into running parts is `server`'s job.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::access::AllowList;
use crate::io::LogFormat;
use crate::io::listen::ListenAddr;
use crate::policy::PolicySpec;
use crate::proto::{BareLineEndings, Limits};
use crate::spool::{FillPolicy, SpoolConfig};

/// `[policy]`: which recipients are accepted at RCPT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySection {
    /// `accept_all` (default), `domains` or `table`.
    pub recipients: String,
    /// With `recipients = "domains"`: the domains accepted (any case).
    pub domains: Vec<String>,
    /// With `recipients = "table"`: a file of addresses, one per line.
    pub table: PathBuf,
    /// Entries a table may hold (bounds memory: ~40 bytes per entry).
    pub table_entries_max: usize,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            recipients: "accept_all".into(),
            domains: Vec::new(),
            table: PathBuf::new(),
            // 20 million: about 1 GiB for a table of 25-byte addresses.
            table_entries_max: 20_000_000,
        }
    }
}

/// `[access]`: who may connect to the TCP listeners.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessSection {
    /// CIDR networks allowed on every TCP listener without its own list.
    /// Default [`ALLOW_DEFAULT`], loopback only. A listener on another
    /// address needs its own list, or this one changed from the default
    /// (`check` refuses it otherwise: LMTP has no authentication).
    pub allow: Vec<String>,
    /// Per listener, keyed by the address as written in `server.listen`.
    pub listen: BTreeMap<String, ListenerAccess>,
}

/// `access.allow` by default: loopback only, the same networks as
/// [`AllowList::loopback`]. Written out (not an absent key) so that
/// `serve --print-config` shows the list in force.
pub const ALLOW_DEFAULT: [&str; 2] = ["127.0.0.0/8", "::1"];

impl Default for AccessSection {
    fn default() -> Self {
        AccessSection {
            allow: ALLOW_DEFAULT.iter().map(|s| s.to_string()).collect(),
            listen: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerAccess {
    /// CIDR networks allowed on this listener.
    pub allow: Vec<String>,
}

/// Which event loop the shards run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// io_uring where the kernel allows it, else epoll.
    #[default]
    Auto,
    Uring,
    Epoll,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub limits: LimitsSection,
    pub protocol: ProtocolSection,
    pub spool: SpoolSection,
    pub policy: PolicySection,
    pub access: AccessSection,
    pub log: LogSection,
    pub metrics: MetricsSection,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// `IP:PORT` serving `GET /metrics`, e.g. "127.0.0.1:9425"; empty
    /// (the default): no endpoint.
    pub listen: String,
}

/// `[log]`: what the server logs to stderr, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// Filter when `RUST_LOG` is unset (which wins when set), in its syntax:
    /// `info`, `warn,delivery=info`, `off`.
    pub level: String,
    /// `text` (default; Postfix-style delivery lines) or `json` (one JSON
    /// object per line, fields separate).
    pub format: String,
}

/// The levels `log.level` takes, alone or after `TARGET=`, quietest first.
pub const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// One of [`LOG_LEVELS`], in any case.
pub fn is_log_level(l: &str) -> bool {
    LOG_LEVELS.iter().any(|k| k.eq_ignore_ascii_case(l))
}

/// A log target this server has: `delivery`, `lmtp_ingest` or one of its
/// module paths (`lmtp_ingest::spool`).
pub fn is_log_target(t: &str) -> bool {
    t == "delivery"
        || t.strip_prefix("lmtp_ingest").is_some_and(|rest| {
            rest.is_empty()
                || rest.strip_prefix("::").is_some_and(|path| {
                    path.split("::").all(|m| {
                        !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    })
                })
        })
}

/// Turns `log.level` into the filter the server logs with; the one place
/// that does, so what `check` accepts is exactly what takes effect.
///
/// Accepted: directives separated by commas, each a level (`info`) or
/// `TARGET=LEVEL` (`delivery=info`), where a target is `delivery` (the
/// delivery log) or `lmtp_ingest` and its module paths
/// (`lmtp_ingest::spool`). `tracing`'s filter syntax accepts more, and
/// silently: a word that is not a level (`inof`) is read as a target
/// nobody logs to, which turns every line off.
pub fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, ConfigError> {
    let fix = || {
        format!(
            "write one of {} (default \"info\"), or directives like \"warn,delivery=info\" (TARGET=LEVEL; targets: delivery, lmtp_ingest, lmtp_ingest::MODULE)",
            LOG_LEVELS.map(|l| format!("\"{l}\"")).join(", ")
        )
    };
    // Rebuilt from the checked parts (trimmed, levels in lower case), so the
    // filter reads exactly what was checked.
    let mut normalized = Vec::new();
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, l) = match d.split_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, d),
        };
        let problem = match target {
            Some(t) if !is_log_target(t) => {
                format!("'{t}' is not a log target, so '{d}' would match no line")
            }
            None if !is_log_level(l) => format!(
                "'{l}' is not a log level (the filter would take it for a target that no line has: alone, it turns every line off)"
            ),
            _ if !is_log_level(l) => format!("'{l}' is not a log level"),
            _ => {
                let l = l.to_ascii_lowercase();
                normalized.push(target.map_or(l.clone(), |t| format!("{t}={l}")));
                continue;
            }
        };
        return Err(bad(
            "log.level",
            if d == level.trim() {
                problem
            } else {
                format!("{problem} (in \"{level}\")")
            },
            fix(),
        ));
    }
    if normalized.is_empty() {
        return Err(bad("log.level", "no level given", fix()));
    }
    let normalized = normalized.join(",");
    tracing_subscriber::EnvFilter::try_new(&normalized)
        .map_err(|e| bad("log.level", format!("'{normalized}': {e}"), fix()))
}

/// A list of strings, or one string standing for a list of one: `listen =
/// "127.0.0.1:24"` is what people write for a single address.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "an address string or a list of address strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// `IP:PORT` or `unix:/path`; several allowed (a list), or one (a string).
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<String>,
    /// Name in the greeting and replies; empty: the machine's host name.
    pub hostname: String,
    /// Shard threads; 0: one per CPU this process may run on.
    pub shards: usize,
    /// CPUs to pin shard threads to, in order (empty: the first `shards`
    /// CPUs this process may run on).
    pub cpus: Vec<usize>,
    pub io: IoChoice,
    /// Open connections per server; more are answered `421` and closed.
    pub connections_max: usize,
    /// Bytes of message bodies a shard may hold before it stops reading from
    /// sockets until commits return (TCP then pushes back on clients).
    pub shard_inflight_bytes_max: u64,
    /// Permissions of UNIX sockets, in octal.
    pub unix_socket_mode: String,
    /// Owner of UNIX sockets: a user name or numeric id; empty: the server's
    /// user.
    pub unix_socket_owner: String,
    /// Group of UNIX sockets: a group name or numeric id; empty: the
    /// server's group.
    pub unix_socket_group: String,
    /// After SIGTERM: how long transactions in flight may take to finish.
    pub shutdown_grace_secs: u64,
    /// How long a shard that ran out of work polls for more before it
    /// sleeps, in microseconds, while recent idle gaps were mostly that
    /// short (adaptive; see `io::idle_poll`). 0: always sleep at once.
    pub idle_poll_us: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    pub line_bytes_max: usize,
    pub recipients_max: usize,
    pub message_bytes_max: usize,
    pub bad_commands_max: u32,
    pub idle_timeout_secs: u64,
    pub data_timeout_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolSection {
    /// `normalize`, `accept` or `reject`.
    pub bare_line_endings: String,
    /// Characters that split `user+tag`; empty: no split.
    pub detail_delimiters: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolSection {
    pub dir: PathBuf,
    pub writers: usize,
    pub segment_bytes: u64,
    pub batch_bytes_max: usize,
    pub batch_messages_max: usize,
    pub batch_delay_us_max: u64,
    /// With `batch_delay_us_max = 0`: on slow disks, wait up to a quarter
    /// of a commit for the clients the last commit answered.
    pub batch_regroup: bool,
    /// Cap on the spool's size in bytes; 0: only the disk limits it.
    pub spool_bytes_max: u64,
    /// While no consumer is registered: remove a segment once its last
    /// write is older than this many seconds (never a stream's last
    /// segment). 0 (default): keep every segment until consumers pass it.
    /// Ignored while any consumer is registered (`spool::retention`).
    pub retention_age_max_s: u64,
    /// Write records past the page cache (`O_DIRECT`), falling back to
    /// buffered writes where the file system refuses it.
    pub direct_io: bool,
    /// How new segments are made ready: "auto" (zero-filled, or only
    /// allocated while batches average `allocate_from_batch_bytes` or
    /// more), "zeros" or "allocate".
    pub segment_fill: String,
    /// The mean batch, in bytes, from which "auto" allocates (default 512
    /// KiB; `lmtp-ingest doctor` measures it for the spool's disk).
    pub allocate_from_batch_bytes: u64,
    /// Accept a spool on tmpfs (not durable; for tests only).
    pub allow_tmpfs: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: vec!["127.0.0.1:2424".into()],
            hostname: String::new(),
            shards: 0,
            cpus: Vec::new(),
            io: IoChoice::Auto,
            connections_max: 10_000,
            // 256 MiB: many 4-64 KiB messages per batch, bounded on a small box.
            shard_inflight_bytes_max: 256 << 20,
            unix_socket_mode: "0660".into(),
            unix_socket_owner: String::new(),
            unix_socket_group: String::new(),
            shutdown_grace_secs: 30,
            idle_poll_us: 30,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        let l = Limits::default();
        LimitsSection {
            line_bytes_max: l.line_bytes_max,
            recipients_max: l.recipients_max,
            message_bytes_max: l.message_bytes_max,
            bad_commands_max: l.bad_commands_max,
            idle_timeout_secs: l.idle_timeout.as_secs(),
            data_timeout_secs: l.data_timeout.as_secs(),
        }
    }
}

impl Default for ProtocolSection {
    fn default() -> Self {
        ProtocolSection {
            bare_line_endings: "normalize".into(),
            detail_delimiters: "+".into(),
        }
    }
}

impl Default for SpoolSection {
    fn default() -> Self {
        let s = SpoolConfig::new("spool");
        SpoolSection {
            dir: PathBuf::from("spool"),
            writers: s.writers,
            segment_bytes: s.segment_bytes,
            batch_bytes_max: s.batch_bytes_max,
            batch_messages_max: s.batch_messages_max,
            batch_delay_us_max: s.batch_delay_us_max,
            batch_regroup: s.batch_regroup,
            spool_bytes_max: 0,
            retention_age_max_s: s.retention_age_max.map_or(0, |a| a.as_secs()),
            direct_io: s.direct_io,
            segment_fill: s.segment_fill.as_str().into(),
            allocate_from_batch_bytes: s.allocate_from_batch_bytes,
            allow_tmpfs: false,
        }
    }
}

/// Shortest `spool.retention_age_max_s`: a minute. Less would remove mail
/// seconds after its segment fills up, before a reader started by hand or
/// by a timer has seen it.
pub const RETENTION_AGE_MIN_S: u64 = 60;
/// Longest `spool.retention_age_max_s`: 10 years. More is a typo, not a
/// retention policy.
pub const RETENTION_AGE_MAX_S: u64 = 10 * 365 * 24 * 3600;

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}; {fix}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

fn bad(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Everything validated and converted, ready for the server.
#[derive(Debug)]
pub struct Checked {
    pub listen: Vec<ListenAddr>,
    pub limits: Limits,
    pub bare_line_endings: BareLineEndings,
    pub unix_socket_mode: u32,
    /// One allow-list per entry of `listen`, in the same order.
    pub allow: Vec<Arc<AllowList>>,
    pub policy: PolicySpec,
    pub log_format: LogFormat,
    /// `server.idle_poll_us`.
    pub idle_poll: Duration,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Settings that work but carry a risk, each `key: problem; fix`: the
    /// server logs them as WARN at start, `--print-config` prints them.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads a TOML file; unknown keys are errors (a typo must not be silently
    /// ignored).
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad(
                &path.display().to_string(),
                format!("cannot read the configuration file: {e}"),
                "check the path given to --config",
            )
        })?;
        Config::from_toml(&text).map_err(|mut e| {
            e.key = format!("{}: {}", path.display(), e.key);
            e
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            // The message with its place as "line L, column C", not the
            // multi-line caret drawing of `Display`, which a log squashes.
            let place = e.span().map(|sp| {
                let mut at = sp.start.min(text.len());
                // A span is expected on a character boundary; a reload must
                // not panic if one is not.
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let line = text[..at].matches('\n').count() + 1;
                let column = text[start..at].chars().count() + 1;
                // The line itself names the key that a type error does not.
                let src = text[start..].lines().next().unwrap_or("").trim();
                let src: String = src.chars().take(80).collect();
                format!("line {line}, column {column} (`{src}`): ")
            });
            bad(
                "configuration",
                format!(
                    "{}{}",
                    place.unwrap_or_default(),
                    e.message().trim_end().replace('\n', " ")
                ),
                "see `lmtp-ingest serve --print-config` for every key and its default",
            )
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes")
    }

    /// Checks every value and converts what needs converting.
    pub fn check(&self) -> Result<Checked, ConfigError> {
        if self.server.listen.is_empty() {
            return Err(bad(
                "server.listen",
                "no address to listen on",
                "give at least one, e.g. \"127.0.0.1:2424\" or \"unix:/run/lmtp-ingest/lmtp.sock\"",
            ));
        }
        let listen = self
            .server
            .listen
            .iter()
            .map(|a| {
                a.parse::<ListenAddr>()
                    .map_err(|e| bad("server.listen", e, "fix the address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let idle_poll_max = crate::io::idle_poll::WINDOW_MAX.as_micros() as u64;
        if self.server.idle_poll_us > idle_poll_max {
            return Err(bad(
                "server.idle_poll_us",
                format!(
                    "{} µs of polling costs more CPU than the sleep and wake-up it saves",
                    self.server.idle_poll_us
                ),
                format!(
                    "use 0 to {idle_poll_max} (default 30; 0 where CPU time is billed or shared, see tuning/README.md)"
                ),
            ));
        }
        if self.server.connections_max == 0 {
            return Err(bad(
                "server.connections_max",
                "0 accepts nobody",
                "set it to 1 or more (default 10000)",
            ));
        }
        if self.server.shard_inflight_bytes_max < self.limits.message_bytes_max as u64 {
            return Err(bad(
                "server.shard_inflight_bytes_max",
                format!(
                    "{} is below limits.message_bytes_max ({}), so one large message could stall a shard",
                    self.server.shard_inflight_bytes_max, self.limits.message_bytes_max
                ),
                "raise it to at least limits.message_bytes_max (default 268435456)",
            ));
        }
        let unix_socket_mode =
            u32::from_str_radix(self.server.unix_socket_mode.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    bad(
                        "server.unix_socket_mode",
                        format!(
                            "'{}' is not an octal permission mode of 0 to 0777 (setuid, setgid and sticky bits mean nothing on a socket)",
                            self.server.unix_socket_mode
                        ),
                        "write it like \"0660\" (the MTA's user in the socket's group)",
                    )
                })?;
        let l = &self.limits;
        let limits = Limits {
            line_bytes_max: l.line_bytes_max,
            recipients_max: l.recipients_max,
            message_bytes_max: l.message_bytes_max,
            bad_commands_max: l.bad_commands_max,
            idle_timeout: Duration::from_secs(l.idle_timeout_secs),
            data_timeout: Duration::from_secs(l.data_timeout_secs),
        };
        limits
            .validate()
            .map_err(|e| bad(&format!("limits.{}", e.key), e.problem, e.fix))?;
        let bare_line_endings = match self.protocol.bare_line_endings.as_str() {
            "normalize" => BareLineEndings::Normalize,
            "accept" => BareLineEndings::Accept,
            "reject" => BareLineEndings::Reject,
            other => {
                return Err(bad(
                    "protocol.bare_line_endings",
                    format!("'{other}' is not a policy"),
                    "use \"normalize\" (default), \"accept\" or \"reject\"",
                ));
            }
        };
        if let Some(c) = self
            .protocol
            .detail_delimiters
            .chars()
            .find(|c| !c.is_ascii_punctuation() || matches!(c, '@' | '"' | '<' | '>'))
        {
            return Err(bad(
                "protocol.detail_delimiters",
                format!("'{c}' cannot separate a local part's detail"),
                "use punctuation such as \"+\" or \"+-\"",
            ));
        }
        let s = &self.spool;
        if s.writers == 0 || s.writers > 64 {
            return Err(bad(
                "spool.writers",
                format!("{} is out of range", s.writers),
                "use 1 to 64 (default 1)",
            ));
        }
        if s.segment_bytes < 64 * 1024 {
            return Err(bad(
                "spool.segment_bytes",
                format!(
                    "{} bytes would make a new file every few messages",
                    s.segment_bytes
                ),
                "use at least 65536 (default 67108864, 64 MiB)",
            ));
        }
        if s.batch_bytes_max == 0 || s.batch_messages_max == 0 {
            return Err(bad(
                "spool.batch_bytes_max/batch_messages_max",
                "0 would never commit anything",
                "use the defaults (4194304 and 1024) or other positive values",
            ));
        }
        if FillPolicy::parse(&s.segment_fill).is_none() {
            return Err(bad(
                "spool.segment_fill",
                format!("\"{}\" is not a way to make segments", s.segment_fill),
                "use \"auto\" (default), \"zeros\" or \"allocate\"",
            ));
        }
        if s.allocate_from_batch_bytes < 4096 {
            return Err(bad(
                "spool.allocate_from_batch_bytes",
                format!(
                    "{} bytes is less than one block: every batch would count as large",
                    s.allocate_from_batch_bytes
                ),
                "use the value `lmtp-ingest doctor` advises (default 524288, 512 KiB), or segment_fill = \"allocate\" to allocate whatever the batches",
            ));
        }
        if s.batch_delay_us_max > 100_000 {
            return Err(bad(
                "spool.batch_delay_us_max",
                format!("{} us holds every reply that long", s.batch_delay_us_max),
                "keep it at most 100000 (100 ms); 0 (default) is adaptive group commit with no added delay",
            ));
        }
        if s.retention_age_max_s != 0
            && !(RETENTION_AGE_MIN_S..=RETENTION_AGE_MAX_S).contains(&s.retention_age_max_s)
        {
            return Err(bad(
                "spool.retention_age_max_s",
                format!(
                    "{} seconds is out of range (a segment is removed that long after its last write, while no consumer is registered)",
                    s.retention_age_max_s
                ),
                format!(
                    "use 0 (default: no age limit) or {RETENTION_AGE_MIN_S} to {RETENTION_AGE_MAX_S} (10 years), e.g. 604800 for a week; the value is in seconds"
                ),
            ));
        }
        let allow = self.check_access(&listen)?;
        let policy = self.check_policy()?;
        let log_format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(bad(
                    "log.format",
                    format!("'{other}' is not a format"),
                    "use \"text\" (default) or \"json\"",
                ));
            }
        };
        log_filter(&self.log.level)?;
        let metrics_listen = match self.metrics.listen.as_str() {
            "" => None,
            a => Some(a.parse::<std::net::SocketAddr>().map_err(|_| {
                bad(
                    "metrics.listen",
                    format!("'{a}' is not IP:PORT"),
                    "write e.g. \"127.0.0.1:9425\" (loopback: scrape locally or through a proxy), or \"\" for no endpoint",
                )
            })?),
        };
        let mut warnings = Vec::new();
        let unix_listener = listen.iter().any(|l| l.to_string().starts_with("unix:"));
        if unix_listener && unix_socket_mode & 0o002 != 0 {
            warnings.push(
                bad(
                    "server.unix_socket_mode",
                    format!(
                        "{:04o} lets every user of this machine connect to the UNIX socket, and so deliver mail that gets a durable 250 (LMTP has no authentication)",
                        unix_socket_mode
                    ),
                    "0660 (the default) with the MTA's user in the socket's group (server.unix_socket_group)",
                )
                .to_string(),
            );
        }
        // Not refused, unlike an LMTP listener without an allow-list: the
        // endpoint only reads counters (nobody can deliver through it), and
        // refusing would stop servers that run this way today. See
        // docs/OPERATIONS.md, "The metrics endpoint".
        if let Some(a) = metrics_listen.filter(|a| !a.ip().to_canonical().is_loopback()) {
            warnings.push(
                bad(
                    "metrics.listen",
                    format!(
                        "{a} is reachable from other machines and the endpoint has no authentication: anyone who can connect reads the server's counters, and can hold its one connection at a time for 5 s to delay the real scrapes"
                    ),
                    "bind it to loopback (\"127.0.0.1:9425\") and scrape locally or through a proxy, or to a private management address, and firewall the port so that only your Prometheus server reaches it",
                )
                .to_string(),
            );
        }
        Ok(Checked {
            listen,
            limits,
            bare_line_endings,
            unix_socket_mode,
            allow,
            policy,
            log_format,
            idle_poll: Duration::from_micros(self.server.idle_poll_us),
            metrics_listen,
            warnings,
        })
    }

    /// One allow-list per listen address; refuses a listener reachable from
    /// other machines that no allow-list was written for.
    fn check_access(&self, listen: &[ListenAddr]) -> Result<Vec<Arc<AllowList>>, ConfigError> {
        for key in self.access.listen.keys() {
            if !self.server.listen.contains(key) {
                return Err(bad(
                    &format!("access.listen.\"{key}\""),
                    "names no address of server.listen",
                    format!(
                        "write the address exactly as in server.listen ({:?})",
                        self.server.listen
                    ),
                ));
            }
        }
        let global = Arc::new(
            AllowList::parse(&self.access.allow)
                .map_err(|e| bad("access.allow", e, "fix the entry"))?,
        );
        // The default list is not a decision about a public listener: only
        // a list the operator changed (or a listener's own) lets one start.
        let global_written = *global != AllowList::loopback();
        let mut out = Vec::with_capacity(listen.len());
        for (text, addr) in self.server.listen.iter().zip(listen) {
            let own = match self.access.listen.get(text) {
                Some(a) => Some(Arc::new(AllowList::parse(&a.allow).map_err(|e| {
                    bad(
                        &format!("access.listen.\"{text}\".allow"),
                        e,
                        "fix the entry",
                    )
                })?)),
                None => None,
            };
            if let ListenAddr::Tcp(sa) = addr {
                if !sa.ip().is_loopback() && own.is_none() && !global_written {
                    return Err(bad(
                        "server.listen",
                        format!(
                            "{text} is reachable from other machines and no allow-list says who may connect (access.allow is the loopback default; LMTP has no authentication)"
                        ),
                        "set access.allow to your MTAs' networks, e.g. [\"192.0.2.0/24\"], or write allow = [\"0.0.0.0/0\", \"::/0\"] to accept anyone",
                    ));
                }
            }
            out.push(own.unwrap_or_else(|| global.clone()));
        }
        Ok(out)
    }

    fn check_policy(&self) -> Result<PolicySpec, ConfigError> {
        let p = &self.policy;
        let unused = |key: &str, mode: &str| {
            bad(
                &format!("policy.{key}"),
                format!("is only used with recipients = \"{mode}\""),
                format!("remove it, or set policy.recipients = \"{mode}\""),
            )
        };
        #[derive(PartialEq)]
        enum Mode {
            AcceptAll,
            Domains,
            Table,
        }
        // The mode first: with a typo in it, the keys of the mode meant
        // would otherwise be blamed for not matching it.
        let mode = match p.recipients.as_str() {
            "accept_all" => Mode::AcceptAll,
            "domains" => Mode::Domains,
            "table" => Mode::Table,
            other => {
                return Err(bad(
                    "policy.recipients",
                    format!("'{other}' is not a mode"),
                    "use \"accept_all\" (default), \"domains\" or \"table\"",
                ));
            }
        };
        if mode != Mode::Domains && !p.domains.is_empty() {
            return Err(unused("domains", "domains"));
        }
        if mode != Mode::Table && !p.table.as_os_str().is_empty() {
            return Err(unused("table", "table"));
        }
        match mode {
            Mode::AcceptAll => Ok(PolicySpec::AcceptAll),
            Mode::Domains => {
                if p.domains.is_empty() {
                    return Err(bad(
                        "policy.domains",
                        "no domain listed, so every recipient would be refused",
                        "list the domains to accept, e.g. [\"example.org\"]",
                    ));
                }
                if let Some(d) = p
                    .domains
                    .iter()
                    .find(|d| d.is_empty() || d.len() > 255 || d.contains(['@', ' ', '<', '>']))
                {
                    return Err(bad(
                        "policy.domains",
                        format!("'{d}' is not a domain name"),
                        "write bare domain names such as \"example.org\"",
                    ));
                }
                Ok(PolicySpec::Domains(
                    p.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                ))
            }
            Mode::Table => {
                if p.table.as_os_str().is_empty() {
                    return Err(bad(
                        "policy.table",
                        "no table file given",
                        "set policy.table to a file of addresses, one per line",
                    ));
                }
                if p.table_entries_max == 0 {
                    return Err(bad(
                        "policy.table_entries_max",
                        "0 would refuse every table",
                        "use a positive bound (default 20000000)",
                    ));
                }
                Ok(PolicySpec::Table {
                    path: p.table.clone(),
                    entries_max: p.table_entries_max,
                })
            }
        }
    }

    /// The spool settings for `Spool::open`.
    pub fn spool_config(&self) -> SpoolConfig {
        let s = &self.spool;
        let mut c = SpoolConfig::new(&s.dir);
        c.writers = s.writers;
        c.segment_bytes = s.segment_bytes;
        c.batch_bytes_max = s.batch_bytes_max;
        c.batch_messages_max = s.batch_messages_max;
        c.batch_delay_us_max = s.batch_delay_us_max;
        c.batch_regroup = s.batch_regroup;
        c.spool_bytes_max = (s.spool_bytes_max > 0).then_some(s.spool_bytes_max);
        c.retention_age_max =
            (s.retention_age_max_s > 0).then(|| Duration::from_secs(s.retention_age_max_s));
        c.direct_io = s.direct_io;
        // Checked by `check`; an unchecked bad value keeps the default.
        c.segment_fill = FillPolicy::parse(&s.segment_fill).unwrap_or(c.segment_fill);
        c.allocate_from_batch_bytes = s.allocate_from_batch_bytes;
        c.allow_tmpfs = s.allow_tmpfs;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        let checked = c.check().unwrap();
        assert_eq!(checked.listen, vec!["127.0.0.1:2424".parse().unwrap()]);
        assert_eq!(checked.unix_socket_mode, 0o660);
        assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);
        let text = c.to_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), c);
        // Every setting is printed, the allow-list in force included.
        let printed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            printed["access"]["allow"],
            toml::Value::Array(vec!["127.0.0.0/8".into(), "::1".into()]),
            "{text}"
        );
        assert_eq!(printed["spool"]["retention_age_max_s"], 0.into(), "{text}");
    }

    #[test]
    fn access_lists_are_printed_and_round_trip() {
        let c = Config::from_toml(
            "[server]\nlisten = [\"192.0.2.10:24\", \"127.0.0.1:24\"]\n\n[access]\nallow = [\"192.0.2.0/24\", \"2001:db8:25::/48\"]\n\n[access.listen.\"127.0.0.1:24\"]\nallow = [\"127.0.0.1/32\"]\n",
        )
        .unwrap();
        let text = c.to_toml();
        assert!(
            text.contains("allow = [\n    \"192.0.2.0/24\",")
                || text.contains("allow = [\"192.0.2.0/24\""),
            "{text}"
        );
        assert!(text.contains("[access.listen.\"127.0.0.1:24\"]"), "{text}");
        let back = Config::from_toml(&text).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            back.check().unwrap().allow.len(),
            c.check().unwrap().allow.len()
        );
        // The printed default list keeps the public-listener rule: a
        // listener on another address still needs a list written for it.
        let mut c = Config::from_toml(&Config::default().to_toml()).unwrap();
        c.server.listen = vec!["0.0.0.0:24".into()];
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("server.listen:") && e.contains("loopback default"),
            "{e}"
        );
        // An empty list is a decision: TCP clients all refused.
        c.access.allow = Vec::new();
        assert!(!c.check().unwrap().allow[0].allows("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn retention_age_is_checked_and_passed_on() {
        assert_eq!(Config::default().spool_config().retention_age_max, None);
        let c = Config::from_toml("[spool]\nretention_age_max_s = 0\n").unwrap();
        c.check().unwrap();
        assert_eq!(c.spool_config().retention_age_max, None);
        let c = Config::from_toml("[spool]\nretention_age_max_s = 3600\n").unwrap();
        c.check().unwrap();
        assert_eq!(
            c.spool_config().retention_age_max,
            Some(Duration::from_secs(3600))
        );
        for v in [RETENTION_AGE_MIN_S, RETENTION_AGE_MAX_S] {
            let mut c = Config::default();
            c.spool.retention_age_max_s = v;
            c.check().unwrap();
            assert_eq!(
                c.spool_config().retention_age_max,
                Some(Duration::from_secs(v))
            );
        }
        for v in [
            1,
            RETENTION_AGE_MIN_S - 1,
            RETENTION_AGE_MAX_S + 1,
            u64::MAX,
        ] {
            let mut c = Config::default();
            c.spool.retention_age_max_s = v;
            let e = c.check().unwrap_err().to_string();
            assert!(
                e.starts_with("spool.retention_age_max_s:") && e.contains("use 0"),
                "{e}"
            );
        }
        // The old spelling of SpoolConfig's field is not a key.
        let e = Config::from_toml("[spool]\nretention_age_max = 3600\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("retention_age_max"), "{e}");
    }

    #[test]
    fn metrics_off_loopback_is_a_warning() {
        let mut c = Config::default();
        for a in ["127.0.0.1:9425", "[::1]:9425", "[::ffff:127.0.0.1]:9425"] {
            c.metrics.listen = a.into();
            assert!(c.check().unwrap().warnings.is_empty(), "{a}");
        }
        for a in [
            "0.0.0.0:2611",
            "[::]:2611",
            "192.0.2.7:2611",
            "10.1.2.3:2611",
        ] {
            c.metrics.listen = a.into();
            let w = c.check().unwrap().warnings;
            assert_eq!(w.len(), 1, "{a}: {w:?}");
            assert!(
                w[0].starts_with("metrics.listen:")
                    && w[0].contains("no authentication")
                    && w[0].contains("127.0.0.1:9425")
                    && w[0].contains("firewall"),
                "{}",
                w[0]
            );
        }
    }

    #[test]
    fn segment_fill_is_checked_and_passed_on() {
        let c = Config::from_toml("[spool]\nsegment_fill = \"allocate\"\n").unwrap();
        c.check().unwrap();
        assert_eq!(c.spool_config().segment_fill, FillPolicy::Allocate);
        assert_eq!(
            Config::default().spool_config().segment_fill,
            FillPolicy::Auto
        );
        let c = Config::from_toml("[spool]\nsegment_fill = \"sparse\"\n").unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("spool.segment_fill:") && e.contains("\"zeros\""),
            "{e}"
        );
    }

    #[test]
    fn a_socket_everyone_may_write_is_warned_about() {
        let c = Config::from_toml(
            "[server]\nlisten = \"unix:/run/x/lmtp.sock\"\nunix_socket_mode = \"0666\"\n",
        )
        .unwrap();
        let w = c.check().unwrap().warnings;
        assert!(
            w.iter()
                .any(|w| w.starts_with("server.unix_socket_mode: 0666 lets every user")),
            "{w:?}"
        );
        let c = Config::from_toml("[server]\nlisten = \"unix:/run/x/lmtp.sock\"\n").unwrap();
        assert!(c.check().unwrap().warnings.is_empty());
        let c = Config::from_toml("[server]\nunix_socket_mode = \"4777\"\n").unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("0 to 0777") && e.contains("0660"), "{e}");
    }

    #[test]
    fn toml_errors_give_line_and_column_on_one_line() {
        let e = Config::from_toml("[server]\nsharsd = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2, column 1 (`sharsd = 1`): unknown field `sharsd`, expected one of"),
            "{e}"
        );
        assert!(
            !e.contains('^') && !e.contains(" | ") && !e.contains('\n'),
            "{e}"
        );
        let e = Config::from_toml("[spool]\nwriters = \"two\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2, column 11 (`writers = \"two\"`): invalid type"),
            "{e}"
        );
    }

    #[test]
    fn allocate_line_is_checked_and_passed_on() {
        assert_eq!(
            Config::default().spool_config().allocate_from_batch_bytes,
            512 << 10
        );
        let c = Config::from_toml("[spool]\nallocate_from_batch_bytes = 262144\n").unwrap();
        c.check().unwrap();
        assert_eq!(c.spool_config().allocate_from_batch_bytes, 256 << 10);
        // Past batch_bytes_max is allowed: a batch may end one large
        // message past it.
        let c = Config::from_toml("[spool]\nallocate_from_batch_bytes = 8388608\n").unwrap();
        c.check().unwrap();
        let c = Config::from_toml("[spool]\nallocate_from_batch_bytes = 100\n").unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("spool.allocate_from_batch_bytes:") && e.contains("doctor"),
            "{e}"
        );
    }

    #[test]
    fn listen_takes_one_address_or_a_list() {
        let c = Config::from_toml("[server]\nlisten = \"127.0.0.1:24\"\n").unwrap();
        assert_eq!(c.server.listen, ["127.0.0.1:24"]);
        let c = Config::from_toml("[server]\nlisten = [\"127.0.0.1:24\", \"unix:/run/l.sock\"]\n")
            .unwrap();
        assert_eq!(c.server.listen, ["127.0.0.1:24", "unix:/run/l.sock"]);
        let e = Config::from_toml("[server]\nlisten = 24\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("an address string or a list"), "{e}");
    }

    #[test]
    fn idle_poll_window() {
        assert_eq!(
            Config::default().check().unwrap().idle_poll,
            Duration::from_micros(30)
        );
        let c = Config::from_toml("[server]\nidle_poll_us = 0\n").unwrap();
        assert_eq!(c.check().unwrap().idle_poll, Duration::ZERO);
        let c = Config::from_toml("[server]\nidle_poll_us = 1000\n").unwrap();
        assert_eq!(c.check().unwrap().idle_poll, Duration::from_millis(1));
        let c = Config::from_toml("[server]\nidle_poll_us = 1001\n").unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("server.idle_poll_us:") && e.contains("use 0 to 1000"),
            "{e}"
        );
    }

    #[test]
    fn partial_file_keeps_defaults() {
        let c = Config::from_toml(
            "[server]\nlisten = [\"[::1]:2525\", \"unix:/tmp/x.sock\"]\nshards = 2\n\n[limits]\nrecipients_max = 200\n",
        )
        .unwrap();
        assert_eq!(c.server.shards, 2);
        assert_eq!(c.limits.recipients_max, 200);
        assert_eq!(c.limits.line_bytes_max, 2048);
        assert_eq!(c.check().unwrap().listen.len(), 2);
    }

    #[test]
    fn policy_and_access_keys() {
        let c = Config::from_toml(
            "[policy]\nrecipients = \"domains\"\ndomains = [\"Example.ORG\"]\n\n[access]\nallow = [\"10.0.0.0/8\"]\n\n[access.listen.\"127.0.0.1:2424\"]\nallow = [\"127.0.0.1\"]\n",
        )
        .unwrap();
        let checked = c.check().unwrap();
        assert_eq!(
            checked.policy,
            PolicySpec::Domains(vec!["example.org".into()])
        );
        assert!(checked.allow[0].allows("127.0.0.1".parse().unwrap()));
        assert!(!checked.allow[0].allows("10.0.0.1".parse().unwrap()));
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        // Defaults: accept all, loopback only.
        let checked = Config::default().check().unwrap();
        assert_eq!(checked.policy, PolicySpec::AcceptAll);
        assert_eq!(*checked.allow[0], AllowList::loopback());

        let mut c = Config::default();
        c.policy.table = "/etc/rcpt".into();
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("policy.table:") && e.contains("recipients = \"table\""),
            "{e}"
        );
        c.policy.recipients = "table".into();
        assert!(matches!(
            c.check().unwrap().policy,
            PolicySpec::Table { .. }
        ));
        let mut c = Config::default();
        c.policy.recipients = "domains".into();
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("policy.domains:")
        );
        c.policy.recipients = "ldap".into();
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("policy.recipients:")
        );
        // A typo in the mode is blamed on the mode, not on the keys of the
        // mode meant.
        let c =
            Config::from_toml("[policy]\nrecipients = \"tabel\"\ntable = \"/etc/rcpt\"\n").unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("policy.recipients:")
                && e.contains("'tabel'")
                && e.contains("\"accept_all\" (default), \"domains\" or \"table\""),
            "{e}"
        );
        let c =
            Config::from_toml("[policy]\nrecipients = \"domain\"\ndomains = [\"example.org\"]\n")
                .unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(e.starts_with("policy.recipients:"), "{e}");

        let mut c = Config::default();
        c.server.listen = vec!["0.0.0.0:24".into()];
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.contains("no allow-list") && e.contains("0.0.0.0/0"),
            "{e}"
        );
        c.access.allow = vec!["192.0.2.0/24".into()];
        assert!(c.check().is_ok());
        c.access.allow = vec!["192.0.2.1/24".into()];
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("access.allow:")
        );
    }

    #[test]
    fn log_keys() {
        let c = Config::from_toml("[log]\nlevel = \"warn,delivery=info\"\nformat = \"json\"\n")
            .unwrap();
        assert_eq!(c.check().unwrap().log_format, LogFormat::Json);
        assert_eq!(
            Config::default().check().unwrap().log_format,
            LogFormat::Text
        );
        let mut c = Config::default();
        c.log.format = "syslog".into();
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("log.format:")
        );
        let mut c = Config::default();
        c.log.level = "info,[".into();
        assert!(c.check().unwrap_err().to_string().starts_with("log.level:"));
        assert_eq!(Config::default().check().unwrap().warnings.len(), 0);
        assert_eq!(Config::default().check().unwrap().metrics_listen, None);
        let mut c = Config::default();
        c.metrics.listen = "127.0.0.1:9425".into();
        assert_eq!(
            c.check().unwrap().metrics_listen,
            Some("127.0.0.1:9425".parse().unwrap())
        );
        c.metrics.listen = "localhost:9425".into();
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("metrics.listen:")
        );
    }

    #[test]
    fn log_level_accepts_exactly_what_works() {
        use tracing_subscriber::filter::LevelFilter;
        for (level, max) in [
            ("info", LevelFilter::INFO),
            ("INFO", LevelFilter::INFO),
            ("off", LevelFilter::OFF),
            ("error", LevelFilter::ERROR),
            ("warn", LevelFilter::WARN),
            ("debug", LevelFilter::DEBUG),
            ("trace", LevelFilter::TRACE),
            ("warn,delivery=info", LevelFilter::INFO),
            (" warn , delivery = info ,", LevelFilter::INFO),
            ("error,lmtp_ingest=debug", LevelFilter::DEBUG),
            ("info,lmtp_ingest::spool::writer=trace", LevelFilter::TRACE),
        ] {
            let mut c = Config::default();
            c.log.level = level.into();
            c.check().unwrap_or_else(|e| panic!("{level:?}: {e}"));
            let f = log_filter(level).unwrap();
            assert_eq!(f.max_level_hint(), Some(max), "{level:?}");
        }
        // The filter logs the server's lines at the level given.
        let f = log_filter("warn,delivery=info").unwrap().to_string();
        assert!(f.contains("warn") && f.contains("delivery=info"), "{f}");

        // Accepted by tracing's syntax, but logging nothing (a word read
        // as a target) or not what was meant: refused, naming the levels.
        for (level, needle) in [
            ("inof", "'inof' is not a log level"),
            ("Info.", "'Info.' is not a log level"),
            ("3", "'3' is not a log level"),
            ("warn,delivry=info", "'delivry' is not a log target"),
            ("delivery=inof", "'inof' is not a log level"),
            ("lmtp_ingest::=debug", "not a log target"),
            ("lmtp_ingest[span]=debug", "not a log target"),
            ("", "no level given"),
            (" , ", "no level given"),
        ] {
            let mut c = Config::default();
            c.log.level = level.into();
            let e = c.check().unwrap_err().to_string();
            assert!(
                e.starts_with("log.level:")
                    && e.contains(needle)
                    && e.contains("\"error\", \"warn\", \"info\", \"debug\", \"trace\""),
                "{level:?}: {e}"
            );
        }
    }

    #[test]
    fn errors_name_key_and_fix() {
        let e = Config::from_toml("[server]\nlisten_on = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field") && e.contains("listen_on"),
            "{e}"
        );
        let e = Config::from_toml("[limits]\nrecipients_max = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("recipients_max"), "{e}");
        let mut c = Config::default();
        c.server.listen = vec!["localhost:25".into()];
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("server.listen:") && e.contains("IP:PORT"),
            "{e}"
        );
        let mut c = Config::default();
        c.limits.line_bytes_max = 10;
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.starts_with("limits.line_bytes_max:") && e.contains("512 or more"),
            "{e}"
        );
        let mut c = Config::default();
        c.protocol.bare_line_endings = "drop".into();
        assert!(c.check().unwrap_err().to_string().contains("\"normalize\""));
        let mut c = Config::default();
        c.server.unix_socket_mode = "rw-rw----".into();
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("server.unix_socket_mode")
        );
        let mut c = Config::default();
        c.spool.writers = 0;
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("spool.writers")
        );
        let mut c = Config::default();
        c.server.shard_inflight_bytes_max = 1024;
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .contains("message_bytes_max")
        );
        let mut c = Config::default();
        c.protocol.detail_delimiters = "+@".into();
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .starts_with("protocol.detail_delimiters")
        );
    }
}
