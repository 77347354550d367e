//! A whole in-memory dialogue through `Session`: greeting, EHLO, DNS facts, a pipelined
//! transaction with a 64 KiB message, delivery, QUIT. Runs the real `helo` checks.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use heloguard::dns::{Lookup, ReverseFacts};
use heloguard::helo::policy::{HeloPolicy, RejectAt};
use heloguard::protocol::data::BareLineFeed;
use heloguard::session::{
    DeliveryMode, DeliveryOutcome, Event, Now, Output, Session, SessionAction, SessionParams,
    SessionSettings,
};

fn settings() -> SessionSettings {
    SessionSettings {
        hostname: "mx.bench".into(),
        domains: vec!["example.com".into()],
        max_message_size: 26_214_400,
        max_recipients: 100,
        min_data_rate: 500,
        max_errors: 20,
        max_junk: 100,
        helo_policy: HeloPolicy::default(),
        helo_allow: Vec::new(),
        reject_at: RejectAt::Rcpt,
        bare_line_feed: BareLineFeed::Normalize,
        delivery: DeliveryMode::Maildir,
        sender_checks: Default::default(),
    }
}

fn dialogue() -> Vec<u8> {
    let mut d = b"EHLO client.example.org\r\nMAIL FROM:<s@example.org>\r\n\
RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubject: bench\r\n\r\n"
        .to_vec();
    for _ in 0..840 {
        d.extend_from_slice(&[b'y'; 76]);
        d.extend_from_slice(b"\r\n");
    }
    d.extend_from_slice(b".\r\nQUIT\r\n");
    d
}

/// Plays the loop: offers input, answers the DNS and delivery requests, until closed.
fn run(params: &SessionParams, input: &[u8], now: Now) -> usize {
    let mut session = Session::new(params.clone());
    let mut out = Output::default();
    session.handle(Event::Greet, now, &mut out);
    session.handle(
        Event::Reverse(ReverseFacts {
            ptr: Lookup::NxDomain,
        }),
        now,
        &mut out,
    );
    let mut pos = 0;
    let mut sent = 0;
    while !session.is_closed() {
        let mut out = Output::default();
        if session.wants_input() {
            session.handle(Event::Input(&input[pos..]), now, &mut out);
            pos += out.consumed;
        }
        sent += out.bytes.len();
        let actions = std::mem::take(&mut out.actions);
        if actions.is_empty() && out.consumed == 0 {
            break;
        }
        for action in actions {
            let mut more = Output::default();
            match action {
                SessionAction::HeloAccepted {
                    lookup: Some(name), ..
                } => {
                    let addrs = Lookup::Found(vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]);
                    session.handle(Event::Forward { name, addrs }, now, &mut more);
                }
                SessionAction::Deliver(envelope) => {
                    black_box(envelope.content.len());
                    session.handle(Event::Delivered(DeliveryOutcome::Accepted), now, &mut more);
                }
                _ => {}
            }
            sent += more.bytes.len();
        }
    }
    sent
}

fn whole_dialogue(c: &mut Criterion) {
    let params = SessionParams {
        settings: Arc::new(settings()),
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        session_id: 1,
        tls_available: false,
        spill: Some(Arc::new(heloguard::message::content::MemorySpillStore)),
    };
    let input = dialogue();
    let now = Now {
        mono: Instant::now(),
        wall: SystemTime::now(),
    };
    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("dialogue_64KiB_message", |b| {
        b.iter(|| black_box(run(&params, black_box(&input), now)))
    });
    group.finish();
}

criterion_group!(benches, whole_dialogue);
criterion_main!(benches);
