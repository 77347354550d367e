//! The Redis state store: two instances sharing one private redis-server, an outage in the
//! middle of a run (fail open, counted, logged once, resumed), and helo_churn across instances.

mod common;

use std::time::{Duration, Instant};

use common::dns_server::{TestDns, TestZone};
use common::server::{Client, TestServer};
use common::state::{DYNAMIC_IP, DYNAMIC_NAME, Redis, ip, sample, scrape, zone};

const DELAY: Duration = Duration::from_secs(2);

fn instance(dns: &TestDns, redis: &Redis, policy: &str) -> TestServer {
    TestServer::builder()
        .proxy()
        .metrics()
        .dns(dns.addr())
        .env("HELOGUARD_DOMAINS", "example.org")
        .env("HELOGUARD_HELO_POLICY", policy)
        .env("HELOGUARD_GREYLIST_DELAY", "2s")
        .env("HELOGUARD_MAX_ERRORS", "0")
        .env("HELOGUARD_STATE", &redis.url())
        .start()
}

/// One RCPT for `to` from the dynamic client; the reply.
fn rcpt(s: &TestServer, to: &str) -> (u16, String) {
    let mut c: Client = s.connect_as(ip(DYNAMIC_IP));
    assert_eq!(c.reply().0, 220);
    c.cmd(&format!("EHLO {DYNAMIC_NAME}"), 250);
    c.cmd("MAIL FROM:<alice@example.net>", 250);
    c.send(format!("RCPT TO:<{to}>\r\n").as_bytes());
    let reply = c.reply();
    c.cmd("QUIT", 221);
    reply
}

fn metric(s: &TestServer, name: &str) -> u64 {
    sample(&scrape(s.metrics_addr.expect("metrics")), name)
}

#[test]
fn a_triplet_greylisted_on_one_instance_passes_on_the_other_after_the_delay() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let dns = TestDns::start(zone());
    let a = instance(&dns, &redis, "default=tag,dynamic=greylist");
    let b = instance(&dns, &redis, "default=tag,dynamic=greylist");
    let first_sight = Instant::now();
    let (code, text) = rcpt(&a, "bob@example.org");
    assert_eq!(code, 451, "{text}");
    assert!(text.contains("try again in 2 seconds"), "{text}");
    // B knows the triplet: an early retry there is early, not new.
    let (code, text) = rcpt(&b, "bob@example.org");
    assert_eq!(code, 451, "{text}");
    assert_eq!(metric(&b, "heloguard_greylist_total{outcome=\"early\"}"), 1);
    assert_eq!(metric(&b, "heloguard_greylist_total{outcome=\"new\"}"), 0);

    std::thread::sleep(DELAY.saturating_sub(first_sight.elapsed()) + Duration::from_millis(200));
    assert_eq!(rcpt(&b, "bob@example.org").0, 250);
    assert_eq!(rcpt(&a, "bob@example.org").0, 250);
    assert_eq!(
        metric(&b, "heloguard_greylist_total{outcome=\"passed\"}"),
        1
    );
    assert_eq!(metric(&a, "heloguard_greylist_total{outcome=\"known\"}"), 1);
    // Every key has a TTL.
    let keys = redis.command(&["DBSIZE"]).expect("DBSIZE");
    assert!(keys.starts_with(":"), "{keys}");
    assert_eq!(
        redis.command(&["RANDOMKEY"]).map(|k| k.starts_with('$')),
        Some(true)
    );
}

#[test]
fn a_redis_outage_fails_open_is_counted_and_logged_once_and_greylisting_resumes() {
    let password = "s3cret-state-pw";
    let Some(mut redis) = Redis::start(Some(password)) else {
        return;
    };
    let dns = TestDns::start(zone());
    let s = instance(&dns, &redis, "default=tag,dynamic=greylist");
    assert_eq!(rcpt(&s, "one@example.org").0, 451);

    redis.kill();
    // Mail flows: each RCPT passes, unavailable.
    for n in 0..5 {
        let (code, text) = rcpt(&s, &format!("down{n}@example.org"));
        assert_eq!(code, 250, "{text}");
    }
    assert_eq!(
        metric(&s, "heloguard_greylist_total{outcome=\"unavailable\"}"),
        5
    );
    assert!(metric(&s, "heloguard_state_errors_total") >= 5);
    let log = s.log();
    assert_eq!(
        log.matches("is unavailable").count(),
        1,
        "one line per outage: {log}"
    );

    redis.restart();
    // Reconnects are paced (one a second): greylisting resumes within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let (code, _) = rcpt(&s, &format!("back{n}@example.org"));
        if code == 451 {
            break;
        }
        assert!(Instant::now() < deadline, "greylisting did not resume");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = s.log();
    assert_eq!(log.matches("is back after").count(), 1, "{log}");
    assert!(
        !log.contains(password),
        "the password is never logged: {log}"
    );
}

#[test]
fn helo_churn_counts_names_across_instances() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let dns = TestDns::start(TestZone::new());
    let a = instance(&dns, &redis, "default=log,helo_churn=reject");
    let b = instance(&dns, &redis, "default=log,helo_churn=reject");
    let client = ip("198.51.100.9");
    let session = |s: &TestServer, names: &[&str]| {
        let mut c = s.connect_as(client);
        assert_eq!(c.reply().0, 220);
        for name in names {
            c.cmd(&format!("EHLO {name}"), 250);
        }
        c.cmd("MAIL FROM:<x@example.net>", 250);
        c.send(b"RCPT TO:<y@example.org>\r\n");
        let reply = c.reply();
        c.cmd("QUIT", 221);
        reply.0
    };
    assert_eq!(
        session(&a, &["b1.example.net", "b2.example.net", "b3.example.net"]),
        250
    );
    assert_eq!(session(&b, &["b4.example.net", "b5.example.net"]), 250);
    assert_eq!(session(&b, &["b6.example.net"]), 550);
    assert_eq!(session(&a, &["b1.example.net"]), 550);
}
