//! The current certificate of every local workload. Rotation swaps entries in; TLS resolvers read
//! them at handshake time. Established connections keep the key material they negotiated with,
//! so a swap only affects new handshakes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::certs::WorkloadCert;
use super::error::IdentityError;
use super::spiffe::SpiffeId;
use super::tls::crypto_provider;

struct Entry {
    cert: Arc<WorkloadCert>,
    // Parsed once at insert so handshakes do not re-parse the private key.
    certified: Arc<CertifiedKey>,
}

pub struct CertStore {
    entries: RwLock<HashMap<SpiffeId, Entry>>,
    // Bumped on every change; lets rotation observers and tests wait for a swap.
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("ids", &self.ids())
            .finish()
    }
}

impl Default for CertStore {
    fn default() -> Self {
        Self::new()
    }
}

impl CertStore {
    pub fn new() -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            generation: watch::Sender::new(0),
        }
    }

    /// Installs `cert` as the current certificate of its SPIFFE ID and returns the previous one.
    /// Fails, leaving the store unchanged, if rustls cannot use the key or it does not match.
    pub fn insert(&self, cert: WorkloadCert) -> Result<Option<Arc<WorkloadCert>>, IdentityError> {
        let id = cert.spiffe_id.clone();
        let certified =
            CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &crypto_provider())
                .map_err(|source| IdentityError::UnusableCert {
                    id: id.to_string(),
                    source,
                })?;
        let entry = Entry {
            cert: Arc::new(cert),
            certified: Arc::new(certified),
        };
        let previous = self.write().insert(id, entry).map(|e| e.cert);
        self.generation.send_modify(|g| *g += 1);
        Ok(previous)
    }

    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.read().get(id).map(|e| Arc::clone(&e.cert))
    }

    pub fn remove(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let removed = self.write().remove(id).map(|e| e.cert);
        if removed.is_some() {
            self.generation.send_modify(|g| *g += 1);
        }
        removed
    }

    pub fn ids(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self.read().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// A receiver whose value changes after every insert or removal.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub(crate) fn certified_key(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.read().get(id).map(|e| Arc::clone(&e.certified))
    }

    // A panic while holding the lock cannot leave the map half-updated (single insert/remove),
    // so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::{MeshCa, WorkloadSpec};

    #[test]
    fn insert_swaps_get_and_remove_and_notify() {
        let ca = MeshCa::generate("cluster.local").expect("ca");
        let id = SpiffeId::new("cluster.local", "shop", "web").expect("id");
        let spec = WorkloadSpec {
            id: id.clone(),
            service: "web".to_owned(),
        };
        let store = CertStore::new();
        let changes = store.subscribe();

        let first = ca.issue(&spec, Duration::from_secs(60)).expect("issue");
        assert!(store.insert(first).expect("insert").is_none());
        let held = store.get(&id).expect("present");
        let second = ca.issue(&spec, Duration::from_secs(60)).expect("issue");
        let previous = store
            .insert(second)
            .expect("insert")
            .expect("previous returned");
        assert!(Arc::ptr_eq(&previous, &held));
        // The replaced certificate stays usable by whoever still holds it.
        assert_eq!(held.spiffe_id, id);
        assert_ne!(store.get(&id).expect("present").chain, held.chain);
        assert_eq!(store.ids(), vec![id.clone()]);
        assert_eq!(*changes.borrow(), 2);

        assert!(store.remove(&id).is_some());
        assert!(store.get(&id).is_none() && store.certified_key(&id).is_none());
        assert_eq!(*changes.borrow(), 3);
    }

    #[test]
    fn insert_refuses_a_key_that_does_not_match_the_cert() {
        let ca = MeshCa::generate("cluster.local").expect("ca");
        let id = SpiffeId::new("cluster.local", "shop", "web").expect("id");
        let spec = WorkloadSpec {
            id: id.clone(),
            service: "web".to_owned(),
        };
        let mut cert = ca.issue(&spec, Duration::from_secs(60)).expect("issue");
        let other = ca.issue(&spec, Duration::from_secs(60)).expect("issue");
        cert.key = other.key;
        let err = store_err(CertStore::new().insert(cert));
        assert!(
            err.to_string()
                .contains("spiffe://cluster.local/ns/shop/sa/web"),
            "{err}"
        );
    }

    fn store_err(r: Result<Option<Arc<WorkloadCert>>, IdentityError>) -> IdentityError {
        match r {
            Ok(_) => panic!("mismatched key accepted"),
            Err(e) => e,
        }
    }
}
