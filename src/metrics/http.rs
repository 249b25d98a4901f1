//! A minimal HTTP/1.1 server for `GET /metrics`, on its own thread.
//!
//! One connection at a time, closed after each response: a scrape every few
//! seconds needs nothing more, and nothing a client sends can make it hold
//! more than one request of [`REQUEST_BYTES_MAX`] for [`REQUEST_TIMEOUT`].
//!
//! Must not: touch shard or writer state other than through atomic loads
//! (`Registry::render`); serve anything but the metrics text.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Registry;

/// Longest request head read; a scraper's is a few hundred bytes.
pub const REQUEST_BYTES_MAX: usize = 8 << 10;

/// How long a client may take to send its request or read the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The running endpoint; [`MetricsServer::stop`] ends its thread.
pub struct MetricsServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (before anything else starts, so a taken port stops
    /// start-up early). Errors name the address and the fix.
    pub fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
        TcpListener::bind(addr).map_err(|e| {
            format!("metrics.listen {addr}: {e}; choose a free port, or set metrics.listen = \"\" to turn the endpoint off")
        })
    }

    /// Starts serving on a bound listener.
    pub fn start(listener: TcpListener, registry: Registry) -> Result<MetricsServer, String> {
        let addr = listener
            .local_addr()
            .map_err(|e| format!("metrics endpoint: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            let _ = serve(stream, &registry);
                        }
                        // Out of descriptors, say: do not spin on it.
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
            .map_err(|e| format!("starting the metrics thread: {e}"))?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread: sets the flag, then wakes its `accept`.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request head and answers it.
fn serve(mut s: TcpStream, registry: &Registry) -> std::io::Result<()> {
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut buf = vec![0u8; REQUEST_BYTES_MAX];
    let mut len = 0;
    let head_complete = loop {
        if len == buf.len() {
            break false;
        }
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            break false;
        }
        len += n;
        if memchr::memmem::find(&buf[..len], b"\r\n\r\n").is_some() {
            break true;
        }
    };
    let line = buf[..len].split(|&c| c == b'\n').next().unwrap_or(b"");
    let mut parts = line.trim_ascii_end().split(|&c| c == b' ');
    let (method, target) = (parts.next().unwrap_or(b""), parts.next().unwrap_or(b""));
    let (status, ctype, body) = if !head_complete {
        (
            "400 Bad Request",
            "text/plain",
            "request head too long or incomplete\n".to_string(),
        )
    } else if method != b"GET" && method != b"HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        )
    } else if target == b"/metrics" || target.starts_with(b"/metrics?") {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            registry.render(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n".to_string(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    if method != b"HEAD" {
        s.write_all(body.as_bytes())?;
    }
    Ok(())
}
