//! Per-endpoint health, kept outside config snapshots (keyed by service and address) so
//! reloads and endpoint churn keep each endpoint's latency estimate, breaker and ejection.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::breaker::{Breaker, BreakerState, Transition};
use super::ewma::PeakEwma;
use super::metrics::EndpointCounters;
use crate::config::service_policy::BreakerRules;

#[derive(Debug, Default)]
struct Health {
    ewma: PeakEwma,
    breaker: Breaker,
}

pub struct EndpointState {
    pub service: Arc<str>,
    pub addr: SocketAddrV4,
    health: Mutex<Health>,
    in_flight: AtomicU32,
    counters: EndpointCounters,
}

/// What the admin endpoint shows.
#[derive(Debug, serde::Serialize)]
pub struct EndpointView {
    pub breaker: &'static str,
    pub ewma_ms: f64,
    pub in_flight: u32,
    /// Seconds the endpoint stays ejected (open breaker), if it is.
    pub ejected_for_s: Option<f64>,
}

impl EndpointState {
    pub fn new(service: Arc<str>, addr: SocketAddrV4, counters: EndpointCounters) -> Self {
        Self {
            service,
            addr,
            health: Mutex::default(),
            in_flight: AtomicU32::new(0),
            counters,
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the balancer may consider this endpoint (breaker not open).
    pub fn available(&self, rules: &BreakerRules, now: Instant) -> bool {
        self.health().breaker.available(rules, now)
    }

    /// Peak-EWMA cost: latency estimate times (in-flight + 1).
    pub fn cost(&self) -> f64 {
        self.health().ewma.cost(self.in_flight(), Instant::now())
    }

    /// Starts a call if the breaker admits it; the guard tracks it until dropped.
    pub fn start(self: &Arc<Self>, rules: BreakerRules) -> Option<CallGuard> {
        let now = Instant::now();
        let (admitted, transition) = self.health().breaker.admit(&rules, now);
        self.report(transition);
        if !admitted {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(CallGuard {
            endpoint: self.clone(),
            rules,
            started: now,
        })
    }

    pub fn view(&self) -> EndpointView {
        let now = Instant::now();
        let h = self.health();
        EndpointView {
            breaker: h.breaker.state(now).as_str(),
            ewma_ms: h.ewma.estimate().as_secs_f64() * 1000.0,
            in_flight: self.in_flight(),
            ejected_for_s: h.breaker.open_for(now).map(|d| d.as_secs_f64()),
        }
    }

    fn report(&self, transition: Option<Transition>) {
        let Some(t) = transition else { return };
        self.counters.state.set(t.to.code());
        self.counters.transition(t.to.as_str());
        if t.to == BreakerState::Open {
            self.counters.ejections.inc();
            tracing::warn!(service = %self.service, endpoint = %self.addr, from = t.from.as_str(), "circuit breaker opened; endpoint ejected");
        } else {
            tracing::info!(service = %self.service, endpoint = %self.addr, from = t.from.as_str(), to = t.to.as_str(), "circuit breaker changed state");
        }
    }
}

/// One call in flight on an endpoint. Record its outcome once; dropping it ends the call
/// (for in-flight counts, which should last until the response body is done).
pub struct CallGuard {
    endpoint: Arc<EndpointState>,
    rules: BreakerRules,
    started: Instant,
}

impl CallGuard {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Feeds the latency estimate; a failure counts toward the breaker.
    pub fn record(&self, ok: bool) {
        let now = Instant::now();
        let transition = {
            let mut h = self.endpoint.health();
            // Failures count too: a hanging endpoint must look slow, not unmeasured.
            h.ewma.observe(now - self.started, now);
            h.breaker.record(&self.rules, now, ok)
        };
        self.endpoint.report(transition);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
