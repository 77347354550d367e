//! contrib/: the Grafana dashboard is valid JSON whose queries use only SPEC's metrics, the
//! Prometheus alert rules load and pass their unit tests, and the exposition passes promtool.
//! Without promtool the promtool parts skip with a reason, except under CI=true, where they
//! fail: CI installs it (.ci/run).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The metric names of SPEC's "Metrics" table (a histogram also has its `_bucket`, `_sum` and
/// `_count` series).
const SPEC_METRICS: [&str; 19] = [
    "heloguard_connections_total",
    "heloguard_connections_refused_total",
    "heloguard_sessions_active",
    "heloguard_messages_accepted_total",
    "heloguard_messages_rejected_total",
    "heloguard_helo_checks_total",
    "heloguard_helo_verdicts_total",
    "heloguard_dns_queries_total",
    "heloguard_dns_seconds",
    "heloguard_replies_total",
    "heloguard_tls_handshakes_total",
    "heloguard_relay_failures_total",
    "heloguard_dnsbl_listings_total",
    "heloguard_greylist_total",
    "heloguard_state_errors_total",
    "heloguard_build_info",
    "heloguard_panics_total",
    "heloguard_spool_errors_total",
    "heloguard_spool_bytes_total",
];

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether promtool runs here; without it, a skip (or a failure under CI=true).
fn promtool_available() -> bool {
    let works = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        assert!(
            !in_ci(),
            "promtool is required under CI=true (apt-get install prometheus)"
        );
        println!("skipped: promtool is not installed (apt-get install prometheus)");
    }
    works
}

/// Every `expr` string anywhere in the dashboard.
fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `heloguard_...` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("heloguard_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn in_spec(name: &str) -> bool {
    SPEC_METRICS.contains(&name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| base == "heloguard_dns_seconds")
        })
}

#[test]
fn the_dashboard_is_grafana_json_over_specs_metrics() {
    let text = std::fs::read_to_string(contrib("grafana/heloguard.json")).expect("read");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dashboard["title"], "heloguard");
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in panels {
        assert!(
            panel["title"].is_string() && panel["gridPos"].is_object(),
            "{panel}"
        );
        assert!(!panel["targets"].as_array().expect("targets").is_empty());
    }
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let used: Vec<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    let unknown: Vec<&String> = used.iter().filter(|n| !in_spec(n)).collect();
    assert!(unknown.is_empty(), "not in SPEC's table: {unknown:?}");
    for wanted in [
        "heloguard_sessions_active",
        "heloguard_helo_verdicts_total",
        "heloguard_helo_checks_total",
        "heloguard_dns_seconds_bucket",
        "heloguard_dns_queries_total",
        "heloguard_replies_total",
        "heloguard_relay_failures_total",
        "heloguard_greylist_total",
    ] {
        assert!(
            used.iter().any(|n| n == wanted),
            "the dashboard lacks {wanted}"
        );
    }
    assert!(
        all.iter()
            .any(|e| e.contains("histogram_quantile") && e.contains("heloguard_dns_seconds_bucket"))
    );
}

#[test]
fn the_alert_rules_use_specs_metrics() {
    let text =
        std::fs::read_to_string(contrib("prometheus/heloguard-alerts.yml")).expect("read rules");
    let used: Vec<String> = text
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("expr:") || l.contains("rate(") || l.contains("increase(")
        })
        .flat_map(metric_names)
        .collect();
    assert!(!used.is_empty());
    let unknown: Vec<&String> = used.iter().filter(|n| !in_spec(n)).collect();
    assert!(unknown.is_empty(), "not in SPEC's table: {unknown:?}");
}

#[test]
fn promtool_checks_and_tests_the_alert_rules() {
    if !promtool_available() {
        return;
    }
    let dir = contrib("prometheus");
    for args in [
        ["check", "rules", "heloguard-alerts.yml"],
        ["test", "rules", "heloguard-alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn promtool_accepts_the_exposition() {
    if !promtool_available() {
        return;
    }
    let metrics = heloguard::metrics::Metrics::new();
    metrics.reply(250);
    metrics.spool_bytes(10);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(metrics.render().as_bytes())
            .expect("feed promtool");
    }
    let out = child.wait_with_output().expect("wait for promtool");
    // promtool exits 0 when the text parses; lint remarks (if any) are printed but allowed
    // only when they are not errors.
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
