//! The EHLO/HELO identities of a session and their verdicts (SPEC "HELO checks").
//!
//! An EHLO/HELO that passes the syntax gate becomes an `Identity`; its DNS facts arrive as
//! events (`Reverse`, `Forward`, `VerdictDeadline`), and it is judged once they are in or
//! due. With REJECT_AT=helo and a policy that can refuse, the identity waits as the
//! candidate and its EHLO/HELO is answered by the verdict; otherwise it is adopted at once and
//! the verdict is needed only by RCPT (when the policy can refuse) and the trace fields.

use std::net::IpAddr;

use crate::dns::{Lookup, ReverseFacts};
use crate::helo::checks::{CheckInput, HeloArg, name_key};
use crate::helo::policy::{RejectAt, syntax_refusal};
use crate::helo::verdict::{Decision, HeloVerdict};
use crate::helo::{Action, Check, CheckResult};
use crate::protocol::command::Verb;
use crate::protocol::reply::Reply;
use crate::session::machine::{Session, Subject};
use crate::session::sender::SenderAsks;
use crate::session::state::{Asked, Identity, Park};
use crate::session::{Observation, Output, SessionAction, Stage};

/// Refused identities remembered per session (REJECT_AT=helo), so a repeat gets the same answer.
const REMEMBERED_REFUSALS: usize = 16;

/// The EHLO/HELO argument as text: valid UTF-8 is kept, and each octet of an invalid sequence
/// becomes one `?`, so headers show one `?` per octet (SPEC) and never a 3-octet U+FFFD.
fn helo_text(arg: &[u8]) -> String {
    let mut text = String::with_capacity(arg.len());
    for chunk in arg.utf8_chunks() {
        text.push_str(chunk.valid());
        text.extend(std::iter::repeat_n('?', chunk.invalid().len()));
    }
    text
}

impl Session {
    /// PTR of the client and forward confirmation of its names (once per session).
    pub(super) fn on_reverse(&mut self, facts: ReverseFacts, out: &mut Output) {
        if self.reverse.is_none() {
            self.reverse = Some(facts);
        }
        self.evaluate(out);
    }

    /// A/AAAA of a name: every identity that asked for it takes it.
    pub(super) fn on_forward(&mut self, name: &str, addrs: Lookup<Vec<IpAddr>>, out: &mut Output) {
        for identity in [self.candidate.as_mut(), self.current.as_mut()]
            .into_iter()
            .flatten()
        {
            let wanted = identity
                .lookup_name()
                .is_some_and(|n| n.eq_ignore_ascii_case(name));
            if wanted && identity.forward.is_none() {
                identity.forward = Some(addrs.clone());
            }
        }
        self.evaluate(out);
    }

    /// The verdict of `generation` is due: judge with what is known.
    pub(super) fn on_verdict_deadline(&mut self, generation: u32, out: &mut Output) {
        for identity in [self.candidate.as_mut(), self.current.as_mut()]
            .into_iter()
            .flatten()
        {
            if identity.generation == generation {
                identity.deadline_passed = true;
            }
        }
        self.evaluate(out);
    }

    pub(super) fn on_helo(&mut self, verb: Verb, arg: &[u8], out: &mut Output) {
        let arg = helo_text(arg);
        self.helo_sent = Some(arg.clone());
        // SPEC: a refused identity stays refused when repeated, or sent with the other verb
        // (names compare case-insensitively and without a trailing dot).
        let key = name_key(&arg);
        if let Some((_, reply)) = self.refused.iter().find(|(refused, _)| *refused == key) {
            let reply = reply.clone();
            out.observations
                .push(Observation::MessageRejected(Stage::Helo));
            self.refuse(out, Stage::Helo, Subject::Helo(&arg), reply);
            return;
        }
        let parsed = (self.judge.parse)(&arg);
        let settings = &self.params.settings;
        if parsed == HeloArg::Invalid && settings.helo_policy.rejects_bad_syntax() {
            // RFC 5321 4.1.4: a refused EHLO leaves the session as it was.
            let reply = syntax_refusal(&arg);
            self.refuse(out, Stage::Helo, Subject::Helo(&arg), reply);
            return;
        }
        let before_tls = self.before_tls.take();
        let kept = [self.current.as_ref(), before_tls.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|old| decided_verdict_of(old, &key));
        if let Some(kept) = kept {
            // SPEC "Logs": the same name, judged without a temperror, would be judged the
            // same: one verdict (and one count) per identity, however often it is repeated.
            let mut identity = Identity::new(verb, arg, parsed, kept.generation, false);
            identity.forward = kept.forward;
            identity.verdict = Some(kept.verdict);
            self.adopt(identity, out);
        } else {
            self.generation = self.generation.wrapping_add(1);
            let needs_forward = [Check::Localhost, Check::Forward, Check::ForwardMatch]
                .into_iter()
                .any(|check| settings.helo_policy.action(check) != Action::Off);
            let asks = SenderAsks::for_identity(settings, self.params.client_ip, &parsed, &arg);
            let mut identity = Identity::new(verb, arg, parsed, self.generation, needs_forward);
            identity.spf = Asked::for_name(asks.spf.as_ref());
            identity.rhsbl = Asked::for_name(asks.rhsbl.as_ref());
            identity.churn = Asked::for_name(asks.churn.as_ref());
            out.actions.push(SessionAction::HeloAccepted {
                generation: self.generation,
                lookup: identity.lookup_name().map(str::to_string),
                spf: asks.spf,
                rhsbl: asks.rhsbl,
                churn: asks.churn,
            });
            if settings.reject_at == RejectAt::Helo && self.policy_can_refuse {
                self.candidate = Some(identity);
                self.park = Some(Park::HeloVerdict);
            } else {
                self.adopt(identity, out);
            }
        }
        // An identity replaced within this batch of pipelined commands needs neither its
        // lookup nor its deadline: only those of the identities still held go to the loop.
        let live =
            [self.current.as_ref(), self.candidate.as_ref()].map(|id| id.map(|i| i.generation));
        out.actions.retain(|action| match action {
            SessionAction::HeloAccepted { generation, .. } => live.contains(&Some(*generation)),
            _ => true,
        });
        self.evaluate(out);
    }

    /// The identity is accepted: it replaces the old one and resets the transaction.
    pub(super) fn adopt(&mut self, identity: Identity, out: &mut Output) {
        let settings = &self.params.settings;
        let reply = if identity.verb == Verb::Ehlo {
            let mut lines = vec![
                settings.hostname.clone(),
                "PIPELINING".to_string(),
                format!("SIZE {}", settings.max_message_size),
                "8BITMIME".to_string(),
                "ENHANCEDSTATUSCODES".to_string(),
                "SMTPUTF8".to_string(),
                "CHUNKING".to_string(),
            ];
            if self.params.tls_available && self.tls.is_none() {
                lines.push("STARTTLS".to_string());
            }
            Reply { code: 250, lines }
        } else {
            Reply::plain(250, &settings.hostname)
        };
        self.current = Some(identity);
        self.drop_transaction(out);
        self.reply(out, reply);
    }

    /// Judges every identity whose facts are in, then resumes what waited for a verdict.
    pub(super) fn evaluate(&mut self, out: &mut Output) {
        let reverse = self.reverse.as_ref();
        let settings = &self.params.settings;
        let dnsbl_waiting = self.dnsbl_expected && self.dnsbl.is_none();
        let spf_decides = settings.helo_policy.action(Check::Spf) >= Action::Greylist;
        for identity in [self.candidate.as_mut(), self.current.as_mut()]
            .into_iter()
            .flatten()
        {
            if identity.verdict.is_some()
                || !identity.ready_to_judge(reverse.is_some(), dnsbl_waiting, spf_decides)
            {
                continue;
            }
            let sender = identity.sender_facts(self.dnsbl.as_ref());
            let input = CheckInput {
                client_ip: self.params.client_ip,
                helo: &identity.arg,
                hostname: &settings.hostname,
                domains: &settings.domains,
            };
            let verdict = (self.judge.decide)(
                &input,
                identity.forward.as_ref(),
                reverse,
                &sender,
                &settings.helo_policy,
                &settings.helo_allow,
            );
            out.observations.push(Observation::Verdict {
                verdict: Box::new(verdict.clone()),
                helo: identity.arg.clone(),
            });
            identity.verdict = Some(verdict);
        }
        self.resume(out);
    }
}

/// What an identity's verdict is built from, when it was decided (no `temperror` in it) and
/// the identity has the name `key`.
fn decided_verdict_of(identity: &Identity, key: &str) -> Option<KeptVerdict> {
    let verdict = identity.verdict.as_ref()?;
    let undecided = verdict.measured.contains(&CheckResult::TempError)
        || verdict.shown.contains(&CheckResult::TempError);
    if undecided || name_key(&identity.arg) != key {
        return None;
    }
    Some(KeptVerdict {
        generation: identity.generation,
        forward: identity.forward.clone(),
        verdict: verdict.clone(),
    })
}

/// The parts of a judged identity that a repeat of its name keeps.
struct KeptVerdict {
    generation: u32,
    forward: Option<Lookup<Vec<IpAddr>>>,
    verdict: HeloVerdict,
}

impl Session {
    pub(super) fn current_decision(&self) -> Option<Decision> {
        let verdict = self.current.as_ref()?.verdict.as_ref()?;
        Some(verdict.decision.clone())
    }

    /// REJECT_AT=helo: answers the candidate's EHLO/HELO once its verdict is in.
    pub(super) fn resume_helo(&mut self, out: &mut Output) {
        let decision = self
            .candidate
            .as_ref()
            .and_then(|id| id.verdict.as_ref())
            .map(|v| v.decision.clone());
        match (decision, self.candidate.take()) {
            // Greylisting is answered at each RCPT, not at the EHLO/HELO.
            (Some(Decision::Accept | Decision::Greylist), Some(identity)) => {
                self.adopt(identity, out)
            }
            (Some(Decision::Refuse(reply)), Some(identity)) => {
                // A policy refusal sticks to the identity (sending it again, or with
                // the other verb, must not get through). A 451 for undecided DNS is
                // not a judgement: the next try runs the checks again.
                if reply.code != 451 {
                    if self.refused.len() == REMEMBERED_REFUSALS {
                        self.refused.remove(0);
                    }
                    self.refused.push((name_key(&identity.arg), reply.clone()));
                }
                out.observations
                    .push(Observation::MessageRejected(Stage::Helo));
                self.refuse(out, Stage::Helo, Subject::Helo(&identity.arg), reply);
            }
            (_, candidate) => {
                self.candidate = candidate;
                self.park = Some(Park::HeloVerdict);
            }
        }
    }
}
