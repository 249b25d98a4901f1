//! Recipient tables at scale: load time, memory and lookups per second for
//! tables of 1 and 5 million addresses (`cargo bench --bench policy`; give
//! sizes in millions as arguments to choose others, e.g. `-- 1 10`).
//!
//! A timed measurement, not criterion: one load is seconds long. Lookups go
//! through `Policy::check` (the lock and the key folding included) on
//! prepared recipients: half listed (a quarter of those with a `+detail`),
//! half not. The count of accepted recipients is checked against the
//! expected one, so a broken table cannot look fast.

use std::hint::black_box;
use std::io::Write;
use std::time::Instant;

use lmtp_ingest::envelope::{Mailbox, Recipient};
use lmtp_ingest::policy::{Policy, PolicySpec};
use lmtp_ingest::proto::address::split_detail;
use lmtp_ingest::proto::{RcptVerdict, RecipientPolicy};

fn address(i: u64) -> (String, String) {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (
        format!("user{i}.{:06x}", x >> 40),
        format!("mail{}.example.org", i % 997),
    )
}

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

fn run(entries: u64) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("recipients");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    writeln!(w, "# generated: {entries} addresses").unwrap();
    for i in 0..entries {
        let (l, d) = address(i);
        writeln!(w, "{l}@{d}").unwrap();
    }
    w.into_inner().unwrap().sync_all().unwrap();
    let file_mib = std::fs::metadata(&path).unwrap().len() >> 20;

    let rss_before = rss_mib();
    let started = Instant::now();
    let (policy, _) = Policy::new(&PolicySpec::Table {
        path: path.clone(),
        entries_max: entries as usize,
    })
    .unwrap();
    let load = started.elapsed();
    let rss_table = rss_mib().saturating_sub(rss_before);

    // 1M prepared recipients: even i listed (some with a detail), odd not.
    const PROBES: u64 = 1_000_000;
    let mut expected = 0u64;
    let probes: Vec<Recipient> = (0..PROBES)
        .map(|k| {
            let i = k.wrapping_mul(2_654_435_761) % entries;
            let (mut local, mut domain) = address(i);
            if k % 2 == 1 {
                local.push('x');
            } else {
                expected += 1;
                if k % 8 == 0 {
                    local.push_str("+tag");
                }
                if k % 6 == 0 {
                    domain.make_ascii_uppercase();
                }
            }
            split_detail(Mailbox { local, domain }, "+")
        })
        .collect();
    let rounds = 5;
    let started = Instant::now();
    let mut accepted = 0u64;
    for _ in 0..rounds {
        for r in &probes {
            if black_box(policy.check(black_box(r))) == RcptVerdict::Accept {
                accepted += 1;
            }
        }
    }
    let took = started.elapsed();
    assert_eq!(accepted, expected * rounds, "wrong lookup results");
    let lookups = (PROBES * rounds) as f64;
    println!(
        "{:>2}M entries: file {file_mib} MiB, load {:.2} s ({:.2} M lines/s), table {rss_table} MiB RSS, {:.1} M lookups/s ({:.0} ns each; half hits)",
        entries / 1_000_000,
        load.as_secs_f64(),
        entries as f64 / load.as_secs_f64() / 1e6,
        lookups / took.as_secs_f64() / 1e6,
        took.as_nanos() as f64 / lookups,
    );
    // Reload: the same table again, as on SIGHUP.
    let started = Instant::now();
    policy.reload().unwrap();
    println!("    reload {:.2} s", started.elapsed().as_secs_f64());
    drop(policy);

    // Baseline for scale: std's HashSet<Box<str>> of the same keys, probed
    // with a reused key buffer (no allocation per lookup).
    let rss_before = rss_mib();
    let started = Instant::now();
    let text = std::fs::read_to_string(&path).unwrap();
    let set: std::collections::HashSet<Box<str>> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (local, domain) = l.rsplit_once('@').unwrap();
            format!("{local}@{}", domain.to_ascii_lowercase()).into_boxed_str()
        })
        .collect();
    drop(text);
    let set_load = started.elapsed();
    let set_rss = rss_mib().saturating_sub(rss_before);
    let mut key = String::with_capacity(512);
    let mut hits = 0u64;
    let started = Instant::now();
    for _ in 0..rounds {
        for r in &probes {
            let mut found = false;
            for local in [
                Some(r.mailbox.local.as_str()),
                r.detail.as_ref().map(|d| d.base.as_str()),
            ]
            .into_iter()
            .flatten()
            {
                key.clear();
                key.push_str(local);
                key.push('@');
                key.extend(r.mailbox.domain.chars().map(|c| c.to_ascii_lowercase()));
                if black_box(&set).contains(key.as_str()) {
                    found = true;
                    break;
                }
            }
            hits += found as u64;
        }
    }
    let took = started.elapsed();
    assert_eq!(hits, expected * rounds, "baseline: wrong lookup results");
    println!(
        "    baseline HashSet<Box<str>>: build {:.2} s, {set_rss} MiB RSS, {:.1} M lookups/s ({:.0} ns each)",
        set_load.as_secs_f64(),
        lookups / took.as_secs_f64() / 1e6,
        took.as_nanos() as f64 / lookups,
    );
}

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() { vec![1, 5] } else { sizes };
    for m in sizes {
        run(m * 1_000_000);
    }
}
