//! `file` and `embedded` backends: the catalog lives in this agent. `embedded` is the single-node
//! registry; what survives a restart is kept in the state directory: the local agent's
//! registrations file (see `registry::agent`, re-registered at start) and the operator's mesh
//! objects file (a mesh document, loaded here at start and rewritten on every change).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Backend, BackendError};
use crate::registry::catalog::Catalog;
use crate::registry::instance::{Instance, NodeRecord};
use crate::registry::mesh_state::{MeshDocument, MeshObjects};

pub struct MemoryBackend {
    kind: &'static str,
    catalog: watch::Sender<Arc<Catalog>>,
    /// Where mesh objects are persisted (none: kept in memory only).
    mesh_file: Option<PathBuf>,
    /// Serializes mesh writes so the file and the catalog never disagree.
    mesh_write: Mutex<()>,
}

impl MemoryBackend {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            catalog: watch::Sender::new(Arc::new(Catalog::default())),
            mesh_file: None,
            mesh_write: Mutex::new(()),
        }
    }

    /// A backend whose mesh objects live in `path` (loaded now; an unreadable file is logged
    /// and the registry starts without mesh objects rather than not at all).
    pub fn with_mesh_file(kind: &'static str, path: PathBuf) -> Self {
        let backend = Self {
            mesh_file: Some(path.clone()),
            ..Self::new(kind)
        };
        let loaded = match std::fs::read_to_string(&path) {
            Ok(text) => MeshDocument::parse(&text).map(|d| d.objects()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MeshObjects::default()),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "reading the mesh objects file; starting without them");
                Ok(MeshObjects::default())
            }
        };
        match loaded {
            Ok(mesh) => backend.change(|c| {
                c.mesh = mesh;
                c.mesh != MeshObjects::default()
            }),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "unreadable mesh objects file; starting without them")
            }
        }
        backend
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

    /// Computes the next mesh objects, saves them (if persistent), then publishes them: a write
    /// that cannot be saved changes nothing.
    fn change_mesh(&self, f: impl FnOnce(&mut MeshObjects)) -> Result<(), BackendError> {
        let _serialized = self.mesh_write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.catalog.borrow().mesh.clone();
        f(&mut next);
        if next == self.catalog.borrow().mesh {
            return Ok(());
        }
        if let Some(path) = &self.mesh_file {
            let text = serde_json::to_string_pretty(&MeshDocument::from_objects(&next))
                .unwrap_or_default();
            crate::atomic_file::write_atomically(path, text.as_bytes(), 0o600).map_err(|e| {
                BackendError::Persist {
                    backend: self.kind,
                    message: e.to_string(),
                }
            })?;
        }
        self.change(|c| {
            c.mesh = next;
            true
        });
        Ok(())
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
        self.change_mesh(|mesh| {
            mesh.services.extend(objects.services.clone());
            mesh.workloads.extend(objects.workloads.clone());
        })
    }

    async fn delete_mesh(&self, objects: &MeshObjects) -> Result<(), BackendError> {
        self.change_mesh(|mesh| {
            mesh.services
                .retain(|k, _| !objects.services.contains_key(k));
            mesh.workloads
                .retain(|k, _| !objects.workloads.contains_key(k));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mesh_objects_survive_a_new_backend_on_the_same_file() {
        let dir = std::env::temp_dir().join(format!("nodemesh-mesh-file-{}", std::process::id()));
        let path = dir.join("mesh.json");
        let objects = MeshDocument::parse(
            "services:\n  - {name: ledger, vip: 10.96.0.6:80}\n\
             workloads:\n  n1: [{name: ledger, service_account: ledger, cgroup: /x/ledger}]\n",
        )
        .expect("document")
        .objects();
        let first = MemoryBackend::with_mesh_file("embedded", path.clone());
        first.put_mesh(&objects).await.expect("put");
        let restarted = MemoryBackend::with_mesh_file("embedded", path.clone());
        assert_eq!(restarted.subscribe().borrow().mesh, objects);

        let service_only = MeshObjects {
            services: objects.services.clone(),
            ..MeshObjects::default()
        };
        restarted.delete_mesh(&service_only).await.expect("delete");
        let again = MemoryBackend::with_mesh_file("embedded", path);
        let mesh = again.subscribe().borrow().mesh.clone();
        assert!(mesh.services.is_empty(), "the delete was saved too");
        assert_eq!(mesh.workloads, objects.workloads);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
