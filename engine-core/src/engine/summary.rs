//! A run's summary: what a batch did, in numbers a person can read and a program can compare
//! (the CLI's `--summary FILE`, Python's `last_summary`, and the library's [`Batch::summary`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::schedule::{Batch, ServerRun};
use crate::request::Answer;
use crate::request::RequestError;

/// When a run began, when it could first answer (the first server ready), and when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunTimes {
    /// The run began (before any server started).
    pub started: SystemTime,
    /// The first server was ready.
    pub ready: SystemTime,
    /// The last item ended.
    pub finished: SystemTime,
}

/// What a run did. Serialises as the CLI's `--summary` file.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Summary {
    /// Items in the batch.
    pub items: usize,
    /// Items answered.
    pub answered: usize,
    /// Items that failed (a server's death while answering included, and the items the caller
    /// refused before sending).
    pub failed: usize,
    /// Items never sent (the batch was stopped, or every server died first).
    pub not_attempted: usize,
    /// Items answered whose answer the caller could not keep (a line a full disk refused): not
    /// counted as answered, nor in the tokens and latencies. The four counts add up to `items`.
    pub not_written: usize,
    /// Attempts made beyond the first, for invalid output, over all items.
    pub retries: u64,
    /// From the run's start to its last item's end, in seconds (the servers' start included).
    pub wall_s: f64,
    /// From the first server ready to the last item's end, in seconds.
    pub serving_s: f64,
    /// Answered items per second of wall time.
    pub items_per_s: f64,
    /// The answered items' latency, from first attempt to answer, in milliseconds.
    pub latency_ms: Latency,
    /// Tokens, as the servers counted them.
    pub tokens: Tokens,
    /// What each server did.
    pub gpus: Vec<GpuSummary>,
    /// When the run began, as RFC 3339 (UTC).
    pub started_at: String,
    /// When the first server was ready, as RFC 3339 (UTC).
    pub ready_at: String,
    /// When the run ended, as RFC 3339 (UTC).
    pub finished_at: String,
    /// The same three moments, in seconds since the Unix epoch.
    pub started_at_unix_s: f64,
    /// See `started_at_unix_s`.
    pub ready_at_unix_s: f64,
    /// See `started_at_unix_s`.
    pub finished_at_unix_s: f64,
}

/// Latency percentiles in milliseconds (nearest rank); zero when nothing was answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Latency {
    /// The median.
    pub p50: f64,
    /// The 95th percentile.
    pub p95: f64,
    /// The slowest.
    pub max: f64,
}

/// Tokens of a run, and their rate over its serving time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Tokens {
    /// Prompt tokens (images' embeddings included).
    pub prompt: u64,
    /// Generated tokens.
    pub generated: u64,
    /// Prompt tokens per second of serving time.
    pub prompt_per_s: f64,
    /// Generated tokens per second of serving time.
    pub generated_per_s: f64,
}

/// What one GPU's servers did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GpuSummary {
    /// The GPU (nvidia-smi index).
    pub gpu: u32,
    /// Its UUID.
    pub uuid: String,
    /// How many servers ran on it.
    pub servers: usize,
    /// Items its servers answered.
    pub answered: usize,
    /// Items its servers failed (a death excluded: those items went to another server).
    pub failed: usize,
    /// How its first server to die died (`exit code 1`, `signal 6 (SIGABRT)`), or null.
    pub died: Option<String>,
    /// What each of its servers did, in order.
    pub each: Vec<ServerSummary>,
}

/// What one server did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ServerSummary {
    /// Items it answered.
    pub answered: usize,
    /// Items it failed (a death excluded).
    pub failed: usize,
    /// How it died, or null.
    pub died: Option<String>,
    /// Items it was answering when it died, which another server took.
    pub handed_over: usize,
}

/// What became of a batch's outcomes at the caller's end, for its [`Summary`]: the items the
/// caller refused before sending (each counted as failed, beside the batch's), and whether each
/// outcome was kept (an answer whose line a full disk refused is counted as not written).
#[derive(Clone, Copy)]
pub struct Delivery<'a> {
    /// Items refused before sending, not in the batch.
    pub refused: usize,
    /// Whether the outcome of the batch's item `i` was kept.
    pub kept: &'a dyn Fn(usize) -> bool,
}

impl std::fmt::Debug for Delivery<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl Delivery<'_> {
    /// Nothing refused, everything kept.
    pub const ALL: Delivery<'static> = Delivery {
        refused: 0,
        kept: &|_| true,
    };
}

impl Summary {
    /// The summary of a run that sent nothing: `refused` items the caller refused before sending
    /// (failed), and `unsent` items never sent (no server started, or the run was stopped first),
    /// over `times`.
    pub fn nothing_sent(times: RunTimes, refused: usize, unsent: usize) -> Summary {
        let batch: Batch<Answer<()>> = Batch {
            results: Vec::new(),
            servers: Vec::new(),
        };
        let mut summary = batch.summary_delivered(
            times,
            Delivery {
                refused,
                kept: &|_| true,
            },
        );
        summary.items += unsent;
        summary.not_attempted = unsent;
        summary
    }
}

impl<T> Batch<Answer<T>> {
    /// The run's summary: the batch's outcomes, tokens and latencies, over `times`.
    pub fn summary(&self, times: RunTimes) -> Summary {
        self.summary_delivered(times, Delivery::ALL)
    }

    /// The run's summary, counting what became of each outcome at the caller's end
    /// ([`Delivery`]): an answer not kept is not written, and neither its tokens nor its latency
    /// count; refused items are failed. The counts add up to the items.
    pub fn summary_delivered(&self, times: RunTimes, delivery: Delivery) -> Summary {
        let answers: Vec<&Answer<T>> = self
            .results
            .iter()
            .enumerate()
            .filter(|(i, _)| (delivery.kept)(*i))
            .filter_map(|(_, r)| r.as_ref().ok())
            .collect();
        let all_answers = self.results.iter().filter(|r| r.is_ok()).count();
        let not_attempted = self
            .results
            .iter()
            .filter(|r| matches!(r, Err(e) if RequestError::not_attempted(e)))
            .count();
        let answered = answers.len();
        let not_written = all_answers - answered;
        let items = self.results.len() + delivery.refused;
        let since = |a: SystemTime, b: SystemTime| b.duration_since(a).unwrap_or(Duration::ZERO);
        let wall = since(times.started, times.finished).as_secs_f64();
        let serving = since(times.ready, times.finished).as_secs_f64();
        let per = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
        let mut latencies: Vec<f64> = answers
            .iter()
            .map(|a| a.latency.as_secs_f64() * 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let rank = |p: f64| -> f64 {
            match latencies.len() {
                0 => 0.0,
                n => latencies[((p * n as f64).ceil() as usize).clamp(1, n) - 1],
            }
        };
        let prompt: u64 = answers.iter().map(|a| a.usage.prompt_tokens).sum();
        let generated: u64 = answers.iter().map(|a| a.usage.generated_tokens).sum();
        Summary {
            items,
            answered,
            failed: items - all_answers - not_attempted,
            not_attempted,
            not_written,
            retries: answers.iter().map(|a| u64::from(a.attempts - 1)).sum(),
            wall_s: wall,
            serving_s: serving,
            items_per_s: per(answered as f64, wall),
            latency_ms: Latency {
                p50: rank(0.50),
                p95: rank(0.95),
                max: latencies.last().copied().unwrap_or(0.0),
            },
            tokens: Tokens {
                prompt,
                generated,
                prompt_per_s: per(prompt as f64, serving),
                generated_per_s: per(generated as f64, serving),
            },
            gpus: per_gpu(&self.servers),
            started_at: rfc3339(times.started),
            ready_at: rfc3339(times.ready),
            finished_at: rfc3339(times.finished),
            started_at_unix_s: unix(times.started),
            ready_at_unix_s: unix(times.ready),
            finished_at_unix_s: unix(times.finished),
        }
    }
}

/// The servers' runs grouped by GPU, in the order each GPU first appears.
fn per_gpu(servers: &[ServerRun]) -> Vec<GpuSummary> {
    let mut gpus: Vec<GpuSummary> = Vec::new();
    for run in servers {
        let died = run.died.as_ref().map(|d| d.status.to_string());
        let server = ServerSummary {
            answered: run.answered,
            failed: run.failed,
            died: died.clone(),
            handed_over: run.handed_over,
        };
        let gpu = match gpus.iter_mut().find(|g| g.gpu == run.gpu) {
            Some(gpu) => gpu,
            None => {
                gpus.push(GpuSummary {
                    gpu: run.gpu,
                    uuid: run.uuid.clone(),
                    servers: 0,
                    answered: 0,
                    failed: 0,
                    died: None,
                    each: Vec::new(),
                });
                gpus.last_mut().expect("just pushed")
            }
        };
        gpu.servers += 1;
        gpu.answered += run.answered;
        gpu.failed += run.failed;
        if gpu.died.is_none() {
            gpu.died = died;
        }
        gpu.each.push(server);
    }
    gpus
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `t` as RFC 3339 in UTC, to the millisecond (`2026-11-28T21:30:05.123Z`).
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days: the proleptic Gregorian date of a day number.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Subject, Usage};

    fn answered(ms: u64, attempts: u32) -> Result<Answer<()>, RequestError> {
        Ok(Answer {
            value: (),
            usage: Usage {
                prompt_tokens: 100,
                generated_tokens: 10,
            },
            timings: None,
            attempts,
            latency: Duration::from_millis(ms),
        })
    }

    #[test]
    fn counts_add_up_and_rates_use_their_times() {
        let subject = Subject::Request("x".into());
        let batch = Batch {
            results: vec![
                answered(10, 1),
                answered(30, 2),
                answered(20, 1),
                Err(RequestError::Cancelled {
                    subject: subject.clone(),
                }),
                Err(RequestError::InvalidPrompt {
                    subject,
                    reason: String::new(),
                }),
            ],
            servers: vec![ServerRun {
                gpu: 1,
                uuid: "GPU-a".into(),
                answered: 3,
                failed: 1,
                died: None,
                handed_over: 0,
            }],
        };
        let start = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let times = RunTimes {
            started: start,
            ready: start + Duration::from_secs(1),
            finished: start + Duration::from_secs(3),
        };
        let summary = batch.summary(times);
        assert_eq!(
            (
                summary.items,
                summary.answered,
                summary.failed,
                summary.not_attempted
            ),
            (5, 3, 1, 1)
        );
        assert_eq!(summary.retries, 1);
        assert_eq!(
            (summary.wall_s, summary.serving_s, summary.items_per_s),
            (3.0, 2.0, 1.0)
        );
        assert_eq!(
            (
                summary.latency_ms.p50,
                summary.latency_ms.p95,
                summary.latency_ms.max
            ),
            (20.0, 30.0, 30.0)
        );
        assert_eq!((summary.tokens.prompt, summary.tokens.generated), (300, 30));
        assert_eq!(summary.tokens.generated_per_s, 15.0);
        assert_eq!(summary.started_at, "2026-11-18T11:06:40.000Z");
        assert_eq!(summary.gpus[0].uuid, "GPU-a");
        // The second answer's line was not written, and one item was refused before sending.
        let kept = |i: usize| i != 1;
        let delivered = batch.summary_delivered(
            times,
            Delivery {
                refused: 1,
                kept: &kept,
            },
        );
        assert_eq!(
            (
                delivered.items,
                delivered.answered,
                delivered.failed,
                delivered.not_attempted,
                delivered.not_written
            ),
            (6, 2, 2, 1, 1)
        );
        assert_eq!(delivered.tokens.prompt, 200);
        assert_eq!(delivered.latency_ms.max, 20.0);
    }

    #[test]
    fn servers_are_summed_per_gpu_and_each_is_kept() {
        let run = |gpu: u32, answered: usize, died: Option<i32>| ServerRun {
            gpu,
            uuid: format!("GPU-{gpu}"),
            answered,
            failed: 1,
            died: died.map(|code| {
                crate::server::ServerDeath::new(
                    crate::process::ChildExit::Code(code),
                    String::new(),
                )
            }),
            handed_over: usize::from(died.is_some()),
        };
        let gpus = per_gpu(&[run(3, 5, None), run(4, 2, None), run(3, 7, Some(1))]);
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            (
                gpus[0].gpu,
                gpus[0].servers,
                gpus[0].answered,
                gpus[0].failed
            ),
            (3, 2, 12, 2)
        );
        assert_eq!(gpus[0].died.as_deref(), Some("exit code 1"));
        assert_eq!(gpus[0].each[1].handed_over, 1);
        assert_eq!((gpus[1].gpu, gpus[1].servers), (4, 1));
    }

    #[test]
    fn dates_follow_the_gregorian_calendar() {
        let at = |s: u64, ms: u64| rfc3339(UNIX_EPOCH + Duration::from_millis(s * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_868_799, 5), "2000-02-29T23:59:59.005Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
    }
}
