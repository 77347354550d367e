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
    pub(super) fn restart(&mut self) {
        *self = Self::default();
    }

    /// Counts one 5xx reply; true when that takes the session past the limit.
    pub(super) fn error_over(&mut self, max: u32) -> bool {
        self.errors = self.errors.saturating_add(1);
        max != 0 && self.errors > max
    }

    /// Counts one junk command; true when it is the one past the limit (it is not answered).
    pub(super) fn junk_over(&mut self, max: u32) -> bool {
        if max != 0 && self.junk >= max {
            return true;
        }
        self.junk += 1;
        false
    }
}

/// Seconds of history the data rate looks at (SPEC HELOGUARD_MIN_DATA_RATE: "over the last
/// 30 s"), one slot per second.
const WINDOW_SECS: usize = 30;

/// The recent rate of one DATA or BDAT transfer (HELOGUARD_MIN_DATA_RATE): octets per second
/// of the transfer over the last `WINDOW_SECS`, so a transfer that starts fast and then
/// trickles is caught, in fixed memory however long it runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DataRate {
    started: Instant,
    /// (second of the transfer, octets in it), at that second modulo the window; a slot whose
    /// second is older than the window is stale and is reused.
    slots: [(u64, u64); WINDOW_SECS],
}

impl DataRate {
    pub(super) fn start(now: Instant) -> Self {
        Self {
            started: now,
            slots: [(0, 0); WINDOW_SECS],
        }
    }

    pub(super) fn add(&mut self, now: Instant, octets: usize) {
        let second = now.saturating_duration_since(self.started).as_secs();
        let slot = &mut self.slots[(second % WINDOW_SECS as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 = slot.1.saturating_add(octets as u64);
    }

    /// Below `min` octets/s over the last 30 s, once past the grace time; `min` 0 = off.
    pub(super) fn too_slow(&self, now: Instant, min: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.started);
        if min == 0 || elapsed < DATA_RATE_GRACE {
            return false;
        }
        let second = elapsed.as_secs();
        // The window is the current (partial) second and the whole ones before it.
        let oldest = (second + 1).saturating_sub(WINDOW_SECS as u64);
        let octets: u64 = self
            .slots
            .iter()
            .filter(|(s, _)| (oldest..=second).contains(s))
            .map(|(_, n)| *n)
            .sum();
        let window_ms = elapsed.as_millis() - u128::from(oldest) * 1000;
        u128::from(octets) * 1000 < u128::from(min) * window_ms
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
        r.add(t0, 1000);
        assert!(!r.too_slow(t0 + Duration::from_secs(29), 500));
        assert!(r.too_slow(t0 + Duration::from_secs(31), 500));
        r.add(t0 + Duration::from_secs(31), 20_000);
        assert!(!r.too_slow(t0 + Duration::from_secs(31), 500));
        assert!(!r.too_slow(t0 + Duration::from_secs(3100), 0));
    }

    #[test]
    fn a_transfer_that_starts_fast_and_then_trickles_is_caught() {
        let t0 = Instant::now();
        let mut r = DataRate::start(t0);
        // 10 MB in the first 5 s: far above the floor on average for minutes after.
        for s in 0..5 {
            r.add(t0 + Duration::from_secs(s), 2_000_000);
        }
        let mut caught = None;
        for s in 5..120 {
            let now = t0 + Duration::from_secs(s);
            r.add(now, 10);
            if r.too_slow(now, 500) {
                caught = Some(s);
                break;
            }
        }
        // Caught once the fast seconds have left the 30 s window.
        assert_eq!(caught, Some(34));
    }

    #[test]
    fn a_steady_transfer_at_the_floor_passes() {
        let t0 = Instant::now();
        let mut r = DataRate::start(t0);
        for ms in (0..600_000).step_by(250) {
            let now = t0 + Duration::from_millis(ms);
            r.add(now, 125);
            assert!(!r.too_slow(now, 500), "at {ms} ms");
            assert!(
                !r.too_slow(now + Duration::from_millis(249), 500),
                "before {ms} ms"
            );
        }
        // Just below the floor is caught.
        let mut r = DataRate::start(t0);
        let mut caught = false;
        for s in 0..60 {
            let now = t0 + Duration::from_secs(s);
            r.add(now, 490);
            caught |= r.too_slow(now + Duration::from_millis(999), 500);
        }
        assert!(caught);
    }
}
