//! Answers the resolver thread already has, readable from any thread.
//!
//! Most connections come from senders seen a moment ago: the same client address, the same
//! HELO name. Asking the resolver thread for those costs two thread wake-ups and a trip through
//! its runtime for an answer that is already known. The resolver thread stores every answer
//! it may keep here; the event loop (the client's PTR at accept) and the workers (a HELO name's
//! A/AAAA) look here first and hand a session a known answer at once.
//!
//! An answer is kept for as long as DNS allows: a positive answer until the first of its
//! records expires, a negative one (NXDOMAIN, NODATA) for the negative TTL of the SOA that came
//! with it (RFC 2308), and never longer than `MAX_KEEP`. A negative answer without an SOA and a
//! temporary failure are not kept. Each entry remembers the queries that produced it, and a
//! hit reports them again to the query observer, so heloguard_dns_queries_total counts lookups
//! the same way whether or not they were answered here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::PoisonError;
use std::time::Duration;
use std::time::Instant;

use super::reputation::{DnsblOutcome, RhsblOutcome};
use super::{Family, Lookup, QueryObserver, QueryOutcome, QueryType, ReverseFacts};

/// Longest time an answer is kept, whatever its TTL: a changed zone is seen within this time.
pub(crate) const MAX_KEEP: Duration = Duration::from_secs(3600);

/// The queries behind one answer, reported again on every hit.
pub(crate) type Queries = Vec<(QueryType, QueryOutcome)>;

/// An answer with the time until which it may be used, or `None` when it must not be kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keepable<T> {
    pub value: T,
    pub until: Option<Instant>,
}

impl<T> Keepable<T> {
    /// An answer that must not be kept.
    pub fn fleeting(value: T) -> Self {
        Keepable { value, until: None }
    }
}

/// Combines two answers' lifetimes: kept only while both may be.
pub(crate) fn until_both(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    Some(a?.min(b?))
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Reverse(IpAddr),
    /// Lower case, without the trailing dot; and the family of the client it was asked for
    /// (an answer for an IPv4 client may hold only the A records).
    Forward(String, Family),
    /// The client's score over HELOGUARD_DNSBL.
    Dnsbl(IpAddr),
    /// HELOGUARD_RHSBL over a HELO name (its key) and the client's confirmed PTR name.
    Rhsbl(String, IpAddr),
}

#[derive(Clone, Debug)]
enum Answer {
    Reverse(ReverseFacts),
    Forward(Lookup<Vec<IpAddr>>),
    Dnsbl(DnsblOutcome),
    Rhsbl(RhsblOutcome),
}

struct Entry {
    answer: Answer,
    until: Instant,
    queries: Queries,
}

/// A bounded map from question to answer, shared by the resolver thread (which fills it) and
/// the threads that would otherwise ask it.
pub struct AnswerCache {
    entries: Mutex<Table>,
    capacity: usize,
    observer: QueryObserver,
}

/// The answers, and when expired ones were last swept out.
#[derive(Default)]
struct Table {
    map: HashMap<Key, Entry>,
    swept_at: Option<Instant>,
}

/// A full cache sweeps out expired answers at most this often: a sweep walks every entry, and
/// a busy server meeting new names all the time would otherwise walk them on every insert.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("entries", &self.lock().map.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl AnswerCache {
    /// A cache of at most `capacity` answers (at least one) that reports hits to `observer`.
    pub fn new(capacity: usize, observer: QueryObserver) -> Self {
        AnswerCache {
            entries: Mutex::new(Table::default()),
            capacity: capacity.max(1),
            observer,
        }
    }

    /// The client's PTR names and their confirmations, if known and still valid at `now`.
    pub fn reverse(&self, ip: IpAddr, now: Instant) -> Option<ReverseFacts> {
        match self.get(&Key::Reverse(crate::net::canonical_ip(ip)), now)? {
            Answer::Reverse(facts) => Some(facts),
            _ => None,
        }
    }

    /// As `reverse`, without reporting its queries again: for a lookup that builds on the
    /// client's PTR name, whose queries the session's own Reverse answer already counted.
    pub fn peek_reverse(&self, ip: IpAddr, now: Instant) -> Option<ReverseFacts> {
        let key = Key::Reverse(crate::net::canonical_ip(ip));
        let table = self.lock();
        let entry = table.map.get(&key).filter(|e| e.until > now)?;
        match &entry.answer {
            Answer::Reverse(facts) => Some(facts.clone()),
            _ => None,
        }
    }

    /// The client's score over the lists, if known and still valid at `now`.
    pub fn dnsbl(&self, ip: IpAddr, now: Instant) -> Option<DnsblOutcome> {
        match self.get(&Key::Dnsbl(crate::net::canonical_ip(ip)), now)? {
            Answer::Dnsbl(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// The domain lists' hits for the HELO name `key` and the client `ip`, if known.
    pub fn rhsbl(&self, key: &str, ip: IpAddr, now: Instant) -> Option<RhsblOutcome> {
        let key = Key::Rhsbl(key.to_ascii_lowercase(), crate::net::canonical_ip(ip));
        match self.get(&key, now)? {
            Answer::Rhsbl(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Keeps the client's score (only when every zone answered: see `Keepable`).
    pub fn keep_dnsbl(&self, ip: IpAddr, outcome: &Keepable<DnsblOutcome>, queries: Queries) {
        let key = Key::Dnsbl(crate::net::canonical_ip(ip));
        let answer = Answer::Dnsbl(outcome.value.clone());
        self.keep(key, answer, outcome.until, queries);
    }

    pub fn keep_rhsbl(
        &self,
        name: &str,
        ip: IpAddr,
        outcome: &Keepable<RhsblOutcome>,
        queries: Queries,
    ) {
        let key = Key::Rhsbl(name.to_ascii_lowercase(), crate::net::canonical_ip(ip));
        let answer = Answer::Rhsbl(outcome.value.clone());
        self.keep(key, answer, outcome.until, queries);
    }

    /// The addresses of `name` as asked for a client of `family`, if known and still valid
    /// at `now`.
    pub fn forward(&self, name: &str, family: Family, now: Instant) -> Option<Lookup<Vec<IpAddr>>> {
        match self.get(&forward_key(name, family), now)? {
            Answer::Forward(addrs) => Some(addrs),
            _ => None,
        }
    }

    /// Keeps the reverse answer for `ip` (if it may be kept).
    pub fn keep_reverse(&self, ip: IpAddr, facts: &Keepable<ReverseFacts>, queries: Queries) {
        let key = Key::Reverse(crate::net::canonical_ip(ip));
        self.keep(
            key,
            Answer::Reverse(facts.value.clone()),
            facts.until,
            queries,
        );
    }

    /// Keeps the forward answer for `name`, asked for a client of `family` (if it may be kept).
    pub fn keep_forward(
        &self,
        name: &str,
        family: Family,
        addrs: &Keepable<Lookup<Vec<IpAddr>>>,
        queries: Queries,
    ) {
        self.keep(
            forward_key(name, family),
            Answer::Forward(addrs.value.clone()),
            addrs.until,
            queries,
        );
    }

    fn get(&self, key: &Key, now: Instant) -> Option<Answer> {
        let mut table = self.lock();
        let entry = table.map.get(key)?;
        if entry.until <= now {
            table.map.remove(key);
            return None;
        }
        let answer = entry.answer.clone();
        let queries = entry.queries.clone();
        drop(table);
        for (qtype, outcome) in queries {
            (self.observer)(qtype, outcome, None);
        }
        Some(answer)
    }

    fn keep(&self, key: Key, answer: Answer, until: Option<Instant>, queries: Queries) {
        let now = Instant::now();
        let Some(until) = until.map(|u| u.min(now + MAX_KEEP)) else {
            return;
        };
        if until <= now || is_temporary(&answer) {
            return;
        }
        let mut table = self.lock();
        if table.map.len() >= self.capacity && !table.map.contains_key(&key) {
            if table.swept_at.is_none_or(|at| now >= at + SWEEP_EVERY) {
                table.map.retain(|_, e| e.until > now);
                table.swept_at = Some(now);
            }
            // Still full of live answers: make room by dropping one; which one matters little
            // next to the round trip it costs.
            if table.map.len() >= self.capacity
                && let Some(victim) = table.map.keys().next().cloned()
            {
                table.map.remove(&victim);
            }
        }
        table.map.insert(
            key,
            Entry {
                answer,
                until,
                queries,
            },
        );
    }

    /// Entries are replaced whole under the lock, never left half-written, so a poisoned lock
    /// still holds good answers.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Names are case-insensitive and the trailing dot is optional.
fn forward_key(name: &str, family: Family) -> Key {
    let bare = name.strip_suffix('.').unwrap_or(name);
    Key::Forward(bare.to_ascii_lowercase(), family)
}

/// An undecided answer must be asked again next time (the resolver never marks one keepable;
/// this is the cache's own guard).
fn is_temporary(answer: &Answer) -> bool {
    match answer {
        Answer::Forward(addrs) => matches!(addrs, Lookup::TempError(_)),
        Answer::Reverse(facts) => match &facts.ptr {
            Lookup::TempError(_) => true,
            Lookup::Found(names) => names
                .iter()
                .any(|n| matches!(n.addrs, Lookup::TempError(_))),
            _ => false,
        },
        // A zone that did not answer makes the whole answer fleeting before it gets here.
        Answer::Dnsbl(_) | Answer::Rhsbl(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{PtrName, TempFailure};
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    fn counting() -> (AnswerCache, Arc<Mutex<Queries>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let observer: QueryObserver = Arc::new(move |q, o, _| {
            sink.lock().expect("sink").push((q, o));
        });
        (AnswerCache::new(4, observer), seen)
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn found(ip: IpAddr) -> Lookup<Vec<IpAddr>> {
        Lookup::Found(vec![ip])
    }

    fn keep_for(secs: u64) -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(secs))
    }

    #[test]
    fn a_forward_answer_is_found_under_any_case_and_with_or_without_the_dot() {
        let (cache, seen) = counting();
        let addrs = Keepable {
            value: found(v4(1)),
            until: keep_for(60),
        };
        let queries = vec![
            (QueryType::A, QueryOutcome::Ok),
            (QueryType::Aaaa, QueryOutcome::NoData),
        ];
        cache.keep_forward("Mail.Example.ORG.", Family::V4, &addrs, queries.clone());
        let now = Instant::now();
        assert_eq!(
            cache.forward("mail.example.org", Family::V4, now),
            Some(found(v4(1)))
        );
        assert_eq!(
            cache.forward("MAIL.example.org.", Family::V4, now),
            Some(found(v4(1)))
        );
        assert_eq!(cache.forward("other.example.org", Family::V4, now), None);
        // Each hit reports the queries behind the answer.
        assert_eq!(
            *seen.lock().expect("seen"),
            [queries.clone(), queries].concat()
        );
    }

    #[test]
    fn an_answer_asked_for_one_family_does_not_serve_the_other() {
        let (cache, _) = counting();
        let only_a = Keepable {
            value: found(v4(1)),
            until: keep_for(60),
        };
        cache.keep_forward("dual.example", Family::V4, &only_a, Vec::new());
        let now = Instant::now();
        assert_eq!(
            cache.forward("dual.example", Family::V4, now),
            Some(found(v4(1)))
        );
        assert_eq!(cache.forward("dual.example", Family::V6, now), None);
    }

    #[test]
    fn an_answer_is_gone_once_it_expires() {
        let (cache, _) = counting();
        let addrs = Keepable {
            value: found(v4(1)),
            until: keep_for(30),
        };
        cache.keep_forward("a.example", Family::V4, &addrs, Vec::new());
        let later = Instant::now() + Duration::from_secs(31);
        assert_eq!(cache.forward("a.example", Family::V4, later), None);
        assert_eq!(
            cache.forward("a.example", Family::V4, Instant::now()),
            None,
            "removed"
        );
    }

    #[test]
    fn fleeting_expired_and_temporary_answers_are_not_kept() {
        let (cache, _) = counting();
        let now = Instant::now();
        cache.keep_forward(
            "a.example",
            Family::V4,
            &Keepable::fleeting(found(v4(1))),
            Vec::new(),
        );
        let past = Keepable {
            value: found(v4(1)),
            until: Some(now),
        };
        cache.keep_forward("b.example", Family::V4, &past, Vec::new());
        let undecided = Keepable {
            value: Lookup::TempError(TempFailure::Timeout),
            until: keep_for(60),
        };
        cache.keep_forward("c.example", Family::V4, &undecided, Vec::new());
        let half_confirmed = Keepable {
            value: ReverseFacts {
                ptr: Lookup::Found(vec![PtrName {
                    name: "host.example".into(),
                    addrs: Lookup::TempError(TempFailure::ServFail),
                }]),
            },
            until: keep_for(60),
        };
        cache.keep_reverse(v4(9), &half_confirmed, Vec::new());
        for name in ["a.example", "b.example", "c.example"] {
            assert_eq!(
                cache.forward(name, Family::V4, Instant::now()),
                None,
                "{name}"
            );
        }
        assert_eq!(cache.reverse(v4(9), Instant::now()), None);
    }

    #[test]
    fn negative_answers_are_kept_like_positive_ones() {
        let (cache, _) = counting();
        let nx = Keepable {
            value: Lookup::NxDomain,
            until: keep_for(60),
        };
        cache.keep_forward("gone.example", Family::V4, &nx, Vec::new());
        assert_eq!(
            cache.forward("gone.example", Family::V4, Instant::now()),
            Some(Lookup::NxDomain)
        );
        let no_ptr = Keepable {
            value: ReverseFacts {
                ptr: Lookup::NxDomain,
            },
            until: keep_for(60),
        };
        cache.keep_reverse(v4(7), &no_ptr, Vec::new());
        assert_eq!(cache.reverse(v4(7), Instant::now()), Some(no_ptr.value));
    }

    #[test]
    fn a_mapped_v6_client_shares_the_entry_of_its_v4_address() {
        let (cache, _) = counting();
        let facts = Keepable {
            value: ReverseFacts {
                ptr: Lookup::Found(vec![PtrName {
                    name: "host.example".into(),
                    addrs: found(v4(5)),
                }]),
            },
            until: keep_for(60),
        };
        cache.keep_reverse(v4(5), &facts, Vec::new());
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 5).to_ipv6_mapped());
        assert_eq!(cache.reverse(mapped, Instant::now()), Some(facts.value));
    }

    #[test]
    fn a_full_cache_drops_expired_answers_first_and_never_grows_past_its_capacity() {
        let (cache, _) = counting();
        for i in 0..3 {
            let long = Keepable {
                value: found(v4(i)),
                until: keep_for(60),
            };
            cache.keep_forward(&format!("long{i}.example"), Family::V4, &long, Vec::new());
        }
        // Kept last, so dropping the oldest entry would not drop it: only its expiry does.
        let short = Keepable {
            value: found(v4(1)),
            until: Some(Instant::now() + Duration::from_millis(20)),
        };
        cache.keep_forward("short.example", Family::V4, &short, Vec::new());
        std::thread::sleep(Duration::from_millis(30));
        let fresh = Keepable {
            value: found(v4(4)),
            until: keep_for(60),
        };
        cache.keep_forward("fresh.example", Family::V4, &fresh, Vec::new());
        let now = Instant::now();
        for i in 0..3 {
            assert!(
                cache
                    .forward(&format!("long{i}.example"), Family::V4, now)
                    .is_some()
            );
        }
        assert!(cache.forward("fresh.example", Family::V4, now).is_some());
        assert!(
            !cache
                .lock()
                .map
                .contains_key(&forward_key("short.example", Family::V4))
        );
        cache.keep_forward("more.example", Family::V4, &fresh, Vec::new());
        assert_eq!(cache.lock().map.len(), 4);
        assert!(
            cache
                .forward("more.example", Family::V4, Instant::now())
                .is_some()
        );
    }

    #[test]
    fn lifetimes_combine_to_the_earlier_and_a_fleeting_part_makes_the_whole_fleeting() {
        let soon = keep_for(10);
        let later = keep_for(100);
        assert_eq!(until_both(soon, later), soon);
        assert_eq!(until_both(later, None), None);
    }
}
