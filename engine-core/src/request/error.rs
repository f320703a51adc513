//! What answering a request can fail with ([`RequestError`]). One failed request leaves the engine
//! usable, unless the server died.

use std::path::PathBuf;
use std::time::Duration;

use super::prompt::Subject;
use crate::server::ServerDeath;
use crate::util::tail_suffix;

/// A request could not be answered. One failed request leaves the engine usable, unless the
/// server died ([`RequestError::ServerDied`]).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The server died; every later request of this engine fails the same way at once.
    #[error(
        "llama-server died ({}){} — the engine is unusable; start a new one{}",
        death.status,
        during.as_ref().map(|s| format!(" while answering {s}")).unwrap_or_default(),
        tail_suffix(&death.output_tail)
    )]
    ServerDied {
        /// The frame or request being answered when the death was found, if any.
        during: Option<Subject>,
        /// How it died.
        death: ServerDeath,
    },
    /// An image (a keyframe) was refused before contacting the server.
    #[error("frame {}: {reason}", path.display())]
    BadImage {
        /// The image's path.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A request was refused before contacting the server: a sampling value out of range, images
    /// for a text-only model, nothing to send.
    #[error("{subject}: {reason}")]
    InvalidPrompt {
        /// The request.
        subject: Subject,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The server answered with an HTTP error.
    #[error("{subject}: llama-server answered HTTP {status}: {body}")]
    Http {
        /// The frame or request.
        subject: Subject,
        /// The HTTP status.
        status: u16,
        /// The body (truncated).
        body: String,
    },
    /// No answer within the per-request timeout.
    #[error("{subject}: no answer from llama-server within {timeout:?} — raise `request_timeout`")]
    Timeout {
        /// The frame or request.
        subject: Subject,
        /// The per-request timeout.
        timeout: Duration,
    },
    /// The request failed at the transport level (the server alive).
    #[error("{subject}: request to llama-server failed: {source}")]
    Transport {
        /// The frame or request.
        subject: Subject,
        /// The transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Every attempt returned output that does not match the schema.
    #[error(
        "{subject}: no valid {schema} after {} attempt(s): {}",
        attempts.len(),
        attempts.join("; ")
    )]
    InvalidOutput {
        /// The frame or request.
        subject: Subject,
        /// The schema's name.
        schema: String,
        /// Each attempt's reason, with the raw text (truncated).
        attempts: Vec<String>,
    },
    /// The request does not fit the slot's context: the same request would fail the same way, so it
    /// is not retried.
    #[error(
        "{subject}: {detail} — raise the context per slot (`ctx_size`; the server gets ctx_size × \
         slots), or lower `max_tokens`"
    )]
    ContextExhausted {
        /// The frame or request.
        subject: Subject,
        /// What the server said.
        detail: String,
    },
    /// The item was never sent: every server died before it (the batch's last death is named).
    #[error(
        "{subject}: not attempted — every server died before it (the last with {})",
        last_death.status
    )]
    NoServerLeft {
        /// The frame or request.
        subject: Subject,
        /// The last server's death.
        last_death: ServerDeath,
    },
    /// The item was never sent: the caller stopped the batch before it.
    #[error("{subject}: not attempted — the batch was stopped before it")]
    Cancelled {
        /// The frame or request.
        subject: Subject,
    },
}

impl From<ServerDeath> for RequestError {
    /// The server died, found outside any one request.
    fn from(death: ServerDeath) -> Self {
        RequestError::ServerDied {
            during: None,
            death,
        }
    }
}

impl RequestError {
    /// Names `subject` in a [`RequestError::ServerDied`] that names none yet.
    pub(crate) fn during(self, subject: &Subject) -> Self {
        match self {
            RequestError::ServerDied {
                during: None,
                death,
            } => RequestError::ServerDied {
                during: Some(subject.clone()),
                death,
            },
            other => other,
        }
    }

    /// Whether the item was never sent to a server (the batch stopped, or no server was left).
    pub fn not_attempted(&self) -> bool {
        matches!(
            self,
            RequestError::Cancelled { .. } | RequestError::NoServerLeft { .. }
        )
    }
}
