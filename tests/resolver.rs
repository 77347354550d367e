//! The resolver thread against the in-process test DNS server.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone};
use crossbeam_channel::Receiver;
use heloguard::dns::resolver::{self, ResolverHandle, ResolverSettings};
use heloguard::dns::{
    DnsAnswer, DnsRequest, Family, Lookup, PtrName, QueryObserver, QueryOutcome, QueryType,
    ReverseFacts, TempFailure, no_observer,
};
use hickory_proto::rr::RecordType;

/// Generous bound for answers that should come at once: the machine is shared.
const PROMPT: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal in test")
}

type Seen = Arc<Mutex<Vec<(QueryType, QueryOutcome, Option<Duration>)>>>;

struct Harness {
    handle: ResolverHandle,
    answers: Receiver<DnsAnswer>,
    seen: Seen,
    next_id: u64,
}

impl Harness {
    fn new(servers: Vec<SocketAddr>, timeout: Duration, max_in_flight: usize) -> Harness {
        let (tx, rx) = crossbeam_channel::unbounded();
        let seen: Seen = Arc::default();
        let sink = seen.clone();
        let observer: QueryObserver = Arc::new(move |t, o, d| {
            sink.lock().expect("observer lock").push((t, o, d));
        });
        let settings = ResolverSettings {
            max_in_flight,
            ..ResolverSettings::new(servers, timeout)
        };
        let handle = resolver::spawn(settings, tx, None, observer).expect("spawn resolver");
        Harness {
            handle,
            answers: rx,
            seen,
            next_id: 1,
        }
    }

    fn on(dns: &TestDns) -> Harness {
        Harness::new(vec![dns.addr()], Duration::from_millis(600), 64)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The addresses of `name` for an IPv4 client.
    fn forward(&mut self, name: &str) -> Lookup<Vec<IpAddr>> {
        self.forward_for(name, Family::V4)
    }

    fn forward_for(&mut self, name: &str, family: Family) -> Lookup<Vec<IpAddr>> {
        let id = self.id();
        self.handle.submit(DnsRequest::Forward {
            id,
            name: name.to_string(),
            family,
        });
        match self.answers.recv_timeout(PROMPT).expect("forward answer") {
            DnsAnswer::Forward {
                id: got,
                name: n,
                addrs,
                ..
            } => {
                assert_eq!((got, n.as_str()), (id, name));
                addrs
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn reverse(&mut self, addr: IpAddr) -> ReverseFacts {
        let id = self.id();
        self.handle.submit(DnsRequest::Reverse { id, ip: addr });
        match self.answers.recv_timeout(PROMPT).expect("reverse answer") {
            DnsAnswer::Reverse {
                id: got, ip, facts, ..
            } => {
                assert_eq!((got, ip), (id, addr));
                facts
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn outcomes(&self) -> Vec<(QueryType, QueryOutcome)> {
        let mut v: Vec<_> = self
            .seen
            .lock()
            .expect("observer lock")
            .iter()
            .map(|(t, o, _)| (*t, *o))
            .collect();
        v.sort_by_key(|(t, o)| (*t as u8, *o as u8));
        v
    }
}

fn sorted(mut v: Vec<IpAddr>) -> Vec<IpAddr> {
    v.sort();
    v
}

fn found(l: Lookup<Vec<IpAddr>>) -> Vec<IpAddr> {
    match l {
        Lookup::Found(v) => sorted(v),
        other => panic!("expected addresses, got {other:?}"),
    }
}

#[test]
fn forward_asks_the_clients_family_first_and_the_other_only_without_records() {
    let dns = TestDns::start(
        TestZone::new()
            .a("v4.example.test", "192.0.2.1")
            .a("v4.example.test", "192.0.2.2")
            .aaaa("v6.example.test", "2001:db8::1")
            .a("dual.example.test", "198.51.100.7")
            .aaaa("dual.example.test", "2001:db8::7"),
    );
    let mut h = Harness::on(&dns);
    assert_eq!(
        found(h.forward_for("v4.example.test", Family::V4)),
        vec![ip("192.0.2.1"), ip("192.0.2.2")]
    );
    // No A: the AAAA records still show that the name resolves.
    assert_eq!(
        found(h.forward_for("v6.example.test", Family::V4)),
        vec![ip("2001:db8::1")]
    );
    assert_eq!(
        found(h.forward_for("v4.example.test", Family::V6)),
        vec![ip("192.0.2.1"), ip("192.0.2.2")]
    );
    // Both families: only the client's own is asked, since only it can hold the client.
    assert_eq!(
        found(h.forward_for("dual.example.test", Family::V4)),
        vec![ip("198.51.100.7")]
    );
    assert_eq!(
        found(h.forward_for("dual.example.test", Family::V6)),
        vec![ip("2001:db8::7")]
    );
    // Case and a trailing dot do not matter; the answer echoes the name as asked.
    assert_eq!(
        found(h.forward_for("Dual.EXAMPLE.test.", Family::V6)),
        vec![ip("2001:db8::7")]
    );
    assert_eq!(dns.count("dual.example.test", RecordType::AAAA), 1);
    assert_eq!(dns.count("dual.example.test", RecordType::A), 1);
    assert_eq!(
        h.outcomes(),
        vec![
            (QueryType::A, QueryOutcome::Ok),
            (QueryType::A, QueryOutcome::Ok),
            (QueryType::A, QueryOutcome::Ok),
            (QueryType::A, QueryOutcome::NoData),
            (QueryType::Aaaa, QueryOutcome::Ok),
            (QueryType::Aaaa, QueryOutcome::Ok),
            (QueryType::Aaaa, QueryOutcome::Ok),
            (QueryType::Aaaa, QueryOutcome::NoData),
        ]
    );
}

#[test]
fn loopback_only_addresses_ask_the_other_family_too() {
    // localhost fails only when *all* the name's addresses are loopback (SPEC), so an A of
    // 127.0.0.1 alone does not settle it.
    let dns = TestDns::start(
        TestZone::new()
            .a("split.example.test", "127.0.0.1")
            .aaaa("split.example.test", "2001:db8::5")
            .a("lo.example.test", "127.0.0.1"),
    );
    let mut h = Harness::on(&dns);
    assert_eq!(
        found(h.forward("split.example.test")),
        vec![ip("127.0.0.1"), ip("2001:db8::5")]
    );
    assert_eq!(found(h.forward("lo.example.test")), vec![ip("127.0.0.1")]);
    assert_eq!(dns.count("split.example.test", RecordType::AAAA), 1);
    assert_eq!(dns.count("lo.example.test", RecordType::AAAA), 1);
}

#[test]
fn a_loopback_only_name_whose_other_family_is_undecided_is_undecided() {
    let dns = TestDns::start(
        TestZone::new()
            .a("lo-broken.example.test", "127.0.0.1")
            .servfail_type("lo-broken.example.test", RecordType::AAAA),
    );
    let mut h = Harness::on(&dns);
    assert_eq!(
        h.forward("lo-broken.example.test"),
        Lookup::TempError(TempFailure::ServFail)
    );
}

#[test]
fn ptr_names_are_confirmed_in_the_clients_family_only() {
    let client = ip("192.0.2.60");
    let dns = TestDns::start(
        TestZone::new()
            .ptr(client, "v6only.example.test")
            .aaaa("v6only.example.test", "2001:db8::60"),
    );
    let mut h = Harness::on(&dns);
    let facts = h.reverse(client);
    assert_eq!(
        facts.ptr,
        Lookup::Found(vec![PtrName {
            name: "v6only.example.test".into(),
            addrs: Lookup::NoData,
        }])
    );
    assert_eq!(facts.confirmed_name(client), None);
    // AAAA records cannot hold an IPv4 client: never asked for a confirmation.
    assert_eq!(dns.count("v6only.example.test", RecordType::AAAA), 0);
    // NODATA for A does not settle a HELO lookup of the name, so it is not kept as one.
    let known = h.handle.known_answers().clone();
    assert_eq!(
        known.forward("v6only.example.test", Family::V4, Instant::now()),
        None
    );
}

#[test]
fn forward_negative_answers() {
    let dns = TestDns::start(
        TestZone::new()
            .nodata("empty.example.test")
            .a("v4only.example.test", "192.0.2.1"),
    );
    let mut h = Harness::on(&dns);
    // NXDOMAIN holds for every type: AAAA is not asked.
    assert_eq!(h.forward("missing.example.test"), Lookup::NxDomain);
    // NODATA for A asks AAAA, which has none either.
    assert_eq!(h.forward("empty.example.test"), Lookup::NoData);
    // NODATA for AAAA (asked first for an IPv6 client) does not hide the A record.
    assert_eq!(
        found(h.forward_for("v4only.example.test", Family::V6)),
        vec![ip("192.0.2.1")]
    );
    assert_eq!(
        h.outcomes(),
        vec![
            (QueryType::A, QueryOutcome::Ok),
            (QueryType::A, QueryOutcome::NxDomain),
            (QueryType::A, QueryOutcome::NoData),
            (QueryType::Aaaa, QueryOutcome::NoData),
            (QueryType::Aaaa, QueryOutcome::NoData),
        ]
    );
}

#[test]
fn single_label_names_are_not_expanded() {
    // Queried as "host." exactly: no search list, no ndots games.
    let dns = TestDns::start(TestZone::new().a("host", "192.0.2.3"));
    let mut h = Harness::on(&dns);
    assert_eq!(found(h.forward("host")), vec![ip("192.0.2.3")]);
    assert!(
        dns.queries().iter().all(|q| q.name == "host."),
        "{:?}",
        dns.queries()
    );
}

#[test]
fn servfail_and_refused_are_temporary() {
    let dns = TestDns::start(
        TestZone::new()
            .servfail("broken.example.test")
            .refused("refused.example.test"),
    );
    let mut h = Harness::on(&dns);
    assert_eq!(
        h.forward("broken.example.test"),
        Lookup::TempError(TempFailure::ServFail)
    );
    assert_eq!(
        h.forward("refused.example.test"),
        Lookup::TempError(TempFailure::Refused)
    );
    // Undecided stays undecided: the other family cannot settle whether the client's
    // address is among the name's.
    assert_eq!(
        h.outcomes(),
        vec![
            (QueryType::A, QueryOutcome::ServFail),
            (QueryType::A, QueryOutcome::Error),
        ]
    );
}

#[test]
fn silence_times_out_within_the_total() {
    let dns = TestDns::start(TestZone::new().blackhole("slow.example.test"));
    let timeout = Duration::from_millis(600);
    let mut h = Harness::new(vec![dns.addr()], timeout, 8);
    let started = Instant::now();
    assert_eq!(
        h.forward("slow.example.test"),
        Lookup::TempError(TempFailure::Timeout)
    );
    let took = started.elapsed();
    assert!(took >= timeout / 2, "gave up too early: {took:?}");
    assert!(took < timeout + Duration::from_millis(400), "took {took:?}");
    assert_eq!(h.outcomes(), vec![(QueryType::A, QueryOutcome::Timeout)]);
    // hickory retried once inside the total (two tries of half the timeout each).
    assert!(dns.count("slow.example.test", RecordType::A) >= 2);
}

#[test]
fn a_dead_server_falls_back_to_a_live_one() {
    // A bound socket that never reads: queries to it vanish.
    let dead = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dns = TestDns::start(TestZone::new().a("mail.example.test", "192.0.2.9"));
    let mut h = Harness::new(
        vec![dead.local_addr().expect("addr"), dns.addr()],
        Duration::from_millis(1000),
        8,
    );
    assert_eq!(found(h.forward("mail.example.test")), vec![ip("192.0.2.9")]);
}

#[test]
fn truncated_udp_answers_are_retried_over_tcp() {
    let dns = TestDns::start(
        TestZone::new()
            .a("big.example.test", "192.0.2.20")
            .truncate_udp("big.example.test"),
    );
    let mut h = Harness::on(&dns);
    assert_eq!(found(h.forward("big.example.test")), vec![ip("192.0.2.20")]);
    assert!(dns.queries().iter().any(|q| q.tcp), "{:?}", dns.queries());
}

#[test]
fn answers_are_cached() {
    let dns = TestDns::start(TestZone::new().a("cached.example.test", "192.0.2.30"));
    let mut h = Harness::on(&dns);
    for _ in 0..3 {
        assert_eq!(
            found(h.forward("cached.example.test")),
            vec![ip("192.0.2.30")]
        );
    }
    assert_eq!(dns.count("cached.example.test", RecordType::A), 1);
    // Still observed once per query asked (A only: the name has one), cache hit or not.
    assert_eq!(h.outcomes().len(), 3);
}

#[test]
fn answers_become_known_to_other_threads_and_hits_are_observed_as_queries() {
    let client = ip("192.0.2.40");
    let dns = TestDns::start(
        TestZone::new()
            .a("known.example.test", "192.0.2.41")
            .ptr(client, "host.example.test")
            .a("host.example.test", client),
    );
    let mut h = Harness::on(&dns);
    let known = h.handle.known_answers().clone();
    let now = Instant::now();
    assert_eq!(
        known.forward("known.example.test", Family::V4, now),
        None,
        "not asked yet"
    );

    let addrs = h.forward("known.example.test");
    let facts = h.reverse(client);
    let now = Instant::now();
    assert_eq!(
        known.forward("KNOWN.example.test.", Family::V4, now),
        Some(addrs)
    );
    assert_eq!(known.reverse(client, now), Some(facts.clone()));
    // The PTR name's own lookup is kept as a forward answer: clients often HELO with it.
    match known.forward("host.example.test", Family::V4, now) {
        Some(Lookup::Found(v)) => assert_eq!(v, vec![client]),
        other => panic!("PTR name not known: {other:?}"),
    }
    // Forward A, then PTR and the PTR name's A (each name has an A, so no AAAA is asked);
    // the hits above replay theirs.
    let asked = 1 + 2;
    let replayed = 1 + 2 + 1;
    assert_eq!(h.outcomes().len(), asked + replayed);
}

#[test]
fn negative_answers_are_known_for_their_soa_ttl_and_ttl_zero_is_never_kept() {
    let dns = TestDns::start(TestZone::new().nodata("empty.example.test"));
    let mut h = Harness::on(&dns);
    assert_eq!(h.forward("gone.example.test"), Lookup::NxDomain);
    assert_eq!(h.forward("empty.example.test"), Lookup::NoData);
    let known = h.handle.known_answers().clone();
    let now = Instant::now();
    assert_eq!(
        known.forward("gone.example.test", Family::V4, now),
        Some(Lookup::NxDomain)
    );
    assert_eq!(
        known.forward("empty.example.test", Family::V4, now),
        Some(Lookup::NoData)
    );
    assert_eq!(
        known.forward(
            "gone.example.test",
            Family::V4,
            now + Duration::from_secs(61)
        ),
        None,
        "the zone's negative TTL is 60 s"
    );

    let uncached = TestDns::start(TestZone::new().a("brief.example.test", "192.0.2.42").ttl(0));
    let mut h = Harness::on(&uncached);
    found(h.forward("brief.example.test"));
    assert_eq!(h.forward("gone.example.test"), Lookup::NxDomain);
    let known = h.handle.known_answers().clone();
    assert_eq!(
        known.forward("brief.example.test", Family::V4, Instant::now()),
        None
    );
    assert_eq!(
        known.forward("gone.example.test", Family::V4, Instant::now()),
        None
    );
}

#[test]
fn undecided_answers_are_never_known() {
    let dns = TestDns::start(
        TestZone::new()
            .servfail("broken.example.test")
            .blackhole("silent.example.test"),
    );
    let mut h = Harness::new(vec![dns.addr()], Duration::from_millis(300), 64);
    assert!(matches!(
        h.forward("broken.example.test"),
        Lookup::TempError(_)
    ));
    assert!(matches!(
        h.forward("silent.example.test"),
        Lookup::TempError(_)
    ));
    let known = h.handle.known_answers().clone();
    for name in ["broken.example.test", "silent.example.test"] {
        assert_eq!(
            known.forward(name, Family::V4, Instant::now()),
            None,
            "{name}"
        );
    }
}

#[test]
fn reverse_confirmed_ipv4() {
    let client = ip("192.0.2.10");
    let dns = TestDns::start(
        TestZone::new()
            .ptr(client, "Mail.Example.TEST")
            .a("mail.example.test", client)
            .aaaa("mail.example.test", "2001:db8::10"),
    );
    let mut h = Harness::on(&dns);
    let facts = h.reverse(client);
    assert_eq!(
        facts,
        ReverseFacts {
            ptr: Lookup::Found(vec![PtrName {
                name: "mail.example.test".into(),
                // The AAAA records cannot hold an IPv4 client, so they are not asked.
                addrs: Lookup::Found(vec![client]),
            }])
        }
    );
    assert_eq!(facts.confirmed_name(client), Some("mail.example.test"));
    assert_eq!(
        h.outcomes(),
        vec![
            (QueryType::A, QueryOutcome::Ok),
            (QueryType::Ptr, QueryOutcome::Ok),
        ]
    );
    // An IPv4-mapped address is looked up as the IPv4 address it is.
    let mapped = ip("::ffff:192.0.2.10");
    assert_eq!(h.reverse(mapped).ptr, facts.ptr);
}

#[test]
fn reverse_not_confirmed() {
    let client = ip("198.51.100.20");
    let dns = TestDns::start(
        TestZone::new()
            .ptr(client, "elsewhere.example.test")
            .a("elsewhere.example.test", "203.0.113.1")
            .ptr("198.51.100.21", "gone.example.test")
            .ptr("198.51.100.22", "broken.example.test")
            .servfail("broken.example.test"),
    );
    let mut h = Harness::on(&dns);
    let facts = h.reverse(client);
    assert_eq!(facts.confirmed_name(client), None);
    assert_eq!(
        facts.ptr,
        Lookup::Found(vec![PtrName {
            name: "elsewhere.example.test".into(),
            addrs: Lookup::Found(vec![ip("203.0.113.1")]),
        }])
    );
    let gone = h.reverse(ip("198.51.100.21"));
    assert_eq!(
        gone.ptr,
        Lookup::Found(vec![PtrName {
            name: "gone.example.test".into(),
            addrs: Lookup::NxDomain,
        }])
    );
    let broken = h.reverse(ip("198.51.100.22"));
    assert_eq!(
        broken.ptr,
        Lookup::Found(vec![PtrName {
            name: "broken.example.test".into(),
            addrs: Lookup::TempError(TempFailure::ServFail),
        }])
    );
}

#[test]
fn reverse_without_ptr() {
    let dns = TestDns::start(
        TestZone::new()
            .nodata(&common::dns_server::reverse_name(ip("203.0.113.5")))
            .servfail_ptr("203.0.113.6")
            .blackhole_ptr("203.0.113.7"),
    );
    let mut h = Harness::on(&dns);
    assert_eq!(h.reverse(ip("203.0.113.4")).ptr, Lookup::NxDomain);
    assert_eq!(h.reverse(ip("203.0.113.5")).ptr, Lookup::NoData);
    assert_eq!(
        h.reverse(ip("203.0.113.6")).ptr,
        Lookup::TempError(TempFailure::ServFail)
    );
    assert_eq!(
        h.reverse(ip("203.0.113.7")).ptr,
        Lookup::TempError(TempFailure::Timeout)
    );
    // No PTR name, no forward queries.
    assert!(h.outcomes().iter().all(|(t, _)| *t == QueryType::Ptr));
}

#[test]
fn reverse_ipv6_and_several_names() {
    let client = ip("2001:db8::25");
    let dns = TestDns::start(
        TestZone::new()
            .ptr(client, "a.example.test")
            .ptr(client, "b.example.test")
            .ptr(client, "A.example.test.") // the same name again: asked once
            .aaaa("a.example.test", "2001:db8::99")
            .aaaa("b.example.test", client),
    );
    let mut h = Harness::on(&dns);
    let facts = h.reverse(client);
    let Lookup::Found(names) = &facts.ptr else {
        panic!("{facts:?}");
    };
    let names: Vec<_> = names.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a.example.test", "b.example.test"]);
    assert_eq!(facts.confirmed_name(client), Some("b.example.test"));
    // An IPv6 client: AAAA of each name, and no A since each has AAAA records.
    let count = |t| h.outcomes().iter().filter(|(q, _)| *q == t).count();
    assert_eq!(
        (
            count(QueryType::Ptr),
            count(QueryType::A),
            count(QueryType::Aaaa)
        ),
        (1, 0, 2)
    );
}

#[test]
fn at_most_ten_ptr_names_are_confirmed() {
    let client = ip("192.0.2.50");
    let mut zone = TestZone::new();
    for i in 0..15 {
        let name = format!("n{i}.example.test");
        zone = zone.ptr(client, &name).a(&name, client);
    }
    let dns = TestDns::start(zone);
    let mut h = Harness::on(&dns);
    let facts = h.reverse(client);
    let Lookup::Found(names) = &facts.ptr else {
        panic!("{facts:?}");
    };
    assert_eq!(names.len(), 10);
    assert!(facts.confirmed_name(client).is_some());
}

#[test]
fn loopback_ptr_is_localhost() {
    // hickory answers 127/8 itself (RFC 6761); documented so nobody is surprised.
    let dns = TestDns::start(TestZone::new());
    let mut h = Harness::on(&dns);
    let facts = h.reverse(ip("127.0.0.1"));
    assert_eq!(facts.confirmed_name(ip("127.0.0.1")), Some("localhost"));
}

#[test]
fn blackholed_names_do_not_hold_up_the_others() {
    let mut zone = TestZone::new();
    for i in 0..50 {
        zone = zone.blackhole(&format!("slow{i}.example.test"));
    }
    for i in 0..200 {
        zone = zone.a(&format!("fast{i}.example.test"), "192.0.2.77");
    }
    let dns = TestDns::start(zone);
    // Long enough that the 200 answerable lookups all finish before it even on a busy machine,
    // so the only thing the test measures is that the silent ones do not block them.
    let timeout = Duration::from_millis(3000);
    let h = Harness::new(vec![dns.addr()], timeout, 256);
    // The slow ones go first, so a head-of-line block would show.
    for i in 0..50 {
        h.handle.submit(DnsRequest::Forward {
            id: 10_000 + i,
            name: format!("slow{i}.example.test"),
            family: Family::V4,
        });
    }
    for i in 0..200 {
        h.handle.submit(DnsRequest::Forward {
            id: i,
            name: format!("fast{i}.example.test"),
            family: Family::V4,
        });
    }
    let mut order = Vec::new();
    for _ in 0..250 {
        let answer = h
            .answers
            .recv_timeout(timeout * 3)
            .expect("every request is answered");
        order.push(answer);
    }
    let first_slow = order
        .iter()
        .position(|a| a.id() >= 10_000)
        .expect("slow answers");
    assert_eq!(first_slow, 200, "a slow answer overtook a fast one");
    for a in &order[..200] {
        assert!(
            matches!(a, DnsAnswer::Forward { addrs: Lookup::Found(v), .. } if v == &[ip("192.0.2.77")]),
            "{a:?}"
        );
    }
    for a in &order[200..] {
        assert!(
            matches!(
                a,
                DnsAnswer::Forward {
                    addrs: Lookup::TempError(TempFailure::Timeout),
                    ..
                }
            ),
            "{a:?}"
        );
    }
}

#[test]
fn excess_requests_wait_for_a_slot_in_order() {
    let dns = TestDns::start(
        TestZone::new()
            .blackhole("slow.example.test")
            .a("fast1.example.test", "192.0.2.1")
            .a("fast2.example.test", "192.0.2.2"),
    );
    let timeout = Duration::from_millis(500);
    let h = Harness::new(vec![dns.addr()], timeout, 1);
    for (id, name) in [
        (1, "slow.example.test"),
        (2, "fast1.example.test"),
        (3, "fast2.example.test"),
    ] {
        h.handle.submit(DnsRequest::Forward {
            id,
            name: name.into(),
            family: Family::V4,
        });
    }
    let ids: Vec<_> = (0..3)
        .map(|_| h.answers.recv_timeout(PROMPT).expect("answer").id())
        .collect();
    assert_eq!(ids, [1, 2, 3]);
}

#[test]
fn answers_wake_the_event_loop() {
    let dns = TestDns::start(TestZone::new().a("mail.example.test", "192.0.2.1"));
    let mut poll = mio::Poll::new().expect("poll");
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(7)).expect("waker"));
    let (tx, rx) = crossbeam_channel::unbounded();
    let settings = ResolverSettings {
        max_in_flight: 4,
        ..ResolverSettings::new(vec![dns.addr()], Duration::from_millis(600))
    };
    let handle = resolver::spawn(settings, tx, Some(waker), no_observer()).expect("spawn");
    handle.submit(DnsRequest::Forward {
        id: 1,
        name: "mail.example.test".into(),
        family: Family::V4,
    });
    let mut events = mio::Events::with_capacity(4);
    let deadline = Instant::now() + PROMPT;
    loop {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .expect("poll");
        if events.iter().any(|e| e.token() == mio::Token(7)) {
            // The answer is queued before the wake-up.
            assert_eq!(rx.try_recv().expect("answer queued").id(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "no wake-up");
    }
    assert!(handle.join());
}

#[test]
fn dropping_every_handle_stops_the_thread() {
    let dns = TestDns::start(TestZone::new().blackhole("slow.example.test"));
    let (tx, rx) = crossbeam_channel::unbounded();
    let settings = ResolverSettings {
        max_in_flight: 4,
        ..ResolverSettings::new(vec![dns.addr()], Duration::from_secs(5))
    };
    let handle = resolver::spawn(settings, tx, None, no_observer()).expect("spawn");
    let clone = handle.clone();
    clone.submit(DnsRequest::Forward {
        id: 1,
        name: "slow.example.test".into(),
        family: Family::V4,
    });
    drop(clone);
    let started = Instant::now();
    // In-flight work is cancelled, not waited for.
    assert!(handle.join());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        rx.recv().is_err(),
        "the answer sender is gone with the thread"
    );
}

#[test]
fn bad_settings_are_errors() {
    let (tx, _rx) = crossbeam_channel::unbounded();
    let err = resolver::spawn(
        ResolverSettings::new(vec![], Duration::from_secs(1)),
        tx.clone(),
        None,
        no_observer(),
    )
    .expect_err("no servers");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let server: SocketAddr = "127.0.0.1:53".parse().expect("literal");
    let err = resolver::spawn(
        ResolverSettings::new(vec![server], Duration::ZERO),
        tx,
        None,
        no_observer(),
    )
    .expect_err("zero timeout");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn identical_requests_share_one_lookup_and_each_answer_counts_its_queries() {
    let dns = TestDns::start(
        TestZone::new()
            .blackhole("slow.example.test")
            .a("mail.example.test", "192.0.2.1"),
    );
    let h = Harness::new(vec![dns.addr()], Duration::from_millis(1500), 1);
    // The slot is taken, so the three requests for mail.example.test wait together.
    h.handle.submit(DnsRequest::Forward {
        id: 1,
        name: "slow.example.test".into(),
        family: Family::V4,
    });
    for id in 2..5 {
        h.handle.submit(DnsRequest::Forward {
            id,
            name: "mail.example.test".into(),
            family: Family::V4,
        });
    }
    let mut answers: Vec<DnsAnswer> = (0..4)
        .map(|_| h.answers.recv_timeout(PROMPT).expect("answer"))
        .collect();
    answers.sort_by_key(DnsAnswer::id);
    let ids: Vec<u64> = answers.iter().map(DnsAnswer::id).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    for answer in &answers[1..] {
        assert!(
            matches!(answer, DnsAnswer::Forward { addrs: Lookup::Found(v), queries: 1, .. }
                if v == &[ip("192.0.2.1")]),
            "{answer:?}"
        );
    }
    assert_eq!(dns.count("mail.example.test", RecordType::A), 1);
}

#[test]
fn a_superseded_forward_is_never_asked() {
    let dns = TestDns::start(
        TestZone::new()
            .blackhole("slow.example.test")
            .a("old.example.test", "192.0.2.1")
            .a("new.example.test", "192.0.2.2"),
    );
    let h = Harness::new(vec![dns.addr()], Duration::from_millis(800), 1);
    h.handle.submit(DnsRequest::Forward {
        id: 1,
        name: "slow.example.test".into(),
        family: Family::V4,
    });
    // Connection 2 says EHLO old, then EHLO new while old still waits for a slot.
    for name in ["old.example.test", "new.example.test"] {
        h.handle.submit(DnsRequest::Forward {
            id: 2,
            name: name.into(),
            family: Family::V4,
        });
    }
    // Connection 3 asks for a name, then closes.
    h.handle.submit(DnsRequest::Forward {
        id: 3,
        name: "gone.example.test".into(),
        family: Family::V4,
    });
    h.handle.submit(DnsRequest::Forget { id: 3 });
    let mut answers: Vec<DnsAnswer> = (0..2)
        .map(|_| h.answers.recv_timeout(PROMPT).expect("answer"))
        .collect();
    answers.sort_by_key(DnsAnswer::id);
    assert!(
        matches!(&answers[1], DnsAnswer::Forward { id: 2, name, .. } if name == "new.example.test"),
        "{:?}",
        answers[1]
    );
    assert!(h.answers.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(dns.count("old.example.test", RecordType::A), 0);
    assert_eq!(dns.count("gone.example.test", RecordType::A), 0);
}

#[test]
fn a_full_queue_answers_at_once_as_undecided() {
    let dns = TestDns::start(TestZone::new().blackhole("slow.example.test"));
    let h = Harness::new(vec![dns.addr()], Duration::from_secs(5), 1);
    h.handle.submit(DnsRequest::Forward {
        id: 0,
        name: "slow.example.test".into(),
        family: Family::V4,
    });
    let flood = 2 * resolver::QUEUE_BOUND + 100;
    for id in 1..=flood as u64 {
        h.handle.submit(DnsRequest::Forward {
            id,
            name: format!("n{id}.example.test"),
            family: Family::V4,
        });
    }
    // Everything past the queue is answered now, not after the slow lookup's 5 s.
    let started = Instant::now();
    let mut undecided = 0;
    while let Ok(answer) = h.answers.recv_timeout(Duration::from_millis(500)) {
        assert!(
            matches!(
                answer,
                DnsAnswer::Forward {
                    addrs: Lookup::TempError(TempFailure::Other),
                    queries: 0,
                    ..
                }
            ),
            "{answer:?}"
        );
        undecided += 1;
    }
    assert!(undecided >= 100, "{undecided} answered at once");
    assert!(started.elapsed() < Duration::from_secs(4));
}
