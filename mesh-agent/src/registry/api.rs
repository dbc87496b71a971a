//! Consul-compatible agent API (subset) on `listen.registry` (default agent_ip:8500), so existing
//! Consul clients work unchanged. Writes are allowed only for the caller's own workload identity;
//! reads of a service follow the authorization allow-lists.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::agent::{AgentError, CheckSpec, CheckState, LocalAgent, Registration};
use super::caller::{self, Caller};
use super::catalog::Catalog;
use super::health::CheckKind;
use super::instance::{HealthStatus, Instance, RecordError};
use crate::config::{duration_text, HealthDefaults};
use crate::identity::SpiffeId;
use crate::policy::authz::Authorize;
use crate::state::AgentState;

/// Bounds: concurrent connections, request body size, header and body read time.
const MAX_CONNECTIONS: usize = 512;
const MAX_BODY: usize = 64 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest blocking query (Consul's limit is 10 minutes; default 5).
const MAX_WAIT: Duration = Duration::from_secs(300);

/// The OpenAPI document of this API, the same file as docs/registry-openapi.json.
pub const OPENAPI: &str = include_str!("../../../docs/registry-openapi.json");

pub async fn serve(
    listener: TcpListener,
    state: Arc<AgentState>,
    agent: Arc<LocalAgent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "registry accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (state, agent) = (state.clone(), agent.clone());
        let local_port = stream.local_addr().map_or(0, |a| a.port());
        tokio::spawn(async move {
            let _permit = permit;
            let who = Arc::new(caller::resolve(&state, peer, local_port).await);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (state, agent, who) = (state.clone(), agent.clone(), who.clone());
                async move {
                    let reply = handle(req, &state, &agent, &who, peer).await;
                    Ok::<_, Infallible>(reply.into_response())
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct Reply {
    status: StatusCode,
    body: String,
    json: bool,
    index: Option<u64>,
}

impl Reply {
    fn json(value: Value, index: Option<u64>) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: value.to_string(),
            json: true,
            index,
        }
    }
    fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            body: body.into(),
            json: false,
            index: None,
        }
    }
    fn into_response(self) -> Response<Full<Bytes>> {
        let mut b = Response::builder().status(self.status).header(
            "content-type",
            if self.json {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            },
        );
        if let Some(i) = self.index {
            b = b.header("x-consul-index", i.to_string());
        }
        b.body(Full::new(Bytes::from(self.body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    req: Request<Incoming>,
    state: &AgentState,
    agent: &Arc<LocalAgent>,
    who: &Caller,
    peer: SocketAddr,
) -> Reply {
    let path = req.uri().path().to_owned();
    let q = query(&req);
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "openapi.json"]) => Reply {
            status: StatusCode::OK,
            body: OPENAPI.to_owned(),
            json: true,
            index: None,
        },
        (&Method::GET, ["v1", "schema", "instance.json"]) => {
            Reply::json(super::instance::instance_schema(), None)
        }
        (&Method::PUT, ["v1", "agent", "service", "register"]) => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            register(agent, who, peer, &body).await
        }
        (&Method::PUT, ["v1", "agent", "service", "deregister", id]) => {
            let Some(identity) = who.identity() else {
                return forbidden(who, "deregister", id);
            };
            result(
                agent.deregister(id, Some(identity)).await,
                who,
                "deregister",
            )
        }
        (&Method::PUT, ["v1", "agent", "check", verb @ ("pass" | "warn" | "fail"), id]) => {
            let status = match *verb {
                "pass" => HealthStatus::Passing,
                "warn" => HealthStatus::Warning,
                _ => HealthStatus::Critical,
            };
            let Some(identity) = who.identity() else {
                return forbidden(who, "heartbeat", id);
            };
            let note = q.get("note").cloned().unwrap_or_default();
            result(
                agent.update_ttl(id, status, note, Some(identity)).await,
                who,
                "heartbeat",
            )
        }
        (&Method::PUT, ["v1", "agent", "check", "update", id]) => {
            let Some(identity) = who.identity() else {
                return forbidden(who, "heartbeat", id);
            };
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let update = serde_json::from_slice::<Value>(&body)
                .map(|v| lower(&v))
                .unwrap_or_default();
            let status = match text(&update, "status").as_deref() {
                Some("passing") => HealthStatus::Passing,
                Some("warning") => HealthStatus::Warning,
                Some("critical") => HealthStatus::Critical,
                other => {
                    return Reply::text(
                        StatusCode::BAD_REQUEST,
                        format!("field `Status`: {other:?} is not passing, warning or critical\n"),
                    )
                }
            };
            let note = text(&update, "output").unwrap_or_default();
            result(
                agent.update_ttl(id, status, note, Some(identity)).await,
                who,
                "heartbeat",
            )
        }
        (&Method::GET, ["v1", "agent", "services"]) => {
            let out: Map<String, Value> = agent
                .locals()
                .into_iter()
                .map(|(i, _)| (i.instance_id.clone(), agent_service(&i)))
                .collect();
            Reply::json(Value::Object(out), None)
        }
        (&Method::GET, ["v1", "agent", "checks"]) => {
            let out: Map<String, Value> = agent
                .locals()
                .iter()
                .flat_map(|(i, checks)| checks.iter().map(move |c| (c, i)))
                .map(|(c, i)| (c.spec.id.clone(), check_json(&agent.node, i, c)))
                .collect();
            Reply::json(Value::Object(out), None)
        }
        (&Method::GET, ["v1", "catalog", "services"]) => {
            let catalog = blocking(agent, &q).await;
            let out: Map<String, Value> = catalog
                .services()
                .into_iter()
                .filter(|(name, _)| may_read(state, who, name))
                .map(|(name, tags)| (name, json!(tags)))
                .collect();
            Reply::json(Value::Object(out), Some(catalog.index))
        }
        (&Method::GET, ["v1", "catalog", "service", name]) => {
            if !may_read(state, who, name) {
                return forbidden(who, "read", name);
            }
            let catalog = blocking(agent, &q).await;
            let out: Vec<Value> = catalog
                .service(name, false)
                .filter(|i| tag_matches(i, &q))
                .map(|i| catalog_entry(&catalog, i))
                .collect();
            Reply::json(json!(out), Some(catalog.index))
        }
        (&Method::GET, ["v1", "health", "service", name]) => {
            if !may_read(state, who, name) {
                return forbidden(who, "read", name);
            }
            let catalog = blocking(agent, &q).await;
            let passing = q.contains_key("passing")
                && q.get("passing").is_none_or(|v| v != "false" && v != "0");
            let out: Vec<Value> = catalog
                .service(name, passing)
                .filter(|i| tag_matches(i, &q))
                .map(|i| health_entry(&catalog, agent, i))
                .collect();
            Reply::json(json!(out), Some(catalog.index))
        }
        _ => Reply::text(
            StatusCode::NOT_FOUND,
            format!("{method} {path}: no such endpoint; see /v1/openapi.json\n"),
        ),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    let limited = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => Err(Reply::text(
            StatusCode::BAD_REQUEST,
            format!("request body: {e} (limit {MAX_BODY} bytes)\n"),
        )),
        Err(_) => Err(Reply::text(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time\n",
        )),
    }
}

fn forbidden(who: &Caller, action: &str, target: &str) -> Reply {
    let caller = who.identity().unwrap_or("an unidentified caller");
    tracing::warn!(caller, action, target, "registry request refused");
    Reply::text(
        StatusCode::FORBIDDEN,
        format!("Permission denied: {caller} may not {action} {target:?}\n"),
    )
}

fn result(r: Result<(), AgentError>, who: &Caller, action: &str) -> Reply {
    match r {
        Ok(()) => Reply::text(StatusCode::OK, ""),
        Err(AgentError::Forbidden { id, .. }) => forbidden(who, action, &id),
        Err(e @ AgentError::NotFound { .. }) => {
            Reply::text(StatusCode::NOT_FOUND, format!("{e}\n"))
        }
        Err(e @ AgentError::TooMany { .. }) => {
            Reply::text(StatusCode::TOO_MANY_REQUESTS, format!("{e}\n"))
        }
        Err(e @ (AgentError::Record(_) | AgentError::NotTtl { .. })) => {
            Reply::text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
        Err(e @ AgentError::Backend(_)) => {
            Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

/// Reads follow the allow-lists: a workload sees a service it may call (or its own).
fn may_read(state: &AgentState, who: &Caller, service: &str) -> bool {
    let Caller::Workload {
        identity,
        service: own,
    } = who
    else {
        return true;
    };
    if own == service {
        return true;
    }
    let config = state.config();
    let Some((ns, sa)) = identity.split_once('/') else {
        return false;
    };
    let Ok(id) = SpiffeId::new(&config.node.trust_domain, ns, sa) else {
        return false;
    };
    state
        .security
        .authz
        .authorize(&id, Some(own), service)
        .allowed
}

/// Blocking query: with `index`, waits (up to `wait`) for the catalog to move past it.
async fn blocking(agent: &LocalAgent, q: &BTreeMap<String, String>) -> Arc<Catalog> {
    let mut rx = agent.backend.subscribe();
    let Some(index) = q.get("index").and_then(|i| i.parse::<u64>().ok()) else {
        return rx.borrow().clone();
    };
    let wait = q
        .get("wait")
        .and_then(|w| duration_text::parse(w).ok())
        .unwrap_or(MAX_WAIT)
        .min(MAX_WAIT);
    let _ = tokio::time::timeout(wait, rx.wait_for(|c| c.index > index)).await;
    let current = rx.borrow().clone();
    current
}

fn tag_matches(i: &Instance, q: &BTreeMap<String, String>) -> bool {
    q.get("tag").is_none_or(|t| i.tags.contains(t))
}

fn node_address(catalog: &Catalog, node: &str) -> String {
    catalog
        .nodes
        .get(node)
        .map(|n| n.hbone.ip().to_string())
        .unwrap_or_default()
}

fn agent_service(i: &Instance) -> Value {
    json!({
        "ID": i.instance_id,
        "Service": i.service_name,
        "Tags": i.tags,
        "Meta": consul_meta(i),
        "Address": i.address.to_string(),
        "Port": i.port,
        "Weights": {"Passing": i.weight, "Warning": 1},
        "Datacenter": "dc1",
    })
}

/// The model's fields as Consul Meta, so clients read them back where they wrote them.
fn consul_meta(i: &Instance) -> Value {
    let mut meta: Map<String, Value> = i.meta.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    meta.insert("service_version".into(), json!(i.service_version));
    meta.insert("service_type".into(), json!(i.service_type));
    meta.insert("environment".into(), json!(i.environment));
    for (k, v) in [
        ("region", &i.region),
        ("zone", &i.zone),
        ("deployment_id", &i.deployment_id),
    ] {
        if let Some(v) = v {
            meta.insert(k.into(), json!(v));
        }
    }
    if !i.capabilities.is_empty() {
        meta.insert("capabilities".into(), json!(i.capabilities.join(",")));
    }
    Value::Object(meta)
}

fn catalog_entry(catalog: &Catalog, i: &Instance) -> Value {
    json!({
        "Node": i.node,
        "Address": node_address(catalog, &i.node),
        "Datacenter": "dc1",
        "ServiceID": i.instance_id,
        "ServiceName": i.service_name,
        "ServiceAddress": i.address.to_string(),
        "ServicePort": i.port,
        "ServiceTags": i.tags,
        "ServiceMeta": consul_meta(i),
        "ServiceWeights": {"Passing": i.weight, "Warning": 1},
    })
}

fn check_json(node: &str, i: &Instance, c: &CheckState) -> Value {
    let kind = match c.spec.kind {
        CheckKind::Http(_) => "http",
        CheckKind::Tcp(_) => "tcp",
        CheckKind::Grpc { .. } => "grpc",
        CheckKind::Script(_) => "script",
        CheckKind::Ttl(_) => "ttl",
    };
    json!({
        "Node": node,
        "CheckID": c.spec.id,
        "Name": c.spec.name,
        "Status": c.status.as_str(),
        "Output": c.output,
        "ServiceID": i.instance_id,
        "ServiceName": i.service_name,
        "Type": kind,
    })
}

fn health_entry(catalog: &Catalog, agent: &LocalAgent, i: &Instance) -> Value {
    // Checks of instances on other nodes are not replicated; their aggregate status is.
    let checks: Vec<Value> = match agent.checks_of(&i.instance_id) {
        Some(checks) if i.node == agent.node => {
            checks.iter().map(|c| check_json(&i.node, i, c)).collect()
        }
        _ => vec![json!({
            "Node": i.node,
            "CheckID": format!("service:{}", i.instance_id),
            "Name": "aggregate",
            "Status": i.status.as_str(),
            "Output": "",
            "ServiceID": i.instance_id,
            "ServiceName": i.service_name,
            "Type": "",
        })],
    };
    json!({
        "Node": {"Node": i.node, "Address": node_address(catalog, &i.node), "Datacenter": "dc1"},
        "Service": agent_service(i),
        "Checks": checks,
    })
}

async fn register(agent: &Arc<LocalAgent>, who: &Caller, peer: SocketAddr, body: &[u8]) -> Reply {
    let Caller::Workload { identity, service } = who else {
        return forbidden(who, "register", "a service");
    };
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Reply::text(StatusCode::BAD_REQUEST, format!("request body: {e}\n")),
    };
    let peer_ip = match peer {
        SocketAddr::V4(p) => *p.ip(),
        SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let mut registration = match parse_registration(&value, peer_ip, &agent.defaults) {
        Ok(r) => r,
        Err(e) => return Reply::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    if &registration.instance.service_name != service {
        return forbidden(who, "register", &registration.instance.service_name);
    }
    registration.instance.owner = identity.clone();
    result(agent.register(registration).await, who, "register")
}

/// Lowercases an object's keys: Consul accepts `Name`, `name` and `HTTP`, `http` alike.
fn lower(v: &Value) -> Map<String, Value> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn text(o: &Map<String, Value>, key: &str) -> Option<String> {
    o.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn duration(
    o: &Map<String, Value>,
    key: &str,
    field: &str,
    default: Duration,
) -> Result<Duration, RecordError> {
    match text(o, key) {
        None => Ok(default),
        Some(t) => duration_text::parse(&t).map_err(|m| RecordError::new(field, m)),
    }
}

/// A Consul service definition -> registration. Required model fields come from Meta
/// (`service_version` or `version`, `service_type`, `environment`).
pub fn parse_registration(
    body: &Value,
    peer_ip: Ipv4Addr,
    defaults: &HealthDefaults,
) -> Result<Registration, RecordError> {
    let o = lower(body);
    let name = text(&o, "name").ok_or_else(|| RecordError::new("Name", "is required"))?;
    let id = text(&o, "id").unwrap_or_else(|| name.clone());
    let address = match text(&o, "address") {
        Some(a) => a
            .parse::<Ipv4Addr>()
            .map_err(|_| RecordError::new("Address", format!("{a:?} is not an IPv4 address")))?,
        None => peer_ip,
    };
    let port = o
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| RecordError::new("Port", "is required (1-65535)"))?;
    let tags: Vec<String> = o
        .get("tags")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let meta: BTreeMap<String, String> = o
        .get("meta")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let required = |keys: &[&str]| -> Result<String, RecordError> {
        keys.iter()
            .find_map(|k| meta.get(*k).cloned())
            .ok_or_else(|| RecordError::new(format!("Meta.{}", keys[0]), "is required"))
    };
    let weight = o
        .get("weights")
        .map(lower)
        .and_then(|w| w.get("passing").and_then(Value::as_u64))
        .map_or(1, |w| u32::try_from(w).unwrap_or(u32::MAX));
    let instance = Instance {
        service_name: name,
        service_version: required(&["service_version", "version"])?,
        service_type: required(&["service_type"])?,
        environment: required(&["environment"])?,
        instance_id: id.clone(),
        address,
        port,
        region: meta.get("region").cloned(),
        zone: meta.get("zone").cloned(),
        deployment_id: meta.get("deployment_id").cloned(),
        capabilities: meta
            .get("capabilities")
            .map(|c| {
                c.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        tags,
        meta,
        weight,
        // Set by the local agent on register.
        node: String::new(),
        owner: String::new(),
        status: HealthStatus::Passing,
    };
    instance.validate().map_err(|e| {
        let field = match e.field.as_str() {
            "service_name" => "Name".to_owned(),
            "instance_id" => "ID".to_owned(),
            "address" => "Address".to_owned(),
            "port" => "Port".to_owned(),
            "weight" => "Weights.Passing".to_owned(),
            other => format!("Meta.{other}"),
        };
        RecordError::new(field, e.message)
    })?;
    let mut defs: Vec<(String, Value)> = Vec::new();
    if let Some(c) = o.get("check").filter(|c| c.is_object()) {
        defs.push(("Check".into(), c.clone()));
    }
    if let Some(list) = o.get("checks").and_then(Value::as_array) {
        for (n, c) in list.iter().enumerate() {
            defs.push((format!("Checks[{n}]"), c.clone()));
        }
    }
    let single = defs.len() == 1;
    let checks = defs
        .iter()
        .enumerate()
        .map(|(n, (field, c))| {
            let default_id = if single {
                format!("service:{id}")
            } else {
                format!("service:{id}:{}", n + 1)
            };
            parse_check(&lower(c), field, default_id, defaults)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Registration { instance, checks })
}

fn parse_check(
    c: &Map<String, Value>,
    field: &str,
    default_id: String,
    d: &HealthDefaults,
) -> Result<CheckSpec, RecordError> {
    let f = |k: &str| format!("{field}.{k}");
    let v4 = |s: &str, key: &str| -> Result<SocketAddrV4, RecordError> {
        s.parse()
            .map_err(|_| RecordError::new(f(key), format!("{s:?} must be <ipv4>:<port>")))
    };
    let kind = if let Some(ttl) = text(c, "ttl") {
        CheckKind::Ttl(duration_text::parse(&ttl).map_err(|m| RecordError::new(f("TTL"), m))?)
    } else if let Some(url) = text(c, "http") {
        CheckKind::Http(url)
    } else if let Some(addr) = text(c, "tcp") {
        CheckKind::Tcp(v4(&addr, "TCP")?)
    } else if let Some(target) = text(c, "grpc") {
        let (addr, service) = target.split_once('/').unwrap_or((&target, ""));
        CheckKind::Grpc {
            addr: v4(addr, "GRPC")?,
            service: service.to_owned(),
        }
    } else if let Some(args) = c.get("args").and_then(Value::as_array) {
        if !d.enable_script_checks {
            return Err(RecordError::new(
                f("Args"),
                "script checks are disabled (registry.health.enable_script_checks)",
            ));
        }
        let args: Vec<String> = args
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        if args.is_empty() {
            return Err(RecordError::new(f("Args"), "must name a program"));
        }
        CheckKind::Script(args)
    } else {
        return Err(RecordError::new(
            field,
            "needs one of TTL, HTTP, TCP, GRPC or Args",
        ));
    };
    let initial = match text(c, "status").as_deref() {
        None | Some("critical") => HealthStatus::Critical,
        Some("passing") => HealthStatus::Passing,
        Some("warning") => HealthStatus::Warning,
        Some(other) => {
            return Err(RecordError::new(
                f("Status"),
                format!("{other:?} is not passing, warning or critical"),
            ))
        }
    };
    let interval = duration(c, "interval", &f("Interval"), d.interval)?;
    if interval.is_zero() {
        return Err(RecordError::new(f("Interval"), "must be greater than 0"));
    }
    Ok(CheckSpec {
        id: text(c, "checkid")
            .or_else(|| text(c, "id"))
            .unwrap_or(default_id),
        name: text(c, "name").unwrap_or_else(|| "service check".into()),
        kind,
        interval,
        timeout: duration(c, "timeout", &f("Timeout"), d.timeout)?,
        deregister_after: duration(
            c,
            "deregistercriticalserviceafter",
            &f("DeregisterCriticalServiceAfter"),
            d.deregister_critical_after,
        )?,
        initial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Registration, RecordError> {
        let value: Value = serde_json::from_str(body).expect("json");
        parse_registration(
            &value,
            "10.1.1.2".parse().expect("ip"),
            &HealthDefaults::default(),
        )
    }

    const META: &str = r#""Meta":{"version":"1.0","service_type":"http","environment":"prod","zone":"z1","capabilities":"pay, refund"}"#;

    #[test]
    fn query_values_are_percent_decoded_without_panicking() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%e9%"), "\u{fffd}%");
        assert_eq!(percent_decode("é%zz"), "é%zz");
    }

    #[test]
    fn consul_definition_maps_onto_the_model() {
        // py-consul sends lowercase keys; Consul's docs use PascalCase: both are accepted.
        let r = parse(&format!(
            r#"{{"name":"wallet","port":9000,"tags":["a"],{META},"Weights":{{"Passing":5}},
                "check":{{"ttl":"10s"}}}}"#
        ))
        .expect("valid");
        let i = &r.instance;
        assert_eq!(i.instance_id, "wallet", "ID defaults to Name");
        assert_eq!(
            i.address.to_string(),
            "10.1.1.2",
            "Address defaults to the caller"
        );
        assert_eq!(
            (i.service_version.as_str(), i.zone.as_deref()),
            ("1.0", Some("z1"))
        );
        assert_eq!(i.capabilities, vec!["pay", "refund"]);
        assert_eq!(i.weight, 5);
        assert_eq!(r.checks.len(), 1);
        assert_eq!(r.checks[0].id, "service:wallet");
        assert_eq!(r.checks[0].kind, CheckKind::Ttl(Duration::from_secs(10)));
        assert_eq!(r.checks[0].initial, HealthStatus::Critical);
        assert_eq!(
            r.checks[0].deregister_after,
            Duration::from_secs(60),
            "seed default"
        );
    }

    #[test]
    fn several_checks_get_numbered_ids_and_defaults() {
        let r = parse(&format!(
            r#"{{"Name":"wallet","ID":"w-1","Port":9000,{META},"Checks":[
                {{"HTTP":"http://10.1.1.2:9000/health"}},
                {{"TCP":"10.1.1.2:9000","Interval":"5s","Timeout":"1s"}},
                {{"GRPC":"10.1.1.2:9001/wallet","CheckID":"grpc-1"}}]}}"#
        ))
        .expect("valid");
        let ids: Vec<_> = r.checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, vec!["service:w-1:1", "service:w-1:2", "grpc-1"]);
        assert_eq!(
            r.checks[0].interval,
            Duration::from_secs(30),
            "seed default interval"
        );
        assert_eq!(
            r.checks[0].timeout,
            Duration::from_secs(10),
            "seed default timeout"
        );
        assert_eq!(r.checks[1].interval, Duration::from_secs(5));
        assert!(
            matches!(&r.checks[2].kind, CheckKind::Grpc { service, .. } if service == "wallet")
        );
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let cases = [
            (r#"{"Port":1}"#.to_owned(), "Name"),
            (format!(r#"{{"Name":"wallet",{META}}}"#), "Port"),
            (
                r#"{"Name":"wallet","Port":1,"Meta":{"service_type":"x","environment":"y"}}"#
                    .to_owned(),
                "Meta.service_version",
            ),
            (format!(r#"{{"Name":"Wallet","Port":1,{META}}}"#), "Name"),
            (
                format!(r#"{{"Name":"w","Address":"nope","Port":1,{META}}}"#),
                "Address",
            ),
            (
                format!(r#"{{"Name":"w","Port":1,{META},"Check":{{"TTL":"ten"}}}}"#),
                "Check.TTL",
            ),
            (
                format!(
                    r#"{{"Name":"w","Port":1,{META},"Checks":[{{"TTL":"1s"}},{{"TCP":"x"}}]}}"#
                ),
                "Checks[1].TCP",
            ),
            (
                format!(r#"{{"Name":"w","Port":1,{META},"Check":{{"Args":["/bin/true"]}}}}"#),
                "Check.Args",
            ),
            (
                format!(r#"{{"Name":"w","Port":1,{META},"Check":{{"Interval":"1s"}}}}"#),
                "Check",
            ),
        ];
        for (body, field) in cases {
            let e = parse(&body).expect_err(&body);
            assert_eq!(e.field, field, "{body}: {e}");
        }
    }
}
