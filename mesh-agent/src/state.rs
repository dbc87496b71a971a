//! State shared by the agent's tasks: current config and model, kernel handles, metrics.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::app::security::Security;
use crate::config::Config;
use crate::ebpf::{KernelMaps, MeshEbpf, OrigDstTable};
use crate::flows::FlowTable;
use crate::metrics::AgentMetrics;
use crate::registry::MeshModel;
use crate::traffic::Traffic;

/// The kernel objects, changed together under one lock by start-up, reload and shutdown.
pub struct Kernel {
    pub ebpf: MeshEbpf,
    pub maps: KernelMaps,
}

pub struct AgentState {
    /// Outbound (capture port) connections per calling identity id and in total.
    pub outbound_limits: Arc<crate::admission::ConnLimiter<u32>>,
    config: RwLock<Arc<Config>>,
    model: RwLock<Arc<MeshModel>>,
    pub orig_dst: OrigDstTable,
    pub metrics: AgentMetrics,
    /// Per-service traffic policy and endpoint health (see [`Traffic`]).
    pub traffic: Traffic,
    pub ready: AtomicBool,
    pub kernel: Mutex<Option<Kernel>>,
    pub security: Security,
    /// Inputs of the one reconciler (config file + registry view).
    pub mesh: crate::registry::reconcile::MeshSource,
    /// The local registry agent (Consul API, health checks), set once at start.
    pub registry: OnceLock<Arc<crate::registry::agent::LocalAgent>>,
    /// Active proxied connections (admin /flows).
    pub flows: Arc<FlowTable>,
    /// The JSON access log, when `observability.access_log.enabled` (set once at start).
    pub access_log: OnceLock<crate::access_log::AccessLog>,
    /// The request tracer, when `observability.tracing.otlp_endpoint` is set (set once at start).
    pub tracer: OnceLock<crate::trace::RequestTracer>,
}

impl AgentState {
    pub fn new(
        config: Config,
        model: MeshModel,
        kernel: Kernel,
        orig_dst: OrigDstTable,
        security: Security,
    ) -> Self {
        let outbound_limits = crate::admission::ConnLimiter::new(
            config.proxy.max_connections,
            config.proxy.max_connections_per_identity,
        );
        let metrics = AgentMetrics::new(&config.node.name);
        let traffic = Traffic::new(metrics.registry());
        Self {
            outbound_limits,
            metrics,
            traffic,
            config: RwLock::new(Arc::new(config)),
            model: RwLock::new(Arc::new(model)),
            orig_dst,
            ready: AtomicBool::new(false),
            kernel: Mutex::new(Some(kernel)),
            security,
            mesh: Default::default(),
            registry: OnceLock::new(),
            flows: Arc::default(),
            access_log: OnceLock::new(),
            tracer: OnceLock::new(),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn model(&self) -> Arc<MeshModel> {
        self.model.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes a new config and model together (after the kernel already has them), and
    /// the traffic routes built from them.
    pub fn publish(&self, config: Config, model: MeshModel) {
        self.traffic.update(&config, &model);
        *self.model.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(model);
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    pub fn with_kernel<R>(&self, f: impl FnOnce(&mut Kernel) -> R) -> Option<R> {
        let mut guard = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().map(f)
    }
}
