//! Wakes the event loop at most once per drain.
//!
//! Every thread that answers the loop (workers, spool writers, the resolver) wakes it through
//! one `LoopWake`. Workers finish jobs tens of thousands of times a second, and each
//! `mio::Waker::wake` is a write to an eventfd. While the loop has a wake pending, another one
//! tells it nothing new: it will drain every channel anyway (wakes coalesce,
//! `mio/tests/waker.rs`). So a sender writes the eventfd only when it is the first to set
//! `pending`, and the loop clears `pending` right before it drains.
//!
//! No message is left behind: a sender sends, then swaps `pending` to true. If it saw true, the
//! loop's clearing swap has not happened yet in `pending`'s order, and because both swaps are
//! acquire-release, the loop's drain after that clearing sees the message. If it saw false, it
//! wakes the loop itself.

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

use mio::Waker;

use crate::wake::LoopWaker;

impl LoopWaker for LoopWake {
    fn wake(&self) -> io::Result<()> {
        LoopWake::wake(self)
    }
}

/// A `mio::Waker` shared by threads that send to the loop, with coalescing.
#[derive(Debug)]
pub(crate) struct LoopWake {
    waker: Arc<Waker>,
    pending: AtomicBool,
}

impl LoopWake {
    pub(crate) fn new(waker: Arc<Waker>) -> Self {
        LoopWake {
            waker,
            pending: AtomicBool::new(false),
        }
    }

    /// Call after sending: wakes the loop unless a wake is already pending.
    pub(crate) fn wake(&self) -> io::Result<()> {
        if self.pending.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.waker.wake()
    }

    /// The loop calls this right before it drains the channels.
    pub(crate) fn rearm(&self) {
        self.pending.swap(false, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TOKEN: mio::Token = mio::Token(3);

    fn wakes(poll: &mut mio::Poll) -> usize {
        let mut events = mio::Events::with_capacity(8);
        poll.poll(&mut events, Some(Duration::from_millis(50)))
            .expect("poll");
        events.iter().filter(|e| e.token() == TOKEN).count()
    }

    #[test]
    fn wakes_before_a_rearm_write_once_and_a_rearm_lets_the_next_one_through() {
        let mut poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), TOKEN).expect("waker"));
        let wake = LoopWake::new(waker);
        for _ in 0..5 {
            wake.wake().expect("wake");
        }
        assert_eq!(wakes(&mut poll), 1);
        // Still pending (no rearm): further wakes add nothing.
        wake.wake().expect("wake");
        assert_eq!(wakes(&mut poll), 0);
        wake.rearm();
        wake.wake().expect("wake");
        assert_eq!(wakes(&mut poll), 1);
    }

    #[test]
    fn every_message_sent_before_a_skipped_wake_is_drained() {
        let mut poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), TOKEN).expect("waker"));
        let wake = Arc::new(LoopWake::new(waker));
        let (tx, rx) = crossbeam_channel::unbounded::<u32>();
        const SENDERS: u32 = 4;
        const EACH: u32 = 20_000;
        let threads: Vec<_> = (0..SENDERS)
            .map(|_| {
                let (tx, wake) = (tx.clone(), wake.clone());
                std::thread::spawn(move || {
                    for n in 0..EACH {
                        tx.send(n).expect("send");
                        wake.wake().expect("wake");
                    }
                })
            })
            .collect();
        drop(tx);
        // The loop: wait for a wake, rearm, drain. It must never wait with a message queued.
        let mut received = 0;
        let mut events = mio::Events::with_capacity(8);
        while received < SENDERS * EACH {
            poll.poll(&mut events, Some(Duration::from_secs(10)))
                .expect("poll");
            assert!(!events.is_empty(), "a message was sent but no wake came");
            wake.rearm();
            received += rx.try_iter().count() as u32;
        }
        for t in threads {
            t.join().expect("sender");
        }
        assert_eq!(received, SENDERS * EACH);
    }
}
