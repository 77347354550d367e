//! SPF (RFC 7208) for the HELO identity: the `spf` check's evaluator.
//!
//! - `record`: a `v=spf1` record parsed into directives and modifiers (syntax only)
//! - `macros`: macro strings (RFC 7208 7), parsed with the record, expanded per evaluation
//! - `eval`: `check_host()` over the `SpfDns` trait, with RFC 7208's limits
//! - `hickory`: `SpfDns` over the resolver thread's hickory resolver, each query bounded and
//!   counted like the resolver's own, and `ptr` answered from the session's FCrDNS facts
//!
//! `check_helo` is the entry point; the caller bounds it with HELOGUARD_SPF_TIMEOUT_MS
//! (`out_of_time` is the outcome when that fires). Nothing here puts the `exp=` text anywhere.
//! On the resolver thread, one evaluation is one task:
//!
//! ```text
//! let spf_dns = HickorySpfDns::new(resolver.clone(), query_timeout, observer.clone())
//!     .with_reverse(client, reverse_facts); // when the session's FCrDNS is known
//! tasks.spawn(async move {
//!     let outcome = tokio::time::timeout(spf_timeout, check_helo(&spf_dns, client, &name, &host))
//!         .await
//!         .unwrap_or_else(|_| out_of_time(spf_timeout));
//!     (outcome, spf_dns.queries()) // the queries count toward HELOGUARD_DNS_BUDGET
//! });
//! ```

mod eval;
mod hickory;
mod macros;
mod record;
#[cfg(test)]
mod tests;

pub use eval::{
    MAX_DNS_TERMS, MAX_MX_NAMES, MAX_PTR_NAMES, MAX_VOID_LOOKUPS, SpfDns, check_helo, out_of_time,
    validate_by_lookup,
};
pub use hickory::HickorySpfDns;
