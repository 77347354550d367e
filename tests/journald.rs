//! Under systemd the log goes to the journal: when JOURNAL_STREAM names the server's stderr,
//! every line carries its sd-daemon priority and no timestamp; otherwise the usual format.
//! A RUST_LOG that would hide every line is reported and `info` is used instead.

mod common;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::server::{ReadySocket, TempDir, pass_listeners};

/// Runs the server until READY=1, stops it with SIGTERM and returns what it wrote to stderr,
/// which is a file whose `dev:inode` is given as JOURNAL_STREAM when `journal` is set.
fn run(journal: bool, rust_log: &str) -> String {
    let dir = TempDir::new("journald");
    let err_path = dir.path().join("stderr");
    let err = File::create(&err_path).expect("create stderr file");
    let meta = err.metadata().expect("stat stderr file");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let ready = ReadySocket::new(dir.path());

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_heloguard"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", rust_log)
        .env("HELOGUARD_LISTEN", addr.to_string())
        .env("HELOGUARD_HOSTNAME", "mx.heloguard.test")
        .env("HELOGUARD_SPOOL", dir.path().join("Maildir"))
        .env("HELOGUARD_MIN_FREE_MB", "0")
        .env("HELOGUARD_DNS", "127.0.0.1:9")
        .env("NOTIFY_SOCKET", ready.path());
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    pass_listeners(&mut cmd, &[&listener]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err));
    let mut child = cmd.spawn().expect("spawn heloguard");
    drop(listener);
    let started = ready.wait(&mut child, Duration::from_secs(30));
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().expect("wait for heloguard");
    let text = std::fs::read_to_string(&err_path).expect("read stderr file");
    assert!(started.is_ok(), "{started:?}: {text}");
    assert_eq!(status.code(), Some(0), "{text}");
    text
}

#[test]
fn lines_to_the_journal_carry_their_priority_and_no_timestamp() {
    let text = run(true, "info");
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let priority = line
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .map(|(p, _)| p);
        assert!(
            matches!(priority, Some("3" | "4" | "6" | "7")),
            "no priority prefix: {line}"
        );
        assert!(!line.contains("T0") && !line.starts_with('['), "{line}");
    }
    // HELOGUARD_DOMAINS empty is warned about at startup: a warning, priority 4.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("HELOGUARD_DOMAINS")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("configuration")),
        "{text}"
    );
}

#[test]
fn another_stderr_keeps_the_usual_format() {
    let text = run(false, "info");
    assert!(text.lines().all(|l| l.starts_with('[')), "{text}");
    assert!(!text.contains("<6>"), "{text}");
}

#[test]
fn a_rust_log_that_would_hide_everything_is_reported_and_info_is_used() {
    let text = run(true, "verbose");
    assert!(
        text.lines()
            .any(|l| l.starts_with("<4>") && l.contains("RUST_LOG")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("<6>")), "{text}");
}
