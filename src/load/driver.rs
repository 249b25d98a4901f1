//! The event loops: each thread runs one edge-triggered epoll loop over its
//! share of non-blocking connections, feeding reads to each connection's
//! [`ClientConn`] and writing what it asks for. Threads share only the
//! message budget (an atomic counter, or the `--rate` schedule) and a
//! progress counter; each counts into its own [`Tally`].
//!
//! Per connection: one output buffer, reused (a message is a copy of prebuilt
//! bytes, no allocation), a `writable` flag (cleared on EAGAIN, set by
//! EPOLLOUT). Reads go through one 64 KiB buffer per thread.
//!
//! Must not: block anywhere but `epoll_wait` (sockets are non-blocking), or
//! run unbounded: every connection waits at most `--timeout` for a reply, and
//! the budget ends by message count or deadline.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::conn::{ClientConn, ProtocolError, Style};
use super::message::Templates;
use super::tally::Tally;
use crate::io::sys::Epoll;

const READ_BUF_BYTES: usize = 64 * 1024;
const EVENTS_MAX: usize = 1024;
/// How often timeouts are checked and progress is published.
const TICK: Duration = Duration::from_millis(50);
/// Protocol errors kept with their context (all are counted).
pub const ERRORS_KEPT: usize = 10;

/// When messages may start: a count, a deadline, and optionally a rate.
pub struct Budget {
    pub messages_max: Option<u64>,
    pub deadline: Option<Instant>,
    /// (schedule start, nanoseconds between messages).
    pub rate: Option<(Instant, f64)>,
    started: AtomicU64,
}

pub enum Take {
    /// Start one message; with `--rate`, the time it was scheduled for.
    Go(Option<Instant>),
    /// Nothing yet: the next scheduled start.
    Wait(Instant),
    /// The budget is spent.
    Done,
}

impl Budget {
    pub fn new(
        messages_max: Option<u64>,
        deadline: Option<Instant>,
        rate: Option<(Instant, f64)>,
    ) -> Budget {
        Budget {
            messages_max,
            deadline,
            rate,
            started: AtomicU64::new(0),
        }
    }

    pub fn take(&self, now: Instant) -> Take {
        if self.deadline.is_some_and(|d| now >= d) {
            return Take::Done;
        }
        let max = self.messages_max.unwrap_or(u64::MAX);
        let Some((start, interval_ns)) = self.rate else {
            // Overshooting the counter past `max` is harmless.
            return if self.started.fetch_add(1, Ordering::Relaxed) < max {
                Take::Go(None)
            } else {
                Take::Done
            };
        };
        loop {
            let k = self.started.load(Ordering::Relaxed);
            if k >= max {
                return Take::Done;
            }
            let at = start + Duration::from_nanos((k as f64 * interval_ns) as u64);
            if at > now {
                return Take::Wait(at);
            }
            if self
                .started
                .compare_exchange(k, k + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Take::Go(Some(at));
            }
        }
    }
}

/// What every thread shares.
pub struct Shared {
    pub templates: Arc<Templates>,
    pub style: Style,
    pub reply_timeout: Duration,
    pub budget: Budget,
    /// Messages finished so far, for the progress line (updated per tick).
    pub progress: AtomicU64,
}

/// A connection's protocol error with the connection's number.
#[derive(Clone, Debug)]
pub struct ConnError {
    pub conn: usize,
    pub error: ProtocolError,
}

/// One thread's result.
pub struct ThreadResult {
    pub tally: Tally,
    pub errors: Vec<ConnError>,
    pub error_count: u64,
}

struct Conn {
    id: usize,
    fd: Option<OwnedFd>,
    client: ClientConn,
    out: Vec<u8>,
    out_sent: usize,
    writable: bool,
    in_idle_list: bool,
}

/// Opens a connection (blocking connect, then non-blocking).
pub fn connect(target: &super::Target) -> io::Result<OwnedFd> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let (sock, addr) = match target {
        super::Target::Tcp(a) => (
            Socket::new(Domain::for_address(*a), Type::STREAM, None)?,
            SockAddr::from(*a),
        ),
        super::Target::Unix(p) => (
            Socket::new(Domain::UNIX, Type::STREAM, None)?,
            SockAddr::unix(p)?,
        ),
    };
    sock.connect(&addr)?;
    if matches!(target, super::Target::Tcp(_)) {
        // Each write is a whole batch of commands or a whole body.
        sock.set_tcp_nodelay(true)?;
    }
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Runs one thread's connections until the budget is spent and every
/// connection has said QUIT (or failed). `first_id`: the number of the
/// first connection, for error messages.
pub fn run_thread(
    shared: &Shared,
    fds: Vec<OwnedFd>,
    first_id: usize,
    seed: u64,
) -> io::Result<ThreadResult> {
    let ep = Epoll::new()?;
    let now = Instant::now();
    let mut conns: Vec<Conn> = Vec::with_capacity(fds.len());
    for (i, fd) in fds.into_iter().enumerate() {
        ep.ctl(
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            i as u64,
        )?;
        conns.push(Conn {
            id: first_id + i,
            fd: Some(fd),
            client: ClientConn::new(shared.templates.clone(), shared.style, now),
            out: Vec::new(),
            out_sent: 0,
            writable: true,
            in_idle_list: false,
        });
    }
    let mut lp = Loop {
        shared,
        ep,
        conns,
        idle: Vec::new(),
        tally: Tally::default(),
        errors: Vec::new(),
        error_count: 0,
        open: 0,
        draining: false,
        rng: seed | 1,
        progress_reported: 0,
    };
    lp.open = lp.conns.len();
    lp.run()?;
    Ok(ThreadResult {
        tally: lp.tally,
        errors: lp.errors,
        error_count: lp.error_count,
    })
}

struct Loop<'a> {
    shared: &'a Shared,
    ep: Epoll,
    conns: Vec<Conn>,
    /// Connections ready for a message.
    idle: Vec<usize>,
    tally: Tally,
    errors: Vec<ConnError>,
    error_count: u64,
    open: usize,
    /// The budget is spent: idle connections say QUIT.
    draining: bool,
    rng: u64,
    progress_reported: u64,
}

impl Loop<'_> {
    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        let mut buf = vec![0u8; READ_BUF_BYTES];
        let mut next_tick = Instant::now() + TICK;
        let mut precise = true;
        while self.open > 0 {
            let now = Instant::now();
            let wake_at = self
                .start_messages(now)
                .map_or(next_tick, |t| t.min(next_tick));
            if self.open == 0 {
                break;
            }
            let n = self.ep.wait(
                &mut events,
                wake_at.saturating_duration_since(now),
                &mut precise,
            )?;
            let now = Instant::now();
            for ev in &events[..n] {
                let i = ev.u64 as usize;
                let flags = ev.events;
                if flags & libc::EPOLLOUT as u32 != 0 {
                    self.conns[i].writable = true;
                    self.flush(i, now);
                }
                if flags
                    & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                    != 0
                {
                    self.read(i, now, &mut buf);
                }
            }
            if now >= next_tick {
                next_tick = now + TICK;
                self.tick(now);
            }
        }
        self.publish_progress();
        Ok(())
    }

    /// Starts messages on idle connections while the budget allows; returns
    /// when the rate schedule wants the next one.
    fn start_messages(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&i) = self.idle.last() {
            if self.conns[i].fd.is_none() {
                // Failed while idle (e.g. the server hung up).
                self.idle.pop();
                continue;
            }
            if !self.draining {
                match self.shared.budget.take(now) {
                    Take::Go(scheduled) => {
                        self.idle.pop();
                        self.conns[i].in_idle_list = false;
                        let size = self.pick_size();
                        self.conns[i].client.start_message(size, scheduled);
                        self.flush(i, now);
                        continue;
                    }
                    Take::Wait(at) => return Some(at),
                    Take::Done => self.draining = true,
                }
            }
            self.idle.pop();
            self.conns[i].in_idle_list = false;
            self.conns[i].client.quit();
            self.flush(i, now);
        }
        None
    }

    fn pick_size(&mut self) -> usize {
        if self.shared.templates.sizes.len() == 1 {
            return 0;
        }
        // xorshift64: cheap, and good enough to mix sizes.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.shared.templates.pick((self.rng >> 32) as u32)
    }

    /// Writes what the connection wants to send, as far as the socket takes.
    fn flush(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        let Some(fd) = c.fd.as_ref() else { return };
        c.client.poll_transmit(now, &mut c.out);
        while c.writable && c.out_sent < c.out.len() {
            let rest = &c.out[c.out_sent..];
            // SAFETY: sends from a live slice of our own buffer on a socket
            // we own; MSG_NOSIGNAL turns a closed peer into EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => c.writable = false,
                    io::ErrorKind::Interrupted => {}
                    _ => {
                        let what = format!("send failed: {e}");
                        self.fail(
                            i,
                            ProtocolError {
                                what,
                                reply: String::new(),
                            },
                        );
                        return;
                    }
                }
            } else {
                c.out_sent += n as usize;
            }
        }
        if c.out_sent == c.out.len() {
            c.out.clear();
            c.out_sent = 0;
        }
    }

    fn read(&mut self, i: usize, now: Instant, buf: &mut [u8]) {
        loop {
            let Some(fd) = self.conns[i].fd.as_ref() else {
                return;
            };
            // SAFETY: the kernel writes at most `buf.len()` bytes into our
            // buffer, which stays mutably borrowed for the call.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        let what = format!("recv failed: {e}");
                        self.fail(
                            i,
                            ProtocolError {
                                what,
                                reply: String::new(),
                            },
                        );
                        return;
                    }
                }
            }
            if n == 0 {
                match self.conns[i].client.handle_eof() {
                    Ok(()) => self.close(i),
                    Err(e) => self.fail(i, e),
                }
                return;
            }
            let c = &mut self.conns[i];
            if let Err(e) = c
                .client
                .handle_input(now, &buf[..n as usize], &mut self.tally)
            {
                self.fail(i, e);
                return;
            }
            if (n as usize) < buf.len() {
                // A short read: the socket is drained (edge-triggered loops
                // may stop here; the next data raises a new edge).
                break;
            }
        }
        let c = &mut self.conns[i];
        if c.client.is_closed() {
            self.close(i);
            return;
        }
        self.flush(i, now);
        let c = &mut self.conns[i];
        if c.client.is_idle() && !c.in_idle_list {
            c.in_idle_list = true;
            self.idle.push(i);
        }
    }

    fn tick(&mut self, now: Instant) {
        let limit = self.shared.reply_timeout;
        for i in 0..self.conns.len() {
            if self.conns[i].fd.is_none() {
                continue;
            }
            if let Err(e) = self.conns[i].client.handle_timeout(now, limit) {
                self.fail(i, e);
            }
        }
        self.publish_progress();
    }

    fn publish_progress(&mut self) {
        let done = self.tally.messages + self.tally.messages_failed;
        let delta = done - self.progress_reported;
        if delta > 0 {
            self.shared.progress.fetch_add(delta, Ordering::Relaxed);
            self.progress_reported = done;
        }
    }

    fn fail(&mut self, i: usize, error: ProtocolError) {
        self.error_count += 1;
        if self.errors.len() < ERRORS_KEPT {
            self.errors.push(ConnError {
                conn: self.conns[i].id,
                error,
            });
        }
        self.close(i);
    }

    fn close(&mut self, i: usize) {
        // Dropping the descriptor closes it and removes it from the epoll set.
        if self.conns[i].fd.take().is_some() {
            self.open -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_counts_messages() {
        let b = Budget::new(Some(2), None, None);
        let now = Instant::now();
        assert!(matches!(b.take(now), Take::Go(None)));
        assert!(matches!(b.take(now), Take::Go(None)));
        assert!(matches!(b.take(now), Take::Done));
    }

    #[test]
    fn budget_follows_the_rate_schedule_and_deadline() {
        let start = Instant::now();
        // 1,000 messages/s: one every millisecond.
        let b = Budget::new(
            None,
            Some(start + Duration::from_secs(1)),
            Some((start, 1e6)),
        );
        assert!(matches!(b.take(start), Take::Go(Some(t)) if t == start));
        match b.take(start) {
            Take::Wait(t) => assert_eq!(t, start + Duration::from_millis(1)),
            _ => panic!("the second message is scheduled 1 ms later"),
        }
        // Late: every overdue slot is handed out at once, with its own time.
        let later = start + Duration::from_millis(3);
        assert!(
            matches!(b.take(later), Take::Go(Some(t)) if t == start + Duration::from_millis(1))
        );
        assert!(matches!(b.take(later), Take::Go(Some(_))));
        assert!(matches!(b.take(later), Take::Go(Some(_))));
        assert!(matches!(b.take(later), Take::Wait(_)));
        assert!(matches!(b.take(start + Duration::from_secs(2)), Take::Done));
    }
}
