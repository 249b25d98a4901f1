//! Listening sockets: parse `--listen` values, create TCP listeners (one per
//! shard with SO_REUSEPORT, so the kernel spreads connections over shards
//! without a shared accept lock) and UNIX listeners (one socket, shared).
//!
//! Must not: accept or read. Errors name the address, the cause and the fix.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::access::AllowList;

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    /// `127.0.0.1:2424`, `[::1]:2424`, `0.0.0.0:24`, `unix:/run/lmtp.sock`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!(
                    "'{s}': a UNIX socket needs a path, as in unix:/run/lmtp-ingest/lmtp.sock"
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!(
                "'{s}' is not a listen address; write IP:PORT (127.0.0.1:2424, [::1]:2424) or unix:/path/to/socket"
            )
        })
    }
}

/// One open listening socket.
#[derive(Debug)]
pub struct Listener {
    pub addr: ListenAddr,
    pub fd: Arc<OwnedFd>,
    /// Who may connect (TCP); loopback only unless the server sets it.
    pub allow: Arc<AllowList>,
}

/// Permissions of a UNIX socket file: mode, and the owner and group to give
/// it (`None`: leave the server's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPerms {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl From<u32> for UnixPerms {
    fn from(mode: u32) -> Self {
        UnixPerms {
            mode,
            uid: None,
            gid: None,
        }
    }
}

/// A user name or numeric id, as configured, to a uid.
pub fn resolve_user(name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("'{name}' is not a user name"))?;
    let mut pw: libc::passwd = unsafe_zeroed();
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: every pointer refers to a live local; `buf` outlives the call
    // and `pw` is only read when `out` says the lookup found the user.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!(
            "no user '{name}' on this machine; create it or give a numeric id"
        ));
    }
    Ok(pw.pw_uid)
}

/// A group name or numeric id, as configured, to a gid.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("'{name}' is not a group name"))?;
    let mut gr: libc::group = unsafe_zeroed();
    let mut out: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 64 << 10];
    // SAFETY: as in resolve_user.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!(
            "no group '{name}' on this machine; create it or give a numeric id"
        ));
    }
    Ok(gr.gr_gid)
}

/// A zeroed libc record for the `*_r` lookups to fill.
fn unsafe_zeroed<T: Copy>() -> T {
    // SAFETY: only used for libc's passwd/group: plain C structs of integers
    // and pointers, for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// TCP accept queue length asked for; the kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
const BACKLOG: i32 = 4096;

/// A TCP listener with SO_REUSEPORT (each shard binds its own) and
/// SO_REUSEADDR (restart while old connections linger in TIME_WAIT).
pub fn tcp(addr: SocketAddr) -> Result<Listener, String> {
    let what = |e: std::io::Error| {
        let hint = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => {
                "another process listens there: stop it or choose another port"
            }
            Some(libc::EACCES) => "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            Some(libc::EADDRNOTAVAIL) => "no interface on this machine has that address",
            _ => "check the address",
        };
        format!("listen on {addr}: {e}; {hint}")
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )
    .map_err(what)?;
    socket.set_reuse_address(true).map_err(what)?;
    socket.set_reuse_port(true).map_err(what)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(what)?;
    }
    socket.bind(&addr.into()).map_err(what)?;
    socket.listen(BACKLOG).map_err(what)?;
    Ok(Listener {
        addr: ListenAddr::Tcp(addr),
        fd: Arc::new(OwnedFd::from(socket)),
        allow: Arc::new(AllowList::loopback()),
    })
}

/// Binds `addr` without SO_REUSEPORT and releases it: fails if any socket
/// already holds the port. Returns the address with port 0 resolved.
fn probe_bind(addr: SocketAddr) -> Result<SocketAddr, String> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    let _ = socket.set_reuse_address(true);
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(true);
    }
    socket.bind(&addr.into()).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => {
                "another process (perhaps another lmtp-ingest) listens there: stop it or choose another port"
            }
            Some(libc::EACCES) => "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            Some(libc::EADDRNOTAVAIL) => "no interface on this machine has that address",
            _ => "check the address",
        };
        format!("listen on {addr}: {e}; {hint}")
    })?;
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| format!("listen on {addr}: cannot read the bound address"))
}

/// A UNIX listener at `path`, with permissions `perms` (a mode, or a mode
/// with owner and group), set before it listens. A stale socket file left by
/// a crash is replaced; a live one (something accepts on it) or a file that
/// is not a socket is refused.
pub fn unix(path: &Path, perms: impl Into<UnixPerms>) -> Result<Listener, String> {
    let perms = perms.into();
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "listen on unix:{shown}: the path exists and is not a socket; remove it or choose another path"
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "listen on unix:{shown}: another server is accepting there; stop it or choose another path"
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("listen on unix:{shown}: removing the stale socket: {e}"))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(format!(
                "listen on unix:{shown}: directory {} does not exist; create it (for example with systemd's RuntimeDirectory=)",
                dir.display()
            ));
        }
    }
    let what = |e: std::io::Error| format!("listen on unix:{shown}: {e}");
    let socket =
        Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None).map_err(what)?;
    socket
        .bind(&SockAddr::unix(path).map_err(what)?)
        .map_err(what)?;
    if perms.uid.is_some() || perms.gid.is_some() {
        std::os::unix::fs::chown(path, perms.uid, perms.gid).map_err(|e| {
            format!(
                "listen on unix:{shown}: giving the socket owner {:?} group {:?}: {e}; changing the owner needs root, a group needs membership",
                perms.uid, perms.gid
            )
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(perms.mode)).map_err(what)?;
    socket.listen(BACKLOG).map_err(what)?;
    Ok(Listener {
        addr: ListenAddr::Unix(path.to_owned()),
        fd: Arc::new(OwnedFd::from(socket)),
        allow: Arc::new(AllowList::loopback()),
    })
}

/// Opens every address: TCP ones once per shard (SO_REUSEPORT), UNIX ones
/// once, shared. Returns, per shard, the listeners it polls.
pub fn open_all(
    addrs: &[ListenAddr],
    shards: usize,
    unix_perms: impl Into<UnixPerms>,
) -> Result<Vec<Vec<Listener>>, String> {
    let unix_perms = unix_perms.into();
    let mut per_shard: Vec<Vec<Listener>> = (0..shards).map(|_| Vec::new()).collect();
    for addr in addrs {
        match addr {
            ListenAddr::Tcp(a) => {
                // SO_REUSEPORT would let us share the port with another
                // server of the same user, silently splitting its traffic
                // into two spools. A plain bind first refuses a port anyone
                // holds. It also resolves port 0 for every shard.
                let probe = probe_bind(*a)?;
                let first = tcp(probe)?;
                let mut bound = *a;
                if let Some(port) = local_port(&first) {
                    bound.set_port(port);
                }
                let mut first = Some(first);
                for l in per_shard.iter_mut() {
                    let listener = match first.take() {
                        Some(f) => Listener {
                            addr: ListenAddr::Tcp(bound),
                            fd: f.fd,
                            allow: f.allow,
                        },
                        None => tcp(bound)?,
                    };
                    l.push(listener);
                }
            }
            ListenAddr::Unix(p) => {
                let shared = unix(p, unix_perms)?;
                for l in per_shard.iter_mut() {
                    l.push(Listener {
                        addr: shared.addr.clone(),
                        fd: shared.fd.clone(),
                        allow: shared.allow.clone(),
                    });
                }
            }
        }
    }
    Ok(per_shard)
}

/// The port the kernel chose for a listener bound to port 0 (tests).
pub fn local_port(l: &Listener) -> Option<u16> {
    let sock = socket2::SockRef::from(l.fd.as_ref());
    sock.local_addr().ok()?.as_socket().map(|a| a.port())
}

/// Raw fd of a listener, for the event loop.
pub fn raw(l: &Listener) -> i32 {
    l.fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "127.0.0.1:2424".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("127.0.0.1:2424".parse().unwrap()))
        );
        assert!(matches!(
            "[::1]:2424".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp(_))
        ));
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/run/x.sock".into()))
        );
        let e = "localhost:24".parse::<ListenAddr>().unwrap_err();
        assert!(e.contains("IP:PORT"), "{e}");
        assert!(
            "unix:"
                .parse::<ListenAddr>()
                .unwrap_err()
                .contains("needs a path")
        );
    }

    #[test]
    fn reuseport_lets_each_shard_bind() {
        let first = tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = local_port(&first).unwrap();
        let second = tcp(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
        assert_eq!(local_port(&second), Some(port));
    }

    #[test]
    fn a_port_held_by_another_server_is_refused() {
        let other = open_all(&["127.0.0.1:0".parse().unwrap()], 1, 0o600).unwrap();
        let port = local_port(&other[0][0]).unwrap();
        let e = open_all(&[format!("127.0.0.1:{port}").parse().unwrap()], 2, 0o600).unwrap_err();
        assert!(e.contains("another process"), "{e}");
    }

    #[test]
    fn port_zero_gives_every_shard_the_same_port() {
        let shards = open_all(&["127.0.0.1:0".parse().unwrap()], 3, 0o600).unwrap();
        let ports: Vec<u16> = shards.iter().map(|l| local_port(&l[0]).unwrap()).collect();
        assert_ne!(ports[0], 0);
        assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
        assert_eq!(
            shards[1][0].addr,
            ListenAddr::Tcp(format!("127.0.0.1:{}", ports[0]).parse().unwrap())
        );
    }

    #[test]
    fn unix_socket_mode_and_stale_file() {
        let dir = std::env::temp_dir().join(format!("lmtp-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lmtp.sock");
        let l = unix(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let e = unix(&path, 0o660).unwrap_err();
        assert!(e.contains("another server is accepting"), "{e}");
        drop(l);
        // The file remains but nobody accepts: stale, replaced.
        let _l = unix(&path, 0o600).unwrap();
        std::fs::write(dir.join("plain"), b"x").unwrap();
        assert!(
            unix(&dir.join("plain"), 0o600)
                .unwrap_err()
                .contains("not a socket")
        );
        assert!(
            unix(&dir.join("no/such/dir.sock"), 0o600)
                .unwrap_err()
                .contains("does not exist")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
