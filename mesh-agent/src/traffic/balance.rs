//! Endpoint choice for one attempt: locality first (same zone while it has an available
//! endpoint), breakers next (open endpoints are ejected), then the service's algorithm.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::endpoint::CallGuard;
use super::RouteEndpoint;
use crate::config::service_policy::{BreakerRules, LoadBalancer};

/// Candidate lists live on the stack up to this many endpoints: no allocation per request.
type Candidates<'a> = SmallVec<[&'a RouteEndpoint; 16]>;

/// Picks an endpoint and starts a call on it; `tried` endpoints are avoided while others are
/// available. None: every endpoint is ejected (or there are none).
pub fn pick(
    endpoints: &[RouteEndpoint],
    local_zone: Option<&str>,
    algorithm: LoadBalancer,
    breaker: BreakerRules,
    cursor: &AtomicUsize,
    tried: &[SocketAddrV4],
) -> Option<CallGuard> {
    let now = Instant::now();
    let mut candidates: Candidates = endpoints
        .iter()
        .filter(|e| e.state.available(&breaker, now))
        .collect();
    // Probe slots can run out between the check and the admit: try the others then.
    while !candidates.is_empty() {
        let pool = narrow(&candidates, local_zone, tried);
        let chosen = choose(&pool, algorithm, cursor);
        let addr = chosen.entry.addr;
        if let Some(guard) = chosen.state.start(breaker) {
            return Some(guard);
        }
        candidates.retain(|e| e.entry.addr != addr);
    }
    None
}

/// Same zone when it has any candidate; not-yet-tried endpoints when there are any.
fn narrow<'a>(
    candidates: &[&'a RouteEndpoint],
    local_zone: Option<&str>,
    tried: &[SocketAddrV4],
) -> Candidates<'a> {
    let mut pool: Candidates = match local_zone {
        Some(zone)
            if candidates
                .iter()
                .any(|e| e.entry.zone.as_deref() == Some(zone)) =>
        {
            candidates
                .iter()
                .copied()
                .filter(|e| e.entry.zone.as_deref() == Some(zone))
                .collect()
        }
        _ => candidates.iter().copied().collect(),
    };
    if pool.iter().any(|e| !tried.contains(&e.entry.addr)) {
        pool.retain(|e| !tried.contains(&e.entry.addr));
    }
    pool
}

fn choose<'a>(
    pool: &[&'a RouteEndpoint],
    algorithm: LoadBalancer,
    cursor: &AtomicUsize,
) -> &'a RouteEndpoint {
    if pool.len() == 1 {
        return pool[0];
    }
    match algorithm {
        LoadBalancer::RoundRobin => pool[cursor.fetch_add(1, Ordering::Relaxed) % pool.len()],
        LoadBalancer::WeightedRoundRobin => {
            let total: usize = pool.iter().map(|e| e.entry.weight as usize).sum();
            let mut slot = cursor.fetch_add(1, Ordering::Relaxed) % total.max(1);
            for e in pool {
                let w = e.entry.weight as usize;
                if slot < w {
                    return e;
                }
                slot -= w;
            }
            pool[0]
        }
        LoadBalancer::LeastRequest => {
            // Ties are broken at random so equal endpoints share the load.
            let least = pool.iter().map(|e| e.state.in_flight()).min().unwrap_or(0);
            let tied: Candidates = pool
                .iter()
                .filter(|e| e.state.in_flight() == least)
                .copied()
                .collect();
            tied[rand::thread_rng().gen_range(0..tied.len())]
        }
        LoadBalancer::P2cEwma => {
            let mut rng = rand::thread_rng();
            let a = rng.gen_range(0..pool.len());
            let mut b = rng.gen_range(0..pool.len() - 1);
            if b >= a {
                b += 1;
            }
            if pool[a].state.cost() <= pool[b].state.cost() {
                pool[a]
            } else {
                pool[b]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::registry::model::EndpointEntry;
    use crate::traffic::endpoint::EndpointState;
    use crate::traffic::metrics::TrafficMetrics;

    const BREAKER: BreakerRules = BreakerRules {
        failures: 2,
        recovery: Duration::from_secs(10),
        half_open: 1,
    };

    fn endpoints(specs: &[(&str, Option<&str>, u32)]) -> Vec<RouteEndpoint> {
        let metrics = TrafficMetrics::new(&prometheus::Registry::new());
        specs
            .iter()
            .map(|(addr, zone, weight)| {
                let addr: SocketAddrV4 = addr.parse().expect("addr");
                RouteEndpoint::new(
                    EndpointEntry {
                        addr,
                        node: None,
                        zone: zone.map(str::to_owned),
                        weight: *weight,
                    },
                    Arc::new(EndpointState::new(
                        "s".into(),
                        addr,
                        metrics.endpoint("s", &addr.to_string()),
                    )),
                )
            })
            .collect()
    }

    fn picks(eps: &[RouteEndpoint], zone: Option<&str>, lb: LoadBalancer, n: usize) -> Vec<u8> {
        let cursor = AtomicUsize::new(0);
        (0..n)
            .map(|_| {
                let g = pick(eps, zone, lb, BREAKER, &cursor, &[]).expect("an endpoint");
                g.record(true);
                g.endpoint().addr.ip().octets()[3]
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_and_weighted_round_robin() {
        let eps = endpoints(&[("10.0.0.1:80", None, 1), ("10.0.0.2:80", None, 3)]);
        assert_eq!(picks(&eps, None, LoadBalancer::RoundRobin, 4), [1, 2, 1, 2]);
        assert_eq!(
            picks(&eps, None, LoadBalancer::WeightedRoundRobin, 8),
            [1, 2, 2, 2, 1, 2, 2, 2]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_avoids_the_busy_endpoint() {
        let eps = endpoints(&[("10.0.0.1:80", None, 1), ("10.0.0.2:80", None, 1)]);
        let cursor = AtomicUsize::new(0);
        let busy = eps[0].state.start(BREAKER).expect("admitted");
        for _ in 0..10 {
            let g = pick(
                &eps,
                None,
                LoadBalancer::LeastRequest,
                BREAKER,
                &cursor,
                &[],
            )
            .expect("pick");
            assert_eq!(g.endpoint().addr.ip().octets()[3], 2);
        }
        drop(busy);
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_faster_endpoint() {
        let eps = endpoints(&[("10.0.0.1:80", None, 1), ("10.0.0.2:80", None, 1)]);
        // One slow observation on .1 (100 ms), a fast one on .2 (10 ms).
        let slow = eps[0].state.start(BREAKER).expect("admitted");
        let fast = eps[1].state.start(BREAKER).expect("admitted");
        tokio::time::advance(Duration::from_millis(10)).await;
        fast.record(true);
        tokio::time::advance(Duration::from_millis(90)).await;
        slow.record(true);
        drop((slow, fast));
        let chosen = picks(&eps, None, LoadBalancer::P2cEwma, 100);
        assert!(chosen.iter().all(|c| *c == 2), "{chosen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn same_zone_first_other_zones_only_when_it_is_ejected() {
        let eps = endpoints(&[("10.0.0.1:80", Some("b"), 1), ("10.0.0.2:80", Some("a"), 1)]);
        assert!(picks(&eps, Some("a"), LoadBalancer::RoundRobin, 6)
            .iter()
            .all(|c| *c == 2));
        // Two failures open .2's breaker: zone a has nothing left, zone b takes over.
        for _ in 0..2 {
            eps[1].state.start(BREAKER).expect("admitted").record(false);
        }
        assert!(picks(&eps, Some("a"), LoadBalancer::RoundRobin, 6)
            .iter()
            .all(|c| *c == 1));
        // After recovery the half-open probe goes back to the local zone.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            picks(&eps, Some("a"), LoadBalancer::RoundRobin, 3),
            [2, 2, 2]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tried_endpoints_are_avoided_and_all_ejected_means_none() {
        let eps = endpoints(&[("10.0.0.1:80", None, 1), ("10.0.0.2:80", None, 1)]);
        let cursor = AtomicUsize::new(0);
        let tried = ["10.0.0.1:80".parse().expect("addr")];
        for _ in 0..4 {
            let g = pick(
                &eps,
                None,
                LoadBalancer::RoundRobin,
                BREAKER,
                &cursor,
                &tried,
            )
            .expect("pick");
            assert_eq!(g.endpoint().addr.ip().octets()[3], 2);
        }
        for e in &eps {
            for _ in 0..2 {
                e.state.start(BREAKER).expect("admitted").record(false);
            }
        }
        assert!(pick(&eps, None, LoadBalancer::RoundRobin, BREAKER, &cursor, &[]).is_none());
    }
}
