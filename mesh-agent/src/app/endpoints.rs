//! Handlers of the metrics (15020) and health (15021) ports.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::StatusCode;

use crate::http_server::{Handler, Reply};
use crate::metrics::{kernel_traffic, AgentMetrics, PromWriter};
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
            body: render_metrics(&state),
        },
        _ => Reply::text(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
    })
}

pub fn health_handler(state: Arc<AgentState>) -> Handler {
    Arc::new(move |path| match path {
        LIVE => Reply::text(StatusCode::OK, "live\n"),
        READY if state.ready.load(Ordering::Relaxed) => Reply::text(StatusCode::OK, "ready\n"),
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
        "ready": state.ready.load(Ordering::Relaxed),
        "config_generation": AgentMetrics::get(&state.metrics.config_generation),
        "attached_cgroups": attached.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "services": config.services.len(),
        "workloads": config.workloads.len(),
    });
    Reply {
        status: StatusCode::OK,
        content_type: "application/json",
        body: format!("{body}\n"),
    }
}

/// Reads one counter of a service's traffic (for the per-service metric families).
type TrafficField = fn(&crate::metrics::ServiceTraffic) -> u64;

fn render_metrics(state: &AgentState) -> String {
    let model = state.model();
    let config = state.config();
    let mut w = PromWriter::default();
    let node = config.node.name.as_str();

    // Kernel counters per identity (id 0 collects processes in unknown child cgroups).
    let mut identities: Vec<(String, u32)> = model
        .identities
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    identities.push(("unknown".to_owned(), 0));
    let counters: Vec<_> = state
        .with_kernel(|k| {
            identities
                .iter()
                .map(|(name, id)| (name.clone(), k.maps.counters(*id).ok()))
                .collect()
        })
        .unwrap_or_default();
    let families = [
        (
            "nodemesh_kernel_connections_opened_total",
            "connect() calls the kernel allowed, by source identity.",
        ),
        (
            "nodemesh_kernel_connections_redirected_total",
            "connect() calls to mesh services redirected to the agent.",
        ),
        (
            "nodemesh_kernel_connections_denied_total",
            "connect() calls refused with EPERM by the kernel deny-list.",
        ),
        (
            "nodemesh_kernel_inbound_dropped_total",
            "Inbound TCP SYNs to strict workloads dropped for bypassing the agent, by destination identity.",
        ),
    ];
    for (index, (name, help)) in families.iter().enumerate() {
        w.family(name, "counter", help);
        for (identity, c) in &counters {
            let Some(c) = c else { continue };
            let value = [c.opened, c.redirected, c.denied, c.inbound_dropped][index];
            w.sample(name, &[("node", node), ("identity", identity)], value);
        }
    }
    render_kernel_traffic(state, node, &identities, &mut w);

    let m = &state.metrics;
    let singles = [
        (
            "nodemesh_outbound_accepted_total",
            "counter",
            "Connections accepted on the outbound listener.",
            &m.outbound_accepted,
        ),
        (
            "nodemesh_outbound_active_connections",
            "gauge",
            "Outbound connections being proxied now.",
            &m.outbound_active,
        ),
        (
            "nodemesh_outbound_unknown_destination_total",
            "counter",
            "Accepted connections without a recorded original destination.",
            &m.outbound_unknown_destination,
        ),
        (
            "nodemesh_outbound_no_endpoints_total",
            "counter",
            "Connections closed because the service had no endpoint.",
            &m.outbound_no_endpoints,
        ),
        (
            "nodemesh_config_generation",
            "gauge",
            "Number of configs applied since start (1 = the initial one).",
            &m.config_generation,
        ),
    ];
    for (name, kind, help, counter) in singles {
        w.family(name, kind, help)
            .sample(name, &[("node", node)], AgentMetrics::get(counter));
    }
    w.family(
        "nodemesh_config_reloads_total",
        "counter",
        "Config reloads by result.",
    );
    w.sample(
        "nodemesh_config_reloads_total",
        &[("node", node), ("result", "ok")],
        AgentMetrics::get(&m.config_reloads_ok),
    );
    w.sample(
        "nodemesh_config_reloads_total",
        &[("node", node), ("result", "error")],
        AgentMetrics::get(&m.config_reloads_failed),
    );

    let services = m.services();
    let per_service: [(&str, &str, TrafficField); 6] = [
        (
            "nodemesh_outbound_denied_total",
            "Outbound connections refused by authorization, by service.",
            |s| s.denied,
        ),
        (
            "nodemesh_outbound_hbone_connections_total",
            "Outbound connections carried to another node over HBONE (mTLS), by service.",
            |s| s.hbone_connections,
        ),
        (
            "nodemesh_outbound_connections_total",
            "Proxied outbound connections by service.",
            |s| s.connections,
        ),
        (
            "nodemesh_outbound_connect_failures_total",
            "Failed endpoint connects by service.",
            |s| s.connect_failures,
        ),
        (
            "nodemesh_outbound_bytes_sent_total",
            "Bytes sent to endpoints by service.",
            |s| s.bytes_to_endpoint,
        ),
        (
            "nodemesh_outbound_bytes_received_total",
            "Bytes received from endpoints by service.",
            |s| s.bytes_from_endpoint,
        ),
    ];
    for (name, help, get) in per_service {
        w.family(name, "counter", help);
        for (service, traffic) in &services {
            w.sample(name, &[("node", node), ("service", service)], get(traffic));
        }
    }
    render_security(state, node, &mut w);
    w.finish()
}

/// Bytes and packets per identity, counted by the cgroup_skb programs.
fn render_kernel_traffic(
    state: &AgentState,
    node: &str,
    identities: &[(String, u32)],
    w: &mut PromWriter,
) {
    let counters = kernel_traffic::read(state, identities);
    for (name, help, get) in kernel_traffic::FAMILIES {
        w.family(name, "counter", help);
        for (identity, c) in &counters {
            w.sample(name, &[("node", node), ("identity", identity)], get(c));
        }
    }
}

/// Authorization decisions, the HBONE pool and certificate freshness.
fn render_security(state: &AgentState, node: &str, w: &mut PromWriter) {
    let security = &state.security;
    let name = "nodemesh_authz_decisions_total";
    w.family(
        name,
        "counter",
        "Authorization decisions by policy and result.",
    );
    for d in security.authz.counters().snapshot() {
        let decision = if d.allowed { "allow" } else { "deny" };
        w.sample(
            name,
            &[
                ("node", node),
                ("policy", &d.policy),
                ("decision", decision),
            ],
            d.count,
        );
    }
    for (policy, count) in security.authz.counters().audit_deny_snapshot() {
        w.sample(
            name,
            &[
                ("node", node),
                ("policy", &policy),
                ("decision", "audit_deny"),
            ],
            count,
        );
    }
    let pool = security.pool.stats();
    let pool_metrics = [
        (
            "nodemesh_hbone_connections_opened_total",
            "counter",
            "mTLS HTTP/2 connections opened to other agents.",
            pool.connections_opened,
        ),
        (
            "nodemesh_hbone_streams_opened_total",
            "counter",
            "HBONE tunnels (CONNECT streams) opened.",
            pool.streams_opened,
        ),
        (
            "nodemesh_hbone_active_connections",
            "gauge",
            "Open pooled HBONE connections.",
            pool.active_connections,
        ),
        (
            "nodemesh_hbone_active_streams",
            "gauge",
            "Open HBONE tunnels.",
            pool.active_streams,
        ),
    ];
    for (name, kind, help, value) in pool_metrics {
        w.family(name, kind, help)
            .sample(name, &[("node", node)], value);
    }
    let inbound = &security.inbound;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let name = "nodemesh_hbone_inbound_connections_total";
    w.family(
        name,
        "counter",
        "Inbound HBONE connections by handshake outcome.",
    );
    for (result, counter) in [
        ("accepted", &inbound.connections_accepted),
        ("refused", &inbound.handshakes_refused),
    ] {
        w.sample(name, &[("node", node), ("result", result)], get(counter));
    }
    let name = "nodemesh_hbone_inbound_streams_total";
    w.family(name, "counter", "Inbound HBONE CONNECT streams by answer.");
    for (result, counter) in [
        ("opened", &inbound.streams_opened),
        ("denied", &inbound.streams_denied),
        ("rejected", &inbound.streams_rejected),
        ("target_failed", &inbound.streams_failed),
    ] {
        w.sample(name, &[("node", node), ("result", result)], get(counter));
    }
    let store = security.identities.store();
    let name = "nodemesh_identity_cert_expiry_seconds";
    w.family(
        name,
        "gauge",
        "Seconds until the current certificate of each local identity expires.",
    );
    for id in store.ids() {
        if let Some(cert) = store.get(&id) {
            let left = cert
                .not_after
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            w.sample(
                name,
                &[("node", node), ("identity", &id.to_string())],
                left.as_secs(),
            );
        }
    }
    let name = "nodemesh_identity_cert_changes_total";
    w.family(
        name,
        "counter",
        "Certificate store changes: issues, renewals and removals.",
    );
    w.sample(name, &[("node", node)], *store.subscribe().borrow());
}
