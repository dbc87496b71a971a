//! Peak-EWMA latency estimate (Finagle's, as tower::load::PeakEwma computes it): a slower
//! observation replaces the estimate at once, faster ones pull it down with a time-decayed
//! weight. The balancer's cost is the estimate times (in-flight + 1).

use std::time::Duration;

use tokio::time::Instant;

/// How quickly old observations stop counting.
const DECAY: Duration = Duration::from_secs(10);
/// Estimate for an endpoint never measured: optimistic, so new endpoints get tried.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

#[derive(Debug)]
pub struct PeakEwma {
    estimate_ns: f64,
    updated: Instant,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self {
            estimate_ns: DEFAULT_RTT.as_nanos() as f64,
            updated: Instant::now(),
        }
    }
}

impl PeakEwma {
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_nanos() as f64;
        if rtt_ns > self.estimate_ns {
            self.estimate_ns = rtt_ns;
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
            let weight = (-elapsed / DECAY.as_secs_f64()).exp();
            self.estimate_ns = self.estimate_ns * weight + rtt_ns * (1.0 - weight);
        }
        self.updated = now;
    }

    pub fn estimate(&self) -> Duration {
        Duration::from_nanos(self.estimate_ns as u64)
    }

    /// Load for the balancer. Like tower's PeakEwma, reading decays the estimate toward zero
    /// by the time since the last update, so a peak fades even while the endpoint is avoided.
    pub fn cost(&mut self, in_flight: u32, now: Instant) -> f64 {
        self.observe(Duration::ZERO, now);
        self.estimate_ns * f64::from(in_flight + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peaks_at_once_and_decays_slowly() {
        let mut e = PeakEwma::default();
        e.observe(Duration::from_millis(100), Instant::now());
        assert_eq!(e.estimate(), Duration::from_millis(100));
        tokio::time::advance(Duration::from_secs(1)).await;
        e.observe(Duration::from_millis(10), Instant::now());
        let after_1s = e.estimate();
        assert!(
            after_1s > Duration::from_millis(90) && after_1s < Duration::from_millis(100),
            "{after_1s:?}"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        e.observe(Duration::from_millis(10), Instant::now());
        assert!(
            e.estimate() < Duration::from_millis(11),
            "{:?}",
            e.estimate()
        );
        let now = Instant::now();
        assert!(e.cost(3, now) > e.cost(0, now) * 3.9);
        // Unobserved for one decay period: the estimate fades to about 1/e.
        let before = e.estimate();
        tokio::time::advance(DECAY).await;
        e.cost(0, Instant::now());
        let faded = e.estimate().as_secs_f64() / before.as_secs_f64();
        assert!((0.35..0.39).contains(&faded), "{faded}");
    }
}
