//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod certs;
pub mod dns_server;
pub mod server;
