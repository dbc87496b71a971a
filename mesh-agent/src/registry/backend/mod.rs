//! Discovery backends behind one trait. Each keeps the discovery cache ([`Catalog`]) current and
//! publishes it on a watch channel; the reconciler and the Consul API only read that channel.
//! A Kubernetes backend (Services, EndpointSlices, Pods) would be one more implementation.

mod etcd;
mod memory;

pub use etcd::{EtcdBackend, EtcdSettings};
pub use memory::MemoryBackend;

use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::watch;

use super::catalog::Catalog;
use super::instance::{Instance, NodeRecord};
use super::mesh_state::MeshObjects;

#[derive(Debug, Error)]
pub enum BackendError {
    /// For backends that write through synchronously (today's keep the write and retry).
    #[error("registry backend {backend} unreachable: {message}")]
    Unreachable {
        backend: &'static str,
        message: String,
    },
    /// A backend that persists locally could not save the change (nothing was changed).
    #[error("registry backend {backend} could not save the change: {message}")]
    Persist {
        backend: &'static str,
        message: String,
    },
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// `file`, `embedded` or `etcd` (for logs, /health and metrics).
    fn kind(&self) -> &'static str;
    /// The discovery cache; receivers are woken on every change.
    fn subscribe(&self) -> watch::Receiver<Arc<Catalog>>;
    /// Whether the cache is in sync with the backend (false: serving the last known view).
    fn connected(&self) -> bool;
    /// Stores an instance this agent owns (kept alive by this agent's heartbeat).
    async fn put_instance(&self, instance: &Instance) -> Result<(), BackendError>;
    async fn delete_instance(&self, service: &str, instance_id: &str) -> Result<(), BackendError>;
    /// Announces a node (this agent's own).
    async fn put_node(&self, node: &NodeRecord) -> Result<(), BackendError>;
    async fn delete_node(&self, name: &str) -> Result<(), BackendError>;
    /// Stores operator-defined mesh objects, all or none (they outlive every agent).
    async fn put_mesh(&self, objects: &MeshObjects) -> Result<(), BackendError>;
    /// Deletes operator-defined mesh objects (only the keys of `objects` matter).
    async fn delete_mesh(&self, objects: &MeshObjects) -> Result<(), BackendError>;
}
