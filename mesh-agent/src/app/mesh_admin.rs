//! The operator's write path for registry mesh state (admin port only: pods reach the Consul
//! port, never this one). A document is checked with the config's validators against this
//! node's file and the registry's current objects, then written in one backend transaction;
//! every agent sharing the backend applies it through its reconciler.

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::admin::json_reply;
use crate::http_server::Reply;
use crate::registry::mesh_state::{check_apply, MeshDocument, MeshObjects};
use crate::state::AgentState;

pub fn handle(state: &AgentState, method: &Method, path: &str, body: &[u8]) -> Reply {
    let current = state.mesh.catalog().mesh.clone();
    match (method, path.strip_prefix("/mesh")) {
        (&Method::GET, Some("")) => json_reply(StatusCode::OK, &listing(&current)),
        (&Method::PUT | &Method::POST, Some("")) => apply(state, &current, body),
        (&Method::DELETE, Some(rest)) => delete(state, &current, rest),
        _ => Reply::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "/mesh: GET, PUT (a mesh document), DELETE /mesh/services/<name>, /mesh/workloads/<node>/<name>, /mesh/authorization/<name> or /mesh/default\n",
        ),
    }
}

fn apply(state: &AgentState, current: &MeshObjects, body: &[u8]) -> Reply {
    let Ok(text) = std::str::from_utf8(body) else {
        return Reply::text(StatusCode::BAD_REQUEST, "mesh document: not UTF-8\n");
    };
    let Some(base) = state.mesh.base() else {
        return Reply::text(StatusCode::SERVICE_UNAVAILABLE, "agent starting\n");
    };
    let objects = match MeshDocument::parse(text).and_then(|d| check_apply(&base, current, &d)) {
        Ok(o) => o,
        Err(e) => return Reply::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    write(state, &objects, true)
}

fn delete(state: &AgentState, current: &MeshObjects, rest: &str) -> Reply {
    let mut objects = MeshObjects::default();
    if let Some(name) = rest.strip_prefix("/services/") {
        objects = current.service_with_its_policies(name);
    } else if let Some((node, name)) = rest
        .strip_prefix("/workloads/")
        .and_then(|r| r.split_once('/'))
    {
        let key = (node.to_owned(), name.to_owned());
        if let Some(w) = current.workloads.get(&key) {
            objects.workloads.insert(key, w.clone());
        }
    } else if let Some(name) = rest.strip_prefix("/authorization/") {
        if let Some(p) = current.authorization.get(name) {
            objects.authorization.insert(name.to_owned(), p.clone());
        }
    } else if rest == "/default" {
        objects.default = current.default;
    } else {
        return Reply::text(
            StatusCode::NOT_FOUND,
            "use /mesh/services/<name>, /mesh/workloads/<node>/<name>, /mesh/authorization/<name> or /mesh/default\n",
        );
    }
    if objects == MeshObjects::default() {
        return Reply::text(
            StatusCode::NOT_FOUND,
            format!("no registry object at /mesh{rest}\n"),
        );
    }
    write(state, &objects, false)
}

/// Writes through the backend; the admin handler is synchronous, the backend is not (the agent
/// runs on tokio's multi-thread runtime, so this worker may block for the one write).
fn write(state: &AgentState, objects: &MeshObjects, put: bool) -> Reply {
    let Some(registry) = state.registry.get() else {
        return Reply::text(StatusCode::SERVICE_UNAVAILABLE, "registry not started\n");
    };
    let backend = registry.backend.clone();
    let result = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            if put {
                backend.put_mesh(objects).await
            } else {
                backend.delete_mesh(objects).await
            }
        })
    });
    match result {
        Ok(()) => json_reply(StatusCode::OK, &listing(objects)),
        Err(e) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

fn listing(objects: &MeshObjects) -> Value {
    let workloads: Vec<Value> = objects
        .workloads
        .iter()
        .map(|((node, _), w)| json!({ "node": node, "workload": w }))
        .collect();
    json!({
        "services": objects.services.values().collect::<Vec<_>>(),
        "workloads": workloads,
        "authorization": objects.authorization.values().collect::<Vec<_>>(),
        "default": objects.default,
    })
}
