//! The server's lifecycle: signals, the shutdown grace, the final flush, SIGHUP reloads.
//!
//! SPEC "Signals": SIGTERM/SIGINT stop accepting at once; sessions outside a transaction get
//! 421 4.3.2 at once, sessions inside one may finish it within HELOGUARD_SHUTDOWN_GRACE_SECS
//! and then get 421 4.3.2; a second SIGTERM ends at once. SIGHUP reloads the TLS certificate
//! and key. systemd hears of each step through sd_notify: STOPPING=1 when the shutdown
//! begins, RELOADING=1 then READY=1 around a reload (as `Type=notify-reload` requires).

use std::time::{Duration, Instant};

use log::{info, warn};

use crate::metrics::RefuseReason;
use crate::server::conn::ConnState;
use crate::server::event_loop::Handoff;
use crate::server::event_loop::Server;
use crate::server::sd_notify;
use crate::server::worker::OwnedEvent;

/// After the shutdown grace, sessions get this long to flush their 421 before exit.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// Where the server is between start and exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Accepting and serving.
    Running,
    /// A stop was requested: no new connections; open transactions may finish until
    /// `grace_ends`.
    Draining { grace_ends: Instant },
    /// The grace is over and every session was told 421; their replies get until `exit_at`.
    Flushing { exit_at: Instant },
    /// Leave the loop now.
    Stopped,
}

/// What the loop must do after a lifecycle step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StopStep {
    /// Stop accepting, and tell every session the server is going away.
    BeginDraining,
    /// Nothing more to tell anyone: exit.
    ExitNow,
    /// Tell every session its grace is over.
    EndGrace,
}

impl Lifecycle {
    /// A stop was requested (SIGTERM, SIGINT): the first drains, any later one stops at once.
    pub(crate) fn request_stop(&mut self, now: Instant, grace: Duration) -> StopStep {
        match self {
            Lifecycle::Running => {
                *self = Lifecycle::Draining {
                    grace_ends: now + grace,
                };
                StopStep::BeginDraining
            }
            Lifecycle::Draining { .. } | Lifecycle::Flushing { .. } | Lifecycle::Stopped => {
                *self = Lifecycle::Stopped;
                StopStep::ExitNow
            }
        }
    }

    /// The step due at `now`, if any, taken.
    pub(crate) fn advance(&mut self, now: Instant) -> Option<StopStep> {
        match *self {
            Lifecycle::Draining { grace_ends } if grace_ends <= now => {
                *self = Lifecycle::Flushing {
                    exit_at: now + FINAL_FLUSH,
                };
                Some(StopStep::EndGrace)
            }
            Lifecycle::Flushing { exit_at } if exit_at <= now => {
                *self = Lifecycle::Stopped;
                Some(StopStep::ExitNow)
            }
            _ => None,
        }
    }

    /// Gives the final flush at least FINAL_FLUSH from `now`: a session held past the grace
    /// for its message's answer needs the time to send that answer and its 421.
    pub(crate) fn extend_flush(&mut self, now: Instant) {
        if let Lifecycle::Flushing { exit_at } = self {
            *exit_at = (*exit_at).max(now + FINAL_FLUSH);
        }
    }

    /// When [`Self::advance`] has something to do next.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match *self {
            Lifecycle::Draining { grace_ends } => Some(grace_ends),
            Lifecycle::Flushing { exit_at } => Some(exit_at),
            Lifecycle::Running | Lifecycle::Stopped => None,
        }
    }

    pub(crate) fn is_accepting(&self) -> bool {
        matches!(self, Lifecycle::Running)
    }

    /// The loop is done: told to stop, or shutting down with no connection left.
    pub(crate) fn is_over(&self, open_connections: usize) -> bool {
        match self {
            Lifecycle::Running => false,
            Lifecycle::Stopped => true,
            Lifecycle::Draining { .. } | Lifecycle::Flushing { .. } => open_connections == 0,
        }
    }
}

impl Server {
    /// Handles every signal that arrived since the last call.
    pub(super) fn handle_signals(&mut self) {
        use signal_hook::consts::SIGHUP;
        let pending: Vec<i32> = match self.signals.as_mut() {
            Some(s) => s.pending().collect(),
            None => return,
        };
        for sig in pending {
            if sig == SIGHUP {
                self.reload();
            } else {
                self.request_stop(Instant::now());
            }
        }
    }

    /// SIGHUP: reloads the TLS certificate and key; a failed reload keeps the old ones.
    fn reload(&mut self) {
        sd_notify::notify_reloading();
        match &self.tls {
            None => info!("SIGHUP: no TLS configured, nothing to reload"),
            Some(tls) => match tls.reload() {
                Ok(()) => info!("SIGHUP: TLS certificate and key reloaded"),
                Err(e) => warn!("SIGHUP: TLS reload failed, keeping the old certificate: {e}"),
            },
        }
        // The reload is over either way; systemd waits for READY=1 to finish `reload`.
        sd_notify::notify_ready();
    }

    /// First request: stop accepting, 421 to idle sessions, grace for open transactions.
    /// Any later request: end at once.
    pub(super) fn request_stop(&mut self, now: Instant) {
        match self.lifecycle.request_stop(now, self.config.shutdown_grace) {
            StopStep::BeginDraining => self.begin_draining(),
            StopStep::ExitNow => info!("second stop request: exiting now"),
            StopStep::EndGrace => self.end_grace(),
        }
    }

    /// Takes the lifecycle step due at `now`, if any.
    pub(super) fn advance_lifecycle(&mut self, now: Instant) {
        if self.awaits_spool() {
            // The final flush starts over once the writers have answered (`on_spooled`).
            self.lifecycle.extend_flush(now);
        }
        match self.lifecycle.advance(now) {
            Some(StopStep::EndGrace) => self.end_grace(),
            Some(StopStep::BeginDraining | StopStep::ExitNow) | None => {}
        }
    }

    fn begin_draining(&mut self) {
        sd_notify::notify_stopping();
        info!(
            "stop requested: no new connections, {} s grace for open transactions",
            self.config.shutdown_grace.as_secs()
        );
        for (mut l, _) in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.state.is_serving() {
                conn.pending.push(OwnedEvent::Shutdown);
                self.pump(slot);
            } else if matches!(conn.state, ConnState::Closing { .. }) {
                // Already leaving with its last reply queued: let that reply go out.
                continue;
            } else {
                self.metrics.refused(RefuseReason::Shutdown);
                self.close(slot, "shutdown");
            }
        }
    }

    /// Tells every session its grace is over. A session whose message is being written keeps
    /// waiting for it: a 421 now could tell the client a message failed that then lands in
    /// new/, and the client would send it again. It gets its 250 (or 451) first, then the 421
    /// (`on_spooled`); only a second stop request cuts that wait short.
    fn end_grace(&mut self) {
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.spooling {
                conn.grace_held = true;
                continue;
            }
            conn.pending.push(OwnedEvent::GraceExpired);
            self.pump(slot);
        }
    }

    /// Whether some session still waits for the spool writers to answer for its message.
    fn awaits_spool(&self) -> bool {
        self.conns.iter().any(|(_, c)| c.spooling)
    }

    /// Closes what is left and stops the threads.
    pub(super) fn finish(mut self) {
        for slot in self.conns.iter().map(|(k, _)| k).collect::<Vec<_>>() {
            self.close(slot, "shutdown");
        }
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        // Spool writers finish every submitted job: a file is either whole in new/ or only in
        // tmp/, never half-written in new/.
        if let Some(Handoff::Maildir(w)) = self.handoff.take() {
            w.shutdown();
        }
        drop(self.resolver.take());
        // The embedded store is saved as its thread stops.
        if let Some(state) = self.state.take() {
            state.shutdown();
        }
        info!("heloguard stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::event_loop::tests::{TestServer, connect};

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn a_stop_drains_then_flushes_then_stops() {
        let t0 = Instant::now();
        let mut life = Lifecycle::Running;
        assert!(life.is_accepting());
        assert!(!life.is_over(0), "running with no client is not over");
        assert_eq!(life.deadline(), None);

        assert_eq!(life.request_stop(t0, GRACE), StopStep::BeginDraining);
        assert_eq!(
            life,
            Lifecycle::Draining {
                grace_ends: t0 + GRACE
            }
        );
        assert!(!life.is_accepting());
        assert!(!life.is_over(1), "an open transaction has its grace");
        assert!(life.is_over(0), "nobody left: nothing to wait for");
        assert_eq!(life.advance(t0 + GRACE / 2), None);

        assert_eq!(life.advance(t0 + GRACE), Some(StopStep::EndGrace));
        let exit_at = t0 + GRACE + FINAL_FLUSH;
        assert_eq!(life, Lifecycle::Flushing { exit_at });
        assert_eq!(life.deadline(), Some(exit_at));
        assert!(!life.is_over(1));

        assert_eq!(life.advance(exit_at), Some(StopStep::ExitNow));
        assert_eq!(life, Lifecycle::Stopped);
        assert!(life.is_over(5), "stopped is over whoever is left");
        assert_eq!(life.advance(exit_at + GRACE), None);
    }

    #[test]
    fn a_second_stop_request_ends_at_once() {
        let t0 = Instant::now();
        let mut life = Lifecycle::Running;
        life.request_stop(t0, GRACE);
        assert_eq!(life.request_stop(t0, GRACE), StopStep::ExitNow);
        assert!(life.is_over(100));

        let mut life = Lifecycle::Flushing { exit_at: t0 };
        assert_eq!(life.request_stop(t0, GRACE), StopStep::ExitNow);
        assert_eq!(life, Lifecycle::Stopped);
    }

    #[test]
    fn a_zero_grace_ends_the_grace_at_the_next_step() {
        let t0 = Instant::now();
        let mut life = Lifecycle::Running;
        life.request_stop(t0, Duration::ZERO);
        assert_eq!(life.deadline(), Some(t0));
        assert_eq!(life.advance(t0), Some(StopStep::EndGrace));
    }

    /// Sends `line` and returns the one reply line it gets.
    fn command(server: &mut TestServer, client: &mut std::net::TcpStream, line: &str) -> String {
        use std::io::Write;
        client.write_all(line.as_bytes()).expect("write");
        server.read_reply(client)
    }

    #[test]
    fn a_message_being_written_when_the_grace_ends_gets_its_250_before_the_421() {
        use std::io::{Read, Write};
        let mut server = TestServer::start(&[
            ("HELOGUARD_SHUTDOWN_GRACE_SECS", "1"),
            ("HELOGUARD_DNS_TIMEOUT_MS", "100"),
        ]);
        // The writers' answers go to the test, which hands them on late: a slow fsync as the
        // loop sees it, the file in new/ before the answer.
        let (late_tx, late_rx) = crossbeam_channel::unbounded();
        let writers_rx = std::mem::replace(&mut server.server.spool_rx, late_rx);

        let mut client = connect(&mut server);
        assert!(server.read_reply(&mut client).starts_with("220 "));
        client.write_all(b"EHLO client.example\r\n").expect("write");
        loop {
            let line = server.read_reply(&mut client);
            assert!(line.starts_with("250"), "{line}");
            if line.starts_with("250 ") {
                break;
            }
        }
        for (line, code) in [
            ("MAIL FROM:<a@example.org>\r\n", "250 "),
            ("RCPT TO:<b@example.net>\r\n", "250 "),
            ("DATA\r\n", "354 "),
        ] {
            let reply = command(&mut server, &mut client, line);
            assert!(reply.starts_with(code), "{line}: {reply}");
        }
        client
            .write_all(b"Subject: late\r\n\r\nbody\r\n.\r\n")
            .expect("write");
        let deadline = Instant::now() + Duration::from_secs(20);
        let written = loop {
            assert!(Instant::now() < deadline, "the writer never answered");
            server.turn();
            if let Ok(done) = writers_rx.try_recv() {
                break done;
            }
        };
        let file = written.result.as_ref().expect("written").clone();
        assert!(server.spool.join("new").join(&file).exists(), "{file}");

        server.server.request_stop(Instant::now());
        // Past the grace and past the final flush: still waiting for the message's answer.
        let until = Instant::now() + Duration::from_millis(2500);
        client.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        while Instant::now() < until {
            server.turn();
            assert!(
                client.read(&mut byte).is_err(),
                "the client heard something before its message's answer"
            );
        }
        assert!(!server.server.lifecycle.is_over(server.server.conns.len()));
        client.set_nonblocking(false).expect("blocking");

        late_tx.send(written).expect("send");
        let reply = server.read_reply(&mut client);
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        let reply = server.read_reply(&mut client);
        assert!(reply.starts_with("421 4.3.2"), "{reply}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.server.lifecycle.is_over(server.server.conns.len()) {
            assert!(Instant::now() < deadline, "the session never closed");
            server.turn();
        }
    }

    #[test]
    fn a_second_stop_does_not_wait_for_the_spool() {
        let mut server = TestServer::start(&[("HELOGUARD_SHUTDOWN_GRACE_SECS", "1")]);
        let _client = connect(&mut server);
        let id = server.only_conn_id();
        if let Some(conn) = server.server.conns.get_mut(id.slot()) {
            conn.spooling = true;
        }
        server.server.request_stop(Instant::now());
        server.server.request_stop(Instant::now());
        assert!(server.server.lifecycle.is_over(server.server.conns.len()));
    }

    #[test]
    fn a_stop_tells_an_idle_session_421_and_stops_accepting() {
        let mut server = TestServer::start(&[]);
        let mut client = connect(&mut server);
        assert!(server.read_reply(&mut client).starts_with("220 "));
        server.server.request_stop(Instant::now());
        assert!(matches!(
            server.server.lifecycle,
            Lifecycle::Draining { .. }
        ));
        assert!(server.server.local_addrs().is_empty(), "listeners closed");
        let reply = server.read_reply(&mut client);
        assert!(reply.starts_with("421 4.3.2"), "{reply}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.server.lifecycle.is_over(server.server.conns.len()) {
            assert!(Instant::now() < deadline, "the session never closed");
            server.turn();
        }
    }
}
