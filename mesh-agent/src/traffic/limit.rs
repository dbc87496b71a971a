//! Rate limit (token bucket, optionally one bucket per calling identity) and concurrency cap.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::service_policy::RateLimitConfig;

/// Tokens a bucket holds at most: 100 ms worth of the rate (at least one request). A small
/// burst keeps the limit close to the configured rate over any window of a second or more.
const BURST_WINDOW: Duration = Duration::from_millis(100);
/// Per-caller buckets kept at most; more callers share the overflow bucket.
const MAX_CALLERS: usize = 4096;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    capacity: f64,
    per_caller: bool,
    /// Keyed by the caller's identity id (0 when not per caller).
    buckets: Mutex<HashMap<u32, Bucket>>,
}

impl RateLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        let per_second = config.rate.per_second();
        Self {
            per_second,
            capacity: (per_second * BURST_WINDOW.as_secs_f64()).max(1.0),
            per_caller: config.per_caller,
            buckets: Mutex::default(),
        }
    }

    /// Takes a token for `caller`; Err(wait) says how long until one is available.
    pub fn try_acquire(&self, caller: u32) -> Result<(), Duration> {
        let key = if self.per_caller { caller } else { 0 };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_CALLERS && !buckets.contains_key(&key) {
            buckets.retain(|_, b| now.duration_since(b.updated) < Duration::from_secs(60));
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.capacity,
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(text: &str, per_caller: bool) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig {
            rate: text.parse().expect("rate"),
            per_caller,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_over_ten_seconds() {
        let l = limiter("100/s", false);
        let mut allowed = 0;
        // A client far faster than the limit: one try every millisecond for 10 s.
        for _ in 0..10_000 {
            if l.try_acquire(1).is_ok() {
                allowed += 1;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!((1000..=1010).contains(&allowed), "{allowed}");
    }

    #[tokio::test(start_paused = true)]
    async fn tells_how_long_to_wait_and_keeps_callers_apart() {
        let l = limiter("6/min", true);
        assert!(l.try_acquire(1).is_ok());
        let wait = l
            .try_acquire(1)
            .expect_err("second request within 10s is limited");
        assert!(
            wait > Duration::from_secs(9) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
        assert!(
            l.try_acquire(2).is_ok(),
            "another caller has its own bucket"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(l.try_acquire(1).is_ok());
        let shared = limiter("6/min", false);
        assert!(shared.try_acquire(1).is_ok());
        assert!(shared.try_acquire(2).is_err(), "one bucket for everyone");
    }
}
