//! The sender lookups the loop asks the resolver thread for (SPEC "Sender reputation, SPF and
//! HELO history"): the client's lists at accept, the HELO name's SPF and domain lists at
//! EHLO. A session waiting for them is parked like one waiting for its A/AAAA answer, and
//! holds no worker.

use std::net::IpAddr;
use std::time::Instant;

use crate::dns::{DnsAnswer, DnsRequest};
use crate::server::event_loop::Server;
use crate::server::worker::OwnedEvent;

impl Server {
    /// At accept: the client over HELOGUARD_DNSBL, from the known answers when DNS allows it.
    pub(super) fn ask_dnsbl(&mut self, slot: usize, client_ip: IpAddr, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let request = DnsRequest::Dnsbl {
            id: conn.id.raw(),
            ip: client_ip,
        };
        let Some(resolver) = &self.resolver else {
            if let Some(DnsAnswer::Dnsbl { outcome, .. }) = request.unavailable() {
                conn.pending.push(OwnedEvent::Dnsbl(outcome));
            }
            return;
        };
        match resolver.known_answers().dnsbl(client_ip, now) {
            Some(outcome) => conn.pending.push(OwnedEvent::Dnsbl(outcome)),
            None => conn.dns_work.ask(resolver, request),
        }
    }

    /// At EHLO: SPF of the name (`spf`) and the domain lists over the name key (`rhsbl`) and
    /// the client's confirmed PTR name. Past HELOGUARD_DNS_BUDGET the answers come at once,
    /// as the resolver's when it cannot work (SPF temperror, lists not listing).
    pub(super) fn ask_sender_lookups(
        &mut self,
        slot: usize,
        spf: Option<String>,
        rhsbl: Option<String>,
        now: Instant,
    ) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let (id, ip) = (conn.id.raw(), conn.client_ip);
        let over_budget = conn.dns_work.over_budget(self.config.dns_budget);
        let mut requests = Vec::with_capacity(2);
        if let Some(name) = spf {
            requests.push(DnsRequest::Spf { id, ip, name });
        }
        if let Some(name) = rhsbl {
            let known = self
                .resolver
                .as_ref()
                .and_then(|r| r.known_answers().rhsbl(&name, ip, now));
            match known {
                Some(outcome) => conn.pending.push(OwnedEvent::Rhsbl { name, outcome }),
                None => requests.push(DnsRequest::Rhsbl { id, name, ip }),
            }
        }
        for request in requests {
            match &self.resolver {
                Some(resolver) if !over_budget => conn.dns_work.ask(resolver, request),
                _ => {
                    if let Some(answer) = request.unavailable()
                        && let Some(event) = sender_event(answer)
                    {
                        conn.pending.push(event);
                    }
                }
            }
        }
    }
}

/// The session event for a sender lookup's answer (`None` for the other answers).
pub(super) fn sender_event(answer: DnsAnswer) -> Option<OwnedEvent> {
    match answer {
        DnsAnswer::Dnsbl { outcome, .. } => Some(OwnedEvent::Dnsbl(outcome)),
        DnsAnswer::Rhsbl { name, outcome, .. } => Some(OwnedEvent::Rhsbl { name, outcome }),
        DnsAnswer::Spf { name, outcome, .. } => Some(OwnedEvent::Spf { name, outcome }),
        DnsAnswer::Reverse { .. } | DnsAnswer::Forward { .. } => None,
    }
}
