//! Following, retention and the size cap: consumers read every committed
//! message once and resume; segments they passed are removed; a spool at its
//! cap answers StorageFull until retention makes room.

mod spool_util;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use lmtp_ingest::envelope::{CommitOutcome, Message, QueueId};
use lmtp_ingest::spool::follow::{Follower, Start};
use lmtp_ingest::spool::fs::RealStorage;
use lmtp_ingest::spool::{Spool, reader, retention};
use spool_util::{config, message, spool_dir};

fn commit_n(spool: &Spool, a: u64, n: u32, len: usize) -> Vec<(QueueId, Message)> {
    let mut p = spool.producer(None);
    (0..n)
        .map(|i| {
            let m = message(a, 0, i, len);
            let CommitOutcome::Committed(id) = p.commit(m.clone()) else {
                panic!()
            };
            (id, m)
        })
        .collect()
}

#[test]
fn size_cap_gives_storage_full_until_a_consumer_passes_and_retention_frees() {
    let dir = spool_dir("cap");
    let mut cfg = config(&dir);
    cfg.segment_bytes = 64 << 10;
    cfg.spool_bytes_max = Some(4 * (64 << 10));
    cfg.maintenance_interval = Duration::from_millis(20);
    let (spool, _) = Spool::open(cfg).unwrap();
    let mut f = Follower::open(&dir, "archiver", Start::Beginning).unwrap();
    let mut p = spool.producer(None);
    let mut committed = Vec::new();
    let mut n = 0;
    loop {
        assert!(n < 1000, "the cap never applied");
        let m = message(51, 0, n, 8 << 10);
        match p.commit(m.clone()) {
            CommitOutcome::Committed(id) => committed.push((id, m)),
            CommitOutcome::StorageFull => break,
            CommitOutcome::Failed => panic!("cap must give StorageFull"),
        }
        n += 1;
    }
    assert!(spool.is_storage_full());
    let bytes: u64 = reader::list_segments(&dir)
        .unwrap()
        .iter()
        .map(|s| s.len)
        .sum();
    assert!(bytes <= 4 * (64 << 10), "spool grew past its cap: {bytes}");
    // Nothing is removed while the consumer has not read it.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(reader::list_segments(&dir).unwrap().len(), 4);

    let got = f.poll(usize::MAX).unwrap();
    assert_eq!(got.len(), committed.len());
    for (r, (id, m)) in got.iter().zip(&committed) {
        assert_eq!(r.header.queue_id, *id);
        assert_eq!(&r.message(), m);
    }
    f.save().unwrap();
    let t = Instant::now();
    while spool.is_storage_full() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "retention never made room"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        p.commit(message(51, 1, 0, 8 << 10)),
        CommitOutcome::Committed(_)
    ));
    assert!(spool.stats().segments_removed >= 3);
    assert_eq!(f.poll(10).unwrap().len(), 1);
    spool.shutdown();
}

#[test]
fn age_retention_applies_only_without_consumers_and_keeps_the_last_segment() {
    let dir = spool_dir("age");
    let mut cfg = config(&dir);
    cfg.segment_bytes = 16 << 10;
    let (spool, _) = Spool::open(cfg).unwrap();
    commit_n(&spool, 52, 20, 4000);
    spool.shutdown();
    let before = reader::list_segments(&dir).unwrap();
    assert!(before.len() > 3);
    let later = SystemTime::now() + Duration::from_secs(3600);
    let age = Some(Duration::from_secs(60));
    let r = retention::run(&dir, &RealStorage, age, SystemTime::now()).unwrap();
    assert!(r.removed.is_empty(), "nothing is old yet");
    // A registered consumer at the start holds everything.
    let f = Follower::open(&dir, "slow", Start::Beginning).unwrap();
    let r = retention::run(&dir, &RealStorage, age, later).unwrap();
    assert!(r.removed.is_empty());
    drop(f);
    std::fs::remove_file(dir.join("consumers/slow.json")).unwrap();
    let r = retention::run(&dir, &RealStorage, age, later).unwrap();
    assert_eq!(r.removed.len(), before.len() - 1);
    let after = reader::list_segments(&dir).unwrap();
    assert_eq!(after, vec![before.last().unwrap().clone()]);
    // The stream's sequence survives: new ids still sort after the old ones.
    let (spool, report) = Spool::open(config(&dir)).unwrap();
    assert!(report.records > 0);
    let new = commit_n(&spool, 52, 1, 10);
    spool.shutdown();
    let (records, _) = reader::read_all(&dir).unwrap();
    assert!(records.iter().all(|r| r.header.queue_id <= new[0].0));
}

fn follow_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lmtp-ingest"));
    c.arg("spool")
        .arg("--spool")
        .arg(dir)
        .arg("follow")
        .args(args);
    c
}

fn lines(out: &[u8]) -> Vec<serde_json::Value> {
    out.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

#[test]
fn follow_streams_each_message_once_and_resumes() {
    let dir = spool_dir("follow-cli");
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    let first = commit_n(&spool, 53, 5, 700);
    let run = |args: &[&str]| follow_cmd(&dir, args).output().unwrap();
    let o = run(&["--consumer", "a", "--exit-when-idle"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = lines(&o.stdout);
    assert_eq!(v.len(), 5);
    assert_eq!(v[0]["id"], first[0].0.to_string());
    assert_eq!(v[1]["recipients"][1], "user1+box1@example.org");
    assert_eq!(v[4]["size"], 700);
    assert!(
        v[4]["body_base64"]
            .as_str()
            .unwrap()
            .starts_with("U3ViamVjdDog")
    ); // "Subject: "
    // Resumes: nothing twice.
    let o = run(&["--consumer", "a", "--exit-when-idle"]);
    assert_eq!(lines(&o.stdout).len(), 0);
    // A second consumer starting at the end sees only new mail.
    let o = run(&["--consumer", "b", "--from", "end", "--exit-when-idle"]);
    assert_eq!(lines(&o.stdout).len(), 0);
    let more = commit_n(&spool, 54, 3, 100);
    for c in ["a", "b"] {
        let o = run(&["--consumer", c, "--exit-when-idle"]);
        let v = lines(&o.stdout);
        let ids: Vec<_> = v
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<_> = more.iter().map(|(id, _)| id.to_string()).collect();
        assert_eq!(ids, want, "consumer {c}");
    }

    // Live: a follower started first sees messages as they are committed.
    let mut child = follow_cmd(&dir, &["--consumer", "a", "--limit", "3", "--poll-ms", "5"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let live = commit_n(&spool, 55, 3, 100);
    let out = child.stdout.take().unwrap();
    let got: Vec<String> = BufReader::new(out).lines().map(|l| l.unwrap()).collect();
    assert!(child.wait().unwrap().success());
    assert_eq!(got.len(), 3);
    let v: serde_json::Value = serde_json::from_str(&got[2]).unwrap();
    assert_eq!(v["id"], live[2].0.to_string());
    spool.shutdown();
}

#[test]
fn follow_exec_saves_only_after_success() {
    let dir = spool_dir("follow-exec");
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    let msgs = commit_n(&spool, 56, 4, 300);
    spool.shutdown();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Fails on the third message the first time.
    let script = format!(
        "n=$(ls {o} | wc -l); if [ \"$n\" = 2 ] && [ ! -e {o}/../failed ]; then touch {o}/../failed; exit 3; fi; cat > {o}/$LMTP_QUEUE_ID",
        o = out.display()
    );
    let o = follow_cmd(
        &dir,
        &["--consumer", "x", "--exec", &script, "--exit-when-idle"],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("offered again"));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
    let o = follow_cmd(
        &dir,
        &["--consumer", "x", "--exec", &script, "--exit-when-idle"],
    )
    .output()
    .unwrap();
    assert!(o.status.success());
    for (id, m) in &msgs {
        assert_eq!(std::fs::read(out.join(id.to_string())).unwrap(), m.body);
    }
}

#[test]
fn a_live_follower_sees_every_commit_once_across_writers_and_rotations() {
    let dir = spool_dir("follow-live");
    let mut cfg = config(&dir);
    cfg.writers = 2;
    cfg.segment_bytes = 32 << 10; // many rotations
    let (spool, _) = Spool::open(cfg).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let dir = dir.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut f = Follower::open(&dir, "live", Start::Beginning).unwrap();
            let mut seen = Vec::new();
            loop {
                let done = stop.load(std::sync::atomic::Ordering::Acquire);
                let batch = f.poll(64).unwrap();
                if batch.is_empty() && done {
                    break;
                }
                seen.extend(batch.into_iter().map(|r| (r.header.queue_id, r.message())));
                f.save().unwrap();
            }
            seen
        })
    };
    let mut producers = Vec::new();
    for t in 0..4u32 {
        let p = spool.producer(None);
        producers.push(std::thread::spawn(move || {
            let mut ids = Vec::new();
            let mut next = 0u32;
            while ids.len() < 150 {
                while next < 150 && p.in_flight() < 4 {
                    let m = message(57, t, next, 200 + (next as usize * 61) % 3000);
                    p.try_submit(next as u64, m, SystemTime::now()).unwrap();
                    next += 1;
                }
                let (n, o) = p.wait_completion(Duration::from_secs(10)).unwrap();
                let CommitOutcome::Committed(id) = o else {
                    panic!("{o:?}")
                };
                ids.push((id, t, n as u32));
            }
            ids
        }));
    }
    let committed: Vec<(QueueId, u32, u32)> = producers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let seen = follower.join().unwrap();
    assert_eq!(seen.len(), committed.len(), "each commit seen exactly once");
    let seen: std::collections::HashMap<QueueId, Message> = seen.into_iter().collect();
    for (id, t, n) in committed {
        let m = seen.get(&id).unwrap_or_else(|| panic!("{id} never seen"));
        assert_eq!(*m, message(57, t, n, 200 + (n as usize * 61) % 3000));
    }
    spool.shutdown();
}

/// A spool of `n` messages of 1 MiB: more than a pipe buffer (64 KiB), so a
/// hook that stops reading makes the follower's write fail with EPIPE.
fn big_spool(name: &str, a: u64, n: u32) -> (std::path::PathBuf, Vec<(QueueId, Message)>) {
    let dir = spool_dir(name);
    let mut cfg = config(&dir);
    cfg.segment_bytes = 4 << 20;
    let (spool, _) = Spool::open(cfg).unwrap();
    let msgs = commit_n(&spool, a, n, 1 << 20);
    spool.shutdown();
    (dir, msgs)
}

/// True when consumer `name` has read everything committed (its saved
/// position is at every stream's watermark).
fn caught_up(dir: &Path, name: &str) -> bool {
    let mut f = Follower::open(dir, name, Start::Beginning).unwrap();
    f.poll(usize::MAX).unwrap().is_empty()
}

#[test]
fn follow_exec_that_stops_reading_is_judged_by_its_exit_status() {
    let (dir, msgs) = big_spool("follow-exec-epipe", 58, 4);
    let want: Vec<String> = msgs.iter().map(|(id, _)| id.to_string()).collect();
    let run = |consumer: &str, cmd: &str| {
        follow_cmd(
            &dir,
            &["--consumer", consumer, "--exec", cmd, "--exit-when-idle"],
        )
        .output()
        .unwrap()
    };
    // Reads nothing, reads 10 bytes, reads the first line: each exits 0, so
    // each message counts as handled. (Before the fix: killed by SIGPIPE,
    // exit 141, nothing saved.)
    for (consumer, reads) in [
        ("none", ""),
        ("ten", "head -c 10 >/dev/null; "),
        ("line", "head -n 1 >/dev/null; "),
    ] {
        let log = dir.join(format!("{consumer}.log"));
        let cmd = format!("{reads}echo $LMTP_QUEUE_ID >> {}", log.display());
        let o = run(consumer, &cmd);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{consumer}: {:?} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        let got = std::fs::read_to_string(&log).unwrap();
        assert_eq!(got.lines().collect::<Vec<_>>(), want, "{consumer}");
        assert!(caught_up(&dir, consumer), "{consumer}: position not saved");
        // Resumes after the last one: nothing is offered twice.
        let o = run(consumer, &cmd);
        assert!(o.status.success());
        assert_eq!(std::fs::read_to_string(&log).unwrap(), got, "{consumer}");
    }
    let o = run("true", "true");
    assert_eq!(o.status.code(), Some(0), "{:?}", o.status);
    assert!(caught_up(&dir, "true"));

    // A command that stops reading and fails keeps the failure behaviour:
    // exit 1, the message offered again, the position where it was.
    let o = run("fails", "head -c 10 >/dev/null; exit 3");
    assert_eq!(o.status.code(), Some(1), "{:?}", o.status);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("offered again"), "{err}");
    assert!(err.contains(&want[0]), "{err}");
    let o = run("false", "false");
    assert_eq!(o.status.code(), Some(1), "{:?}", o.status);
    for consumer in ["fails", "false"] {
        let o = follow_cmd(&dir, &["--consumer", consumer, "--exit-when-idle"])
            .output()
            .unwrap();
        assert!(o.status.success());
        let ids: Vec<String> = lines(&o.stdout)
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, want, "{consumer}: the failed message was skipped");
    }
}

#[test]
fn follow_exec_commands_start_with_sigpipe_at_its_default() {
    // The follower ignores SIGPIPE; what it runs must not inherit that (a
    // hook's own `producer | head` would then spin on EPIPE).
    let (dir, _) = big_spool("follow-exec-sigdfl", 59, 1);
    let status = dir.join("status");
    let cmd = format!("cat /proc/$$/status > {}", status.display());
    let o = follow_cmd(
        &dir,
        &["--consumer", "s", "--exec", &cmd, "--exit-when-idle"],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&status).unwrap();
    let ignored = text
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        ignored & (1 << (libc::SIGPIPE - 1)),
        0,
        "SigIgn {ignored:x}"
    );
}

#[test]
fn follow_to_a_closed_stdout_stops_and_saves_nothing_unwritten() {
    let (dir, msgs) = big_spool("follow-closed-stdout", 60, 4);
    let mut child = follow_cmd(&dir, &["--consumer", "h", "--exit-when-idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line (`| head -n 1`), then close the pipe.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    drop(out);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{:?}", o.status);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stdout was closed"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["id"], msgs[0].0.to_string());
    // The batch being written was not saved: all of it comes again.
    let o = follow_cmd(&dir, &["--consumer", "h", "--exit-when-idle"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(lines(&o.stdout).len(), msgs.len());
}

/// Waits until consumer `name`'s lock file names `pid`.
fn wait_locked(dir: &Path, name: &str, pid: u32) {
    let path = dir.join("consumers").join(format!("{name}.lock"));
    let want = format!("pid {pid}");
    let t = Instant::now();
    while std::fs::read_to_string(&path).map_or(true, |s| s.trim() != want) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "follower {pid} never took {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn one_follower_per_consumer_name_the_second_is_refused_with_the_holder() {
    let dir = spool_dir("follow-lock");
    // A server running throughout: followers lock their consumer, not the
    // spool.
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    let msgs = commit_n(&spool, 61, 5, 500);
    let want: Vec<String> = msgs.iter().map(|(id, _)| id.to_string()).collect();
    let ids = |out: &[u8]| -> Vec<String> {
        lines(out)
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect()
    };
    // The first one waits for more (a --limit it will not reach).
    let mut first = follow_cmd(&dir, &["--consumer", "dup", "--limit", "1000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_locked(&dir, "dup", first.id());
    let o = follow_cmd(&dir, &["--consumer", "dup", "--exit-when-idle"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{:?}", o.status);
    assert!(o.stdout.is_empty(), "the second one streamed messages");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("consumer dup"), "{err}");
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    assert!(err.contains("one follower per consumer"), "{err}");
    // The same through the API, in this process.
    let e = Follower::open(&dir, "dup", Start::Beginning).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy, "{e}");

    // Another name runs beside it.
    let o = follow_cmd(&dir, &["--consumer", "other", "--exit-when-idle"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ids(&o.stdout), want);

    // Retention reads the consumers' positions: the lock files are not
    // consumers (it would fail on them), and the holder's position keeps
    // what it has not read.
    retention::run(&dir, &RealStorage, None, SystemTime::now()).unwrap();

    // Once the holder is gone, the name is free again.
    first.kill().unwrap();
    let o = first.wait_with_output().unwrap();
    assert_eq!(ids(&o.stdout), want);
    let o = follow_cmd(&dir, &["--consumer", "dup", "--exit-when-idle"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The first one may have been killed before it saved.
    assert!(ids(&o.stdout).len() <= want.len());
    let f = Follower::open(&dir, "dup", Start::Beginning).unwrap();
    drop(f);
    Follower::open(&dir, "dup", Start::Beginning).unwrap();
    spool.shutdown();
}

#[test]
fn a_follower_that_cannot_write_its_consumer_file_names_the_path_and_the_fix() {
    let dir = spool_dir("follow-perm");
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    commit_n(&spool, 62, 2, 100);
    spool.shutdown();
    let cdir = dir.join("consumers");
    std::fs::create_dir_all(&cdir).unwrap();
    let mut cmd = follow_cmd(&dir, &["--consumer", "nob", "--exit-when-idle"]);
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // Root writes anywhere: run as nobody in a directory owned by root.
        std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cdir, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let o = cmd.output().unwrap();
    if !root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cdir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert_eq!(o.status.code(), Some(2), "{:?}", o.status);
    assert!(o.stdout.is_empty());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("consumer nob"), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains(&cdir.display().to_string()), "{err}");
    assert!(err.contains("run it as the spool's owner"), "{err}");
    assert!(err.contains("permissions"), "{err}");
}

/// SIGTERM (`systemctl stop`) while a command runs: the follower waits for
/// it, saves its position and exits 0, so the message it handled is not
/// handed over again (it was before: killed at once, the command orphaned,
/// its message offered again).
#[test]
fn sigterm_lets_the_running_command_finish_and_saves_its_position() {
    let dir = spool_dir("follow-sigterm");
    let (spool, _) = Spool::open(config(&dir)).unwrap();
    let ids = commit_n(&spool, 63, 6, 200);
    spool.shutdown();
    let log = dir.join("handled");
    let hook = format!("sleep 0.3; echo $LMTP_QUEUE_ID >> {}", log.display());
    let child = follow_cmd(&dir, &["--consumer", "svc", "--exec", &hook])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: kill on the pid of a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("stopped by a signal"));
    let handled = std::fs::read_to_string(&log).unwrap();
    let first = handled.lines().count();
    assert!((1..6).contains(&first), "{handled}");
    // The next run starts after the last handled message: no repeats.
    let o = follow_cmd(
        &dir,
        &["--consumer", "svc", "--exit-when-idle", "--exec", &hook],
    )
    .output()
    .unwrap();
    assert!(o.status.success());
    let all: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let want: Vec<String> = ids.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(all, want, "each message handled once, in order");
}
