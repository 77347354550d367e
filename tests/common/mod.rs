//! Helpers shared by the integration tests; each test file takes what it needs.
#![allow(dead_code)]

pub mod certs;
pub mod dns_server;
pub mod lmtp;
pub mod server;
pub mod state;

/// Skips the calling test for want of `what` (a tool `.ci/run` installs), printing why; under
/// CI=true the tool must be there, so the test fails instead of counting as passed.
pub fn skip_without(what: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {what} cannot run here: {why}");
    }
    println!("skipped: {why}");
}
