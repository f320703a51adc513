//! [`Wait`]: how long a caller is willing to wait at a step that blocks (a VRAM reading, the GPU
//! lock, a server's start), given as data to the one operation instead of a family of variants;
//! and [`CancellationToken`], the cancellation a caller shares with every step it starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A cancellation that a caller shares with everything it starts, as tokio-util's
/// `CancellationToken`: clones are the same token; [`CancellationToken::cancel`] on any clone
/// cancels them all; a [`child`](CancellationToken::child_token) is cancelled with its parent,
/// or on its own without touching the parent. Steps that wait under [`Wait::Until`] look at it at
/// least every 20 ms and give up, cleaning up what they started.
///
/// ```
/// use engine_core::CancellationToken;
///
/// let run = CancellationToken::new();
/// let starts = run.child_token();     // given up when the work is done, or with the run
/// starts.cancel();
/// assert!(starts.is_cancelled() && !run.is_cancelled());
/// let other = run.child_token();
/// run.clone().cancel();                // Ctrl-C
/// assert!(other.is_cancelled());
/// ```
#[derive(Debug, Clone, Default)]
pub struct CancellationToken {
    flag: Arc<AtomicBool>,
    parent: Option<Arc<CancellationToken>>,
}

impl CancellationToken {
    /// A token nobody has cancelled.
    pub fn new() -> Self {
        CancellationToken::default()
    }

    /// A token that is cancelled once `flag` is set: for a signal handler, which may only store to
    /// an atomic (`signal_hook::flag::register(SIGINT, flag)`).
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        CancellationToken { flag, parent: None }
    }

    /// A token cancelled with this one, or on its own (which leaves this one as it is).
    pub fn child_token(&self) -> CancellationToken {
        CancellationToken {
            flag: Arc::new(AtomicBool::new(false)),
            parent: Some(Arc::new(self.clone())),
        }
    }

    /// Cancels this token, its clones and its children.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Whether this token, or one it descends from, was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire) || self.parent.as_ref().is_some_and(|p| p.is_cancelled())
    }
}

/// How long a blocking step may wait before it gives up (and cleans up what it started).
///
/// ```no_run
/// use std::time::Duration;
/// use engine_core::{CancellationToken, Wait, gpu_lock};
///
/// let guard = gpu_lock(0, Wait::Forever)?;                       // as long as it takes
/// drop(guard);
/// let guard = gpu_lock(0, Wait::For(Duration::ZERO))?;           // try once
/// drop(guard);
/// let ctrl_c = CancellationToken::new();                         // cancelled by a signal handler
/// let guard = gpu_lock(0, Wait::Until(&ctrl_c))?;                // until Ctrl-C
/// # Ok::<(), engine_core::gpu::LockError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub enum Wait<'a> {
    /// As long as it takes (each step's own timeout, such as `startup_timeout`, still holds).
    Forever,
    /// At most this long from the call (zero: try once).
    For(Duration),
    /// Until this token is cancelled (by a Ctrl-C handler, say); steps look at it at least every
    /// 20 ms.
    Until(&'a CancellationToken),
}

impl<'a> Wait<'a> {
    /// The same wait without its time limit: a step's second part (the VRAM reading under a lock
    /// just taken) must not fail for the time the first part used, but still ends on the flag.
    pub(crate) fn without_limit(self) -> Wait<'a> {
        match self {
            Wait::For(_) => Wait::Forever,
            other => other,
        }
    }

    /// The wait as a point in time, fixed at the start of the step.
    pub(crate) fn deadline(self) -> Deadline<'a> {
        match self {
            Wait::Forever => Deadline::Never,
            Wait::For(d) => Deadline::At(Instant::now().checked_add(d)),
            Wait::Until(flag) => Deadline::Flag(flag),
        }
    }
}

/// A [`Wait`] fixed in time at the start of a step: what the step checks as it waits.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Deadline<'a> {
    /// Never gives up.
    Never,
    /// Gives up at this instant (`None`: so far away that it never comes).
    At(Option<Instant>),
    /// Gives up once the token is cancelled.
    Flag(&'a CancellationToken),
}

/// The longest a step blocks before it looks at a flag again.
pub(crate) const FLAG_CHECK: Duration = Duration::from_millis(20);

impl Deadline<'_> {
    /// Whether the wait is over.
    pub(crate) fn expired(self) -> bool {
        match self {
            Deadline::Never | Deadline::At(None) => false,
            Deadline::At(Some(at)) => Instant::now() >= at,
            Deadline::Flag(token) => token.is_cancelled(),
        }
    }

    /// How long to block before looking again, at most `step`; `None` once the wait is over.
    pub(crate) fn slice(self, step: Duration) -> Option<Duration> {
        match self {
            Deadline::Never | Deadline::At(None) => Some(step),
            Deadline::At(Some(at)) => Some(at.saturating_duration_since(Instant::now()).min(step))
                .filter(|d| !d.is_zero()),
            Deadline::Flag(token) => (!token.is_cancelled()).then_some(step.min(FLAG_CHECK)),
        }
    }

    /// Sleeps for `pause`, looking at the flag (if any) as it goes; `false` if the wait ended first
    /// (then it returns at once, or at the deadline).
    pub(crate) fn sleep(self, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return !self.expired();
            }
            match self.slice(left) {
                Some(step) => std::thread::sleep(step),
                None => return false,
            }
        }
    }

    /// Whether this wait ends by a flag (a cancellation) rather than by time.
    pub(crate) fn is_flag(self) -> bool {
        matches!(self, Deadline::Flag(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wait_slices_and_ends_as_it_says() {
        let step = Duration::from_secs(1);
        assert_eq!(Wait::Forever.deadline().slice(step), Some(step));
        assert_eq!(Wait::For(Duration::ZERO).deadline().slice(step), None);
        let token = CancellationToken::new();
        let until = Wait::Until(&token).deadline();
        assert_eq!(until.slice(step), Some(FLAG_CHECK));
        token.cancel();
        assert_eq!(until.slice(step), None);
        assert!(until.expired() && until.is_flag());
        // A wait too long for the clock never ends.
        assert!(!Wait::For(Duration::MAX).deadline().expired());
    }
}
