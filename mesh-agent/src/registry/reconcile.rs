//! The one reconciler: mesh state = the config file's services/workloads/policy (bootstrap +
//! file backend) merged with the registry's nodes and passing instances. Config changes go
//! through the reload path (which owns kernel changes); registry changes only re-publish the
//! model's endpoint sets and peer nodes and write the changed entries of the kernel's ENDPOINTS
//! map (registry endpoint address -> service), so endpoint churn never rewrites the kernel
//! service map, re-issues certificates or recompiles authorization.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use tokio::sync::watch;

use super::catalog::Catalog;
use super::instance::HealthStatus;
use super::mesh_state::{self, MeshObjects};
use super::model::{EndpointEntry, MeshModel};
use crate::config::{Config, PeerNode};
use crate::state::AgentState;

/// Inputs of the reconciler, kept in the agent state.
#[derive(Default)]
pub struct MeshSource {
    /// The config file as loaded (without registry-derived peers).
    base: RwLock<Option<Arc<Config>>>,
    catalog: OnceLock<watch::Receiver<Arc<Catalog>>>,
    /// Serializes reload and registry updates so neither publishes over the other.
    lock: Mutex<()>,
    /// Registry-driven model publications (endpoint churn applied).
    pub updates: AtomicU64,
    /// Registry mesh objects (services, workloads) last applied to the kernel and security.
    applied_mesh: Mutex<MeshObjects>,
    /// Registry mesh-object changes applied (these do write the kernel and may issue certs).
    pub mesh_applies: AtomicU64,
}

impl MeshSource {
    pub fn init(&self, base: Config, catalog: watch::Receiver<Arc<Catalog>>) {
        *self.base.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(base));
        *self.applied_mesh.lock().unwrap_or_else(|p| p.into_inner()) =
            catalog.borrow().mesh.clone();
        let _ = self.catalog.set(catalog);
    }

    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_base(&self, base: Config) {
        *self.base.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(base));
    }

    pub fn base(&self) -> Option<Arc<Config>> {
        self.base.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .get()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default()
    }

    /// The effective config and model for `base` with the current registry view.
    pub fn effective(&self, base: &Config, previous: Option<&MeshModel>) -> (Config, MeshModel) {
        effective(base, &self.catalog(), previous)
    }
}

/// Merges the registry into `base`: operator-defined services and this node's workloads (the
/// file wins a clash; invalid objects are left out whole), peers from node records, endpoints
/// from passing instances.
pub fn effective(
    base: &Config,
    catalog: &Catalog,
    previous: Option<&MeshModel>,
) -> (Config, MeshModel) {
    let (mut config, refused) = mesh_state::merge(base, &catalog.mesh);
    let mut known: HashSet<String> = config.nodes.iter().map(|n| n.name.clone()).collect();
    for node in catalog.nodes.values() {
        if node.name != base.node.name && known.insert(node.name.clone()) {
            config.nodes.push(PeerNode {
                name: node.name.clone(),
                hbone: node.hbone,
            });
        }
    }
    let mut model = MeshModel::build(&config, previous);
    for error in &refused {
        *model.refused_objects.entry(error.kind()).or_default() += 1;
    }
    for service in model.services.values_mut() {
        for i in catalog.service(&service.name, true) {
            debug_assert_eq!(i.status, HealthStatus::Passing);
            let addr = std::net::SocketAddrV4::new(i.address, i.port);
            let node = if i.node == base.node.name || i.node.is_empty() {
                None
            } else if known.contains(&i.node) {
                Some(i.node.clone())
            } else {
                // No route to an unknown node's agent: not offered to the load balancer.
                continue;
            };
            if service.endpoints.iter().any(|e| e.addr == addr) {
                continue;
            }
            service.endpoints.push(EndpointEntry {
                addr,
                node,
                // An instance without a zone is in its node's zone.
                zone: i
                    .zone
                    .clone()
                    .or_else(|| catalog.nodes.get(&i.node).and_then(|n| n.zone.clone())),
                weight: i.weight,
            });
        }
    }
    (config, model)
}

/// Runs until the catalog's sender is gone: re-publishes the model on every registry change.
pub async fn run(state: Arc<AgentState>, mut catalog: watch::Receiver<Arc<Catalog>>) {
    while catalog.changed().await.is_ok() {
        let _guard = state.mesh.lock();
        let Some(base) = state.mesh.base() else {
            continue;
        };
        let snapshot = catalog.borrow_and_update().clone();
        if apply_mesh_objects(&state, &base, &snapshot) {
            continue;
        }
        let previous = state.model();
        let (config, model) = effective(&base, &snapshot, Some(&previous));
        // Churn in services this node does not route changes nothing here: keep the published
        // model (and the balancers' cursors) as they are.
        if unchanged(&state.config(), &previous, &config, &model) {
            continue;
        }
        let endpoints: usize = model.services.values().map(|s| s.endpoints.len()).sum();
        sync_endpoint_map(&state, &model);
        state.publish(config, model);
        state.mesh.updates.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(endpoints, "registry change applied to the endpoint sets");
    }
}

/// Writes the ENDPOINTS entries that changed with the registry (a new endpoint is in the kernel
/// before it is routed); the SERVICES entries last synced give each one its service's value.
fn sync_endpoint_map(state: &AgentState, model: &MeshModel) {
    let result = state.with_kernel(|k| {
        let desired = crate::app::endpoint_entries(model, k.maps.services());
        k.maps.sync_endpoints(&desired)
    });
    match result {
        Some(Ok(stats)) => tracing::debug!(
            written = stats.written,
            removed = stats.removed,
            "kernel endpoint map updated"
        ),
        Some(Err(error)) => tracing::error!(%error, "kernel endpoint map update failed"),
        None => {}
    }
}

/// When the registry's mesh objects changed, applies them through the full path (kernel,
/// certificates, authorization), as a config reload does; returns whether it did. Refused
/// objects are logged with the field at fault and the rest is applied.
fn apply_mesh_objects(state: &AgentState, base: &Arc<Config>, catalog: &Catalog) -> bool {
    let mut applied = state
        .mesh
        .applied_mesh
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if *applied == catalog.mesh {
        return false;
    }
    *applied = catalog.mesh.clone();
    drop(applied);
    for error in mesh_state::merge(base, &catalog.mesh).1 {
        tracing::error!(%error, "registry mesh object refused");
    }
    match crate::app::apply_mesh_state(state, (**base).clone()) {
        Ok(()) => {
            state.mesh.mesh_applies.fetch_add(1, Ordering::Relaxed);
            state.metrics.config_generation.inc();
            tracing::info!(
                services = catalog.mesh.services.len(),
                workloads = catalog.mesh.workloads.len(),
                "registry mesh objects applied"
            );
        }
        Err(error) => {
            tracing::error!(%error, "registry mesh objects not applied; keeping the previous state")
        }
    }
    true
}

/// Whether the routed view (peers and every service's endpoint set) is the same.
fn unchanged(old_config: &Config, old: &MeshModel, config: &Config, model: &MeshModel) -> bool {
    old_config.nodes == config.nodes
        && old.services.len() == model.services.len()
        && model.services.iter().all(|(name, s)| {
            old.services
                .get(name)
                .is_some_and(|o| o.endpoints == s.endpoints)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::instance::{Instance, NodeRecord};

    fn base() -> Config {
        let yaml = "node: {name: n1, agent_ip: 10.1.255.1}\n\
                    services:\n  - {name: wallet, vip: 10.96.0.5:80, endpoints: [\"10.1.1.9:80\"]}\n";
        crate::config::parse(yaml, "test", &|_| None).expect("config")
    }

    fn instance(id: &str, node: &str, status: HealthStatus) -> Instance {
        Instance {
            service_name: "wallet".into(),
            service_version: "1".into(),
            service_type: "http".into(),
            environment: "prod".into(),
            instance_id: id.into(),
            address: "10.2.1.2".parse().expect("ip"),
            port: 8000 + id.len() as u16,
            region: None,
            zone: Some("z1".into()),
            deployment_id: None,
            capabilities: vec![],
            tags: vec![],
            meta: Default::default(),
            weight: 3,
            node: node.into(),
            owner: String::new(),
            status,
        }
    }

    #[test]
    fn passing_instances_become_endpoints_and_nodes_become_peers() {
        let mut catalog = Catalog::default();
        catalog.nodes.insert(
            "n2".into(),
            NodeRecord {
                name: "n2".into(),
                hbone: "10.2.255.1:15008".parse().expect("addr"),
                zone: Some("z2".into()),
            },
        );
        let mut zoneless = instance("a", "n2", HealthStatus::Passing);
        zoneless.zone = None;
        for i in [
            zoneless,
            instance("bb", "n2", HealthStatus::Critical),
            instance("ccc", "n3", HealthStatus::Passing),
            instance("dddd", "n1", HealthStatus::Passing),
        ] {
            catalog.insert(i);
        }
        let before = MeshModel::build(&base(), None);
        let (config, model) = effective(&base(), &catalog, Some(&before));
        assert_eq!(config.nodes.len(), 1, "n2 joined from the registry");
        let wallet = &model.services["wallet"];
        assert_eq!(
            wallet.id, before.services["wallet"].id,
            "kernel id unchanged"
        );
        let got: Vec<_> = wallet
            .endpoints
            .iter()
            .map(|e| (e.addr.port(), e.node.clone(), e.weight, e.zone.clone()))
            .collect();
        let z = |s: &str| Some(s.to_owned());
        assert_eq!(
            got,
            vec![
                (80, None, 1, None),
                (8001, z("n2"), 3, z("z2")),
                (8004, None, 3, z("z1"))
            ],
            "static endpoint kept; critical and unknown-node instances left out; own node local"
        );
    }
}
