//! The local registry agent: registrations made through this node's API, their checks (TTL and
//! active), and the aggregated status written to the backend. Registrations are kept in
//! `<state_dir>/registrations.json`, so an agent restart re-registers them and loses none.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::backend::{Backend, BackendError};
use super::health::{self, CheckKind};
use super::instance::{HealthStatus, Instance, NodeRecord, RecordError};
use crate::config::HealthDefaults;

/// How often TTL deadlines and deregister-after-critical are checked.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);
/// Bounds on what one workload can make this agent hold and run.
pub const MAX_INSTANCES_PER_IDENTITY: usize = 256;
pub const MAX_CHECKS_PER_INSTANCE: usize = 8;
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A check as registered (durations already parsed), persisted with its instance.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct CheckSpec {
    pub id: String,
    pub name: String,
    #[serde(with = "kind_text")]
    pub kind: CheckKind,
    #[serde(with = "crate::config::duration_text")]
    pub interval: Duration,
    #[serde(with = "crate::config::duration_text")]
    pub timeout: Duration,
    #[serde(with = "crate::config::duration_text")]
    pub deregister_after: Duration,
    pub initial: HealthStatus,
}

/// One registration: the instance and its checks.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Registration {
    pub instance: Instance,
    pub checks: Vec<CheckSpec>,
}

/// Live state of one check.
#[derive(Clone, Debug)]
pub struct CheckState {
    pub spec: CheckSpec,
    pub service_id: String,
    pub status: HealthStatus,
    pub output: String,
    ttl_deadline: Option<Instant>,
    critical_since: Option<Instant>,
}

struct Local {
    registration: Registration,
    checks: Vec<CheckState>,
    tasks: Vec<tokio::task::AbortHandle>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("unknown {what} {id:?}")]
    NotFound { what: &'static str, id: String },
    #[error("check {id:?} is not a TTL check")]
    NotTtl { id: String },
    #[error("{owner} already holds {MAX_INSTANCES_PER_IDENTITY} instances on this node")]
    TooMany { owner: String },
    #[error("instance {id:?} belongs to {owner}, not to the caller {caller}")]
    Forbidden {
        id: String,
        owner: String,
        caller: String,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub struct LocalAgent {
    pub backend: Arc<dyn Backend>,
    pub node: String,
    pub agent_ip: Ipv4Addr,
    pub defaults: HealthDefaults,
    state_file: Option<PathBuf>,
    locals: Mutex<BTreeMap<String, Local>>,
    /// Orders backend writes (see `push`).
    writes: tokio::sync::Mutex<()>,
}

impl LocalAgent {
    pub fn new(
        backend: Arc<dyn Backend>,
        node: String,
        agent_ip: Ipv4Addr,
        defaults: HealthDefaults,
        state_file: Option<PathBuf>,
    ) -> Arc<LocalAgent> {
        let agent = Arc::new(LocalAgent {
            backend,
            node,
            agent_ip,
            defaults,
            state_file,
            locals: Mutex::new(BTreeMap::new()),
            writes: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&agent);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SUPERVISE_EVERY);
            loop {
                ticker.tick().await;
                let Some(agent) = weak.upgrade() else { return };
                agent.supervise().await;
            }
        });
        agent
    }

    /// Re-registers what the state file holds (after a restart).
    pub async fn restore(self: &Arc<Self>) -> usize {
        let Some(path) = &self.state_file else {
            return 0;
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return 0;
        };
        let saved: Vec<Registration> = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "unreadable registrations file; starting empty");
                return 0;
            }
        };
        let n = saved.len();
        for r in saved {
            if let Err(e) = self.register(r).await {
                tracing::warn!(error = %e, "a saved registration was refused");
            }
        }
        n
    }

    pub async fn announce_node(&self, node: NodeRecord) -> Result<(), BackendError> {
        self.backend.put_node(&node).await
    }

    /// Registers (or replaces) an instance owned by this node; checks start at once.
    pub async fn register(
        self: &Arc<Self>,
        mut registration: Registration,
    ) -> Result<(), AgentError> {
        registration.instance.node = self.node.clone();
        registration.instance.validate()?;
        if registration.checks.len() > MAX_CHECKS_PER_INSTANCE {
            return Err(RecordError::new(
                "Checks",
                format!("at most {MAX_CHECKS_PER_INSTANCE} checks per instance"),
            )
            .into());
        }
        if let Some(c) = registration
            .checks
            .iter()
            .find(|c| c.interval < MIN_CHECK_INTERVAL)
        {
            return Err(RecordError::new(
                format!("Check {}: Interval", c.id),
                format!("must be at least {MIN_CHECK_INTERVAL:?}"),
            )
            .into());
        }
        let id = registration.instance.instance_id.clone();
        // An instance id another identity (on any node) holds cannot be taken over.
        if let Some(existing) = self
            .backend
            .subscribe()
            .borrow()
            .get(&registration.instance.service_name, &id)
        {
            if existing.owner != registration.instance.owner {
                return Err(AgentError::Forbidden {
                    id,
                    owner: existing.owner.clone(),
                    caller: registration.instance.owner.clone(),
                });
            }
        }
        {
            let locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
            let owner = &registration.instance.owner;
            let held = locals
                .values()
                .filter(|l| &l.registration.instance.owner == owner)
                .count();
            if !locals.contains_key(&id) && held >= MAX_INSTANCES_PER_IDENTITY {
                return Err(AgentError::TooMany {
                    owner: owner.clone(),
                });
            }
            if let Some(existing) = locals.get(&id) {
                let owner = &existing.registration.instance.owner;
                if owner != &registration.instance.owner {
                    return Err(AgentError::Forbidden {
                        id,
                        owner: owner.clone(),
                        caller: registration.instance.owner.clone(),
                    });
                }
            }
        }
        let now = Instant::now();
        let checks: Vec<CheckState> = registration
            .checks
            .iter()
            .map(|spec| CheckState {
                spec: spec.clone(),
                service_id: id.clone(),
                status: spec.initial,
                output: String::new(),
                ttl_deadline: match spec.kind {
                    CheckKind::Ttl(ttl) => Some(now + ttl),
                    _ => None,
                },
                critical_since: (spec.initial == HealthStatus::Critical).then_some(now),
            })
            .collect();
        registration.instance.status = aggregate(&checks);
        let mut tasks = Vec::new();
        for spec in &registration.checks {
            if !matches!(spec.kind, CheckKind::Ttl(_)) {
                tasks.push(self.spawn_check(id.clone(), spec.clone()));
            }
        }
        let instance = registration.instance.clone();
        let old = self
            .locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                Local {
                    registration,
                    checks,
                    tasks,
                },
            );
        if let Some(old) = old {
            old.tasks.iter().for_each(|t| t.abort());
        }
        self.save();
        self.push(&id).await?;
        tracing::info!(instance = %id, service = %instance.service_name, owner = %instance.owner, "instance registered");
        Ok(())
    }

    /// Removes an instance; `caller` must own it (None: the agent itself).
    pub async fn deregister(&self, id: &str, caller: Option<&str>) -> Result<(), AgentError> {
        let service = {
            let mut locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
            let Some(local) = locals.get(id) else {
                return Err(AgentError::NotFound {
                    what: "service",
                    id: id.to_owned(),
                });
            };
            check_owner(id, &local.registration.instance.owner, caller)?;
            let service = local.registration.instance.service_name.clone();
            if let Some(local) = locals.remove(id) {
                local.tasks.iter().for_each(|t| t.abort());
            }
            service
        };
        self.save();
        {
            let _ordered = self.writes.lock().await;
            self.backend.delete_instance(&service, id).await?;
        }
        tracing::info!(instance = %id, "instance deregistered");
        Ok(())
    }

    /// TTL heartbeat: sets a TTL check's status and restarts its TTL.
    pub async fn update_ttl(
        &self,
        check_id: &str,
        status: HealthStatus,
        note: String,
        caller: Option<&str>,
    ) -> Result<(), AgentError> {
        let changed = {
            let mut locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
            let Some(local) = locals
                .values_mut()
                .find(|l| l.checks.iter().any(|c| c.spec.id == check_id))
            else {
                return Err(AgentError::NotFound {
                    what: "check",
                    id: check_id.to_owned(),
                });
            };
            let id = local.registration.instance.instance_id.clone();
            check_owner(&id, &local.registration.instance.owner, caller)?;
            let now = Instant::now();
            for c in local.checks.iter_mut().filter(|c| c.spec.id == check_id) {
                let CheckKind::Ttl(ttl) = c.spec.kind else {
                    return Err(AgentError::NotTtl {
                        id: check_id.to_owned(),
                    });
                };
                c.ttl_deadline = Some(now + ttl);
                set_status(c, status, note.clone(), now);
            }
            refresh(local).then_some(id)
        };
        if let Some(id) = changed {
            self.push(&id).await?;
        }
        Ok(())
    }

    /// Local registrations with their checks (the Consul /v1/agent/* views).
    pub fn locals(&self) -> Vec<(Instance, Vec<CheckState>)> {
        self.locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|l| (l.registration.instance.clone(), l.checks.clone()))
            .collect()
    }

    /// Checks of an instance registered here (for /v1/health/service).
    pub fn checks_of(&self, instance_id: &str) -> Option<Vec<CheckState>> {
        self.locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(instance_id)
            .map(|l| l.checks.clone())
    }

    /// Deregisters everything this agent hosts and its node (SIGTERM). The state file is kept,
    /// so the next start re-registers the same instances.
    pub async fn shutdown(&self) {
        let ids: Vec<(String, String)> = {
            let mut locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *locals)
                .into_iter()
                .map(|(id, l)| {
                    l.tasks.iter().for_each(|t| t.abort());
                    (l.registration.instance.service_name, id)
                })
                .collect()
        };
        for (service, id) in ids {
            let _ = self.backend.delete_instance(&service, &id).await;
        }
        let _ = self.backend.delete_node(&self.node).await;
    }

    fn spawn_check(
        self: &Arc<Self>,
        service_id: String,
        spec: CheckSpec,
    ) -> tokio::task::AbortHandle {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(agent) = weak.upgrade() else { return };
                let (status, output) = health::run(
                    &spec.kind,
                    spec.timeout,
                    agent.agent_ip,
                    agent.defaults.script_output_cap,
                )
                .await;
                agent.record(&service_id, &spec.id, status, output).await;
                drop(agent);
                tokio::time::sleep(spec.interval).await;
            }
        })
        .abort_handle()
    }

    async fn record(&self, service_id: &str, check_id: &str, status: HealthStatus, output: String) {
        let changed = {
            let mut locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
            let Some(local) = locals.get_mut(service_id) else {
                return;
            };
            let now = Instant::now();
            for c in local.checks.iter_mut().filter(|c| c.spec.id == check_id) {
                if c.status != status {
                    tracing::info!(check = check_id, status = status.as_str(), %output, "check status changed");
                }
                set_status(c, status, output.clone(), now);
            }
            refresh(local)
        };
        if changed {
            if let Err(e) = self.push(service_id).await {
                tracing::warn!(error = %e, "writing instance status");
            }
        }
    }

    /// Writes the instance's current state to the backend. Writes are serialized and each one
    /// reads the state when it runs, so a slower write never overwrites a newer status.
    async fn push(&self, id: &str) -> Result<(), BackendError> {
        let _ordered = self.writes.lock().await;
        let current = self
            .locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.registration.instance.clone());
        match current {
            Some(instance) => self.backend.put_instance(&instance).await,
            // Deregistered meanwhile: nothing to write.
            None => Ok(()),
        }
    }

    /// Expires TTLs and deregisters instances critical for longer than their limit.
    async fn supervise(&self) {
        let now = Instant::now();
        let mut changed = Vec::new();
        let mut expired = Vec::new();
        {
            let mut locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
            for (id, local) in locals.iter_mut() {
                for c in local.checks.iter_mut() {
                    if c.ttl_deadline.is_some_and(|d| now >= d)
                        && c.status != HealthStatus::Critical
                    {
                        tracing::info!(check = %c.spec.id, "TTL expired: critical");
                        set_status(c, HealthStatus::Critical, "TTL expired".into(), now);
                    }
                    if c.critical_since
                        .is_some_and(|since| now.duration_since(since) >= c.spec.deregister_after)
                    {
                        expired.push(id.clone());
                    }
                }
                if refresh(local) {
                    changed.push(id.clone());
                }
            }
        }
        for id in changed {
            let _ = self.push(&id).await;
        }
        expired.dedup();
        for id in expired {
            tracing::warn!(instance = %id, "critical for longer than its deregister limit; deregistering");
            let _ = self.deregister(&id, None).await;
        }
    }

    fn save(&self) {
        let Some(path) = &self.state_file else { return };
        let all: Vec<Registration> = self
            .locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|l| l.registration.clone())
            .collect();
        let text = serde_json::to_string_pretty(&all).unwrap_or_default();
        // A crash never leaves a half-written file.
        if let Err(e) = crate::atomic_file::write_atomically(path, text.as_bytes(), 0o600) {
            tracing::error!(error = %e, "saving registrations");
        }
    }
}

fn check_owner(id: &str, owner: &str, caller: Option<&str>) -> Result<(), AgentError> {
    match caller {
        Some(c) if c != owner => Err(AgentError::Forbidden {
            id: id.to_owned(),
            owner: owner.to_owned(),
            caller: c.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn set_status(c: &mut CheckState, status: HealthStatus, output: String, now: Instant) {
    if status == HealthStatus::Critical {
        c.critical_since.get_or_insert(now);
    } else {
        c.critical_since = None;
    }
    c.status = status;
    c.output = output;
}

/// Worst status of the checks (no checks: passing).
pub fn aggregate(checks: &[CheckState]) -> HealthStatus {
    let mut worst = HealthStatus::Passing;
    for c in checks {
        match c.status {
            HealthStatus::Critical => return HealthStatus::Critical,
            HealthStatus::Warning => worst = HealthStatus::Warning,
            HealthStatus::Passing => {}
        }
    }
    worst
}

/// Recomputes the instance status; returns whether it changed.
fn refresh(local: &mut Local) -> bool {
    let status = aggregate(&local.checks);
    let instance = &mut local.registration.instance;
    let changed = instance.status != status;
    instance.status = status;
    changed
}

/// Check kinds persisted as `{"http": url}`-style objects.
mod kind_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::CheckKind;

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Text {
        Http(String),
        Tcp(std::net::SocketAddrV4),
        Grpc(std::net::SocketAddrV4, String),
        Script(Vec<String>),
        Ttl(u64),
    }

    pub fn serialize<S: Serializer>(k: &CheckKind, s: S) -> Result<S::Ok, S::Error> {
        match k {
            CheckKind::Http(u) => Text::Http(u.clone()),
            CheckKind::Tcp(a) => Text::Tcp(*a),
            CheckKind::Grpc { addr, service } => Text::Grpc(*addr, service.clone()),
            CheckKind::Script(a) => Text::Script(a.clone()),
            CheckKind::Ttl(d) => Text::Ttl(d.as_millis() as u64),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CheckKind, D::Error> {
        Ok(match Text::deserialize(d)? {
            Text::Http(u) => CheckKind::Http(u),
            Text::Tcp(a) => CheckKind::Tcp(a),
            Text::Grpc(addr, service) => CheckKind::Grpc { addr, service },
            Text::Script(a) => CheckKind::Script(a),
            Text::Ttl(ms) => CheckKind::Ttl(Duration::from_millis(ms)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::backend::MemoryBackend;

    fn registration(id: &str, owner: &str, checks: Vec<CheckSpec>) -> Registration {
        Registration {
            instance: Instance {
                service_name: "wallet".into(),
                service_version: "1".into(),
                service_type: "http".into(),
                environment: "prod".into(),
                instance_id: id.into(),
                address: Ipv4Addr::new(127, 0, 0, 1),
                port: 9,
                region: None,
                zone: None,
                deployment_id: None,
                capabilities: vec![],
                tags: vec![],
                meta: BTreeMap::new(),
                weight: 1,
                node: String::new(),
                owner: owner.into(),
                status: HealthStatus::Passing,
            },
            checks,
        }
    }

    fn ttl(ms: u64, deregister_ms: u64) -> CheckSpec {
        CheckSpec {
            id: "service:w1".into(),
            name: "ttl".into(),
            kind: CheckKind::Ttl(Duration::from_millis(ms)),
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            deregister_after: Duration::from_millis(deregister_ms),
            initial: HealthStatus::Critical,
        }
    }

    fn status(backend: &MemoryBackend, id: &str) -> Option<HealthStatus> {
        backend
            .subscribe()
            .borrow()
            .get("wallet", id)
            .map(|i| i.status)
    }

    async fn agent(state_file: Option<PathBuf>) -> (Arc<MemoryBackend>, Arc<LocalAgent>) {
        let backend = Arc::new(MemoryBackend::new("embedded"));
        let agent = LocalAgent::new(
            backend.clone(),
            "n1".into(),
            Ipv4Addr::LOCALHOST,
            HealthDefaults::default(),
            state_file,
        );
        (backend, agent)
    }

    #[tokio::test]
    async fn ttl_heartbeats_expiry_and_deregistration_after_critical() {
        let (backend, agent) = agent(None).await;
        agent
            .register(registration("w1", "shop/wallet", vec![ttl(300, 900)]))
            .await
            .expect("register");
        assert_eq!(
            status(&backend, "w1"),
            Some(HealthStatus::Critical),
            "TTL checks start critical"
        );
        agent
            .update_ttl(
                "service:w1",
                HealthStatus::Passing,
                "ok".into(),
                Some("shop/wallet"),
            )
            .await
            .expect("heartbeat");
        assert_eq!(status(&backend, "w1"), Some(HealthStatus::Passing));
        // Another identity may neither heartbeat nor deregister it.
        assert!(matches!(
            agent
                .update_ttl(
                    "service:w1",
                    HealthStatus::Critical,
                    String::new(),
                    Some("shop/other")
                )
                .await,
            Err(AgentError::Forbidden { .. })
        ));
        assert!(matches!(
            agent.deregister("w1", Some("shop/other")).await,
            Err(AgentError::Forbidden { .. })
        ));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            status(&backend, "w1"),
            Some(HealthStatus::Critical),
            "missed TTL"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            status(&backend, "w1"),
            None,
            "deregistered after the critical limit"
        );
        assert!(agent.locals().is_empty());
    }

    #[tokio::test]
    async fn one_identity_cannot_make_the_agent_hold_or_run_unbounded_work() {
        let (_, agent) = agent(None).await;
        for n in 0..MAX_INSTANCES_PER_IDENTITY {
            agent
                .register(registration(&format!("w{n}"), "shop/wallet", vec![]))
                .await
                .expect("within the bound");
        }
        assert!(matches!(
            agent
                .register(registration("w-extra", "shop/wallet", vec![]))
                .await,
            Err(AgentError::TooMany { .. })
        ));
        // Replacing an existing one is still fine, and another identity has its own budget.
        agent
            .register(registration("w0", "shop/wallet", vec![]))
            .await
            .expect("replace");
        let mut busy = ttl(1000, 1000);
        busy.kind = CheckKind::Tcp("127.0.0.1:9".parse().expect("addr"));
        busy.interval = Duration::from_millis(10);
        let e = agent
            .register(registration("o1", "shop/other", vec![busy]))
            .await
            .expect_err("interval too short");
        assert!(e.to_string().contains("Interval"), "{e}");
        let many = vec![ttl(1000, 1000); MAX_CHECKS_PER_INSTANCE + 1];
        let e = agent
            .register(registration("o1", "shop/other", many))
            .await
            .expect_err("too many checks");
        assert!(e.to_string().contains("Checks"), "{e}");
    }

    /// The memory backend with a slow first write, as a remote backend can be.
    struct SlowFirstWrite {
        inner: MemoryBackend,
        first: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Backend for SlowFirstWrite {
        fn kind(&self) -> &'static str {
            "slow"
        }
        fn subscribe(
            &self,
        ) -> tokio::sync::watch::Receiver<Arc<crate::registry::catalog::Catalog>> {
            self.inner.subscribe()
        }
        fn connected(&self) -> bool {
            true
        }
        async fn put_instance(&self, instance: &Instance) -> Result<(), BackendError> {
            let instance = instance.clone();
            if self.first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            self.inner.put_instance(&instance).await
        }
        async fn delete_instance(&self, service: &str, id: &str) -> Result<(), BackendError> {
            self.inner.delete_instance(service, id).await
        }
        async fn put_node(&self, node: &NodeRecord) -> Result<(), BackendError> {
            self.inner.put_node(node).await
        }
        async fn delete_node(&self, name: &str) -> Result<(), BackendError> {
            self.inner.delete_node(name).await
        }
        async fn put_mesh(
            &self,
            objects: &crate::registry::mesh_state::MeshObjects,
        ) -> Result<(), BackendError> {
            self.inner.put_mesh(objects).await
        }
        async fn delete_mesh(
            &self,
            objects: &crate::registry::mesh_state::MeshObjects,
        ) -> Result<(), BackendError> {
            self.inner.delete_mesh(objects).await
        }
    }

    #[tokio::test]
    async fn a_slow_write_never_overwrites_a_newer_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("v4")
        };
        let backend = Arc::new(SlowFirstWrite {
            inner: MemoryBackend::new("embedded"),
            first: std::sync::atomic::AtomicBool::new(true),
        });
        let agent = LocalAgent::new(
            backend.clone(),
            "n1".into(),
            Ipv4Addr::LOCALHOST,
            HealthDefaults::default(),
            None,
        );
        let mut check = ttl(1000, 60_000);
        check.kind = CheckKind::Tcp(addr);
        // Registered critical; the first check run passes while that write is still in flight.
        agent
            .register(registration("w1", "shop/wallet", vec![check]))
            .await
            .expect("register");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            backend
                .inner
                .subscribe()
                .borrow()
                .get("wallet", "w1")
                .map(|i| i.status),
            Some(HealthStatus::Passing)
        );
        drop(listener);
    }

    #[tokio::test]
    async fn registrations_survive_a_restart_through_the_state_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("registrations.json");
        {
            let (_, agent) = agent(Some(file.clone())).await;
            agent
                .register(registration("w1", "shop/wallet", vec![]))
                .await
                .expect("register");
            agent.shutdown().await;
        }
        let (backend, agent) = agent(Some(file)).await;
        assert_eq!(agent.restore().await, 1);
        assert_eq!(
            status(&backend, "w1"),
            Some(HealthStatus::Passing),
            "no checks: passing"
        );
        assert_eq!(agent.locals()[0].0.owner, "shop/wallet");
        // Taking over the id under another identity is refused.
        assert!(matches!(
            agent
                .register(registration("w1", "shop/other", vec![]))
                .await,
            Err(AgentError::Forbidden { .. })
        ));
    }
}
