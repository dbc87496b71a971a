//! Pooled upstream HTTP connections per endpoint, for one service: direct (from the caller's
//! address when transparent, one pool per caller address, else from the agent address) for
//! endpoints on this node, over HBONE (one CONNECT stream per upstream HTTP
//! connection, presenting the caller's certificate) for endpoints on other nodes. HTTP/2
//! clients (prior knowledge) get HTTP/2 upstream, HTTP/1 clients HTTP/1.1 with keep-alive.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::{Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::TcpStream;

use super::connect::{connect_from, Source};
use super::hbone::{HboneError, HboneStream, TunnelProtocol};
use super::outbound::Caller;
use crate::identity::SpiffeId;
use crate::state::AgentState;
use crate::traffic::RouteEndpoint;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies on the proxy path.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Idle pooled connections are closed after this long.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(90);

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("connecting to {endpoint}: {reason}")]
    Connect {
        endpoint: SocketAddrV4,
        reason: String,
    },
    #[error("the destination agent refused the call: {reason}")]
    Denied { reason: String },
    #[error("the per-try timeout fired")]
    Timeout,
    #[error("{endpoint} failed before answering: {source}")]
    Reset {
        endpoint: SocketAddrV4,
        source: BoxError,
    },
}

/// A new upstream connection: TCP to a same-node endpoint or a CONNECT stream over HBONE.
pub enum UpstreamIo {
    Direct(TcpStream),
    Hbone(HboneStream),
}

type HttpClient<C> = Client<C, ProxyBody>;

/// HTTP/1.1 and HTTP/2 clients over one connector.
struct Clients<C> {
    h1: HttpClient<C>,
    h2: HttpClient<C>,
}

/// A connector told which HTTP version its connections will carry (HBONE marks its tunnels
/// with it, so the destination agent can serve them request by request).
trait Carrying {
    fn carrying(self, h2: bool) -> Self;
}

impl<C> Clients<C>
where
    C: hyper_util::client::legacy::connect::Connect + Carrying + Clone + Send + Sync + 'static,
{
    fn new(connector: C) -> Self {
        let build = |h2: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                // The client's own Host header is passed through.
                .set_host(false)
                .http2_only(h2)
                .build(connector.clone().carrying(h2))
        };
        Self {
            h1: build(false),
            h2: build(true),
        }
    }

    fn for_version(&self, version: Version) -> &HttpClient<C> {
        if version == Version::HTTP_2 {
            &self.h2
        } else {
            &self.h1
        }
    }
}

pub struct Upstreams {
    agent: Weak<AgentState>,
    service: Arc<str>,
    connect_timeout: Duration,
    source: Source,
    /// One pool per source address: a pooled connection is bound to one caller's address, so
    /// no request may ride it for another caller. Only the agent address when not transparent.
    direct: Mutex<HashMap<Ipv4Addr, Arc<Clients<DirectConnector>>>>,
    /// One pool per calling identity and pod address: an HBONE tunnel carries one workload's
    /// certificate, and the destination agent connects from the address it names.
    hbone: Mutex<HashMap<HbonePoolKey, Arc<Clients<HboneConnector>>>>,
}

impl Upstreams {
    /// `source` says where direct connects come from (the config being applied, which the
    /// agent state may not hold yet).
    pub fn new(
        agent: Weak<AgentState>,
        service: Arc<str>,
        connect_timeout: Duration,
        source: Source,
    ) -> Self {
        Self {
            direct: Mutex::default(),
            agent,
            service,
            connect_timeout,
            source,
            hbone: Mutex::default(),
        }
    }

    /// Whether these pools were made for this connect timeout and source.
    pub fn fits(&self, connect_timeout: Duration, source: Source) -> bool {
        self.connect_timeout == connect_timeout && self.source == source
    }

    /// Where direct connects come from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// A new connection to `target` for `caller`, not pooled (the caller owns and drives it).
    pub async fn open(
        &self,
        target: &RouteEndpoint,
        caller: &Caller,
    ) -> Result<UpstreamIo, UpstreamError> {
        let endpoint = target.entry.addr;
        let opened = match &target.entry.node {
            None => {
                let bind_ip = self.source.bind_ip(Some(caller.ip), endpoint);
                connect_direct(self.source, bind_ip, endpoint, self.connect_timeout)
                    .await
                    .map(UpstreamIo::Direct)
            }
            Some(_) => connect_hbone(
                &self.agent,
                &caller.id,
                caller.ip,
                &self.service,
                endpoint,
                // Owned upstream connections carry HTTP/1 only (h2 stays on the shared pool).
                TunnelProtocol::Http1,
                self.connect_timeout,
            )
            .await
            .map(UpstreamIo::Hbone),
        };
        opened.map_err(|e| connect_error(endpoint, &*e))
    }

    /// Sends one attempt to `endpoint`; `req` has the client's method, path, headers and body.
    pub async fn send(
        &self,
        target: &RouteEndpoint,
        caller: &Caller,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let endpoint = &target.entry;
        // Shared, reference-counted parts: no string is built per request.
        let mut parts = hyper::http::uri::Parts::default();
        parts.scheme = Some(hyper::http::uri::Scheme::HTTP);
        parts.authority = Some(target.authority.clone());
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
        );
        *req.uri_mut() = Uri::from_parts(parts).map_err(|e| UpstreamError::Connect {
            endpoint: endpoint.addr,
            reason: e.to_string(),
        })?;
        let version = req.version();
        // The upstream request is HTTP/1.1 or HTTP/2 by the client pool, not the client's.
        *req.version_mut() = if version == Version::HTTP_2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let result = match &endpoint.node {
            None => {
                let clients = self.direct_clients(caller.ip, endpoint.addr);
                clients.for_version(version).request(req).await
            }
            Some(_) => {
                let clients = self.hbone_clients(caller);
                clients.for_version(version).request(req).await
            }
        };
        result.map_err(|e| classify(endpoint.addr, e))
    }

    fn direct_clients(
        &self,
        caller: Ipv4Addr,
        endpoint: SocketAddrV4,
    ) -> Arc<Clients<DirectConnector>> {
        let bind_ip = self.source.bind_ip(Some(caller), endpoint);
        pooled(&self.direct, bind_ip, || DirectConnector {
            source: self.source,
            bind_ip,
            timeout: self.connect_timeout,
        })
    }

    fn hbone_clients(&self, caller: &Caller) -> Arc<Clients<HboneConnector>> {
        pooled(&self.hbone, (caller.id.clone(), caller.ip), || {
            HboneConnector {
                agent: self.agent.clone(),
                caller: caller.id.clone(),
                caller_ip: caller.ip,
                service: self.service.clone(),
                timeout: self.connect_timeout,
                protocol: TunnelProtocol::Http1,
            }
        })
    }
}

/// Pools kept per caller at most; past it the map starts over (callers that left stop
/// holding memory; requests in flight keep their pool through its `Arc`).
const MAX_CALLER_POOLS: usize = 4096;

/// The pool of `key` in `map`, made with `connector` on first use.
fn pooled<K, C>(
    map: &Mutex<HashMap<K, Arc<Clients<C>>>>,
    key: K,
    connector: impl FnOnce() -> C,
) -> Arc<Clients<C>>
where
    K: std::hash::Hash + Eq,
    C: hyper_util::client::legacy::connect::Connect + Carrying + Clone + Send + Sync + 'static,
{
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    if map.len() >= MAX_CALLER_POOLS && !map.contains_key(&key) {
        map.clear();
    }
    map.entry(key)
        .or_insert_with(|| Arc::new(Clients::new(connector())))
        .clone()
}

fn classify(endpoint: SocketAddrV4, e: hyper_util::client::legacy::Error) -> UpstreamError {
    if e.is_connect() {
        return match std::error::Error::source(&e) {
            Some(cause) => connect_error(endpoint, cause),
            None => UpstreamError::Connect {
                endpoint,
                reason: e.to_string(),
            },
        };
    }
    UpstreamError::Reset {
        endpoint,
        source: e.into(),
    }
}

/// A failed connect: a refusal by the destination agent (anywhere in the cause chain) or a
/// connect failure.
fn connect_error(
    endpoint: SocketAddrV4,
    cause: &(dyn std::error::Error + 'static),
) -> UpstreamError {
    let mut source = Some(cause);
    while let Some(s) = source {
        if let Some(HboneError::Denied { reason }) = s.downcast_ref::<HboneError>() {
            return UpstreamError::Denied {
                reason: reason.clone(),
            };
        }
        source = s.source();
    }
    UpstreamError::Connect {
        endpoint,
        reason: cause.to_string(),
    }
}

fn endpoint_of(uri: &Uri) -> Result<SocketAddrV4, BoxError> {
    uri.authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or_else(|| format!("upstream URI {uri} has no endpoint address").into())
}

type ConnectFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// Same-node endpoints: TCP from `bind_ip` (the caller's or the agent's address).
#[derive(Clone)]
struct DirectConnector {
    source: Source,
    bind_ip: Ipv4Addr,
    timeout: Duration,
}

impl Carrying for DirectConnector {
    fn carrying(self, _h2: bool) -> Self {
        self
    }
}

impl tower::Service<Uri> for DirectConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (source, bind_ip, timeout) = (self.source, self.bind_ip, self.timeout);
        Box::pin(async move {
            let endpoint = endpoint_of(&uri)?;
            let stream = connect_direct(source, bind_ip, endpoint, timeout).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// TCP to a same-node endpoint from `bind_ip`, bounded by `timeout`.
async fn connect_direct(
    source: Source,
    bind_ip: Ipv4Addr,
    endpoint: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream, BoxError> {
    let connect = connect_from(source, Some(bind_ip), endpoint);
    let stream = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("timed out after {timeout:?}"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The calling identity and pod address an HBONE pool serves.
type HbonePoolKey = (SpiffeId, Ipv4Addr);

/// Endpoints on other nodes: a CONNECT stream through that node's agent.
#[derive(Clone)]
struct HboneConnector {
    agent: Weak<AgentState>,
    caller: SpiffeId,
    caller_ip: Ipv4Addr,
    service: Arc<str>,
    timeout: Duration,
    protocol: TunnelProtocol,
}

impl Carrying for HboneConnector {
    fn carrying(self, h2: bool) -> Self {
        let protocol = match h2 {
            true => TunnelProtocol::Http2,
            false => TunnelProtocol::Http1,
        };
        Self { protocol, ..self }
    }
}

impl tower::Service<Uri> for HboneConnector {
    type Response = TokioIo<HboneStream>;
    type Error = BoxError;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let endpoint = endpoint_of(&uri)?;
            let stream = connect_hbone(
                &this.agent,
                &this.caller,
                this.caller_ip,
                &this.service,
                endpoint,
                this.protocol,
                this.timeout,
            )
            .await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A CONNECT stream to `endpoint` through its node's agent, presenting `caller`'s certificate,
/// bounded by `timeout`.
async fn connect_hbone(
    agent: &Weak<AgentState>,
    caller: &SpiffeId,
    caller_ip: Ipv4Addr,
    service: &str,
    endpoint: SocketAddrV4,
    protocol: TunnelProtocol,
    timeout: Duration,
) -> Result<HboneStream, BoxError> {
    let agent = agent.upgrade().ok_or("agent is shutting down")?;
    let (node, node_addr) = hbone_node(&agent, service, endpoint)?;
    let tls = agent.security.client_tls(caller, &node)?;
    let target = SocketAddr::V4(endpoint);
    let open = agent.security.pool.connect_carrying(
        caller,
        tls,
        node_addr,
        target,
        service,
        Some(caller_ip),
        protocol,
    );
    let stream = tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| format!("HBONE tunnel timed out after {timeout:?}"))??;
    Ok(stream)
}

/// The node running `endpoint` and its agent's HBONE address, from the current snapshot.
fn hbone_node(
    agent: &AgentState,
    service: &str,
    endpoint: SocketAddrV4,
) -> Result<(String, SocketAddr), BoxError> {
    let model = agent.model();
    let node = model
        .services
        .get(service)
        .and_then(|s| s.endpoints.iter().find(|e| e.addr == endpoint))
        .and_then(|e| e.node.clone())
        .ok_or_else(|| format!("{endpoint} is no longer a remote endpoint of {service}"))?;
    let addr = agent
        .config()
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.hbone)
        .ok_or_else(|| format!("endpoint names an unknown node {node:?}"))?;
    Ok((node, addr))
}

impl Connection for HboneStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}
