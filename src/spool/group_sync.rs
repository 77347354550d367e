//! Group commit for the fsync of `new/`: one directory fsync makes durable every rename that
//! finished before it started, so writers that renamed while another fsync was running share the
//! next one instead of each issuing their own.
//!
//! Each fsync of `new/` writes the directory block and flushes the device's cache; with
//! HELOGUARD_SPOOL_WRITERS threads renaming at once, most of those flushes would carry nothing
//! new. A caller joins the round that has not started yet; when no fsync is running, the first
//! caller of that round runs it for everyone in it (the leader), and the others wait for its
//! outcome. The guarantee each caller gets is the one a private fsync would give: an fsync that
//! started after its rename returned has completed, and its error, if any, is the caller's too.

use std::io;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::OnceLock;
use std::sync::PoisonError;

/// Shares directory fsyncs between the threads that need one.
#[derive(Debug, Default)]
pub(crate) struct GroupSync {
    state: Mutex<SyncState>,
    /// Signalled when an fsync ends: its round has an outcome, and the next round may start.
    finished: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// The round the next fsync will cover; every caller that arrives before it starts joins.
    next: Arc<Round>,
    /// An fsync (of an earlier round) is running.
    syncing: bool,
}

/// One fsync and everyone it covers; its result, once it has run.
#[derive(Debug, Default)]
struct Round {
    outcome: OnceLock<io::Result<()>>,
}

/// An equal error for each of several callers (`io::Error` is not `Clone`).
pub(crate) fn copy_error(err: &io::Error) -> io::Error {
    match err.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(err.kind(), err.to_string()),
    }
}

/// The running fsync's turn, ended on drop, so that a `sync` that panics does not leave every
/// later caller waiting for a round that never ends.
struct Leading<'a> {
    group: &'a GroupSync,
    round: &'a Round,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.group.end_turn(self.round);
    }
}

impl GroupSync {
    /// Returns once an fsync (`sync`, run by this thread or another one) that started after
    /// this call began has finished, with that fsync's result. Call it after the rename that
    /// must be made durable has returned.
    pub(crate) fn sync<F>(&self, sync: F) -> io::Result<()>
    where
        F: FnOnce() -> io::Result<()>,
    {
        let mut state = self.lock();
        let round = Arc::clone(&state.next);
        loop {
            if let Some(outcome) = round.outcome.get() {
                return outcome.as_ref().map(|_| ()).map_err(copy_error);
            }
            if !state.syncing {
                // A round gets its outcome before `syncing` is cleared, so a round without one
                // while nothing runs has not started: it is still `next`, and this caller leads.
                state.next = Arc::new(Round::default());
                state.syncing = true;
                drop(state);
                let leading = Leading {
                    group: self,
                    round: &round,
                };
                let result = sync();
                let mine = result.as_ref().map(|_| ()).map_err(copy_error);
                let _ = round.outcome.set(result);
                drop(leading);
                return mine;
            }
            state = self
                .finished
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Ends a leader's turn: its round gets an outcome (an error if `sync` panicked before
    /// setting one), the next round may start, and every waiter looks again.
    fn end_turn(&self, round: &Round) {
        let _ = round
            .outcome
            .set(Err(io::Error::other("directory fsync panicked")));
        // Set before `syncing` is cleared (see `sync`).
        self.lock().syncing = false;
        self.finished.notify_all();
    }

    /// The state holds no invariant a panicking holder could break half-way (the fsync runs
    /// outside the lock), so a poisoned lock is still good.
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[test]
    fn a_lone_caller_runs_its_own_fsync() {
        let group = GroupSync::default();
        let runs = AtomicUsize::new(0);
        for _ in 0..3 {
            group
                .sync(|| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .expect("synced");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn callers_arriving_during_an_fsync_share_the_next_one() {
        let group = Arc::new(GroupSync::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(Barrier::new(2));
        let (release, released) = std::sync::mpsc::channel::<()>();
        // The first caller's fsync blocks until the others are waiting behind it.
        let first = {
            let (group, runs, started) = (group.clone(), runs.clone(), started.clone());
            std::thread::spawn(move || {
                group.sync(|| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    started.wait();
                    released.recv().expect("released");
                    Ok(())
                })
            })
        };
        started.wait();
        let later: Vec<_> = (0..4)
            .map(|_| {
                let (group, runs) = (group.clone(), runs.clone());
                std::thread::spawn(move || {
                    group.sync(|| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                })
            })
            .collect();
        wait_for_members(&group, 4);
        release.send(()).expect("release");
        first.join().expect("first").expect("first synced");
        for caller in later {
            caller.join().expect("later").expect("later synced");
        }
        // One fsync for the first caller, one shared by all four later ones.
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn every_member_of_a_failed_round_gets_the_error_and_the_next_round_runs_again() {
        let group = Arc::new(GroupSync::default());
        let started = Arc::new(Barrier::new(2));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let first = {
            let (group, started) = (group.clone(), started.clone());
            std::thread::spawn(move || {
                group.sync(|| {
                    started.wait();
                    released.recv().expect("released");
                    Ok(())
                })
            })
        };
        started.wait();
        let later: Vec<_> = (0..3)
            .map(|_| {
                let group = group.clone();
                std::thread::spawn(move || {
                    group.sync(|| Err(io::Error::from_raw_os_error(libc_eio())))
                })
            })
            .collect();
        wait_for_members(&group, 3);
        release.send(()).expect("release");
        first.join().expect("first").expect("first synced");
        for caller in later {
            let err = caller.join().expect("later").expect_err("round failed");
            assert_eq!(err.raw_os_error(), Some(libc_eio()));
        }
        // A failure is not remembered past its round.
        group
            .sync(|| Ok(()))
            .expect("a new round runs its own fsync");
    }

    #[test]
    fn a_panicking_fsync_fails_its_round_and_the_next_caller_runs_its_own() {
        let group = GroupSync::default();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            group.sync(|| -> io::Result<()> { panic!("test panic") })
        }));
        assert!(panicked.is_err());
        let runs = AtomicUsize::new(0);
        group
            .sync(|| {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .expect("a new round");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_error_without_an_os_code_keeps_its_kind_and_text() {
        let err = copy_error(&io::Error::other("disk gone"));
        assert_eq!(err.kind(), io::ErrorKind::Other);
        assert_eq!(err.to_string(), "disk gone");
    }

    /// Waits until `n` callers have joined the round that has not started yet.
    fn wait_for_members(group: &GroupSync, n: usize) {
        while Arc::strong_count(&group.lock().next) < 1 + n {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// EIO, without a libc dependency in the tests.
    fn libc_eio() -> i32 {
        5
    }
}
