//! Replays the fuzz corpus (tests/fuzz-corpus/{line,session,header,proxy}/*), crash cases included,
//! through the same invariant-checking drivers as the fuzz targets in fuzz/.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus in {}", dir.display());
    for file in &files {
        let data = std::fs::read(file).expect("read corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} broke an invariant", file.display());
    }
    println!("{target}: {} inputs replayed", files.len());
}

#[test]
fn line_corpus_keeps_every_invariant() {
    replay("line", heloguard::fuzzing::line_input);
}

#[test]
fn session_corpus_keeps_every_invariant() {
    replay("session", heloguard::fuzzing::session_input);
}

#[test]
fn header_corpus_keeps_every_invariant() {
    replay("header", heloguard::fuzzing::header_input);
}

#[test]
fn proxy_corpus_keeps_every_invariant() {
    replay("proxy", heloguard::fuzzing::proxy_input);
}
