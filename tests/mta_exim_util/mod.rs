//! Runs Debian's real Exim 4.96 against our server for tests/mta_exim.rs.
//!
//! Exim is not installed as a package (it conflicts with Postfix, which other
//! tests need): `tests/mta/fetch-exim.sh` (run by `.ci/run`) unpacks it into
//! `target/exim-root`, or `$LMTP_TEST_EXIM_ROOT`. Each test gets its own Exim
//! configuration, spool, logs and (for the daemon) a free loopback port; the
//! binary runs as root with `-C` on that configuration. Every Exim command
//! and every wait has a deadline; a daemon is killed by its pid on drop; a
//! failing test prints Exim's mainlog and paniclog.
//!
//! Must not: touch /etc/exim4 or /var/spool/exim4, or leave a process behind.

#![allow(dead_code)]

use std::ffi::CString;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::server_util::free_port;

/// Longest any one Exim command (a submission, a queue run) may take.
pub const EXIM_CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Where fetch-exim.sh unpacked Exim.
pub fn exim_root() -> PathBuf {
    match std::env::var_os("LMTP_TEST_EXIM_ROOT") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/exim-root"),
    }
}

/// The Exim binary, or a panic that says how to get it: a missing Exim must
/// fail these tests, never skip them.
pub fn exim_binary() -> PathBuf {
    let bin = exim_root().join("usr/sbin/exim4");
    let fix = "run `bash .ci/run`, or just `tests/mta/fetch-exim.sh` (as root: it unpacks \
               Debian's exim4 packages into target/exim-root, installs libidn12 and creates \
               the Debian-exim user)";
    assert!(
        bin.is_file(),
        "Exim is not unpacked at {}: {fix}",
        bin.display()
    );
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        uid, 0,
        "the Exim tests run Exim as root with -C on their own configuration (Debian's \
         build drops privilege otherwise); run them as root"
    );
    assert!(
        user_ids("Debian-exim").is_some(),
        "no Debian-exim user (Debian's Exim is built to run as it): {fix}"
    );
    // It loads (libidn12 is there) and is the version these tests know.
    let out = Command::new(&bin)
        .args(["-C", "/dev/null", "-bV"])
        .output()
        .expect("run exim -bV");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("Exim version 4."),
        "{} -bV failed: {}{}\n{fix}",
        bin.display(),
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// (uid, gid) of a user, if it exists.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    // getpwnam_r, not getpwnam: the tests run on several threads at once.
    // SAFETY: passwd is plain data (integers and pointers); all zeros is a
    // valid value, overwritten by the call.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local (the name, the record, its
    // string buffer of the given length, the result slot) for the call.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    (rc == 0 && !found.is_null()).then_some((pw.pw_uid, pw.pw_gid))
}

/// What a bounded command left behind.
#[derive(Debug)]
pub struct Ran {
    pub code: Option<i32>,
    /// stdout and stderr, in that order.
    pub output: String,
}

/// How Exim reaches our server, written into its configuration.
pub struct Target {
    /// Our server's TCP port (for the smtp transport with protocol = lmtp).
    pub port: u16,
    /// Our server's UNIX socket (for the lmtp transport).
    pub socket: PathBuf,
}

/// The router/transport/ACL part of the configuration: what
/// docs/INTEGRATION.md shows. `@SOCKET@` and `@PORT@` are filled in.
/// Domain `u.example` goes to the `lmtp` transport over the UNIX socket,
/// `t.example` to the `smtp` transport speaking LMTP over TCP.
pub const INGEST_CONFIG: &str = r#"
domainlist ingest_domains = u.example : t.example
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_rcpt:
  # Ask lmtp-ingest whether it knows the user (LHLO, MAIL FROM:<>, RCPT,
  # QUIT); its 550 is passed on at RCPT, so no bounce is ever made.
  deny    domains = +ingest_domains
          !verify = recipient/callout=10s
  accept  domains = +ingest_domains
  deny    message = relay not permitted

begin routers

# Callouts are made only by the smtp transport: an address routed to the
# lmtp transport would pass `verify = recipient/callout` unchecked. This
# router is used for verification alone and sends the callout over TCP.
ingest_unix_verify:
  driver = manualroute
  domains = u.example
  verify_only
  route_list = * 127.0.0.1
  self = send
  transport = ingest_lmtp_tcp

ingest_unix:
  driver = accept
  domains = u.example
  no_verify
  transport = ingest_lmtp

ingest_tcp:
  driver = manualroute
  domains = t.example
  route_list = * 127.0.0.1
  # 127.0.0.1 is this host too: deliver there anyway.
  self = send
  transport = ingest_lmtp_tcp

begin transports

ingest_lmtp:
  driver = lmtp
  socket = @SOCKET@
  batch_max = 200
  # A local transport runs as a user: Debian-exim, in the socket's group
  # (lmtp-ingest's server.unix_socket_group).
  user = Debian-exim

ingest_lmtp_tcp:
  driver = smtp
  protocol = lmtp
  port = @PORT@
  max_rcpt = 200
  allow_localhost
  hosts_try_chunking = *

begin retry

# Debian's default rule: every 15 minutes for 2 hours, then at growing
# intervals, then every 6 hours until 4 days have passed. A 452 from a full
# spool keeps the mail queued that long (the tests force queue runs with
# -qff instead of waiting).
*   *   F,2h,15m; G,16h,1h,1.5; F,4d,6h
"#;

/// One private Exim: configuration, spool, logs; maybe a daemon.
pub struct Exim {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub conf: PathBuf,
    /// Port of the daemon's SMTP listener (0: no daemon).
    pub smtp_port: u16,
    /// The main section (everything before INGEST_CONFIG).
    main: String,
    daemon: Option<Child>,
}

impl Exim {
    /// Writes a configuration under `dir` (made for this Exim alone) that
    /// delivers to `target`. `extra_main` goes into the main section.
    pub fn new(dir: &Path, target: &Target, extra_main: &str) -> Exim {
        let bin = exim_binary();
        let (uid, gid) = user_ids("Debian-exim").unwrap();
        let _ = std::fs::remove_dir_all(dir);
        for sub in ["spool", "log"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).unwrap();
            std::os::unix::fs::chown(&d, Some(uid), Some(gid)).unwrap();
        }
        let smtp_port = free_port();
        let conf = dir.join("exim.conf");
        let main = format!(
            "primary_hostname = exim.test\n\
             qualify_domain = sender.example\n\
             exim_user = Debian-exim\n\
             exim_group = Debian-exim\n\
             trusted_users = root\n\
             # Re-executions (-Mc, bounces) must find this binary, not /usr/sbin/exim4.\n\
             exim_path = {bin}\n\
             spool_directory = {dir}/spool\n\
             log_file_path = {dir}/log/%slog\n\
             pid_file_path = {dir}/exim.pid\n\
             log_selector = +smtp_protocol_error +deliver_time +received_recipients +pipelining\n\
             keep_environment =\n\
             host_lookup =\n\
             rfc1413_hosts =\n\
             tls_advertise_hosts =\n\
             daemon_smtp_ports = {smtp_port}\n\
             local_interfaces = 127.0.0.1\n\
             {extra_main}\n",
            bin = bin.display(),
            dir = dir.display(),
        );
        let exim = Exim {
            bin,
            dir: dir.to_owned(),
            conf,
            smtp_port,
            main,
            daemon: None,
        };
        exim.retarget(target);
        exim
    }

    /// Writes the configuration for `target` (Exim reads it afresh at each
    /// command; a running daemon would need a SIGHUP).
    pub fn retarget(&self, target: &Target) {
        let ingest = INGEST_CONFIG
            .replace("@SOCKET@", &target.socket.display().to_string())
            .replace("@PORT@", &target.port.to_string());
        std::fs::write(&self.conf, format!("{}{ingest}", self.main)).unwrap();
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-C").arg(&self.conf);
        c
    }

    /// Runs exim with `args`, `stdin` as input, bounded by
    /// [`EXIM_CMD_TIMEOUT`] (killed after it, and the test fails).
    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Ran {
        let out_path = self.dir.join(format!("cmd-{}.out", unique()));
        let out = std::fs::File::create(&out_path).unwrap();
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start exim");
        {
            let mut i = child.stdin.take().unwrap();
            i.write_all(stdin).expect("write the message to exim");
        }
        let deadline = Instant::now() + EXIM_CMD_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "exim {args:?} ran past {EXIM_CMD_TIMEOUT:?}; output:\n{}",
                    std::fs::read_to_string(&out_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ran {
            code: status.code(),
            output: std::fs::read_to_string(&out_path).unwrap_or_default(),
        }
    }

    /// Submits one message on the command line and delivers it at once, in
    /// the foreground (`-odi`), with the SMTP/LMTP dialogue on stderr
    /// (`-v`). Returns that transcript.
    pub fn submit(&self, from: &str, rcpts: &[String], message: &[u8]) -> String {
        let mut args = vec!["-odi", "-oi", "-v", "-f", from, "--"];
        args.extend(rcpts.iter().map(String::as_str));
        let ran = self.run(&args, message);
        assert_eq!(
            ran.code,
            Some(0),
            "exim -odi failed:\n{}\n{}",
            ran.output,
            self.logs()
        );
        ran.output
    }

    /// A forced queue run (`-qff`: every message, frozen ones too, whatever
    /// the retry times say), in the foreground. Returns the transcript.
    pub fn queue_run(&self) -> String {
        let ran = self.run(&["-qff", "-v"], b"");
        assert_eq!(ran.code, Some(0), "exim -qff failed:\n{}", ran.output);
        ran.output
    }

    /// Messages in Exim's queue (`-bpc`).
    pub fn queue_count(&self) -> usize {
        let ran = self.run(&["-bpc"], b"");
        ran.output
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("exim -bpc printed {:?}", ran.output))
    }

    /// Starts the daemon (`-bdf`: in the foreground, so its pid is ours)
    /// listening on `smtp_port`, with no queue runner; waits until it
    /// answers.
    pub fn start_daemon(&mut self) {
        let log = std::fs::File::create(self.dir.join("daemon.out")).unwrap();
        let child = self
            .cmd()
            .args(["-bdf", "-oX"])
            .arg(self.smtp_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start exim -bdf");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.smtp_port)).is_ok() {
                return;
            }
            if let Some(s) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "exim daemon exited at start ({s}):\n{}\n{}",
                    std::fs::read_to_string(self.dir.join("daemon.out")).unwrap_or_default(),
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "exim daemon did not listen on 127.0.0.1:{} within 10 s:\n{}",
                self.smtp_port,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn mainlog(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/mainlog")).unwrap_or_default()
    }

    pub fn paniclog(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/paniclog")).unwrap_or_default()
    }

    /// Fails on anything in the paniclog but the one line every run of
    /// these tests writes: Exim re-executes itself (to deliver from the
    /// daemon, for -Mc) with `-C` on a file not in Debian's
    /// TRUSTED_CONFIG_LIST (/etc/exim4/trusted_configs), so the new process
    /// keeps only the Debian-exim user, which is all our transports need.
    pub fn assert_paniclog_quiet(&self) {
        let panics = self.paniclog();
        let unexpected: Vec<&str> = panics
            .lines()
            .filter(|l| !l.ends_with("exim user lost privilege for using -C option"))
            .collect();
        assert!(unexpected.is_empty(), "Exim panicked:\n{}", self.logs());
    }

    /// Both logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- exim mainlog ({}) ---\n{}--- exim paniclog ---\n{}",
            self.dir.join("log").display(),
            self.mainlog(),
            self.paniclog()
        )
    }

    /// Waits until the mainlog holds `n` lines containing `needle`.
    pub fn wait_mainlog(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .mainlog()
                .lines()
                .filter(|l| l.contains(needle))
                .count()
                >= n
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // SAFETY: kill(2) on our own child's pid; SIGTERM lets Exim
            // close its listener, SIGKILL below if it does not.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A message as a local user would hand it to `exim -f`: LF line endings,
/// a Subject to find it by, and body lines that start with dots (Exim
/// stuffs them, our server removes the stuffing).
pub fn message(subject: &str, body_bytes: usize) -> Vec<u8> {
    let mut m = format!("Subject: {subject}\nX-Test: mta_exim\n\n.leading dot\n..two dots\n.\n")
        .into_bytes();
    let mut i = 0u64;
    while m.len() < body_bytes {
        m.extend_from_slice(
            format!("line {i:06} of {subject}: abcdefghijklmnopqrstuvwxyz\n").as_bytes(),
        );
        i += 1;
    }
    m.extend_from_slice(b"end\n");
    m
}

/// One stored message: its queue id, recipients and body.
#[derive(Debug)]
pub struct Stored {
    pub id: String,
    pub sender: String,
    pub rcpts: Vec<String>,
    pub body: Vec<u8>,
}

impl Stored {
    pub fn subject(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.body);
        let head = text.split("\r\n\r\n").next().unwrap_or("");
        head.lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .map(|s| s.trim_end().to_string())
    }
}

/// Every message in our spool, read with the spool's own reader (which
/// checks each record's checksum).
pub fn stored(spool: &Path) -> Vec<Stored> {
    let (records, _) = lmtp_ingest::spool::reader::read_all(spool).expect("read our spool");
    records
        .into_iter()
        .map(|r| Stored {
            id: r.header.queue_id.to_string(),
            sender: r.envelope.reverse_path.to_string(),
            rcpts: r
                .envelope
                .recipients
                .iter()
                .map(|x| x.mailbox.address())
                .collect(),
            body: r.body,
        })
        .collect()
}
