//! Starts the real `lmtp-ingest serve` binary for socket tests: its own spool
//! under target/ (a real disk), port 0 on loopback (the bound port is read from
//! the start-up banner), a UNIX socket beside the spool, and a kill on drop so
//! no test leaves a server behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_lmtp-ingest");

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub spool: PathBuf,
    pub socket: PathBuf,
    /// Everything the server logged so far (filled by a reader thread).
    log: mpsc::Receiver<String>,
    /// `dir` was made for this server alone: removed on drop (unless the
    /// test is failing). `start` sets it; callers of `start_in` may.
    pub owns_dir: bool,
    pub log_lines: Vec<String>,
}

/// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then
/// released), for a peer (Postfix, Exim) that must be told its port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A fresh directory under target/ for one test.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("server-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Server {
    /// Starts a server with the given extra flags; waits for its banner.
    pub fn start(name: &str, io: &str, extra: &[&str]) -> Server {
        let mut s = Server::start_in(&test_dir(name), io, extra);
        s.owns_dir = true;
        s
    }

    /// Starts a server on an existing directory (its spool is reused).
    pub fn start_in(dir: &Path, io: &str, extra: &[&str]) -> Server {
        let spool = dir.join("spool");
        let socket = dir.join("lmtp.sock");
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--spool")
            .arg(&spool)
            .args(["--io", io, "--hostname", "mx.test"])
            // Small segments: every server a test starts preallocates one
            // and prepares the next; 64 MiB each would fill a small disk.
            .args(["--segment-bytes", "1048576"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lmtp-ingest");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            port: 0,
            dir: dir.to_owned(),
            spool,
            socket,
            log: rx,
            log_lines: Vec::new(),
            owns_dir: false,
        };
        let banner = server
            .wait_log("lmtp-ingest ready", Duration::from_secs(20))
            .unwrap_or_else(|| panic!("server did not start: {:#?}", server.log_lines));
        let at = banner
            .find("127.0.0.1:")
            .expect("banner names the TCP address")
            + 10;
        let digits: String = banner[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        server.port = digits.parse().unwrap();
        server
    }

    /// Waits until a log line contains `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        if let Some(l) = self.log_lines.iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.log_lines.push(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// The metrics endpoint's `IP:PORT`, from its start-up log line (the
    /// server must have been started with `[metrics] listen`).
    pub fn metrics_addr(&mut self) -> String {
        let line = self
            .wait_log("metrics endpoint listening", Duration::from_secs(10))
            .expect("the metrics endpoint's log line");
        let at = line.find("http://").unwrap() + 7;
        line[at..].split('/').next().unwrap().to_string()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGTERM, then waits (bounded) for a clean exit; returns the status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.log.try_recv() {
                    self.log_lines.push(l);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Keep the evidence when the test failed.
        if self.owns_dir && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `lmtp-ingest spool ARGS --spool DIR`; returns (status, stdout).
pub fn spool_cmd(spool: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("spool")
        .args(args)
        .arg("--spool")
        .arg(spool)
        .output()
        .expect("run lmtp-ingest spool");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `spool verify --json`, parsed.
pub fn verify(spool: &Path) -> serde_json::Value {
    let (code, out) = spool_cmd(spool, &["verify", "--json"]);
    assert_eq!(code, 0, "spool verify failed: {out}");
    serde_json::from_str(&out).expect("verify --json prints JSON")
}

/// Runs a Python script from tests/python with arguments; panics with its
/// output unless it exits 0. Returns stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3 is installed (.ci/run installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `GET path` over HTTP/1.1; returns (status line, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Every sample of the metrics endpoint at `addr`, by name with labels.
pub fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse::<f64>().unwrap())
        })
        .collect()
}

/// Both backends, or the one named in LMTP_TEST_IO (epoll, uring or auto).
pub fn backends() -> Vec<&'static str> {
    match std::env::var("LMTP_TEST_IO").as_deref() {
        Ok("epoll") => vec!["epoll"],
        Ok("uring") => vec!["uring"],
        Ok("auto") => vec!["auto"],
        _ => vec!["epoll", "uring"],
    }
}

/// A small lock-step LMTP client for tests (the way Exim's lmtp transport
/// talks): one command, one reply; after the data, one reply per recipient.
pub struct Client<S: std::io::Read + std::io::Write> {
    r: BufReader<S>,
}

impl Client<std::net::TcpStream> {
    pub fn tcp(addr: &str) -> std::io::Result<Self> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Client::greet(s)
    }
}

impl<S: std::io::Read + std::io::Write> Client<S> {
    pub fn greet(s: S) -> std::io::Result<Self> {
        let mut c = Client {
            r: BufReader::new(s),
        };
        let g = c.reply()?;
        if !g.starts_with("220 ") {
            return Err(std::io::Error::other(format!("greeting: {g}")));
        }
        Ok(c)
    }

    /// Reads one reply; returns its last line.
    pub fn reply(&mut self) -> std::io::Result<String> {
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(line.trim_end().to_string());
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.r.get_mut().write_all(bytes)
    }

    pub fn cmd(&mut self, line: &str, want: &str) -> std::io::Result<String> {
        self.send(format!("{line}\r\n").as_bytes())?;
        let r = self.reply()?;
        if !r.starts_with(want) {
            return Err(std::io::Error::other(format!("{line}: {r}")));
        }
        Ok(r)
    }

    /// One transaction; returns the queue id of the message, taken from
    /// the per-recipient replies (which must all be 250 and agree).
    pub fn deliver(
        &mut self,
        from: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> std::io::Result<String> {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250 ")?;
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), "250 ")?;
        }
        self.cmd("DATA", "354 ")?;
        let mut data = Vec::with_capacity(body.len() + 8);
        for line in body.split_inclusive(|&c| c == b'\n') {
            if line.first() == Some(&b'.') {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        data.extend_from_slice(b".\r\n");
        self.send(&data)?;
        let mut id = None;
        for r in rcpts {
            let line = self.reply()?;
            let want = format!("250 2.0.0 <{r}> ");
            let this = line
                .strip_prefix(&want)
                .and_then(|rest| rest.strip_suffix(" Saved"))
                .ok_or_else(|| std::io::Error::other(format!("final reply for {r}: {line}")))?
                .to_string();
            if id.as_ref().is_some_and(|i| *i != this) {
                return Err(std::io::Error::other(
                    "recipients of one message got different ids",
                ));
            }
            id = Some(this);
        }
        Ok(id.unwrap_or_default())
    }
}

/// A body fully determined by `n`, so a test can check what was stored.
pub fn body_for(n: u64, len: usize) -> Vec<u8> {
    let mut b = format!("Subject: message {n}\r\n\r\n").into_bytes();
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while b.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if b.len() % 76 == 74 {
            b.extend_from_slice(b"\r\n");
            if x % 7 == 0 {
                b.push(b'.');
            }
        } else {
            b.push(b'a' + (x % 26) as u8);
        }
    }
    b.extend_from_slice(b"\r\n");
    b
}
