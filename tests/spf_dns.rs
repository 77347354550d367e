//! SPF of the HELO identity through the hickory adapter against the in-process test DNS
//! server: TXT strings joined, MX and A followed, the FCrDNS facts reused for `ptr`, DNS
//! failures as temperror, and every query reported to the observer that feeds
//! heloguard_dns_queries_total.

mod common;

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dns_server::{TestDns, TestZone, reverse_name};
use heloguard::dns::{Lookup, PtrName, QueryObserver, QueryOutcome, QueryType, ReverseFacts};
use heloguard::helo::sender::{SpfOutcome, SpfResult};
use heloguard::spf::{HickorySpfDns, check_helo, out_of_time};
use hickory_proto::rr::RecordType;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

const HELO: &str = "mail.example.test";

/// What the observer saw: type and outcome of each query.
type Seen = Arc<Mutex<Vec<(QueryType, QueryOutcome)>>>;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal in test")
}

/// A resolver for the test server alone, as the resolver thread builds its own: no search
/// list, no hosts file, no cache (so each test sees its queries).
fn resolver_for(dns: &TestDns) -> TokioResolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = dns.addr().port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = dns.addr().port();
    let server = NameServerConfig::new(dns.addr().ip(), true, vec![udp, tcp]);
    let config = ResolverConfig::from_parts(None, vec![], vec![server]);
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(300);
    opts.attempts = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.cache_size = 0;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .expect("resolver")
}

/// The adapter over `dns` with a recording observer.
fn adapter(dns: &TestDns, timeout: Duration) -> (HickorySpfDns, Seen) {
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let observer: QueryObserver = Arc::new(move |qtype, outcome, _took| {
        sink.lock().expect("observer").push((qtype, outcome));
    });
    (
        HickorySpfDns::new(resolver_for(dns), timeout, observer),
        seen,
    )
}

fn run<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

fn check(spf_dns: &HickorySpfDns, client: &str) -> SpfOutcome {
    run(check_helo(spf_dns, ip(client), HELO, "mx.heloguard.test"))
}

fn seen(seen: &Seen) -> Vec<(QueryType, QueryOutcome)> {
    seen.lock().expect("observer").clone()
}

#[test]
fn txt_strings_are_joined_and_mx_and_include_are_followed() {
    let dns = TestDns::start(
        TestZone::new()
            .ttl(0)
            // One record in two character-strings: "...include:_spf.example" ".test -all".
            .txt(HELO, &["v=spf1 mx include:_spf.example", ".test -all"])
            .txt(HELO, &["some-verification=abc"])
            .mx(HELO, 10, "mx1.example.test")
            .a("mx1.example.test", "198.51.100.1")
            .txt("_spf.example.test", &["v=spf1 ip4:192.0.2.0/24 -all"]),
    );
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(
        check(&spf_dns, "192.0.2.3"),
        SpfOutcome {
            result: SpfResult::Pass,
            why: "include:_spf.example.test".into()
        }
    );
    assert_eq!(
        seen(&observed),
        [
            (QueryType::Txt, QueryOutcome::Ok),
            (QueryType::Mx, QueryOutcome::Ok),
            (QueryType::A, QueryOutcome::Ok),
            (QueryType::Txt, QueryOutcome::Ok),
        ]
    );
    assert_eq!(spf_dns.queries(), 4);
    assert_eq!(dns.count(HELO, RecordType::TXT), 1);
    assert_eq!(dns.count(HELO, RecordType::MX), 1);
    assert_eq!(dns.count("mx1.example.test", RecordType::A), 1);
    assert_eq!(dns.count("_spf.example.test", RecordType::TXT), 1);

    let (spf_dns, _) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(check(&spf_dns, "203.0.113.5").result, SpfResult::Fail);
}

#[test]
fn a_name_without_a_record_is_none_and_counted_as_nxdomain() {
    let dns = TestDns::start(TestZone::new().ttl(0).a(HELO, "192.0.2.3"));
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(
        check(&spf_dns, "192.0.2.3"),
        SpfOutcome {
            result: SpfResult::None,
            why: "no SPF record".into()
        }
    );
    assert_eq!(seen(&observed), [(QueryType::Txt, QueryOutcome::NoData)]);

    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(
        run(check_helo(
            &spf_dns,
            ip("192.0.2.3"),
            "nowhere.example.test",
            "mx.heloguard.test"
        ))
        .result,
        SpfResult::None
    );
    assert_eq!(seen(&observed), [(QueryType::Txt, QueryOutcome::NxDomain)]);
}

#[test]
fn servfail_and_silence_are_temperror() {
    let dns = TestDns::start(
        TestZone::new()
            .ttl(0)
            .servfail(HELO)
            .txt("slow.example.test", &["v=spf1 a:silent.example.test -all"])
            .blackhole("silent.example.test"),
    );
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(
        check(&spf_dns, "192.0.2.3"),
        SpfOutcome {
            result: SpfResult::TempError,
            why: "DNS server failure looking up TXT mail.example.test".into()
        }
    );
    assert_eq!(seen(&observed), [(QueryType::Txt, QueryOutcome::ServFail)]);

    // The per-query timeout bounds a server that never answers.
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(400));
    let outcome = run(check_helo(
        &spf_dns,
        ip("192.0.2.3"),
        "slow.example.test",
        "mx.heloguard.test",
    ));
    assert_eq!(outcome.result, SpfResult::TempError);
    assert_eq!(
        outcome.why, "DNS timeout looking up A silent.example.test",
        "{outcome:?}"
    );
    assert_eq!(
        seen(&observed),
        [
            (QueryType::Txt, QueryOutcome::Ok),
            (QueryType::A, QueryOutcome::Timeout),
        ]
    );
}

#[test]
fn the_callers_time_limit_ends_the_evaluation_as_temperror() {
    let dns = TestDns::start(TestZone::new().blackhole(HELO));
    let (spf_dns, _) = adapter(&dns, Duration::from_secs(30));
    let limit = Duration::from_millis(100);
    let outcome = run(async {
        let evaluation = check_helo(&spf_dns, ip("192.0.2.3"), HELO, "mx.heloguard.test");
        tokio::time::timeout(limit, evaluation)
            .await
            .unwrap_or_else(|_| out_of_time(limit))
    });
    assert_eq!(outcome, out_of_time(limit));
}

#[test]
fn ptr_reuses_the_fcrdns_facts_without_a_ptr_query() {
    let client = "192.0.2.3";
    let zone = TestZone::new()
        .ttl(0)
        .txt(HELO, &["v=spf1 ptr -all"])
        .ptr(client, "host.mail.example.test")
        .a("host.mail.example.test", client);
    let dns = TestDns::start(zone);
    let facts = ReverseFacts {
        ptr: Lookup::Found(vec![PtrName {
            name: "host.mail.example.test".into(),
            addrs: Lookup::Found(vec![ip(client)]),
        }]),
    };
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    let spf_dns = spf_dns.with_reverse(ip(client), facts);
    assert_eq!(check(&spf_dns, client).result, SpfResult::Pass);
    assert_eq!(seen(&observed), [(QueryType::Txt, QueryOutcome::Ok)]);
    assert_eq!(dns.count(&reverse_name(ip(client)), RecordType::PTR), 0);
    assert_eq!(dns.count("host.mail.example.test", RecordType::A), 0);

    // Without the facts the adapter asks PTR and confirms the name itself.
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(check(&spf_dns, client).result, SpfResult::Pass);
    assert_eq!(
        seen(&observed),
        [
            (QueryType::Txt, QueryOutcome::Ok),
            (QueryType::Ptr, QueryOutcome::Ok),
            (QueryType::A, QueryOutcome::Ok),
        ]
    );
    assert_eq!(dns.count(&reverse_name(ip(client)), RecordType::PTR), 1);
}

#[test]
fn unconfirmed_fcrdns_names_do_not_match_ptr() {
    let client = "192.0.2.3";
    let dns = TestDns::start(TestZone::new().ttl(0).txt(HELO, &["v=spf1 ptr ~all"]));
    let facts = ReverseFacts {
        ptr: Lookup::Found(vec![PtrName {
            name: "host.mail.example.test".into(),
            addrs: Lookup::Found(vec![ip("198.51.100.1")]),
        }]),
    };
    let (spf_dns, _) = adapter(&dns, Duration::from_millis(2000));
    let spf_dns = spf_dns.with_reverse(ip(client), facts);
    assert_eq!(check(&spf_dns, client).result, SpfResult::SoftFail);
}

#[test]
fn aaaa_for_an_ipv6_client_and_the_null_mx() {
    let dns = TestDns::start(
        TestZone::new()
            .ttl(0)
            .txt(HELO, &["v=spf1 mx:null.example.test a -all"])
            .mx("null.example.test", 0, ".")
            .aaaa(HELO, "2001:db8::25"),
    );
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(
        check(&spf_dns, "2001:db8::25"),
        SpfOutcome {
            result: SpfResult::Pass,
            why: "a".into()
        }
    );
    assert_eq!(
        seen(&observed),
        [
            (QueryType::Txt, QueryOutcome::Ok),
            (QueryType::Mx, QueryOutcome::Ok),
            (QueryType::Aaaa, QueryOutcome::Ok),
        ]
    );
}

#[test]
fn permerror_from_the_wire() {
    let dns = TestDns::start(
        TestZone::new()
            .ttl(0)
            .txt(HELO, &["v=spf1 include:loop.example.test -all"])
            .txt("loop.example.test", &["v=spf1 include:loop.example.test"])
            .txt("syntax.example.test", &["v=spf1 ip4:192.0.2.300 -all"])
            .txt("two.example.test", &["v=spf1 -all"])
            .txt("two.example.test", &["v=spf1 +all"]),
    );
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(
        check(&spf_dns, "192.0.2.3"),
        SpfOutcome {
            result: SpfResult::PermError,
            why: "too many DNS lookups".into()
        }
    );
    // The record, then ten includes.
    assert_eq!(seen(&observed).len(), 11);
    for (name, why) in [
        ("syntax.example.test", "syntax error at \"ip4:192.0.2.300\""),
        (
            "two.example.test",
            "more than one SPF record at two.example.test",
        ),
    ] {
        let (spf_dns, _) = adapter(&dns, Duration::from_millis(2000));
        let outcome = run(check_helo(
            &spf_dns,
            ip("192.0.2.3"),
            name,
            "mx.heloguard.test",
        ));
        assert_eq!(
            outcome,
            SpfOutcome {
                result: SpfResult::PermError,
                why: why.into()
            }
        );
    }
}

#[test]
fn the_evaluation_runs_as_a_spawned_task() {
    // As the resolver thread runs it: a task of a JoinSet on a current_thread runtime, which
    // needs a Send + 'static future.
    let dns = TestDns::start(
        TestZone::new()
            .ttl(0)
            .txt(HELO, &["v=spf1 a -all"])
            .a(HELO, "192.0.2.3"),
    );
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    let outcome = run(async move {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let outcome = check_helo(&spf_dns, ip("192.0.2.3"), HELO, "mx.heloguard.test").await;
            (outcome, spf_dns.queries())
        });
        tasks
            .join_next()
            .await
            .expect("one task")
            .expect("task ran")
    });
    assert_eq!(
        outcome,
        (
            SpfOutcome {
                result: SpfResult::Pass,
                why: "a".into()
            },
            2
        )
    );
    assert_eq!(seen(&observed).len(), 2);
}

#[test]
fn a_macro_expanding_to_odd_characters_is_asked_as_it_is() {
    // %{s} holds an @, %_ a space: DNS carries any octet in a label, so both names are
    // asked (RFC 7208 7.3), and their NXDOMAIN is no match.
    let dns = TestDns::start(TestZone::new().ttl(0).txt(
        HELO,
        &["v=spf1 exists:%{s}.x.example.test exists:a%_b.x.example.test -all"],
    ));
    let (spf_dns, observed) = adapter(&dns, Duration::from_millis(2000));
    assert_eq!(
        check(&spf_dns, "192.0.2.3"),
        SpfOutcome {
            result: SpfResult::Fail,
            why: "-all".into()
        }
    );
    assert_eq!(
        seen(&observed),
        [
            (QueryType::Txt, QueryOutcome::Ok),
            (QueryType::A, QueryOutcome::NxDomain),
            (QueryType::A, QueryOutcome::NxDomain),
        ]
    );
    assert_eq!(dns.queries().len(), 3, "{:?}", dns.queries());
}
