//! Helpers shared by the integration tests; each test file takes what it needs.
#![allow(dead_code)]

pub mod certs;
pub mod dns_server;
pub mod lmtp;
pub mod server;
