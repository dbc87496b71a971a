//! Retry decisions: which failures and methods are retried, exponential backoff with full
//! jitter, and the budget (tower's TpsBudget: retries may add `ratio` of the recent requests
//! plus `min_per_second`), so retries cannot multiply an outage.

use std::time::Duration;

use hyper::Method;
use rand::Rng;
use tower::retry::budget::{Budget, TpsBudget};

use crate::config::service_policy::{RetryOn, RetryRules};

/// Window over which the budget counts requests.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Backoff grows by this factor per retry (seed 003).
const FACTOR: u32 = 2;

/// Methods that can be repeated without changing the result (RFC 9110 §9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a failed attempt may be retried under `rules` (budget aside). A connect failure
/// sent nothing, so it is safe for any method.
pub fn retryable(rules: &RetryRules, method: &Method, failure: RetryOn) -> bool {
    if !rules.retries(failure) {
        return false;
    }
    failure == RetryOn::ConnectFailure || rules.non_idempotent || idempotent(method)
}

/// Delay before retry number `retry` (1-based): full jitter over base x 2^(retry-1), capped.
pub fn backoff(rules: &RetryRules, retry: u32) -> Duration {
    let exp = FACTOR.saturating_pow(retry.saturating_sub(1));
    let ceiling = rules
        .backoff_base
        .saturating_mul(exp)
        .min(rules.backoff_max);
    ceiling.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
}

/// A service's retry budget.
pub struct RetryBudget {
    budget: TpsBudget,
}

impl RetryBudget {
    pub fn new(rules: &RetryRules) -> Self {
        Self {
            budget: TpsBudget::new(
                BUDGET_WINDOW,
                rules.budget_min_per_second,
                rules.budget_ratio as f32,
            ),
        }
    }

    /// Every original request earns budget.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Spends budget for one retry; false when it is exhausted.
    pub fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> RetryRules {
        RetryRules {
            max: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(300),
            on: vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::Status(503),
            ],
            non_idempotent: false,
            budget_ratio: 0.2,
            budget_min_per_second: 1,
        }
    }

    #[test]
    fn post_is_retried_only_after_connect_failures_unless_configured() {
        let r = rules();
        assert!(retryable(&r, &Method::GET, RetryOn::Status(503)));
        assert!(
            !retryable(&r, &Method::GET, RetryOn::Status(502)),
            "not in `on`"
        );
        assert!(!retryable(&r, &Method::POST, RetryOn::Status(503)));
        assert!(!retryable(&r, &Method::POST, RetryOn::Reset));
        assert!(retryable(&r, &Method::POST, RetryOn::ConnectFailure));
        let r = RetryRules {
            non_idempotent: true,
            ..rules()
        };
        assert!(retryable(&r, &Method::POST, RetryOn::Status(503)));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let r = rules();
        for _ in 0..200 {
            assert!(backoff(&r, 1) <= Duration::from_millis(100));
            assert!(backoff(&r, 2) <= Duration::from_millis(200));
            assert!(backoff(&r, 5) <= Duration::from_millis(300));
        }
        let spread: Vec<_> = (0..50).map(|_| backoff(&r, 3)).collect();
        assert!(spread.iter().any(|d| *d < Duration::from_millis(150)));
        assert!(
            spread.iter().any(|d| *d > Duration::from_millis(150)),
            "jittered over the range"
        );
    }

    #[test]
    fn budget_allows_a_share_of_requests_plus_a_floor() {
        let b = RetryBudget::new(&RetryRules {
            budget_min_per_second: 0,
            ..rules()
        });
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).take_while(|_| b.withdraw()).count();
        assert!(
            (18..=21).contains(&granted),
            "20% of 100 requests, got {granted}"
        );
    }
}
