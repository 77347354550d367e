//! The sender checks' side of the session (SPEC "Sender reputation, SPF and HELO history" and
//! "Greylisting and shared state"): which lookups an identity asks for, their answers, and
//! greylisting at RCPT.
//!
//! The session asks for nothing it will not wait for, and waits for nothing it did not ask
//! for: every `Asked::Waiting` is answered by exactly one event carrying the same name (the
//! resolver and the state thread answer even when they cannot work: lists as not listing, the
//! store as unavailable, SPF as temperror).

use std::net::IpAddr;
use std::time::Duration;

use crate::greylist::{GreylistClient, GreylistOutcome, Triplet};
use crate::helo::checks::{HeloArg, name_key, registered_domain};
use crate::helo::sender::{ChurnOutcome, DnsblOutcome, RhsblOutcome, SpfOutcome};
use crate::helo::verdict::HeloVerdict;
use crate::helo::{Action, Check, CheckResult};
use crate::net::{canonical_ip, is_local};
use crate::protocol::reply::Reply;
use crate::session::machine::{Session, Subject};
use crate::session::state::{Identity, Park};
use crate::session::{Observation, Output, SessionAction, SessionSettings, Stage};

/// The sender lookups a new identity asks for.
pub(crate) struct SenderAsks {
    pub spf: Option<String>,
    pub rhsbl: Option<String>,
    pub churn: Option<String>,
}

impl SenderAsks {
    pub(crate) fn for_identity(
        settings: &SessionSettings,
        client_ip: IpAddr,
        arg: &HeloArg,
        sent: &str,
    ) -> Self {
        let policy = &settings.helo_policy;
        let on = |check: Check| policy.action(check) != Action::Off;
        if is_local(canonical_ip(client_ip)) {
            return Self {
                spf: None,
                rhsbl: None,
                churn: None,
            };
        }
        // RFC 7208 2.3: only a fully-qualified domain name is checked.
        let spf = match arg {
            HeloArg::Domain(name)
                if on(Check::Spf) && crate::helo::checks::fqdn(arg) == CheckResult::Pass =>
            {
                Some(name.clone())
            }
            _ => None,
        };
        let key = name_key(sent);
        let rhsbl = (settings.sender_checks.rhsbl && on(Check::Rhsbl)).then(|| key.clone());
        let churn = (settings.sender_checks.helo_churn && on(Check::HeloChurn)).then_some(key);
        Self { spf, rhsbl, churn }
    }
}

impl Session {
    pub(super) fn on_dnsbl(&mut self, outcome: DnsblOutcome, out: &mut Output) {
        if self.dnsbl_expected && self.dnsbl.is_none() {
            self.dnsbl = Some(outcome);
        }
        self.evaluate(out);
    }

    pub(super) fn on_spf(&mut self, name: &str, outcome: SpfOutcome, out: &mut Output) {
        for identity in self.identities_mut() {
            identity.spf.take(name, outcome.clone());
        }
        self.evaluate(out);
    }

    pub(super) fn on_rhsbl(&mut self, name: &str, outcome: RhsblOutcome, out: &mut Output) {
        for identity in self.identities_mut() {
            identity.rhsbl.take(name, outcome.clone());
        }
        self.evaluate(out);
    }

    pub(super) fn on_churn(&mut self, name: &str, outcome: ChurnOutcome, out: &mut Output) {
        for identity in self.identities_mut() {
            identity.churn.take(name, outcome);
        }
        self.evaluate(out);
    }

    fn identities_mut(&mut self) -> impl Iterator<Item = &mut Identity> {
        [self.candidate.as_mut(), self.current.as_mut()]
            .into_iter()
            .flatten()
    }

    /// Greylisting at RCPT: `postmaster` passes; any other recipient waits for the store.
    pub(super) fn greylist_rcpt(&mut self, recipient: String, out: &mut Output) {
        let exempt = is_postmaster(&recipient, &self.params.settings.domains);
        let triplet = self
            .tx
            .as_ref()
            .zip(self.current.as_ref().and_then(|id| id.verdict.as_ref()))
            .map(|(tx, verdict)| Triplet {
                client: greylist_client(verdict, self.params.client_ip),
                sender: tx.reverse_path.to_ascii_lowercase(),
                recipient: recipient.to_ascii_lowercase(),
            });
        match triplet {
            Some(triplet) if !exempt => {
                out.actions.push(SessionAction::Greylist(triplet));
                self.park = Some(Park::Greylist { recipient });
            }
            _ => self.answer_rcpt(recipient, crate::helo::verdict::Decision::Accept, out),
        }
    }

    pub(super) fn on_greylist(&mut self, outcome: GreylistOutcome, out: &mut Output) {
        let Some(Park::Greylist { recipient }) = self.park.take() else {
            return;
        };
        out.observations.push(Observation::Greylisted(outcome));
        match outcome.retry_after() {
            Some(wait) => {
                let reply = greylist_reply(wait);
                out.observations
                    .push(Observation::MessageRejected(Stage::Rcpt));
                self.refuse(out, Stage::Rcpt, Subject::Rcpt(&recipient), reply);
                // SPEC HELOGUARD_MAX_ERRORS: greylisting's 451s count, so one session cannot
                // flood the store with triplets.
                self.count_error(out);
            }
            None => self.answer_rcpt(recipient, crate::helo::verdict::Decision::Accept, out),
        }
    }
}

/// `postmaster`, bare or at one of our domains (RFC 5321 4.5.1), is never greylisted.
fn is_postmaster(recipient: &str, domains: &[String]) -> bool {
    let (local, domain) = match recipient.rsplit_once('@') {
        Some((local, domain)) => (local, Some(domain)),
        None => (recipient, None),
    };
    local.eq_ignore_ascii_case("postmaster")
        && domain.is_none_or(|d| domains.contains(&name_key(d)))
}

/// SPEC: the registered domain of the forward-confirmed PTR name when there is one, else the
/// IPv4 /24 or IPv6 /64.
pub(crate) fn greylist_client(verdict: &HeloVerdict, client_ip: IpAddr) -> GreylistClient {
    if let Some(domain) = verdict.ptr.as_deref().and_then(registered_domain) {
        return GreylistClient::Domain(domain.to_ascii_lowercase());
    }
    GreylistClient::Network(match canonical_ip(client_ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::V4([a, b, c, 0].into())
        }
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    })
}

/// 451 4.7.1 saying when to retry, in the words greylisting servers use.
pub(crate) fn greylist_reply(wait: Duration) -> Reply {
    Reply::new(
        451,
        "4.7.1",
        &format!(
            "Greylisted, please try again in {} seconds",
            wait.as_secs().max(1)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postmaster_is_exempt_bare_or_at_our_domains_only() {
        let ours = vec!["example.org".to_string()];
        assert!(is_postmaster("postmaster", &ours));
        assert!(is_postmaster("PostMaster@Example.ORG", &ours));
        assert!(!is_postmaster("postmaster@elsewhere.test", &ours));
        assert!(!is_postmaster("postmistress@example.org", &ours));
    }

    #[test]
    fn the_retry_time_is_in_the_reply() {
        let reply = greylist_reply(Duration::from_secs(299));
        assert_eq!(reply.code, 451);
        assert!(reply.lines[0].starts_with("4.7.1 "), "{reply:?}");
        assert!(reply.lines[0].contains("299 seconds"), "{reply:?}");
    }
}
