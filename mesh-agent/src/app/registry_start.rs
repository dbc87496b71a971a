//! Start-up of the registry: the configured backend, the local agent with the registrations
//! saved in the state directory, and this node's announcement.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, RegistryBackendKind};
use crate::registry::agent::LocalAgent;
use crate::registry::backend::{Backend, EtcdBackend, EtcdSettings, MemoryBackend};
use crate::registry::instance::NodeRecord;

/// How long start-up waits for the first etcd sync; after that the agent starts with what it
/// has and the cache fills when etcd answers.
const FIRST_SYNC: Duration = Duration::from_secs(3);

pub async fn start(config: &Config) -> Arc<LocalAgent> {
    let r = &config.registry;
    let backend: Arc<dyn Backend> = match r.backend {
        RegistryBackendKind::File => Arc::new(MemoryBackend::new("file")),
        // Operator-defined mesh objects outlive the agent, like its registrations.
        RegistryBackendKind::Embedded => Arc::new(MemoryBackend::with_mesh_file(
            "embedded",
            config.identity.state_dir.join("mesh.json"),
        )),
        RegistryBackendKind::Etcd => {
            let etcd = EtcdBackend::start(
                EtcdSettings {
                    endpoints: r.etcd.endpoints.clone(),
                    prefix: r.etcd.prefix.clone(),
                    lease_ttl: r.etcd.lease_ttl,
                },
                r.cache_ttl,
            );
            if !etcd.wait_synced(FIRST_SYNC).await {
                tracing::warn!(endpoints = ?r.etcd.endpoints, "etcd not reachable at start; continuing, will sync when it answers");
            }
            etcd
        }
    };
    // The file backend keeps nothing across restarts; the others re-register what was saved.
    let state_file = (r.backend != RegistryBackendKind::File)
        .then(|| config.identity.state_dir.join("registrations.json"));
    let agent = LocalAgent::new(
        backend,
        config.node.name.clone(),
        config.node.agent_ip,
        r.health.clone(),
        state_file,
    );
    let restored = agent.restore().await;
    if restored > 0 {
        tracing::info!(restored, "registrations restored from the state directory");
    }
    agent
}

/// Announces this node (its HBONE address and zone) so other nodes can reach it.
pub async fn announce(agent: &LocalAgent, config: &Config) {
    let hbone = if config.listen.hbone.ip().is_unspecified() {
        SocketAddr::from((config.node.agent_ip, config.listen.hbone.port()))
    } else {
        config.listen.hbone
    };
    let node = NodeRecord {
        name: config.node.name.clone(),
        hbone,
        zone: config.node.zone.clone(),
    };
    if let Err(e) = agent.announce_node(node).await {
        tracing::warn!(error = %e, "announcing this node in the registry");
    }
}
