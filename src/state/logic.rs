//! The two decisions the state store makes, as pure functions over what it holds: the
//! greylist decision for one triplet and the HELO history of one client. The embedded store
//! calls them directly; the Redis store's Lua scripts (`redis.rs`) follow them step by step, so
//! that both stores answer alike. Times are milliseconds since the Unix epoch: they outlive a
//! restart (the saved file) and are shared between instances (Redis).

use std::net::IpAddr;

use crate::greylist::{GreylistClient, GreylistOutcome, GreylistTimes, Triplet};
use crate::net::canonical_ip;

/// The sliding window of helo_churn (SPEC: "within the last hour").
pub(crate) const CHURN_WINDOW_MS: u64 = 3_600_000;

/// Names kept per client at most: the count only needs to go past HELOGUARD_HELO_CHURN, and a
/// client cycling through names must not grow its history without bound.
pub(crate) const CHURN_NAMES_KEPT: usize = 1024;

/// What the store keeps for one triplet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GreyRecord {
    /// When the triplet was first seen (the start of its delay).
    pub first_seen: u64,
    /// A retry came after the delay and within the retry window.
    pub passed: bool,
    /// The last time a passed triplet was used (the start of its pass period).
    pub last_use: u64,
}

/// One greylist decision: the answer, and what to keep for how long (`None`: keep the record
/// and its expiry as they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GreyStep {
    pub outcome: GreylistOutcome,
    pub keep: Option<(GreyRecord, u64)>,
}

/// SPEC "Greylisting and shared state": first sight → New; a retry before the delay → Early;
/// a retry after the delay and within RETRY of the first sight → Passed; then Known while it
/// is used within PASS of its last use. A record past its window starts over as New.
pub(crate) fn greylist_step(
    record: Option<GreyRecord>,
    now: u64,
    times: &GreylistTimes,
) -> GreyStep {
    let delay = millis(times.delay);
    let retry = millis(times.retry);
    let pass = millis(times.pass);
    let passed_now = |first_seen| GreyRecord {
        first_seen,
        passed: true,
        last_use: now,
    };
    match record {
        Some(r) if r.passed && now.saturating_sub(r.last_use) <= pass => GreyStep {
            outcome: GreylistOutcome::Known,
            keep: Some((passed_now(r.first_seen), pass)),
        },
        Some(r) if !r.passed => {
            let elapsed = now.saturating_sub(r.first_seen);
            if elapsed < delay {
                GreyStep {
                    outcome: GreylistOutcome::Early {
                        retry_after: std::time::Duration::from_millis(delay - elapsed),
                    },
                    keep: None,
                }
            } else if elapsed <= retry {
                GreyStep {
                    outcome: GreylistOutcome::Passed,
                    keep: Some((passed_now(r.first_seen), pass)),
                }
            } else {
                first_sight(now, times)
            }
        }
        _ => first_sight(now, times),
    }
}

fn first_sight(now: u64, times: &GreylistTimes) -> GreyStep {
    GreyStep {
        outcome: GreylistOutcome::New {
            retry_after: times.delay,
        },
        keep: Some((
            GreyRecord {
                first_seen: now,
                passed: false,
                last_use: now,
            },
            millis(times.retry),
        )),
    }
}

/// Records `name` in a client's HELO history (name, last seen) and returns the distinct names
/// seen within the window, this one included. Names older than the window go; past
/// [`CHURN_NAMES_KEPT`] the oldest go.
pub(crate) fn record_helo(history: &mut Vec<(String, u64)>, name: &str, now: u64) -> u32 {
    let oldest_kept = now.saturating_sub(CHURN_WINDOW_MS);
    history.retain(|(seen_name, seen)| *seen >= oldest_kept && seen_name != name);
    history.push((name.to_string(), now));
    if history.len() > CHURN_NAMES_KEPT {
        history.sort_by_key(|(_, seen)| *seen);
        let excess = history.len() - CHURN_NAMES_KEPT;
        history.drain(..excess);
    }
    u32::try_from(history.len()).unwrap_or(u32::MAX)
}

/// The key of a triplet in the store. The parts are joined by a line feed, which no SMTP
/// address or domain can hold (it ends the command line).
pub(crate) fn triplet_key(triplet: &Triplet) -> String {
    let client = match &triplet.client {
        GreylistClient::Domain(domain) => format!("d:{domain}"),
        GreylistClient::Network(net) => format!("n:{net}"),
    };
    format!("{client}\n{}\n{}", triplet.sender, triplet.recipient)
}

/// The client whose HELO history helo_churn counts: an IPv4 address, or an IPv6 /64.
pub(crate) fn churn_client(ip: IpAddr) -> String {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let net = std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1));
            format!("{net}/64")
        }
    }
}

pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn times() -> GreylistTimes {
        GreylistTimes {
            delay: Duration::from_secs(300),
            retry: Duration::from_secs(48 * 3600),
            pass: Duration::from_secs(35 * 86400),
        }
    }

    /// Runs one decision and applies what it keeps, as a store does.
    fn step(record: &mut Option<GreyRecord>, now: u64) -> GreylistOutcome {
        let step = greylist_step(*record, now, &times());
        if let Some((kept, _)) = step.keep {
            *record = Some(kept);
        }
        step.outcome
    }

    #[test]
    fn first_sight_early_retry_passed_then_known() {
        let mut record = None;
        let t0 = 1_000_000;
        assert_eq!(
            step(&mut record, t0),
            GreylistOutcome::New {
                retry_after: Duration::from_secs(300)
            }
        );
        assert_eq!(
            step(&mut record, t0 + 100_000),
            GreylistOutcome::Early {
                retry_after: Duration::from_secs(200)
            }
        );
        // The early retry did not move the start of the delay.
        assert_eq!(step(&mut record, t0 + 300_000), GreylistOutcome::Passed);
        assert_eq!(step(&mut record, t0 + 400_000), GreylistOutcome::Known);
    }

    #[test]
    fn a_retry_past_the_window_starts_over() {
        let mut record = None;
        step(&mut record, 0);
        let late = 48 * 3600 * 1000 + 1;
        assert!(matches!(
            step(&mut record, late),
            GreylistOutcome::New { .. }
        ));
        assert_eq!(record.map(|r| r.first_seen), Some(late));
    }

    #[test]
    fn the_pass_period_runs_from_the_last_use() {
        let mut record = None;
        step(&mut record, 0);
        assert_eq!(step(&mut record, 300_000), GreylistOutcome::Passed);
        let pass = 35 * 86400 * 1000;
        assert_eq!(step(&mut record, 300_000 + pass), GreylistOutcome::Known);
        assert_eq!(
            step(&mut record, 300_000 + 2 * pass),
            GreylistOutcome::Known
        );
        assert!(matches!(
            step(&mut record, 300_000 + 3 * pass + 1),
            GreylistOutcome::New { .. }
        ));
    }

    #[test]
    fn what_is_kept_and_for_how_long() {
        let t = times();
        let new = greylist_step(None, 5, &t);
        assert_eq!(new.keep.map(|(_, ttl)| ttl), Some(millis(t.retry)));
        let record = new.keep.map(|(r, _)| r);
        assert_eq!(greylist_step(record, 6, &t).keep, None, "early keeps as is");
        let passed = greylist_step(record, 300_005, &t);
        assert_eq!(passed.keep.map(|(_, ttl)| ttl), Some(millis(t.pass)));
    }

    #[test]
    fn the_history_counts_distinct_names_within_the_hour() {
        let mut history = Vec::new();
        assert_eq!(record_helo(&mut history, "a.example", 0), 1);
        assert_eq!(record_helo(&mut history, "a.example", 10), 1);
        assert_eq!(record_helo(&mut history, "b.example", 20), 2);
        // a.example was seen again at 10: still within the hour at 10 + window.
        assert_eq!(
            record_helo(&mut history, "c.example", CHURN_WINDOW_MS + 10),
            3
        );
        assert_eq!(
            record_helo(&mut history, "d.example", 2 * CHURN_WINDOW_MS + 11),
            1
        );
    }

    #[test]
    fn the_history_is_bounded() {
        let mut history = Vec::new();
        let mut last = 0;
        for n in 0..(CHURN_NAMES_KEPT as u64 + 10) {
            last = record_helo(&mut history, &format!("n{n}.example"), n);
        }
        assert_eq!(last as usize, CHURN_NAMES_KEPT);
        assert!(history.iter().all(|(_, seen)| *seen >= 10));
    }

    #[test]
    fn keys() {
        let triplet = Triplet {
            client: GreylistClient::Network("192.0.2.0".parse().expect("ip")),
            sender: "a@b.example".into(),
            recipient: "c@d.example".into(),
        };
        assert_eq!(
            triplet_key(&triplet),
            "n:192.0.2.0\na@b.example\nc@d.example"
        );
        assert_eq!(churn_client("192.0.2.7".parse().expect("ip")), "192.0.2.7");
        assert_eq!(
            churn_client("2001:db8:1:2:3:4:5:6".parse().expect("ip")),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            churn_client("::ffff:192.0.2.7".parse().expect("ip")),
            "192.0.2.7"
        );
    }
}
