//! Per-service traffic policy: the routing table the data path reads (one immutable snapshot
//! per config, swapped atomically), and the state that outlives snapshots (per-endpoint
//! health, rate-limit buckets, retry budgets, pooled upstream connections).
//!
//! Layer order (outermost first): route -> rate limit / concurrency -> retry (budgeted) ->
//! request timeout -> balance (locality, algorithm) -> per-endpoint breaker -> connect.

pub mod balance;
pub mod breaker;
pub mod endpoint;
pub mod ewma;
pub mod limit;
pub mod metrics;
pub mod retry;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use arc_swap::ArcSwap;
use prometheus::Registry;
use tokio::sync::Semaphore;

use crate::config::{Config, TrafficRules};
use crate::proxy::connect::Source;
use crate::proxy::upstream::Upstreams;
use crate::registry::model::EndpointEntry;
use crate::registry::MeshModel;
use crate::state::AgentState;
use endpoint::{CallGuard, EndpointState};
use limit::RateLimiter;
use metrics::{ServiceCounters, TrafficMetrics};
use retry::RetryBudget;

/// An endpoint as the balancer sees it: where it is, and its long-lived health.
#[derive(Clone)]
pub struct RouteEndpoint {
    pub entry: EndpointEntry,
    pub state: Arc<EndpointState>,
    /// `ip:port` as a URI authority, made once rather than per request.
    pub authority: hyper::http::uri::Authority,
}

impl RouteEndpoint {
    pub fn new(entry: EndpointEntry, state: Arc<EndpointState>) -> Self {
        let authority = hyper::http::uri::Authority::try_from(entry.addr.to_string())
            .expect("an IPv4 socket address is a valid URI authority");
        Self {
            entry,
            state,
            authority,
        }
    }
}

/// Everything a request to one service needs, fixed for the snapshot it came from; a request
/// holds its route to the end, so in-flight requests finish under the rules they started with.
pub struct ServiceRoute {
    pub id: u32,
    pub name: Arc<str>,
    pub rules: Arc<TrafficRules>,
    pub endpoints: Vec<RouteEndpoint>,
    pub local_zone: Option<String>,
    pub limiter: Option<Arc<RateLimiter>>,
    pub concurrency: Option<Arc<Semaphore>>,
    pub budget: Option<Arc<RetryBudget>>,
    pub counters: ServiceCounters,
    pub upstreams: Arc<Upstreams>,
    cursor: Arc<AtomicUsize>,
}

impl ServiceRoute {
    /// Picks an endpoint for one attempt (see [`balance::pick`]).
    pub fn pick(&self, tried: &[SocketAddrV4]) -> Option<CallGuard> {
        balance::pick(
            &self.endpoints,
            self.local_zone.as_deref(),
            self.rules.load_balancer,
            self.rules.breaker,
            &self.cursor,
            tried,
        )
    }
}

/// (service, endpoint address).
type EndpointKey = (Arc<str>, SocketAddrV4);

#[derive(Default)]
struct Table {
    by_id: HashMap<u32, Arc<ServiceRoute>>,
}

pub struct Traffic {
    table: ArcSwap<Table>,
    /// Per-endpoint health by (service, address), reused by every snapshot.
    endpoints: Mutex<HashMap<EndpointKey, Arc<EndpointState>>>,
    pub metrics: TrafficMetrics,
    /// The agent, for upstream connectors (HBONE needs its identities and peers).
    agent: OnceLock<Weak<AgentState>>,
}

impl Traffic {
    pub fn new(registry: &Registry) -> Self {
        Self {
            table: ArcSwap::default(),
            endpoints: Mutex::default(),
            metrics: TrafficMetrics::new(registry),
            agent: OnceLock::new(),
        }
    }

    /// Connects the table to its agent; call once, before the first [`Traffic::update`].
    pub fn attach(&self, agent: Weak<AgentState>) {
        let _ = self.agent.set(agent);
    }

    /// The current route of a service (by kernel service id).
    pub fn route(&self, service_id: u32) -> Option<Arc<ServiceRoute>> {
        self.table.load().by_id.get(&service_id).cloned()
    }

    /// Every current route, for the admin endpoint.
    pub fn routes(&self) -> Vec<Arc<ServiceRoute>> {
        let mut routes: Vec<_> = self.table.load().by_id.values().cloned().collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        routes
    }

    /// Builds the snapshot for a new config and model; state whose rules did not change
    /// (buckets, budgets, pooled connections) and all endpoint health carry over.
    pub fn update(&self, config: &Config, model: &MeshModel) {
        let previous = self.table.load_full();
        let agent = self.agent.get().cloned().unwrap_or_default();
        let mut health = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut live = std::collections::HashSet::new();
        let mut by_id = HashMap::new();
        for service in &config.services {
            let Some(entry) = model.services.get(&service.name) else {
                continue;
            };
            let rules = TrafficRules::resolve(
                config.traffic_defaults.as_ref(),
                service.policy.as_ref().map(|p| p.traffic()).as_ref(),
                config.proxy.connect_timeout,
            );
            let old = previous
                .by_id
                .values()
                .find(|r| *r.name == *service.name)
                .cloned();
            let name: Arc<str> = old
                .as_ref()
                .map_or_else(|| Arc::from(service.name.as_str()), |o| o.name.clone());
            let endpoints = entry
                .endpoints
                .iter()
                .map(|e| {
                    let key = (name.clone(), e.addr);
                    live.insert(key.clone());
                    let state = health
                        .entry(key)
                        .or_insert_with(|| {
                            Arc::new(EndpointState::new(
                                name.clone(),
                                e.addr,
                                self.metrics.endpoint(&name, &e.addr.to_string()),
                            ))
                        })
                        .clone();
                    RouteEndpoint::new(e.clone(), state)
                })
                .collect();
            let carried = |f: &dyn Fn(&ServiceRoute) -> bool| old.as_ref().filter(|o| f(o));
            let route = ServiceRoute {
                id: entry.id,
                limiter: match carried(&|o| o.rules.rate_limit == rules.rate_limit) {
                    Some(o) => o.limiter.clone(),
                    None => rules
                        .rate_limit
                        .as_ref()
                        .map(|r| Arc::new(RateLimiter::new(r))),
                },
                concurrency: match carried(&|o| o.rules.concurrency == rules.concurrency) {
                    Some(o) => o.concurrency.clone(),
                    None => rules
                        .concurrency
                        .map(|n| Arc::new(Semaphore::new(n as usize))),
                },
                budget: match carried(&|o| o.rules.retry == rules.retry) {
                    Some(o) => o.budget.clone(),
                    None => rules.retry.as_ref().map(|r| Arc::new(RetryBudget::new(r))),
                },
                upstreams: match carried(&|o| {
                    o.upstreams.fits(rules.connect_timeout, Source::of(config))
                }) {
                    Some(o) => o.upstreams.clone(),
                    None => Arc::new(Upstreams::new(
                        agent.clone(),
                        name.clone(),
                        rules.connect_timeout,
                        Source::of(config),
                    )),
                },
                cursor: old.as_ref().map_or_else(Arc::default, |o| o.cursor.clone()),
                counters: self.metrics.service(&name),
                local_zone: config.node.zone.clone(),
                endpoints,
                rules: match carried(&|o| *o.rules == rules) {
                    Some(o) => o.rules.clone(),
                    None => Arc::new(rules),
                },
                name,
            };
            by_id.insert(route.id, Arc::new(route));
        }
        health.retain(|key, state| {
            let keep = live.contains(key);
            if !keep {
                self.metrics
                    .forget_endpoint(&state.service, &state.addr.to_string());
            }
            keep
        });
        self.table.store(Arc::new(Table { by_id }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoints: &str, policy: &str) -> Config {
        let text = format!(
            "node: {{name: n1, agent_ip: 10.1.255.1}}\nservices:\n  - name: s\n    vip: 10.96.0.1:80\n    endpoints: {endpoints}\n    policy: {policy}\n"
        );
        crate::config::parse(&text, "t.yaml", &|_| None).expect("valid")
    }

    #[tokio::test]
    async fn endpoint_health_and_unchanged_state_survive_reloads() {
        let traffic = Traffic::new(&Registry::new());
        let c1 = config("[\"10.0.0.1:80\", \"10.0.0.2:80\"]", "{rate_limit: 10/s}");
        let m1 = MeshModel::build(&c1, None);
        traffic.update(&c1, &m1);
        let first = traffic.route(1).expect("route");
        // Endpoint .2 leaves, .3 arrives, the timeout changes; the rate limit does not.
        let c2 = config(
            "[\"10.0.0.1:80\", \"10.0.0.3:80\"]",
            "{rate_limit: 10/s, timeouts: {request: 1s}}",
        );
        let m2 = MeshModel::build(&c2, Some(&m1));
        traffic.update(&c2, &m2);
        let second = traffic.route(1).expect("route");
        assert!(
            Arc::ptr_eq(&first.endpoints[0].state, &second.endpoints[0].state),
            "health of .1 kept"
        );
        assert_eq!(second.endpoints[1].entry.addr.to_string(), "10.0.0.3:80");
        let limiters = (first.limiter.as_ref(), second.limiter.as_ref());
        assert!(
            matches!(limiters, (Some(a), Some(b)) if Arc::ptr_eq(a, b)),
            "bucket kept"
        );
        assert!(
            Arc::ptr_eq(&first.upstreams, &second.upstreams),
            "pooled connections kept"
        );
        assert_eq!(
            second.rules.request_timeout,
            std::time::Duration::from_secs(1)
        );
        // The old snapshot is unchanged for requests that still hold it.
        assert_eq!(
            first.rules.request_timeout,
            std::time::Duration::from_secs(3)
        );
        let c3 = config("[\"10.0.0.1:80\"]", "{rate_limit: 20/s}");
        traffic.update(&c3, &MeshModel::build(&c3, Some(&m2)));
        let third = traffic.route(1).expect("route");
        let limiters = (second.limiter.as_ref(), third.limiter.as_ref());
        assert!(
            matches!(limiters, (Some(a), Some(b)) if !Arc::ptr_eq(a, b)),
            "new rate, new bucket"
        );
        let kept = traffic.endpoints.lock().expect("lock").len();
        assert_eq!(kept, 1, "state of endpoints that left is dropped");
    }
}
