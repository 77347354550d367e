//! Per-session limits that need memory: error and junk counters, and the data rate.

use std::time::{Duration, Instant};

/// SPEC (as Postfix `smtpd_min_data_rate`): the rate is judged only after this much time.
pub(crate) const DATA_RATE_GRACE: Duration = Duration::from_secs(30);

/// HELOGUARD_MAX_ERRORS and HELOGUARD_MAX_JUNK bookkeeping (0 = unlimited).
#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    /// 5xx replies to commands so far.
    pub errors: u32,
    /// NOOP, RSET, VRFY, HELP and repeated EHLO/HELO so far.
    pub junk: u32,
}

impl Counters {
    /// Both counts start over (after an accepted message).
    pub fn restart(&mut self) {
        *self = Self::default();
    }

    /// Counts one 5xx reply; true when that takes the session past the limit.
    pub fn error_over(&mut self, max: u32) -> bool {
        self.errors = self.errors.saturating_add(1);
        max != 0 && self.errors > max
    }

    /// Counts one junk command; true when it is the one past the limit (it is not answered).
    pub fn junk_over(&mut self, max: u32) -> bool {
        if max != 0 && self.junk >= max {
            return true;
        }
        self.junk += 1;
        false
    }
}

/// The average rate of one DATA or BDAT transfer (HELOGUARD_MIN_DATA_RATE).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DataRate {
    started: Instant,
    octets: u64,
}

impl DataRate {
    pub fn start(now: Instant) -> Self {
        Self {
            started: now,
            octets: 0,
        }
    }

    pub fn add(&mut self, octets: usize) {
        self.octets = self.octets.saturating_add(octets as u64);
    }

    /// Below `min` octets/s on average, once past the grace time; `min` 0 = off.
    pub fn too_slow(&self, now: Instant, min: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.started);
        if min == 0 || elapsed < DATA_RATE_GRACE {
            return false;
        }
        u128::from(self.octets) * 1000 < u128::from(min) * elapsed.as_millis()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_rate() {
        let mut c = Counters::default();
        assert!(!c.error_over(2) && !c.error_over(2) && c.error_over(2));
        assert!(!c.junk_over(1) && c.junk_over(1));
        assert!(!Counters::default().error_over(0));
        let t0 = Instant::now();
        let mut r = DataRate::start(t0);
        r.add(1000);
        assert!(!r.too_slow(t0 + Duration::from_secs(29), 500));
        assert!(r.too_slow(t0 + Duration::from_secs(31), 500));
        r.add(20_000);
        assert!(!r.too_slow(t0 + Duration::from_secs(31), 500));
        assert!(!r.too_slow(t0 + Duration::from_secs(3100), 0));
    }
}
