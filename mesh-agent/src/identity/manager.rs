//! Keeps exactly the configured local identities certified and runs one rotation task per
//! identity, stopping the tasks of identities that left the config. With a local CA the first
//! certificate is issued synchronously (the agent starts with valid certificates). With a remote
//! CA (persisted certificates) a still valid persisted certificate is used, else the rotation
//! task asks the CA in the background, retrying with backoff: until it answers the identity is
//! [`IdentityManager::missing`] and the agent reports not ready, serving nothing for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::persisted::{CertDir, Persisting};
use super::{
    spawn_rotation_renewing, CertIssuer, CertStore, IdentityError, MeshCa, RotationConfig,
    SpiffeId, TrustBundle, WorkloadSpec,
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
    /// Where a remote CA's certificates are kept; set means first certificates come in the
    /// background.
    persisted: Option<CertDir>,
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
            None,
        ))
    }

    /// Issues through `issuer` (e.g. the remote CA service); `store` may already hold
    /// certificates (the node's bootstrap certificate). With `persisted`, every issued
    /// certificate is written there and first certificates are read from there or issued in the
    /// background.
    pub fn with_issuer(
        issuer: Arc<dyn CertIssuer>,
        trust: Arc<TrustBundle>,
        store: Arc<CertStore>,
        rotation: RotationConfig,
        persisted: Option<CertDir>,
    ) -> Self {
        let issuer: Arc<dyn CertIssuer> = match &persisted {
            Some(dir) => Arc::new(Persisting {
                inner: issuer,
                dir: dir.clone(),
            }),
            None => issuer,
        };
        Self {
            issuer,
            trust,
            store,
            rotation,
            persisted,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// The wanted identities without a currently valid certificate (not ready while any).
    pub fn missing(&self) -> Vec<SpiffeId> {
        let now = std::time::SystemTime::now();
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks
            .keys()
            .filter(|id| !self.store.get(id).is_some_and(|c| c.is_valid_at(now)))
            .cloned()
            .collect()
    }

    /// The first certificate of `spec`: issued now with a local CA; with a remote one the
    /// persisted certificate if still valid and from a root still trusted, else none (the
    /// rotation task issues it).
    fn first_certificate(
        &self,
        spec: &WorkloadSpec,
    ) -> Result<Option<super::WorkloadCert>, IdentityError> {
        match &self.persisted {
            None => self.issuer.issue(spec, self.rotation.ttl).map(Some),
            Some(dir) => Ok(dir
                .load_valid(&spec.id)
                .filter(|c| c.leaf().is_some_and(|leaf| self.trust.verifies(leaf)))),
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
            .map(|spec| self.first_certificate(spec))
            .collect::<Result<Vec<_>, _>>()?;
        for (spec, cert) in fresh.into_iter().zip(issued) {
            // Held before without a certificate of ours (the node's bootstrap certificate):
            // replaced at once, so it follows the CA's current root and `cert_ttl`.
            let renew_now = cert.is_none() && self.store.get(&spec.id).is_some();
            if let Some(cert) = cert {
                self.store.insert(cert)?;
            }
            let (stop, stopped) = watch::channel(false);
            let task = spawn_rotation_renewing(
                self.issuer.clone(),
                self.store(),
                spec.clone(),
                self.rotation,
                stopped,
                renew_now,
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
            if let Some(dir) = &self.persisted {
                dir.remove(&id);
            }
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

    /// Fails until `up` is set, then issues with its CA.
    struct Flaky {
        ca: MeshCa,
        up: std::sync::atomic::AtomicBool,
    }

    impl CertIssuer for Flaky {
        fn issue(
            &self,
            spec: &WorkloadSpec,
            ttl: Duration,
        ) -> Result<super::super::WorkloadCert, IdentityError> {
            if !self.up.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(IdentityError::Issuer("CA unreachable".into()));
            }
            self.ca.issue(spec, ttl)
        }
    }

    #[tokio::test]
    async fn a_remote_ca_down_at_first_start_leaves_the_identity_missing_until_it_answers() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = MeshCa::generate("cluster.local").expect("ca");
        let trust = TrustBundle::new(vec![ca.cert_der().clone()]).expect("trust");
        let issuer = Arc::new(Flaky {
            ca,
            up: false.into(),
        });
        let rotation = RotationConfig {
            ttl: Duration::from_secs(3600),
            backoff: super::super::Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(50),
            },
        };
        let persisted = CertDir::new(dir.path());
        let manager = IdentityManager::with_issuer(
            issuer.clone(),
            trust.clone(),
            Arc::new(CertStore::new()),
            rotation,
            Some(persisted.clone()),
        );
        manager
            .reconcile(&[spec("a")])
            .expect("no error while the CA is down");
        assert_eq!(manager.missing(), vec![spec("a").id]);
        issuer.up.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !manager.missing().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("issued once the CA answers");
        let held = manager.store().get(&spec("a").id).expect("held");
        manager.shutdown();

        // A restart while the CA is down again starts from the persisted certificate.
        issuer.up.store(false, std::sync::atomic::Ordering::SeqCst);
        let restarted = IdentityManager::with_issuer(
            issuer,
            trust,
            Arc::new(CertStore::new()),
            rotation,
            Some(persisted),
        );
        restarted.reconcile(&[spec("a")]).expect("reconciled");
        assert!(restarted.missing().is_empty());
        assert_eq!(
            restarted.store().get(&spec("a").id).expect("loaded").chain,
            held.chain
        );
        restarted.shutdown();
    }
}
