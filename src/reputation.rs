//! What the resolver thread needs for the sender checks, taken from the configuration: the
//! lists, the SPF time limit, and the SPF evaluator. One place for the server and
//! `heloguard check`, so both judge a client the same way.

use std::sync::Arc;

use crate::config::Config;
use crate::dns::resolver::{ResolverSettings, SpfEvaluator, SpfQuery};
use crate::spf::{HickorySpfDns, check_helo};

/// The resolver settings of `config`, sender checks included, with `max_in_flight` lookups
/// at once.
pub fn resolver_settings(config: &Config, max_in_flight: usize) -> ResolverSettings {
    ResolverSettings {
        max_in_flight,
        lists: Arc::new(config.lists.clone()),
        spf_timeout: config.spf_timeout,
        spf: spf_evaluator(config),
        ..ResolverSettings::new(config.dns_servers.clone(), config.dns_timeout)
    }
}

/// The SPF evaluator for the HELO identity, with HELOGUARD_HOSTNAME as the receiving host
/// (RFC 7208 7.3 `%{r}`).
fn spf_evaluator(config: &Config) -> Option<SpfEvaluator> {
    let receiver: Arc<str> = Arc::from(config.hostname.as_str());
    Some(SpfEvaluator::new(move |query: SpfQuery| {
        let receiver = receiver.clone();
        async move {
            let mut dns = HickorySpfDns::new(query.resolver, query.query_timeout, query.observer);
            if let Some(facts) = query.reverse {
                dns = dns.with_reverse(query.ip, facts);
            }
            check_helo(&dns, query.ip, &query.name, &receiver).await
        }
    }))
}
