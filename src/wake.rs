//! How the threads that answer the event loop (workers, spool writers, the resolver) wake it.
//!
//! The trait lives apart from the loop so that the resolver and the spool, which sit below the
//! server in the layers of `lib.rs`, need nothing of it: the server hands them its coalescing
//! `LoopWake`, their tests a bare `mio::Waker`.

use std::io;

use mio::Waker;

/// Wakes the event loop after a message was sent to it.
pub trait LoopWaker: Send + Sync {
    /// Call after sending, never before: a woken loop must find the message.
    fn wake(&self) -> io::Result<()>;
}

impl LoopWaker for Waker {
    fn wake(&self) -> io::Result<()> {
        Waker::wake(self)
    }
}
