//! The keeper: a small process between us and the server that makes the server's whole tree die with
//! us, even when we are SIGKILLed and the server sits behind a wrapper script.
//!
//! `PR_SET_PDEATHSIG` reaches only our direct child, and is cleared on fork: with a wrapper that runs
//! llama-server without `exec`, the shell dies with us and the server lives on. So our direct child
//! is this keeper, forked in the spawn's `pre_exec` (before the exec): it makes itself a child
//! subreaper, forks the process that execs the server, and then only waits. Every orphan of the
//! server's tree is re-parented to it. When we die (its parent-death signal wakes it), it SIGKILLs its
//! children until none are left, then exits. When the server's tree ends on its own, it exits with
//! the server's status (or dies by the server's signal), so that we see the exit as before.
//!
//! It runs between fork and exec of a multi-threaded process: only async-signal-safe system calls,
//! no allocation, no locks. The keeper ignores SIGTERM/SIGINT/SIGHUP (a stop's SIGTERM to the group is
//! for the server), blocks and waits for its two signals whatever mask it inherited, and writes no
//! core file; the server gets default dispositions and an empty signal mask back before its exec.

use std::io;
use std::os::fd::RawFd;

use rustix::process::Pid;

/// The keeper's parent-death signal. Blocked and collected with `sigtimedwait`, with SIGCHLD, so that
/// neither can be lost between a check and the wait.
const PARENT_DIED: libc::c_int = libc::SIGUSR2;

/// How long the keeper waits before it looks again anyway (a safety net: nothing is polled for).
const RECHECK: libc::timespec = libc::timespec {
    tv_sec: 1,
    tv_nsec: 0,
};

/// An error that needs no allocation (between fork and exec, none is allowed).
fn os_error(code: libc::c_int) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// Called in the forked child before exec. Returns in the process that goes on to exec the server;
/// in the keeper it never returns. `keep_fd` (the GPU lock's file, say) stays open in the keeper, so
/// that what it holds is released only when the keeper has ended the tree.
///
/// # Safety
/// Only between fork and exec (std's `pre_exec`), where the child has one thread.
pub(crate) unsafe fn split(parent: Pid, keep_fd: Option<RawFd>) -> io::Result<()> {
    // SAFETY (whole function): raw libc calls that are async-signal-safe; every buffer is on the stack.
    unsafe {
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            return Err(last_error());
        }
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(signal, libc::SIG_IGN);
        }
        // An inherited SIG_IGN for SIGCHLD would have the kernel reap our children unseen.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        // Whatever mask we inherited, the keeper's two signals are blocked and collected by
        // sigtimedwait; everything else is as it was.
        let mut waited: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut waited);
        libc::sigaddset(&mut waited, PARENT_DIED);
        libc::sigaddset(&mut waited, libc::SIGCHLD);
        let mut inherited: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, &waited, &mut inherited);
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            PARENT_DIED as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(last_error());
        }
        let keeper = libc::getpid();
        let server = libc::fork();
        if server < 0 {
            return Err(last_error());
        }
        if server == 0 {
            // The server: it dies with the keeper, and gets default dispositions and an empty mask.
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, PARENT_DIED] {
                libc::signal(signal, libc::SIG_DFL);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(last_error());
            }
            if libc::getppid() != keeper {
                return Err(os_error(libc::ESRCH));
            }
            return Ok(());
        }
        // In `ps` the keeper is a copy of our command line; its name at least says what it is.
        libc::prctl(libc::PR_SET_NAME, c"cinecut-keeper".as_ptr(), 0, 0, 0);
        // No core file of ours if the keeper re-raises the server's SIGSEGV or SIGABRT.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        close_all_but(keep_fd);
        keep(parent.as_raw_nonzero().get(), server, &waited)
    }
}

/// Closes every descriptor from 3 up except `keep`. The keeper holds a copy of the spawn's
/// exec-status pipe, and our spawn waits until every copy is closed.
unsafe fn close_all_but(keep: Option<RawFd>) {
    // SAFETY: async-signal-safe libc calls only.
    unsafe {
        let close_range = |from: u32, to: u32| {
            if from <= to && libc::syscall(libc::SYS_close_range, from, to, 0u32) != 0 {
                // Kernels before 5.9: close one by one, up to the descriptor limit.
                let mut limit: libc::rlimit = std::mem::zeroed();
                let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur.min(1 << 20) as u32
                } else {
                    65536
                };
                for fd in from..=to.min(max) {
                    libc::close(fd as libc::c_int);
                }
            }
        };
        match keep {
            Some(fd) if fd >= 3 => {
                close_range(3, fd as u32 - 1);
                close_range(fd as u32 + 1, u32::MAX);
            }
            _ => close_range(3, u32::MAX),
        }
    }
}

/// The keeper's life: reap children; when the server's tree is gone, exit as the server did; when
/// our parent is gone, kill the tree first. Every wait ends on a signal or after [`RECHECK`].
unsafe fn keep(parent: libc::pid_t, server: libc::pid_t, waited: &libc::sigset_t) -> ! {
    // SAFETY: async-signal-safe libc calls only (see `split`).
    unsafe {
        let mut server_status: Option<libc::c_int> = None;
        loop {
            // Reap whatever has ended.
            loop {
                let mut status: libc::c_int = 0;
                let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if pid == server {
                    server_status = Some(status);
                } else if pid == 0 {
                    break;
                } else if pid < 0 {
                    // No children left: the tree is gone.
                    exit_like(server_status.unwrap_or(0));
                }
            }
            if libc::getppid() != parent {
                // Our parent died (even before PR_SET_PDEATHSIG took effect): end the tree. Orphans
                // keep arriving while their parents die, so kill and reap until none are left.
                kill_children();
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
                continue;
            }
            libc::sigtimedwait(waited, std::ptr::null_mut(), &RECHECK);
        }
    }
}

/// SIGKILLs every child (orphans of the tree come back to us as children, and are killed in turn).
unsafe fn kill_children() {
    // SAFETY: async-signal-safe libc calls on stack buffers only.
    unsafe {
        let mut path = [0u8; 64];
        let pid = libc::getpid();
        write_path(&mut path, pid);
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            // Without /proc's children list, the group is the best we can do (it includes us).
            libc::kill(-pid, libc::SIGKILL);
            return;
        }
        let mut buf = [0u8; 4096];
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        let mut value: libc::pid_t = 0;
        for &b in buf.iter().take(n.max(0) as usize) {
            if b.is_ascii_digit() {
                value = value * 10 + libc::pid_t::from(b - b'0');
            } else {
                if value > 0 {
                    libc::kill(value, libc::SIGKILL);
                }
                value = 0;
            }
        }
    }
}

/// Writes `/proc/self/task/PID/children` (NUL-terminated) into `buf`; returns its length.
fn write_path(buf: &mut [u8; 64], pid: libc::pid_t) -> usize {
    let mut at = 0;
    for &b in b"/proc/self/task/" {
        buf[at] = b;
        at += 1;
    }
    let mut digits = [0u8; 12];
    let mut n = 0;
    let mut rest = pid.max(0) as u32;
    loop {
        digits[n] = b'0' + (rest % 10) as u8;
        n += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for i in (0..n).rev() {
        buf[at] = digits[i];
        at += 1;
    }
    for &b in b"/children\0" {
        buf[at] = b;
        at += 1;
    }
    at
}

/// Ends the keeper the way the server ended: the same exit code, or death by the same signal.
unsafe fn exit_like(status: libc::c_int) -> ! {
    // SAFETY: async-signal-safe libc calls only.
    unsafe {
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_children_path_is_written_without_allocating() {
        let mut buf = [0u8; 64];
        let len = super::write_path(&mut buf, 4242);
        assert_eq!(&buf[..len], b"/proc/self/task/4242/children\0");
    }
}
