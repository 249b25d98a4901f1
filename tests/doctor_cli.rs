//! `lmtp-ingest doctor` end to end: against a spool on the real disk (under
//! `target/`) the JSON report has every check with a status, a value and a
//! fix where needed, and a positive fdatasync measurement; a spool on tmpfs
//! fails with the fix; bad flags exit 2. With bench/slow-sync's shim making
//! syncs slow, doctor tells a disk that flushes in parallel (advice: a second
//! writer) from one that flushes one request at a time (advice: one).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lmtp-ingest");

fn doctor(args: &[&str]) -> Output {
    Command::new(BIN).arg("doctor").args(args).output().unwrap()
}

/// A fresh directory on the real disk, not /tmp (which may be tmpfs).
fn disk_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("doctor-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

#[test]
fn json_report_on_a_real_disk() {
    let spool = disk_dir("disk");
    let out = doctor(&[
        "--spool",
        spool.to_str().unwrap(),
        "--json",
        "--fsync-seconds",
        "0.4",
    ]);
    let r = json(&out);
    let code = out.status.code().unwrap();
    assert!(code == 0 || code == 1, "exit {code}: {r:#}");
    assert_eq!(r["exit_status"], code);

    let checks = r["checks"].as_array().unwrap();
    let (mut ok, mut warn, mut fail) = (0, 0, 0);
    for c in checks {
        assert!(c["name"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
        assert!(c["value"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
        match c["status"].as_str().unwrap() {
            "ok" => ok += 1,
            "warn" | "fail" => {
                let fix = c["fix"].as_str().unwrap_or_default();
                assert!(!fix.is_empty(), "a warn/fail without its fix: {c}");
                if c["status"] == "warn" {
                    warn += 1
                } else {
                    fail += 1
                }
            }
            other => panic!("status {other}"),
        }
    }
    assert_eq!(r["summary"]["ok"], ok);
    assert_eq!(r["summary"]["warn"], warn);
    assert_eq!(r["summary"]["fail"], fail);
    assert_eq!(code, i32::from(warn + fail > 0));
    for name in [
        "kernel",
        "io_uring",
        "rlimit_nofile",
        "rlimit_memlock",
        "cpus",
        "spool_dir",
        "spool_fs",
        "spool_space",
        "spool_fsync",
    ] {
        check(&r, name);
    }
    assert_eq!(check(&r, "spool_dir")["status"], "ok");
    assert_ne!(check(&r, "spool_fs")["status"], "fail");

    // ext4 under target/ takes fallocate (segments by allocation possible).
    assert_eq!(r["fsync"]["fallocate"], true, "{}", r["fsync"]);
    let p = &r["fsync"]["parallel"];
    assert_eq!(p["streams"], 2, "{p}");
    for k in ["syncs_per_s", "median_us", "gain"] {
        assert!(p[k].as_f64().unwrap() > 0.0, "parallel.{k}: {p}");
    }
    for mode in ["append", "overwrite"] {
        let m = &r["fsync"][mode];
        assert!(m["iterations"].as_u64().unwrap() >= 1, "{m}");
        for k in ["min_us", "median_us", "p99_us", "max_us", "syncs_per_s"] {
            assert!(m[k].as_f64().unwrap() > 0.0, "{mode}.{k}: {m}");
        }
        assert!(m["min_us"].as_f64() <= m["max_us"].as_f64());
    }
    let topics: Vec<&str> = r["advice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        topics,
        ["writers", "batch_window", "commit_ceiling", "segment_fill"]
    );
    // Allocated against zero-filled segments at every batch size, and the
    // advice quotes them.
    let f = &r["fsync"]["fill"];
    let sizes = f["sizes"].as_array().expect("fill sizes");
    assert_eq!(sizes.len(), 4, "{f}");
    for s in sizes {
        for k in [
            "overwrite_median_us",
            "allocated_median_us",
            "zeros_mb_s",
            "allocated_mb_s",
        ] {
            assert!(s[k].as_f64().unwrap() > 0.0, "fill.{k}: {s}");
        }
    }
    assert!(f["zero_fill_mb_s"].as_f64().unwrap() > 0.0, "{f}");
    let fill = r["advice"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["topic"] == "segment_fill")
        .unwrap();
    assert!(
        fill["text"]
            .as_str()
            .unwrap()
            .contains("allocated over zero-filled 64 KiB"),
        "{fill}"
    );
    // The measurement's files are gone.
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
}

#[test]
fn text_report_is_aligned() {
    let spool = disk_dir("text");
    let out = doctor(&["--spool", spool.to_str().unwrap(), "--fsync-seconds", "0.2"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text.lines().find(|l| l.starts_with("CHECK")).expect(&text);
    let col = header.find("STATUS").unwrap();
    let value_col = header.find("VALUE").unwrap();
    for l in text.lines().filter(|l| l.starts_with("spool_")) {
        let status = &l[col..value_col];
        assert!(
            ["ok", "WARN", "FAIL"].contains(&status.trim()),
            "misaligned: {l:?}"
        );
    }
    assert!(
        text.contains("ADVICE") && text.contains("exit status"),
        "{text}"
    );
}

#[test]
fn a_spool_on_tmpfs_fails_with_the_fix() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm here; skipped");
        return;
    }
    let Ok(dir) = tempfile::tempdir_in(shm) else {
        eprintln!("/dev/shm not writable; skipped");
        return;
    };
    let out = doctor(&[
        "--spool",
        dir.path().to_str().unwrap(),
        "--json",
        "--fsync-seconds",
        "0.1",
    ]);
    let r = json(&out);
    let fs = check(&r, "spool_fs");
    if !fs["value"].as_str().unwrap().contains("tmpfs") {
        eprintln!("/dev/shm is not tmpfs here; skipped");
        return;
    }
    assert_eq!(fs["status"], "fail", "{fs}");
    assert!(fs["value"].as_str().unwrap().contains("power off"), "{fs}");
    assert!(fs["fix"].as_str().unwrap().contains("disk"), "{fs}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["--fsync-seconds", "0"][..],
        &["--fsync-seconds", "many"],
        &["--no-such-flag"],
        &["--config", "/nonexistent/lmtp-ingest.toml"],
    ] {
        let out = doctor(args);
        assert_eq!(out.status.code(), Some(2), "doctor {args:?}");
        assert!(!out.stderr.is_empty(), "doctor {args:?} says nothing");
    }
    // A configuration the server would refuse is also "could not run".
    let dir = disk_dir("badconf");
    let conf = dir.join("bad.toml");
    std::fs::write(&conf, "[spool]\nwriters = 0\n").unwrap();
    let out = doctor(&["--config", conf.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("spool.writers"));
}

#[test]
fn the_tuning_example_configuration_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/lmtp-ingest.toml.example");
    let out = Command::new(BIN)
        .args(["serve", "--print-config", "--config"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.contains("dir = \"/var/lib/lmtp-ingest/spool\""),
        "{printed}"
    );
}

/// Builds bench/slow-sync's shim into the test's scratch directory.
fn slow_sync_shim() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let so = Path::new(env!("CARGO_TARGET_TMPDIR")).join("doctor-slowsync.so");
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(root.join("bench/slow-sync/slowsync.c"))
        .args(["-ldl", "-lpthread"])
        .output()
        .expect("cc (tests/setup.sh installs gcc)");
    assert!(
        out.status.success(),
        "building the shim: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// Doctor's report with every sync of it made 3 ms longer, the sleeps of
/// concurrent syncs overlapping (`serial` false) or taking turns.
fn doctor_on_slow_disk(shim: &Path, spool: &Path, serial: bool) -> Value {
    let out = Command::new(BIN)
        .args(["doctor", "--json", "--fsync-seconds", "0.9", "--spool"])
        .arg(spool)
        .env("LD_PRELOAD", shim)
        .env("SLOW_SYNC_US", "3000")
        .env("SLOW_SYNC_SERIAL", if serial { "1" } else { "0" })
        .output()
        .unwrap();
    json(&out)
}

#[test]
fn parallel_streams_tell_how_the_disk_flushes() {
    let shim = slow_sync_shim();
    let spool = disk_dir("slow");
    let writers = |r: &Value| -> (String, Option<String>) {
        let a = r["advice"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["topic"] == "writers")
            .unwrap();
        (
            a["text"].as_str().unwrap().to_string(),
            a["config"].as_str().map(str::to_string),
        )
    };

    let r = doctor_on_slow_disk(&shim, &spool, false);
    let gain = r["fsync"]["parallel"]["gain"].as_f64().unwrap();
    assert!(gain > 1.5, "overlapping flushes: {:#}", r["fsync"]);
    let (text, config) = writers(&r);
    assert_eq!(config.as_deref(), Some("writers = 2"), "{text}");

    let r = doctor_on_slow_disk(&shim, &spool, true);
    let gain = r["fsync"]["parallel"]["gain"].as_f64().unwrap();
    assert!(gain < 1.3, "flushes in turn: {:#}", r["fsync"]);
    let (text, config) = writers(&r);
    assert!(text.contains("one request at a time"), "{text}");
    assert_eq!(config, None, "already one writer: {text}");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
}
