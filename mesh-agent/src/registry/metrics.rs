//! Registry metrics, read at scrape time from the discovery cache and the reconciler.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::metrics::scrape::{collect_refilled, descs, set_counter};
use crate::state::AgentState;

pub struct RegistryCollector {
    state: Weak<AgentState>,
    scraping: Mutex<()>,
    connected: IntGaugeVec,
    instances: IntGaugeVec,
    updates: IntCounter,
    /// Registry mesh objects the reconciler leaves out (invalid, or clashing with the node file).
    refused: IntGaugeVec,
    /// Kernel ENDPOINTS map: entries, entries left out because it is full, writes per map.
    endpoint_entries: IntGauge,
    endpoints_overflow: IntGauge,
    map_writes: IntCounterVec,
}

impl RegistryCollector {
    /// Holds the state weakly: the state owns the registry this collector is registered in.
    pub fn new(state: Weak<AgentState>) -> Self {
        let gauge_vec = |name: &str, help: &str, label: &str| {
            IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric name")
        };
        Self {
            state,
            scraping: Mutex::new(()),
            connected: gauge_vec(
                "nodemesh_registry_backend_connected",
                "1 when the registry cache is in sync with its backend, 0 while serving the last known view (extend-cache).",
                "backend",
            ),
            instances: gauge_vec(
                "nodemesh_registry_instances",
                "Instances in the registry cache by health status.",
                "status",
            ),
            updates: IntCounter::new(
                "nodemesh_registry_updates_total",
                "Registry changes applied to the endpoint sets (no kernel, certificate or authz change).",
            )
            .expect("valid metric name"),
            refused: gauge_vec(
                "nodemesh_registry_objects_refused",
                "Registry mesh objects (ctl apply) this agent leaves out now, by kind: invalid, or clashing with the node's file (which wins).",
                "kind",
            ),
            endpoint_entries: IntGauge::new(
                "nodemesh_kernel_endpoint_entries",
                "Registry endpoint addresses in the kernel ENDPOINTS map (direct dials to them meet their service's allow-list).",
            )
            .expect("valid metric name"),
            endpoints_overflow: IntGauge::new(
                "nodemesh_kernel_endpoints_overflow",
                "Registry endpoint addresses left out of the kernel ENDPOINTS map because it is full (0 when all fit).",
            )
            .expect("valid metric name"),
            map_writes: IntCounterVec::new(
                Opts::new(
                    "nodemesh_kernel_map_writes_total",
                    "Entries the agent wrote or removed in the kernel SERVICES and ENDPOINTS maps, by map (endpoint churn writes only ENDPOINTS).",
                ),
                &["map"],
            )
            .expect("valid metric name"),
        }
    }

    fn collectors(&self) -> [&dyn Collector; 7] {
        [
            &self.connected,
            &self.instances,
            &self.updates,
            &self.refused,
            &self.endpoint_entries,
            &self.endpoints_overflow,
            &self.map_writes,
        ]
    }

    fn refill_kernel(&self, state: &AgentState) {
        state.with_kernel(|k| {
            let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.endpoint_entries.set(gauge(k.maps.endpoint_entries()));
            self.endpoints_overflow
                .set(gauge(k.maps.endpoints_overflow()));
            for (map, n) in k.maps.writes() {
                set_counter(&self.map_writes.with_label_values(&[map]), *n);
            }
        });
    }

    fn refill(&self, state: &AgentState) {
        self.refill_kernel(state);
        let Some(agent) = state.registry.get() else {
            return;
        };
        self.connected.reset();
        self.connected
            .with_label_values(&[agent.backend.kind()])
            .set(i64::from(agent.backend.connected()));
        let catalog = state.mesh.catalog();
        for status in ["passing", "warning", "critical"] {
            let n = catalog
                .instances()
                .filter(|i| i.status.as_str() == status)
                .count();
            self.instances
                .with_label_values(&[status])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        set_counter(&self.updates, state.mesh.updates.load(Ordering::Relaxed));
        let model = state.model();
        for kind in ["service", "workload"] {
            let n = model.refused_objects.get(kind).copied().unwrap_or(0);
            self.refused
                .with_label_values(&[kind])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

impl Collector for RegistryCollector {
    fn desc(&self) -> Vec<&Desc> {
        descs(self.collectors())
    }

    fn collect(&self) -> Vec<MetricFamily> {
        collect_refilled(
            &self.state,
            &self.scraping,
            |state| self.refill(state),
            || self.collectors(),
        )
    }
}
