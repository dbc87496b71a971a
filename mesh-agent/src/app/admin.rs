//! Admin endpoints (15000, loopback by default): what the agent is doing right now, as JSON, and
//! the runtime log level. `mesh-agent ctl` is the command-line client of these routes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::ebpf::attach::resolve_cgroup;
use crate::http_server::{Reply, RequestHandler};
use crate::policy::deny;
use crate::state::AgentState;

const STATUS: &str = "/status";
const CONFIG_DUMP: &str = "/config_dump";
const WORKLOADS: &str = "/workloads";
const SERVICES: &str = "/services";
const CERTS: &str = "/certs";
const POLICY: &str = "/policy";
const FLOWS: &str = "/flows";
const LOGGING: &str = "/logging";
/// Also `/endpoints/<service>` for one service.
const ENDPOINTS: &str = "/endpoints";
/// Operator-defined mesh state in the registry: GET lists, PUT applies a document, and
/// `DELETE /mesh/services/<name>` / `DELETE /mesh/workloads/<node>/<name>` remove one object.
const MESH: &str = "/mesh";
/// Every admin route; the handler serves these and docs/REFERENCE.md must list them.
pub const ADMIN_ROUTES: &[&str] = &[
    STATUS,
    CONFIG_DUMP,
    WORKLOADS,
    SERVICES,
    CERTS,
    POLICY,
    ENDPOINTS,
    FLOWS,
    LOGGING,
    MESH,
];

fn index() -> String {
    format!(
        "nodemesh admin: {} (mesh-agent ctl is the command-line client)\n",
        ADMIN_ROUTES.join(" ")
    )
}

pub fn admin_handler(state: Arc<AgentState>) -> RequestHandler {
    Arc::new(move |method, path, query, body| {
        if path == LOGGING {
            return logging(method, query);
        }
        if path == MESH || path.starts_with("/mesh/") {
            return super::mesh_admin::handle(&state, method, path, body);
        }
        if method != Method::GET {
            return Reply::text(StatusCode::METHOD_NOT_ALLOWED, format!("{path}: use GET\n"));
        }
        let body = match path {
            STATUS => status(&state),
            CONFIG_DUMP => serde_json::to_value(&*state.config()).unwrap_or(Value::Null),
            WORKLOADS => workloads(&state),
            SERVICES => services(&state),
            CERTS => certs(&state),
            POLICY => policy(&state),
            ENDPOINTS => endpoints(&state, None),
            p if p.starts_with("/endpoints/") => endpoints(&state, p.strip_prefix("/endpoints/")),
            FLOWS => json!({ "flows": state.flows.snapshot() }),
            "/" => return Reply::text(StatusCode::OK, index()),
            _ => return Reply::text(StatusCode::NOT_FOUND, index()),
        };
        json_reply(StatusCode::OK, &body)
    })
}

pub(super) fn json_reply(status: StatusCode, body: &Value) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        body: format!("{body:#}\n"),
    }
}

/// GET answers the filter in force; PUT or POST with `level=<filter>` replaces it.
fn logging(method: &Method, query: Option<&str>) -> Reply {
    if *method == Method::PUT || *method == Method::POST {
        let Some(filter) = query_param(query.unwrap_or(""), "level") else {
            return Reply::text(
                StatusCode::BAD_REQUEST,
                "missing level=<filter>, e.g. ?level=debug or ?level=info,mesh_agent=debug\n",
            );
        };
        if let Err(e) = crate::logging::set(&filter) {
            return json_reply(StatusCode::BAD_REQUEST, &json!({ "error": e.to_string() }));
        }
        tracing::info!(filter = %filter, "log filter changed through the admin port");
    } else if *method != Method::GET {
        return Reply::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "/logging: use GET, PUT or POST\n",
        );
    }
    json_reply(
        StatusCode::OK,
        &json!({ "level": crate::logging::current() }),
    )
}

/// The percent-decoded value of `name` in a query string (`+` is a space, as in forms).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(state: &AgentState) -> Value {
    let config = state.config();
    let attached = state.with_kernel(|k| k.ebpf.attached()).unwrap_or_default();
    json!({
        "node": config.node.name,
        "instance": config.node.instance,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": super::endpoints::is_ready(state),
        "config_generation": state.metrics.config_generation.get(),
        "services": config.services.len(),
        "workloads": config.workloads.len(),
        "attached_cgroups": attached.len(),
        "active_flows": state.flows.snapshot().len(),
        "log_level": crate::logging::current(),
    })
}

fn services(state: &AgentState) -> Value {
    let list: Vec<Value> = state
        .model()
        .services
        .values()
        .map(|s| {
            let endpoints: Vec<Value> = s
                .endpoints
                .iter()
                .map(|e| json!({ "address": e.addr.to_string(), "node": e.node }))
                .collect();
            json!({
                "name": s.name,
                "namespace": s.namespace,
                "id": s.id,
                "vip": s.vip.to_string(),
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({ "services": list })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn workloads(state: &AgentState) -> Value {
    let (config, model) = (state.config(), state.model());
    let (root, attached) = state
        .with_kernel(|k| (k.ebpf.cgroup_root().to_owned(), k.ebpf.attached()))
        .unwrap_or_default();
    let list: Vec<Value> = config
        .workloads
        .iter()
        .map(|w| {
            let cgroup = resolve_cgroup(&root, &w.cgroup);
            json!({
                "name": w.name,
                "namespace": w.namespace,
                "identity": format!("spiffe://{}/ns/{}/sa/{}", config.node.trust_domain, w.namespace, w.service_account),
                "identity_id": model.identities.get(&w.identity()),
                "service": w.service_name(),
                "cgroup": cgroup.display().to_string(),
                "capture_attached": attached.contains(&cgroup),
                "strict": w.is_strict(&config.policy),
            })
        })
        .collect();
    json!({ "node": config.node.name, "workloads": list })
}

fn certs(state: &AgentState) -> Value {
    let store = state.security.identities.store();
    let mut ids = store.ids();
    ids.sort();
    let list: Vec<Value> = ids
        .iter()
        .filter_map(|id| store.get(id))
        .map(|c| {
            json!({
                "spiffe_id": c.spiffe_id.to_string(),
                "not_before": unix(c.not_before),
                "not_after": unix(c.not_after),
                "renew_at": unix(c.renew_at()),
            })
        })
        .collect();
    json!({ "trust_domain": state.config().node.trust_domain, "certificates": list })
}

fn policy(state: &AgentState) -> Value {
    let (config, model) = (state.config(), state.model());
    let service_name = |id: u32| model.service_by_id(id).map(|s| s.name.clone());
    let kernel_deny: Vec<Value> = deny::compile(&config, &model)
        .into_iter()
        .map(|((identity, service), rule)| {
            json!({
                "from": model.identity_name(identity),
                "to": service_name(service),
                "rule": config.policy.deny.get(rule.rule as usize).map(|r| r.name.clone()),
            })
        })
        .collect();
    let counters = state.security.authz.counters();
    let mut decisions: Vec<Value> = counters
        .snapshot()
        .into_iter()
        .map(|d| {
            let decision = if d.allowed { "allow" } else { "deny" };
            json!({ "policy": d.policy, "decision": decision, "allowed": d.allowed, "count": d.count })
        })
        .collect();
    // Audit mode: allowed, but the policy would have denied.
    decisions.extend(counters.audit_deny_snapshot().into_iter().map(|(policy, count)| {
        json!({ "policy": policy, "decision": "audit_deny", "allowed": true, "count": count })
    }));
    json!({
        "kernel_deny": kernel_deny,
        "authorization": config.authorization,
        "service_keys": config.service_keys,
        "decisions": decisions,
    })
}

/// Each service's endpoints with their breaker state, latency estimate and ejection (`only`: one
/// service).
fn endpoints(state: &AgentState, only: Option<&str>) -> Value {
    let services: Vec<Value> = state
        .traffic
        .routes()
        .iter()
        .filter(|route| only.is_none_or(|o| o == &*route.name))
        .map(|route| {
            let endpoints: Vec<Value> = route
                .endpoints
                .iter()
                .map(|e| {
                    let view = e.state.view();
                    json!({
                        "address": e.entry.addr.to_string(),
                        "node": e.entry.node,
                        "zone": e.entry.zone,
                        "weight": e.entry.weight,
                        "breaker": view.breaker,
                        "ewma_ms": view.ewma_ms,
                        "in_flight": view.in_flight,
                        "ejected": view.ejected_for_s.is_some(),
                        "ejected_for_s": view.ejected_for_s,
                    })
                })
                .collect();
            let rules = &route.rules;
            json!({
                "service": &*route.name,
                "protocol": rules.protocol,
                "load_balancer": rules.load_balancer,
                "request_timeout_ms": rules.request_timeout.as_millis() as u64,
                "retries": rules.retry.as_ref().map_or(0, |r| r.max),
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({ "node": state.config().node.name, "services": services })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let q = "x=1&level=info%2Cmesh_agent%3Ddebug+x&y=%zz";
        assert_eq!(
            query_param(q, "level").as_deref(),
            Some("info,mesh_agent=debug x")
        );
        assert_eq!(query_param(q, "y").as_deref(), Some("%zz"));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn every_route_is_on_the_index() {
        let text = index();
        for path in ADMIN_ROUTES {
            assert!(text.contains(path), "{path}");
        }
    }
}
