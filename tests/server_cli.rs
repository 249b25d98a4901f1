//! `lmtp-ingest serve` refuses bad configuration at start, naming the key,
//! the problem and the fix; `--print-config` shows the effective settings.

mod server_util;

use std::process::Command;

use server_util::{BIN, Server, test_dir};

/// Runs `lmtp-ingest serve ARGS`, expecting it to refuse; returns stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(BIN).arg("serve").args(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "serve {args:?} should refuse to start"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_flags_and_files_are_refused_with_key_and_fix() {
    let dir = test_dir("cli");
    let spool = dir.join("spool");
    let spool = spool.to_str().unwrap();
    let e = refused(&["--listen", "localhost:25", "--spool", spool]);
    assert!(e.contains("server.listen") && e.contains("IP:PORT"), "{e}");
    let e = refused(&["--recipients-max", "0", "--spool", spool]);
    assert!(
        e.contains("limits.recipients_max") && e.contains("100 or more"),
        "{e}"
    );
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[server]\nlisten = [\"127.0.0.1:0\"]\nshardz = 2\n").unwrap();
    let e = refused(&["--config", cfg.to_str().unwrap()]);
    assert!(e.contains("bad.toml") && e.contains("shardz"), "{e}");
    let e = refused(&["--config", dir.join("missing.toml").to_str().unwrap()]);
    assert!(e.contains("cannot read"), "{e}");
    let e = refused(&["--io", "uring-please"]);
    assert!(e.contains("uring-please"), "{e}");
}

#[test]
fn tmpfs_spool_lock_and_busy_port_are_refused() {
    if std::fs::metadata("/dev/shm").is_ok() {
        let e = refused(&[
            "--listen",
            "127.0.0.1:0",
            "--spool",
            &format!("/dev/shm/lmtp-cli-{}", std::process::id()),
        ]);
        assert!(e.contains("tmpfs"), "{e}");
    }
    let mut first = Server::start("cli-lock", "epoll", &[]);
    let spool = first.spool.to_str().unwrap().to_string();
    let e = refused(&["--listen", "127.0.0.1:0", "--spool", &spool]);
    assert!(e.contains("locked"), "a second server on one spool: {e}");
    let other = test_dir("cli-port").join("spool");
    let e = refused(&[
        "--listen",
        &first.addr(),
        "--spool",
        other.to_str().unwrap(),
    ]);
    assert!(e.contains(&first.addr()), "{e}");
    assert!(first.stop().success());
    // The refused server had opened (and preallocated) its spool first.
    let _ = std::fs::remove_dir_all(other.parent().unwrap());
}

#[test]
fn print_config_shows_effective_settings() {
    let dir = test_dir("cli-print");
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "[limits]\nrecipients_max = 200\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--print-config", "--shards", "3", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed = lmtp_ingest::config::Config::from_toml(&text).unwrap();
    assert_eq!(parsed.server.shards, 3);
    assert_eq!(parsed.limits.recipients_max, 200);
    assert_eq!(parsed.server.listen, vec!["127.0.0.1:2424".to_string()]);
}
