//! Admin endpoints (15000, loopback by default): what the agent is doing right now, as JSON.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::ebpf::attach::resolve_cgroup;
use crate::http_server::{Handler, Reply};
use crate::policy::deny;
use crate::state::AgentState;

const CONFIG_DUMP: &str = "/config_dump";
const WORKLOADS: &str = "/workloads";
const CERTS: &str = "/certs";
const POLICY: &str = "/policy";
const ENDPOINTS: &str = "/endpoints";
/// Every admin route; the handler serves these and docs/REFERENCE.md must list them.
pub const ADMIN_ROUTES: &[&str] = &[CONFIG_DUMP, WORKLOADS, CERTS, POLICY, ENDPOINTS];

fn index() -> String {
    format!("nodemesh admin: {}\n", ADMIN_ROUTES.join(" "))
}

pub fn admin_handler(state: Arc<AgentState>) -> Handler {
    Arc::new(move |path| {
        let body = match path {
            CONFIG_DUMP => serde_json::to_value(&*state.config()).unwrap_or(Value::Null),
            WORKLOADS => workloads(&state),
            CERTS => certs(&state),
            POLICY => policy(&state),
            ENDPOINTS => endpoints(&state),
            "/" => return Reply::text(StatusCode::OK, index()),
            _ => return Reply::text(StatusCode::NOT_FOUND, index()),
        };
        Reply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: format!("{body:#}\n"),
        }
    })
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
    let decisions: Vec<Value> = state
        .security
        .authz
        .counters()
        .snapshot()
        .into_iter()
        .map(|d| json!({ "policy": d.policy, "allowed": d.allowed, "count": d.count }))
        .collect();
    json!({
        "kernel_deny": kernel_deny,
        "authorization": config.authorization,
        "service_keys": config.service_keys,
        "decisions": decisions,
    })
}

/// Each service's endpoints with their breaker state, latency estimate and ejection.
fn endpoints(state: &AgentState) -> Value {
    let services: Vec<Value> = state
        .traffic
        .routes()
        .iter()
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
