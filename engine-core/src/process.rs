//! A supervised child process: spawned in its own process group, tied to our life with
//! `PR_SET_PDEATHSIG`, its output drained into bounded buffers, its exit noticed the moment it happens.
//!
//! One supervisor thread per child does the spawn and the reaping. That thread lives exactly as long
//! as the child, which matters twice over:
//! - `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child exits, not the process. A child
//!   spawned from a caller's short-lived thread would be killed when that thread ends; spawned from the
//!   supervisor, it is killed only when our whole process dies (or after it has exited anyway).
//! - The supervisor waits with `waitid(WNOWAIT)`, then reaps under the state lock. Whoever signals the
//!   child checks under the same lock that it is not reaped yet, so a signal can never reach a recycled
//!   pid.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

/// How many bytes of each output stream are kept for error messages.
pub(crate) const OUTPUT_RING_BYTES: usize = 64 * 1024;

/// A bounded byte buffer that keeps the newest bytes.
#[derive(Default)]
pub(crate) struct Ring {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ring({} bytes kept, {} dropped)",
            self.bytes.len(),
            self.dropped
        )
    }
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(OUTPUT_RING_BYTES);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// Whether older bytes were dropped to stay within the bound.
    pub(crate) fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The kept bytes as (lossy) UTF-8.
    pub(crate) fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut all = Vec::with_capacity(a.len() + b.len());
        all.extend_from_slice(a);
        all.extend_from_slice(b);
        String::from_utf8_lossy(&all).into_owned()
    }
}

/// The child's stdout and stderr, each kept to its newest [`OUTPUT_RING_BYTES`].
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub(crate) stdout: Mutex<Ring>,
    pub(crate) stderr: Mutex<Ring>,
    /// How many of the two streams reached EOF, and a signal for each that does.
    closed: (Mutex<u8>, Condvar),
}

impl Output {
    fn mark_closed(&self) {
        *lock(&self.closed.0) += 1;
        self.closed.1.notify_all();
    }

    /// Waits up to `timeout` for both streams to reach EOF, so that the rings hold all the output of a
    /// child that has exited. Returns whether they did.
    pub(crate) fn wait_closed(&self, timeout: Duration) -> bool {
        let guard = lock(&self.closed.0);
        let (guard, _) = self
            .closed
            .1
            .wait_timeout_while(guard, timeout, |n| *n < 2)
            .unwrap_or_else(PoisonError::into_inner);
        *guard >= 2
    }

    /// The last `lines` lines of stderr, then of stdout (llama-server logs to stderr).
    pub(crate) fn tail(&self, lines: usize) -> String {
        let mut parts = Vec::new();
        for ring in [&self.stderr, &self.stdout] {
            let text = lock(ring).text();
            let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let start = kept.len().saturating_sub(lines);
            if start < kept.len() {
                parts.push(kept[start..].join("\n"));
            }
        }
        parts.join("\n")
    }
}

#[derive(Debug, Default)]
struct ExitState {
    status: Option<ExitStatus>,
}

/// A running (or finished) child process under supervision.
#[derive(Debug)]
pub(crate) struct SupervisedChild {
    pid: Pid,
    exit: Arc<(Mutex<ExitState>, Condvar)>,
    output: Arc<Output>,
    threads: Vec<JoinHandle<()>>,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Escalation {
    /// The process had already exited before the stop began.
    AlreadyExited,
    /// It exited after the first SIGTERM.
    Term,
    /// It needed a second SIGTERM (llama-server exits at once on the second).
    SecondTerm,
    /// It ignored both SIGTERMs and was SIGKILLed at the grace deadline.
    Kill,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SupervisedChild {
    /// Spawns `command` in its own process group with piped output drained into `output` rings (and
    /// copied to `log` when given). Stdin is closed.
    pub(crate) fn spawn(mut command: Command, log: Option<File>) -> io::Result<SupervisedChild> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let parent = rustix::process::getpid();
        // SAFETY: the closure only makes two async-signal-safe syscalls (prctl, getppid) and builds an
        // io::Error on the failure path, as std's own pre_exec users do.
        unsafe {
            command.pre_exec(move || {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                // If we died between fork and prctl, the death signal will never come: give up now.
                if rustix::process::getppid() != Some(parent) {
                    return Err(io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }

        let exit = Arc::new((Mutex::new(ExitState::default()), Condvar::new()));
        let (spawned_tx, spawned_rx) = mpsc::channel();
        let supervisor_exit = Arc::clone(&exit);
        let supervisor = thread::Builder::new()
            .name("child-supervisor".into())
            .spawn(move || supervise(command, spawned_tx, supervisor_exit))?;

        let (pid, stdout, stderr) = match spawned_rx.recv() {
            Ok(Ok(spawned)) => spawned,
            Ok(Err(e)) => {
                let _ = supervisor.join();
                return Err(e);
            }
            Err(_) => {
                let _ = supervisor.join();
                return Err(io::Error::other(
                    "child supervisor thread ended unexpectedly",
                ));
            }
        };

        let output = Arc::new(Output::default());
        let log = log.map(|f| Arc::new(Mutex::new(f)));
        let mut threads = vec![supervisor];
        for (reader, is_stderr) in [
            (Box::new(stdout) as Box<dyn Read + Send>, false),
            (Box::new(stderr), true),
        ] {
            let drain_output = Arc::clone(&output);
            let log = log.clone();
            let drain = thread::Builder::new()
                .name("child-output".into())
                .spawn(move || drain(reader, &drain_output, is_stderr, log.as_deref()));
            match drain {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    // Without a reader the child could block on a full pipe: do not let it run.
                    let child = SupervisedChild {
                        pid,
                        exit,
                        output,
                        threads,
                    };
                    child.kill_and_wait();
                    return Err(e);
                }
            }
        }
        Ok(SupervisedChild {
            pid,
            exit,
            output,
            threads,
        })
    }

    /// The child's pid (also its process group id).
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get() as u32
    }

    /// The captured output.
    pub(crate) fn output(&self) -> &Output {
        &self.output
    }

    /// The exit status, if the child has exited (and been reaped).
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        lock(&self.exit.0).status
    }

    /// Waits up to `timeout` for the child to exit; returns at once when it does.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let (state, cvar) = &*self.exit;
        let guard = lock(state);
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |s| s.status.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        guard.status
    }

    /// Waits for the child to exit.
    pub(crate) fn wait(&self) -> ExitStatus {
        let (state, cvar) = &*self.exit;
        let guard = lock(state);
        let guard = cvar
            .wait_while(guard, |s| s.status.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        guard
            .status
            .expect("wait_while returns once a status is set")
    }

    /// Sends `signal` to the child's process group unless the child has already been reaped.
    /// Returns whether the signal was sent.
    pub(crate) fn signal_group(&self, signal: Signal) -> bool {
        let guard = lock(&self.exit.0);
        if guard.status.is_some() {
            return false;
        }
        // Holding the lock keeps the supervisor from reaping, so the group id is still ours.
        rustix::process::kill_process_group(self.pid, signal).is_ok()
    }

    /// SIGKILLs the group and waits for the exit.
    pub(crate) fn kill_and_wait(&self) -> ExitStatus {
        self.signal_group(Signal::KILL);
        self.wait()
    }

    /// Stops the child: SIGTERM, wait half the grace period, SIGTERM again (llama-server exits at once
    /// on the second), wait out the grace period, then SIGKILL. Returns the status and how far it went.
    pub(crate) fn stop(&self, grace: Duration) -> (ExitStatus, Escalation) {
        if let Some(status) = self.status() {
            return (status, Escalation::AlreadyExited);
        }
        let deadline = Instant::now() + grace;
        self.signal_group(Signal::TERM);
        if let Some(status) = self.wait_timeout(grace / 2) {
            return (status, Escalation::Term);
        }
        tracing::warn!(
            pid = self.pid(),
            "llama-server ignored SIGTERM; sending a second one"
        );
        self.signal_group(Signal::TERM);
        if let Some(status) = self.wait_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            return (status, Escalation::SecondTerm);
        }
        tracing::warn!(
            pid = self.pid(),
            ?grace,
            "llama-server outlived the grace period; SIGKILL"
        );
        (self.kill_and_wait(), Escalation::Kill)
    }
}

impl Drop for SupervisedChild {
    fn drop(&mut self) {
        if self.status().is_none() {
            self.kill_and_wait();
        }
        // The supervisor ends right after reaping; the drains at EOF. A grandchild that left the group
        // could hold a pipe open forever, so the drains get a bounded time and are detached after it.
        let closed = self.output.wait_closed(Duration::from_secs(1));
        let mut threads = self.threads.drain(..);
        if let Some(supervisor) = threads.next() {
            let _ = supervisor.join();
        }
        if closed {
            for drain in threads {
                let _ = drain.join();
            }
        }
    }
}

type Spawned = (Pid, std::process::ChildStdout, std::process::ChildStderr);

fn supervise(
    mut command: Command,
    spawned: mpsc::Sender<io::Result<Spawned>>,
    exit: Arc<(Mutex<ExitState>, Condvar)>,
) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = spawned.send(Err(e));
            return;
        }
    };
    let pid = Pid::from_child(&child);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        let _ = spawned.send(Err(io::Error::other("child output was not piped")));
        return;
    };
    let _ = spawned.send(Ok((pid, stdout, stderr)));

    // Wait for the exit without reaping, so the pid stays reserved while others may signal it.
    while let Err(rustix::io::Errno::INTR) = rustix::process::waitid(
        WaitId::Pid(pid),
        WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
    ) {}
    let (state, cvar) = &*exit;
    let mut guard = lock(state);
    let status = child
        .wait()
        .unwrap_or_else(|_| ExitStatus::from_raw(0x7f00));
    guard.status = Some(status);
    cvar.notify_all();
}

fn drain(
    mut reader: Box<dyn Read + Send>,
    output: &Output,
    is_stderr: bool,
    log: Option<&Mutex<File>>,
) {
    let ring = if is_stderr {
        &output.stderr
    } else {
        &output.stdout
    };
    let mut buf = [0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                lock(ring).push(&buf[..n]);
                if let Some(log) = log {
                    // A full disk must not stop the drain (the child would block): drop log bytes.
                    let _ = lock(log).write_all(&buf[..n]);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    output.mark_closed();
}

/// An exit status in words: "exit code 1" or "signal 9 (SIGKILL)".
pub(crate) fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(sig) => format!("signal {sig} ({})", signal_name(sig)),
        None => format!("{status}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "other signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut ring = Ring::default();
        ring.push(&vec![b'a'; OUTPUT_RING_BYTES]);
        ring.push(b"tail");
        assert!(ring.truncated());
        let text = ring.text();
        assert_eq!(text.len(), OUTPUT_RING_BYTES);
        assert!(text.ends_with("tail"));
    }

    #[test]
    fn exit_of_child_is_noticed_and_reaped() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let child = SupervisedChild::spawn(cmd, None).unwrap();
        let status = child.wait();
        assert_eq!(status.code(), Some(3));
        let pid = child.pid;
        drop(child);
        // Reaped: no zombie, no process.
        assert!(rustix::process::test_kill_process(pid).is_err());
    }

    #[test]
    fn stop_escalates_to_kill_when_term_is_ignored() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.01; done",
        ]);
        let child = SupervisedChild::spawn(cmd, None).unwrap();
        // Wait until the trap is installed (the shell printed after setting it).
        wait_for_output(&child, "ready");
        let (status, escalation) = child.stop(Duration::from_millis(200));
        assert_eq!(escalation, Escalation::Kill);
        assert_eq!(status.signal(), Some(9));
        assert_eq!(describe_status(status), "signal 9 (SIGKILL)");
    }

    /// Waits (bounded) until the child has printed `needle` on stdout: the child's own signal that it
    /// reached a point, not a guess at how long that takes.
    fn wait_for_output(child: &SupervisedChild, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lock(&child.output.stdout).text().contains(needle) {
            assert!(Instant::now() < deadline, "child never printed {needle:?}");
            thread::yield_now();
        }
    }

    #[test]
    fn output_tail_holds_the_last_lines() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "for i in 1 2 3 4 5; do echo line$i >&2; done"]);
        let child = SupervisedChild::spawn(cmd, None).unwrap();
        child.wait();
        assert!(child.output().wait_closed(Duration::from_secs(5)));
        assert_eq!(child.output().tail(2), "line4\nline5");
    }
}
