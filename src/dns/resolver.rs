//! The resolver thread.
//!
//! The server core has no async runtime; DNS is the one place where concurrency over many
//! slow network round trips pays off, so a single std thread owns a tokio current_thread
//! runtime and a hickory `TokioResolver`. Requests arrive over a bounded tokio channel
//! (`try_send` never blocks the event loop; a full queue answers at once, as the resolver being
//! unavailable: SPEC "Memory"), every distinct lookup runs as its own task (bounded by
//! `max_in_flight`), and each answer goes back over crossbeam followed by a wake-up of the
//! event loop (`LoopWaker`).
//!
//! The thread keeps a book of who waits for what (`Book`): identical requests share one
//! lookup (as postscreen shares DNSBL lookups), a HELO name a connection no longer waits for
//! is dropped before it starts or stopped while it runs, and a lookup nobody waits for
//! anymore never holds a slot. Each answer says how many queries it took, for the per-session
//! HELOGUARD_DNS_BUDGET the event loop keeps.
//!
//! Every single query (A, AAAA, PTR) is bounded by the configured total timeout: hickory's
//! per-try timeout times its number of tries fits inside it, and a `tokio::time::timeout`
//! around each query guarantees it whatever hickory does internally. A Reverse request is PTR,
//! then the PTR names' addresses in the client's family, so it fits in the verdict deadline of
//! SPEC.md ("at most 2 x HELOGUARD_DNS_TIMEOUT_MS"). A HELO name's Forward request asks the
//! other family only after a decided first answer (see `forward`).
//!
//! hickory answers a few RFC 6761 special-use names itself, without asking the server: the PTR
//! of any 127.0.0.0/8 address and of ::1 is `localhost.` (which resolves to 127.0.0.1 / ::1),
//! and `*.invalid` is NXDOMAIN. There is no switch for this; it is also what a mail operator
//! expects.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinError, JoinSet};

use super::answer_cache::{AnswerCache, Keepable, Queries, until_both};
use super::lists::Lists;
pub use super::records::MAX_PTR_NAMES;
use super::records::{FromRecords, classify, fqdn, negative_ttl, outcome_of};
use super::reputation::{DnsblOutcome, RhsblOutcome, SpfOutcome, SpfResult};
use super::{
    DnsAnswer, DnsRequest, Family, Lookup, PtrName, QueryObserver, QueryOutcome, QueryType,
    RequestId, ReverseFacts, TempFailure,
};
use crate::wake::LoopWaker;

mod sender;
pub use sender::{SpfEvaluator, SpfQuery};

/// Entries in hickory's answer cache. HELO names and client PTRs repeat a lot across
/// connections from the same senders, so a modest cache saves most round trips.
const CACHE_SIZE: u64 = 4096;

/// Answers in the `AnswerCache` that other threads read before asking this one.
const KNOWN_ANSWERS: usize = 4096;

/// Requests waiting to be read by the thread, and lookups waiting for a free slot, at most
/// (each). Past it a request is answered as undecided at once: a flood of lookups must cost
/// a bounded amount of memory and must not push honest clients' lookups past their deadline.
pub const QUEUE_BOUND: usize = 4096;

/// How the resolver thread talks to DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverSettings {
    /// Nameservers, tried as hickory's pool does (in parallel pairs, fastest first).
    pub servers: Vec<SocketAddr>,
    /// Total time for one query, retries included.
    pub timeout: Duration,
    /// Requests (Forward or Reverse) resolved at once; the rest wait, in order.
    pub max_in_flight: usize,
    /// HELOGUARD_DNSBL, HELOGUARD_RHSBL and the zones' display names.
    pub lists: Arc<Lists>,
    /// HELOGUARD_SPF_TIMEOUT_MS: one whole SPF evaluation (RFC 7208 4.6.4).
    pub spf_timeout: Duration,
    /// What evaluates SPF; without one every SPF request is answered `temperror`.
    pub spf: Option<SpfEvaluator>,
}

impl ResolverSettings {
    /// Settings with the default concurrency bound.
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self {
            servers,
            timeout,
            max_in_flight: 256,
            lists: Arc::new(Lists::default()),
            spf_timeout: Duration::from_secs(20),
            spf: None,
        }
    }
}

/// The resolver could not be started.
#[derive(Debug)]
pub enum SpawnError {
    /// No nameserver configured.
    NoServers,
    /// A zero timeout would fail every lookup before it is sent.
    ZeroTimeout,
    /// hickory refused the configuration.
    Resolver(NetError),
    /// The runtime or the thread could not be created.
    Io(io::Error),
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoServers => f.write_str("no DNS server configured"),
            Self::ZeroTimeout => f.write_str("DNS timeout must be above zero"),
            Self::Resolver(e) => write!(f, "DNS resolver: {e}"),
            Self::Io(e) => write!(f, "DNS resolver thread: {e}"),
        }
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Resolver(e) => Some(e),
            Self::Io(e) => Some(e),
            Self::NoServers | Self::ZeroTimeout => None,
        }
    }
}

impl From<SpawnError> for io::Error {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::Io(e) => e,
            SpawnError::NoServers | SpawnError::ZeroTimeout => {
                io::Error::new(io::ErrorKind::InvalidInput, e)
            }
            SpawnError::Resolver(_) => io::Error::other(e),
        }
    }
}

/// The submitting side of the resolver thread. Clones share the thread; once every clone is
/// dropped the thread cancels what is still in flight and exits.
pub struct ResolverHandle {
    requests: mpsc::Sender<DnsRequest>,
    /// Where a request the thread cannot take is answered at once.
    answers: crossbeam_channel::Sender<DnsAnswer>,
    waker: Option<Arc<dyn LoopWaker>>,
    known: Arc<AnswerCache>,
    /// Only the handle returned by `spawn` owns the thread, so exactly one can join it.
    thread: Option<JoinHandle<()>>,
}

impl Clone for ResolverHandle {
    fn clone(&self) -> Self {
        Self {
            requests: self.requests.clone(),
            answers: self.answers.clone(),
            waker: self.waker.clone(),
            known: self.known.clone(),
            thread: None,
        }
    }
}

impl fmt::Debug for ResolverHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolverHandle")
            .field("owns_thread", &self.thread.is_some())
            .finish()
    }
}

impl ResolverHandle {
    /// Queues a request; never blocks. The answer arrives on the `answers` channel given to
    /// `spawn`. When the queue is full, or the thread is gone (it only stops when every
    /// handle is dropped, or if it panicked), the answer comes at once, undecided
    /// (`DnsRequest::unavailable`).
    pub fn submit(&self, req: DnsRequest) {
        let unsent = match self.requests.try_send(req) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(req)) => {
                log::debug!("DNS request queue full; answered {req:?} as undecided");
                req
            }
            Err(mpsc::error::TrySendError::Closed(req)) => {
                log::warn!("DNS resolver thread is gone; answered {req:?} as undecided");
                req
            }
        };
        if let Some(answer) = unsent.unavailable() {
            send_then_wake(&self.answers, self.waker.as_deref(), answer);
        }
    }

    /// The answers this thread has and may still use: look there before `submit`.
    pub fn known_answers(&self) -> &Arc<AnswerCache> {
        &self.known
    }

    /// Drops this handle and, if it is the one `spawn` returned, waits for the thread to exit
    /// (which happens once every clone has been dropped too). Returns false if the thread
    /// panicked.
    pub fn join(self) -> bool {
        let Self {
            requests,
            answers,
            thread,
            ..
        } = self;
        drop(answers);
        drop(requests);
        match thread {
            Some(t) => t.join().is_ok(),
            None => true,
        }
    }
}

/// Starts the resolver thread.
///
/// Each answer is sent on `answers`, then `waker` (if any) is woken; wake-ups coalesce, so the
/// receiver must drain the channel on every wake-up.
pub fn spawn(
    settings: ResolverSettings,
    answers: crossbeam_channel::Sender<DnsAnswer>,
    waker: Option<Arc<dyn LoopWaker>>,
    observer: QueryObserver,
) -> io::Result<ResolverHandle> {
    Ok(try_spawn(settings, answers, waker, observer)?)
}

/// `spawn` with the typed error.
pub fn try_spawn(
    settings: ResolverSettings,
    answers: crossbeam_channel::Sender<DnsAnswer>,
    waker: Option<Arc<dyn LoopWaker>>,
    observer: QueryObserver,
) -> Result<ResolverHandle, SpawnError> {
    // Built here, not in the thread, so a bad configuration is an error of the caller rather
    // than a thread that dies silently.
    let resolver = build_resolver(&settings)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SpawnError::Io)?;
    let (tx, rx) = mpsc::channel(QUEUE_BOUND);
    let known = Arc::new(AnswerCache::new(KNOWN_ANSWERS, observer.clone()));
    let ctx = Arc::new(Context {
        resolver,
        timeout: settings.timeout,
        answers: answers.clone(),
        waker: waker.clone(),
        observer,
        known: known.clone(),
        lists: settings.lists.clone(),
        spf_timeout: settings.spf_timeout,
        spf: settings.spf.clone(),
        list_outages: std::sync::Mutex::new(std::collections::HashSet::new()),
    });
    let max_in_flight = settings.max_in_flight.max(1);
    let thread = std::thread::Builder::new()
        .name("heloguard-dns".into())
        .spawn(move || runtime.block_on(serve(ctx, rx, max_in_flight)))
        .map_err(SpawnError::Io)?;
    Ok(ResolverHandle {
        requests: tx,
        answers,
        waker,
        known,
        thread: Some(thread),
    })
}

fn build_resolver(settings: &ResolverSettings) -> Result<TokioResolver, SpawnError> {
    if settings.servers.is_empty() {
        return Err(SpawnError::NoServers);
    }
    if settings.timeout.is_zero() {
        return Err(SpawnError::ZeroTimeout);
    }
    let name_servers = settings
        .servers
        .iter()
        .map(|server| {
            // The config structs are non-exhaustive: build through the constructors, then set
            // the port. TCP is there for truncated answers.
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            NameServerConfig::new(server.ip(), true, vec![udp, tcp])
        })
        .collect();
    // No domain and no search list: every name we ask is fully qualified anyway.
    let config = ResolverConfig::from_parts(None, vec![], name_servers);
    let (per_try, retries) = per_try_timeout(settings.timeout);
    let mut opts = ResolverOpts::default();
    opts.timeout = per_try;
    opts.attempts = retries;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.cache_size = CACHE_SIZE;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(SpawnError::Resolver)
}

/// Splits the total time of one query into hickory's per-try timeout and its number of
/// retries (hickory makes `retries + 1` tries). One retry rescues a lost UDP datagram; a
/// timeout too short to halve usefully gets a single try.
fn per_try_timeout(total: Duration) -> (Duration, usize) {
    if total >= Duration::from_millis(400) {
        (total / 2, 1)
    } else {
        (total, 0)
    }
}

/// What every lookup task needs; shared, read-only.
struct Context {
    resolver: TokioResolver,
    timeout: Duration,
    answers: crossbeam_channel::Sender<DnsAnswer>,
    waker: Option<Arc<dyn LoopWaker>>,
    observer: QueryObserver,
    known: Arc<AnswerCache>,
    lists: Arc<Lists>,
    spf_timeout: Duration,
    spf: Option<SpfEvaluator>,
    /// List zones (as shown) that did not answer last time: an outage is logged once when it
    /// starts and once when it ends, not per query.
    list_outages: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Context {
    fn deliver(&self, answer: DnsAnswer) {
        send_then_wake(&self.answers, self.waker.as_deref(), answer);
    }
}

/// Sends an answer, then wakes the loop: a woken loop must find it.
fn send_then_wake(
    answers: &crossbeam_channel::Sender<DnsAnswer>,
    waker: Option<&dyn LoopWaker>,
    answer: DnsAnswer,
) {
    if answers.send(answer).is_err() {
        // The receiver is gone: the server is shutting down.
        return;
    }
    if let Some(waker) = waker
        && let Err(e) = waker.wake()
    {
        log::warn!("DNS answer queued but the event loop could not be woken: {e}");
    }
}

/// One distinct lookup: requests for the same one share it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Work {
    Forward { name: String, family: Family },
    Reverse(IpAddr),
    Dnsbl(IpAddr),
    Rhsbl { name: String, ip: IpAddr },
    Spf { name: String, ip: IpAddr },
}

/// What a finished lookup found, and the queries it took.
enum Found {
    Forward(Lookup<Vec<IpAddr>>),
    Reverse(ReverseFacts),
    Dnsbl(DnsblOutcome),
    Rhsbl(RhsblOutcome),
    Spf(SpfOutcome),
}

impl Found {
    /// What a lookup that failed inside (a task that panicked) answers: undecided, or not
    /// listing for the lists.
    fn undecided(work: &Work) -> Found {
        match work {
            Work::Forward { .. } => Found::Forward(Lookup::TempError(TempFailure::Other)),
            Work::Reverse(_) => Found::Reverse(ReverseFacts {
                ptr: Lookup::TempError(TempFailure::Other),
            }),
            Work::Dnsbl(_) => Found::Dnsbl(DnsblOutcome::default()),
            Work::Rhsbl { .. } => Found::Rhsbl(RhsblOutcome::default()),
            Work::Spf { .. } => Found::Spf(SpfOutcome {
                result: SpfResult::TempError,
                why: "SPF evaluation failed".to_string(),
            }),
        }
    }
}

/// A lookup someone waits for.
struct Pending {
    /// The requesters, in the order they asked.
    waiters: Vec<RequestId>,
    /// Set once it runs: its task, to stop it when nobody waits any more.
    running: Option<AbortHandle>,
}

/// Who waits for what, on the resolver thread only (so no lock).
#[derive(Default)]
struct Book {
    pending: HashMap<Work, Pending>,
    /// Lookups waiting for a slot, oldest first. An entry whose lookup was dropped meanwhile
    /// is skipped when its turn comes.
    queue: VecDeque<Work>,
    /// The lookups each requester waits for (a Reverse and at most one Forward).
    asked: HashMap<RequestId, Vec<Work>>,
}

impl Book {
    /// Takes one request: joins a lookup in flight, replaces the requester's older Forward,
    /// or queues a new lookup (answering at once when the queue is full).
    fn take(&mut self, ctx: &Context, req: DnsRequest) {
        let (id, work) = match req {
            DnsRequest::Forget { id } => {
                for work in self.asked.remove(&id).unwrap_or_default() {
                    self.withdraw(id, &work);
                }
                return;
            }
            DnsRequest::Reverse { id, ip } => (id, Work::Reverse(ip)),
            DnsRequest::Dnsbl { id, ip } => (id, Work::Dnsbl(ip)),
            DnsRequest::Rhsbl { id, ref name, ip } => (
                id,
                Work::Rhsbl {
                    name: name.clone(),
                    ip,
                },
            ),
            DnsRequest::Spf { id, ip, ref name } => (
                id,
                Work::Spf {
                    name: name.clone(),
                    ip,
                },
            ),
            DnsRequest::Forward {
                id,
                ref name,
                family,
            } => (
                id,
                Work::Forward {
                    name: name.clone(),
                    family,
                },
            ),
        };
        let asked = self.asked.entry(id).or_default();
        if asked.contains(&work) {
            // Already waiting for exactly this.
            return;
        }
        if let Work::Forward { .. } = work
            && let Some(i) = asked.iter().position(|w| matches!(w, Work::Forward { .. }))
        {
            // SPEC "Memory": a superseded EHLO's pending work is dropped.
            let old = asked.swap_remove(i);
            self.withdraw(id, &old);
        }
        if let Some(pending) = self.pending.get_mut(&work) {
            pending.waiters.push(id);
            self.asked.entry(id).or_default().push(work);
            return;
        }
        if self.queue.len() >= QUEUE_BOUND {
            self.forget_if_idle(id);
            if let Some(answer) = req.unavailable() {
                ctx.deliver(answer);
            }
            return;
        }
        self.pending.insert(
            work.clone(),
            Pending {
                waiters: vec![id],
                running: None,
            },
        );
        self.queue.push_back(work.clone());
        self.asked.entry(id).or_default().push(work);
    }

    /// `id` no longer waits for `work`; a lookup nobody waits for is dropped, or stopped.
    fn withdraw(&mut self, id: RequestId, work: &Work) {
        let Some(pending) = self.pending.get_mut(work) else {
            return;
        };
        pending.waiters.retain(|w| *w != id);
        if !pending.waiters.is_empty() {
            return;
        }
        if let Some(task) = self.pending.remove(work).and_then(|p| p.running) {
            task.abort();
        }
    }

    fn forget_if_idle(&mut self, id: RequestId) {
        if self.asked.get(&id).is_some_and(Vec::is_empty) {
            self.asked.remove(&id);
        }
    }

    /// Starts queued lookups while fewer than `limit` run.
    fn start(&mut self, ctx: &Arc<Context>, tasks: &mut JoinSet<(Work, Found, u32)>, limit: usize) {
        while tasks.len() < limit {
            let Some(work) = self.queue.pop_front() else {
                return;
            };
            let Some(pending) = self.pending.get_mut(&work) else {
                continue;
            };
            if pending.running.is_some() {
                continue;
            }
            let ctx = ctx.clone();
            let task = work.clone();
            pending.running = Some(tasks.spawn(async move { resolve(&ctx, task).await }));
        }
    }

    /// A lookup task ended: its answer goes to everyone still waiting for it.
    fn finish(
        &mut self,
        ctx: &Context,
        joined: Result<(tokio::task::Id, (Work, Found, u32)), JoinError>,
    ) {
        let (task_id, work, found, queries) = match joined {
            Ok((task_id, (work, found, queries))) => (task_id, work, found, queries),
            // Stopped because nobody waited for it any more.
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                // A lookup task cannot panic short of a bug in hickory; its waiters get an
                // undecided answer rather than waiting for their deadline.
                log::error!("DNS lookup task failed: {e}");
                let failed = self
                    .pending
                    .iter()
                    .find(|(_, p)| p.running.as_ref().is_some_and(|t| t.id() == e.id()))
                    .map(|(work, _)| work.clone());
                if let Some(work) = failed {
                    let found = Found::undecided(&work);
                    self.answer(ctx, work, found, 0);
                }
                return;
            }
        };
        // Stopped too late to be cancelled, and asked for again since: the new lookup answers.
        let current = self
            .pending
            .get(&work)
            .and_then(|p| p.running.as_ref())
            .is_some_and(|t| t.id() == task_id);
        if current {
            self.answer(ctx, work, found, queries);
        }
    }

    fn answer(&mut self, ctx: &Context, work: Work, found: Found, queries: u32) {
        let Some(pending) = self.pending.remove(&work) else {
            return;
        };
        for id in pending.waiters {
            if let Some(asked) = self.asked.get_mut(&id) {
                asked.retain(|w| *w != work);
            }
            self.forget_if_idle(id);
            let answer = match (&work, &found) {
                (Work::Forward { name, .. }, Found::Forward(addrs)) => DnsAnswer::Forward {
                    id,
                    name: name.clone(),
                    addrs: addrs.clone(),
                    queries,
                },
                (Work::Reverse(ip), Found::Reverse(facts)) => DnsAnswer::Reverse {
                    id,
                    ip: *ip,
                    facts: facts.clone(),
                    queries,
                },
                (Work::Dnsbl(ip), Found::Dnsbl(outcome)) => DnsAnswer::Dnsbl {
                    id,
                    ip: *ip,
                    outcome: outcome.clone(),
                    queries,
                },
                (Work::Rhsbl { name, .. }, Found::Rhsbl(outcome)) => DnsAnswer::Rhsbl {
                    id,
                    name: name.clone(),
                    outcome: outcome.clone(),
                    queries,
                },
                (Work::Spf { name, .. }, Found::Spf(outcome)) => DnsAnswer::Spf {
                    id,
                    name: name.clone(),
                    outcome: outcome.clone(),
                    queries,
                },
                // `resolve` answers each kind of work in kind.
                _ => continue,
            };
            ctx.deliver(answer);
        }
    }
}

async fn serve(ctx: Arc<Context>, mut rx: mpsc::Receiver<DnsRequest>, limit: usize) {
    let mut book = Book::default();
    let mut tasks = JoinSet::new();
    loop {
        book.start(&ctx, &mut tasks, limit);
        tokio::select! {
            // Answers first: they free slots and memory.
            biased;
            Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                book.finish(&ctx, joined);
            }
            req = rx.recv() => match req {
                Some(req) => book.take(&ctx, req),
                // Every handle is gone: nobody waits for the rest. Dropping the set cancels
                // them.
                None => break,
            },
        }
    }
}

async fn resolve(ctx: &Arc<Context>, work: Work) -> (Work, Found, u32) {
    let (found, queries) = match &work {
        Work::Forward { name, family } => match fqdn(name) {
            Some(n) => {
                let (addrs, queries) = forward(ctx, n, *family).await;
                let count = queries.len();
                ctx.known.keep_forward(name, *family, &addrs, queries);
                (Found::Forward(addrs.value), count)
            }
            // parse_helo only lets through names that DNS can carry; anything else was
            // never asked, so it is undecided rather than nonexistent.
            None => (Found::Forward(Lookup::TempError(TempFailure::Other)), 0),
        },
        Work::Reverse(ip) => {
            let (facts, queries) = reverse(ctx, *ip).await;
            let count = queries.len();
            ctx.known.keep_reverse(*ip, &facts, queries);
            (Found::Reverse(facts.value), count)
        }
        Work::Dnsbl(ip) => {
            let (outcome, queries) = sender::dnsbl(ctx, *ip).await;
            let count = queries.len();
            ctx.known.keep_dnsbl(*ip, &outcome, queries);
            (Found::Dnsbl(outcome.value), count)
        }
        Work::Rhsbl { name, ip } => {
            let (outcome, queries) = sender::rhsbl(ctx, name, *ip).await;
            let count = queries.len();
            ctx.known.keep_rhsbl(name, *ip, &outcome, queries);
            (Found::Rhsbl(outcome.value), count)
        }
        Work::Spf { name, ip } => {
            let (outcome, count) = sender::spf(ctx, name, *ip).await;
            (Found::Spf(outcome), count)
        }
    };
    (work, found, u32::try_from(queries).unwrap_or(u32::MAX))
}

/// The addresses of a name for a client of `family`, and the queries behind the answer.
///
/// The checks ask whether the name's addresses include the client's (forward_match, FCrDNS),
/// whether it has any (forward), and whether they are all loopback (localhost). So the
/// client's own family is asked first, and the other one only when the first cannot settle
/// those: when the name has no record of it (NODATA), or only loopback addresses. A name with
/// an A record resolves, and its AAAA records cannot hold an IPv4 client. NXDOMAIN holds for
/// every type, and an undecided first answer stays undecided (RFC 8601: a temporary failure
/// on the way is temperror), so neither asks again. Besides halving the queries, this keeps a
/// name's lame AAAA servers from holding up the verdict on an IPv4 client.
async fn forward(
    ctx: &Context,
    name: Name,
    family: Family,
) -> (Keepable<Lookup<Vec<IpAddr>>>, Queries) {
    let (first, first_query) = family_lookup(ctx, family, name.clone()).await;
    if settles_checks(&first.value) {
        return (first, vec![first_query]);
    }
    let other = match family {
        Family::V4 => Family::V6,
        Family::V6 => Family::V4,
    };
    let (second, second_query) = family_lookup(ctx, other, name).await;
    let queries = vec![first_query, second_query];
    // Asked only to decide forward or localhost: if it is undecided, so are they (a
    // loopback-only A plus an unanswered AAAA is not "all loopback").
    if let Lookup::TempError(failure) = second.value {
        return (Keepable::fleeting(Lookup::TempError(failure)), queries);
    }
    let addrs = Keepable {
        until: until_both(first.until, second.until),
        value: merge_families(first.value, second.value),
    };
    (addrs, queries)
}

/// Whether the client's family's answer decides every check by itself (see `forward`).
fn settles_checks(answer: &Lookup<Vec<IpAddr>>) -> bool {
    match answer {
        Lookup::Found(addrs) => !addrs
            .iter()
            .all(|ip| crate::net::canonical_ip(*ip).is_loopback()),
        Lookup::NoData => false,
        Lookup::NxDomain | Lookup::TempError(_) => true,
    }
}

/// A (for `Family::V4`) or AAAA records of a name.
async fn family_lookup(
    ctx: &Context,
    family: Family,
    name: Name,
) -> (Keepable<Lookup<Vec<IpAddr>>>, (QueryType, QueryOutcome)) {
    match family {
        Family::V4 => query(ctx, QueryType::A, ctx.resolver.ipv4_lookup(name)).await,
        Family::V6 => query(ctx, QueryType::Aaaa, ctx.resolver.ipv6_lookup(name)).await,
    }
}

/// One address family's records and the other's combine into one answer: any address
/// wins; otherwise an undecided family means the whole is undecided (a missing A proves
/// nothing while AAAA timed out); NXDOMAIN only when both families say so.
fn merge_families(a: Lookup<Vec<IpAddr>>, aaaa: Lookup<Vec<IpAddr>>) -> Lookup<Vec<IpAddr>> {
    match (a, aaaa) {
        (Lookup::Found(mut v4), Lookup::Found(v6)) => {
            v4.extend(v6);
            Lookup::Found(v4)
        }
        (Lookup::Found(v), _) | (_, Lookup::Found(v)) => Lookup::Found(v),
        (Lookup::TempError(t), _) | (_, Lookup::TempError(t)) => Lookup::TempError(t),
        (Lookup::NxDomain, Lookup::NxDomain) => Lookup::NxDomain,
        _ => Lookup::NoData,
    }
}

/// PTR of the client, then the addresses of each PTR name in the client's family (at most
/// `MAX_PTR_NAMES`, concurrently): only those can confirm the client, so the other family is
/// never asked. With the queries behind the answer.
async fn reverse(ctx: &Arc<Context>, ip: IpAddr) -> (Keepable<ReverseFacts>, Queries) {
    // `::ffff:a.b.c.d` has its PTR under in-addr.arpa, like every other view of that client.
    let ip = crate::net::canonical_ip(ip);
    let family = Family::of(ip);
    let (ptr, ptr_outcome) = query(ctx, QueryType::Ptr, ctx.resolver.reverse_lookup(ip)).await;
    let mut queries = vec![ptr_outcome];
    let mut until = ptr.until;
    let without_names = |lookup| Keepable {
        value: ReverseFacts { ptr: lookup },
        until,
    };
    let names = match ptr.value {
        Lookup::Found(names) => names,
        Lookup::NxDomain => return (without_names(Lookup::NxDomain), queries),
        Lookup::NoData => return (without_names(Lookup::NoData), queries),
        Lookup::TempError(t) => return (without_names(Lookup::TempError(t)), queries),
    };
    // Spawned rather than joined in place so the confirmations run concurrently; the index
    // keeps the zone's order in the answer.
    let mut set = tokio::task::JoinSet::new();
    for (i, (shown, name)) in names.iter().enumerate() {
        let (ctx, shown, name) = (ctx.clone(), shown.clone(), name.clone());
        set.spawn(async move {
            let (addrs, query) = family_lookup(&ctx, family, name).await;
            // A client often says HELO with its PTR name: when this answer settles the HELO
            // checks too, it is that lookup as well.
            if settles_checks(&addrs.value) {
                ctx.known.keep_forward(&shown, family, &addrs, vec![query]);
            }
            (i, (addrs, query))
        });
    }
    let mut addrs: Vec<Lookup<Vec<IpAddr>>> =
        vec![Lookup::TempError(TempFailure::Other); names.len()];
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, (found, query))) => {
                addrs[i] = found.value;
                until = until_both(until, found.until);
                queries.push(query);
            }
            // A confirmation task cannot panic short of a bug in hickory; its name stays
            // undecided (and the answer is not kept) rather than taking the whole answer down.
            Err(e) => log::error!("PTR confirmation task failed: {e}"),
        }
    }
    let ptr = names
        .into_iter()
        .zip(addrs)
        .map(|((name, _), addrs)| PtrName { name, addrs })
        .collect();
    let facts = Keepable {
        value: ReverseFacts {
            ptr: Lookup::Found(ptr),
        },
        until,
    };
    (facts, queries)
}

/// Runs one query under the total timeout, classifies it and reports it to the observer.
/// Returns the answer with how long DNS lets it be kept (see `answer_cache`), and the query.
async fn query<T: FromRecords>(
    ctx: &Context,
    qtype: QueryType,
    lookup: impl Future<Output = Result<hickory_resolver::lookup::Lookup, NetError>>,
) -> (Keepable<Lookup<Vec<T>>>, (QueryType, QueryOutcome)) {
    let started = Instant::now();
    let result = match tokio::time::timeout(ctx.timeout, lookup).await {
        Ok(Ok(answer)) => {
            let mut out = Vec::new();
            for record in answer.answers() {
                T::extract(&record.data, &mut out);
            }
            // Only CNAMEs or other types in the answer: the name has no record of this type.
            let value = if out.is_empty() {
                Lookup::NoData
            } else {
                Lookup::Found(out)
            };
            Keepable {
                value,
                until: Some(answer.valid_until()),
            }
        }
        Ok(Err(e)) => Keepable {
            value: classify(&e),
            until: negative_ttl(&e).map(|ttl| started + Duration::from_secs(u64::from(ttl))),
        },
        Err(_elapsed) => Keepable::fleeting(Lookup::TempError(TempFailure::Timeout)),
    };
    let outcome = outcome_of(&result.value);
    (ctx.observer)(qtype, outcome, Some(started.elapsed()));
    (result, (qtype, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_fit_inside_the_total() {
        for ms in [1u64, 50, 399, 400, 2000, 5001] {
            let total = Duration::from_millis(ms);
            let (per_try, retries) = per_try_timeout(total);
            assert!(per_try * (retries as u32 + 1) <= total, "{ms} ms");
            assert!(!per_try.is_zero());
        }
    }

    #[test]
    fn names_become_absolute() {
        assert_eq!(
            fqdn("Mail.Example.TEST").map(|n| n.to_ascii()),
            Some("Mail.Example.TEST.".into())
        );
        assert_eq!(
            fqdn("mail.example.test.").map(|n| n.to_ascii()),
            Some("mail.example.test.".into())
        );
        assert_eq!(fqdn("single").map(|n| n.to_ascii()), Some("single.".into()));
        assert_eq!(fqdn(""), None);
        assert_eq!(fqdn("."), None);
        assert_eq!(fqdn(&"a".repeat(64)), None);
    }

    #[test]
    fn families_merge() {
        let v4: IpAddr = "192.0.2.1".parse().expect("literal");
        let v6: IpAddr = "2001:db8::1".parse().expect("literal");
        let t = Lookup::TempError(TempFailure::Timeout);
        assert_eq!(
            merge_families(Lookup::Found(vec![v4]), Lookup::Found(vec![v6])),
            Lookup::Found(vec![v4, v6])
        );
        assert_eq!(
            merge_families(Lookup::NoData, Lookup::Found(vec![v6])),
            Lookup::Found(vec![v6])
        );
        assert_eq!(
            merge_families(t.clone(), Lookup::Found(vec![v6])),
            Lookup::Found(vec![v6])
        );
        assert_eq!(merge_families(Lookup::NxDomain, t.clone()), t);
        assert_eq!(merge_families(Lookup::NoData, t.clone()), t);
        assert_eq!(
            merge_families(Lookup::NxDomain, Lookup::NxDomain),
            Lookup::NxDomain
        );
        assert_eq!(
            merge_families(Lookup::NxDomain, Lookup::NoData),
            Lookup::NoData
        );
        assert_eq!(
            merge_families(Lookup::NoData, Lookup::NoData),
            Lookup::NoData
        );
    }
}
