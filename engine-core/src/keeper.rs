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
//! for the server); the server gets default dispositions back before its exec.

use std::io;

use rustix::process::Pid;

/// The keeper's parent-death signal: it only interrupts the keeper's wait.
const PARENT_DIED: libc::c_int = libc::SIGUSR2;

extern "C" fn wake(_: libc::c_int) {}

/// Called in the forked child before exec. Returns in the process that goes on to exec the server;
/// in the keeper it never returns.
///
/// # Safety
/// Only between fork and exec (std's `pre_exec`), where the child has one thread.
pub(crate) unsafe fn split(parent: Pid) -> io::Result<()> {
    // SAFETY (whole function): raw libc calls that are async-signal-safe; every buffer is on the stack.
    unsafe {
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(signal, libc::SIG_IGN);
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = wake as extern "C" fn(libc::c_int) as usize;
        // No SA_RESTART: the signal must end the keeper's wait.
        action.sa_flags = 0;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(PARENT_DIED, &action, std::ptr::null_mut());
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            PARENT_DIED as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let keeper = libc::getpid();
        let server = libc::fork();
        if server < 0 {
            return Err(io::Error::last_os_error());
        }
        if server == 0 {
            // The server: it dies with the keeper, and gets the default dispositions back.
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, PARENT_DIED] {
                libc::signal(signal, libc::SIG_DFL);
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != keeper {
                return Err(io::Error::other("keeper exited during spawn"));
            }
            return Ok(());
        }
        // The keeper holds a copy of the spawn's exec-status pipe; our spawn waits until every copy
        // is closed, so close every descriptor it does not need (it needs none beyond 0-2).
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        keep(parent.as_raw_nonzero().get(), server)
    }
}

/// The keeper's life: reap children; when the server's tree is gone, exit as the server did; when
/// our parent is gone, kill the tree first.
unsafe fn keep(parent: libc::pid_t, server: libc::pid_t) -> ! {
    // SAFETY: async-signal-safe libc calls only (see `split`).
    unsafe {
        // If our parent died before PR_SET_PDEATHSIG took effect, no signal will come.
        let mut orphaned = libc::getppid() != parent;
        let mut server_status: Option<libc::c_int> = None;
        loop {
            let mut status: libc::c_int = 0;
            if orphaned {
                // Kill, reap what died, look again: orphans keep arriving while their parents die.
                kill_children();
                let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if pid < 0 && *libc::__errno_location() == libc::ECHILD {
                    libc::_exit(1);
                }
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
                continue;
            }
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == server {
                server_status = Some(status);
            } else if pid < 0 {
                match *libc::__errno_location() {
                    libc::EINTR => orphaned = libc::getppid() != parent,
                    // No children left: the tree is gone.
                    _ => exit_like(server_status.unwrap_or(0)),
                }
            }
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
