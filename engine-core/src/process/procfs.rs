//! What `/proc` says about a supervised tree: its processes, their groups and states, the marker in
//! their environment, and a signal sent only to a process still proven ours.

use rustix::process::{Pid, Signal};

use super::TREE_MARKER;

/// The first child of `pid` (from `/proc/PID/task/PID/children`).
pub(crate) fn first_child(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Every pid in /proc.
pub(crate) fn proc_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The state letter and process group of `pid`, from `/proc/PID/stat`.
pub(crate) fn stat_state_and_group(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

pub(crate) fn process_state(pid: u32) -> Option<char> {
    stat_state_and_group(pid).map(|(state, _)| state)
}

/// Whether `/proc/PID/environ` holds `TREE_MARKER=marker`.
pub(crate) fn has_marker(pid: u32, marker: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{TREE_MARKER}={marker}");
    environ
        .split(|b| *b == 0)
        .any(|entry| entry == wanted.as_bytes())
}

/// The live processes whose environment carries `marker`.
pub(crate) fn marked_processes(marker: &str) -> Vec<u32> {
    proc_pids()
        .into_iter()
        .filter(|pid| has_marker(*pid, marker))
        .collect()
}

/// Whether `pid` is in process group `group` (and not a zombie).
pub(crate) fn in_group(pid: u32, group: u32) -> bool {
    stat_state_and_group(pid).is_some_and(|(state, pgrp)| pgrp == group && state != 'Z')
}

/// Signals `pid` through a pidfd opened *before* `still_ours` is checked, so that a pid recycled in
/// between is never hit: the pidfd keeps naming the process it was opened for.
pub(crate) fn signal_checked(pid: u32, signal: Signal, still_ours: impl Fn(u32) -> bool) {
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
