//! Wiring: load config and eBPF, bind the ports, apply, serve, reload on change, drain on SIGTERM.

mod admin;
mod apply;
mod changes;
mod endpoints;
mod inbound;
pub mod node_checks;
mod reload;
pub mod security;

pub use admin::ADMIN_ROUTES;
pub use apply::{apply, desired_maps, ApplyError};
pub use endpoints::{HEALTH_ROUTES, METRICS_ROUTES};

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

/// How long SIGTERM waits for proxied connections to finish before detaching.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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
}

async fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind {
            field,
            addr,
            source,
        })
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf) -> Result<(), AppError> {
    let config = config::load(&config_path)?;
    // Before binding ports or writing the CA: an unprivileged start fails with the real reason.
    crate::ebpf::preflight::check_root()?;
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
    tracing::info!(path = %config_path.display(), contents = %changes::counts(&config), "config loaded");
    tracing::debug!(effective = %serde_json::to_string(&config).unwrap_or_default(), "effective config");
    let mut terminate = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;

    // Ports first: nothing is attached if one is taken, and redirected connects always find a listener.
    let outbound = bind("listen.outbound", config.listen.outbound).await?;
    let metrics = bind("listen.metrics", config.listen.metrics).await?;
    let health = bind("listen.health", config.listen.health).await?;
    let hbone = bind("listen.hbone", config.listen.hbone).await?;
    let admin = bind("listen.admin", config.listen.admin).await?;

    let ca = security::load_ca(&config)?;
    let security = Security::new(&config, ca)?;
    let server_tls = security.server_tls(&config)?;
    tracing::info!(trust_domain = %config.node.trust_domain, identities = ?security.identities.store().ids().iter().map(ToString::to_string).collect::<Vec<_>>(), "workload certificates issued");

    let (ebpf, maps, orig_dst) = MeshEbpf::load(&object.bytes, &config.node.instance)?;
    tracing::info!(object = %object.source, pins = %ebpf.pin_dir().display(), cgroup_root = %ebpf.cgroup_root().display(), "eBPF programs loaded");
    let mut kernel = Kernel { ebpf, maps };
    let model = MeshModel::build(&config, None);
    if let Err(e) = apply(&mut kernel, &config, &model, None) {
        kernel.ebpf.shutdown();
        return Err(e.into());
    }
    tracing::info!(cgroups = ?kernel.ebpf.attached(), "capture attached");

    let state = Arc::new(AgentState::new(
        config.clone(),
        model,
        kernel,
        orig_dst,
        security,
    ));
    state.metrics.config_generation.inc();
    if let Some(log) = access_log {
        if let Err(e) = state.metrics.register(Box::new(log.dropped())) {
            tracing::error!(error = %e, "registering the access log's metric");
        }
        let _ = state.access_log.set(log);
    }
    state.traffic.attach(Arc::downgrade(&state));
    state.traffic.update(&state.config(), &state.model());
    if let Err(e) = state
        .metrics
        .register(Box::new(StateCollector::new(Arc::downgrade(&state))))
    {
        tracing::error!(error = %e, "registering the scrape-time metrics");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(proxy::outbound::run(
        outbound,
        state.clone(),
        stop_rx.clone(),
    ));
    let view = Arc::new(inbound::StateView(state.clone()));
    let inbound_server = HboneServer::new(server_tls, view.clone())
        .with_stats(state.security.inbound.clone())
        .with_targets(view.clone())
        .with_tunnel_metrics(view)
        .with_source_ip(config.node.agent_ip)
        .with_target_connect_timeout(config.proxy.connect_timeout);
    let mut hbone_stop = stop_rx.clone();
    tasks.spawn(inbound_server.serve(hbone, async move {
        let _ = hbone_stop.wait_for(|stop| *stop).await;
    }));
    tasks.spawn(http_server::serve(
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
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        node = %config.node.name,
        outbound = %config.listen.outbound,
        metrics = %config.listen.metrics,
        health = %config.listen.health,
        hbone = %config.listen.hbone,
        admin = %config.listen.admin,
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

    tracing::info!("shutting down: draining connections");
    state.ready.store(false, Ordering::Relaxed);
    // Stop capturing new connects first, so pods fall through to their original destinations.
    state.with_kernel(|k| {
        k.maps
            .clear_agent_addr()
            .map_err(|e| tracing::warn!(error = %e, "clearing redirect"))
    });
    let _ = stop_tx.send(true);
    drain(&state).await;
    if let Some(kernel) = state
        .kernel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        kernel.ebpf.shutdown();
    }
    state.security.shutdown();
    tasks.abort_all();
    tracing::info!("detached; bye");
    Ok(())
}

async fn drain(state: &AgentState) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while state.metrics.outbound_active.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
