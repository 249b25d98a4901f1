//! A run's result, and how it is shown: a few aligned text lines for a person,
//! or one JSON object for a script (`--json`).
//!
//! Must not: print (the CLI decides where the text goes).

use serde_json::{Value, json};

use super::LoadConfig;
use super::driver::ConnError;
use super::hist::Percentiles;
use super::tally::Tally;

/// Everything a run measured.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub config: Value,
    /// Messages with at least one recipient delivered.
    pub messages: u64,
    pub messages_failed: u64,
    pub recipients: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Final dot to last per-recipient reply.
    pub latency_us: Percentiles,
    /// With `--rate`: scheduled start to last reply.
    pub latency_scheduled_us: Option<Percentiles>,
    /// Recipients not delivered, by reply code.
    pub failures: Vec<(u16, u64)>,
    pub protocol_errors: u64,
    /// Connections the server ended with a 421.
    pub connections_closed: u64,
    /// The first few protocol errors, with context.
    pub errors: Vec<ConnError>,
}

impl LoadReport {
    pub fn new(
        cfg: &LoadConfig,
        threads: usize,
        t: &Tally,
        seconds: f64,
        protocol_errors: u64,
        errors: Vec<ConnError>,
    ) -> LoadReport {
        let config = json!({
            "target": cfg.target.to_string(),
            "connections": cfg.connections,
            "threads": threads,
            "pipelining": cfg.pipelining,
            "chunking": cfg.chunking,
            "recipients": cfg.recipients,
            "sizes": cfg.sizes.iter().map(|&(s, w)| json!({"bytes": s, "weight": w})).collect::<Vec<_>>(),
            "messages": cfg.messages_max(),
            "duration_s": cfg.duration.map(|d| d.as_secs_f64()),
            "rate": cfg.rate,
            "timeout_s": cfg.reply_timeout.as_secs_f64(),
        });
        LoadReport {
            config,
            messages: t.messages,
            messages_failed: t.messages_failed,
            recipients: t.recipients,
            bytes: t.bytes,
            seconds,
            latency_us: t.latency.percentiles(),
            latency_scheduled_us: cfg.rate.map(|_| t.latency_scheduled.percentiles()),
            failures: t.failures_by_code(),
            protocol_errors,
            connections_closed: t.connections_closed,
            errors,
        }
    }

    pub fn messages_per_s(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    pub fn recipients_per_s(&self) -> f64 {
        self.recipients as f64 / self.seconds
    }

    /// Megabytes (10^6 bytes) of message data delivered per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds
    }

    /// Whether the exit status should say something went wrong: a protocol
    /// error, or (unless allowed) a refused message or a connection the
    /// server closed with 421.
    pub fn is_problem(&self, allow_failures: bool) -> bool {
        self.protocol_errors > 0
            || ((self.messages_failed > 0 || self.connections_closed > 0) && !allow_failures)
    }

    pub fn to_json(&self) -> Value {
        let failures: serde_json::Map<String, Value> = self
            .failures
            .iter()
            .map(|&(c, n)| (c.to_string(), json!(n)))
            .collect();
        let mut v = json!({
            "messages": self.messages,
            "messages_failed": self.messages_failed,
            "recipients": self.recipients,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "messages_per_s": round(self.messages_per_s(), 1),
            "recipients_per_s": round(self.recipients_per_s(), 1),
            "mb_per_s": round(self.mb_per_s(), 3),
            "latency_us": self.latency_us,
            "failures": failures,
            "protocol_errors": self.protocol_errors,
            "connections_closed_by_server": self.connections_closed,
            "protocol_error_examples": self.errors.iter().map(|e| json!({
                "connection": e.conn,
                "error": e.error.what,
                "reply": e.error.reply,
            })).collect::<Vec<_>>(),
            "config": self.config,
        });
        if let Some(p) = self.latency_scheduled_us {
            v["latency_from_schedule_us"] = json!(p);
        }
        v
    }

    /// The human-readable summary, several lines, ending with a newline.
    pub fn text(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "target {}, {} connections on {} threads, pipelining {}, {}, {} recipient(s), sizes {}\n",
            c["target"].as_str().unwrap_or("?"),
            c["connections"],
            c["threads"],
            if c["pipelining"] == true { "on" } else { "off" },
            if c["chunking"] == true {
                "BDAT"
            } else {
                "DATA"
            },
            c["recipients"],
            c["sizes"]
                .as_array()
                .map(|a| a
                    .iter()
                    .map(|x| format!("{}:{}", x["bytes"], x["weight"]))
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
        );
        s += &format!(
            "messages     {:>12}  in {:.3} s ({} failed)\n",
            group(self.messages),
            self.seconds,
            group(self.messages_failed)
        );
        s += &format!(
            "messages/s   {:>12}\n",
            group(self.messages_per_s().round() as u64)
        );
        s += &format!(
            "recipients/s {:>12}\n",
            group(self.recipients_per_s().round() as u64)
        );
        s += &format!("MB/s         {:>12.1}\n", self.mb_per_s());
        let p = &self.latency_us;
        s += &format!(
            "latency, final dot to last reply (µs): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
            group(p.p50),
            group(p.p90),
            group(p.p99),
            group(p.p999),
            group(p.max)
        );
        if let Some(p) = &self.latency_scheduled_us {
            s += &format!(
                "latency, scheduled start to last reply (µs): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
                group(p.p50),
                group(p.p90),
                group(p.p99),
                group(p.p999),
                group(p.max)
            );
        }
        if self.failures.is_empty() {
            s += "failures by reply code: none\n";
        } else {
            let list: Vec<String> = self
                .failures
                .iter()
                .map(|(c, n)| format!("{c}: {}", group(*n)))
                .collect();
            s += &format!("failures by reply code (recipients): {}\n", list.join(", "));
        }
        if self.connections_closed > 0 {
            s += &format!(
                "connections closed by the server (421): {}\n",
                group(self.connections_closed)
            );
        }
        s += &format!("protocol errors: {}\n", group(self.protocol_errors));
        for e in &self.errors {
            s += &format!("  connection {}: {}\n", e.conn, e.error);
        }
        if self.protocol_errors > self.errors.len() as u64 {
            s += &format!(
                "  ... and {} more\n",
                self.protocol_errors - self.errors.len() as u64
            );
        }
        s
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// 1234567 -> "1,234,567".
pub fn group(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::with_capacity(d.len() + d.len() / 3);
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::conn::ProtocolError;

    fn sample() -> LoadReport {
        let cfg = LoadConfig::new("127.0.0.1:2424".parse().unwrap());
        let mut t = Tally {
            messages: 1000,
            recipients: 1000,
            bytes: 4096 * 1000,
            messages_failed: 2,
            ..Default::default()
        };
        t.fail(451, 2);
        for us in 1..=100 {
            t.latency.record_us(us * 10);
        }
        let err = ConnError {
            conn: 3,
            error: ProtocolError {
                what: "a reply no command asked for".into(),
                reply: "250 2.0.0 x".into(),
            },
        };
        LoadReport::new(&cfg, 2, &t, 0.5, 1, vec![err])
    }

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn json_has_the_documented_keys() {
        let v = sample().to_json();
        for k in [
            "messages",
            "recipients",
            "bytes",
            "seconds",
            "messages_per_s",
            "recipients_per_s",
            "mb_per_s",
            "latency_us",
            "failures",
            "protocol_errors",
            "config",
        ] {
            assert!(v.get(k).is_some(), "missing {k}: {v}");
        }
        assert_eq!(v["messages_per_s"], 2000.0);
        assert_eq!(v["mb_per_s"], 8.192);
        assert_eq!(v["latency_us"]["p50"], 500);
        assert_eq!(v["latency_us"]["max"], 1000);
        assert_eq!(v["failures"]["451"], 2);
        assert_eq!(v["config"]["connections"], 16);
        assert_eq!(v["config"]["threads"], 2);
        assert!(v.get("latency_from_schedule_us").is_none());
    }

    #[test]
    fn text_shows_rates_latency_failures_and_errors() {
        let r = sample();
        let t = r.text();
        assert!(t.contains("messages/s          2,000"), "{t}");
        assert!(
            t.contains("p50 500  p90 900  p99 990  p99.9 1,000  max 1,000"),
            "{t}"
        );
        assert!(
            t.contains("failures by reply code (recipients): 451: 2"),
            "{t}"
        );
        assert!(
            t.contains("connection 3: a reply no command asked for (reply: \"250 2.0.0 x\")"),
            "{t}"
        );
        assert!(r.is_problem(true));
    }
}
