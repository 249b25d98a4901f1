//! A private Postfix instance for interoperability tests: its own
//! configuration, queue and data directories under the test's directory, its
//! own smtpd on a free loopback port, logging to a file the test reads
//! (`maillog_file` through `postlogd`), started with `postfix -c DIR start`
//! and stopped by process id on drop, so a failing test leaves no Postfix
//! behind. Also: a small pipelining SMTP client that injects messages into
//! that smtpd, and parsers for Postfix's delivery log lines.
//!
//! Must not: touch the system's Postfix (`/etc/postfix`, `/var/spool/postfix`)
//! other than reading its programs.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::server_util::free_port;

/// A directory for one test under target/, removed on drop unless the test
/// is failing (then it keeps Postfix's log, queue and our spool as evidence).
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("mta-postfix")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// True when this process may run a private Postfix (root: Postfix's
/// daemons switch to the `postfix` user, and its data directory is chowned to
/// it). Otherwise says why the test is skipped, as the loop-device spool tests
/// do. `.ci/run` runs as root. A missing Postfix is an error, not a skip.
pub fn can_run_postfix() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() == 0 };
    if !root {
        eprintln!("skipped: a private Postfix instance needs root (as .ci/run has)");
    }
    root
}

/// Where Postfix delivers: our TCP listener or our UNIX socket.
#[derive(Clone, Debug)]
pub enum Next {
    Tcp(String),
    Unix(PathBuf),
}

impl Next {
    /// The nexthop as Postfix's lmtp client writes it.
    pub fn nexthop(&self) -> String {
        match self {
            // Brackets: the address as given, no DNS or MX lookup.
            Next::Tcp(addr) => {
                let (host, port) = addr.rsplit_once(':').unwrap();
                format!("inet:[{host}]:{port}")
            }
            Next::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

/// The domain routed to our server; every test address is in it.
pub const DOMAIN: &str = "example.com";

/// The settings the tests prove, as docs/INTEGRATION.md shows them:
/// mail for `example.com` goes to the `ingest` transport, an `lmtp` client
/// with at most 200 recipients per delivery.
pub fn ingest_main_cf(next: &Next) -> String {
    format!(
        "virtual_mailbox_domains = {DOMAIN}\n\
         virtual_mailbox_maps =\n\
         virtual_transport = ingest:{}\n\
         ingest_destination_recipient_limit = 200\n",
        next.nexthop()
    )
}

/// The master.cf line for the `ingest` transport (no chroot: the UNIX socket
/// and the test's directories are outside Postfix's queue directory).
pub const INGEST_MASTER_CF: &str = "ingest    unix  -       -       n       -       20      lmtp\n";

pub struct Postfix {
    pub dir: PathBuf,
    pub etc: PathBuf,
    pub queue: PathBuf,
    pub log: PathBuf,
    /// Postfix's smtpd on loopback.
    pub smtpd_port: u16,
    master_pid: Option<i32>,
}

impl Postfix {
    /// Writes a fresh instance under `dir` (main.cf gets `main_extra`
    /// appended, master.cf `master_extra`) and starts it; waits until its
    /// smtpd answers.
    pub fn start(dir: &Path, main_extra: &str, master_extra: &str) -> Postfix {
        for prog in ["/usr/sbin/postfix", "/usr/sbin/postqueue"] {
            assert!(
                Path::new(prog).exists(),
                "{prog} is missing: install Debian's postfix package (.ci/run does)"
            );
        }
        let etc = dir.join("etc");
        let queue = dir.join("queue");
        let data = dir.join("data");
        for d in [&etc, &queue, &data] {
            std::fs::create_dir_all(d).unwrap();
        }
        // Postfix's daemons run as `postfix` and keep their caches here.
        chown(&data, "postfix");
        let log = dir.join("maillog");
        let smtpd_port = free_port();
        let main_cf = format!(
            "# A private instance for one test (tests/mta_postfix_util).\n\
             compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             myhostname = mta.test\n\
             mydomain = mta.test\n\
             myorigin = $myhostname\n\
             mydestination =\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             smtputf8_enable = no\n\
             biff = no\n\
             maillog_file = {log}\n\
             maillog_file_prefixes = {dir}\n\
             default_transport = error:5.1.2 only {DOMAIN} is routed in this test\n\
             relay_transport = $default_transport\n\
             # Retry deferred mail within seconds, not minutes.\n\
             queue_run_delay = 1s\n\
             minimal_backoff_time = 1s\n\
             maximal_backoff_time = 2s\n\
             {main_extra}",
            queue = queue.display(),
            data = data.display(),
            log = log.display(),
            dir = dir.display(),
        );
        std::fs::write(etc.join("main.cf"), main_cf).unwrap();
        // Debian's master.cf, trimmed to what delivery needs, every service
        // without chroot (column 5 = n).
        let master_cf = format!(
            "127.0.0.1:{smtpd_port} inet n - n - - smtpd\n\
             pickup    unix  n       -       n       60      1       pickup\n\
             cleanup   unix  n       -       n       -       0       cleanup\n\
             qmgr      unix  n       -       n       300     1       qmgr\n\
             rewrite   unix  -       -       n       -       -       trivial-rewrite\n\
             bounce    unix  -       -       n       -       0       bounce\n\
             defer     unix  -       -       n       -       0       bounce\n\
             trace     unix  -       -       n       -       0       bounce\n\
             verify    unix  -       -       n       -       1       verify\n\
             flush     unix  n       -       n       1000?   0       flush\n\
             proxymap  unix  -       -       n       -       -       proxymap\n\
             showq     unix  n       -       n       -       -       showq\n\
             error     unix  -       -       n       -       -       error\n\
             retry     unix  -       -       n       -       -       error\n\
             discard   unix  -       -       n       -       -       discard\n\
             lmtp      unix  -       -       n       -       -       lmtp\n\
             anvil     unix  -       -       n       -       1       anvil\n\
             scache    unix  -       -       n       -       1       scache\n\
             postlog   unix-dgram n  -       n       -       1       postlogd\n\
             {master_extra}"
        );
        std::fs::write(etc.join("master.cf"), master_cf).unwrap();
        let mut pf = Postfix {
            dir: dir.to_owned(),
            etc,
            queue,
            log,
            smtpd_port,
            master_pid: None,
        };
        let out = pf.postfix(&["start"]);
        assert!(
            out.status.success(),
            "postfix start failed: {}{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            pf.log_text()
        );
        let pid_file = pf.queue.join("pid/master.pid");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                pf.master_pid = Some(pid);
                if TcpStream::connect(("127.0.0.1", smtpd_port)).is_ok() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "postfix did not start listening on 127.0.0.1:{smtpd_port}\nlog:\n{}",
                pf.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pf
    }

    /// Runs `postfix -c ETC ARGS`.
    pub fn postfix(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(&self.etc)
            .args(args)
            .output()
            .expect("run postfix")
    }

    /// `postqueue -f`: retry every deferred message now.
    pub fn flush(&self) {
        let out = Command::new("/usr/sbin/postqueue")
            .arg("-c")
            .arg(&self.etc)
            .arg("-f")
            .output()
            .expect("run postqueue");
        assert!(
            out.status.success(),
            "postqueue -f: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `postqueue -j`: one JSON object per queued message.
    pub fn queue(&self) -> Vec<serde_json::Value> {
        let out = Command::new("/usr/sbin/postqueue")
            .arg("-c")
            .arg(&self.etc)
            .arg("-j")
            .output()
            .expect("run postqueue");
        assert!(
            out.status.success(),
            "postqueue -j: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("postqueue -j prints JSON lines"))
            .collect()
    }

    /// One line per queued message: id, queue, recipients, first reason.
    pub fn queue_summary(&self) -> String {
        let mut out = String::new();
        for m in self.queue() {
            let rcpts = m["recipients"].as_array().cloned().unwrap_or_default();
            out.push_str(&format!(
                "\n  {} in {}: {} recipients, e.g. {}",
                m["queue_id"],
                m["queue_name"],
                rcpts.len(),
                rcpts.first().map(|r| r.to_string()).unwrap_or_default()
            ));
        }
        out
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The delivery agents' lines with `status=STATUS`.
    pub fn deliveries(&self, status: &str) -> Vec<Delivery> {
        let needle = format!(", status={status} (");
        self.log_text()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(|l| Delivery::parse(l).unwrap_or_else(|| panic!("unparsed log line: {l}")))
            .collect()
    }

    /// Waits until `done(self)` holds; on timeout panics with Postfix's log
    /// and queue.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut(&Postfix) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() > deadline {
                // The log follows from the drop.
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nqueue: {}",
                    self.queue_summary()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for an empty queue: every message delivered or bounced.
    pub fn wait_drained(&self, timeout: Duration) {
        self.wait_for("Postfix's queue to drain", timeout, |p| {
            p.queue().is_empty()
        });
    }

    /// Waits for an empty queue, running `postqueue -f` every
    /// `flush_every`, as an operator would. With this instance's 1 s
    /// backoffs Postfix retries a partly deferred message through its
    /// incoming queue; when the queue file is still locked by the delivery
    /// that just ended, qmgr logs "skipped, still being delivered" and looks
    /// at the message again only when something wakes it (its 300 s wakeup
    /// in master.cf). With Postfix's default backoff the message goes to the
    /// deferred queue instead.
    pub fn wait_drained_flushing(&self, timeout: Duration, flush_every: Duration) {
        let mut last = Instant::now();
        self.wait_for("Postfix's queue to drain", timeout, |p| {
            if last.elapsed() >= flush_every {
                p.flush();
                last = Instant::now();
            }
            p.queue().is_empty()
        });
    }

    /// `postfix stop`, bounded; the drop kills whatever is left.
    pub fn stop(&mut self) {
        let out = self.postfix(&["stop"]);
        assert!(
            out.status.success(),
            "postfix stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(pid) = self.master_pid {
            let deadline = Instant::now() + Duration::from_secs(20);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(!alive(pid), "postfix master {pid} did not stop");
            self.master_pid = None;
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let Some(master) = self.master_pid.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!("Postfix log ({}):\n{}", self.log.display(), self.log_text());
        }
        // By process id: the master and every process it started.
        let mut pids = children_of(master);
        pids.push(master);
        for pid in pids {
            // SAFETY: kill(2) on processes this instance started (the master
            // read from its own pid file, and that master's children).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(master) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn alive(pid: i32) -> bool {
    // A zombie (Postfix's master is not our child; init reaps it) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn chown(path: &Path, user: &str) {
    let out = Command::new("chown")
        .arg(user)
        .arg(path)
        .output()
        .expect("run chown");
    assert!(
        out.status.success(),
        "chown {user} {}: {} (these tests run as root, as .ci/run does)",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One `status=...` line of a Postfix delivery agent.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Postfix's own queue id.
    pub postfix_id: String,
    pub to: String,
    pub relay: String,
    pub status: String,
    /// The server's reply in parentheses (or Postfix's reason).
    pub reply: String,
}

impl Delivery {
    /// Parses `... postfix/ingest[9]: 1A2B3C: to=<a@b>, relay=..., ...,
    /// status=sent (250 2.0.0 <a@b> 01M... Saved)`.
    pub fn parse(line: &str) -> Option<Delivery> {
        let (head, rest) = line.split_once(": to=<")?;
        let postfix_id = head.rsplit_once(": ")?.1.to_string();
        let (to, rest) = rest.split_once('>')?;
        let relay = rest
            .split_once("relay=")
            .and_then(|(_, r)| r.split_once(", "))
            .map(|(r, _)| r.to_string())
            .unwrap_or_default();
        let (_, status_rest) = rest.split_once(", status=")?;
        let (status, reply) = status_rest.split_once(" (")?;
        Some(Delivery {
            postfix_id,
            to: to.to_string(),
            relay,
            status: status.to_string(),
            reply: reply.strip_suffix(')')?.to_string(),
        })
    }

    /// Our queue id, from `250 2.0.0 <addr> QUEUEID Saved`.
    pub fn our_queue_id(&self) -> Option<&str> {
        let rest = self
            .reply
            .strip_prefix(&format!("250 2.0.0 <{}> ", self.to))?;
        rest.strip_suffix(" Saved")
    }
}

/// A message to inject: its Message-ID names it, its recipients are its own.
#[derive(Clone, Debug)]
pub struct Mail {
    pub message_id: String,
    pub from: String,
    pub rcpts: Vec<String>,
    pub body: Vec<u8>,
}

impl Mail {
    /// Message `n` of test `tag` with `rcpts` recipients of its own
    /// (`tag-n-k@example.com`), so each (message, recipient) pair is one
    /// address, and a body of about `len` bytes.
    pub fn numbered(tag: &str, n: usize, rcpts: usize, len: usize) -> Mail {
        let message_id = format!("<{tag}.{n}@inject.test>");
        let mut body = format!(
            "From: sender@{DOMAIN}\r\nTo: undisclosed-recipients:;\r\nSubject: {tag} message {n}\r\nMessage-ID: {message_id}\r\n\r\n"
        )
        .into_bytes();
        let mut line = 0;
        while body.len() < len {
            // Some lines start with a dot: the SMTP and LMTP legs both stuff it.
            let lead = if line % 5 == 0 { "." } else { "" };
            body.extend_from_slice(
                format!("{lead}{tag} {n} line {line} {}\r\n", "x".repeat(60)).as_bytes(),
            );
            line += 1;
        }
        Mail {
            message_id,
            from: format!("sender@{DOMAIN}"),
            rcpts: (0..rcpts)
                .map(|k| format!("{tag}-{n}-{k}@{DOMAIN}"))
                .collect(),
            body,
        }
    }
}

/// The Message-ID header of a stored body.
pub fn message_id_of(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let headers = text.split("\r\n\r\n").next()?;
    headers.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("message-id")
            .then(|| value.trim().to_string())
    })
}

/// Injects `mails` into Postfix's smtpd over `connections` parallel sessions,
/// each pipelining MAIL, RCPT... and DATA (Postfix offers PIPELINING).
/// Panics on any reply other than the expected one.
pub fn inject(port: u16, mails: &[Mail], connections: usize) {
    let chunks: Vec<Vec<Mail>> = (0..connections)
        .map(|c| mails.iter().skip(c).step_by(connections).cloned().collect())
        .collect();
    let threads: Vec<_> = chunks
        .into_iter()
        .map(|chunk| std::thread::spawn(move || smtp_session(port, &chunk)))
        .collect();
    for t in threads {
        t.join().expect("injecting thread");
    }
}

fn smtp_session(port: u16, mails: &[Mail]) {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to Postfix's smtpd");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    expect(&mut r, "220", "greeting");
    w.write_all(b"EHLO inject.test\r\n").unwrap();
    expect(&mut r, "250", "EHLO");
    for m in mails {
        let mut cmds = format!("MAIL FROM:<{}>\r\n", m.from);
        for rc in &m.rcpts {
            cmds.push_str(&format!("RCPT TO:<{rc}>\r\n"));
        }
        cmds.push_str("DATA\r\n");
        w.write_all(cmds.as_bytes()).unwrap();
        expect(&mut r, "250", "MAIL");
        for rc in &m.rcpts {
            expect(&mut r, "250", &format!("RCPT TO:<{rc}>"));
        }
        expect(&mut r, "354", "DATA");
        let mut data = Vec::with_capacity(m.body.len() + 64);
        for line in m.body.split_inclusive(|&c| c == b'\n') {
            if line.first() == Some(&b'.') {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        data.extend_from_slice(b".\r\n");
        w.write_all(&data).unwrap();
        expect(&mut r, "250", &format!("end of data of {}", m.message_id));
    }
    w.write_all(b"QUIT\r\n").unwrap();
    expect(&mut r, "221", "QUIT");
}

/// Reads one (possibly multi-line) reply; panics unless it starts with `code`.
fn expect(r: &mut BufReader<TcpStream>, code: &str, what: &str) {
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{what}: reading Postfix's reply: {e}"));
        assert!(n > 0, "{what}: Postfix closed the connection");
        assert!(
            line.starts_with(code),
            "{what}: Postfix answered {line:?}, expected {code}"
        );
        if line.as_bytes().get(3) != Some(&b'-') {
            return;
        }
    }
}

/// What one client connection through a [`Proxy`] sent, and how it ended.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    /// Every byte the client (Postfix) sent.
    pub from_client: Vec<u8>,
    /// The client closed its side (EOF).
    pub client_closed: bool,
}

impl Transcript {
    /// The commands the client sent, in order, without message data: the
    /// first word of each command line, upper case (`LHLO`, `MAIL`, `RCPT`,
    /// `DATA`, `RSET`, `QUIT`...); the end of each message's data is `.`.
    pub fn commands(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut in_data = false;
        for line in self.from_client.split(|&c| c == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if in_data {
                if line == b"." {
                    in_data = false;
                    out.push(".".to_string());
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let word = String::from_utf8_lossy(line)
                .split([' ', ':'])
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            in_data = word == "DATA";
            out.push(word);
        }
        out
    }
}

impl Transcript {
    /// The client's `MAIL FROM` lines, as sent.
    pub fn mail_lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.from_client)
            .split("\r\n")
            .filter(|l| {
                l.get(..10)
                    .is_some_and(|w| w.eq_ignore_ascii_case("MAIL FROM:"))
            })
            .map(str::to_string)
            .collect()
    }
}

/// A TCP proxy on loopback that records what clients send: Postfix talks to
/// it as to our server, and a test reads what Postfix really did (caching,
/// RSET, QUIT or not). Threads end when their sockets close.
pub struct Proxy {
    pub port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::Mutex<Transcript>>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: String) -> Proxy {
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Transcript>>>>> = Arc::default();
        let all = conns.clone();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let stopped = stop.clone();
        // Ends when the proxy is dropped; the pumps when their sockets close.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let t = Arc::new(Mutex::new(Transcript::default()));
                all.lock().unwrap().push(t.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, Some(t)));
                std::thread::spawn(move || pump(s2, c2, None));
            }
        });
        Proxy { port, conns, stop }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn transcripts(&self) -> Vec<Transcript> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.lock().unwrap().clone())
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` to `to` until EOF or an error; records into `t` when given
/// (the client's direction).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    t: Option<std::sync::Arc<std::sync::Mutex<Transcript>>>,
) {
    use std::io::Read;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if let Some(t) = &t {
                    t.lock().unwrap().client_closed = true;
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                if let Some(t) = &t {
                    t.lock().unwrap().from_client.extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
