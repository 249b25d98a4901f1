//! The io_uring backend: one ring per shard thread, no readiness polling.
//!
//! Per shard: a multishot accept on each listener, a multishot recv per
//! connection that takes buffers from the shard's provided buffer ring, at
//! most one `Send` per connection, and a multishot poll on the spool waker's
//! eventfd. The loop waits with `submit_with_args` and a timeout that ends at
//! the next one-second tick (timeouts are minutes; a second is plenty). It
//! does the same as the epoll backend, in the same order: the shard core
//! decides, this file only moves bytes.
//!
//! Ownership rules (the SAFETY comments below refer to them):
//! - A recv buffer is the kernel's while on the ring, ours from the CQE that
//!   names it until `recycle`, which happens right after `core.input` copied
//!   what it keeps (see `bufring`).
//! - A connection's `sending` buffer is the kernel's from the `Send` SQE until
//!   that send's CQE; meanwhile new output goes to `pending`, and `sending` is
//!   neither written nor reallocated. The connection record, and with it the
//!   buffer and the descriptor, lives until every op on it has completed:
//!   closing means cancel, then wait for the last CQEs, then `close(2)`.
//! - No SQE points at the stack: waits pass their timespec by reference only
//!   for the duration of the `io_uring_enter` call.
//!
//! Back-pressure: a recv is armed only while `core.wants_read`. If data comes
//! from a recv that was armed earlier while the core does not want it (its
//! message is with the spool, or the shard is paused), it is still fed to the
//! core, which keeps it, and the recv is cancelled; it is armed again when the
//! core wants to read. When the shard reaches its memory bound every armed
//! recv is cancelled at once. So beyond what the core asked for, a
//! connection gets at most what its recv delivered before the cancel took
//! effect: the completions of one wait, bounded by the buffer ring.
//!
//! Must not: free memory an in-flight SQE points at, touch a buffer it gave
//! back, or keep a descriptor the kernel may still use.

mod bufring;
mod ring;
mod token;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::clock::{End, ShardClock, TICK, Turn};
use super::core::{ShardCore, Slot};
use super::epoll::{self, ShardParams};
use super::idle_poll::{self, IdlePoll};
use crate::metrics::bump;
use bufring::BufRing;
use token::Kind;

pub use ring::probe;

const SQ_ENTRIES: u32 = 1024;
/// Multishot ops post many CQEs per SQE; overflow is kept by the kernel
/// (IORING_FEAT_NODROP) but costs a slow path, so leave room.
const CQ_ENTRIES: u32 = 8192;
/// 512 buffers of 16 KiB: 8 MiB per shard. Each buffer is back on the ring
/// before the next wait, so this bounds what one wake-up can deliver, not
/// what the shard holds.
const RECV_BUFS: u16 = 512;
const RECV_BUF_BYTES: usize = 16 * 1024;
const BGID: u16 = 0;
/// Submits tried when the SQ is full before giving up on the ring.
const SUBMIT_RETRIES_MAX: usize = 10_000;
/// How long the final teardown waits for cancelled ops to complete.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);

struct Conn {
    fd: OwnedFd,
    generation: u32,
    /// The core's slot; `None` once the connection is closing (the core has
    /// been told) and the record only waits for its last CQEs.
    slot: Option<Slot>,
    /// Owned by the kernel while `send_inflight`.
    sending: Vec<u8>,
    sent: usize,
    send_inflight: bool,
    send_cancelled: bool,
    /// Output produced while a send is in flight.
    pending: Vec<u8>,
    /// A multishot recv is armed (its final CQE, without F_MORE, not seen).
    recv_armed: bool,
    recv_cancelled: bool,
    eof: bool,
}

impl Conn {
    fn idle(&self) -> bool {
        !self.recv_armed && !self.send_inflight
    }
}

/// Runs one shard on io_uring until shutdown completes. If this thread cannot
/// set up its ring (the probe passed, but e.g. memory limits differ), the
/// shard runs on epoll instead and says so.
pub fn run_shard(mut core: ShardCore, params: ShardParams) -> io::Result<()> {
    let ring::Built {
        ring,
        mode,
        pollable,
    } = match ring::build(SQ_ENTRIES, CQ_ENTRIES) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                shard = params.shard_id,
                "{}; this shard runs on epoll",
                ring::explain_setup(&e)
            );
            return epoll::run_shard(core, params);
        }
    };
    let mut bufs = BufRing::new(RECV_BUFS, RECV_BUF_BYTES, BGID)?;
    // SAFETY: `bufs` moves into the loop below, which unregisters it before
    // dropping it, or leaks it when recvs may still be in flight.
    if let Err(e) = unsafe { bufs.register(&ring.submitter()) } {
        tracing::warn!(
            shard = params.shard_id,
            "io_uring buffer ring: {e}; this shard runs on epoll"
        );
        drop(ring);
        return epoll::run_shard(core, params);
    }
    tracing::debug!(shard = params.shard_id, mode, "io_uring shard loop");
    // Without TASKRUN_FLAG pending work is invisible until the next enter.
    let idle = IdlePoll::new(if pollable {
        params.idle_poll
    } else {
        Duration::ZERO
    });
    let listeners = params.listeners.len();
    let mut lp = Loop {
        core: &mut core,
        params,
        ring,
        bufs: Some(bufs),
        conns: Vec::new(),
        free: Vec::new(),
        generation: 0,
        by_slot: Vec::new(),
        accept_armed: vec![false; listeners],
        listening: true,
        accept_paused_until: None,
        wake_armed: false,
        stopping: false,
        paused: false,
        dirty: Vec::new(),
        cqes: Vec::new(),
        stats: UringStats::default(),
        idle,
    };
    let result = lp.run();
    lp.teardown();
    result
}

struct Loop<'a> {
    core: &'a mut ShardCore,
    params: ShardParams,
    ring: IoUring,
    /// `None` only after teardown unregistered or leaked it.
    bufs: Option<BufRing>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    generation: u32,
    /// Core slot to connection index, for open connections.
    by_slot: Vec<Option<u32>>,
    accept_armed: Vec<bool>,
    listening: bool,
    /// After EMFILE/ENFILE (or another accept error) the listeners rest a
    /// moment instead of spinning.
    accept_paused_until: Option<Instant>,
    wake_armed: bool,
    /// Teardown: nothing is armed again.
    stopping: bool,
    /// The core's memory bound was reached at the last look.
    paused: bool,
    dirty: Vec<Slot>,
    cqes: Vec<(u64, i32, u32)>,
    stats: UringStats,
    idle: IdlePoll,
}

/// Counters logged when the shard stops: how often the slow paths ran.
#[derive(Debug, Default)]
struct UringStats {
    recv_armed: u64,
    /// Multishot recvs ended by an empty buffer ring.
    recv_enobufs: u64,
    /// Recvs cancelled because data came while the core did not want it.
    recv_backpressure_cancels: u64,
    /// Times the shard reached its memory bound (every armed recv cancelled).
    pauses: u64,
    sends: u64,
    partial_sends: u64,
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
        self.arm_wake();
        for i in 0..self.accept_armed.len() {
            self.arm_accept(i);
        }
        let mut clock = ShardClock::new(
            self.params.shard_id,
            self.params.shutdown.clone(),
            self.params.shutdown_grace,
            Instant::now(),
        );
        loop {
            self.idle_then_wait(clock.wait_for(Instant::now()))?;
            let now = Instant::now();
            // Both: `take` clears the flag a wake without an eventfd write set.
            let woke = self.params.waker.take() | self.reap(now);
            if woke {
                self.adopt(now);
            }
            clock.after_wait(self, now, woke);
            clock.tick(self, now);
            self.service_dirty();
            match clock.end(self.core, now) {
                None => {}
                // Grace over: teardown closes what is left.
                Some(End::Drained | End::GraceOver) => return Ok(()),
            }
        }
    }

    /// Out of work: polls for the adaptive idle window (see `idle_poll`),
    /// then waits.
    fn idle_then_wait(&mut self, timeout: Duration) -> io::Result<()> {
        if !self.ring.submission().is_empty() {
            // Hand queued sends and re-armed recvs to the kernel first: the
            // replies they carry are what the clients are waiting for, and a
            // send that completes inline is work, not idleness. An error here
            // comes back from the wait below.
            let _ = self.ring.submit();
        }
        if !self.ring.completion().is_empty()
            || self.ring.submission().taskrun()
            || self.params.waker.pending()
        {
            // Not idle: the wait returns at once.
            return self.wait(timeout);
        }
        let window = self.idle.next_window();
        if !window.is_zero() {
            let ring = &mut self.ring;
            let waker = &self.params.waker;
            let found = idle_poll::poll(window, || {
                ring.submission().taskrun() || !ring.completion().is_empty() || waker.pending()
            });
            self.idle.record(found);
            let m = self.core.metrics_ref();
            if found {
                bump(&m.idle_polls_hit, 1);
                // Returns at once: the pending work makes the completion.
                return self.wait(timeout);
            }
            bump(&m.idle_polls_missed, 1);
        }
        bump(&self.core.metrics_ref().idle_sleeps, 1);
        self.wait(timeout)
    }

    /// Submits what is queued and waits for at least one completion or the
    /// timeout.
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        // A pending wake (see `waker::Waker`): submit and run what is ready,
        // but do not block; with nothing of that, no system call at all.
        let want = usize::from(self.params.waker.prepare_sleep());
        if want == 0 {
            self.params.waker.awake();
            let sq = self.ring.submission();
            if sq.is_empty() && !sq.taskrun() && !sq.cq_overflow() {
                return Ok(());
            }
        }
        let r = self.ring.submitter().submit_with_args(want, &args);
        self.params.waker.awake();
        match r {
            Ok(_) => Ok(()),
            // ETIME: the tick; EINTR: a signal; EBUSY: the CQ overflowed and
            // must be reaped first.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Queues an SQE, submitting first if the SQ is full.
    ///
    /// # Safety
    /// Every pointer in `entry` stays valid until its CQE (the ownership rules
    /// in the module doc).
    unsafe fn push(&mut self, entry: squeue::Entry) {
        // submit() hands the whole SQ to the kernel, so one retry normally
        // suffices; a ring that takes nothing for this long is broken.
        for _ in 0..SUBMIT_RETRIES_MAX {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) {
                    tracing::warn!(shard = self.params.shard_id, "io_uring submit: {e}");
                }
                std::thread::yield_now();
            }
        }
        panic!(
            "shard {}: the io_uring submission queue stayed full after {SUBMIT_RETRIES_MAX} submits",
            self.params.shard_id
        );
    }

    /// Handles every completion that has arrived; true if the waker fired.
    fn reap(&mut self, now: Instant) -> bool {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let mut woke = false;
        for &(ud, res, flags) in &cqes {
            let Some((kind, index, generation)) = token::decode(ud) else {
                debug_assert!(false, "unknown user_data {ud:#x}");
                continue;
            };
            match kind {
                Kind::Accept => self.on_accept(now, index as usize, res, flags),
                Kind::Recv => self.on_recv(now, index, generation, res, flags),
                Kind::Send => self.on_send(index, generation, res),
                Kind::Wake => woke |= self.on_wake(res, flags),
                Kind::Cancel => {}
            }
        }
        self.cqes = cqes;
        woke
    }

    // --- the spool waker -------------------------------------------------

    fn arm_wake(&mut self) {
        if self.wake_armed || self.stopping {
            return;
        }
        let fd = self.params.waker.raw_fd();
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(token::encode(Kind::Wake, 0, 0));
        // SAFETY: a poll points at no memory; the eventfd is owned by
        // `params.waker`, which outlives the loop (teardown cancels the poll
        // and waits for its last CQE).
        unsafe { self.push(entry) };
        self.wake_armed = true;
    }

    fn on_wake(&mut self, res: i32, flags: u32) -> bool {
        if !cqueue::more(flags) {
            self.wake_armed = false;
            self.arm_wake();
        }
        if res < 0 {
            return false;
        }
        // Clear the counter before draining, so a wake after this read is
        // seen by the next poll event and none is lost.
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from the shard's own
        // non-blocking eventfd.
        unsafe { libc::read(self.params.waker.raw_fd(), (&mut v as *mut u64).cast(), 8) };
        true
    }

    // --- listeners -------------------------------------------------------

    fn arm_accept(&mut self, i: usize) {
        if self.accept_armed[i] || !self.listening || self.stopping {
            return;
        }
        let fd = self.params.listeners[i].fd.as_raw_fd();
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(token::encode(Kind::Accept, i as u32, 0));
        // SAFETY: a multishot accept carries no address buffer; the listener
        // fd is owned by `params` and outlives the loop (teardown cancels and
        // waits).
        unsafe { self.push(entry) };
        self.accept_armed[i] = true;
    }

    fn stop_listening(&mut self) {
        if !self.listening {
            return;
        }
        self.listening = false;
        for i in 0..self.accept_armed.len() {
            if self.accept_armed[i] {
                self.cancel(token::encode(Kind::Accept, i as u32, 0));
            }
        }
    }

    fn resume_listening(&mut self) {
        if self.listening || self.params.shutdown.load(Ordering::Acquire) {
            return;
        }
        self.listening = true;
        // Accepts whose cancelled predecessor has not ended yet are armed
        // again by `on_accept` when it does.
        for i in 0..self.accept_armed.len() {
            self.arm_accept(i);
        }
    }

    fn on_accept(&mut self, now: Instant, i: usize, res: i32, flags: u32) {
        if i >= self.accept_armed.len() {
            debug_assert!(false, "accept for listener {i}");
            return;
        }
        let more = cqueue::more(flags);
        if !more {
            self.accept_armed[i] = false;
        }
        if res >= 0 {
            // SAFETY: the accept returned a fresh descriptor that we now own.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            if self.listening && !self.stopping {
                // Kept here, or handed to a shard with fewer connections.
                if let Some(h) = self.core.place(fd, i) {
                    self.open(now, h.listener, h.fd);
                }
            }
            // Not listening any more: dropping `fd` closes it.
        } else {
            let e = io::Error::from_raw_os_error(-res);
            match -res {
                libc::ECANCELED | libc::EINTR | libc::ECONNABORTED | libc::EAGAIN => {}
                libc::EMFILE | libc::ENFILE => {
                    tracing::warn!(
                        shard = self.params.shard_id,
                        "accept: {e}; raise LimitNOFILE (systemd) or `ulimit -n`; pausing accepts for a second"
                    );
                    self.pause_accepts(now);
                }
                _ => {
                    tracing::warn!(shard = self.params.shard_id, "accept: {e}");
                    self.pause_accepts(now);
                }
            }
        }
        if !more {
            self.arm_accept(i);
        }
    }

    /// Sockets other shards accepted for this one (`io::balance`).
    fn adopt(&mut self, now: Instant) {
        while let Ok(h) = self.params.inbox.try_recv() {
            self.open(now, h.listener, h.fd);
        }
    }

    fn pause_accepts(&mut self, now: Instant) {
        self.stop_listening();
        self.accept_paused_until = Some(now + TICK);
    }

    // --- connections -----------------------------------------------------

    fn open(&mut self, now: Instant, listener: usize, fd: OwnedFd) {
        let Some(peer) = super::admit(
            &fd,
            &self.params.listeners[listener].allow,
            self.core.metrics_ref(),
            self.core.connection_limit(),
        ) else {
            self.core.release_placement();
            return;
        };
        let slot = self.core.open(now, peer);
        self.generation = self.generation.wrapping_add(1);
        let conn = Conn {
            fd,
            generation: self.generation,
            slot: Some(slot),
            sending: Vec::new(),
            sent: 0,
            send_inflight: false,
            send_cancelled: false,
            pending: Vec::new(),
            recv_armed: false,
            recv_cancelled: false,
            eof: false,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.conns[id as usize] = Some(conn);
                id
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        if self.by_slot.len() <= slot {
            self.by_slot.resize(slot + 1, None);
        }
        debug_assert!(self.by_slot[slot].is_none(), "core slot {slot} reused");
        self.by_slot[slot] = Some(id);
        // The core marked the slot dirty: the greeting goes out and the recv
        // is armed in `service_dirty`.
    }

    fn conn(&mut self, id: u32, generation: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(id as usize)
            .and_then(Option::as_mut)
            .filter(|c| c.generation == generation)
    }

    fn arm_recv(&mut self, id: u32) {
        let Some(c) = self.conns[id as usize].as_mut() else {
            return;
        };
        debug_assert!(!c.recv_armed);
        let entry = opcode::RecvMulti::new(types::Fd(c.fd.as_raw_fd()), BGID)
            .build()
            .user_data(token::encode(Kind::Recv, id, c.generation));
        c.recv_armed = true;
        c.recv_cancelled = false;
        self.stats.recv_armed += 1;
        // SAFETY: the recv writes only into buffers of the registered group
        // (owned by `bufs`, alive until teardown); the fd is owned by the
        // record, which is freed only after the recv's last CQE.
        unsafe { self.push(entry) };
    }

    fn on_recv(&mut self, now: Instant, id: u32, generation: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        let Some(c) = self.conn(id, generation) else {
            // Cannot happen (records outlive their ops); give the buffer back.
            debug_assert!(false, "recv CQE for a freed connection");
            if let Some(bid) = bid {
                self.recycle(bid);
            }
            return;
        };
        if !more {
            c.recv_armed = false;
            c.recv_cancelled = false;
        }
        let slot = c.slot;
        if let Some(bid) = bid {
            if let (Some(slot), true) = (slot, res > 0) {
                let wanted = self.core.wants_read(slot);
                let bufs = self.bufs.as_ref().expect("buffer ring");
                // SAFETY: the CQE named `bid`: the buffer is ours until we
                // recycle it, two lines down; `core.input` copies what it keeps.
                let data = unsafe { bufs.data(bid, res as usize) };
                self.core.input(now, slot, data);
                self.recycle(bid);
                if !wanted && more {
                    // Back-pressure: the core did not ask for this; stop the
                    // recv until it wants to read again.
                    if self.cancel_recv(id) {
                        self.stats.recv_backpressure_cancels += 1;
                    }
                }
            } else {
                self.recycle(bid);
            }
        }
        let Some(slot) = slot else {
            self.maybe_free(id);
            return;
        };
        if res == 0 {
            self.conns[id as usize].as_mut().expect("live").eof = true;
        } else if res < 0 {
            if res == -libc::ENOBUFS {
                self.stats.recv_enobufs += 1;
            }
            match -res {
                // The ring ran dry (buffers are back now) or we cancelled:
                // `service_dirty` re-arms if the core wants to read.
                libc::ENOBUFS | libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                // ECONNRESET and friends: the client is gone.
                _ => {
                    self.close(id);
                    return;
                }
            }
        }
        if !more {
            self.dirty.push(slot);
        }
    }

    fn recycle(&mut self, bid: u16) {
        self.bufs.as_mut().expect("buffer ring").recycle(bid);
    }

    fn cancel(&mut self, user_data: u64) {
        let entry = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(token::encode(Kind::Cancel, 0, 0));
        // SAFETY: a cancel points at no memory.
        unsafe { self.push(entry) };
    }

    /// Cancels the connection's recv; false if none was armed or a cancel
    /// is already on its way.
    fn cancel_recv(&mut self, id: u32) -> bool {
        let c = self.conns[id as usize].as_mut().expect("live");
        if c.recv_armed && !c.recv_cancelled {
            c.recv_cancelled = true;
            let ud = token::encode(Kind::Recv, id, c.generation);
            self.cancel(ud);
            return true;
        }
        false
    }

    /// Starts sending `pending` if no send is in flight.
    fn start_send(&mut self, id: u32) {
        let c = self.conns[id as usize].as_mut().expect("live");
        if c.send_inflight || c.pending.is_empty() {
            return;
        }
        debug_assert!(c.sending.is_empty());
        std::mem::swap(&mut c.sending, &mut c.pending);
        c.sent = 0;
        self.submit_send(id);
    }

    /// Sends what is left of `sending`.
    fn submit_send(&mut self, id: u32) {
        let c = self.conns[id as usize].as_mut().expect("live");
        let rest = &c.sending[c.sent..];
        let len = rest.len().min(u32::MAX as usize) as u32;
        let entry = opcode::Send::new(types::Fd(c.fd.as_raw_fd()), rest.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token::encode(Kind::Send, id, c.generation));
        c.send_inflight = true;
        c.send_cancelled = false;
        self.stats.sends += 1;
        // SAFETY: `sending` belongs to the record, which lives until this
        // send's CQE (closing waits for it); it is not written or resized
        // while `send_inflight` (new output goes to `pending`).
        unsafe { self.push(entry) };
    }

    fn on_send(&mut self, id: u32, generation: u32, res: i32) {
        let Some(c) = self.conn(id, generation) else {
            debug_assert!(false, "send CQE for a freed connection");
            return;
        };
        c.send_inflight = false;
        let Some(slot) = c.slot else {
            self.maybe_free(id);
            return;
        };
        if res < 0 {
            // EPIPE, ECONNRESET: the client is gone.
            self.close(id);
            return;
        }
        c.sent += res as usize;
        if c.sent < c.sending.len() {
            self.stats.partial_sends += 1;
            self.submit_send(id);
            return;
        }
        c.sending.clear();
        c.sent = 0;
        // More output may have been produced meanwhile, or the connection
        // may be ready to close.
        self.dirty.push(slot);
    }

    /// Tells the core the connection is gone, cancels its ops; the record and
    /// its descriptor go when the last CQE has arrived.
    fn close(&mut self, id: u32) {
        let Some(c) = self.conns.get_mut(id as usize).and_then(Option::as_mut) else {
            return;
        };
        if let Some(slot) = c.slot.take() {
            self.by_slot[slot] = None;
            self.core.hang_up(slot);
        }
        let c = self.conns[id as usize].as_mut().expect("live");
        let (gen_, recv, send) = (
            c.generation,
            c.recv_armed && !c.recv_cancelled,
            c.send_inflight && !c.send_cancelled,
        );
        if recv {
            c.recv_cancelled = true;
            self.cancel(token::encode(Kind::Recv, id, gen_));
        }
        if send {
            let c = self.conns[id as usize].as_mut().expect("live");
            c.send_cancelled = true;
            self.cancel(token::encode(Kind::Send, id, gen_));
        }
        self.maybe_free(id);
    }

    /// Frees a closing record once no op on it is in flight; dropping the
    /// record closes the descriptor.
    fn maybe_free(&mut self, id: u32) {
        let c = self.conns[id as usize].as_ref().expect("live");
        if c.slot.is_none() && c.idle() {
            self.conns[id as usize] = None;
            self.free.push(id);
        }
    }

    /// Sends output, closes finished connections, arms recvs.
    fn service_dirty(&mut self) {
        let paused = self.core.is_paused();
        if paused && !self.paused {
            // The memory bound is reached: stop every recv now rather than
            // let each deliver one more batch before its lazy cancel.
            self.stats.pauses += 1;
            for slot in 0..self.by_slot.len() {
                if let Some(id) = self.by_slot[slot] {
                    self.cancel_recv(id);
                }
            }
        }
        if self.paused && !paused {
            // The memory bound lifted (outcomes came back, or a waiting
            // message was dropped): everyone may read again.
            for slot in 0..self.by_slot.len() {
                if self.by_slot[slot].is_some() {
                    self.dirty.push(slot);
                }
            }
        }
        self.paused = paused;
        self.core.take_dirty(&mut self.dirty);
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &slot in &dirty {
            let Some(id) = self.by_slot.get(slot).copied().flatten() else {
                continue;
            };
            let c = self.conns[id as usize].as_mut().expect("live");
            self.core.take_output(slot, &mut c.pending);
            self.start_send(id);
            let c = self.conns[id as usize].as_ref().expect("live");
            let flushed = !c.send_inflight && c.pending.is_empty();
            if flushed && (self.core.should_close(slot) || (c.eof && !self.core.is_busy(slot))) {
                self.close(id);
            } else if !c.recv_armed && !c.eof && self.core.wants_read(slot) {
                self.arm_recv(id);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    fn log_deliveries(&mut self) {
        for d in self.core.take_delivered() {
            super::log_delivery(self.params.shard_id, self.params.delivery_log, &d);
        }
    }

    /// Closes everything, waits (bounded) for the cancelled ops to end, then
    /// gives the buffer ring back. Memory the kernel might still use is
    /// leaked rather than freed.
    fn teardown(&mut self) {
        self.stop_listening();
        self.stopping = true;
        for id in 0..self.conns.len() as u32 {
            if self.conns[id as usize].is_some() {
                self.close(id);
            }
        }
        if self.wake_armed {
            self.cancel(token::encode(Kind::Wake, 0, 0));
        }
        let deadline = Instant::now() + TEARDOWN_WAIT;
        while self.ops_in_flight() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if let Err(e) = self.wait((deadline - now).min(Duration::from_millis(100))) {
                tracing::warn!(shard = self.params.shard_id, "io_uring wait: {e}");
                break;
            }
            self.reap(now);
        }
        let bufs = self.bufs.take();
        if self.ops_in_flight() {
            tracing::warn!(
                shard = self.params.shard_id,
                "io_uring ops still in flight at exit; keeping their memory"
            );
            if let Some(b) = bufs {
                b.leak();
            }
            for c in self.conns.drain(..).flatten() {
                std::mem::forget(c);
            }
        } else if let Some(mut b) = bufs {
            if b.unregister(&self.ring.submitter()).is_err() {
                b.leak();
            }
        }
        tracing::info!(
            shard = self.params.shard_id,
            work = ?self.core.metrics_ref().work(),
            stats = ?self.stats,
            "io_uring shard stopped"
        );
    }

    fn ops_in_flight(&self) -> bool {
        self.wake_armed
            || self.accept_armed.iter().any(|a| *a)
            || self.conns.iter().flatten().any(|c| !c.idle())
    }
}
