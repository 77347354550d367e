//! Building the server: listeners, the worker pool, the resolver thread, the hand-off (spool
//! writers or the next hop), TLS, signals; and building each session.
//!
//! Everything that can fail at startup fails here, as a [`StartError`] that names the
//! variable at fault, before the first connection is accepted.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::{Interest, Poll, Token, Waker};
use rustls::ClientConfig;
use slab::Slab;

use crate::config::{Config, DeliverTarget};
use crate::dns::resolver;
use crate::message::content::SpillStore;
use crate::metrics::Metrics;
use crate::relay::NextHopProtocol;
use crate::server::conn::READ_CHUNK;
use crate::server::event_loop::admission::Admission;
use crate::server::event_loop::next_hop::NextHop;
use crate::server::event_loop::shutdown::Lifecycle;
use crate::server::event_loop::timers::Timers;
use crate::server::event_loop::{
    FIRST_LISTENER, Handoff, SIGNALS, Server, ServerOptions, StartError, WAKER,
};
use crate::server::listener::{BoundListener, ListenerKind};
use crate::server::loop_wake::LoopWake;
use crate::server::relay_link::opportunistic_tls_config;
use crate::server::tls::TlsAcceptor;
use crate::server::worker::WorkerPool;
use crate::session::{Session, SessionParams, SessionSettings};
use crate::spool::maildir::Maildir;
use crate::spool::writer;

/// The TLS configuration for STARTTLS toward the next hop.
fn next_hop_tls() -> Result<Arc<ClientConfig>, StartError> {
    opportunistic_tls_config().map_err(|e| StartError::Tls(format!("next hop TLS: {e}")))
}

impl Server {
    /// Starts the threads (workers, resolver, spool writers) and registers the listeners.
    pub fn new(
        config: Arc<Config>,
        bound: Vec<BoundListener>,
        metrics: Arc<Metrics>,
        options: ServerOptions,
    ) -> Result<Self, StartError> {
        let poll = Poll::new().map_err(|e| StartError::Io("poll", e))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| StartError::Io("waker", e))?;
        let wake = Arc::new(LoopWake::new(Arc::new(waker)));
        let tls = tls_acceptor(&config)?;

        let mut listeners = Vec::with_capacity(bound.len());
        for (i, b) in bound.into_iter().enumerate() {
            // Replies go out as soon as they are written (no Nagle wait behind an unacked
            // one). Linux hands TCP_NODELAY from the listener to every socket it accepts, so
            // this one call saves a setsockopt per connection; it also covers sockets a
            // service manager passed without NoDelay=.
            socket2::SockRef::from(&b.listener)
                .set_tcp_nodelay(true)
                .map_err(|e| StartError::Io("listener TCP_NODELAY", e))?;
            let mut l = TcpListener::from_std(b.listener);
            poll.registry()
                .register(&mut l, Token(FIRST_LISTENER + i), Interest::READABLE)
                .map_err(|e| StartError::Io("listener", e))?;
            listeners.push((l, b.kind));
        }

        let (dns_tx, dns_rx) = crossbeam_channel::unbounded();
        let observer_metrics = metrics.clone();
        let resolver = resolver::spawn(
            crate::reputation::resolver_settings(&config, 4096),
            dns_tx,
            Some(wake.clone()),
            Arc::new(move |qtype, outcome, took| observer_metrics.dns_query(qtype, outcome, took)),
        )
        .map_err(|e| StartError::Io("HELOGUARD_DNS", e))?;

        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let workers = WorkerPool::start(
            config.workers,
            done_tx,
            wake.clone(),
            metrics.clone(),
            resolver.known_answers().clone(),
        )
        .map_err(|e| StartError::Io("HELOGUARD_WORKERS", e))?;

        let (spool_tx, spool_rx) = crossbeam_channel::unbounded();
        // Maildir mode: content past a session's small memory part goes to the spool's tmp/.
        let mut spill = None;
        let handoff = match &config.deliver {
            DeliverTarget::Maildir => {
                let maildir = Arc::new(
                    Maildir::open(&config.spool, &config.hostname)
                        .map_err(|e| StartError::Spool(e.to_string()))?
                        .with_metrics(metrics.clone())
                        .with_min_free_mb(config.min_free_mb),
                );
                spill = Some(maildir.clone() as Arc<dyn SpillStore>);
                let writers = writer::spawn_writers(
                    maildir,
                    config.spool_writers,
                    spool_tx,
                    Some(wake.clone()),
                )
                .map_err(|e| StartError::Io("HELOGUARD_SPOOL_WRITERS", e))?;
                Handoff::Maildir(writers)
            }
            DeliverTarget::Smtp { host, port } => Handoff::Relay {
                next_hop: NextHop::resolve(host, *port, NextHopProtocol::Smtp)?,
                tls: next_hop_tls()?,
            },
            DeliverTarget::Lmtp { host, port } => Handoff::Relay {
                next_hop: NextHop::resolve(host, *port, NextHopProtocol::Lmtp)?,
                tls: next_hop_tls()?,
            },
            DeliverTarget::LmtpUnix { path } => Handoff::Relay {
                next_hop: NextHop::Unix { path: path.clone() },
                tls: next_hop_tls()?,
            },
        };

        let (state, state_rx) = state_thread(&config, &wake, &metrics)?;

        let signals = if options.handle_signals {
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
            let mut s = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP])
                .map_err(|e| StartError::Io("signals", e))?;
            poll.registry()
                .register(&mut s, SIGNALS, Interest::READABLE)
                .map_err(|e| StartError::Io("signals", e))?;
            Some(s)
        } else {
            None
        };

        // Session ids (the log's `sid=`, the prefix of queue IDs) must not repeat across runs:
        // two processes started in the same second differ by their pid.
        let run_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 16);

        let session_settings = Arc::new(SessionSettings::from(config.as_ref()));
        let mut server = Self {
            poll,
            admission: Admission::new(config.max_connections, config.max_connections_per_ip),
            config,
            listeners,
            conns: Slab::with_capacity(1024),
            generation: 0,
            sessions_started: 0,
            run_id,
            timers: Timers::default(),
            lifecycle: Lifecycle::Running,
            wake,
            workers: Some(workers),
            done_rx,
            resolver: Some(resolver),
            dns_rx,
            handoff: Some(handoff),
            spool_rx,
            state,
            state_rx,
            tls,
            metrics,
            signals,
            spool_space_low: false,
            session_settings,
            spill,
            relays: Slab::new(),
            relay_check_armed: false,
            xclient_warned: false,
            read_buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
            pumping: None,
            spare_outputs: Vec::new(),
        };
        server.check_spool_space(Instant::now());
        Ok(server)
    }

    /// The bound addresses, in configuration order (plain first, then PROXY).
    pub fn local_addrs(&self) -> Vec<(SocketAddr, ListenerKind)> {
        self.listeners
            .iter()
            .filter_map(|(l, k)| l.local_addr().ok().map(|a| (a, *k)))
            .collect()
    }

    /// A new session for a client whose IP is known, with an id unique in this run.
    pub(super) fn new_session(&mut self, client_ip: IpAddr) -> Box<Session> {
        self.sessions_started += 1;
        let session_id = (self.run_id << 24) ^ self.sessions_started;
        build_session(
            self.session_settings.clone(),
            client_ip,
            session_id,
            self.tls.is_some(),
            self.spill.clone(),
        )
    }
}

/// The one place a session is built, for the server and for tests alike.
pub(crate) fn build_session(
    settings: Arc<SessionSettings>,
    client_ip: IpAddr,
    session_id: u64,
    tls_available: bool,
    spill: Option<Arc<dyn SpillStore>>,
) -> Box<Session> {
    Box::new(Session::new(SessionParams {
        settings,
        client_ip,
        session_id,
        tls_available,
        spill,
    }))
}

/// The state thread when a check asks the store (a greylist action, helo_churn on); without
/// one the loop answers such questions unavailable at once.
fn state_thread(
    config: &Config,
    wake: &Arc<LoopWake>,
    metrics: &Arc<Metrics>,
) -> Result<
    (
        Option<crate::state::StateHandle>,
        crossbeam_channel::Receiver<crate::state::StateAnswer>,
    ),
    StartError,
> {
    let (tx, rx) = crossbeam_channel::unbounded();
    if !config.needs_state_store() {
        return Ok((None, rx));
    }
    let handle = crate::state::spawn(&config.state, tx, wake.clone(), metrics.clone())
        .map_err(|e| StartError::Io("HELOGUARD_STATE", e))?;
    Ok((Some(handle), rx))
}

/// The TLS acceptor when HELOGUARD_TLS_CERT and HELOGUARD_TLS_KEY are both set.
fn tls_acceptor(config: &Config) -> Result<Option<Arc<TlsAcceptor>>, StartError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let acceptor = TlsAcceptor::new(cert, key).map_err(|e| {
        // A startup error names the variable at fault.
        let variable = match e.path() {
            Some(path) if path == key.as_path() => "HELOGUARD_TLS_KEY",
            _ => "HELOGUARD_TLS_CERT",
        };
        StartError::Tls(format!("{variable}: {e}"))
    })?;
    Ok(Some(Arc::new(acceptor)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A configuration for tests: nothing is looked up or written unless `extra` says so.
    pub(crate) fn test_config(extra: &[(&str, &str)]) -> Config {
        let (config, _) = Config::from_lookup(|name| {
            if let Some((_, value)) = extra.iter().find(|(k, _)| *k == name) {
                return Some(value.to_string());
            }
            match name {
                "HELOGUARD_DNS" => Some("127.0.0.1:9".into()),
                "HELOGUARD_HOSTNAME" => Some("mx.test".into()),
                "HELOGUARD_WORKERS" => Some("1".into()),
                "HELOGUARD_SPOOL_WRITERS" => Some("1".into()),
                "HELOGUARD_MIN_FREE_MB" => Some("0".into()),
                _ => None,
            }
        })
        .expect("test configuration");
        config
    }

    pub(crate) fn test_session() -> Box<Session> {
        build_session(
            Arc::new(SessionSettings::from(&test_config(&[]))),
            "192.0.2.1".parse().expect("address"),
            1,
            false,
            None,
        )
    }
}
