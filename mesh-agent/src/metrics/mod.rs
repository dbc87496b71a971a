//! Agent counters and their Prometheus text rendering (kernel counters are read at scrape time).

pub mod kernel_traffic;
mod render;

pub use render::PromWriter;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters of one destination service on the outbound path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub connections: u64,
    pub bytes_to_endpoint: u64,
    pub bytes_from_endpoint: u64,
    pub connect_failures: u64,
    /// Connections refused by authorization (this node's or the destination agent's).
    pub denied: u64,
    /// Connections carried to another node over HBONE.
    pub hbone_connections: u64,
}

#[derive(Debug, Default)]
pub struct AgentMetrics {
    pub outbound_accepted: AtomicU64,
    pub outbound_active: AtomicU64,
    /// Accepted connections with no recorded original destination (not captured by us).
    pub outbound_unknown_destination: AtomicU64,
    pub outbound_no_endpoints: AtomicU64,
    pub config_reloads_ok: AtomicU64,
    pub config_reloads_failed: AtomicU64,
    pub config_generation: AtomicU64,
    per_service: Mutex<BTreeMap<String, ServiceTraffic>>,
}

impl AgentMetrics {
    pub fn record_service(&self, service: &str, update: impl FnOnce(&mut ServiceTraffic)) {
        let mut map = self.per_service.lock().unwrap_or_else(|p| p.into_inner());
        update(map.entry(service.to_owned()).or_default());
    }

    pub fn services(&self) -> BTreeMap<String, ServiceTraffic> {
        self.per_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
