//! `lmtp-ingest serve` refuses bad configuration at start, naming the key,
//! the problem and the fix; `--print-config` shows the effective settings.

mod server_util;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lmtp_ingest::config::Config;
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
    // Every setting, the default allow-list in force included.
    assert!(text.contains("[access]"), "{text}");
    assert_eq!(parsed.access.allow, ["127.0.0.0/8", "::1"]);
    assert!(text.contains("retention_age_max_s = 0"), "{text}");
}

/// `serve --print-config --config FILE` with `toml` in FILE: (status code,
/// stdout, stderr).
fn print_config(name: &str, toml: &str) -> (Option<i32>, String, String) {
    let dir = test_dir(name);
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--print-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn print_config_shows_access_lists_and_round_trips() {
    let file = "[server]\nlisten = [\"192.0.2.10:24\", \"127.0.0.1:24\"]\n\n[access]\nallow = [\"192.0.2.0/24\", \"2001:db8:25::/48\"]\n\n[access.listen.\"127.0.0.1:24\"]\nallow = [\"127.0.0.1/32\"]\n\n[spool]\nretention_age_max_s = 86400\n";
    let (code, text, err) = print_config("cli-print-access", file);
    assert_eq!(code, Some(0), "{err}");
    let printed = Config::from_toml(&text).unwrap();
    assert_eq!(printed, Config::from_toml(file).unwrap(), "{text}");
    assert_eq!(printed.access.allow, ["192.0.2.0/24", "2001:db8:25::/48"]);
    assert_eq!(
        printed.access.listen["127.0.0.1:24"].allow,
        ["127.0.0.1/32"]
    );
    assert_eq!(
        printed.spool_config().retention_age_max,
        Some(Duration::from_secs(86400))
    );
    // Printed, then printed again: the same text.
    let (_, again, _) = print_config("cli-print-access-2", &text);
    assert_eq!(again, text);
}

#[test]
fn config_typos_are_refused_naming_the_real_key() {
    let dir = test_dir("cli-typos");
    let cfg = dir.join("c.toml");
    let cfg_s = cfg.to_str().unwrap();
    let spool = dir.join("spool");
    let spool = spool.to_str().unwrap();
    // A misspelt level used to turn every log line off, the refusal of
    // the configuration included. RUST_LOG would win over it: unset.
    std::fs::write(&cfg, "[log]\nlevel = \"inof\"\n").unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--spool",
            spool,
            "--config",
            cfg_s,
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a server that accepts the level runs (silently) until killed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started with log.level = \"inof\"");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("log.level: 'inof' is not a log level")
            && e.contains("\"error\", \"warn\", \"info\", \"debug\", \"trace\""),
        "{e}"
    );
    // A mode typo is blamed on the mode, not on policy.table.
    std::fs::write(
        &cfg,
        "[policy]\nrecipients = \"tabel\"\ntable = \"/etc/lmtp-ingest/recipients\"\n",
    )
    .unwrap();
    let e = refused(&["--spool", spool, "--config", cfg_s]);
    assert!(
        e.contains("policy.recipients: 'tabel' is not a mode") && e.contains("\"table\""),
        "{e}"
    );
    assert!(!e.contains("policy.table:"), "{e}");
    // Age-based retention: a key now, and its range is checked.
    std::fs::write(&cfg, "[spool]\nretention_age_max_s = 5\n").unwrap();
    let e = refused(&["--spool", spool, "--config", cfg_s]);
    assert!(
        e.contains("spool.retention_age_max_s") && e.contains("use 0"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn print_config_warns_about_a_public_metrics_endpoint() {
    let (code, _, err) = print_config(
        "cli-metrics-public",
        "[metrics]\nlisten = \"0.0.0.0:2611\"\n",
    );
    assert_eq!(code, Some(0), "a warning, not a refusal: {err}");
    assert!(
        err.contains("warning: metrics.listen: 0.0.0.0:2611 is reachable")
            && err.contains("no authentication")
            && err.contains("firewall"),
        "{err}"
    );
    let (code, _, err) = print_config(
        "cli-metrics-local",
        "[metrics]\nlisten = \"127.0.0.1:2611\"\n",
    );
    assert_eq!(code, Some(0));
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn a_spool_another_user_owns_is_refused_naming_the_owner_and_the_fix() {
    let dir = test_dir("perm-spool");
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("lock"), "pid 1\n").unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--spool"])
        .arg(&spool);
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    use std::os::unix::fs::PermissionsExt;
    if root {
        // Root opens anything: run as nobody on a spool root owns.
        std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    } else {
        std::fs::set_permissions(spool.join("lock"), std::fs::Permissions::from_mode(0o444))
            .unwrap();
    }
    let o = cmd.output().unwrap();
    let _ = std::fs::set_permissions(spool.join("lock"), std::fs::Permissions::from_mode(0o644));
    assert_eq!(o.status.code(), Some(2), "{:?}", o.status);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("lock: permission denied"), "{err}");
    assert!(
        err.contains("owned by uid") && err.contains("runuser"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
