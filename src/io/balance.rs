//! Spreading connections evenly over the shards.
//!
//! Each TCP listener is bound once per shard with SO_REUSEPORT, and the
//! kernel picks a shard by a hash of the connection's addresses. That evens
//! out over thousands of short connections, not over the few long-lived ones
//! MTAs keep (Postfix caches its LMTP connections, Exim's `lmtp` transport
//! batches over one): 16 connections over 2 shards split 6/10 or worse about
//! half the time, and one shard then does most of the work while another
//! idles. The UNIX listener, shared by every shard, goes to whichever shard
//! wakes first.
//!
//! So right after `accept`, before a byte is sent, a shard that holds more
//! connections than the least loaded one hands the new socket to it through
//! that shard's inbox and wakes it (`place`); the receiving shard opens it as
//! if it had accepted it. Counts include connections handed over and not yet
//! opened, so a burst of accepts on one shard spreads out instead of all
//! going to the shard that looked emptiest at the start.
//!
//! Must not: block (an inbox that is full keeps the connection where it is),
//! or lose a socket (one that cannot be handed over is kept).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::waker::Waker;

/// Sockets a shard's inbox holds before others keep theirs instead.
pub const INBOX_MAX: usize = 1024;

/// A socket accepted by one shard for another, before any I/O on it.
#[derive(Debug)]
pub struct Handoff {
    pub fd: OwnedFd,
    /// Index of the listener it came from (the same on every shard).
    pub listener: usize,
}

/// Every shard's inbox and waker, and how many connections each holds.
pub struct Balance {
    /// Connections counted on each shard: sessions, plus sockets handed to
    /// it and not yet opened or refused.
    loads: Box<[AtomicUsize]>,
    inboxes: Box<[(Sender<Handoff>, Arc<Waker>)]>,
}

impl Balance {
    /// One inbox per waker (one per shard); shard `i` gets receiver `i`.
    pub fn new(wakers: &[Arc<Waker>]) -> (Arc<Balance>, Vec<Receiver<Handoff>>) {
        let mut inboxes = Vec::with_capacity(wakers.len());
        let mut receivers = Vec::with_capacity(wakers.len());
        for w in wakers {
            let (tx, rx) = crossbeam_channel::bounded(INBOX_MAX);
            inboxes.push((tx, w.clone()));
            receivers.push(rx);
        }
        let balance = Balance {
            loads: wakers.iter().map(|_| AtomicUsize::new(0)).collect(),
            inboxes: inboxes.into_boxed_slice(),
        };
        (Arc::new(balance), receivers)
    }

    /// Shard `me` accepted `fd` on `listener`. Hands it to the shard with
    /// the fewest connections when that one has fewer than `me` (and wakes
    /// it): `None`. Otherwise, or when that shard's inbox is full, `me`
    /// keeps it: `Some`, to be opened (or refused, then `release`d) here.
    /// Either way the connection is counted on the shard that takes it.
    pub fn place(&self, me: usize, fd: OwnedFd, listener: usize) -> Option<Handoff> {
        let handoff = Handoff { fd, listener };
        let mine = self.load(me);
        let (to, least) = (0..self.loads.len())
            .map(|i| (i, self.load(i)))
            .min_by_key(|&(i, n)| (n, i != me))
            .expect("at least one shard");
        if to == me || least >= mine {
            self.loads[me].fetch_add(1, Ordering::Relaxed);
            return Some(handoff);
        }
        self.loads[to].fetch_add(1, Ordering::Relaxed);
        let (tx, waker) = &self.inboxes[to];
        match tx.try_send(handoff) {
            Ok(()) => {
                waker.wake();
                None
            }
            Err(TrySendError::Full(h) | TrySendError::Disconnected(h)) => {
                self.loads[to].fetch_sub(1, Ordering::Relaxed);
                self.loads[me].fetch_add(1, Ordering::Relaxed);
                Some(h)
            }
        }
    }

    /// A connection counted on `shard` ended: its session closed, or it was
    /// refused (allow-list, connection limit) before becoming one.
    pub fn release(&self, shard: usize) {
        let _ = self.loads[shard]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Connections counted on `shard`.
    pub fn load(&self, shard: usize) -> usize {
        self.loads[shard].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock() -> OwnedFd {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.into()
    }

    fn shards(n: usize) -> (Arc<Balance>, Vec<Receiver<Handoff>>) {
        let wakers: Vec<_> = (0..n).map(|_| Waker::new().unwrap()).collect();
        Balance::new(&wakers)
    }

    #[test]
    fn a_burst_on_one_shard_spreads_evenly() {
        let (b, rx) = shards(4);
        let mut kept = 0;
        for _ in 0..16 {
            if b.place(0, sock(), 0).is_some() {
                kept += 1;
            }
        }
        assert_eq!(kept, 4);
        for (i, r) in rx.iter().enumerate().skip(1) {
            assert_eq!(r.len(), 4, "shard {i}");
            assert_eq!(b.load(i), 4);
        }
        assert_eq!(b.load(0), 4);
    }

    #[test]
    fn a_shard_keeps_what_it_accepts_while_it_is_not_ahead() {
        let (b, rx) = shards(2);
        assert!(b.place(0, sock(), 0).is_some());
        assert!(b.place(1, sock(), 0).is_some());
        assert!(b.place(0, sock(), 1).is_some());
        // Shard 0 is now ahead: the next one goes to shard 1.
        assert!(b.place(0, sock(), 1).is_none());
        let h = rx[1].try_recv().unwrap();
        assert_eq!(h.listener, 1);
        assert_eq!((b.load(0), b.load(1)), (2, 2));
        // A session closing on shard 1 makes it the emptier one again.
        b.release(1);
        assert!(b.place(0, sock(), 0).is_none());
        assert_eq!((b.load(0), b.load(1)), (2, 2));
    }

    #[test]
    fn a_full_inbox_keeps_the_connection_here() {
        let (b, rx) = shards(2);
        for _ in 0..INBOX_MAX {
            b.loads[0].fetch_add(2, Ordering::Relaxed);
            assert!(b.place(0, sock(), 0).is_none());
        }
        b.loads[0].fetch_add(2, Ordering::Relaxed);
        let before = (b.load(0), b.load(1));
        assert!(b.place(0, sock(), 0).is_some());
        assert_eq!((b.load(0), b.load(1)), (before.0 + 1, before.1));
        assert_eq!(rx[1].len(), INBOX_MAX);
    }

    #[test]
    fn a_gone_shard_gets_nothing_and_loses_nothing() {
        let (b, mut rx) = shards(2);
        drop(rx.remove(0));
        assert!(b.place(1, sock(), 0).is_some());
        assert!(b.place(1, sock(), 0).is_some());
        // Shard 0 is emptier but its receiver is gone: shard 1 keeps it.
        assert!(b.place(1, sock(), 0).is_some());
        assert_eq!((b.load(0), b.load(1)), (0, 3));
    }

    #[test]
    fn release_never_goes_below_zero() {
        let (b, _rx) = shards(1);
        b.release(0);
        assert_eq!(b.load(0), 0);
        assert!(b.place(0, sock(), 0).is_some());
        b.release(0);
        b.release(0);
        assert_eq!(b.load(0), 0);
    }
}
