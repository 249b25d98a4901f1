//! Ring set-up and the start-up probe.
//!
//! `build` asks for the cheapest mode the kernel has: SINGLE_ISSUER +
//! DEFER_TASKRUN (6.1: completions are produced only when the shard thread
//! waits, no interrupts of the loop), else COOP_TASKRUN (5.19), else a plain
//! ring; each with TASKRUN_FLAG where the kernel takes it, so that the idle
//! poll (`io::idle_poll`) can see pending work in the SQ ring's flags. A refusal that is not about those flags (EPERM, ENOSYS, ENOMEM) is
//! returned at once.
//!
//! `probe` runs once, in the main thread, before any shard starts. It checks
//! what the shard loop uses, end to end where a flag alone proves nothing:
//! - `io_uring_setup` is allowed (EPERM: seccomp or `kernel.io_uring_disabled`);
//! - `register_probe` lists ACCEPT, RECV, SEND, POLL_ADD and ASYNC_CANCEL;
//! - IORING_FEAT_EXT_ARG (5.11), used to wait with a timeout;
//! - a provided buffer ring registers (5.19) and a multishot recv on a
//!   socketpair (6.0) delivers data from it and stays armed (F_MORE).
//!   Multishot accept (5.19) is older than multishot recv, so it is covered.
//!
//! Must not: keep anything: the probe's ring, sockets and buffers are gone
//! when it returns.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, types};

use super::bufring::BufRing;

/// A ring and what its mode allows.
pub struct Built {
    pub ring: IoUring,
    /// The mode's name for the log.
    pub mode: &'static str,
    /// Whether the loop can see new work without entering the kernel: the
    /// ring sets IORING_SQ_TASKRUN when completions wait to be produced (or,
    /// plain, posts them itself), so idle polling is a memory read.
    pub pollable: bool,
}

/// Builds a ring with the best task-run mode this kernel accepts.
pub fn build(sq_entries: u32, cq_entries: u32) -> io::Result<Built> {
    type Flags = fn(&mut io_uring::Builder);
    let attempts: [(&'static str, bool, Flags); 5] = [
        ("single_issuer+defer_taskrun+taskrun_flag", true, |b| {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag();
        }),
        ("single_issuer+defer_taskrun", false, |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        }),
        ("coop_taskrun+taskrun_flag", true, |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }),
        ("coop_taskrun", false, |b| {
            b.setup_coop_taskrun();
        }),
        ("plain", true, |_| {}),
    ];
    let mut last = None;
    for (mode, pollable, flags) in attempts {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq_entries);
        flags(&mut b);
        match b.build(sq_entries) {
            Ok(ring) => {
                return Ok(Built {
                    ring,
                    mode,
                    pollable,
                });
            }
            // EINVAL: this kernel does not know the flags; try fewer.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Turns a set-up error into what an operator needs to read.
pub fn explain_setup(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            "io_uring_setup: EPERM (blocked by a seccomp profile or kernel.io_uring_disabled=2)"
                .into()
        }
        Some(libc::ENOSYS) => format!(
            "io_uring_setup: ENOSYS (kernel {} built without io_uring, or older than 5.1)",
            kernel_release()
        ),
        Some(libc::ENOMEM) => "io_uring_setup: ENOMEM (ring memory is charged to the memory \
             cgroup and RLIMIT_MEMLOCK on older kernels; raise LimitMEMLOCK or the cgroup limit)"
            .into(),
        _ => format!("io_uring_setup: {e}"),
    }
}

/// Checks that the shard loop can run here. `Ok`: what was found, for the
/// banner. `Err`: why not, with the likely cause.
pub fn probe() -> Result<String, String> {
    let Built { mut ring, mode, .. } = build(8, 16).map_err(|e| explain_setup(&e))?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| {
        format!(
            "io_uring register_probe: {e} (kernel {} is older than 5.6)",
            kernel_release()
        )
    })?;
    let needed = [
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(code, _)| !p.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "io_uring lacks opcodes {missing:?} on kernel {} (6.0 or later needed)",
            kernel_release()
        ));
    }
    if !ring.params().is_feature_ext_arg() {
        return Err(format!(
            "io_uring lacks IORING_FEAT_EXT_ARG on kernel {} (5.11 or later needed)",
            kernel_release()
        ));
    }
    multishot_recv_works(&mut ring)?;
    Ok(format!(
        "{mode}, multishot accept and recv, provided buffer ring, ext_arg waits (kernel {})",
        kernel_release()
    ))
}

/// A multishot recv on a socketpair, from a two-buffer ring: data arrives in
/// a provided buffer and the recv stays armed. Then it is cancelled and its
/// last completion awaited, so nothing the kernel holds outlives the call.
fn multishot_recv_works(ring: &mut IoUring) -> Result<(), String> {
    const UD_RECV: u64 = 1;
    const UD_CANCEL: u64 = 2;
    let release = kernel_release();
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a live local array of two ints the kernel fills.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(format!("probe: socketpair: {}", io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and owned from here on.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut bufs = BufRing::new(2, 64, 0).map_err(|e| format!("probe: mmap: {e}"))?;
    // SAFETY: `bufs` stays alive until it is unregistered below, or leaked
    // if the recv could not be seen to end.
    if let Err(e) = unsafe { bufs.register(&ring.submitter()) } {
        return Err(format!(
            "io_uring provided buffer rings: {e} (kernel {release} is older than 5.19)"
        ));
    }
    let recv = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), bufs.bgid())
        .build()
        .user_data(UD_RECV);
    // SAFETY: the recv points at no memory of ours except the registered
    // buffer group, which lives until the recv's last completion.
    unsafe { ring.submission().push(&recv) }.map_err(|_| "probe: SQ full".to_string())?;
    ring.submit().map_err(|e| format!("probe: submit: {e}"))?;
    // SAFETY: sends 4 bytes from a static buffer on our own socket.
    unsafe {
        libc::send(
            b.as_raw_fd(),
            b"ping".as_ptr().cast(),
            4,
            libc::MSG_NOSIGNAL,
        )
    };

    let mut verdict: Option<Result<(), String>> = None;
    let mut recv_done = false;
    let mut cancelled = false;
    for _ in 0..20 {
        let ts = types::Timespec::from(Duration::from_millis(50));
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => {
                verdict.get_or_insert(Err(format!("probe: io_uring_enter: {e}")));
                break;
            }
        }
        let done: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in done {
            if ud != UD_RECV {
                continue;
            }
            if let Some(bid) = cqueue::buffer_select(flags) {
                bufs.recycle(bid);
            }
            if !cqueue::more(flags) {
                recv_done = true;
            }
            if verdict.is_none() {
                verdict = Some(if res == 4 && cqueue::more(flags) {
                    Ok(())
                } else if res < 0 {
                    Err(format!(
                        "io_uring multishot recv: {} (kernel {release}; 6.0 or later needed)",
                        io::Error::from_raw_os_error(-res)
                    ))
                } else {
                    Err(format!(
                        "io_uring multishot recv: got {res} bytes, flags {flags:#x} (kernel {release})"
                    ))
                });
            }
        }
        if recv_done {
            break;
        }
        if verdict.is_some() && !cancelled {
            cancelled = true;
            let cancel = opcode::AsyncCancel::new(UD_RECV)
                .build()
                .user_data(UD_CANCEL);
            // SAFETY: a cancel points at no memory.
            let _ = unsafe { ring.submission().push(&cancel) };
        }
    }
    if recv_done {
        let _ = bufs.unregister(&ring.submitter());
        drop(bufs);
    } else {
        // The kernel may still own a buffer of the group: keep the memory.
        bufs.leak();
    }
    drop((a, b));
    verdict.unwrap_or_else(|| {
        Err(format!(
            "io_uring multishot recv: no completion within a second (kernel {release})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_say_why() {
        let eperm = explain_setup(&io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(
            eperm,
            "io_uring_setup: EPERM (blocked by a seccomp profile or kernel.io_uring_disabled=2)"
        );
        let enosys = explain_setup(&io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(
            enosys.contains("ENOSYS") && enosys.contains("5.1"),
            "{enosys}"
        );
    }

    #[test]
    fn probe_answers_either_way() {
        // Where io_uring is allowed the probe finds the features; where it is
        // refused it says why. It never panics or hangs.
        match probe() {
            Ok(found) => assert!(found.contains("multishot"), "{found}"),
            Err(why) => assert!(why.contains("io_uring"), "{why}"),
        }
    }
}
