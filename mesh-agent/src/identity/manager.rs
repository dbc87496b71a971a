//! Keeps exactly the configured local identities certified: issues the first certificate
//! synchronously (so the agent is ready with valid certificates) and runs one rotation task per
//! identity, stopping the tasks of identities that left the config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{
    spawn_rotation, CertIssuer, CertStore, IdentityError, MeshCa, RotationConfig, SpiffeId,
    TrustBundle, WorkloadSpec,
};

struct Rotation {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct IdentityManager {
    issuer: Arc<dyn CertIssuer>,
    /// The roots peers' chains must verify against.
    trust: Arc<TrustBundle>,
    store: Arc<CertStore>,
    rotation: RotationConfig,
    tasks: Mutex<HashMap<SpiffeId, Rotation>>,
}

impl IdentityManager {
    /// Issues with a CA held in this process (single-node default).
    pub fn new(ca: MeshCa, rotation: RotationConfig) -> Result<Self, IdentityError> {
        let trust = TrustBundle::new(vec![ca.cert_der().clone()])?;
        Ok(Self::with_issuer(
            Arc::new(ca),
            trust,
            Arc::new(CertStore::new()),
            rotation,
        ))
    }

    /// Issues through `issuer` (e.g. the remote CA service); `store` may already hold
    /// certificates (the node's bootstrap certificate).
    pub fn with_issuer(
        issuer: Arc<dyn CertIssuer>,
        trust: Arc<TrustBundle>,
        store: Arc<CertStore>,
        rotation: RotationConfig,
    ) -> Self {
        Self {
            issuer,
            trust,
            store,
            rotation,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    pub fn trust(&self) -> &Arc<TrustBundle> {
        &self.trust
    }

    pub fn store(&self) -> Arc<CertStore> {
        Arc::clone(&self.store)
    }

    /// Certifies every spec in `wanted` not yet held and forgets the identities not wanted. The
    /// new certificates are all issued before anything is started, so an error changes nothing.
    pub fn reconcile(&self, wanted: &[WorkloadSpec]) -> Result<(), IdentityError> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let fresh: Vec<&WorkloadSpec> = wanted
            .iter()
            .filter(|s| !tasks.contains_key(&s.id))
            .collect();
        let issued = fresh
            .iter()
            .map(|spec| self.issuer.issue(spec, self.rotation.ttl))
            .collect::<Result<Vec<_>, _>>()?;
        for (spec, cert) in fresh.into_iter().zip(issued) {
            self.store.insert(cert)?;
            let (stop, stopped) = watch::channel(false);
            let task = spawn_rotation(
                self.issuer.clone(),
                self.store(),
                spec.clone(),
                self.rotation,
                stopped,
            );
            tasks.insert(spec.id.clone(), Rotation { stop, task });
        }
        let gone: Vec<SpiffeId> = tasks
            .keys()
            .filter(|id| !wanted.iter().any(|s| &s.id == *id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(r) = tasks.remove(&id) {
                let _ = r.stop.send(true);
                r.task.abort();
            }
            self.store.remove(&id);
        }
        Ok(())
    }

    /// Stops every rotation task.
    pub fn shutdown(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for (_, r) in tasks.drain() {
            let _ = r.stop.send(true);
            r.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(sa: &str) -> WorkloadSpec {
        WorkloadSpec {
            id: SpiffeId::new("cluster.local", "demo", sa).expect("valid id"),
            service: sa.to_owned(),
        }
    }

    #[tokio::test]
    async fn reconcile_certifies_new_identities_and_forgets_removed_ones() {
        let ca = MeshCa::generate("cluster.local").expect("ca");
        let rotation = RotationConfig {
            ttl: Duration::from_secs(3600),
            ..Default::default()
        };
        let manager = IdentityManager::new(ca, rotation).expect("manager");
        manager.reconcile(&[spec("a"), spec("b")]).expect("issued");
        let store = manager.store();
        assert!(store.get(&spec("a").id).is_some() && store.get(&spec("b").id).is_some());
        let a_before = store.get(&spec("a").id).expect("a").not_after;

        manager.reconcile(&[spec("a"), spec("c")]).expect("issued");
        assert!(store.get(&spec("b").id).is_none(), "b should be forgotten");
        assert!(store.get(&spec("c").id).is_some());
        assert_eq!(
            store.get(&spec("a").id).expect("a").not_after,
            a_before,
            "a is not re-issued"
        );
        manager.shutdown();
    }
}
