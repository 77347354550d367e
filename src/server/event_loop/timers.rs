//! The loop's timers: one min-heap of deadlines, and what firing each one does.
//!
//! Nothing sleeps: every delay (greeting, idle, verdict, pregreet linger, PROXY header, accept
//! retry, upkeep) is an entry here, and the earliest one, or the shutdown deadline that
//! `Lifecycle` keeps, is the poll timeout. Timers are never cancelled; a connection timer
//! carries the `ConnId` it was armed for, so one that outlives its connection, or fires for a
//! slot reused since, finds no connection and does nothing.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::config::DeliverTarget;
use crate::metrics::RefuseReason;
use crate::server::conn::{ConnState, Transport};
use crate::server::conn_id::ConnId;
use crate::server::event_loop::Server;
use crate::server::worker::OwnedEvent;
use crate::spool::maildir;

/// SPEC "Pregreet": 503 to everything until QUIT or 10 s, then close.
pub(super) const PREGREET_LINGER: Duration = Duration::from_secs(10);
/// How often the spool's free space is measured against HELOGUARD_MIN_FREE_MB.
const SPACE_CHECK_EVERY: Duration = Duration::from_secs(10);

/// What a timer does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TimerKind {
    /// Something due for one connection.
    Conn(ConnId, ConnTimer),
    /// Measure the spool's free space.
    SpaceCheck,
    /// Check the links to the next hop against their deadlines.
    RelayCheck,
    /// Accept again on listener `index` after accept failed.
    AcceptRetry { index: usize },
}

/// A deadline of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ConnTimer {
    /// SPEC "PROXY protocol": the header must have arrived.
    ProxyHeader,
    /// HELOGUARD_GREET_DELAY_MS is over: greet, or refuse a pregreet.
    Greet,
    /// HELOGUARD_TIMEOUT_SECS may have passed since the last input.
    Idle,
    /// The HELO verdict of EHLO number `generation` is due.
    Verdict(u32),
    /// A pregreeted client's linger is over.
    PregreetClose,
}

/// The pending deadlines, earliest first.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, TimerKind)>>,
}

impl Timers {
    pub(crate) fn push(&mut self, at: Instant, kind: TimerKind) {
        self.heap.push(Reverse((at, kind)));
    }

    /// How long the loop may sleep: until the earliest deadline, or for ever without one.
    pub(crate) fn timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
    }

    /// The earliest timer due at `now`, removed.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<TimerKind> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse((_, k))| k),
            _ => None,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

impl Server {
    /// Fires every timer that is due.
    pub(super) fn fire_timers(&mut self, now: Instant) {
        while let Some(kind) = self.timers.pop_due(now) {
            match kind {
                TimerKind::Conn(id, timer) => self.fire_conn_timer(id, timer, now),
                TimerKind::SpaceCheck => self.check_spool_space(now),
                TimerKind::RelayCheck => self.check_relays(now),
                TimerKind::AcceptRetry { index } => {
                    if self.lifecycle.is_accepting() {
                        self.accept(index);
                    }
                }
            }
        }
    }

    /// Arms the idle timer unless one is armed already; HELOGUARD_TIMEOUT_SECS=0 arms none.
    pub(super) fn arm_idle(&mut self, slot: usize, now: Instant) {
        if self.config.timeout.is_zero() {
            return;
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.idle_timer.is_some() {
            return;
        }
        let at = now + self.config.timeout;
        conn.idle_timer = Some(at);
        let id = conn.id;
        self.timers.push(at, TimerKind::Conn(id, ConnTimer::Idle));
    }

    fn fire_conn_timer(&mut self, id: ConnId, timer: ConnTimer, now: Instant) {
        let Some(slot) = self.slot_of(id) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match timer {
            ConnTimer::ProxyHeader => {
                if matches!(conn.state, ConnState::AwaitingProxy) {
                    self.metrics.refused(RefuseReason::ProxyHeader);
                    self.close(slot, "no PROXY header in time");
                }
            }
            ConnTimer::Greet => {
                let Some(pregreeted) = conn.state.end_greeting_delay() else {
                    return;
                };
                if pregreeted {
                    self.metrics.refused(RefuseReason::Pregreet);
                    conn.pending.push(OwnedEvent::Pregreeted);
                    let close_at = now + PREGREET_LINGER;
                    self.timers
                        .push(close_at, TimerKind::Conn(id, ConnTimer::PregreetClose));
                } else {
                    conn.pending.push(OwnedEvent::Greet);
                }
                self.pump(slot);
            }
            ConnTimer::Idle => {
                conn.idle_timer = None;
                // The timer is armed once and moved on here rather than re-armed on every
                // input, which would fill the heap with stale entries.
                let due = conn.last_input + self.config.timeout;
                if due > now {
                    conn.idle_timer = Some(due);
                    self.timers.push(due, TimerKind::Conn(id, ConnTimer::Idle));
                    return;
                }
                if matches!(conn.transport, Transport::Handshaking(_)) {
                    info!("{}: TLS handshake timed out", conn.client_ip);
                    self.close(slot, "TLS handshake timeout");
                } else if conn.state.is_serving() {
                    conn.pending.push(OwnedEvent::IdleTimeout);
                    self.pump(slot);
                } else {
                    self.close(slot, "timeout");
                }
            }
            ConnTimer::Verdict(generation) => {
                conn.pending
                    .push(OwnedEvent::VerdictDeadline { generation });
                self.pump(slot);
            }
            ConnTimer::PregreetClose => self.close(slot, "pregreet"),
        }
    }

    /// Every session hears of the change: the answer to its next MAIL depends on it.
    fn tell_spool_space(&mut self, low: bool) {
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            // A session still in its greeting delay finds the event queued when it starts.
            if conn.state.is_serving() || matches!(conn.state, ConnState::DelayingGreeting { .. }) {
                conn.pending.push(OwnedEvent::SpoolSpace { low });
                self.pump(slot);
            }
        }
    }

    /// Measures the spool's free space against HELOGUARD_MIN_FREE_MB and re-arms itself.
    pub(super) fn check_spool_space(&mut self, now: Instant) {
        if self.config.deliver != DeliverTarget::Maildir || self.config.min_free_mb == 0 {
            return;
        }
        let low = match maildir::free_space_mb(&self.config.spool) {
            Ok(mb) => mb < self.config.min_free_mb,
            Err(e) => {
                warn!("cannot measure free space of HELOGUARD_SPOOL: {e}");
                false
            }
        };
        if low != self.spool_space_low {
            self.spool_space_low = low;
            self.tell_spool_space(low);
            if low {
                warn!(
                    "spool below HELOGUARD_MIN_FREE_MB={}: MAIL gets 452 4.3.1",
                    self.config.min_free_mb
                );
            } else {
                info!("spool free space recovered");
            }
        }
        self.timers
            .push(now + SPACE_CHECK_EVERY, TimerKind::SpaceCheck);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::event_loop::tests::{TestServer, connect};
    use std::io::Read;

    #[test]
    fn timers_come_out_earliest_first_and_only_when_due() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let late = TimerKind::Conn(ConnId::new(1, 1), ConnTimer::Idle);
        let early = TimerKind::Conn(ConnId::new(2, 1), ConnTimer::Greet);
        timers.push(t0 + Duration::from_secs(3), late);
        timers.push(t0 + Duration::from_secs(1), early);
        timers.push(t0 + Duration::from_secs(2), TimerKind::SpaceCheck);
        assert_eq!(timers.timeout(t0), Some(Duration::from_secs(1)));
        assert_eq!(timers.pop_due(t0), None, "nothing is due yet");
        let now = t0 + Duration::from_secs(2);
        assert_eq!(timers.pop_due(now), Some(early));
        assert_eq!(timers.pop_due(now), Some(TimerKind::SpaceCheck));
        assert_eq!(timers.pop_due(now), None);
        assert_eq!(timers.len(), 1);
        // A deadline already past means "do not sleep", never a negative wait.
        assert_eq!(
            timers.timeout(now + Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
        assert_eq!(timers.pop_due(now + Duration::from_secs(5)), Some(late));
        assert!(timers.is_empty());
        assert_eq!(timers.timeout(now), None);
    }

    #[test]
    fn a_timer_armed_for_a_closed_connection_spares_the_one_that_reuses_its_slot() {
        let mut server = TestServer::start(&[("HELOGUARD_GREET_DELAY_MS", "60000")]);
        let first = connect(&mut server);
        let first_id = server.only_conn_id();
        server.server.close(first_id.slot(), "test");
        drop(first);
        let mut second = connect(&mut server);
        let second_id = server.only_conn_id();
        assert_eq!(second_id.slot(), first_id.slot(), "the slot is reused");
        assert_ne!(second_id, first_id);
        // The first connection's PROXY and pregreet timers fire now: both are stale.
        let now = Instant::now();
        server
            .server
            .timers
            .push(now, TimerKind::Conn(first_id, ConnTimer::PregreetClose));
        server
            .server
            .timers
            .push(now, TimerKind::Conn(first_id, ConnTimer::Greet));
        server.server.fire_timers(now);
        let conn = server
            .server
            .conns
            .get(second_id.slot())
            .expect("still open");
        assert!(matches!(conn.state, ConnState::DelayingGreeting { .. }));
        // The same timer for the live connection does fire: it is greeted.
        server
            .server
            .timers
            .push(now, TimerKind::Conn(second_id, ConnTimer::Greet));
        server.server.fire_timers(now);
        let banner = server.read_reply(&mut second);
        assert!(banner.starts_with("220 "), "{banner}");
        let mut rest = [0u8; 1];
        second.set_nonblocking(true).expect("nonblocking");
        assert!(second.read(&mut rest).is_err(), "nothing but the banner");
    }
}
