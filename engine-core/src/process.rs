//! A supervised child process and everything it starts: spawned in its own process group, tied to
//! our life with `PR_SET_PDEATHSIG`, its output drained into bounded buffers, its exit noticed the
//! moment it happens, and its whole process tree stopped with it.
//!
//! One supervisor thread per child does the spawn and the reaping. That thread lives exactly as long
//! as the child, which matters twice over:
//! - `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child exits, not the process. A child
//!   spawned from a caller's short-lived thread would be killed when that thread ends; spawned from the
//!   supervisor, it is killed only when our whole process dies (or after it has exited anyway).
//! - The supervisor notices the exit with `waitid(WNOWAIT)` and reaps only when told to, under the
//!   state lock. Whoever signals the child checks under the same lock that it is not reaped yet. An
//!   unreaped child keeps its pid, and so the process group id, from being recycled: a signal can never
//!   reach a stranger.
//!
//! The child may not be the whole story: a wrapper script that runs llama-server without `exec` leaves
//! the server as a grandchild, which outlives the shell. So stopping keeps the (exited) leader
//! unreaped until its process group is empty, signals the leader by pid too (it may have moved to
//! another group), and sweeps the descendants that left the group: every process of the tree carries a
//! random marker in its environment ([`TREE_MARKER`]), inherited across fork, exec, `setsid` and
//! wrappers, and is signalled through a pidfd only after the marker was read from it.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

use crate::sync::lock;

/// How many bytes of each output stream are kept for error messages.
pub(crate) const OUTPUT_RING_BYTES: usize = 64 * 1024;

/// The environment variable that marks every process of a supervised tree (value: random, per child).
pub const TREE_MARKER: &str = "CINECUT_ENGINE_TREE";

/// How long stop waits after SIGKILL before it reports what is still there instead of waiting on.
const AFTER_KILL_WAIT: Duration = Duration::from_secs(2);

/// How often stop looks for the tree's remaining processes (there is no event for a grandchild's exit).
const TREE_POLL: Duration = Duration::from_millis(5);

/// How a child process ended: an exit code or a signal. Prints as "exit code 1" or
/// "signal 9 (SIGKILL)".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildExit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl ChildExit {
    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == ChildExit::Code(0)
    }

    fn from_status(status: ExitStatus) -> ChildExit {
        match (status.code(), status.signal()) {
            (Some(code), _) => ChildExit::Code(code),
            (None, Some(signal)) => ChildExit::Signal(signal),
            (None, None) => ChildExit::Code(-1),
        }
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChildExit::Code(code) => write!(f, "exit code {code}"),
            ChildExit::Signal(sig) => write!(f, "signal {sig} ({})", signal_name(sig)),
        }
    }
}

/// How far a stop had to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Escalation {
    /// The process (and its tree) had already exited before the stop began.
    AlreadyExited,
    /// It exited after the first SIGTERM.
    Term,
    /// It needed a second SIGTERM (llama-server exits at once on the second).
    SecondTerm,
    /// It ignored both SIGTERMs and was SIGKILLed at the grace deadline.
    Kill,
}

/// A process of the tree that was still there after SIGKILL and the bounded wait that follows it
/// (uninterruptible sleep in a driver, say, or another user's process): reported, not waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// Its pid.
    pub pid: u32,
    /// Its state letter from `/proc/PID/stat` (`D`: uninterruptible sleep, `T`: stopped, …).
    pub state: char,
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (state {})", self.pid, self.state)
    }
}

/// How a stop went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stopped {
    /// The leader's exit; `None` if even SIGKILL did not end it within the bounded wait.
    pub(crate) exit: Option<ChildExit>,
    pub(crate) escalation: Escalation,
    /// Processes of the tree still there at the end.
    pub(crate) left_running: Vec<Leftover>,
}

/// A bounded byte buffer that keeps the newest bytes.
#[derive(Default)]
pub(crate) struct Ring {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

/// The leader's life as the supervisor sees it.
#[derive(Debug, Default)]
struct LeaderState {
    /// Set the moment it exits (it stays unreaped until `reap` is asked for).
    exit: Option<ChildExit>,
    /// Asked for by stop/drop once nothing is left to signal.
    reap: bool,
    /// Done: from here on its pid may belong to anyone.
    reaped: bool,
}

type Shared = Arc<(Mutex<LeaderState>, Condvar)>;

/// A running (or finished) child process under supervision.
#[derive(Debug)]
pub(crate) struct SupervisedChild {
    /// Our direct child: the command itself, or its keeper.
    pid: Pid,
    /// The process that runs the command (the keeper's child), or `pid`.
    command_pid: u32,
    /// The value of [`TREE_MARKER`] in the tree's environment; `None`: only the leader matters.
    marker: Option<String>,
    state: Shared,
    output: Arc<Output>,
    threads: Vec<JoinHandle<()>>,
}

impl SupervisedChild {
    /// Spawns `command` in its own process group with piped output drained into `output` rings (and
    /// copied to `log` when given). Stdin is closed. With `whole_tree`, the command runs under a
    /// keeper (our direct child, see keeper.rs) that takes its whole tree down with us, and every
    /// process of the tree is marked and stopped with it; without, the child is reaped as soon as it
    /// exits (for a probe such as nvidia-smi, which starts nothing that outlives it).
    pub(crate) fn spawn(
        command: Command,
        log: Option<File>,
        whole_tree: bool,
    ) -> io::Result<SupervisedChild> {
        Self::spawn_with(command, log, whole_tree, None)
    }

    /// As [`SupervisedChild::spawn`] for a whole tree, with `keep_fd` (the GPU lock's file) held open
    /// by the keeper until the tree is gone: if we are SIGKILLed, the lock outlives the server.
    pub(crate) fn spawn_tree_keeping(
        command: Command,
        log: Option<File>,
        keep_fd: Option<RawFd>,
    ) -> io::Result<SupervisedChild> {
        Self::spawn_with(command, log, true, keep_fd)
    }

    fn spawn_with(
        mut command: Command,
        log: Option<File>,
        whole_tree: bool,
        keep_fd: Option<RawFd>,
    ) -> io::Result<SupervisedChild> {
        let marker = whole_tree.then(crate::random::hex128).transpose()?;
        if let Some(marker) = &marker {
            command.env(TREE_MARKER, marker);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let parent = rustix::process::getpid();
        if whole_tree {
            // SAFETY: `split` makes only async-signal-safe calls on stack memory (see keeper.rs).
            unsafe {
                command.pre_exec(move || crate::keeper::split(parent, keep_fd));
            }
        } else {
            // SAFETY: the closure only makes two async-signal-safe syscalls (prctl, getppid).
            unsafe {
                command.pre_exec(move || {
                    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                    // If we died between fork and prctl, the death signal will never come. (No
                    // allocation after fork: a plain OS error.)
                    if rustix::process::getppid() != Some(parent) {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }

        let state: Shared = Arc::new((Mutex::new(LeaderState::default()), Condvar::new()));
        let (spawned_tx, spawned_rx) = mpsc::channel();
        let supervisor_state = Arc::clone(&state);
        let supervisor = thread::Builder::new()
            .name("child-supervisor".into())
            .spawn(move || supervise(command, spawned_tx, supervisor_state, whole_tree))?;

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
        let leader = pid.as_raw_nonzero().get() as u32;
        // The keeper forked the command before our spawn returned (see keeper.rs).
        let command_pid = whole_tree
            .then(|| first_child(leader))
            .flatten()
            .unwrap_or(leader);
        let mut child = SupervisedChild {
            pid,
            command_pid,
            marker,
            state,
            output,
            threads: vec![supervisor],
        };
        for (reader, is_stderr) in [
            (Box::new(stdout) as Box<dyn Read + Send>, false),
            (Box::new(stderr), true),
        ] {
            let drain_output = Arc::clone(&child.output);
            let log = log.clone();
            let drain = thread::Builder::new()
                .name("child-output".into())
                .spawn(move || drain(reader, &drain_output, is_stderr, log.as_deref()));
            match drain {
                Ok(handle) => child.threads.push(handle),
                // Without a reader the child could block on a full pipe: do not let it run (drop
                // stops it).
                Err(e) => return Err(e),
            }
        }
        Ok(child)
    }

    /// The child's pid (also its process group id): the keeper's, for a whole tree.
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get() as u32
    }

    /// The pid of the process that runs the command (under the keeper, for a whole tree).
    pub(crate) fn command_pid(&self) -> u32 {
        self.command_pid
    }

    /// The captured output.
    pub(crate) fn output(&self) -> &Output {
        &self.output
    }

    /// How the child ended, if it has.
    pub(crate) fn status(&self) -> Option<ChildExit> {
        lock(&self.state.0).exit
    }

    /// Waits up to `timeout` for the child to exit; returns at once when it does.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<ChildExit> {
        let (state, cvar) = &*self.state;
        let guard = lock(state);
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |s| s.exit.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        guard.exit
    }

    /// Sends `signal` to the leader (by pid: it may have left its group), its process group, and
    /// every marked process of its tree, unless the leader has been reaped.
    fn signal_tree(&self, signal: Signal) {
        let leader = self.pid();
        {
            let guard = lock(&self.state.0);
            if guard.reaped {
                return;
            }
            if signal != Signal::KILL || self.marker.is_none() {
                self.signal_leader_and_group(&guard, signal);
            } else {
                // SIGKILL spares the keeper: it reaps the tree as it dies (orphan zombies would
                // otherwise wait for init), then exits by itself. Each member is signalled through a
                // pidfd, after its group is checked again.
                for pid in proc_pids() {
                    if pid != leader && in_group(pid, leader) {
                        signal_checked(pid, signal, |p| in_group(p, leader));
                    }
                }
            }
        }
        // Marked processes that left the group; those in it were signalled once already.
        if let Some(marker) = &self.marker {
            let escaped = |p: u32| has_marker(p, marker) && !in_group(p, leader);
            for pid in marked_processes(marker) {
                if escaped(pid) {
                    signal_checked(pid, signal, escaped);
                }
            }
        }
    }

    /// Sends `signal` to the leader by pid (it may have left its group) and to its process group.
    /// Takes the state guard: holding it keeps the supervisor from reaping, so the pid and group id
    /// are still ours.
    fn signal_leader_and_group(&self, state: &LeaderState, signal: Signal) {
        if state.reaped {
            return;
        }
        if state.exit.is_none() {
            let _ = rustix::process::kill_process(self.pid, signal);
        }
        let _ = rustix::process::kill_process_group(self.pid, signal);
    }

    /// Lets the supervisor reap the leader as soon as it has exited (it may have already).
    fn allow_reap(&self) -> MutexGuard<'_, LeaderState> {
        let (state, cvar) = &*self.state;
        let mut guard = lock(state);
        guard.reap = true;
        cvar.notify_all();
        guard
    }

    /// The processes of the tree still alive (zombies excluded): the leader's group and the marked ones.
    fn remaining(&self) -> Vec<Leftover> {
        let leader = self.pid();
        let mut left = Vec::new();
        if lock(&self.state.0).reaped {
            // Once reaped, the pid and group id may be anyone's: nothing is reported by them.
            return left;
        }
        if let Some(state) = process_state(leader)
            && state != 'Z'
        {
            left.push(Leftover { pid: leader, state });
        }
        if self.marker.is_none() {
            return left;
        }
        for entry in proc_pids() {
            if entry == leader {
                continue;
            }
            let Some((state, pgrp)) = stat_state_and_group(entry) else {
                continue;
            };
            let marked = self.marker.as_deref().is_some_and(|m| has_marker(entry, m));
            if state != 'Z' && (pgrp == leader || marked) {
                left.push(Leftover { pid: entry, state });
            }
        }
        left
    }

    /// Waits until the leader has exited and the rest of its tree is gone, or `deadline`.
    fn wait_tree_until(&self, deadline: Instant) -> bool {
        loop {
            let exited = self.status().is_some();
            if exited && self.remaining().is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if exited {
                thread::sleep(TREE_POLL.min(left));
            } else {
                self.wait_timeout(TREE_POLL.min(left));
            }
        }
    }

    /// SIGKILLs the tree and waits (at most `wait`) for it to go.
    pub(crate) fn kill_and_wait(&self, wait: Duration) -> Stopped {
        let deadline = Instant::now() + wait;
        self.signal_tree(Signal::KILL);
        let mut gone = self.wait_tree_until(Instant::now() + wait / 2);
        if !gone {
            // A keeper that did not follow its tree (or a tree that kept growing): no more sparing.
            self.signal_leader_and_group(&lock(&self.state.0), Signal::KILL);
            gone = self.wait_tree_until(deadline);
        }
        self.finish(Escalation::Kill, gone)
    }

    /// Stops the child and its tree: SIGTERM, wait half the grace period, SIGTERM again (llama-server
    /// exits at once on the second), wait out the grace period, then SIGKILL and a bounded wait. Every
    /// wait is bounded: what even SIGKILL did not end is reported, not waited for.
    pub(crate) fn stop(&self, grace: Duration) -> Stopped {
        let started = Instant::now();
        if self.status().is_some() && self.remaining().is_empty() {
            return self.finish(Escalation::AlreadyExited, true);
        }
        self.signal_tree(Signal::TERM);
        if self.wait_tree_until(started + grace / 2) {
            return self.finish(Escalation::Term, true);
        }
        tracing::warn!(
            pid = self.pid(),
            "llama-server ignored SIGTERM; sending a second one"
        );
        self.signal_tree(Signal::TERM);
        if self.wait_tree_until(started + grace) {
            return self.finish(Escalation::SecondTerm, true);
        }
        tracing::warn!(
            pid = self.pid(),
            ?grace,
            "llama-server outlived the grace period; SIGKILL"
        );
        self.kill_and_wait(AFTER_KILL_WAIT)
    }

    /// Lets the supervisor reap the leader (if it has exited) and says how the stop went.
    fn finish(&self, escalation: Escalation, gone: bool) -> Stopped {
        let left_running = if gone { Vec::new() } else { self.remaining() };
        if !left_running.is_empty() {
            let list: Vec<String> = left_running.iter().map(Leftover::to_string).collect();
            tracing::error!(pid = self.pid(), left = %list.join(", "), "processes of the server's tree could not be stopped");
        }
        let exit = self.status();
        if exit.is_some() {
            let guard = self.allow_reap();
            // The supervisor reaps at once; wait for it so that no zombie outlives the stop.
            let _ = self
                .state
                .1
                .wait_timeout_while(guard, Duration::from_secs(1), |s| !s.reaped)
                .unwrap_or_else(PoisonError::into_inner);
        }
        Stopped {
            exit,
            escalation,
            left_running,
        }
    }
}

impl Drop for SupervisedChild {
    fn drop(&mut self) {
        let reaped = lock(&self.state.0).reaped;
        if !reaped {
            self.kill_and_wait(AFTER_KILL_WAIT);
        }
        // A leader that even SIGKILL has not ended yet (stuck in a driver) is reaped by its detached
        // supervisor whenever it does end, instead of staying a zombie.
        drop(self.allow_reap());
        // The supervisor ends right after reaping; the drains at EOF. A descendant that escaped could
        // hold a pipe open forever, so the drains get a bounded time and are detached after it. A
        // leader that even SIGKILL did not end is detached with its supervisor.
        let closed = self.output.wait_closed(Duration::from_secs(1));
        let reaped = lock(&self.state.0).reaped;
        let mut threads = self.threads.drain(..);
        if let Some(supervisor) = threads.next()
            && reaped
        {
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

/// Spawns `command`, trying again (up to 10 times, 10 ms apart) while exec fails with ETXTBSY: a
/// program that was just written (a wrapper script, say) stays "busy" while any process forked
/// meanwhile, anywhere in this program, still holds the writer's descriptor until its own exec.
fn spawn_retrying_busy(command: &mut Command) -> io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && tries < 10 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn supervise(
    mut command: Command,
    spawned: mpsc::Sender<io::Result<Spawned>>,
    state: Shared,
    whole_tree: bool,
) {
    let mut child = match spawn_retrying_busy(&mut command) {
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

    // Notice the exit without reaping, so the pid (and group id) stays reserved while others signal.
    let exit = loop {
        match rustix::process::waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            Ok(Some(info)) => {
                break match (info.exit_status(), info.terminating_signal()) {
                    (Some(code), _) => ChildExit::Code(code),
                    (None, Some(signal)) => ChildExit::Signal(signal),
                    (None, None) => ChildExit::Code(-1),
                };
            }
            _ => break ChildExit::Code(-1),
        }
    };
    let (shared, cvar) = &*state;
    let mut guard = lock(shared);
    guard.exit = Some(exit);
    guard.reap |= !whole_tree;
    cvar.notify_all();
    let mut guard = cvar
        .wait_while(guard, |s| !s.reap)
        .unwrap_or_else(PoisonError::into_inner);
    let status = child.wait().map(ChildExit::from_status).unwrap_or(exit);
    guard.exit = Some(status);
    guard.reaped = true;
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

/// The first child of `pid` (from `/proc/PID/task/PID/children`).
fn first_child(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Every pid in /proc.
fn proc_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The state letter and process group of `pid`, from `/proc/PID/stat`.
fn stat_state_and_group(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

fn process_state(pid: u32) -> Option<char> {
    stat_state_and_group(pid).map(|(state, _)| state)
}

/// Whether `/proc/PID/environ` holds `TREE_MARKER=marker`.
fn has_marker(pid: u32, marker: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{TREE_MARKER}={marker}");
    environ
        .split(|b| *b == 0)
        .any(|entry| entry == wanted.as_bytes())
}

/// The live processes whose environment carries `marker`.
fn marked_processes(marker: &str) -> Vec<u32> {
    proc_pids()
        .into_iter()
        .filter(|pid| has_marker(*pid, marker))
        .collect()
}

/// Whether `pid` is in process group `group` (and not a zombie).
fn in_group(pid: u32, group: u32) -> bool {
    stat_state_and_group(pid).is_some_and(|(state, pgrp)| pgrp == group && state != 'Z')
}

/// Signals `pid` through a pidfd opened *before* `still_ours` is checked, so that a pid recycled in
/// between is never hit: the pidfd keeps naming the process it was opened for.
fn signal_checked(pid: u32, signal: Signal, still_ours: impl Fn(u32) -> bool) {
    let Some(pid_value) = Pid::from_raw(pid as i32) else {
        return;
    };
    let Ok(pidfd) = rustix::process::pidfd_open(pid_value, rustix::process::PidfdFlags::empty())
    else {
        return;
    };
    if still_ours(pid) {
        let _ = rustix::process::pidfd_send_signal(&pidfd, signal);
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
    fn exits_print_as_the_engine_always_wrote_them() {
        assert_eq!(ChildExit::Code(1).to_string(), "exit code 1");
        assert_eq!(ChildExit::Signal(6).to_string(), "signal 6 (SIGABRT)");
        assert!(ChildExit::Code(0).success());
        assert!(!ChildExit::Signal(15).success());
    }

    #[test]
    fn exit_of_child_is_noticed_and_reaped() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let child = SupervisedChild::spawn(cmd, None, true).unwrap();
        assert_eq!(
            child.wait_timeout(Duration::from_secs(10)),
            Some(ChildExit::Code(3))
        );
        let stopped = child.stop(Duration::from_secs(1));
        assert_eq!(stopped.escalation, Escalation::AlreadyExited);
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
        let child = SupervisedChild::spawn(cmd, None, true).unwrap();
        // Wait until the trap is installed (the shell printed after setting it).
        wait_for_output(&child, "ready");
        let stopped = child.stop(Duration::from_millis(200));
        assert_eq!(stopped.escalation, Escalation::Kill);
        assert_eq!(stopped.exit, Some(ChildExit::Signal(9)));
        assert!(stopped.left_running.is_empty(), "{stopped:?}");
    }

    #[test]
    fn a_grandchild_that_left_the_group_is_stopped_with_the_tree() {
        // The shell starts a grandchild in a new session (out of our process group), prints its pid
        // and exits: only the marker still ties the grandchild to us.
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "setsid sh -c 'trap \"\" TERM; while :; do sleep 0.01; done' & echo $!; exit 0",
        ]);
        let child = SupervisedChild::spawn(cmd, None, true).unwrap();
        wait_for_output(&child, "\n");
        let grandchild: u32 = lock(&child.output.stdout).text().trim().parse().unwrap();
        let stopped = child.stop(Duration::from_millis(200));
        assert!(stopped.left_running.is_empty(), "{stopped:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_state(grandchild).is_some_and(|s| s != 'Z') {
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} outlived the stop"
            );
            thread::yield_now();
        }
    }

    #[test]
    fn what_even_sigkill_does_not_end_is_reported_not_waited_for() {
        // A spawner outside the group and without the marker keeps starting marked processes: each
        // sweep kills the ones it finds, new ones keep coming. The stop must still end, and say so.
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "M=$CINECUT_ENGINE_TREE; setsid env -i M=$M /bin/sh -c \
             'echo spawner $$; while :; do env CINECUT_ENGINE_TREE=$M sleep 30 & sleep 0.02; done' & \
             exec sleep 30",
        ]);
        let child = SupervisedChild::spawn(cmd, None, true).unwrap();
        // The spawner speaks once it has left the group (before, a stop could catch it still inside).
        wait_for_output(&child, "\n");
        let said = lock(&child.output.stdout).text();
        let spawner: u32 = said
            .trim()
            .strip_prefix("spawner ")
            .unwrap()
            .parse()
            .unwrap();
        let started = Instant::now();
        let stopped = child.stop(Duration::from_millis(100));
        let took = started.elapsed();
        // Kill the spawner and what it left ourselves before asserting, so nothing stays behind.
        let _ = rustix::process::kill_process(Pid::from_raw(spawner as i32).unwrap(), Signal::KILL);
        let marker = child.marker.clone().unwrap();
        for pid in marked_processes(&marker) {
            signal_checked(pid, Signal::KILL, |p| has_marker(p, &marker));
        }
        assert!(took < Duration::from_secs(10), "the stop took {took:?}");
        assert_eq!(stopped.escalation, Escalation::Kill);
        assert!(!stopped.left_running.is_empty(), "{stopped:?}");
        assert!(
            stopped
                .left_running
                .iter()
                .all(|l| l.to_string().contains("state"))
        );
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
        let child = SupervisedChild::spawn(cmd, None, false).unwrap();
        child.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(child.output().wait_closed(Duration::from_secs(5)));
        assert_eq!(child.output().tail(2), "line4\nline5");
    }
}
