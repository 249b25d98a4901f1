//! Helpers shared by the spool integration tests: deterministic messages and
//! a fresh spool directory on the real disk (under target/, never tmpfs).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lmtp_ingest::envelope::{
    BodyType, ClientInfo, Detail, Envelope, MailParams, Mailbox, Message, Recipient, ReversePath,
    TransactionId,
};
use lmtp_ingest::spool::SpoolConfig;

/// A message fully determined by `(a, b, n)`: the same inputs give the same
/// bytes, so a test can check what it reads back without keeping copies.
pub fn message(a: u64, b: u32, n: u32, body_len: usize) -> Message {
    let mut x = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(((b as u64) << 32) | n as u64)
        | 1;
    let mut body = Vec::with_capacity(body_len);
    let header = format!("Subject: test {a}.{b}.{n}\r\n\r\n");
    body.extend_from_slice(header.as_bytes());
    while body.len() < body_len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.push(b'a' + (x % 26) as u8);
        if body.len() % 70 == 0 {
            body.extend_from_slice(b"\r\n");
        }
    }
    body.truncate(body_len.max(header.len()));
    let rcpts = (0..(n % 3 + 1))
        .map(|k| Recipient {
            mailbox: Mailbox {
                local: format!("user{k}+box{n}"),
                domain: "example.org".into(),
            },
            detail: Some(Detail {
                base: format!("user{k}"),
                delimiter: '+',
                tag: format!("box{n}"),
            }),
        })
        .collect();
    Message {
        envelope: Envelope {
            reverse_path: if n % 5 == 0 {
                ReversePath::Null
            } else {
                ReversePath::Mailbox(Mailbox {
                    local: format!("sender{b}"),
                    domain: "example.net".into(),
                })
            },
            params: MailParams {
                size: Some(body_len as u64),
                body: Some(BodyType::EightBitMime),
                smtputf8: false,
            },
            recipients: rcpts,
            client: ClientInfo {
                peer: "192.0.2.1:2525".into(),
                lhlo: "mx.example.net".into(),
            },
            transaction: TransactionId {
                session: a,
                seq: (b << 20) | n,
            },
        },
        body,
    }
}

/// A fresh, empty directory under target/ (a real disk). Directories left by
/// earlier test processes that have exited are removed first.
pub fn spool_dir(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("spool-tests");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let file_name = e.file_name();
            let Some(pid) = file_name
                .to_str()
                .and_then(|n| n.rsplit_once('-'))
                .and_then(|(_, pid)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = root.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config for tests: small segments, quick maintenance.
pub fn config(dir: &std::path::Path) -> SpoolConfig {
    let mut c = SpoolConfig::new(dir);
    c.segment_bytes = 256 << 10;
    c.maintenance_interval = Duration::from_millis(50);
    c
}

pub fn waker_counter() -> (
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<dyn Fn() + Send + Sync>,
) {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let m = n.clone();
    (
        n,
        Arc::new(move || {
            m.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }),
    )
}
