//! The spool writer threads (SPEC "Architecture": durable writes on HELOGUARD_SPOOL_WRITERS
//! threads, sized for the disk, not the cores, so that fsync latency never stalls protocol
//! work).
//!
//! Jobs come in on one bounded crossbeam channel shared by every writer: `submit` never
//! blocks the event loop (a full queue answers the job at once with `SpoolError::QueueFull`,
//! which the client sees as 451 4.3.0, rather than letting messages pile up in memory), and with N threads up to N fsyncs are in flight at once, which is what
//! lets a disk with a write cache or several queues commit them together. Each result goes back
//! on the `done` channel, *then* the loop's waker is woken: mio coalesces wakes (several wakes
//! before a poll make one event, `mio/tests/waker.rs`), so the loop drains `done` until empty on
//! every wake, and the message must be in the channel before the wake that announces it.
//!
//! A writer that finds more jobs queued behind the one it woke for takes them too, up to
//! `MAX_BATCH`, and delivers them together: one fsync of new/ covers the batch's renames, and
//! one wake-up serves several messages. Under light load a batch is one message, so nothing
//! waits for company.
//!
//! Shutdown drops the job sender and joins every thread: each writer finishes the jobs already
//! queued, so no message the loop handed over is abandoned half-way (SPEC "Signals": no
//! half-written files in new/).

use std::io;
use std::panic;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use crossbeam_channel::Sender;
use crossbeam_channel::TrySendError;

use crate::message::Envelope;
use crate::spool::maildir::Maildir;
use crate::spool::maildir::SpoolError;
use crate::wake::LoopWaker;

/// Most messages one writer delivers together.
pub(crate) const MAX_BATCH: usize = 8;

/// Jobs waiting for a writer at most. Each holds a whole message, so the bound is what keeps
/// a disk slower than the clients from turning into memory.
pub(crate) const JOB_QUEUE: usize = 1024;

/// One message to write; `id` is the caller's, returned unchanged in `SpoolDone`.
pub struct SpoolJob {
    pub id: u64,
    pub envelope: Box<Envelope>,
}

/// The outcome of one `SpoolJob`: the file name in new/, or why it failed (451 4.3.0).
#[derive(Debug)]
pub(crate) struct SpoolDone {
    pub id: u64,
    pub result: Result<String, SpoolError>,
}

/// The running writer threads.
pub struct SpoolWriters {
    jobs: Sender<SpoolJob>,
    /// Kept to answer a job that can no longer be queued (every writer gone).
    done: Sender<SpoolDone>,
    waker: Option<Arc<dyn LoopWaker>>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts `threads` writers (at least one) that deliver into `maildir`, send each result on
/// `done` and then wake `waker`.
pub(crate) fn spawn_writers(
    maildir: Arc<Maildir>,
    threads: usize,
    done: Sender<SpoolDone>,
    waker: Option<Arc<dyn LoopWaker>>,
) -> io::Result<SpoolWriters> {
    spawn_with(threads, done, waker, move |envs| {
        let _counted = maildir.panic_counter();
        maildir.deliver_all(envs)
    })
}

impl SpoolWriters {
    /// Queues `job`; never blocks. Should every writer be gone, the job is answered at once
    /// with `SpoolError::WritersGone`, so the session still gets its 451.
    pub fn submit(&self, job: SpoolJob) {
        let (id, error) = match self.jobs.try_send(job) {
            Ok(()) => return,
            Err(TrySendError::Full(job)) => (job.id, SpoolError::QueueFull),
            Err(TrySendError::Disconnected(job)) => (job.id, SpoolError::WritersGone),
        };
        let done = SpoolDone {
            id,
            result: Err(error),
        };
        report(&self.done, self.waker.as_deref(), done);
    }

    /// Stops taking jobs and waits until every job already submitted is written and answered.
    pub fn shutdown(self) {
        drop(self.jobs);
        for thread in self.threads {
            if thread.join().is_err() {
                log::error!("spool: a writer thread panicked");
            }
        }
    }
}

/// `spawn_writers` over any batch delivery function, which returns one result per envelope in
/// order (tests use one that needs no trace fields).
fn spawn_with<F>(
    threads: usize,
    done: Sender<SpoolDone>,
    waker: Option<Arc<dyn LoopWaker>>,
    deliver: F,
) -> io::Result<SpoolWriters>
where
    F: Fn(&[&Envelope]) -> Vec<Result<String, SpoolError>> + Send + Sync + 'static,
{
    spawn_bounded(JOB_QUEUE, threads, done, waker, deliver)
}

/// `spawn_with` with at most `bound` jobs waiting.
fn spawn_bounded<F>(
    bound: usize,
    threads: usize,
    done: Sender<SpoolDone>,
    waker: Option<Arc<dyn LoopWaker>>,
    deliver: F,
) -> io::Result<SpoolWriters>
where
    F: Fn(&[&Envelope]) -> Vec<Result<String, SpoolError>> + Send + Sync + 'static,
{
    let deliver = Arc::new(deliver);
    let (jobs, queue) = crossbeam_channel::bounded::<SpoolJob>(bound.max(1));
    let mut writers = SpoolWriters {
        jobs,
        done,
        waker,
        threads: Vec::new(),
    };
    // Zero writers would accept jobs and never answer them.
    for n in 0..threads.max(1) {
        let queue = queue.clone();
        let done = writers.done.clone();
        let waker = writers.waker.clone();
        let deliver = Arc::clone(&deliver);
        let spawned = std::thread::Builder::new()
            .name(format!("spool-writer-{n}"))
            .spawn(move || {
                crate::sched::yield_cpu_to_protocol_work();
                run_writer(&queue, &done, waker.as_deref(), &*deliver)
            });
        match spawned {
            Ok(thread) => writers.threads.push(thread),
            Err(err) => {
                // Nothing was submitted yet: stop the threads already started and give up.
                writers.shutdown();
                return Err(err);
            }
        }
    }
    Ok(writers)
}

/// One writer: takes jobs, with whatever is queued behind them, until the sender is dropped
/// and the queue is empty.
fn run_writer<F>(
    queue: &Receiver<SpoolJob>,
    done: &Sender<SpoolDone>,
    waker: Option<&dyn LoopWaker>,
    deliver: &F,
) where
    F: Fn(&[&Envelope]) -> Vec<Result<String, SpoolError>>,
{
    let mut batch: Vec<SpoolJob> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = queue.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH
            && let Ok(next) = queue.try_recv()
        {
            batch.push(next);
        }
        let envelopes: Vec<&Envelope> = batch.iter().map(|job| &*job.envelope).collect();
        // A panic must not take the answers with it: the sessions would wait forever.
        let mut results = panic::catch_unwind(AssertUnwindSafe(|| deliver(&envelopes)))
            .unwrap_or_default()
            .into_iter();
        drop(envelopes);
        for job in batch.drain(..) {
            let result = results.next().unwrap_or(Err(SpoolError::WriterPanicked));
            if let Err(err) = &result {
                log::error!("spool: message {} not written: {err}", job.id);
            }
            let SpoolJob { id, envelope } = job;
            // The message's spill file in tmp/ goes before the client hears the answer, so a
            // client that sees 250 finds nothing of its message left in tmp/.
            drop(envelope);
            report(done, waker, SpoolDone { id, result });
        }
    }
}

/// Sends `result`, then wakes the loop: in this order, or the wake could come before the result
/// and the loop would miss it until the next event.
fn report(done: &Sender<SpoolDone>, waker: Option<&dyn LoopWaker>, result: SpoolDone) {
    if done.send(result).is_err() {
        // The loop is gone (shutting down); the file, if written, stays in new/.
        return;
    }
    if let Some(waker) = waker
        && let Err(err) = waker.wake()
    {
        log::error!("spool: cannot wake the event loop: {err}");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::fs;
    use std::time::Duration;

    use super::*;
    use crate::spool::maildir::TestDir;

    fn envelope(n: u64) -> Box<Envelope> {
        let content = format!("Subject: {n}\r\n\r\nbody {n}\r\n");
        Box::new(crate::spool::test_envelope(
            &format!("Q{n}"),
            content.as_bytes(),
        ))
    }

    /// The pool over `Maildir::store` of the bare content: no trace fields needed.
    fn content_only_pool(
        maildir: &Arc<Maildir>,
        threads: usize,
        done: Sender<SpoolDone>,
    ) -> SpoolWriters {
        let maildir = Arc::clone(maildir);
        spawn_with(threads, done, None, move |envs| {
            let contents: Vec<[&[u8]; 1]> =
                envs.iter().map(|env| [&env.content.memory[..]]).collect();
            let messages: Vec<&[&[u8]]> = contents.iter().map(|c| &c[..]).collect();
            maildir.store_all(&messages)
        })
        .expect("spawn writers")
    }

    #[test]
    fn two_hundred_concurrent_jobs_on_eight_writers_give_distinct_files() {
        let dir = TestDir::new("pool");
        let maildir = Arc::new(Maildir::open(&dir.0, "mx").expect("open"));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let writers = content_only_pool(&maildir, 8, done_tx);
        for id in 0..200 {
            writers.submit(SpoolJob {
                id,
                envelope: envelope(id),
            });
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for _ in 0..200 {
            let done = done_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a result");
            let name = done.result.expect("written");
            let stored = fs::read(dir.0.join("new").join(&name)).expect("read");
            assert_eq!(stored, envelope(done.id).content.memory);
            assert!(ids.insert(done.id));
            assert!(names.insert(name));
        }
        writers.shutdown();
        assert_eq!(fs::read_dir(dir.0.join("new")).expect("list").count(), 200);
    }

    #[test]
    fn shutdown_finishes_every_submitted_job() {
        let dir = TestDir::new("pool-shutdown");
        let maildir = Arc::new(Maildir::open(&dir.0, "mx").expect("open"));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let writers = content_only_pool(&maildir, 2, done_tx);
        for id in 0..20 {
            writers.submit(SpoolJob {
                id,
                envelope: envelope(id),
            });
        }
        writers.shutdown();
        assert_eq!(done_rx.try_iter().count(), 20);
    }

    #[test]
    fn results_are_sent_before_the_wake() {
        let dir = TestDir::new("pool-wake");
        let maildir = Arc::new(Maildir::open(&dir.0, "mx").expect("open"));
        let mut poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(7)).expect("waker"));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let store = Arc::clone(&maildir);
        let writers = spawn_with(1, done_tx, Some(waker), move |envs| {
            envs.iter()
                .map(|env| store.store(&[&env.content.memory]))
                .collect()
        })
        .expect("spawn");
        writers.submit(SpoolJob {
            id: 1,
            envelope: envelope(1),
        });
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(60)))
            .expect("poll");
        assert!(events.iter().any(|e| e.token() == mio::Token(7)));
        let done = done_rx.try_recv().expect("the result is there at the wake");
        assert_eq!(done.id, 1);
        writers.shutdown();
    }

    #[test]
    fn failures_come_back_as_results() {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let writers = spawn_with(2, done_tx, None, |envs| {
            envs.iter().map(|_| Err(SpoolError::WritersGone)).collect()
        })
        .expect("spawn");
        writers.submit(SpoolJob {
            id: 9,
            envelope: envelope(9),
        });
        writers.shutdown();
        let done = done_rx.try_recv().expect("a result");
        assert_eq!(done.id, 9);
        assert!(matches!(done.result, Err(SpoolError::WritersGone)));
    }

    #[test]
    fn a_panicking_delivery_is_answered_and_the_writer_goes_on() {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let writers = spawn_with(1, done_tx, None, |envs| {
            envs.iter()
                .map(|env| match env.trace.queue_id.as_str() {
                    "Q1" => panic!("test panic"),
                    _ => Ok(String::from("file")),
                })
                .collect()
        })
        .expect("spawn");
        for id in 1..=2 {
            writers.submit(SpoolJob {
                id,
                envelope: envelope(id),
            });
            // One at a time, so the second is not in the batch that panics.
            let done = done_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a result");
            assert_eq!(done.id, id);
            if id == 1 {
                assert!(matches!(done.result, Err(SpoolError::WriterPanicked)));
            } else {
                assert_eq!(done.result.as_deref().ok(), Some("file"));
            }
        }
        writers.shutdown();
    }

    #[test]
    fn writers_run_below_the_protocol_threads() {
        let (done_tx, _done_rx) = crossbeam_channel::unbounded();
        let (started_tx, started_rx) = crossbeam_channel::unbounded();
        let writers = spawn_with(1, done_tx, None, move |envs| {
            // Reports this writer's thread id, then answers every job.
            // SAFETY: gettid has no preconditions.
            let _ = started_tx.send(unsafe { libc::gettid() });
            envs.iter().map(|_| Ok(String::new())).collect()
        })
        .expect("spawn");
        writers.submit(SpoolJob {
            id: 1,
            envelope: envelope(1),
        });
        let tid = started_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("writer ran");
        let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
        // Fields after the parenthesised name; nice is field 19 of stat(5), the 17th here.
        let after_name = stat.rsplit_once(')').expect("stat format").1;
        let nice: i32 = after_name
            .split_whitespace()
            .nth(16)
            .and_then(|f| f.parse().ok())
            .expect("nice field");
        assert!(nice >= crate::sched::WRITER_NICENESS, "writer nice {nice}");
        writers.shutdown();
    }

    #[test]
    fn queued_jobs_are_delivered_in_batches_with_one_result_each() {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let writers = spawn_with(1, done_tx, None, move |envs| {
            let mut sizes = seen.lock().expect("sizes");
            sizes.push(envs.len());
            // The first batch waits until everything else is queued behind it.
            if sizes.len() == 1 {
                let _ = gate_rx.recv_timeout(Duration::from_secs(60));
            }
            envs.iter()
                .map(|env| Ok(env.trace.queue_id.clone()))
                .collect()
        })
        .expect("spawn");
        for id in 0..20 {
            writers.submit(SpoolJob {
                id,
                envelope: envelope(id),
            });
        }
        let _ = gate_tx.send_timeout((), Duration::from_secs(60));
        writers.shutdown();
        let results: Vec<SpoolDone> = done_rx.try_iter().collect();
        let ids: Vec<u64> = results.iter().map(|d| d.id).collect();
        assert_eq!(ids, (0..20).collect::<Vec<u64>>());
        for done in &results {
            assert_eq!(
                done.result.as_deref().ok(),
                Some(format!("Q{}", done.id).as_str())
            );
        }
        let sizes = sizes.lock().expect("sizes").clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&n| n <= MAX_BATCH), "{sizes:?}");
        assert!(sizes.len() < 20, "queued jobs were batched: {sizes:?}");
    }

    #[test]
    fn a_full_queue_answers_at_once_without_blocking() {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let (busy_tx, busy_rx) = crossbeam_channel::bounded::<()>(1);
        let writers = spawn_bounded(2, 1, done_tx, None, move |envs| {
            let _ = busy_tx.try_send(());
            let _ = gate_rx.recv_timeout(Duration::from_secs(60));
            envs.iter()
                .map(|env| Ok(env.trace.queue_id.clone()))
                .collect()
        })
        .expect("spawn");
        writers.submit(SpoolJob {
            id: 0,
            envelope: envelope(0),
        });
        // The writer holds job 0; two more fill the queue, the fourth finds it full.
        busy_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("writer busy");
        for id in 1..4 {
            writers.submit(SpoolJob {
                id,
                envelope: envelope(id),
            });
        }
        let refused = done_rx
            .recv_timeout(Duration::from_secs(1))
            .expect("answered at once");
        assert_eq!(refused.id, 3);
        assert!(matches!(refused.result, Err(SpoolError::QueueFull)));
        // Closing the gate lets every later batch through.
        drop(gate_tx);
        writers.shutdown();
        let ids: Vec<u64> = done_rx.try_iter().map(|d| d.id).collect();
        assert_eq!(ids, [0, 1, 2]);
    }

    #[test]
    fn spawn_writers_delivers_through_the_maildir() {
        let dir = TestDir::new("pool-deliver");
        let maildir = Arc::new(Maildir::open(&dir.0, "mx").expect("open"));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let writers = spawn_writers(maildir, 4, done_tx, None).expect("spawn");
        for id in 0..10 {
            writers.submit(SpoolJob {
                id,
                envelope: envelope(id),
            });
        }
        writers.shutdown();
        let results: Vec<SpoolDone> = done_rx.try_iter().collect();
        assert_eq!(results.len(), 10);
        assert!(results.iter().all(|d| d.result.is_ok()));
    }
}
