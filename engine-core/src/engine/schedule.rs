//! The one scheduler: many items over the slots of one or more servers (a single engine is a pool of
//! one). Every engine's `describe_many`/`complete_many`, the pool's, and so the CLI's and Python's
//! batches run here.
//!
//! **The contract: every item gets exactly one outcome, exactly once, in every path.** `on_done(i,
//! &outcome)` is called once for each item, and `Batch::results[i]` is that same outcome:
//! - *answered* or *failed*: the server's answer, or why it was refused (bad image, HTTP error,
//!   invalid output, ...);
//! - a server died while answering it: the item goes back to the queue for the servers still alive;
//!   with none left, its outcome is that death ([`RequestError::ServerDied`], with the exit);
//! - never sent, because every server died first: [`RequestError::NoServerLeft`], naming the last
//!   death;
//! - never sent, because `on_done` returned `Break` (the caller stopped the batch):
//!   [`RequestError::Cancelled`]. Items in flight finish and keep their outcome.
//!
//! Outcomes of items never sent are given after the last worker ends, in input order. The property
//! test `every_item_gets_exactly_one_outcome_exactly_once` checks the contract over random item and
//! slot counts, failures, server deaths and cancellations.
//!
//! Servers may join while the batch runs ([`run_opening`]): each server's lanes wait until it is
//! open (started) or out (never started), so a pool serves on the first GPU ready while the others
//! load. A server that never starts takes nothing; if none starts, no item is told of (there was no
//! batch to speak of, and the caller reports the starts' failures instead).

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::request::RequestError;
use crate::request::Subject;
use crate::server::ServerDeath;
use crate::util::unpoisoned;

/// What a batch did: an outcome per item, in input order, and what each server did.
#[derive(Debug)]
#[non_exhaustive]
pub struct Batch<R> {
    /// One outcome per item, in input order.
    pub results: Vec<Result<R, RequestError>>,
    /// One entry per server, in the order the servers were given.
    pub servers: Vec<ServerRun>,
}

/// What one server did in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerRun {
    /// Its GPU (nvidia-smi index).
    pub gpu: u32,
    /// Its GPU's UUID.
    pub uuid: String,
    /// Items it answered.
    pub answered: usize,
    /// Items it failed (a death excluded).
    pub failed: usize,
    /// How it died, if it did.
    pub died: Option<ServerDeath>,
    /// Items it was answering when it died, handed back to the queue.
    pub handed_over: usize,
}

/// A server's share of the work: its GPU, and how many requests it serves at once.
#[derive(Debug, Clone)]
pub(crate) struct Lanes {
    pub(crate) gpu: u32,
    pub(crate) uuid: String,
    pub(crate) slots: usize,
}

struct State<R> {
    next: usize,
    /// Items a dying server was answering, waiting for another server.
    handed_back: VecDeque<usize>,
    /// Items taken and not yet finished or handed back.
    in_flight: usize,
    results: Vec<Option<Result<R, RequestError>>>,
    /// For an item handed back: the death it met, its outcome if no server is left to try again.
    deaths: Vec<Option<RequestError>>,
    servers: Vec<ServerRun>,
    /// Servers not dead nor out (one still starting counts: it may yet take the work).
    alive: usize,
    /// Each server: started (`Some(true)`), never started (`Some(false)`), or starting.
    open: Vec<Option<bool>>,
    stopped: bool,
    last_death: Option<ServerDeath>,
}

/// The queue the workers share.
struct Queue<R> {
    state: Mutex<State<R>>,
    changed: Condvar,
}

impl<R> State<R> {
    /// No item is left to take, and none in flight can come back.
    fn nothing_left(&self) -> bool {
        self.in_flight == 0 && self.handed_back.is_empty() && self.next >= self.results.len()
    }
}

/// How a server joining a running batch ([`run_opening`]) says it started, or never will.
pub(crate) struct Opener<'q, R> {
    queue: &'q Queue<R>,
}

impl<R> Opener<'_, R> {
    /// `server` is ready (`true`: its lanes start taking work) or out (`false`: they end).
    pub(crate) fn open(&self, server: usize, ready: bool) {
        self.queue.open(server, ready);
    }
}

/// What a worker does with the item it took.
enum Next {
    Take(usize),
    Done,
}

impl<R> Queue<R> {
    fn lock(&self) -> MutexGuard<'_, State<R>> {
        unpoisoned(&self.state)
    }

    /// The next item for a lane of `server`: a handed-back one first, then a fresh one; waits while
    /// none is free but items in flight may yet come back. `Done` once the server is dead, the
    /// batch stopped, or nothing is left.
    fn take(&self, server: usize) -> Next {
        let mut state = self.lock();
        loop {
            if state.stopped || state.servers[server].died.is_some() {
                return Next::Done;
            }
            match state.open[server] {
                Some(true) => {}
                Some(false) => return Next::Done,
                // Still starting: wait for it, unless the others have already done everything.
                None if state.nothing_left() => return Next::Done,
                None => {
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
            }
            if let Some(i) = state.handed_back.pop_front() {
                state.in_flight += 1;
                return Next::Take(i);
            }
            if state.next < state.results.len() {
                state.next += 1;
                state.in_flight += 1;
                return Next::Take(state.next - 1);
            }
            if state.nothing_left() {
                return Next::Done;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// `server` started (`ready`) or never will: its lanes take work, or end.
    fn open(&self, server: usize, ready: bool) {
        let mut state = self.lock();
        if state.open[server].is_none() {
            state.open[server] = Some(ready);
            if !ready {
                state.alive -= 1;
            }
        }
        self.changed.notify_all();
    }

    /// Item `i` ended with `outcome` on `server`; the caller already told `on_done`.
    fn finish(&self, server: usize, i: usize, outcome: Result<R, RequestError>, stop: bool) {
        let mut state = self.lock();
        let run = &mut state.servers[server];
        match &outcome {
            Ok(_) => run.answered += 1,
            Err(_) => run.failed += 1,
        }
        state.results[i] = Some(outcome);
        state.in_flight -= 1;
        state.stopped |= stop;
        self.changed.notify_all();
    }

    /// `server` died while answering `i` (`death` says how). Hands `i` back for the servers still
    /// alive and returns `None`; with none left, returns the death as `i`'s outcome, for the caller
    /// to give.
    fn died(&self, server: usize, i: usize, death: RequestError) -> Option<RequestError> {
        let mut state = self.lock();
        state.in_flight -= 1;
        let run = &mut state.servers[server];
        if run.died.is_none()
            && let RequestError::ServerDied { death: how, .. } = &death
        {
            run.died = Some(how.clone());
            let gpu = run.gpu;
            state.alive -= 1;
            state.last_death = Some(how.clone());
            tracing::warn!(gpu, error = %death, "a server died; the others take its items");
        }
        let outcome = if state.alive == 0 {
            // Nobody is left to answer: this item ends with its death, and so do those handed back
            // before (at the end, from the deaths they keep); the fresh ones are never sent.
            state.handed_back.clear();
            Some(death)
        } else {
            state.servers[server].handed_over += 1;
            state.deaths[i] = Some(death);
            state.handed_back.push_back(i);
            None
        };
        self.changed.notify_all();
        outcome
    }

    /// The batch: each item's outcome, those of items no worker ended made here (a death kept from
    /// a server that was answering it, else never sent); and which items those are, for `on_done`
    /// to hear of them once, in order, at the end.
    fn into_batch(self, subject: impl Fn(usize) -> Subject) -> (Batch<R>, Vec<bool>) {
        let state = self
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let State {
            results,
            mut deaths,
            servers,
            alive,
            last_death,
            ..
        } = state;
        let mut late = Vec::with_capacity(results.len());
        let outcomes = results
            .into_iter()
            .enumerate()
            .map(|(i, result)| {
                late.push(result.is_none());
                result.unwrap_or_else(|| match (deaths[i].take(), alive, &last_death) {
                    // Handed back, then the batch was stopped before another server took it.
                    (Some(death), _, _) => Err(death),
                    (None, 0, Some(last)) => Err(RequestError::NoServerLeft {
                        subject: subject(i),
                        last_death: last.clone(),
                    }),
                    _ => Err(RequestError::Cancelled {
                        subject: subject(i),
                    }),
                })
            })
            .collect();
        (
            Batch {
                results: outcomes,
                servers,
            },
            late,
        )
    }
}

/// Runs `work(server, item)` over `items` on the lanes of `servers` (each as many at once as it has
/// slots), taking the next item as one finishes (no static split), under the module's contract.
pub(crate) fn run<I, R>(
    servers: &[Lanes],
    items: &[I],
    work: impl Fn(usize, &I) -> Result<R, RequestError> + Sync,
    subject: impl Fn(&I) -> Subject,
    on_done: impl Fn(usize, &Result<R, RequestError>) -> ControlFlow<()> + Sync,
) -> Batch<R>
where
    I: Sync,
    R: Send,
{
    let all_open = |opener: &Opener<R>| (0..servers.len()).for_each(|s| opener.open(s, true));
    run_opening(servers, items, work, subject, on_done, all_open, || {})
}

/// [`run`], with servers that join as they start: `starts(opener)` runs beside the workers and
/// says, through the opener, when each server is ready or out; a server's lanes wait for it.
/// `drained()` is called once every lane has ended (so that starts still under way can give up),
/// before `starts` is waited for.
pub(crate) fn run_opening<I, R>(
    servers: &[Lanes],
    items: &[I],
    work: impl Fn(usize, &I) -> Result<R, RequestError> + Sync,
    subject: impl Fn(&I) -> Subject,
    on_done: impl Fn(usize, &Result<R, RequestError>) -> ControlFlow<()> + Sync,
    starts: impl FnOnce(&Opener<R>) + Send,
    drained: impl FnOnce(),
) -> Batch<R>
where
    I: Sync,
    R: Send,
{
    let queue = Queue {
        state: Mutex::new(State {
            next: 0,
            handed_back: VecDeque::new(),
            in_flight: 0,
            results: items.iter().map(|_| None).collect(),
            deaths: items.iter().map(|_| None).collect(),
            servers: servers
                .iter()
                .map(|lanes| ServerRun {
                    gpu: lanes.gpu,
                    uuid: lanes.uuid.clone(),
                    answered: 0,
                    failed: 0,
                    died: None,
                    handed_over: 0,
                })
                .collect(),
            alive: servers.len(),
            open: vec![None; servers.len()],
            stopped: false,
            last_death: None,
        }),
        changed: Condvar::new(),
    };
    std::thread::scope(|scope| {
        let opener = Opener { queue: &queue };
        let starting = scope.spawn(move || starts(&opener));
        let mut lanes_running = Vec::new();
        for (server, lanes) in servers.iter().enumerate() {
            // No more lanes than items: a thread per slot would otherwise wait for nothing.
            for _ in 0..lanes.slots.clamp(1, items.len().max(1)) {
                let (queue, work, on_done) = (&queue, &work, &on_done);
                lanes_running.push(scope.spawn(move || {
                    while let Next::Take(i) = queue.take(server) {
                        match work(server, &items[i]) {
                            Err(death @ RequestError::ServerDied { .. }) => {
                                if let Some(outcome) = queue.died(server, i, death) {
                                    let outcome = Err(outcome);
                                    let _ = on_done(i, &outcome);
                                    let mut state = queue.lock();
                                    state.results[i] = Some(outcome);
                                }
                            }
                            outcome => {
                                let stop = on_done(i, &outcome).is_break();
                                queue.finish(server, i, outcome, stop);
                            }
                        }
                    }
                }));
            }
        }
        for lane in lanes_running {
            lane.join().expect("a lane does not panic");
        }
        drained();
        starting.join().expect("the starts do not panic");
    });
    let any_started = unpoisoned(&queue.state).open.contains(&Some(true));
    let (batch, late) = queue.into_batch(|i| subject(&items[i]));
    if any_started {
        // The items that ended without a worker to tell of them: in input order, once each.
        for (i, outcome) in batch.results.iter().enumerate() {
            if late[i] {
                let _ = on_done(i, outcome);
            }
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ChildExit;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn died(server: usize) -> RequestError {
        RequestError::ServerDied {
            during: None,
            death: ServerDeath::new(ChildExit::Code(server as i32), String::new()),
        }
    }

    /// What a scripted server does with its n-th request.
    #[derive(Debug, Clone)]
    struct Script {
        slots: usize,
        /// It dies at this request (counting from 0), and stays dead.
        dies_at: Option<usize>,
        /// It starts (else it never does, and takes nothing).
        starts: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn every_item_gets_exactly_one_outcome_exactly_once(
            items in 0usize..40,
            scripts in proptest::collection::vec(
                (1usize..5, proptest::option::weighted(0.5, 0usize..30), proptest::bool::weighted(0.8))
                    .prop_map(|(slots, dies_at, starts)| Script { slots, dies_at, starts }),
                1..4,
            ),
            // Every item whose id is divisible by `fail_every` fails (an HTTP error).
            fail_every in 2usize..7,
            // `on_done` asks to stop after this many outcomes.
            stop_after in proptest::option::weighted(0.3, 0usize..40),
        ) {
            let calls: Vec<AtomicUsize> = scripts.iter().map(|_| AtomicUsize::new(0)).collect();
            let answered_by: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            let told: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            let told_ok: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            let outcomes = AtomicUsize::new(0);
            let lanes: Vec<Lanes> = scripts
                .iter()
                .enumerate()
                .map(|(gpu, s)| Lanes { gpu: gpu as u32, uuid: String::new(), slots: s.slots })
                .collect();
            let ids: Vec<usize> = (0..items).collect();
            let drained = AtomicUsize::new(0);
            let batch = run_opening(
                &lanes,
                &ids,
                |server, &id| {
                    let n = calls[server].fetch_add(1, Ordering::SeqCst);
                    if scripts[server].dies_at.is_some_and(|at| n >= at) {
                        return Err(died(server));
                    }
                    if id % fail_every == 0 {
                        return Err(RequestError::Http {
                            subject: Subject::Request(id.to_string()),
                            status: 500,
                            body: String::new(),
                        });
                    }
                    answered_by[id].fetch_add(1, Ordering::SeqCst);
                    Ok(id)
                },
                |id| Subject::Request(id.to_string()),
                |i, outcome| {
                    told[i].fetch_add(1, Ordering::SeqCst);
                    if outcome.is_ok() {
                        told_ok[i].fetch_add(1, Ordering::SeqCst);
                    }
                    let n = outcomes.fetch_add(1, Ordering::SeqCst) + 1;
                    if stop_after.is_some_and(|k| n > k) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
                // Servers join one by one, in their order, as the others already work.
                |opener| {
                    for (server, script) in scripts.iter().enumerate() {
                        opener.open(server, script.starts);
                    }
                },
                || {
                    drained.fetch_add(1, Ordering::SeqCst);
                },
            );
            prop_assert_eq!(drained.load(Ordering::SeqCst), 1);
            prop_assert_eq!(batch.results.len(), items);
            if scripts.iter().all(|s| !s.starts) {
                // No server started: nothing was sent, and nobody was told of anything.
                prop_assert!(told.iter().all(|t| t.load(Ordering::SeqCst) == 0));
                prop_assert!(calls.iter().all(|c| c.load(Ordering::SeqCst) == 0));
                let cancelled = |r: &Result<usize, RequestError>| matches!(r, Err(RequestError::Cancelled { .. }));
                prop_assert!(batch.results.iter().all(cancelled));
                return Ok(());
            }
            let alive = batch
                .servers
                .iter()
                .zip(&scripts)
                .any(|(s, script)| script.starts && s.died.is_none());
            for (i, result) in batch.results.iter().enumerate() {
                // Exactly once, and the same outcome the caller was told.
                prop_assert_eq!(told[i].load(Ordering::SeqCst), 1, "item {}", i);
                prop_assert_eq!(told_ok[i].load(Ordering::SeqCst), usize::from(result.is_ok()));
                // Answered at most once, and then its outcome is that answer.
                prop_assert!(answered_by[i].load(Ordering::SeqCst) <= 1);
                if let Ok(id) = result {
                    prop_assert_eq!(*id, i);
                }
                match result {
                    Ok(_) | Err(RequestError::Http { .. }) => {}
                    // Died in flight: only when no server is left, or the batch was stopped.
                    Err(RequestError::ServerDied { .. }) => {
                        prop_assert!(!alive || stop_after.is_some())
                    }
                    Err(RequestError::NoServerLeft { .. }) => prop_assert!(!alive),
                    Err(RequestError::Cancelled { .. }) => {
                        prop_assert!(stop_after.is_some() && alive)
                    }
                    Err(other) => prop_assert!(false, "unexpected outcome {other}"),
                }
            }
            // A batch nobody stopped, with a server alive at the end, sends every item.
            if stop_after.is_none() && alive {
                prop_assert!(batch.results.iter().all(|r| !matches!(r, Err(e) if e.not_attempted())));
            }
            // The servers' counts add up to what they ended.
            let ended: usize = batch.servers.iter().map(|s| s.answered + s.failed).sum();
            let answered = batch.results.iter().filter(|r| r.is_ok()).count();
            prop_assert_eq!(batch.servers.iter().map(|s| s.answered).sum::<usize>(), answered);
            prop_assert!(ended <= items);
            for (server, run) in batch.servers.iter().enumerate() {
                prop_assert_eq!(run.died.is_some(), scripts[server].dies_at.is_some_and(|at| calls[server].load(Ordering::SeqCst) > at));
                // A server that never started took nothing.
                if !scripts[server].starts {
                    prop_assert_eq!(calls[server].load(Ordering::SeqCst), 0);
                }
            }
        }
    }

    #[test]
    fn a_single_server_that_dies_leaves_no_item_without_a_line() {
        // The shape of the CLI's bug: three slots, the server dies at its fifth request.
        let told = Mutex::new(Vec::new());
        let calls = AtomicUsize::new(0);
        let ids: Vec<usize> = (0..20).collect();
        let batch = run(
            &[Lanes {
                gpu: 0,
                uuid: String::new(),
                slots: 3,
            }],
            &ids,
            |_, &id| {
                if calls.fetch_add(1, Ordering::SeqCst) >= 5 {
                    Err(died(0))
                } else {
                    Ok(id)
                }
            },
            |id| Subject::Request(id.to_string()),
            |i, _| {
                unpoisoned(&told).push(i);
                ControlFlow::Continue(())
            },
        );
        let mut told = told.into_inner().unwrap();
        told.sort_unstable();
        assert_eq!(told, ids);
        let answered = batch.results.iter().filter(|r| r.is_ok()).count();
        let died = batch
            .results
            .iter()
            .filter(|r| matches!(r, Err(RequestError::ServerDied { .. })))
            .count();
        let never = batch
            .results
            .iter()
            .filter(|r| matches!(r, Err(RequestError::NoServerLeft { .. })))
            .count();
        assert_eq!(answered, 5);
        assert!((1..=3).contains(&died), "{died} died in flight");
        assert_eq!(answered + died + never, 20);
        assert_eq!(batch.servers[0].answered, 5);
    }
}
