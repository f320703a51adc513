//! HTTP to our llama-server: health, props, and JSON posts, with the engine's API key.

use std::time::Duration;

use ureq::Agent;

use crate::util::truncate;

/// Largest response body read (a description is a few hundred bytes; an error page a few KiB).
const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// An answer: status and body, whatever the status.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// What `/health` said.
#[derive(Debug)]
pub(crate) enum Health {
    /// 200 with `{"status":"ok"}`.
    Ready,
    /// Anything else that answered (503 while loading, a 200 without "ok", ...), in words.
    NotReady(String),
    /// Nothing answered (connection refused, timeout), in words.
    Unreachable(String),
}

/// A client bound to `http://127.0.0.1:PORT` that authenticates with the engine's API key.
pub(crate) struct Client {
    agent: Agent,
    base: String,
    bearer: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: a Debug print ends up in logs.
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("bearer", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(crate) fn new(port: u16, api_key: &str, slots: u32) -> Client {
        let config = Agent::config_builder()
            .http_status_as_error(false)
            // HTTP(S)_PROXY in the environment must never divert loopback traffic.
            .proxy(None)
            .max_idle_connections_per_host(slots as usize + 2)
            .build();
        Client {
            agent: Agent::new_with_config(config),
            base: format!("http://127.0.0.1:{port}"),
            bearer: format!("Bearer {api_key}"),
        }
    }

    /// Closes the pooled keep-alive connections (a fresh, empty pool replaces the old one), so that a
    /// stopping server has no client connection to wait for.
    pub(crate) fn close_connections(&mut self) {
        self.agent = Agent::new_with_config(self.agent.config().clone());
    }

    pub(crate) fn base_url(&self) -> &str {
        &self.base
    }

    pub(crate) fn get(&self, path: &str, timeout: Duration) -> Result<Reply, ureq::Error> {
        let response = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.bearer)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .call()?;
        read(response)
    }

    /// A GET without the API key: our server must refuse it on every path but `/health`.
    pub(crate) fn get_without_key(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<Reply, ureq::Error> {
        let response = self
            .agent
            .get(format!("{}{path}", self.base))
            .config()
            .timeout_global(Some(timeout))
            .build()
            .call()?;
        read(response)
    }

    pub(crate) fn post_json(
        &self,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Reply, ureq::Error> {
        let response = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", &self.bearer)
            .header("Content-Type", "application/json")
            .config()
            .timeout_global(Some(timeout))
            .build()
            .send(body)?;
        read(response)
    }

    /// One `/health` poll.
    pub(crate) fn health(&self, timeout: Duration) -> Health {
        match self.get("/health", timeout) {
            Ok(reply) => {
                let ok = reply.status == 200
                    && serde_json::from_str::<serde_json::Value>(&reply.body)
                        .is_ok_and(|v| v.get("status").and_then(|s| s.as_str()) == Some("ok"));
                if ok {
                    Health::Ready
                } else {
                    Health::NotReady(format!(
                        "HTTP {} {}",
                        reply.status,
                        truncate(reply.body.trim(), 200)
                    ))
                }
            }
            Err(e) => Health::Unreachable(e.to_string()),
        }
    }
}

fn read(mut response: ureq::http::Response<ureq::Body>) -> Result<Reply, ureq::Error> {
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_string()?;
    Ok(Reply { status, body })
}
