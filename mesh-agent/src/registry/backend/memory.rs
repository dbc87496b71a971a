//! `file` and `embedded` backends: the catalog lives in this agent. `embedded` is the single-node
//! registry; what survives a restart is kept by the local agent's registrations file
//! (see `registry::agent`), which re-registers everything at start.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Backend, BackendError};
use crate::registry::catalog::Catalog;
use crate::registry::instance::{Instance, NodeRecord};
use crate::registry::mesh_state::MeshObjects;

pub struct MemoryBackend {
    kind: &'static str,
    catalog: watch::Sender<Arc<Catalog>>,
}

impl MemoryBackend {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            catalog: watch::Sender::new(Arc::new(Catalog::default())),
        }
    }

    fn change(&self, f: impl FnOnce(&mut Catalog) -> bool) {
        self.catalog.send_if_modified(|current| {
            let mut next = (**current).clone();
            if !f(&mut next) {
                return false;
            }
            next.index += 1;
            *current = Arc::new(next);
            true
        });
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog.subscribe()
    }

    fn connected(&self) -> bool {
        true
    }

    async fn put_instance(&self, instance: &Instance) -> Result<(), BackendError> {
        self.change(|c| c.insert(instance.clone()));
        Ok(())
    }

    async fn delete_instance(&self, service: &str, instance_id: &str) -> Result<(), BackendError> {
        self.change(|c| c.remove(service, instance_id));
        Ok(())
    }

    async fn put_node(&self, node: &NodeRecord) -> Result<(), BackendError> {
        self.change(|c| c.nodes.insert(node.name.clone(), node.clone()) != Some(node.clone()));
        Ok(())
    }

    async fn delete_node(&self, name: &str) -> Result<(), BackendError> {
        self.change(|c| c.nodes.remove(name).is_some());
        Ok(())
    }

    async fn put_mesh(&self, objects: &MeshObjects) -> Result<(), BackendError> {
        self.change(|c| {
            let before = c.mesh.clone();
            c.mesh.services.extend(objects.services.clone());
            c.mesh.workloads.extend(objects.workloads.clone());
            c.mesh != before
        });
        Ok(())
    }

    async fn delete_mesh(&self, objects: &MeshObjects) -> Result<(), BackendError> {
        self.change(|c| {
            let before = c.mesh.clone();
            c.mesh
                .services
                .retain(|k, _| !objects.services.contains_key(k));
            c.mesh
                .workloads
                .retain(|k, _| !objects.workloads.contains_key(k));
            c.mesh != before
        });
        Ok(())
    }
}
