//! The portable backend: one edge-triggered epoll loop per shard.
//!
//! Used where io_uring is refused (Docker's default seccomp profile,
//! `kernel.io_uring_disabled`, old kernels) or when forced with `--io epoll`.
//! It owns the sockets and does the system calls; everything else is the
//! shard core's.
//!
//! Per connection the loop keeps a `readable` flag (edge-triggered: set by an
//! event, cleared when a read would block, or when a read came back shorter
//! than the buffer: the socket was then drained, and data arriving after it
//! raises a new edge, so the extra `recv` that would only say `EAGAIN` is
//! saved; not once the peer has hung up, since a FIN queued behind the data
//! raises no edge of its own) and an output buffer. A connection
//! is read only while the core wants it read: not while its message is with
//! the spool, and not while the shard is over its in-flight memory bound.
//! Reads go through one 64 KiB shard buffer; a connection gets at most
//! `READS_PER_TURN` reads before others get a turn.
//!
//! Must not: block (every socket is non-blocking, the only wait is
//! `epoll_wait`), or hold a message the core does not know of.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::clock::{End, ShardClock, TICK, Turn};
use super::core::{ShardCore, Slot};
use super::idle_poll::{self, IdlePoll};
use super::listen::Listener;
use super::sys::Epoll;
pub use super::waker::Waker;
use crate::metrics::bump;

const TOKEN_WAKE: u64 = u64::MAX;
/// Listener `i` has token `TOKEN_LISTENER_BASE - i`.
const TOKEN_LISTENER_BASE: u64 = u64::MAX - 1;
const READ_BUF_BYTES: usize = 64 * 1024;
const READS_PER_TURN: usize = 4;
const EVENTS_MAX: usize = 512;

struct Sock {
    fd: OwnedFd,
    out: Vec<u8>,
    out_sent: usize,
    readable: bool,
    /// An event said the peer hung up (or the socket failed): read until
    /// `recv` says so, as no further edge will come.
    hup: bool,
    eof: bool,
}

/// What a shard loop needs from the server.
pub struct ShardParams {
    pub shard_id: usize,
    pub listeners: Vec<Listener>,
    pub waker: Arc<Waker>,
    pub shutdown: Arc<AtomicBool>,
    /// How long to wait for busy sessions after shutdown begins.
    pub shutdown_grace: Duration,
    /// How delivery log lines are written.
    pub delivery_log: super::LogFormat,
    /// The idle poll window (`server.idle_poll_us`); zero: off.
    pub idle_poll: Duration,
    /// Sockets other shards accepted for this one (`io::balance`); woken
    /// through `waker`.
    pub inbox: crossbeam_channel::Receiver<super::balance::Handoff>,
}

/// Runs one shard until shutdown completes.
pub fn run_shard(mut core: ShardCore, params: ShardParams) -> io::Result<()> {
    let ep = Epoll::new()?;
    ep.ctl(
        libc::EPOLL_CTL_ADD,
        params.waker.raw_fd(),
        libc::EPOLLIN as u32,
        TOKEN_WAKE,
    )?;
    for (i, l) in params.listeners.iter().enumerate() {
        // EPOLLEXCLUSIVE: a UNIX listener is shared by every shard; wake one.
        ep.ctl(
            libc::EPOLL_CTL_ADD,
            l.fd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            TOKEN_LISTENER_BASE - i as u64,
        )?;
    }
    let mut lp = Loop {
        core: &mut core,
        ep,
        idle: IdlePoll::new(params.idle_poll),
        params,
        socks: Vec::new(),
        readq: VecDeque::new(),
        buf: vec![0u8; READ_BUF_BYTES],
        dirty: Vec::new(),
        listening: true,
        accept_paused_until: None,
    };
    let result = lp.run();
    tracing::info!(
        shard = lp.params.shard_id,
        work = ?lp.core.metrics_ref().work(),
        "epoll shard stopped"
    );
    result
}

struct Loop<'a> {
    core: &'a mut ShardCore,
    ep: Epoll,
    params: ShardParams,
    socks: Vec<Option<Sock>>,
    readq: VecDeque<Slot>,
    buf: Vec<u8>,
    dirty: Vec<Slot>,
    listening: bool,
    /// After EMFILE/ENFILE the listeners rest a moment instead of spinning.
    accept_paused_until: Option<Instant>,
    idle: IdlePoll,
}

impl Turn for Loop<'_> {
    fn core(&mut self) -> &mut ShardCore {
        self.core
    }
    fn log_deliveries(&mut self) {
        Loop::log_deliveries(self);
    }
    fn stop_listening(&mut self) {
        Loop::stop_listening(self);
    }
    fn resume_listening(&mut self) {
        Loop::resume_listening(self);
    }
    fn accept_paused_until(&mut self) -> &mut Option<Instant> {
        &mut self.accept_paused_until
    }
}

impl Loop<'_> {
    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        // epoll_pwait2 (microsecond timeouts) until the kernel says ENOSYS.
        let mut precise = true;
        let mut clock = ShardClock::new(
            self.params.shard_id,
            self.params.shutdown.clone(),
            self.params.shutdown_grace,
            Instant::now(),
        );
        let mut was_paused = false;
        loop {
            let timeout = if self.readq.is_empty() && !self.params.waker.pending() {
                clock.wait_for(Instant::now())
            } else {
                Duration::ZERO
            };
            let n = if timeout.is_zero() {
                self.ep.wait(&mut events, timeout, &mut precise)?
            } else {
                self.idle_then_wait(&mut events, timeout, &mut precise)?
            };
            let now = Instant::now();
            let mut woke = self.params.waker.take();
            for ev in &events[..n] {
                let (flags, token) = (ev.events, ev.u64);
                if token == TOKEN_WAKE {
                    self.params.waker.clear();
                    woke = true;
                } else if token > TOKEN_LISTENER_BASE - self.params.listeners.len() as u64 {
                    let i = (TOKEN_LISTENER_BASE - token) as usize;
                    self.accept_all(now, i);
                } else {
                    let slot = token as Slot;
                    let Some(s) = self.socks.get_mut(slot).and_then(Option::as_mut) else {
                        continue;
                    };
                    let in_mask =
                        (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
                    let hup_mask = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
                    if flags & hup_mask != 0 {
                        s.hup = true;
                    }
                    if flags & in_mask != 0 && !s.readable {
                        s.readable = true;
                        self.readq.push_back(slot);
                    }
                    if flags & libc::EPOLLOUT as u32 != 0 {
                        self.dirty.push(slot);
                    }
                }
            }
            if woke {
                self.adopt(now);
            }
            clock.after_wait(self, now, woke);
            self.read_turn(now);
            clock.tick(self, now);
            self.service_dirty();
            // Outcomes, or a client leaving with a message that was waiting
            // for the spool, can lift the memory bound: connections skipped
            // while paused have no new edge coming, so queue them again.
            let paused = self.core.is_paused();
            if was_paused && !paused {
                self.requeue_readable();
            }
            was_paused = paused;
            match clock.end(self.core, now) {
                None => {}
                Some(End::Drained) => return Ok(()),
                Some(End::GraceOver) => {
                    for slot in 0..self.socks.len() {
                        if self.socks[slot].is_some() {
                            self.close(slot);
                        }
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Out of work: polls for the adaptive idle window (see `idle_poll`),
    /// then waits.
    fn idle_then_wait(
        &mut self,
        events: &mut [libc::epoll_event],
        timeout: Duration,
        precise: &mut bool,
    ) -> io::Result<usize> {
        let window = self.idle.next_window();
        if !window.is_zero() {
            let mut n = 0;
            let mut failed = None;
            let ep = &self.ep;
            let waker = &self.params.waker;
            let found = idle_poll::poll(window, || {
                if waker.pending() {
                    return true;
                }
                match ep.wait(events, Duration::ZERO, precise) {
                    Ok(k) => n = k,
                    Err(e) => failed = Some(e),
                }
                n > 0 || failed.is_some()
            });
            if let Some(e) = failed {
                return Err(e);
            }
            let m = self.core.metrics_ref();
            if found {
                bump(&m.idle_polls_hit, 1);
                self.idle.record(true);
                return Ok(n);
            }
            bump(&m.idle_polls_missed, 1);
            self.idle.record(false);
        }
        bump(&self.core.metrics_ref().idle_sleeps, 1);
        let waker = &self.params.waker;
        let timeout = if waker.prepare_sleep() {
            timeout
        } else {
            Duration::ZERO
        };
        let r = self.ep.wait(events, timeout, precise);
        waker.awake();
        r
    }

    fn accept_all(&mut self, now: Instant, i: usize) {
        if !self.listening {
            return;
        }
        let lfd = self.params.listeners[i].fd.as_raw_fd();
        loop {
            // SAFETY: no address is asked for (null pointers); the kernel
            // only returns a descriptor.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                    Some(libc::EMFILE) | Some(libc::ENFILE) => {
                        tracing::warn!(
                            shard = self.params.shard_id,
                            "accept: {e}; raise LimitNOFILE (systemd) or `ulimit -n`; pausing accepts for a second"
                        );
                        self.stop_listening();
                        self.accept_paused_until = Some(now + TICK);
                        return;
                    }
                    _ => {
                        tracing::warn!(shard = self.params.shard_id, "accept: {e}");
                        return;
                    }
                }
            }
            // SAFETY: accept4 returned a fresh descriptor that we now own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // Kept here, or handed to a shard with fewer connections.
            if let Some(h) = self.core.place(fd, i) {
                self.open(now, h.listener, h.fd);
            }
        }
    }

    /// Sockets other shards accepted for this one (`io::balance`).
    fn adopt(&mut self, now: Instant) {
        while let Ok(h) = self.params.inbox.try_recv() {
            self.open(now, h.listener, h.fd);
        }
    }

    /// Starts a session on a socket accepted on listener `i` (by this shard
    /// or, handed over, by another).
    fn open(&mut self, now: Instant, i: usize, fd: OwnedFd) {
        let Some(peer) = super::admit(
            &fd,
            &self.params.listeners[i].allow,
            self.core.metrics_ref(),
            self.core.connection_limit(),
        ) else {
            self.core.release_placement();
            return;
        };
        let slot = self.core.open(now, peer);
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if let Err(e) = self
            .ep
            .ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), events, slot as u64)
        {
            tracing::warn!("epoll_ctl add: {e}");
            self.core.hang_up(slot);
            return;
        }
        if self.socks.len() <= slot {
            self.socks.resize_with(slot + 1, || None);
        }
        // Data may already be waiting; the edge for it may have passed.
        self.socks[slot] = Some(Sock {
            fd,
            out: Vec::new(),
            out_sent: 0,
            readable: true,
            hup: false,
            eof: false,
        });
        self.readq.push_back(slot);
    }

    fn stop_listening(&mut self) {
        if !self.listening {
            return;
        }
        self.listening = false;
        for l in &self.params.listeners {
            let _ = self.ep.ctl(libc::EPOLL_CTL_DEL, l.fd.as_raw_fd(), 0, 0);
        }
    }

    fn resume_listening(&mut self) {
        if self.listening || self.params.shutdown.load(Ordering::Acquire) {
            return;
        }
        self.listening = true;
        for (i, l) in self.params.listeners.iter().enumerate() {
            let _ = self.ep.ctl(
                libc::EPOLL_CTL_ADD,
                l.fd.as_raw_fd(),
                (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                TOKEN_LISTENER_BASE - i as u64,
            );
        }
    }

    /// After a pause: every connection with unread data gets a turn.
    fn requeue_readable(&mut self) {
        for (slot, s) in self.socks.iter().enumerate() {
            if s.as_ref().is_some_and(|s| s.readable) {
                self.readq.push_back(slot);
            }
        }
    }

    /// One pass over the connections waiting to be read.
    fn read_turn(&mut self, now: Instant) {
        for _ in 0..self.readq.len() {
            let Some(slot) = self.readq.pop_front() else {
                break;
            };
            if !self
                .socks
                .get(slot)
                .is_some_and(|s| s.as_ref().is_some_and(|s| s.readable))
            {
                continue;
            }
            if !self.core.wants_read(slot) {
                // Waiting for the spool or paused: re-queued by service_dirty
                // or requeue_readable when that changes.
                continue;
            }
            let mut reads = 0;
            let mut again = false;
            while reads < READS_PER_TURN && self.core.wants_read(slot) {
                reads += 1;
                let fd = self.socks[slot].as_ref().expect("live").fd.as_raw_fd();
                // SAFETY: the shard buffer is ours and outlives the call; the
                // kernel writes at most its length.
                let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
                if n > 0 {
                    let n = n as usize;
                    self.core.input(now, slot, &self.buf[..n]);
                    let s = self.socks[slot].as_mut().expect("live");
                    if n < self.buf.len() && !s.hup {
                        // Drained: the next data raises a new edge. (A TCP
                        // urgent mark also ends a read early with data left;
                        // LMTP clients send none, and such a connection
                        // would only wait for its idle timeout.)
                        s.readable = false;
                        again = false;
                        break;
                    }
                    again = true;
                    continue;
                }
                let s = self.socks[slot].as_mut().expect("live");
                if n == 0 {
                    s.readable = false;
                    s.eof = true;
                    self.dirty.push(slot);
                    again = false;
                    break;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        s.readable = false;
                        again = false;
                        break;
                    }
                    Some(libc::EINTR) => continue,
                    _ => {
                        // ECONNRESET and friends: the client is gone.
                        self.close(slot);
                        again = false;
                        break;
                    }
                }
            }
            if again {
                self.readq.push_back(slot);
            }
        }
    }

    /// Sends output, closes finished connections, re-queues readers.
    fn service_dirty(&mut self) {
        self.core.take_dirty(&mut self.dirty);
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &slot in &dirty {
            let Some(s) = self.socks.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if s.out_sent == s.out.len() {
                s.out.clear();
                s.out_sent = 0;
            }
            self.core.take_output(slot, &mut s.out);
            if !self.flush(slot) {
                continue;
            }
            let s = self.socks[slot].as_ref().expect("live");
            let flushed = s.out_sent == s.out.len();
            if flushed && (self.core.should_close(slot) || (s.eof && !self.core.is_busy(slot))) {
                self.close(slot);
            } else if s.readable && self.core.wants_read(slot) {
                self.readq.push_back(slot);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Writes what it can; false if the connection failed and was closed.
    fn flush(&mut self, slot: Slot) -> bool {
        let s = self.socks[slot].as_mut().expect("live");
        while s.out_sent < s.out.len() {
            let rest = &s.out[s.out_sent..];
            // SAFETY: `rest` is borrowed from the connection's buffer for the
            // call; MSG_NOSIGNAL turns a closed peer into EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    s.fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                s.out_sent += n as usize;
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                // EPOLLOUT (edge-triggered) will mark it dirty again.
                Some(libc::EAGAIN) => return true,
                Some(libc::EINTR) => continue,
                _ => {
                    self.close(slot);
                    return false;
                }
            }
        }
        true
    }

    fn close(&mut self, slot: Slot) {
        if let Some(s) = self.socks.get_mut(slot).and_then(Option::take) {
            // Closing the descriptor removes it from the epoll set.
            drop(s);
            self.core.hang_up(slot);
        }
    }

    fn log_deliveries(&mut self) {
        for d in self.core.take_delivered() {
            super::log_delivery(self.params.shard_id, self.params.delivery_log, &d);
        }
    }
}
