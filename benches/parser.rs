//! Line and DATA scanning throughput (criterion, `Throughput::Bytes`).
//!
//! The DATA decoder's target is at least 2 GB/s on typical mail (78-octet lines, a few
//! stuffed periods); the command parser is measured over a pipelined transaction.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use heloguard::protocol::command::Command;
use heloguard::protocol::data::{BareLineFeed, DataDecoder, DataLimits, Framing};
use heloguard::protocol::line::{LineRead, LineReader};

/// About 1 MiB of 76-character lines with a stuffed period now and then, then the end marker.
fn message() -> Vec<u8> {
    let mut m = b"Subject: bench\r\nReceived: from a by b\r\n\r\n".to_vec();
    let line = [b'x'; 76];
    for i in 0..14_000 {
        if i % 50 == 0 {
            m.extend_from_slice(b"..");
        }
        m.extend_from_slice(&line);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn data(c: &mut Criterion) {
    let input = message();
    let limits = DataLimits {
        max_message_size: 0,
        bare_line_feed: BareLineFeed::Normalize,
    };
    let mut group = c.benchmark_group("data");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("dot_decoder_1MiB", |b| {
        b.iter(|| {
            let mut d = DataDecoder::new(Framing::Dot, limits);
            let feed = d.feed(black_box(&input));
            assert!(feed.complete);
            black_box(d.finish().map(|c| c.len()))
        })
    });
    group.bench_function("dot_decoder_1MiB_in_16KiB_reads", |b| {
        b.iter(|| {
            let mut d = DataDecoder::new(Framing::Dot, limits);
            for chunk in input.chunks(16 * 1024) {
                black_box(d.feed(chunk));
            }
            black_box(d.finish().map(|c| c.len()))
        })
    });
    group.finish();
}

fn lines(c: &mut Criterion) {
    let one = b"EHLO client.example\r\nMAIL FROM:<sender@example.org> SIZE=1000 BODY=8BITMIME\r\n\
RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nNOOP\r\nRSET\r\n";
    let input = one.repeat(1000);
    let mut group = c.benchmark_group("commands");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("line_reader", |b| {
        b.iter(|| {
            let mut reader = LineReader::new();
            let mut pos = 0;
            let mut count = 0;
            while let LineRead::Line { line, consumed } = reader.read(&input[pos..]) {
                black_box(line);
                pos += consumed;
                count += 1;
            }
            count
        })
    });
    group.bench_function("line_reader_and_parser", |b| {
        b.iter(|| {
            let mut reader = LineReader::new();
            let mut pos = 0;
            let mut ok = 0;
            while let LineRead::Line { line, consumed } = reader.read(&input[pos..]) {
                ok += usize::from(Command::parse(black_box(line)).is_ok());
                pos += consumed;
            }
            ok
        })
    });
    group.finish();
}

criterion_group!(benches, data, lines);
criterion_main!(benches);
