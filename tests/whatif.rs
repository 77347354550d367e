//! `heloguard whatif` end to end: the real binary on a log written in SPEC's "Logs" format,
//! from files and from stdin, with env_logger, journald and `journalctl -o cat` prefixes.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const ALL_PASS: [&str; 15] = [
    "syntax",
    "bare_ip",
    "fqdn",
    "localhost",
    "own_name",
    "literal_match",
    "forward",
    "forward_match",
    "fcrdns",
    "rdns_match",
    "dynamic",
    "spf",
    "rhsbl",
    "dnsbl",
    "helo_churn",
];

fn results(failing: &[(&str, &str)]) -> String {
    ALL_PASS
        .iter()
        .map(|c| {
            let r = failing
                .iter()
                .find(|(n, _)| n == c)
                .map_or("pass", |(_, r)| r);
            format!("{c}:{r}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Eight sessions; the comments say what each becomes under `POLICY`.
fn log_text() -> String {
    let lines = [
        // 1: fqdn fails, was tagged -> reject (fqdn alone), newly.
        format!(
            "[2026-12-07T02:00:00.001Z INFO  heloguard::server] helo verdict sid=1a ip=192.0.2.1 \
             helo=box ptr=none verdict=fail action=tag results={} dnsbl_score=0 dns_ms=4",
            results(&[("fqdn", "fail")])
        ),
        // 2: clean under both.
        format!(
            "<6>helo verdict sid=2b ip=192.0.2.2 helo=mail.example.org ptr=mail.example.org \
             verdict=pass action=none results={} dnsbl_score=0 dns_ms=3",
            results(&[])
        ),
        // 3: dynamic fails -> greylist, newly; journald short prefix.
        format!(
            "Dec 07 02:00:01 mx heloguard[77]: helo verdict sid=3c ip=2001:db8:5:6::9 \
             helo=dyn-1-2-3-4.example.net ptr=none verdict=fail action=tag results={} \
             dnsbl_score=0 dns_ms=9",
            results(&[("dynamic", "fail")])
        ),
        // 4: localhost temperror -> defer (451 4.4.3), newly; `journalctl -o cat` form.
        format!(
            "helo verdict sid=4d ip=192.0.2.77 helo=\"some name\" ptr=none verdict=temperror \
             action=none results={} dnsbl_score=0 dns_ms=4000",
            results(&[("localhost", "temperror")])
        ),
        // 5: a HELO that tries to forge a field and a second line -> pass.
        format!(
            "helo verdict sid=5e ip=198.51.100.3 \
             helo=\"x verdict=fail action=reject\\x0ahelo verdict sid=99 ip=192.0.2.200 helo=y \
             action=none results=fqdn:fail\" ptr=none verdict=pass action=none results={} \
             dnsbl_score=0 dns_ms=2",
            results(&[])
        ),
        // 6: first a fail, then an EHLO with a good name: the last line counts -> pass.
        format!(
            "helo verdict sid=6f ip=192.0.2.6 helo=box6 ptr=none verdict=fail action=tag \
             results={} dnsbl_score=0 dns_ms=2",
            results(&[("fqdn", "fail")])
        ),
        format!(
            "helo verdict sid=6f ip=192.0.2.6 helo=mx6.example.com ptr=none verdict=pass \
             action=none results={} dnsbl_score=0 dns_ms=2",
            results(&[])
        ),
        // 7: dnsbl score 3, was rejected by dnsbl -> tag under default=tag (threshold 1).
        format!(
            "helo verdict sid=7g ip=203.0.113.5 helo=listed.example.com ptr=none verdict=fail \
             action=reject results={} dnsbl_score=3 dns_ms=20",
            results(&[("dnsbl", "fail")])
        ),
        // 8: fqdn and dynamic fail -> reject, turned away by two checks (no `alone`).
        format!(
            "helo verdict sid=8h ip=192.0.2.8 helo=BOX. ptr=none verdict=fail action=tag \
             results={} dnsbl_score=0 dns_ms=2",
            results(&[("fqdn", "fail"), ("dynamic", "fail")])
        ),
        "connect sid=9i ip=192.0.2.9 port=5000 listener=plain".to_string(),
        "session end sid=1a ip=192.0.2.1 helo=box verdict=fail messages=0 bytes=0".to_string(),
    ];
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

const POLICY: &str = "fqdn=reject,dynamic=greylist,localhost=defer";

fn expected() -> String {
    let mut text = String::from(
        "sessions 8\npass 3 was 4\ntag 1 was 3\ngreylist 1 was 0\ndefer 1 was 0\n\
         reject 2 was 1\n",
    );
    for check in ALL_PASS {
        let alone = match check {
            "fqdn" | "dynamic" | "localhost" => 1,
            _ => 0,
        };
        text.push_str(&format!("check {check} alone {alone}\n"));
    }
    text.push_str(
        "helo box 2\nhelo dyn-1-2-3-4.example.net 1\nhelo \"some name\" 1\n\
         network 192.0.2.0/24 3\nnetwork 2001:db8:5:6::/64 1\n",
    );
    text
}

fn temp_log() -> PathBuf {
    let path = std::env::temp_dir().join(format!("heloguard-whatif-{}.log", std::process::id()));
    std::fs::write(&path, log_text()).expect("write the log");
    path
}

fn whatif(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_heloguard"))
        .arg("whatif")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run heloguard whatif");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("feed stdin");
    drop(input);
    child.wait_with_output().expect("wait for heloguard whatif")
}

#[test]
fn a_file_replays_to_the_exact_report() {
    let log = temp_log();
    let out = whatif(&["--policy", POLICY, log.to_str().expect("path")], None);
    let _ = std::fs::remove_file(&log);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected());
}

#[test]
fn stdin_gives_the_same_report() {
    let out = whatif(&["--policy", POLICY, "-"], Some(&log_text()));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected());
}

#[test]
fn the_dnsbl_threshold_redecides_listed_clients() {
    let out = whatif(
        &[
            "--policy",
            "default=log,dnsbl=reject",
            "--dnsbl-threshold",
            "4",
            "-",
        ],
        Some(&log_text()),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\npass 8 was 4\n"), "{text}");
    assert!(text.contains("\nreject 0 was 1\n"), "{text}");
    let out = whatif(
        &[
            "--policy",
            "default=log,dnsbl=reject",
            "--dnsbl-threshold",
            "3",
            "-",
        ],
        Some(&log_text()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\nreject 1 was 1\n"), "{text}");
    assert!(text.contains("\ncheck dnsbl alone 1\n"), "{text}");
}

#[test]
fn a_bad_policy_or_unreadable_file_exits_2() {
    let out = whatif(&["--policy", "fqdn=sometimes", "-"], Some(""));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sometimes"));
    let out = whatif(
        &["--policy", "fqdn=reject", "/nonexistent/heloguard.log"],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/heloguard.log"));
    assert!(out.stdout.is_empty());
}
