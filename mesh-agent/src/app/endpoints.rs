//! Handlers of the metrics (15020) and health (15021) ports.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::StatusCode;

use crate::http_server::{Handler, Reply};
use crate::state::AgentState;

const METRICS: &str = "/metrics";
const LIVE: &str = "/live";
const READY: &str = "/ready";
const HEALTH: &str = "/health";
/// Routes of the metrics and health ports; docs/REFERENCE.md must list them.
pub const METRICS_ROUTES: &[&str] = &[METRICS];
pub const HEALTH_ROUTES: &[&str] = &[HEALTH, READY, LIVE];

pub fn metrics_handler(state: Arc<AgentState>) -> Handler {
    Arc::new(move |path| match path {
        METRICS => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4",
            body: state.metrics.render(),
        },
        _ => Reply::text(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
    })
}

/// Started and holding a valid certificate for every local identity: an agent still waiting
/// for the CA service serves no traffic (fail closed) and says so.
pub fn is_ready(state: &AgentState) -> bool {
    state.ready.load(Ordering::Relaxed) && state.security.identities.missing().is_empty()
}

pub fn health_handler(state: Arc<AgentState>) -> Handler {
    Arc::new(move |path| match path {
        LIVE => Reply::text(StatusCode::OK, "live\n"),
        READY if is_ready(&state) => Reply::text(StatusCode::OK, "ready\n"),
        READY => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        HEALTH => health_report(&state),
        _ => Reply::text(
            StatusCode::NOT_FOUND,
            "not found; try /health, /ready or /live\n",
        ),
    })
}

fn health_report(state: &AgentState) -> Reply {
    let config = state.config();
    let attached = state.with_kernel(|k| k.ebpf.attached()).unwrap_or_default();
    let body = serde_json::json!({
        "node": config.node.name,
        "instance": config.node.instance,
        "ready": is_ready(state),
        "missing_identities": state.security.identities.missing().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "config_generation": state.metrics.config_generation.get(),
        "attached_cgroups": attached.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "services": config.services.len(),
        "workloads": config.workloads.len(),
        "registry": registry_health(state),
    });
    Reply {
        status: StatusCode::OK,
        content_type: "application/json",
        body: format!("{body}\n"),
    }
}
/// The registry's part of /health: which backend, and whether lookups come from a cache the
/// backend still confirms or from the last known view (extend-cache).
fn registry_health(state: &AgentState) -> serde_json::Value {
    let Some(agent) = state.registry.get() else {
        return serde_json::Value::Null;
    };
    let catalog = state.mesh.catalog();
    let connected = agent.backend.connected();
    serde_json::json!({
        "backend": agent.backend.kind(),
        "connected": connected,
        "cache": if connected { "fresh" } else { "extend-cache" },
        "instances": catalog.instances().count(),
        "nodes": catalog.nodes.len(),
        "local_registrations": agent.locals().len(),
    })
}
