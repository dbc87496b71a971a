//! `etcd` backend (etcd v3): records as JSON under `<prefix>/instances/<service>/<id>` and
//! `<prefix>/nodes/<name>`, each attached to this agent's lease. The lease's keepalive is the
//! agent's heartbeat: an agent that dies takes its records with it after `lease_ttl`. One watch
//! on the prefix keeps every agent's cache current. When etcd is unreachable the cache keeps the
//! last known view; on reconnect this agent re-puts what it owns under a fresh lease, so a
//! restarted etcd (or an expired lease) loses no registration.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};
use tokio::sync::{watch, Notify};

use super::{Backend, BackendError};
use crate::registry::catalog::Catalog;
use crate::registry::instance::{Instance, NodeRecord};
use crate::registry::mesh_state::MeshObjects;

/// Pause between reconnect attempts while etcd is down.
const RETRY: Duration = Duration::from_millis(500);
/// Longest delay between a watch event and the snapshot readers see.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);
/// Keys per page of a full sync.
const PAGE: i64 = 5000;
/// Per-request and connect timeouts: every network wait is bounded.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub lease_ttl: Duration,
}

/// What this agent registered: re-put on every (re)connect.
#[derive(Default)]
struct Owned {
    /// (service, instance_id) -> instance.
    instances: BTreeMap<(String, String), Instance>,
    nodes: BTreeMap<String, NodeRecord>,
}

pub struct EtcdBackend {
    settings: EtcdSettings,
    resync: Duration,
    owned: Mutex<Owned>,
    catalog: watch::Sender<Arc<Catalog>>,
    /// The cache being updated by watch events; `catalog` gets a snapshot of it at most every
    /// PUBLISH_EVERY, so 1,000 changes/s cost ~100 snapshots/s, not 1,000.
    working: Mutex<Catalog>,
    dirty: AtomicBool,
    connected: AtomicBool,
    /// The live session (client + lease), None while disconnected.
    session: tokio::sync::Mutex<Option<(Client, i64)>>,
    /// Wakes the session loop to reconnect after a failed write.
    broken: Notify,
}

enum Key {
    /// (service, instance_id)
    Instance(String, String),
    Node(String),
    MeshService(String),
    /// (node, workload)
    MeshWorkload(String, String),
    MeshAuthorization(String),
    /// The mesh-wide default authorization decision.
    MeshDefault,
}

impl EtcdBackend {
    /// Creates the backend and starts its session loop; does not wait for etcd.
    /// `resync`: how often the whole prefix is re-read between watch events (the cache TTL).
    pub fn start(settings: EtcdSettings, resync: Duration) -> Arc<EtcdBackend> {
        let backend = Arc::new(EtcdBackend {
            settings,
            resync,
            owned: Mutex::default(),
            catalog: watch::Sender::new(Arc::new(Catalog::default())),
            working: Mutex::default(),
            dirty: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            session: tokio::sync::Mutex::new(None),
            broken: Notify::new(),
        });
        let weak = Arc::downgrade(&backend);
        tokio::spawn(async move {
            loop {
                let Some(b) = weak.upgrade() else { return };
                if let Err(e) = b.session().await {
                    if b.connected.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "etcd unreachable; serving the cached registry (extend-cache)");
                    }
                }
                *b.session.lock().await = None;
                drop(b);
                tokio::time::sleep(RETRY).await;
            }
        });
        backend
    }

    /// Waits until the first sync with etcd finished, or `timeout` passed.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.connected() {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn key(&self, key: &Key) -> String {
        let prefix = self.settings.prefix.trim_end_matches('/');
        match key {
            Key::Instance(service, id) => format!("{prefix}/instances/{service}/{id}"),
            Key::Node(name) => format!("{prefix}/nodes/{name}"),
            Key::MeshService(name) => format!("{prefix}/mesh/services/{name}"),
            Key::MeshWorkload(node, name) => format!("{prefix}/mesh/workloads/{node}/{name}"),
            Key::MeshAuthorization(name) => format!("{prefix}/mesh/authorization/{name}"),
            Key::MeshDefault => format!("{prefix}/mesh/default"),
        }
    }

    fn parse_key(&self, key: &str) -> Option<Key> {
        let prefix = self.settings.prefix.trim_end_matches('/');
        let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
        if let Some(rest) = rest.strip_prefix("instances/") {
            let (service, id) = rest.split_once('/')?;
            Some(Key::Instance(service.to_owned(), id.to_owned()))
        } else if let Some(name) = rest.strip_prefix("mesh/services/") {
            Some(Key::MeshService(name.to_owned()))
        } else if let Some(rest) = rest.strip_prefix("mesh/workloads/") {
            let (node, name) = rest.split_once('/')?;
            Some(Key::MeshWorkload(node.to_owned(), name.to_owned()))
        } else if let Some(name) = rest.strip_prefix("mesh/authorization/") {
            Some(Key::MeshAuthorization(name.to_owned()))
        } else if rest == "mesh/default" {
            Some(Key::MeshDefault)
        } else {
            rest.strip_prefix("nodes/").map(|n| Key::Node(n.to_owned()))
        }
    }

    /// One connected session: lease, re-put owned records, full sync, then watch + keepalive
    /// until something fails.
    async fn session(&self) -> Result<(), etcd_client::Error> {
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), REQUEST_TIMEOUT);
        let mut client = Client::connect(&self.settings.endpoints, Some(options)).await?;
        let ttl = i64::try_from(self.settings.lease_ttl.as_secs().max(1)).unwrap_or(10);
        let lease = client.lease_grant(ttl, None).await?.id();
        let (instances, nodes) = {
            let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
            (
                owned.instances.values().cloned().collect::<Vec<_>>(),
                owned.nodes.values().cloned().collect::<Vec<_>>(),
            )
        };
        for i in &instances {
            put(
                &mut client,
                lease,
                self.key(&Key::Instance(
                    i.service_name.clone(),
                    i.instance_id.clone(),
                )),
                i,
            )
            .await?;
        }
        for n in &nodes {
            put(&mut client, lease, self.key(&Key::Node(n.name.clone())), n).await?;
        }
        let prefix = format!("{}/", self.settings.prefix.trim_end_matches('/'));
        let revision = self.full_sync(&mut client, &prefix).await?;
        let (_watcher, mut stream) = client
            .watch(
                prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        let (mut keeper, mut keepalive) = client.lease_keep_alive(lease).await?;
        *self.session.lock().await = Some((client.clone(), lease));
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(endpoints = ?self.settings.endpoints, lease, revision, "etcd registry in sync");

        let mut ticker = tokio::time::interval(self.settings.lease_ttl / 3);
        let mut resync = tokio::time::interval(self.resync);
        resync.tick().await;
        let mut publish = tokio::time::interval(PUBLISH_EVERY);
        loop {
            tokio::select! {
                _ = resync.tick() => {
                    // Guards against a missed event; the watch stays the fast path.
                    self.full_sync(&mut client, &prefix).await?;
                }
                _ = ticker.tick() => {
                    keeper.keep_alive().await?;
                    match tokio::time::timeout(REQUEST_TIMEOUT, keepalive.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        Ok(Err(e)) => return Err(e),
                        _ => return Err(etcd_client::Error::LeaseKeepAliveError("lease lost or keepalive timed out".into())),
                    }
                }
                events = next_events(&mut stream) => self.on_events(events?),
                _ = publish.tick() => {
                    if self.dirty.swap(false, Ordering::Relaxed) {
                        self.publish(false);
                    }
                }
                _ = self.broken.notified() => {
                    return Err(etcd_client::Error::InvalidArgs("a write failed".into()));
                }
            }
        }
    }

    /// Replaces the cache with the prefix's current content, read in pages at one revision
    /// (a single response would exceed gRPC's message limit at 100,000 instances); returns the
    /// revision read.
    async fn full_sync(
        &self,
        client: &mut Client,
        prefix: &str,
    ) -> Result<i64, etcd_client::Error> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut fresh = Catalog::default();
        let mut start = prefix.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = client.get(start.clone(), Some(options)).await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            for kv in page.kvs() {
                if let Ok(key) = kv.key_str() {
                    self.apply(&mut fresh, key, Some(kv.value()));
                }
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        let changed = {
            let mut working = self.working.lock().unwrap_or_else(|p| p.into_inner());
            let changed = !fresh.same_records(&working);
            if changed {
                *working = fresh;
            }
            changed
        };
        if changed {
            self.dirty.store(false, Ordering::Relaxed);
            self.publish(true);
        }
        Ok(revision)
    }

    /// Applies watch events to the working copy in place; published on the next tick.
    fn on_events(&self, events: Vec<(String, Option<Vec<u8>>)>) {
        let mut working = self.working.lock().unwrap_or_else(|p| p.into_inner());
        for (key, value) in &events {
            self.apply(&mut working, key, value.as_deref());
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Publishes a snapshot of the working copy (one copy of the service index, however many
    /// events it folds in).
    fn publish(&self, full: bool) {
        let mut snapshot = self
            .working
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.catalog.send_modify(|current| {
            snapshot.index = current.index + 1;
            *current = Arc::new(snapshot);
        });
        tracing::trace!(full, "registry snapshot published");
    }

    /// Applies one key's new value (None: deleted) to a catalog.
    fn apply(&self, catalog: &mut Catalog, key: &str, value: Option<&[u8]>) {
        match (self.parse_key(key), value) {
            (Some(Key::Instance(service, id)), None) => {
                catalog.remove(&service, &id);
            }
            (Some(Key::Node(name)), None) => {
                catalog.nodes.remove(&name);
            }
            (Some(Key::Instance(service, id)), Some(v)) => {
                match serde_json::from_slice::<Instance>(v) {
                    Ok(i)
                        if i.validate().is_ok()
                            && i.service_name == service
                            && i.instance_id == id =>
                    {
                        catalog.insert(i);
                    }
                    _ => tracing::warn!(key, "ignoring an invalid instance record in etcd"),
                }
            }
            (Some(Key::Node(name)), Some(v)) => match serde_json::from_slice::<NodeRecord>(v) {
                Ok(n) => {
                    catalog.nodes.insert(name, n);
                }
                Err(e) => tracing::warn!(key, error = %e, "ignoring an invalid node record"),
            },
            (Some(Key::MeshService(name)), None) => {
                catalog.mesh.services.remove(&name);
            }
            (Some(Key::MeshWorkload(node, name)), None) => {
                catalog.mesh.workloads.remove(&(node, name));
            }
            (Some(Key::MeshAuthorization(name)), None) => {
                catalog.mesh.authorization.remove(&name);
            }
            (Some(Key::MeshDefault), None) => catalog.mesh.default = None,
            (Some(Key::MeshAuthorization(name)), Some(v)) => {
                match serde_json::from_slice::<crate::policy::authz_config::PolicyConfig>(v) {
                    Ok(policy) if policy.name == name => {
                        catalog.mesh.authorization.insert(name, policy);
                    }
                    _ => tracing::warn!(key, "ignoring an invalid mesh authorization record"),
                }
            }
            (Some(Key::MeshDefault), Some(v)) => match serde_json::from_slice(v) {
                Ok(default) => catalog.mesh.default = Some(default),
                Err(_) => tracing::warn!(key, "ignoring an invalid mesh default record"),
            },
            (Some(Key::MeshService(name)), Some(v)) => {
                match serde_json::from_slice::<crate::config::Service>(v) {
                    Ok(service) if service.name == name => {
                        catalog.mesh.services.insert(name, service);
                    }
                    _ => tracing::warn!(key, "ignoring an invalid mesh service record"),
                }
            }
            (Some(Key::MeshWorkload(node, name)), Some(v)) => {
                match serde_json::from_slice::<crate::config::Workload>(v) {
                    Ok(workload) if workload.name == name => {
                        catalog.mesh.workloads.insert((node, name), workload);
                    }
                    _ => tracing::warn!(key, "ignoring an invalid mesh workload record"),
                }
            }
            (None, _) => {}
        }
    }

    /// Writes through the live session; when there is none the record waits in `owned` and is
    /// written on reconnect.
    async fn write(&self, key: Key, value: Option<serde_json::Value>) {
        let path = self.key(&key);
        // Local cache first, so this node routes its own instances even with etcd down.
        let bytes = value.as_ref().map(|v| v.to_string().into_bytes());
        {
            let mut working = self.working.lock().unwrap_or_else(|p| p.into_inner());
            self.apply(&mut working, &path, bytes.as_deref());
        }
        self.publish(false);
        let mut session = self.session.lock().await;
        let Some((client, lease)) = session.as_mut() else {
            return;
        };
        let result = match &bytes {
            Some(b) => client
                .put(path, b.clone(), Some(PutOptions::new().with_lease(*lease)))
                .await
                .map(drop),
            None => client.delete(path, None).await.map(drop),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "etcd write failed; will retry on reconnect");
            self.broken.notify_one();
        }
    }
}

impl EtcdBackend {
    /// Every key (and JSON value) of `objects`.
    fn mesh_keys(&self, objects: &MeshObjects) -> Vec<(String, Vec<u8>)> {
        let services = objects.services.iter().map(|(name, s)| {
            (
                self.key(&Key::MeshService(name.clone())),
                serde_json::to_vec(s).unwrap_or_default(),
            )
        });
        let workloads = objects.workloads.iter().map(|((node, name), w)| {
            (
                self.key(&Key::MeshWorkload(node.clone(), name.clone())),
                serde_json::to_vec(w).unwrap_or_default(),
            )
        });
        let policies = objects.authorization.iter().map(|(name, p)| {
            (
                self.key(&Key::MeshAuthorization(name.clone())),
                serde_json::to_vec(p).unwrap_or_default(),
            )
        });
        let default = objects.default.map(|d| {
            (
                self.key(&Key::MeshDefault),
                serde_json::to_vec(&d).unwrap_or_default(),
            )
        });
        services
            .chain(workloads)
            .chain(policies)
            .chain(default)
            .collect()
    }

    /// One etcd transaction (all or nothing); operator writes need etcd up, so they fail
    /// instead of waiting for a reconnect.
    async fn mesh_txn(&self, ops: Vec<TxnOp>) -> Result<(), BackendError> {
        let unreachable = |message: String| BackendError::Unreachable {
            backend: "etcd",
            message,
        };
        let mut session = self.session.lock().await;
        let Some((client, _)) = session.as_mut() else {
            return Err(unreachable("not connected".into()));
        };
        client
            .txn(Txn::new().and_then(ops))
            .await
            .map(drop)
            .map_err(|e| unreachable(e.to_string()))
    }
}

async fn put<T: serde::Serialize>(
    client: &mut Client,
    lease: i64,
    key: String,
    value: &T,
) -> Result<(), etcd_client::Error> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    client
        .put(key, body, Some(PutOptions::new().with_lease(lease)))
        .await
        .map(drop)
}

/// The next batch of (key, value or None for delete) from the watch stream.
async fn next_events(
    stream: &mut WatchStream,
) -> Result<Vec<(String, Option<Vec<u8>>)>, etcd_client::Error> {
    loop {
        let Some(resp) = stream.message().await? else {
            return Err(etcd_client::Error::WatchError("watch stream ended".into()));
        };
        if resp.canceled() {
            return Err(etcd_client::Error::WatchError("watch canceled".into()));
        }
        let events: Vec<_> = resp
            .events()
            .iter()
            .filter_map(|e| {
                let kv = e.kv()?;
                let key = kv.key_str().ok()?.to_owned();
                let value = match e.event_type() {
                    EventType::Put => Some(kv.value().to_vec()),
                    EventType::Delete => None,
                };
                Some((key, value))
            })
            .collect();
        if !events.is_empty() {
            return Ok(events);
        }
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog.subscribe()
    }

    fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    async fn put_instance(&self, instance: &Instance) -> Result<(), BackendError> {
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .instances
            .insert(
                (instance.service_name.clone(), instance.instance_id.clone()),
                instance.clone(),
            );
        let value = serde_json::to_value(instance).ok();
        let key = Key::Instance(instance.service_name.clone(), instance.instance_id.clone());
        self.write(key, value).await;
        Ok(())
    }

    async fn delete_instance(&self, service: &str, instance_id: &str) -> Result<(), BackendError> {
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .instances
            .remove(&(service.to_owned(), instance_id.to_owned()));
        let key = Key::Instance(service.to_owned(), instance_id.to_owned());
        self.write(key, None).await;
        Ok(())
    }

    async fn put_node(&self, node: &NodeRecord) -> Result<(), BackendError> {
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
            .insert(node.name.clone(), node.clone());
        self.write(
            Key::Node(node.name.clone()),
            serde_json::to_value(node).ok(),
        )
        .await;
        Ok(())
    }

    async fn delete_node(&self, name: &str) -> Result<(), BackendError> {
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
            .remove(name);
        self.write(Key::Node(name.to_owned()), None).await;
        Ok(())
    }

    async fn put_mesh(&self, objects: &MeshObjects) -> Result<(), BackendError> {
        let keys = self.mesh_keys(objects);
        let ops = keys
            .iter()
            .map(|(k, v)| TxnOp::put(k.clone(), v.clone(), None))
            .collect();
        self.mesh_txn(ops).await
    }

    async fn delete_mesh(&self, objects: &MeshObjects) -> Result<(), BackendError> {
        let ops = self
            .mesh_keys(objects)
            .into_iter()
            .map(|(k, _)| TxnOp::delete(k, None))
            .collect();
        self.mesh_txn(ops).await
    }
}
