//! Cases that stress what differs between the backends: how `auto` picks
//! one, the per-shard memory bound (reads stop and resume; on io_uring the
//! armed multishot recvs are cancelled and re-armed), more data at once than
//! the provided buffer ring holds, a client leaving mid-DATA, and shutdown
//! answering idle sessions. Every behavioural case runs on each backend.

mod server_util;

use std::io::Read;
use std::time::Duration;

use server_util::{Client, Server, backends, body_for, spool_cmd, verify};

/// A directory with a config file in it, for servers that need one at start.
fn start_with(name: &str, io: &str, toml: &str) -> Server {
    let dir = server_util::test_dir(name);
    let path = dir.join("lmtp.toml");
    std::fs::write(&path, toml).unwrap();
    let mut server = Server::start_in(&dir, io, &["--config", path.to_str().unwrap()]);
    server.owns_dir = true;
    server
}

#[test]
fn auto_takes_io_uring_when_the_probe_passes() {
    let mut server = Server::start("auto-probe", "auto", &[]);
    let banner = server
        .wait_log("lmtp-ingest ready", Duration::from_secs(5))
        .unwrap();
    match lmtp_ingest::io::uring::probe() {
        Ok(_) => assert!(banner.contains("backend=\"uring\""), "{banner}"),
        Err(why) => {
            assert!(banner.contains("backend=\"epoll\""), "{banner}");
            assert!(banner.contains(&why), "the banner says why: {banner}");
        }
    }
    assert!(server.stop().success());
}

#[test]
fn memory_bound_pauses_reading_and_every_message_still_arrives() {
    // One shard whose bound is one message: each body sent pauses reading
    // for every connection until its commit returns.
    const CLIENTS: u64 = 8;
    const EACH: u64 = 10;
    let toml = "[server]\nshards = 1\nshard_inflight_bytes_max = 65536\n\
                [limits]\nmessage_bytes_max = 65536\n";
    for io in backends() {
        let mut server = start_with(&format!("pause-{io}"), io, toml);
        let addr = server.addr();
        let threads: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = Client::tcp(&addr).unwrap();
                    c.cmd("LHLO t", "250").unwrap();
                    for i in 0..EACH {
                        let n = t * 1000 + i;
                        let body = body_for(n, 60_000);
                        c.deliver("s@x.org", &[format!("r{n}@x.org")], &body)
                            .unwrap();
                    }
                    c.cmd("QUIT", "221").unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let v = verify(&server.spool);
        assert_eq!(v["messages"], CLIENTS * EACH, "{v}");
        assert_eq!(v["corrupt"], 0, "{v}");
        assert!(server.stop().success());
    }
}

#[test]
fn more_data_at_once_than_the_buffer_ring_holds() {
    // 16 clients send 2 MB each at the same time into one shard: 32 MB is
    // four times the io_uring buffer ring, so recvs run it dry (ENOBUFS) and
    // must be re-armed; every byte must still arrive in order.
    const CLIENTS: u64 = 16;
    const BYTES: usize = 2 << 20;
    for io in backends() {
        let mut server = start_with(&format!("bulk-{io}"), io, "[server]\nshards = 1\n");
        let addr = server.addr();
        let threads: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = Client::tcp(&addr).unwrap();
                    c.cmd("LHLO t", "250").unwrap();
                    let id = c
                        .deliver("s@x.org", &[format!("r{t}@x.org")], &body_for(t, BYTES))
                        .unwrap();
                    c.cmd("QUIT", "221").unwrap();
                    (t, id)
                })
            })
            .collect();
        let ids: Vec<(u64, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let v = verify(&server.spool);
        assert_eq!(v["messages"], CLIENTS, "{v}");
        assert_eq!(v["corrupt"], 0, "{v}");
        for (t, id) in ids.iter().take(3) {
            let (code, shown) = spool_cmd(&server.spool, &["show", id]);
            assert_eq!(code, 0);
            let body = String::from_utf8(body_for(*t, BYTES)).unwrap();
            assert!(shown.ends_with(&body), "message {t} differs");
        }
        assert!(server.stop().success());
    }
}

#[test]
fn a_client_leaving_mid_data_leaves_nothing_and_others_go_on() {
    for io in backends() {
        let mut server = Server::start(&format!("middata-{io}"), io, &[]);
        {
            let mut c = Client::tcp(&server.addr()).unwrap();
            c.cmd("LHLO t", "250").unwrap();
            c.cmd("MAIL FROM:<s@x.org>", "250").unwrap();
            c.cmd("RCPT TO:<r@x.org>", "250").unwrap();
            c.cmd("DATA", "354").unwrap();
            c.send(b"Subject: cut short\r\n\r\nhalf a body").unwrap();
            // Dropped here: the connection closes mid-DATA.
        }
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("LHLO t", "250").unwrap();
        c.deliver("s@x.org", &["r@x.org".into()], &body_for(1, 1000))
            .unwrap();
        c.cmd("QUIT", "221").unwrap();
        let v = verify(&server.spool);
        assert_eq!(v["messages"], 1, "only the complete message: {v}");
        assert!(server.stop().success());
    }
}

/// The last data and the client's FIN arriving together (the epoll backend
/// stops reading at a short read, trusting the next edge, except after a
/// hang-up, which raises none): the message is stored, answered, and the
/// connection closed, not left for the idle timeout.
#[test]
fn data_and_fin_together_are_answered_then_closed() {
    use std::io::Write;
    for io in backends() {
        let mut server = Server::start(&format!("datafin-{io}"), io, &[]);
        for n in 0..3u64 {
            let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut c = Client::greet(stream.try_clone().unwrap()).unwrap();
            let mut last = Vec::new();
            if n == 0 {
                // A command and the FIN: its reply, then the close.
                last.extend_from_slice(b"LHLO t\r\n");
            } else {
                // The body, its dot and the FIN.
                c.cmd("LHLO t", "250").unwrap();
                c.send(b"MAIL FROM:<s@x.org>\r\nRCPT TO:<r@x.org>\r\nDATA\r\n")
                    .unwrap();
                for code in ["250", "250", "354"] {
                    let r = c.reply().unwrap();
                    assert!(r.starts_with(code), "{io}: {r}");
                }
                last.extend_from_slice(&body_for(n, 2000 * n as usize));
                last.extend_from_slice(b".\r\n");
            }
            stream.write_all(&last).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            let r = c.reply().unwrap();
            assert!(r.starts_with("250 "), "{io}: {r}");
            let t = std::time::Instant::now();
            match c.reply() {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                other => panic!(
                    "{io}: expected the server to close, got {other:?} after {:?}",
                    t.elapsed()
                ),
            }
        }
        let v = verify(&server.spool);
        assert_eq!(v["messages"], 2, "{io}: {v}");
        assert!(server.stop().success());
    }
}

#[test]
fn shutdown_answers_an_idle_session_421_and_exits_0() {
    for io in backends() {
        let mut server = Server::start(&format!("shutdown-{io}"), io, &[]);
        let stream = std::net::TcpStream::connect(server.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut c = Client::greet(stream.try_clone().unwrap()).unwrap();
        c.cmd("LHLO t", "250").unwrap();
        assert!(server.stop().success());
        let last = c.reply().unwrap();
        assert!(last.starts_with("421 4.3.2 "), "{last}");
        // And then the server closed the connection.
        let mut rest = Vec::new();
        let mut s = stream;
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
}

#[test]
fn connections_over_the_limit_get_421() {
    for io in backends() {
        let mut server = start_with(
            &format!("connmax-{io}"),
            io,
            "[server]\nshards = 1\nconnections_max = 2\n",
        );
        let _a = Client::tcp(&server.addr()).unwrap();
        let _b = Client::tcp(&server.addr()).unwrap();
        let third = std::net::TcpStream::connect(server.addr()).unwrap();
        third
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = String::new();
        let _ = (&third).read_to_string(&mut got);
        assert!(got.starts_with("421 4.7.0 "), "{got}");
        assert!(server.stop().success());
    }
}

/// A server started by hand, for set-ups `Server` cannot do (a seccomp
/// filter, a low open-files limit): the child, its log so far, and a channel
/// with the rest.
struct Raw {
    child: std::process::Child,
    lines: Vec<String>,
    rx: std::sync::mpsc::Receiver<String>,
    dir: std::path::PathBuf,
}

impl Raw {
    /// Starts `serve` on 127.0.0.1:0 with `io`; `pre_exec` runs in the child
    /// between fork and exec (it must only make system calls).
    fn spawn(
        name: &str,
        io: &str,
        extra: &[&str],
        pre_exec: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Raw {
        use std::io::{BufRead, BufReader};
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};

        let dir = server_util::test_dir(name);
        let mut cmd = Command::new(server_util::BIN);
        cmd.arg("serve")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--io",
                io,
                "--hostname",
                "mx.test",
            ])
            .arg("--spool")
            .arg(dir.join("spool"))
            .args(["--segment-bytes", "1048576"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closures passed here only make async-signal-safe
        // system calls on memory moved into them.
        unsafe {
            cmd.pre_exec(pre_exec);
        }
        let mut child = cmd.spawn().expect("start lmtp-ingest");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Raw {
            child,
            lines: Vec::new(),
            rx,
            dir,
        }
    }

    /// Waits for a log line containing `needle`; `None` if the server exited
    /// or the time ran out.
    fn wait_log(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let line = self.rx.recv_timeout(left).ok()?;
            self.lines.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    }

    /// The TCP address from the banner.
    fn addr(banner: &str) -> String {
        let at = banner.find("127.0.0.1:").expect("banner names the address");
        let port: String = banner[at + 10..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        format!("127.0.0.1:{port}")
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `serve` with io_uring_setup refused by a seccomp filter (as Docker's
/// default profile does); returns the start-up banner, or everything the
/// server wrote before it exited.
fn serve_without_io_uring(name: &str, io: &str) -> (Option<String>, Vec<String>) {
    let filter = seccomp::deny_io_uring_setup();
    let mut raw = Raw::spawn(name, io, &[], move || seccomp::install(&filter));
    let banner = raw.wait_log("lmtp-ingest ready", Duration::from_secs(20));
    (banner, std::mem::take(&mut raw.lines))
}

#[test]
fn out_of_descriptors_pauses_accepting_and_resumes() {
    // 64 descriptors in all: the server's own (spool, listeners, rings,
    // eventfds) leave room for a few dozen clients. 80 connect; the rest
    // wait in the listen queue while accepts pause on EMFILE, and are served
    // once the first ones leave.
    const CLIENTS: usize = 80;
    for io in backends() {
        let mut raw = Raw::spawn(&format!("emfile-{io}"), io, &["--shards", "1"], || {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            // SAFETY: setrlimit reads a live local struct.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
        let banner = raw
            .wait_log("lmtp-ingest ready", Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no banner: {:#?}", raw.lines));
        let addr = Raw::addr(&banner);
        let streams: Vec<std::net::TcpStream> = (0..CLIENTS)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        assert!(
            raw.wait_log("pausing accepts", Duration::from_secs(10))
                .is_some(),
            "{io}: EMFILE is reported: {:#?}",
            raw.lines
        );
        // Read greetings; every client that got one leaves again, which
        // frees descriptors for the ones still queued.
        let mut greeted = 0;
        for s in streams {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut c = Client::greet(s)
                .unwrap_or_else(|e| panic!("{io}: client {greeted} got no greeting: {e}"));
            c.cmd("QUIT", "221").unwrap();
            greeted += 1;
        }
        assert_eq!(greeted, CLIENTS);
    }
}

#[test]
fn io_uring_refused_by_seccomp_falls_back_to_epoll_and_says_why() {
    let (banner, lines) = serve_without_io_uring("seccomp-auto", "auto");
    let banner = banner.unwrap_or_else(|| panic!("no banner: {lines:#?}"));
    assert!(banner.contains("backend=\"epoll\""), "{banner}");
    assert!(
        banner.contains(
            "io_uring_setup: EPERM (blocked by a seccomp profile or kernel.io_uring_disabled=2); falling back to epoll"
        ),
        "{banner}"
    );
    let (banner, lines) = serve_without_io_uring("seccomp-forced", "uring");
    assert!(banner.is_none(), "--io uring must not start: {lines:#?}");
    let all = lines.join("\n");
    assert!(
        all.contains("--io uring: io_uring_setup: EPERM") && all.contains("--io epoll"),
        "the refusal says why and what to do: {all}"
    );
}

/// A minimal seccomp filter: `io_uring_setup` fails with EPERM, everything
/// else is allowed.
mod seccomp {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;

    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    /// Offsets in `struct seccomp_data`.
    const NR: u32 = 0;
    const ARCH: u32 = 4;

    fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }

    pub fn deny_io_uring_setup() -> [libc::sock_filter; 7] {
        [
            op(LD_W_ABS, 0, 0, ARCH),
            // Another architecture (a 32-bit ABI): leave it alone.
            op(JEQ_K, 1, 0, AUDIT_ARCH),
            op(RET_K, 0, 0, RET_ALLOW),
            op(LD_W_ABS, 0, 0, NR),
            op(JEQ_K, 0, 1, libc::SYS_io_uring_setup as u32),
            op(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
            op(RET_K, 0, 0, RET_ALLOW),
        ]
    }

    pub fn install(filter: &[libc::sock_filter]) -> std::io::Result<()> {
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: plain system calls; `prog` and the filter it points at
        // live across them, and the kernel copies the program.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_seccomp,
                1, // SECCOMP_SET_MODE_FILTER
                0,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
