//! `heloguard check` end to end: the real binary against the in-process test DNS server.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone};

use heloguard::check_cli::gather;
use heloguard::dns::resolver::ResolverSettings;
use heloguard::dns::{Lookup, TempFailure};

const TIMEOUT_MS: u64 = 500;

fn zone() -> TestZone {
    TestZone::new()
        .a("mail.example.test", "192.0.2.10")
        .aaaa("mail.example.test", "2001:db8::10")
        .ptr("192.0.2.10", "mail.example.test")
        .ptr("2001:db8::10", "mail.example.test")
        .blackhole("slow.example.test")
        .blackhole_ptr("198.51.100.66")
}

fn check(dns: &TestDns, args: &[&str]) -> Output {
    let spool = std::env::temp_dir().join(format!("heloguard-check-cli-{}", std::process::id()));
    Command::new(env!("CARGO_BIN_EXE_heloguard"))
        .arg("check")
        .args(args)
        .env("HELOGUARD_DNS", dns.env_value())
        .env("HELOGUARD_DNS_TIMEOUT_MS", TIMEOUT_MS.to_string())
        .env("HELOGUARD_HOSTNAME", "mx.heloguard.test")
        .env("HELOGUARD_SPOOL", spool)
        .env_remove("HELOGUARD_HELO_POLICY")
        .env_remove("HELOGUARD_HELO_ALLOW")
        .env_remove("HELOGUARD_DOMAINS")
        .output()
        .expect("run heloguard check")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn aligned_identity_passes() {
    let dns = TestDns::start(zone());
    for ip in ["192.0.2.10", "2001:db8::10"] {
        let out = check(&dns, &["--ip", ip, "--helo", "mail.example.test"]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{ip}: {text}");
        assert!(text.contains("pass"), "{text}");
        assert!(text.contains("fcrdns"), "{text}");
        for line in ["fcrdns: pass ", "forward: pass ", "forward_match: pass "] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "{ip}: {line}\n{text}"
            );
        }
        assert!(text.lines().any(|l| l == "verdict: pass"), "{ip}: {text}");
    }
}

#[test]
fn unknown_name_fails() {
    let dns = TestDns::start(zone());
    let out = check(
        &dns,
        &["--ip", "192.0.2.10", "--helo", "nowhere.example.test"],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("fail"), "{text}");
    assert!(text.contains("forward"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("forward: fail ")),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "verdict: fail"), "{text}");
}

#[test]
fn silent_dns_is_a_temperror_within_the_deadline() {
    let dns = TestDns::start(zone());
    let started = Instant::now();
    let out = check(
        &dns,
        &["--ip", "198.51.100.66", "--helo", "slow.example.test"],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("temperror"), "{text}");
    // The verdict deadline is 2 x the lookup timeout; allow for process start-up.
    assert!(
        started.elapsed() < Duration::from_millis(2 * TIMEOUT_MS) + Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn usage_errors_exit_2() {
    let dns = TestDns::start(zone());
    for args in [
        &["--ip", "192.0.2.10"][..],
        &["--helo", "mail.example.test"][..],
        &["--ip", "not-an-ip", "--helo", "mail.example.test"][..],
        &["--bogus"][..],
    ] {
        let out = check(&dns, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("usage: heloguard check"), "{args:?}: {err}");
    }
}

fn settings(dns: &TestDns) -> ResolverSettings {
    ResolverSettings::new(vec![dns.addr()], Duration::from_millis(TIMEOUT_MS))
}

#[test]
fn gather_collects_both_sides() {
    let dns = TestDns::start(zone());
    let ip = "192.0.2.10".parse().expect("literal");
    let got = gather(settings(&dns), ip, Some("mail.example.test".into())).expect("gather");
    // The client is IPv4 and the name has an A record: its AAAA is not asked.
    assert_eq!(got.helo_addrs, Some(Lookup::Found(vec![ip])));
    let reverse = got.reverse.expect("reverse answered");
    assert_eq!(reverse.confirmed_name(ip), Some("mail.example.test"));
}

#[test]
fn gather_without_a_domain_asks_only_the_reverse_side() {
    let dns = TestDns::start(zone());
    let ip = "192.0.2.10".parse().expect("literal");
    let got = gather(settings(&dns), ip, None).expect("gather");
    assert_eq!(got.helo_addrs, None);
    assert!(got.reverse.is_some());
    assert!(
        dns.queries()
            .iter()
            .all(|q| q.name.ends_with(".arpa.") || q.name == "mail.example.test."),
        "{:?}",
        dns.queries()
    );
}

#[test]
fn gather_gives_up_at_twice_the_timeout() {
    let dns = TestDns::start(zone());
    let started = Instant::now();
    let got = gather(
        settings(&dns),
        "198.51.100.66".parse().expect("literal"),
        Some("slow.example.test".into()),
    )
    .expect("gather");
    let took = started.elapsed();
    // Each lookup times out on its own (one timeout each, run concurrently) and is reported as
    // such; nothing waits beyond the verdict deadline.
    assert_eq!(
        got.helo_addrs,
        Some(Lookup::TempError(TempFailure::Timeout))
    );
    assert_eq!(
        got.reverse.map(|r| r.ptr),
        Some(Lookup::TempError(TempFailure::Timeout))
    );
    assert!(
        took < Duration::from_millis(2 * TIMEOUT_MS) + Duration::from_millis(1500),
        "took {took:?}"
    );
}

/// A zone where 192.0.2.20 is listed twice, its HELO's domain is on a domain list, and its
/// SPF record fails it.
fn listed_zone() -> TestZone {
    TestZone::new()
        .a("mail.listed.example", "192.0.2.20")
        .ptr("192.0.2.20", "mail.listed.example")
        .txt("mail.listed.example", &["v=spf1 ip4:198.51.100.0/24 -all"])
        .listed(
            "k3y.zen.test",
            "192.0.2.20".parse::<std::net::IpAddr>().unwrap(),
            "127.0.0.4",
        )
        .listed(
            "k3y.zen.test",
            "192.0.2.20".parse::<std::net::IpAddr>().unwrap(),
            "127.255.255.254",
        )
        .listed(
            "cop.test",
            "192.0.2.20".parse::<std::net::IpAddr>().unwrap(),
            "127.0.0.2",
        )
        .a("listed.example.dbl.test", "127.0.1.2")
        .blackhole_zone("down.test")
}

#[test]
fn check_shows_the_lists_spf_and_why() {
    let dns = TestDns::start(listed_zone());
    let spool = std::env::temp_dir().join(format!("heloguard-check-cli-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_heloguard"))
        .args([
            "check",
            "--ip",
            "192.0.2.20",
            "--helo",
            "mail.listed.example",
        ])
        .env("HELOGUARD_DNS", dns.env_value())
        .env("HELOGUARD_DNS_TIMEOUT_MS", TIMEOUT_MS.to_string())
        .env("HELOGUARD_HOSTNAME", "mx.heloguard.test")
        .env("HELOGUARD_SPOOL", spool)
        .env(
            "HELOGUARD_DNSBL",
            "K3Y.zen.test=127.0.0.[2..11]*3 cop.test*2 down.test",
        )
        .env("HELOGUARD_DNSBL_DISPLAY", "k3y.zen.test=zen.spamhaus.org")
        .env("HELOGUARD_RHSBL", "dbl.test=127.0.1.[2..99]")
        .env_remove("HELOGUARD_HELO_POLICY")
        .env_remove("HELOGUARD_HELO_ALLOW")
        .env_remove("HELOGUARD_DOMAINS")
        .output()
        .expect("run heloguard check");
    let text = stdout(&out);
    // The key is in the zone asked, never in the output.
    assert!(!text.contains("K3Y") && !text.contains("k3y"), "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} line: {text}"))
            .to_string()
    };
    let dnsbl = line("dnsbl");
    assert!(dnsbl.starts_with("dnsbl: fail "), "{dnsbl}");
    assert!(dnsbl.contains("score 5"), "{dnsbl}");
    assert!(
        dnsbl.contains("zen.spamhaus.org (127.0.0.4, weight 3)"),
        "{dnsbl}"
    );
    assert!(dnsbl.contains("cop.test (127.0.0.2, weight 2)"), "{dnsbl}");
    let rhsbl = line("rhsbl");
    assert!(rhsbl.starts_with("rhsbl: fail "), "{rhsbl}");
    assert!(
        rhsbl.contains("listed.example listed by dbl.test"),
        "{rhsbl}"
    );
    // spf is off by default: shown, not counted, with the mechanism that decided.
    let spf = line("spf");
    assert!(spf.starts_with("spf: off "), "{spf}");
    assert!(spf.contains("fail"), "{spf}");
    assert!(spf.contains("-all"), "{spf}");
    let churn = line("helo_churn");
    assert!(churn.contains("keeps no HELO history"), "{churn}");
    assert_eq!(out.status.code(), Some(1), "{text}");
}
