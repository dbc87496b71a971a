//! Per-endpoint circuit breaker, which is also the passive outlier ejection: `failures`
//! consecutive failures open it (the endpoint is ejected from balancing and calls to it fail
//! fast); after the recovery interval up to `half_open` probe calls go through; that many
//! successes close it, one failure opens it again for a longer interval (recovery x trips,
//! capped), so a flapping endpoint is ejected for longer each time.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::service_policy::BreakerRules;

/// Repeated trips lengthen the open interval up to this multiple of `recovery`.
const MAX_TRIP_MULTIPLIER: u32 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn code(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
    consecutive_failures: u32,
    open_until: Instant,
    /// Probes admitted in the current half-open phase, and how many of them succeeded.
    probes_admitted: u32,
    probes_succeeded: u32,
    /// Opens since the last close; scales the open interval.
    trips: u32,
}

/// A state change, reported so metrics and logs can follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: BreakerState::Closed,
            consecutive_failures: 0,
            open_until: Instant::now(),
            probes_admitted: 0,
            probes_succeeded: 0,
            trips: 0,
        }
    }
}

impl Breaker {
    /// The state as of `now` (an open breaker whose interval passed reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            BreakerState::Open if now >= self.open_until => BreakerState::HalfOpen,
            s => s,
        }
    }

    /// Whether a call may go to this endpoint now (without taking a probe slot).
    pub fn available(&self, rules: &BreakerRules, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                self.state == BreakerState::Open || self.probes_admitted < rules.half_open
            }
        }
    }

    /// Admits one call; in half-open it takes one of the probe slots.
    pub fn admit(&mut self, rules: &BreakerRules, now: Instant) -> (bool, Option<Transition>) {
        let mut transition = None;
        if self.state == BreakerState::Open && now >= self.open_until {
            transition = self.go(BreakerState::HalfOpen);
            self.probes_admitted = 0;
            self.probes_succeeded = 0;
        }
        let admitted = match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if self.probes_admitted < rules.half_open => {
                self.probes_admitted += 1;
                true
            }
            BreakerState::HalfOpen => false,
        };
        (admitted, transition)
    }

    /// Records the outcome of an admitted call.
    pub fn record(&mut self, rules: &BreakerRules, now: Instant, ok: bool) -> Option<Transition> {
        match (self.state, ok) {
            (BreakerState::Closed, true) => {
                self.consecutive_failures = 0;
                None
            }
            (BreakerState::Closed, false) => {
                self.consecutive_failures += 1;
                (self.consecutive_failures >= rules.failures).then(|| self.open(rules, now))?
            }
            (BreakerState::HalfOpen, true) => {
                self.probes_succeeded += 1;
                if self.probes_succeeded >= rules.half_open {
                    self.consecutive_failures = 0;
                    self.trips = 0;
                    self.go(BreakerState::Closed)
                } else {
                    None
                }
            }
            (BreakerState::HalfOpen, false) => self.open(rules, now),
            // Calls admitted before the breaker opened may still report; they change nothing.
            (BreakerState::Open, _) => None,
        }
    }

    /// When the breaker is open: how long it stays so from `now`.
    pub fn open_for(&self, now: Instant) -> Option<Duration> {
        (self.state == BreakerState::Open && now < self.open_until).then(|| self.open_until - now)
    }

    fn open(&mut self, rules: &BreakerRules, now: Instant) -> Option<Transition> {
        self.trips = (self.trips + 1).min(MAX_TRIP_MULTIPLIER);
        self.open_until = now + rules.recovery * self.trips;
        self.consecutive_failures = 0;
        self.go(BreakerState::Open)
    }

    fn go(&mut self, to: BreakerState) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, to);
        (from != to).then_some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: BreakerRules = BreakerRules {
        failures: 5,
        recovery: Duration::from_secs(60),
        half_open: 3,
    };

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_recovers_through_half_open() {
        let mut b = Breaker::default();
        let now = Instant::now();
        for _ in 0..4 {
            assert!(b.admit(&RULES, now).0);
            assert_eq!(b.record(&RULES, now, false), None);
        }
        // A success resets the count: failures must be consecutive.
        b.record(&RULES, now, true);
        for _ in 0..4 {
            b.record(&RULES, now, false);
        }
        assert_eq!(b.state(now), BreakerState::Closed);
        let t = b.record(&RULES, now, false).expect("fifth failure opens");
        assert_eq!(t.to, BreakerState::Open);
        assert!(!b.admit(&RULES, now).0, "open fails fast");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!b.available(&RULES, Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        assert_eq!(b.state(now), BreakerState::HalfOpen);
        // Exactly `half_open` probes are admitted.
        let (ok, t) = b.admit(&RULES, now);
        assert!(ok);
        assert_eq!(t.map(|t| t.to), Some(BreakerState::HalfOpen));
        assert!(b.admit(&RULES, now).0 && b.admit(&RULES, now).0);
        assert!(!b.admit(&RULES, now).0, "no fourth probe");
        assert_eq!(b.record(&RULES, now, true), None);
        assert_eq!(b.record(&RULES, now, true), None);
        let t = b.record(&RULES, now, true).expect("third success closes");
        assert_eq!(t.to, BreakerState::Closed);
        assert!(b.admit(&RULES, now).0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_a_growing_interval() {
        let rules = BreakerRules {
            failures: 1,
            recovery: Duration::from_secs(10),
            half_open: 1,
        };
        let mut b = Breaker::default();
        b.record(&rules, Instant::now(), false);
        assert_eq!(b.open_for(Instant::now()), Some(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.admit(&rules, Instant::now()).0);
        b.record(&rules, Instant::now(), false);
        assert_eq!(
            b.open_for(Instant::now()),
            Some(Duration::from_secs(20)),
            "second trip: 2x"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(b.admit(&rules, Instant::now()).0);
        b.record(&rules, Instant::now(), true);
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
        b.record(&rules, Instant::now(), false);
        assert_eq!(
            b.open_for(Instant::now()),
            Some(Duration::from_secs(10)),
            "a close resets the growth"
        );
    }
}
