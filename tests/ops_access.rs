//! Access control on the real server: a client outside a listener's CIDR
//! allow-list gets `554 5.7.1` and is closed (the second loopback address,
//! 127.0.0.2, plays the stranger); UNIX sockets get the configured owner,
//! group and mode; a public bind without an allow-list is refused at start.
//! Socket tests run on each backend.

mod server_util;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use server_util::{Client, Server, backends, test_dir};

/// Removes a test's directory when dropped: its spool holds preallocated
/// segments, and a full test run would otherwise leave gigabytes behind.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_with(name: &str, io: &str, config: &str, extra: &[&str]) -> Server {
    let dir = test_dir(name);
    let c = dir.join("config.toml");
    std::fs::write(&c, config).unwrap();
    let c = c.display().to_string();
    let mut flags = vec!["--config", c.as_str()];
    flags.extend_from_slice(extra);
    Server::start_in(&dir, io, &flags)
}

/// Connects from `source` (a local address) to `to`; returns the first line
/// the server sends and whether it then closed the connection.
fn first_line_from(source: &str, to: &str) -> (String, bool) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    let to: SocketAddr = to.parse().unwrap();
    sock.connect(&to.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let mut rest = Vec::new();
    let closed = matches!(r.read_to_end(&mut rest), Ok(0));
    (line.trim_end().to_string(), closed)
}

fn current_group_name() -> String {
    let out = std::process::Command::new("id")
        .arg("-gn")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn listener_allow_list_refuses_others_unix_socket_perms_applied() {
    // SAFETY: getuid/getgid have no arguments and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    for io in backends() {
        // Only 127.0.0.2 may use the TCP listener; we connect from 127.0.0.1.
        let config = format!(
            "[server]\nunix_socket_mode = \"0640\"\nunix_socket_owner = \"{uid}\"\nunix_socket_group = \"{}\"\n\n[access.listen.\"127.0.0.1:0\"]\nallow = [\"127.0.0.2/32\"]\n",
            current_group_name()
        );
        let mut server = start_with(&format!("ops-allow-{io}"), io, &config, &[]);
        let _dir = RemoveOnDrop(server.dir.clone());
        let (line, closed) = first_line_from("127.0.0.1", &server.addr());
        assert!(line.starts_with("554 5.7.1 "), "{line}");
        assert!(closed, "the refused connection is closed");
        assert!(
            server
                .wait_log("not in the listener's allow-list", Duration::from_secs(5))
                .is_some()
        );
        // The allowed address is served.
        let line = first_line_from_allowed(&server);
        assert!(line.starts_with("220 "), "{line}");
        // UNIX socket: not gated by the allow-list, guarded by its file.
        let meta = std::fs::metadata(&server.socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        let s = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client::greet(s).unwrap();
        c.cmd("QUIT", "221").unwrap();
        assert!(server.stop().success());
    }
}

/// The greeting line as seen from 127.0.0.2.
fn first_line_from_allowed(server: &Server) -> String {
    let mut s = String::new();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = "127.0.0.2:0".parse().unwrap();
    sock.bind(&src.into()).unwrap();
    let to: SocketAddr = server.addr().parse().unwrap();
    sock.connect(&to.into()).unwrap();
    let t: TcpStream = sock.into();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(t).read_line(&mut s).unwrap();
    s.trim_end().to_string()
}

#[test]
fn global_allow_list_refuses_a_second_loopback_address() {
    for io in backends() {
        let mut server = start_with(
            &format!("ops-allow-global-{io}"),
            io,
            "[access]\nallow = [\"127.0.0.1/32\"]\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            &[],
        );
        let _dir = RemoveOnDrop(server.dir.clone());
        let (line, closed) = first_line_from("127.0.0.2", &server.addr());
        assert_eq!(line, "554 5.7.1 Access denied: client not allowed");
        assert!(closed);
        // Counted for the metrics endpoint.
        let metrics = server.metrics_addr();
        let mut s = TcpStream::connect(&metrics).unwrap();
        std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(
            text.contains("lmtp_ingest_connections_refused_total{reason=\"access\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lmtp_ingest_connections_opened_total 0\n"),
            "{text}"
        );
        let mut c = Client::tcp(&server.addr()).unwrap();
        c.cmd("QUIT", "221").unwrap();
        assert!(server.stop().success());
    }
}

fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(server_util::BIN)
        .arg("serve")
        .args(args)
        .arg("--spool")
        .arg(dir.join("spool"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn public_bind_needs_an_explicit_allow_list() {
    let dir = test_dir("ops-public");
    let _dir = RemoveOnDrop(dir.clone());
    let err = serve_fails(&dir, &["--listen", "0.0.0.0:0"]);
    assert!(
        err.contains("no allow-list") && err.contains("0.0.0.0/0"),
        "{err}"
    );
    // Written out, anyone may connect: the server starts.
    let io = backends()[0];
    let mut server = start_with(
        "ops-public-ok",
        io,
        "[access]\nallow = [\"0.0.0.0/0\", \"::/0\"]\n",
        &["--listen", "0.0.0.0:0"],
    );
    let _dir = RemoveOnDrop(server.dir.clone());
    let line = first_line_from_allowed(&server);
    assert!(line.starts_with("220 "), "{line}");
    assert!(server.stop().success());
    // A per-listener key that names no listener is a typo, refused.
    let c = dir.join("typo.toml");
    std::fs::write(&c, "[access.listen.\"127.0.0.1:2525\"]\nallow = []\n").unwrap();
    let err = serve_fails(
        &dir,
        &[
            "--config",
            &c.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(err.contains("names no address of server.listen"), "{err}");
}
