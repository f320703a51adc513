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

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

use super::TREE_MARKER;
use super::exit::{ChildExit, Escalation, Leftover, Stopped};
use super::output::{Output, Stream, drain};
use super::procfs::{
    first_child, has_marker, in_group, marked_processes, proc_pids, process_state, signal_checked,
    stat_state_and_group,
};
use crate::util::{hex128, unpoisoned};

/// What a supervised child is: a lone program, or the root of a tree that must end with it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope {
    /// A program that starts nothing that outlives it (a probe such as nvidia-smi): reaped as soon
    /// as it exits.
    Leader,
    /// A server and everything it starts: run under a keeper (our direct child, see keeper.rs)
    /// that takes the whole tree down with us, every process marked and stopped with it. The keeper
    /// holds `keep_fd` (the GPU lock's file) until the tree is gone: if we are SIGKILLed, the lock
    /// outlives the server.
    Tree {
        /// A descriptor the keeper keeps open until the tree is gone.
        keep_fd: Option<RawFd>,
        /// The end of the line the command writes when it is ready, if it writes one.
        ready_line: Option<&'static str>,
    },
}

/// How long stop waits after SIGKILL before it reports what is still there instead of waiting on.
const AFTER_KILL_WAIT: Duration = Duration::from_secs(2);

/// How often stop looks for the tree's remaining processes (there is no event for a grandchild's exit).
const TREE_POLL: Duration = Duration::from_millis(5);

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
    /// copied to `log` when given). Stdin is closed. `scope` says whether it is a lone program or the
    /// root of a tree (see [`Scope`]).
    pub(crate) fn spawn(
        mut command: Command,
        log: Option<File>,
        scope: Scope,
    ) -> io::Result<SupervisedChild> {
        let whole_tree = matches!(scope, Scope::Tree { .. });
        let marker = whole_tree.then(hex128).transpose()?;
        if let Some(marker) = &marker {
            command.env(TREE_MARKER, marker);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let parent = rustix::process::getpid();
        if let Scope::Tree { keep_fd, .. } = scope {
            // SAFETY: `split` makes only async-signal-safe calls on stack memory (see keeper.rs).
            unsafe {
                command.pre_exec(move || super::keeper::split(parent, keep_fd));
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
        let ready_line = match scope {
            Scope::Tree { ready_line, .. } => ready_line,
            Scope::Leader => None,
        };
        let output = Arc::new(Output::watching(ready_line));
        let (spawned_tx, spawned_rx) = mpsc::channel();
        let supervisor_state = Arc::clone(&state);
        let supervisor_output = Arc::clone(&output);
        let supervisor = thread::Builder::new()
            .name("child-supervisor".into())
            .spawn(move || {
                supervise(
                    command,
                    spawned_tx,
                    supervisor_state,
                    scope,
                    &supervisor_output,
                )
            })?;

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
        for (reader, stream) in [
            (Box::new(stdout) as Box<dyn Read + Send>, Stream::Stdout),
            (Box::new(stderr), Stream::Stderr),
        ] {
            let drain_output = Arc::clone(&child.output);
            let log = log.clone();
            let drain = thread::Builder::new()
                .name("child-output".into())
                .spawn(move || drain(reader, &drain_output, stream, log.as_deref()));
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
        unpoisoned(&self.state.0).exit
    }

    /// Waits up to `timeout` for the child to exit; returns at once when it does.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<ChildExit> {
        let (state, cvar) = &*self.state;
        let guard = unpoisoned(state);
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
            let guard = unpoisoned(&self.state.0);
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
        let mut guard = unpoisoned(state);
        guard.reap = true;
        cvar.notify_all();
        guard
    }

    /// The processes of the tree still alive (zombies excluded): the leader's group and the marked ones.
    fn remaining(&self) -> Vec<Leftover> {
        let leader = self.pid();
        let mut left = Vec::new();
        if unpoisoned(&self.state.0).reaped {
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

    /// Starts killing the tree and returns at once (tokio's `start_kill`): SIGKILL to every process
    /// of it, under the state lock, so never to a stranger that took a reaped pid. Requests in
    /// flight end with the server; [`SupervisedChild::stop`] (or drop) then finds the tree gone or
    /// going, and reaps it.
    pub(crate) fn start_kill(&self) {
        self.signal_tree(Signal::KILL);
    }

    /// SIGKILLs the tree and waits (at most `wait`) for it to go.
    pub(crate) fn kill_and_wait(&self, wait: Duration) -> Stopped {
        let deadline = Instant::now() + wait;
        self.signal_tree(Signal::KILL);
        let mut gone = self.wait_tree_until(Instant::now() + wait / 2);
        if !gone {
            // A keeper that did not follow its tree (or a tree that kept growing): no more sparing.
            self.signal_leader_and_group(&unpoisoned(&self.state.0), Signal::KILL);
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
        // Not always a fault: llama-server loses a SIGTERM that arrives after its handler is
        // installed but before its task loop starts (right after ready); the second then exits 1.
        tracing::warn!(
            pid = self.pid(),
            "llama-server did not exit on SIGTERM (it loses one sent just before its task loop starts); sending a second one"
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
        let reaped = unpoisoned(&self.state.0).reaped;
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
        let reaped = unpoisoned(&self.state.0).reaped;
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
    scope: Scope,
    output: &Output,
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
    let mut guard = unpoisoned(shared);
    guard.exit = Some(exit);
    guard.reap |= matches!(scope, Scope::Leader);
    cvar.notify_all();
    output.mark_exited();
    let mut guard = cvar
        .wait_while(guard, |s| !s.reap)
        .unwrap_or_else(PoisonError::into_inner);
    let status = child.wait().map(ChildExit::from_status).unwrap_or(exit);
    guard.exit = Some(status);
    guard.reaped = true;
    cvar.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    const TREE: Scope = Scope::Tree {
        keep_fd: None,
        ready_line: None,
    };

    #[test]
    fn exit_of_child_is_noticed_and_reaped() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let child = SupervisedChild::spawn(cmd, None, TREE).unwrap();
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
        let child = SupervisedChild::spawn(cmd, None, TREE).unwrap();
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
        let child = SupervisedChild::spawn(cmd, None, TREE).unwrap();
        wait_for_output(&child, "\n");
        let grandchild: u32 = unpoisoned(&child.output.stdout)
            .text()
            .trim()
            .parse()
            .unwrap();
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
        let child = SupervisedChild::spawn(cmd, None, TREE).unwrap();
        // The spawner speaks once it has left the group (before, a stop could catch it still inside).
        wait_for_output(&child, "\n");
        let said = unpoisoned(&child.output.stdout).text();
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
        while !unpoisoned(&child.output.stdout).text().contains(needle) {
            assert!(Instant::now() < deadline, "child never printed {needle:?}");
            thread::yield_now();
        }
    }

    #[test]
    fn output_tail_holds_the_last_lines() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "for i in 1 2 3 4 5; do echo line$i >&2; done"]);
        let child = SupervisedChild::spawn(cmd, None, Scope::Leader).unwrap();
        child.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(child.output().wait_closed(Duration::from_secs(5)));
        assert_eq!(child.output().tail(2), "line4\nline5");
    }
}
