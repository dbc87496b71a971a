//! Wiring: load config and eBPF, bind the ports, apply, serve, reload on change, drain on SIGTERM.

mod admin;
mod apply;
mod changes;
mod endpoints;
mod inbound;
mod mesh_admin;
pub mod node_checks;
mod registry_start;
mod reload;
pub mod security;

pub use admin::ADMIN_ROUTES;
pub use apply::{apply, desired_maps, endpoint_entries, ApplyError};
pub use endpoints::{HEALTH_ROUTES, METRICS_ROUTES};
pub use reload::apply_mesh_state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::{self, ConfigError};
use crate::ebpf::{object::object_bytes, EbpfError, MeshEbpf};
use crate::identity::IdentityError;
use crate::metrics::scrape::StateCollector;
use crate::proxy::hbone::HboneServer;
use crate::registry::MeshModel;
use crate::state::{AgentState, Kernel};
use crate::{http_server, proxy};
use security::{Security, SecurityError};

/// Lets a closing listener hand its pending connections to another listener of its SO_REUSEPORT
/// group (kernel >= 5.14), so a rolling restart loses none of the connections queued on the old
/// agent's listeners when it stops accepting.
const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

#[derive(Debug, Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("cannot listen on {addr} ({field}): {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the config does not fit this node:\n  - {}", .0.join("\n  - "))]
    NodeChecks(Vec<String>),
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::AccessLogError),
    #[error(transparent)]
    Trace(#[from] crate::trace::TraceError),
    #[error(transparent)]
    ReplyRouting(#[from] crate::proxy::reply_routing::ReplyRoutingError),
}

/// Binds with SO_REUSEPORT: during a rolling restart the new agent listens on the same ports
/// while the old one still runs and drains, so no redirected connect ever finds no listener.
async fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    let err = |source| AppError::Bind {
        field,
        addr,
        source,
    };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.set_reuseport(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// Accept queue length of every listener (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: u32 = 4096;

/// Best effort: without it a rolling restart can reset connections queued on the old listener.
fn enable_listener_migration() {
    if let Err(e) = std::fs::write(TCP_MIGRATE_REQ, "1") {
        tracing::warn!(path = TCP_MIGRATE_REQ, error = %e, "cannot enable migration of queued connections between listeners; a rolling restart may reset a few connections");
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf) -> Result<(), AppError> {
    let config = config::load(&config_path)?;
    // Before binding ports or writing the CA: an unprivileged start fails with the real reason.
    crate::ebpf::preflight::check_root()?;
    match crate::admission::raise_nofile_limit() {
        Ok((old, new)) => tracing::info!(old, new, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    // Everything checkable without the kernel, before any side effect (ports, CA, eBPF).
    let report = node_checks::node_checks(&config, true);
    if !report.failed.is_empty() {
        return Err(AppError::NodeChecks(report.failed));
    }
    let object = object_bytes(config.node.ebpf_object.as_deref())?;
    let access = &config.observability.access_log;
    let access_log = match access.enabled {
        true => Some(crate::access_log::AccessLog::start(access.path.as_deref())?),
        false => None,
    };
    let tracer = crate::trace::RequestTracer::start(&config.observability.tracing)?;
    if tracer.is_some() {
        let t = &config.observability.tracing;
        tracing::info!(endpoint = ?t.otlp_endpoint, sampling = t.sampling, "tracing HTTP requests over OTLP");
    }
    tracing::info!(path = %config_path.display(), contents = %changes::counts(&config), "config loaded");
    tracing::debug!(effective = %serde_json::to_string(&config).unwrap_or_default(), "effective config");
    let mut terminate = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;

    // Ports first: nothing is attached if one is taken, and redirected connects always find a listener.
    enable_listener_migration();
    let mut outbound = Vec::new();
    for addr in config.listen.outbound_addrs() {
        outbound.push(bind("listen.outbound", addr).await?);
    }
    let metrics = bind("listen.metrics", config.listen.metrics).await?;
    let health = bind("listen.health", config.listen.health).await?;
    let hbone = bind("listen.hbone", config.listen.hbone).await?;
    let admin = bind("listen.admin", config.listen.admin).await?;
    let registry_listener = bind("listen.registry", config.registry_addr()).await?;

    if config.proxy.transparent {
        crate::proxy::reply_routing::install(&config.node.instance)?;
        tracing::info!(instance = %config.node.instance, "reply routing for transparent upstream connects installed");
    }

    let security = Security::new(&config)?;
    let server_tls = security.server_tls(&config)?;
    tracing::info!(trust_domain = %config.node.trust_domain, identities = ?security.identities.store().ids().iter().map(ToString::to_string).collect::<Vec<_>>(), "workload certificates issued");

    let (ebpf, maps, orig_dst) = MeshEbpf::load(&object.bytes, &config.node.instance)?;
    tracing::info!(object = %object.source, pins = %ebpf.pin_dir().display(), cgroup_root = %ebpf.cgroup_root().display(), "eBPF programs loaded");
    let mut kernel = Kernel { ebpf, maps };
    // Before any workload is attached: strict mode admits exactly the connects recorded here.
    match kernel.ebpf.trust_own_cgroup(&config.node.instance) {
        Ok(dir) => {
            tracing::info!(cgroup = %dir.display(), "strict mode trusts connects from the agent's cgroup")
        }
        Err(e) => {
            if !kernel.ebpf.adopted() {
                kernel.ebpf.uninstall();
            }
            return Err(e.into());
        }
    }
    // Ids an earlier agent left in the kernel are kept, so it and this one agree on them.
    let seeded = MeshModel::build_seeded(&config, apply::kernel_ids(&kernel, &config));
    let registry = registry_start::start(&config).await;
    let base_config = config.clone();
    // The one reconciler's view: the file merged with the registry's nodes and endpoints.
    let (config, model) = crate::registry::reconcile::effective(
        &base_config,
        &registry.backend.subscribe().borrow(),
        Some(&seeded),
    );
    if let Err(e) = apply(&mut kernel, &config, &model, None) {
        // An earlier agent's pinned state stays in force (fail closed); a first start leaves
        // nothing behind.
        if !kernel.ebpf.adopted() {
            kernel.ebpf.uninstall();
        }
        return Err(e.into());
    }
    tracing::info!(cgroups = ?kernel.ebpf.attached(), adopted = kernel.ebpf.adopted(), "capture attached");

    let state = Arc::new(AgentState::new(
        config.clone(),
        model,
        kernel,
        orig_dst,
        security,
    ));
    // Certificates and authorization were built from the file before the registry answered;
    // its services and workloads need them too.
    if config.services != base_config.services || config.workloads != base_config.workloads {
        state.security.reload(&config)?;
    }
    state.metrics.config_generation.inc();
    if let Some(failures) = &state.security.ca_failures {
        if let Err(e) = state.metrics.register(Box::new(failures.clone())) {
            tracing::error!(error = %e, "registering the CA service client's metric");
        }
    }
    if let Some(log) = access_log {
        if let Err(e) = state.metrics.register(Box::new(log.dropped())) {
            tracing::error!(error = %e, "registering the access log's metric");
        }
        let _ = state.access_log.set(log);
    }
    if let Some(tracer) = tracer {
        let _ = state.tracer.set(tracer);
    }
    let catalog = registry.backend.subscribe();
    state.mesh.init(base_config, catalog.clone());
    let _ = state.registry.set(registry.clone());
    state.traffic.attach(Arc::downgrade(&state));
    state.traffic.update(&state.config(), &state.model());
    if let Err(e) = state
        .metrics
        .register(Box::new(StateCollector::new(Arc::downgrade(&state))))
    {
        tracing::error!(error = %e, "registering the scrape-time metrics");
    }
    if let Err(e) =
        state
            .metrics
            .register(Box::new(crate::registry::metrics::RegistryCollector::new(
                Arc::downgrade(&state),
            )))
    {
        tracing::error!(error = %e, "registering the registry metrics");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::registry::reconcile::run(state.clone(), catalog));
    tasks.spawn(crate::registry::api::serve(
        registry_listener,
        state.clone(),
        registry.clone(),
        stop_rx.clone(),
    ));
    registry_start::announce(&registry, &config).await;
    for listener in outbound {
        tasks.spawn(proxy::outbound::run(
            listener,
            state.clone(),
            stop_rx.clone(),
        ));
    }
    let view = Arc::new(inbound::StateView(state.clone()));
    let inbound_server = HboneServer::new(server_tls, view.clone())
        .with_stats(state.security.inbound.clone())
        .with_targets(view.clone())
        .with_tunnel_metrics(view.clone())
        .with_request_metrics(view)
        .with_source(crate::proxy::connect::Source::of(&config))
        .with_flows(state.flows.clone())
        .with_target_connect_timeout(config.proxy.connect_timeout)
        .with_idle_timeout(config.proxy.idle_timeout);
    let mut hbone_stop = stop_rx.clone();
    tasks.spawn(inbound_server.serve(hbone, async move {
        let _ = hbone_stop.wait_for(|stop| *stop).await;
    }));
    tasks.spawn(http_server::serve_requests(
        admin,
        admin::admin_handler(state.clone()),
        stop_rx.clone(),
    ));
    tasks.spawn(http_server::serve(
        metrics,
        endpoints::metrics_handler(state.clone()),
        stop_rx.clone(),
    ));
    tasks.spawn(http_server::serve(
        health,
        endpoints::health_handler(state.clone()),
        stop_rx.clone(),
    ));
    let counted = state.clone();
    tasks.spawn(crate::admission::return_memory(move || {
        counted.outbound_limits.active() as u64
            + counted
                .security
                .inbound
                .connections_active
                .load(Ordering::Relaxed)
    }));
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        node = %config.node.name,
        outbound = %config.listen.outbound,
        outbound_ports = config.listen.outbound_ports,
        metrics = %config.listen.metrics,
        health = %config.listen.health,
        hbone = %config.listen.hbone,
        admin = %config.listen.admin,
        registry = %config.registry_addr(),
        registry_backend = registry.backend.kind(),
        "agent ready"
    );

    let mut watcher = reload::Watcher::new(&config_path);
    let poll = config.proxy.reload_poll;
    let mut ticker = tokio::time::interval(if poll.is_zero() {
        Duration::from_secs(3600)
    } else {
        poll
    });
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => watcher.reload(&state, true),
            _ = ticker.tick(), if !poll.is_zero() => watcher.reload(&state, false),
        }
    }

    // Deregister first so other nodes stop routing here while this agent still serves.
    registry.shutdown().await;
    // Fail closed: the pinned programs and maps stay, so captured connects keep going to the
    // agent address (a new agent's listener, or refused while none runs) and deny-lists and
    // strict mode stay enforced. Only `--uninstall` detaches.
    tracing::info!("shutting down: no longer accepting; draining connections");
    state.ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    drain(&state, state.config().proxy.drain_timeout).await;
    state.security.shutdown();
    if let Some(tracer) = state.tracer.get() {
        tracer.shutdown().await;
    }
    // The drained connections' last lines reach the file before the process exits.
    if let Some(log) = state.access_log.get() {
        log.finish();
    }
    tasks.abort_all();
    tracing::info!("stopped; kernel enforcement stays pinned; bye");
    Ok(())
}

/// Waits until proxied connections (outbound and inbound HBONE) have finished, or `timeout`.
async fn drain(state: &AgentState, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let busy = || {
        state.metrics.outbound_active.get() > 0
            || state
                .security
                .inbound
                .connections_active
                .load(Ordering::Relaxed)
                > 0
    };
    while busy() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if busy() {
        tracing::warn!(
            ?timeout,
            "drain deadline reached; closing the remaining connections"
        );
    }
}

/// Removes this instance's pinned programs and maps (`mesh-agent --uninstall`): capture and
/// kernel enforcement end. Run it after the agent has stopped.
pub fn uninstall(config_path: &Path) -> Result<PathBuf, AppError> {
    let config = config::load(config_path)?;
    crate::ebpf::preflight::check_root()?;
    let dir = crate::ebpf::pin_dir(&config.node.instance);
    crate::ebpf::uninstall(&dir)?;
    // Whatever proxy.transparent says now: an earlier config may have installed it.
    crate::proxy::reply_routing::uninstall(&config.node.instance)?;
    Ok(dir)
}

/// Validates a config file without touching the kernel (`mesh-agent --check`): the effective
/// config followed by what was checked and skipped, as YAML comments. `off_node` skips the checks
/// that need the node itself (cgroups, local addresses, CA files).
pub fn check(config_path: &Path, off_node: bool) -> Result<String, AppError> {
    let config = config::load(config_path)?;
    let report = node_checks::node_checks(&config, !off_node);
    if !report.failed.is_empty() {
        return Err(AppError::NodeChecks(report.failed));
    }
    Ok(format!(
        "{}{}",
        serde_yaml::to_string(&config).unwrap_or_default(),
        report.as_comments()
    ))
}
