//! Readiness: when a starting server is ready *and ours*. The server's log says so first: it writes
//! a line ending in `: model loaded` right after it turns ready (11434's `srv  llama_server: model
//! loaded`, 9093's `main: model loaded`), and the output drain wakes the wait on that line,
//! which is then confirmed by one `/health` and the `/props` ownership check, and one `GET /slots`
//! shows the server's task loop running (before it, a SIGTERM is lost). For builds or logs that
//! say nothing (`--log-disable`), `/health` is polled every `health_poll_interval` (5 ms by default)
//! until it is 200 `{"status":"ok"}`. Either way the answer must be proven to come from our child,
//! not from another server on the same port.

use std::path::Path;
use std::time::{Duration, Instant};

use super::client::{Client, Health};
use super::error::StartError;
use crate::process::{ChildExit, SupervisedChild};
use crate::util::truncate;
use crate::wait::Wait;

/// How long readiness waits for the task loop to answer `GET /slots`: it answers in microseconds once
/// it runs, and it starts right after the server turns ready; past this the start goes on.
const LOOP_WAIT: Duration = Duration::from_millis(200);

/// Why a start failed, before the server's output is added to make the error complete.
pub(crate) enum StartFailure {
    Exited(ChildExit),
    Cancelled,
    Timeout {
        timeout: Duration,
        last_health: String,
    },
    Error(StartError),
}

/// What a healthy `/health` answer turned out to be.
enum Ownership {
    /// Our child answered: authenticated `/props` names our model, and unauthenticated is refused.
    Ours,
    /// Not sure yet (the answer raced our child's exit, `/props` still loading, …): poll again.
    NotYet(String),
}

/// A server that has been spawned and is not yet known to be ready.
pub(crate) struct Starting<'a> {
    pub(crate) child: &'a SupervisedChild,
    pub(crate) client: &'a Client,
    pub(crate) port: u16,
    /// The model as `-m` names it: `/props` must name the same.
    pub(crate) model: &'a Path,
}

impl Starting<'_> {
    /// Polls `/health` every `poll` until the server is ready and proven ours, for at most
    /// `timeout`, and as long as `wait` allows. The child's exit ends the wait at once.
    pub(crate) fn wait_ready(
        &self,
        poll: Duration,
        timeout: Duration,
        wait: Wait,
    ) -> Result<(), StartFailure> {
        let started = Instant::now();
        let given = wait.deadline();
        // The caller's own time limit, when it is shorter than the startup timeout.
        let (timeout, deadline) = match wait {
            Wait::For(d) if d < timeout => (d, started + d),
            _ => (timeout, started + timeout),
        };
        // The last answer /health gave says more than the last connection error, so keep both.
        let mut last_answer: Option<String> = None;
        let mut last_failure = String::from("no answer yet");
        // Once the ready line has woken a check, the later waits are plain polls.
        let mut line_acted_on = false;
        loop {
            if let Some(status) = self.child.status() {
                return Err(StartFailure::Exited(status));
            }
            if given.is_flag() && given.expired() {
                return Err(StartFailure::Cancelled);
            }
            let poll_timeout = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(500));
            match self.client.health(poll_timeout) {
                Health::Ready => match self.ownership(poll_timeout) {
                    Ok(Ownership::Ours) => {
                        self.wait_for_the_task_loop();
                        tracing::info!(pid = self.child.pid(), port = self.port, elapsed = ?started.elapsed(), "llama-server ready");
                        return Ok(());
                    }
                    Ok(Ownership::NotYet(why)) => last_answer = Some(why),
                    Err(stranger) => return Err(StartFailure::Error(stranger)),
                },
                Health::NotReady(why) => last_answer = Some(why),
                Health::Unreachable(why) => last_failure = why,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StartFailure::Timeout {
                    timeout,
                    last_health: last_answer.unwrap_or(last_failure),
                });
            }
            // Sleeps until the next poll, or wakes the moment the child says it is ready or exits.
            if line_acted_on {
                self.child.wait_timeout(poll.min(left));
            } else {
                line_acted_on = self.child.output().wait_said(poll.min(left)).ready;
            }
        }
    }

    /// Waits, at most [`LOOP_WAIT`], until the server's task loop runs. The real server turns healthy,
    /// then installs its SIGTERM handler, then starts its loop, which begins by marking itself
    /// running: a SIGTERM in between is undone, and only a second one ends the server (exit 1).
    /// `GET /slots` is answered by the loop itself, so once it answers, one SIGTERM stops the
    /// server. Any answer will do (a server started with `--no-slots` refuses at once, and keeps
    /// the window; so does a build without the endpoint): this only narrows a race, and a stop
    /// that loses its SIGTERM still sends a second one.
    fn wait_for_the_task_loop(&self) {
        match self.client.get("/slots", LOOP_WAIT) {
            Ok(reply) if reply.status == 200 => {}
            Ok(reply) => tracing::debug!(
                port = self.port,
                status = reply.status,
                "GET /slots refused (--no-slots, or a build without it): a SIGTERM right after \
                 the start may be lost, and the stop sends a second"
            ),
            Err(e) => {
                tracing::debug!(port = self.port, error = %e, "GET /slots: no answer from the task loop")
            }
        }
    }

    /// Whether the server that answered healthy is our child: still alive, its authenticated
    /// `/props` names our model, and it refuses a request without our key (a squatter that enforces
    /// no key could otherwise pass by naming our model).
    fn ownership(&self, timeout: Duration) -> Result<Ownership, StartError> {
        let reply = match self.client.get("/props", timeout) {
            Ok(reply) => reply,
            Err(e) => return Ok(Ownership::NotYet(format!("/props: {e}"))),
        };
        if self.child.status().is_some() {
            return Ok(Ownership::NotYet(
                "our server exited while another answered".into(),
            ));
        }
        let stranger = |detail: String| StartError::PortInUse {
            port: self.port,
            detail,
        };
        match reply.status {
            200 => {}
            401 | 403 => {
                return Err(stranger(
                    "the server answering there refused this engine's API key: it is another \
                     server, another program's or another engine's"
                        .into(),
                ));
            }
            status => {
                return Ok(Ownership::NotYet(format!(
                    "/props answered HTTP {status} {}",
                    truncate(reply.body.trim(), 200)
                )));
            }
        }
        let props: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_default();
        let ours = self.model.to_string_lossy();
        match props.get("model_path").and_then(|v| v.as_str()) {
            Some(path) if path == ours => {}
            Some(path) => return Err(stranger(format!("it serves model {path}, not {ours}"))),
            None => {
                return Err(stranger(format!(
                    "its /props has no model_path: {}",
                    truncate(&reply.body, 200)
                )));
            }
        }
        match self.client.get_without_key("/props", timeout) {
            Ok(reply) if reply.status == 401 => Ok(Ownership::Ours),
            Ok(reply) => Err(stranger(format!(
                "it answered /props without an API key (HTTP {}), so it does not hold the key this \
                 engine gave its server",
                reply.status
            ))),
            Err(e) => Ok(Ownership::NotYet(format!("/props without a key: {e}"))),
        }
    }
}
