//! Traffic-policy metric families. Label children are taken once per service, endpoint or
//! client connection and kept, so the request path does one atomic add per update.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::metrics::Registrar;

#[derive(Clone)]
pub struct TrafficMetrics {
    pub requests: IntCounterVec,
    retries: IntCounterVec,
    budget_exhausted: IntCounterVec,
    rate_limited: IntCounterVec,
    shed: IntCounterVec,
    timeouts: IntCounterVec,
    breaker_state: IntGaugeVec,
    breaker_transitions: IntCounterVec,
    ejections: IntCounterVec,
}

/// One service's counters.
#[derive(Clone)]
pub struct ServiceCounters {
    pub retries: IntCounter,
    pub budget_exhausted: IntCounter,
    pub rate_limited: IntCounter,
    pub shed: IntCounter,
    pub timeouts: IntCounter,
}

/// One endpoint's breaker families.
#[derive(Clone)]
pub struct EndpointCounters {
    pub state: IntGauge,
    pub transitions: IntCounterVec,
    pub ejections: IntCounter,
    service: String,
    endpoint: String,
}

impl EndpointCounters {
    pub fn transition(&self, to: &str) {
        self.transitions
            .with_label_values(&[&self.service, &self.endpoint, to])
            .inc();
    }
}

impl TrafficMetrics {
    pub fn new(registry: &Registry) -> Self {
        let r = Registrar(registry);
        let by_service = |name, help| r.counter_vec(name, help, &["service"]);
        Self {
            requests: r.counter_vec(
                "nodemesh_requests_total",
                "HTTP requests proxied by the calling agent, by service, calling identity and response code.",
                &["service", "caller", "code"],
            ),
            retries: by_service(
                "nodemesh_request_retries_total",
                "HTTP request attempts after the first (and TCP connect retries), by service.",
            ),
            budget_exhausted: by_service(
                "nodemesh_retry_budget_exhausted_total",
                "Retries not made because the service's retry budget was spent.",
            ),
            rate_limited: by_service(
                "nodemesh_rate_limited_total",
                "Requests or connections refused by the rate limit (429), by service.",
            ),
            shed: by_service(
                "nodemesh_shed_total",
                "Requests or connections refused by the concurrency cap (503), by service.",
            ),
            timeouts: by_service(
                "nodemesh_request_timeouts_total",
                "HTTP requests answered 504 because the request timeout fired, by service.",
            ),
            breaker_state: r.gauge_vec(
                "nodemesh_breaker_state",
                "Circuit breaker state per endpoint: 0 closed, 1 open, 2 half-open.",
                &["service", "endpoint"],
            ),
            breaker_transitions: r.counter_vec(
                "nodemesh_breaker_transitions_total",
                "Circuit breaker state changes per endpoint, by the state entered.",
                &["service", "endpoint", "to"],
            ),
            ejections: r.counter_vec(
                "nodemesh_endpoint_ejections_total",
                "Times an endpoint was ejected from balancing (its breaker opened).",
                &["service", "endpoint"],
            ),
        }
    }

    pub fn service(&self, service: &str) -> ServiceCounters {
        let l = [service];
        ServiceCounters {
            retries: self.retries.with_label_values(&l),
            budget_exhausted: self.budget_exhausted.with_label_values(&l),
            rate_limited: self.rate_limited.with_label_values(&l),
            shed: self.shed.with_label_values(&l),
            timeouts: self.timeouts.with_label_values(&l),
        }
    }

    pub fn endpoint(&self, service: &str, endpoint: &str) -> EndpointCounters {
        let l = [service, endpoint];
        EndpointCounters {
            state: self.breaker_state.with_label_values(&l),
            transitions: self.breaker_transitions.clone(),
            ejections: self.ejections.with_label_values(&l),
            service: service.to_owned(),
            endpoint: endpoint.to_owned(),
        }
    }

    /// Drops the series of an endpoint that left the service.
    pub fn forget_endpoint(&self, service: &str, endpoint: &str) {
        let _ = self.breaker_state.remove_label_values(&[service, endpoint]);
    }
}
