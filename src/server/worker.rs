//! The protocol worker pool: a fixed number of threads that run session state machines.
//!
//! A `Box<Session>` is moved loop -> worker -> loop with the events gathered for it, so one
//! thread at a time owns it and its replies stay in order without a lock. Workers send their
//! `Done` first and wake the loop second, because mio wakes coalesce (mio tests/waker.rs) and
//! the loop drains the channel on every wake. The job queue is unbounded on purpose: each
//! session has at most one job in flight, so its length is bounded by the number of sessions,
//! and the loop must never block on a send.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use crate::dns::{Lookup, ReverseFacts};
use crate::metrics::Metrics;
use crate::protocol::reply::Reply;
use crate::session::{DeliveryOutcome, Event, Now, Observation, Output, Session, TlsInfo};

/// An event for a session that owns no borrowed bytes, so it can wait in a queue.
#[derive(Debug)]
pub enum OwnedEvent {
    Greet,
    Pregreeted,
    Reverse(ReverseFacts),
    Forward {
        name: String,
        addrs: Lookup<Vec<std::net::IpAddr>>,
    },
    VerdictDeadline {
        generation: u32,
    },
    Delivered(DeliveryOutcome),
    TlsEstablished(TlsInfo),
    IdleTimeout,
    Shutdown,
    GraceExpired,
    RelayReply(Reply),
}

impl OwnedEvent {
    /// The session event; queued events are handed over, not copied.
    fn into_event(self) -> Event<'static> {
        match self {
            OwnedEvent::Greet => Event::Greet,
            OwnedEvent::Pregreeted => Event::Pregreeted,
            OwnedEvent::Reverse(facts) => Event::Reverse(facts),
            OwnedEvent::Forward { name, addrs } => Event::Forward { name, addrs },
            OwnedEvent::VerdictDeadline { generation } => Event::VerdictDeadline { generation },
            OwnedEvent::Delivered(outcome) => Event::Delivered(outcome),
            OwnedEvent::TlsEstablished(info) => Event::TlsEstablished(info),
            OwnedEvent::IdleTimeout => Event::IdleTimeout,
            OwnedEvent::Shutdown => Event::Shutdown,
            OwnedEvent::GraceExpired => Event::GraceExpired,
            OwnedEvent::RelayReply(reply) => Event::RelayReply(reply),
        }
    }
}

/// Work for one session: its queued events in order, then its unread input.
pub struct Job {
    pub conn_id: u64,
    pub session: Box<Session>,
    pub events: Vec<OwnedEvent>,
    /// Plaintext not yet consumed by the session.
    pub input: Vec<u8>,
}

/// A session coming back from a worker.
pub struct Done {
    pub conn_id: u64,
    pub session: Box<Session>,
    /// The part of `Job::input` the session did not consume (it is parked or the line is
    /// incomplete).
    pub input: Vec<u8>,
    pub output: Output,
}

/// The running pool.
pub struct WorkerPool {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts `count` workers that send finished jobs on `done` and then wake the loop.
    pub fn start(
        count: usize,
        done: Sender<Done>,
        waker: Arc<Waker>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Self> {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let mut threads = Vec::with_capacity(count);
        for n in 0..count.max(1) {
            let jobs = jobs_rx.clone();
            let done = done.clone();
            let waker = waker.clone();
            let metrics = metrics.clone();
            let handle = std::thread::Builder::new()
                .name(format!("worker-{n}"))
                .spawn(move || run_worker(&jobs, &done, &waker, &metrics))?;
            threads.push(handle);
        }
        Ok(Self {
            jobs: Some(jobs_tx),
            threads,
        })
    }

    /// Queues a job; never blocks.
    pub fn submit(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // Fails only when every worker has exited, which happens only at shutdown.
            let _ = jobs.send(job);
        }
    }

    /// Lets the workers finish what is queued and joins them.
    pub fn stop(mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run_worker(jobs: &Receiver<Job>, done: &Sender<Done>, waker: &Waker, metrics: &Metrics) {
    while let Ok(job) = jobs.recv() {
        let finished = process(job, metrics);
        if done.send(finished).is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

/// Runs one job: every queued event in order, then as much input as the session takes.
pub fn process(job: Job, metrics: &Metrics) -> Done {
    let Job {
        conn_id,
        mut session,
        events,
        mut input,
    } = job;
    let now = Now {
        mono: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut output = Output::default();
    for event in events {
        session.handle(event.into_event(), now, &mut output);
    }
    // A session that stops mid-buffer (parked, or waiting for the rest of a line) keeps the
    // remainder; the loop offers it again, with later bytes appended.
    if session.wants_input() && !input.is_empty() {
        output.consumed = 0;
        session.handle(Event::Input(&input), now, &mut output);
        let used = output.consumed.min(input.len());
        input.drain(..used);
    }
    record(&output.observations, metrics);
    Done {
        conn_id,
        session,
        input,
        output,
    }
}

fn record(observations: &[Observation], metrics: &Metrics) {
    for obs in observations {
        match obs {
            Observation::Reply(code) => metrics.reply(*code),
            Observation::MessageAccepted => metrics.message_accepted(),
            Observation::MessageRejected(stage) => metrics.message_rejected(*stage),
            // The loop logs the verdict: it knows the client and the DNS times.
            Observation::Verdict(verdict) => metrics.helo_verdict(verdict),
        }
    }
}
