//! The protocol worker pool: a fixed number of threads that run session state machines when
//! their work is large or may touch the disk (message content that goes to a spill file).
//! The loop runs the small jobs itself with the same `run_job` (`Server::pump`): a command
//! line costs microseconds, less than the two thread wakes a trip to a worker costs.
//!
//! A `Box<Session>` is moved loop -> worker -> loop with the events gathered for it, so one
//! thread at a time owns it and its replies stay in order without a lock. Workers send their
//! `Done` first and wake the loop second, because mio wakes coalesce (mio tests/waker.rs) and
//! the loop drains the channel on every wake. The job queue is unbounded on purpose: each
//! session has at most one job in flight, so its length is bounded by the number of sessions,
//! and the loop must never block on a send.
//!
//! A session that asks for a HELO name's A/AAAA gets the answer right away when the resolver
//! already knows it (`AnswerCache`): the worker hands it over and goes on with the session's
//! input, so a repeat sender's EHLO costs no trip through the loop and the resolver thread.

use crate::greylist::GreylistOutcome;
use crate::helo::sender::{ChurnOutcome, DnsblOutcome, RhsblOutcome, SpfOutcome};
use std::any::Any;
use std::io;
use std::panic;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use crate::dns::answer_cache::AnswerCache;
use crate::dns::{Family, Lookup, ReverseFacts};
use crate::metrics::Metrics;
use crate::protocol::reply::Reply;
use crate::server::conn_id::ConnId;
use crate::server::loop_wake::LoopWake;
use crate::session::{
    DeliveryOutcome, Event, Now, Observation, Output, Session, SessionAction, TlsInfo,
};

/// An event for a session that owns no borrowed bytes, so it can wait in a queue.
#[derive(Debug)]
pub(crate) enum OwnedEvent {
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
    SpoolSpace {
        low: bool,
    },
    Dnsbl(DnsblOutcome),
    Spf {
        name: String,
        outcome: SpfOutcome,
    },
    Rhsbl {
        name: String,
        outcome: RhsblOutcome,
    },
    Churn {
        name: String,
        outcome: ChurnOutcome,
    },
    Greylist(GreylistOutcome),
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
            OwnedEvent::SpoolSpace { low } => Event::SpoolSpace { low },
            OwnedEvent::Dnsbl(outcome) => Event::Dnsbl(outcome),
            OwnedEvent::Spf { name, outcome } => Event::Spf { name, outcome },
            OwnedEvent::Rhsbl { name, outcome } => Event::Rhsbl { name, outcome },
            OwnedEvent::Churn { name, outcome } => Event::Churn { name, outcome },
            OwnedEvent::Greylist(outcome) => Event::Greylist(outcome),
        }
    }
}

/// Work for one session: its queued events in order, then its unread input.
pub(crate) struct Job {
    pub conn_id: ConnId,
    pub session: Box<Session>,
    pub events: Vec<OwnedEvent>,
    /// Plaintext not yet consumed by the session.
    pub input: Vec<u8>,
    /// Where the job's replies and actions go: an emptied `Output` of an earlier job, whose
    /// buffers are reused.
    pub output: Output,
}

/// A session coming back from a worker.
pub(crate) struct Done {
    pub conn_id: ConnId,
    pub session: Box<Session>,
    /// The part of `Job::input` the session did not consume (it is parked or the line is
    /// incomplete).
    pub input: Vec<u8>,
    pub output: Output,
}

/// What a worker sends back for one job.
pub(crate) enum WorkerReport {
    /// The job ran; the session comes back.
    Finished(Done),
    /// The job panicked and its session is lost: the loop closes the connection with
    /// 421 4.3.0. The thread lives on for the next job.
    Panicked { conn_id: ConnId, message: String },
}

/// The running pool.
pub(crate) struct WorkerPool {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts `count` workers that send finished jobs on `done` and then wake the loop, and
    /// answer HELO lookups from `known` when they can.
    pub(crate) fn start(
        count: usize,
        done: Sender<WorkerReport>,
        waker: Arc<LoopWake>,
        metrics: Arc<Metrics>,
        known: Arc<AnswerCache>,
    ) -> io::Result<Self> {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let mut threads = Vec::with_capacity(count);
        for n in 0..count.max(1) {
            let jobs = jobs_rx.clone();
            let done = done.clone();
            let waker = waker.clone();
            let metrics = metrics.clone();
            let known = known.clone();
            let handle = std::thread::Builder::new()
                .name(format!("worker-{n}"))
                .spawn(move || {
                    crate::sched::prefer_short_slices();
                    run_worker(&jobs, &done, &waker, &metrics, &known)
                })?;
            threads.push(handle);
        }
        Ok(Self {
            jobs: Some(jobs_tx),
            threads,
        })
    }

    /// Queues a job; never blocks.
    pub(crate) fn submit(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // Fails only when every worker has exited, which happens only at shutdown.
            let _ = jobs.send(job);
        }
    }

    /// Lets the workers finish what is queued and joins them.
    pub(crate) fn stop(mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run_worker(
    jobs: &Receiver<Job>,
    done: &Sender<WorkerReport>,
    waker: &LoopWake,
    metrics: &Metrics,
    known: &AnswerCache,
) {
    while let Ok(job) = jobs.recv() {
        if done.send(run_job(job, metrics, Some(known))).is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

/// Runs one job, here or on the loop, and says how it ended.
pub(crate) fn run_job(job: Job, metrics: &Metrics, known: Option<&AnswerCache>) -> WorkerReport {
    let conn_id = job.conn_id;
    // A bug hit by one session's input must cost that session only: without this, a worker
    // would die and the loop would wait for the session for ever (or the loop itself would
    // die), holding its descriptor and per-IP slot. The session is dropped with the job; the
    // state it was in when the panic struck is not trusted further.
    match panic::catch_unwind(AssertUnwindSafe(|| process(job, metrics, known))) {
        Ok(finished) => WorkerReport::Finished(finished),
        Err(payload) => WorkerReport::Panicked {
            conn_id,
            message: panic_message(payload.as_ref()),
        },
    }
}

/// The text a panic was raised with, for the log line.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        return (*text).to_string();
    }
    if let Some(text) = payload.downcast_ref::<String>() {
        return text.clone();
    }
    "panic with a non-text payload".to_string()
}

/// Tests only: input containing this makes the job panic, so the loop's recovery can be
/// exercised end to end. Not compiled into the server.
#[cfg(test)]
pub(crate) const PANIC_TRIGGER: &[u8] = b"X-TEST-WORKER-PANIC";

/// Runs one job: every queued event in order, then as much input as the session takes,
/// answering from `known` the lookups it can.
pub(crate) fn process(job: Job, metrics: &Metrics, known: Option<&AnswerCache>) -> Done {
    let Job {
        conn_id,
        mut session,
        events,
        mut input,
        mut output,
    } = job;
    output.clear();
    let now = Now {
        mono: Instant::now(),
        wall: SystemTime::now(),
    };
    #[cfg(test)]
    if input
        .windows(PANIC_TRIGGER.len())
        .any(|w| w == PANIC_TRIGGER)
    {
        panic!("injected worker panic");
    }
    let family = Family::of(session.client_ip());
    for event in events {
        session.handle(event.into_event(), now, &mut output);
    }
    loop {
        // A session that stops mid-buffer (parked, or waiting for the rest of a line) keeps
        // the remainder; the loop offers it again, with later bytes appended.
        if session.wants_input() && !input.is_empty() {
            output.consumed = 0;
            session.handle(Event::Input(&input), now, &mut output);
            let used = output.consumed.min(input.len());
            input.drain(..used);
        }
        // An answered lookup may unpark the session, and then it takes more input.
        match known.and_then(|k| answer_known_lookup(&mut output, k, family, now.mono)) {
            Some(answer) => session.handle(answer, now, &mut output),
            None => break,
        }
    }
    record(&output.observations, metrics);
    Done {
        conn_id,
        session,
        input,
        output,
    }
}

/// The A/AAAA answer for a lookup the session has just asked for, when `known` has it. The
/// request is taken out of the action, so the loop does not ask the resolver again.
fn answer_known_lookup(
    output: &mut Output,
    known: &AnswerCache,
    family: Family,
    now: Instant,
) -> Option<Event<'static>> {
    output.actions.iter_mut().find_map(|action| match action {
        SessionAction::HeloAccepted { lookup, .. } => {
            let addrs = known.forward(lookup.as_deref()?, family, now)?;
            let name = lookup.take()?;
            Some(Event::Forward { name, addrs })
        }
        _ => None,
    })
}

fn record(observations: &[Observation], metrics: &Metrics) {
    for obs in observations {
        match obs {
            Observation::Reply(code) => metrics.reply(*code),
            Observation::MessageAccepted => metrics.message_accepted(),
            Observation::MessageRejected(stage) => metrics.message_rejected(*stage),
            // The loop logs the verdict: it knows the client and the DNS times.
            Observation::Verdict { verdict, .. } => {
                metrics.helo_verdict(verdict);
                for hit in &verdict.listed {
                    metrics.dnsbl_listing(&hit.zone);
                }
            }
            Observation::Greylisted(outcome) => metrics.greylisted(*outcome),
            // Only logged (by the loop); MessageAccepted and MessageRejected count them.
            Observation::Refused(_) | Observation::Accepted(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::dns::PtrName;
    use crate::dns::answer_cache::Keepable;
    use crate::dns::no_observer;
    use crate::server::event_loop::startup::build_session;
    use crate::session::SessionSettings;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const HELO: &str = "mail.example.org";

    /// A session whose EHLO waits for its verdict (HELOGUARD_REJECT_AT=helo, with a check that
    /// reads A/AAAA set to reject), greeted and with its PTR facts in, followed by EHLO and a
    /// pipelined MAIL.
    fn job() -> Job {
        let (config, _) = Config::from_lookup(|name| match name {
            "HELOGUARD_REJECT_AT" => Some("helo".into()),
            "HELOGUARD_HELO_POLICY" => Some("default=tag,forward=reject".into()),
            "HELOGUARD_DNS" => Some("127.0.0.1:53".into()),
            "HELOGUARD_HOSTNAME" => Some("mx.test".into()),
            // The HELO history would be one more answer to wait for.
            "HELOGUARD_HELO_CHURN" => Some("0".into()),
            _ => None,
        })
        .expect("config");
        let session = build_session(
            Arc::new(SessionSettings::from(&config)),
            CLIENT,
            1,
            false,
            None,
        );
        let facts = ReverseFacts {
            ptr: Lookup::Found(vec![PtrName {
                name: HELO.into(),
                addrs: Lookup::Found(vec![CLIENT]),
            }]),
        };
        Job {
            conn_id: ConnId::new(1, 1),
            session,
            events: vec![OwnedEvent::Greet, OwnedEvent::Reverse(facts)],
            input: format!("EHLO {HELO}\r\nMAIL FROM:<a@example.org>\r\n").into_bytes(),
            output: Output::default(),
        }
    }

    fn forward_lookups(done: &Done) -> Vec<Option<String>> {
        done.output
            .actions
            .iter()
            .filter_map(|a| match a {
                SessionAction::HeloAccepted { lookup, .. } => Some(lookup.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_known_answer_finishes_the_ehlo_and_the_pipelined_command_in_one_job() {
        let known = AnswerCache::new(16, no_observer());
        let addrs = Keepable {
            value: Lookup::Found(vec![CLIENT]),
            until: Some(Instant::now() + Duration::from_secs(60)),
        };
        known.keep_forward(HELO, Family::V4, &addrs, Vec::new());
        let done = process(job(), &Metrics::new(), Some(&known));
        let text = String::from_utf8_lossy(&done.output.bytes);
        assert!(text.starts_with("220 "), "{text}");
        assert!(text.contains("250-mx.test"), "EHLO answered: {text}");
        assert!(text.contains("250 2.1.0"), "MAIL answered: {text}");
        assert!(done.input.is_empty());
        // The lookup was answered here: nothing is left for the loop to ask.
        assert_eq!(forward_lookups(&done), [None]);
        assert!(
            done.output
                .observations
                .iter()
                .any(|o| matches!(o, Observation::Verdict { .. }))
        );
    }

    #[test]
    fn a_reused_output_carries_nothing_of_its_last_job_into_the_next() {
        let mut stale = Output::default();
        stale
            .bytes
            .extend_from_slice(b"250 2.0.0 Ok: queued as OTHER\r\n");
        stale.consumed = 999;
        stale.actions.push(SessionAction::Close);
        stale.observations.push(Observation::Reply(550));
        let mut job = job();
        job.output = stale;
        let done = process(job, &Metrics::new(), None);
        let text = String::from_utf8_lossy(&done.output.bytes);
        assert!(text.starts_with("220 "), "{text}");
        assert!(!text.contains("OTHER"), "{text}");
        assert!(
            !done
                .output
                .actions
                .iter()
                .any(|a| matches!(a, SessionAction::Close))
        );
        assert!(
            !done
                .output
                .observations
                .iter()
                .any(|o| matches!(o, Observation::Reply(550)))
        );
    }

    #[test]
    fn an_unknown_name_is_left_for_the_resolver_and_the_session_waits() {
        let known = AnswerCache::new(16, no_observer());
        let done = process(job(), &Metrics::new(), Some(&known));
        let text = String::from_utf8_lossy(&done.output.bytes);
        assert_eq!(text.lines().count(), 1, "only the banner: {text:?}");
        assert_eq!(forward_lookups(&done), [Some(HELO.to_string())]);
        assert!(!done.input.is_empty(), "MAIL waits for the verdict");
    }
}
