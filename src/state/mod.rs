//! The state thread: the one owner of the state store (SPEC "Greylisting and shared state"),
//! greylist triplets and HELO histories, embedded or in Redis.
//!
//! Sessions never touch the store. The event loop submits questions over a bounded queue
//! (`try_send`: the loop never blocks), the thread answers each over a channel the loop drains
//! and wakes it (`LoopWaker`), as the resolver thread does. Whatever goes wrong answers
//! "unavailable" and counts `heloguard_state_errors_total`: a full queue (at once, in the
//! loop), a question older than HELOGUARD_STATE_TIMEOUT_MS when the thread reaches it, a store
//! that is down or slower than that. Greylisting then lets the RCPT through and helo_churn
//! gives `none`: the store fails open.
//!
//! The thread takes every question already queued at once, so that the Redis store sends
//! them in one pipeline (one round trip for the lot).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{RecvTimeoutError, Sender, TrySendError};

use crate::greylist::{GreylistOutcome, GreylistTimes, Triplet};
use crate::helo::sender::ChurnOutcome;
use crate::metrics::Metrics;
use crate::wake::LoopWaker;

pub(crate) mod embedded;
pub(crate) mod logic;
pub(crate) mod redis;

/// Questions waiting for the thread at most; past it a question is answered unavailable at
/// once (SPEC "Memory": every queue has a bound).
pub(crate) const QUEUE_BOUND: usize = 4096;

/// Questions taken from the queue in one go (one Redis pipeline).
const BATCH: usize = 256;

/// How often the thread does its housekeeping (the embedded store's save).
const TICK: Duration = Duration::from_secs(60);

/// Where the store lives (HELOGUARD_STATE).
#[derive(Clone, PartialEq, Eq)]
pub enum StateStore {
    /// In the process, saved to HELOGUARD_STATE_FILE.
    Embedded,
    /// A Redis (or Valkey) server shared by every instance that names it.
    Redis {
        /// The URL as configured; it may hold a password, so it is never logged.
        url: String,
        /// HOST:PORT/DB, for the logs.
        shown: String,
    },
}

impl fmt::Debug for StateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateStore::Embedded => f.write_str("Embedded"),
            StateStore::Redis { shown, .. } => write!(f, "Redis({shown})"),
        }
    }
}

/// Everything the state store is configured by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSettings {
    pub store: StateStore,
    /// HELOGUARD_STATE_FILE.
    pub file: PathBuf,
    /// HELOGUARD_STATE_TIMEOUT_MS.
    pub timeout: Duration,
    /// HELOGUARD_STATE_MAX_ENTRIES.
    pub max_entries: usize,
    /// HELOGUARD_GREYLIST_DELAY, _RETRY, _PASS.
    pub greylist: GreylistTimes,
    /// HELOGUARD_HELO_CHURN; 0 = off.
    pub helo_churn: u32,
}

/// One question for the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StateQuery {
    /// The greylist decision for a RCPT's triplet.
    Greylist(Triplet),
    /// Record `name` in the HELO history of `client` (`logic::churn_client`) and count.
    Churn { client: String, name: String },
}

impl StateQuery {
    /// A question about a client's HELO history.
    pub(crate) fn churn(client_ip: IpAddr, name: String) -> Self {
        StateQuery::Churn {
            client: logic::churn_client(client_ip),
            name,
        }
    }

    /// The answer when the store cannot give one (fail open).
    pub(crate) fn unavailable(self) -> StateReply {
        match self {
            StateQuery::Greylist(_) => StateReply::Greylist(GreylistOutcome::Unavailable),
            StateQuery::Churn { name, .. } => StateReply::Churn {
                name,
                outcome: ChurnOutcome::Unavailable,
            },
        }
    }
}

/// The store's answer to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StateReply {
    Greylist(GreylistOutcome),
    /// The name asked about, so the session can tell which identity it is for.
    Churn {
        name: String,
        outcome: ChurnOutcome,
    },
}

/// An answer for the connection `id` (a `ConnId`'s raw value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StateAnswer {
    pub id: u64,
    pub reply: StateReply,
}

/// The store could not answer.
#[derive(Debug)]
pub(crate) enum StoreError {
    /// Down, and not retried yet (reconnects are paced).
    Down,
    /// The Redis server failed or did not answer in time.
    Redis(::redis::RedisError),
    /// It answered something the scripts never return.
    Unexpected(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Down => f.write_str("store is down"),
            StoreError::Redis(e) => write!(f, "{e}"),
            StoreError::Unexpected(what) => write!(f, "unexpected answer: {what}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// A state store the thread owns. Answers come in the order of the questions.
pub(crate) trait StateBackend: Send {
    /// Answers every question, or fails as a whole (every question is then unavailable).
    fn answer(&mut self, queries: &[StateQuery]) -> Result<Vec<StateReply>, StoreError>;
    /// Housekeeping: when the thread starts, then about every minute.
    fn tick(&mut self);
    /// The thread is stopping.
    fn close(&mut self);
}

/// Milliseconds since the Unix epoch: the store's clock.
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, logic::millis)
}

struct StateRequest {
    id: u64,
    asked: Instant,
    query: StateQuery,
}

/// The event loop's side of the state thread.
pub(crate) struct StateHandle {
    requests: Option<Sender<StateRequest>>,
    answers: Sender<StateAnswer>,
    waker: Arc<dyn LoopWaker>,
    metrics: Arc<Metrics>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateHandle").finish_non_exhaustive()
    }
}

/// Starts the state thread over `settings.store`. The embedded store is loaded before this
/// returns; a Redis store is connected to by the thread (a store down at startup does not stop
/// startup).
pub(crate) fn spawn(
    settings: &StateSettings,
    answers: Sender<StateAnswer>,
    waker: Arc<dyn LoopWaker>,
    metrics: Arc<Metrics>,
) -> io::Result<StateHandle> {
    let backend: Box<dyn StateBackend> = match &settings.store {
        StateStore::Embedded => Box::new(embedded::EmbeddedStore::load(
            settings.file.clone(),
            settings.max_entries,
            settings.greylist,
        )),
        StateStore::Redis { url, shown } => Box::new(redis::RedisStore::new(
            url,
            shown.clone(),
            settings.timeout,
            settings.greylist,
        )?),
    };
    spawn_with(backend, settings.timeout, answers, waker, metrics)
}

pub(crate) fn spawn_with(
    backend: Box<dyn StateBackend>,
    timeout: Duration,
    answers: Sender<StateAnswer>,
    waker: Arc<dyn LoopWaker>,
    metrics: Arc<Metrics>,
) -> io::Result<StateHandle> {
    let (tx, rx) = crossbeam_channel::bounded::<StateRequest>(QUEUE_BOUND);
    let thread = {
        let answers = answers.clone();
        let waker = waker.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("heloguard-state".into())
            .spawn(move || {
                let mut worker = StateThread {
                    backend,
                    timeout,
                    answers,
                    waker,
                    metrics,
                };
                worker.run(&rx);
            })?
    };
    Ok(StateHandle {
        requests: Some(tx),
        answers,
        waker,
        metrics,
        thread: Some(thread),
    })
}

impl StateHandle {
    /// Queues a question; never blocks. A full queue, or a thread that is gone, answers
    /// unavailable at once.
    pub(crate) fn submit(&self, id: u64, query: StateQuery) {
        let request = StateRequest {
            id,
            asked: Instant::now(),
            query,
        };
        let unsent = match self.requests.as_ref().map(|tx| tx.try_send(request)) {
            Some(Ok(())) => return,
            Some(Err(TrySendError::Full(r) | TrySendError::Disconnected(r))) => r.query,
            None => return,
        };
        self.metrics.state_error();
        let _ = self.answers.send(StateAnswer {
            id,
            reply: unsent.unavailable(),
        });
        let _ = self.waker.wake();
    }

    /// Stops the thread once it has answered what is queued; the embedded store is saved.
    pub(crate) fn shutdown(mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("state thread panicked");
        }
    }
}

struct StateThread {
    backend: Box<dyn StateBackend>,
    timeout: Duration,
    answers: Sender<StateAnswer>,
    waker: Arc<dyn LoopWaker>,
    metrics: Arc<Metrics>,
}

impl StateThread {
    fn run(&mut self, rx: &crossbeam_channel::Receiver<StateRequest>) {
        self.backend.tick();
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(first) => {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter().take(BATCH - 1));
                    self.answer(batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.backend.tick();
                next_tick = Instant::now() + TICK;
            }
        }
        self.backend.close();
    }

    fn answer(&mut self, batch: Vec<StateRequest>) {
        let (fresh, stale): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|r| r.asked.elapsed() <= self.timeout);
        let mut answers: Vec<StateAnswer> = Vec::with_capacity(fresh.len() + stale.len());
        for r in stale {
            self.metrics.state_error();
            answers.push(StateAnswer {
                id: r.id,
                reply: r.query.unavailable(),
            });
        }
        if !fresh.is_empty() {
            let queries: Vec<StateQuery> = fresh.iter().map(|r| r.query.clone()).collect();
            match self.backend.answer(&queries) {
                Ok(replies) if replies.len() == fresh.len() => {
                    answers.extend(
                        fresh
                            .iter()
                            .zip(replies)
                            .map(|(r, reply)| StateAnswer { id: r.id, reply }),
                    );
                }
                _ => {
                    for r in fresh {
                        self.metrics.state_error();
                        answers.push(StateAnswer {
                            id: r.id,
                            reply: r.query.unavailable(),
                        });
                    }
                }
            }
        }
        for answer in answers {
            if self.answers.send(answer).is_err() {
                return;
            }
        }
        let _ = self.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct CountingWaker(AtomicUsize);

    impl LoopWaker for CountingWaker {
        fn wake(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct DownStore;

    impl StateBackend for DownStore {
        fn answer(&mut self, _: &[StateQuery]) -> Result<Vec<StateReply>, StoreError> {
            Err(StoreError::Down)
        }
        fn tick(&mut self) {}
        fn close(&mut self) {}
    }

    fn greylist_query() -> StateQuery {
        StateQuery::Greylist(Triplet {
            client: crate::greylist::GreylistClient::Network("192.0.2.0".parse().expect("ip")),
            sender: "a@example.org".into(),
            recipient: "b@example.net".into(),
        })
    }

    #[test]
    fn a_store_that_is_down_answers_unavailable_and_counts() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let metrics = Arc::new(Metrics::new());
        let waker = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let handle = spawn_with(
            Box::new(DownStore),
            Duration::from_secs(60),
            tx,
            waker.clone(),
            metrics.clone(),
        )
        .expect("spawn");
        handle.submit(7, greylist_query());
        handle.submit(
            8,
            StateQuery::churn("192.0.2.1".parse().expect("ip"), "x".into()),
        );
        handle.shutdown();
        let answers: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            answers,
            vec![
                StateAnswer {
                    id: 7,
                    reply: StateReply::Greylist(GreylistOutcome::Unavailable)
                },
                StateAnswer {
                    id: 8,
                    reply: StateReply::Churn {
                        name: "x".into(),
                        outcome: ChurnOutcome::Unavailable
                    }
                }
            ]
        );
        assert!(waker.0.load(Ordering::SeqCst) >= 1);
        assert!(
            metrics
                .render()
                .contains("heloguard_state_errors_total 2\n")
        );
    }

    /// A store that answers Known once the test lets it.
    struct GatedStore(crossbeam_channel::Receiver<()>);

    impl StateBackend for GatedStore {
        fn answer(&mut self, queries: &[StateQuery]) -> Result<Vec<StateReply>, StoreError> {
            let _ = self.0.recv();
            Ok(queries
                .iter()
                .map(|_| StateReply::Greylist(GreylistOutcome::Known))
                .collect())
        }
        fn tick(&mut self) {}
        fn close(&mut self) {}
    }

    #[test]
    fn a_full_queue_and_questions_older_than_the_timeout_answer_unavailable_and_count() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (open, gate) = crossbeam_channel::unbounded();
        let metrics = Arc::new(Metrics::new());
        let handle = spawn_with(
            Box::new(GatedStore(gate)),
            Duration::from_millis(1),
            tx,
            Arc::new(CountingWaker(AtomicUsize::new(0))),
            metrics.clone(),
        )
        .expect("spawn");
        // The store holds the thread: the queue fills, and what does not fit is answered now.
        let asked = QUEUE_BOUND + 2;
        for id in 0..asked {
            handle.submit(id as u64, greylist_query());
        }
        assert!(
            rx.try_iter()
                .all(|a| a.reply == StateReply::Greylist(GreylistOutcome::Unavailable)),
            "answered at once: unavailable"
        );
        for _ in 0..asked {
            let _ = open.send(());
        }
        handle.shutdown();
        let unavailable = asked
            - rx.try_iter()
                .filter(|a| a.reply == StateReply::Greylist(GreylistOutcome::Known))
                .count();
        // At least one did not fit, and those that waited past the timeout are unavailable.
        assert!(unavailable >= 1);
        assert!(
            metrics
                .render()
                .contains(&format!("heloguard_state_errors_total {unavailable}\n")),
            "every unavailable answer is counted"
        );
    }

    #[test]
    fn the_embedded_store_answers_through_the_thread() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let metrics = Arc::new(Metrics::new());
        let dir =
            std::env::temp_dir().join(format!("heloguard-state-thread-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let store = embedded::EmbeddedStore::load(dir.join("s"), 100, GreylistTimes::default());
        let handle = spawn_with(
            Box::new(store),
            Duration::from_secs(60),
            tx,
            Arc::new(CountingWaker(AtomicUsize::new(0))),
            metrics,
        )
        .expect("spawn");
        handle.submit(1, greylist_query());
        handle.submit(2, greylist_query());
        handle.shutdown();
        let replies: Vec<_> = rx.try_iter().map(|a| a.reply).collect();
        assert!(matches!(
            replies[0],
            StateReply::Greylist(GreylistOutcome::New { .. })
        ));
        assert!(matches!(
            replies[1],
            StateReply::Greylist(GreylistOutcome::Early { .. })
        ));
        assert!(dir.join("s").exists(), "saved at shutdown");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
