//! L7 path: a captured connection that speaks HTTP is served request by request (hyper,
//! HTTP/1.1 keep-alive or HTTP/2), and every request runs the service's traffic policy on its
//! own: rate limit / concurrency -> retries (budgeted, backoff) -> request timeout -> balancer
//! -> per-endpoint breaker -> upstream connection (direct or over HBONE): HTTP/1 requests on
//! the client connection's own upstream connections, driven in its task
//! ([`super::owned_upstream`]); HTTP/2 and upgrades on the service's shared pools.

use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::body_end::OnEnd;
use super::outbound::Caller;
use super::owned_upstream::OwnedUpstreams;
use super::upstream::{BoxError, ProxyBody, UpstreamError};
use crate::access_log::RequestLine;
use crate::config::service_policy::RetryOn;
use crate::metrics::istio::{HttpSeries, PeerLabels, Reporter, Security};
use crate::policy::authz::Authorize;
use crate::state::AgentState;
use crate::traffic::endpoint::CallGuard;
use crate::traffic::{retry, RouteEndpoint, ServiceRoute};

/// Bodies up to this size are buffered so the request can be retried; larger or unsized
/// bodies stream through and the request gets one attempt.
const MAX_REPLAY_BODY: u64 = 64 * 1024;
/// Set on responses the agent makes itself, saying why.
pub const REASON_HEADER: &str = "x-nodemesh-reason";

/// (code, security) -> (nodemesh_requests_total, istio_requests_total) children.
type CodeCounters = ((u16, Security), (IntCounter, IntCounter));

/// One client connection's context, shared by its requests.
struct Conn {
    state: Arc<AgentState>,
    service_id: u32,
    caller: Caller,
    /// This agent's authorization decision, made on the first request to a same-node endpoint
    /// (other nodes' agents decide for theirs).
    local_allowed: OnceLock<bool>,
    /// Request counters (nodemesh, Istio) by response code and security, taken once each.
    requests: Mutex<Vec<CodeCounters>>,
    /// Istio label values of this caller and service, made once per connection.
    peer: PeerLabels,
    /// Istio HTTP series for same-node ([0]) and cross-node ([1]) endpoints, taken on first use.
    series: [OnceLock<HttpSeries>; 2],
    /// Upstream HTTP/1 connections of this client connection, polled by [`serve`].
    upstreams: OwnedUpstreams,
}

/// Serves HTTP on `client` until it closes; on agent shutdown, requests in flight finish and
/// the connection is closed (idle keep-alive connections at once).
pub async fn serve(
    client: TcpStream,
    state: Arc<AgentState>,
    service_id: u32,
    caller: Caller,
    peer: PeerLabels,
    mut shutdown: watch::Receiver<bool>,
) {
    let conn = Arc::new(Conn {
        state,
        service_id,
        caller,
        local_allowed: OnceLock::new(),
        requests: Mutex::default(),
        peer,
        series: Default::default(),
        upstreams: OwnedUpstreams::default(),
    });
    let owner = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    tokio::pin!(connection);
    let stopping = async move {
        // The guard `wait_for` returns must not live across an await.
        let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
    };
    let served = async {
        tokio::select! {
            r = connection.as_mut() => r,
            _ = stopping => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        }
    };
    // The upstream connections run in this task, next to the client side, until it ends.
    let result = tokio::select! {
        r = served => r,
        never = owner.upstreams.drive() => match never {},
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP client connection ended with error");
    }
}

async fn handle(conn: &Arc<Conn>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(route) = conn.state.traffic.route(conn.service_id) else {
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "service no longer configured",
        );
    };
    let start = Instant::now();
    // Declared (Content-Length) or, for a chunked body, what is known before it streams.
    let request_bytes = req.body().size_hint().lower();
    // Before the access log reads `traceparent`: its trace id is then the one sent on.
    let span = conn.state.tracer.get().map(|t| {
        let mut span = t.client_span(req.headers_mut(), &conn.peer.destination_service);
        span.set_request(req.method(), req.uri().path());
        span
    });
    // Only made when the access log is on; it shares the request's buffers.
    let line = conn.state.access_log.get().map(|_| RequestLine::new(&req));
    let mut outcome = Outcome::default();
    let response = proxy(conn, &route, req, &mut outcome).await;
    let code = response.status().as_u16();
    if let Some(mut span) = span {
        span.set_response(code);
        span.set_retries(outcome.retries);
        if let Some(endpoint) = outcome.endpoint {
            span.set_endpoint(endpoint.into());
        }
        span.end();
    }
    let security = Security::of_remote(outcome.remote);
    conn.count(&route, code, security);
    let series = conn.series(security);
    series.request_bytes.observe(request_bytes as f64);
    let pending = line.map(|line| Pending {
        conn: conn.clone(),
        line,
        code,
        outcome,
        request_bytes,
    });
    let series = series.clone();
    let finish = move |bytes: u64| {
        let millis = millis_since(start);
        series.response_bytes.observe(bytes as f64);
        series.duration_ms.observe(millis);
        if let Some(p) = pending {
            p.log(bytes, millis);
        }
    };
    match response.body().size_hint().exact() {
        Some(n) => {
            finish(n);
            response
        }
        // A streamed body: measured when it ends.
        None => response.map(|body| OnEnd::new(body, finish).boxed()),
    }
}

/// What happened to one request, for metrics and the access log.
#[derive(Default)]
struct Outcome {
    /// The last endpoint tried was on another node (so the request crossed HBONE).
    remote: bool,
    endpoint: Option<SocketAddrV4>,
    retries: u32,
    /// Authorization: this agent's (same-node endpoint) or the destination agent's.
    allowed: Option<bool>,
}

/// An access-log line waiting for the response to end.
struct Pending {
    conn: Arc<Conn>,
    line: RequestLine,
    code: u16,
    outcome: Outcome,
    request_bytes: u64,
}

impl Pending {
    fn log(self, response_bytes: u64, millis: f64) {
        let Some(log) = self.conn.state.access_log.get() else {
            return;
        };
        let peer = &self.conn.peer;
        log.log(&crate::access_log::Entry {
            time: crate::access_log::now(),
            kind: "http",
            reporter: "source",
            source_principal: &peer.source_principal,
            source_workload: &peer.source_workload,
            destination_service: &peer.destination_service,
            endpoint: self.outcome.endpoint,
            method: Some(self.line.method.as_str()),
            path: Some(self.line.path()),
            response_code: Some(self.code),
            bytes_sent: self.request_bytes,
            bytes_received: response_bytes,
            duration_ms: millis,
            retries: self.outcome.retries,
            policy: self
                .outcome
                .allowed
                .map(|a| if a { "allow" } else { "deny" }),
            connection_security_policy: Security::of_remote(self.outcome.remote).label(),
            trace_id: self.line.trace_id(),
        });
    }
}

/// Milliseconds since `start`, as the Istio duration histograms record them.
pub(crate) fn millis_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

impl Conn {
    fn count(&self, route: &ServiceRoute, code: u16, security: Security) {
        let mut cache = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, (c, i))) = cache.iter().find(|(k, _)| *k == (code, security)) {
            c.inc();
            i.inc();
            return;
        }
        let c = self.state.traffic.metrics.requests.with_label_values(&[
            &*route.name,
            self.caller.key.as_str(),
            code.to_string().as_str(),
        ]);
        let i = self
            .state
            .metrics
            .istio
            .requests(&self.peer, Reporter::Source, security, code);
        c.inc();
        i.inc();
        cache.push(((code, security), (c, i)));
    }

    fn series(&self, security: Security) -> &HttpSeries {
        self.series[(security == Security::MutualTls) as usize].get_or_init(|| {
            self.state
                .metrics
                .istio
                .http(&self.peer, Reporter::Source, security)
        })
    }

    /// One attempt: HTTP/1 on this connection's own upstream connections, HTTP/2 on the pool.
    async fn send(
        &self,
        route: &ServiceRoute,
        endpoint: &RouteEndpoint,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if request.version() == hyper::Version::HTTP_2 {
            return route.upstreams.send(endpoint, &self.caller, request).await;
        }
        self.upstreams
            .send(&route.upstreams, endpoint, &self.caller, request)
            .await
    }

    fn locally_allowed(&self, route: &ServiceRoute) -> bool {
        *self.local_allowed.get_or_init(|| {
            let d = self.state.security.authz.authorize(
                &self.caller.id,
                Some(&self.caller.service),
                &route.name,
            );
            if !d.allowed {
                self.state.metrics.service(&route.name).denied.inc();
                tracing::warn!(caller = %self.caller.id, service = %route.name, policy = %d.policy, reason = %d.reason, "request denied");
            }
            d.allowed
        })
    }
}

/// The policy layers for one request, outermost first.
async fn proxy(
    conn: &Conn,
    route: &ServiceRoute,
    req: Request<Incoming>,
    outcome: &mut Outcome,
) -> Response<ProxyBody> {
    if let Some(limiter) = &route.limiter {
        if let Err(wait) = limiter.try_acquire(conn.caller.identity) {
            route.counters.rate_limited.inc();
            let mut r = local(StatusCode::TOO_MANY_REQUESTS, "rate limit");
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
            return r;
        }
    }
    let permit = match &route.concurrency {
        Some(cap) => match cap.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                route.counters.shed.inc();
                return local(StatusCode::SERVICE_UNAVAILABLE, "concurrency limit");
            }
        },
        None => None,
    };
    let deadline = Instant::now() + route.rules.request_timeout;
    if is_upgrade(&req) {
        // Boxed: rare, and a large future that every request's would otherwise carry.
        return Box::pin(upgrade(conn, route, req, deadline, outcome)).await;
    }
    // Made inside the timeout, not bound to a local first: a named future would take a second
    // slot of its size in this one's state (and every request's future is moved into place).
    match tokio::time::timeout_at(deadline, attempts(conn, route, req, deadline, outcome)).await {
        Ok(Ok((response, _call))) if small(&response) => {
            buffered(response, deadline, &route.counters).await
        }
        Ok(Ok((response, guard))) => guarded(response, guard, permit),
        Ok(Err(reply)) => reply,
        Err(_) => {
            route.counters.timeouts.inc();
            local(StatusCode::GATEWAY_TIMEOUT, "request timeout")
        }
    }
}

/// The request as sent, replayable when its body was buffered.
struct Outgoing {
    head: hyper::http::request::Parts,
    body: Option<Bytes>,
    /// A body too large (or unsized) to buffer, sent once.
    stream: Option<Incoming>,
    /// Whether a second attempt can happen at all; if not, the head is moved, not copied.
    may_retry: bool,
    sent: bool,
    /// The client's last request on its connection (`Connection: close`, or HTTP/1.0 without
    /// keep-alive): the upstream HTTP/1 connection it goes on belongs to that client connection
    /// and will not be used again, so the upstream is asked to close it too. The server then
    /// closes first and keeps the TIME_WAIT, as it would for the client directly; otherwise the
    /// agent would close every such connection first, and its TIME_WAIT sockets (from the
    /// caller's address, towards one endpoint) would use up the ports a busy caller has.
    last_on_connection: bool,
}

impl Outgoing {
    async fn new(req: Request<Incoming>) -> Result<Self, Response<ProxyBody>> {
        let (mut head, body) = req.into_parts();
        let last_on_connection = last_on_connection(&head);
        strip_hop_by_hop(&mut head.headers);
        let sized = body.size_hint().exact().filter(|n| *n <= MAX_REPLAY_BODY);
        if sized.is_none() {
            return Ok(Self {
                head,
                body: None,
                stream: Some(body),
                may_retry: false,
                sent: false,
                last_on_connection,
            });
        }
        match Limited::new(body, MAX_REPLAY_BODY as usize).collect().await {
            Ok(b) => Ok(Self {
                head,
                body: Some(b.to_bytes()),
                stream: None,
                may_retry: true,
                sent: false,
                last_on_connection,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "reading the request body");
                Err(local(StatusCode::BAD_REQUEST, "unreadable request body"))
            }
        }
    }

    fn replayable(&self) -> bool {
        self.stream.is_none()
    }

    /// The next attempt's request; None when it cannot be sent again.
    fn attempt(&mut self) -> Option<Request<ProxyBody>> {
        if self.sent && !self.may_retry {
            return None;
        }
        self.sent = true;
        let body: ProxyBody = match (&self.body, self.stream.take()) {
            (Some(b), _) if b.is_empty() => {
                http_body_util::Empty::new().map_err(|e| match e {}).boxed()
            }
            (Some(b), _) => Full::new(b.clone()).map_err(|e| match e {}).boxed(),
            (None, Some(s)) => s.map_err(BoxError::from).boxed(),
            (None, None) => return None,
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.head.method.clone();
        *req.version_mut() = self.head.version;
        if self.may_retry {
            *req.uri_mut() = self.head.uri.clone();
            *req.headers_mut() = self.head.headers.clone();
        } else {
            *req.uri_mut() = std::mem::take(&mut self.head.uri);
            *req.headers_mut() = std::mem::take(&mut self.head.headers);
        }
        // HTTP/2 goes on the service's shared pool, and has no Connection header.
        if self.last_on_connection && self.head.version != hyper::Version::HTTP_2 {
            req.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        Some(req)
    }
}

/// Whether the client closes its connection after this request: HTTP/1.1 `Connection: close`,
/// or HTTP/1.0 without `Connection: keep-alive`.
fn last_on_connection(head: &hyper::http::request::Parts) -> bool {
    let token = |wanted: &str| {
        head.headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(wanted))
    };
    match head.version {
        hyper::Version::HTTP_11 => token("close"),
        hyper::Version::HTTP_10 | hyper::Version::HTTP_09 => !token("keep-alive"),
        _ => false,
    }
}

/// Retries around attempts; returns the response to relay (with its endpoint's call guard) or
/// a reply the agent makes itself.
async fn attempts(
    conn: &Conn,
    route: &ServiceRoute,
    req: Request<Incoming>,
    deadline: Instant,
    outcome: &mut Outcome,
) -> Result<(Response<Incoming>, CallGuard), Response<ProxyBody>> {
    let method = req.method().clone();
    let mut out = Outgoing::new(req).await?;
    let rules = &route.rules;
    out.may_retry &= rules.retry.is_some();
    if let Some(budget) = &route.budget {
        budget.deposit();
    }
    let mut tried = Vec::new();
    let mut retries = 0u32;
    loop {
        let Some(guard) = route.pick(&tried) else {
            return Err(local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no available endpoint",
            ));
        };
        let addr = guard.endpoint().addr;
        let Some(endpoint) = route.endpoints.iter().find(|e| e.entry.addr == addr) else {
            return Err(local(
                StatusCode::SERVICE_UNAVAILABLE,
                "endpoint left the service",
            ));
        };
        outcome.remote = endpoint.entry.node.is_some();
        outcome.endpoint = Some(addr);
        if endpoint.entry.node.is_none() {
            let allowed = conn.locally_allowed(route);
            outcome.allowed = Some(allowed);
            if !allowed {
                return Err(local(StatusCode::FORBIDDEN, "denied by authorization"));
            }
        }
        let Some(request) = out.attempt() else {
            return Err(local(StatusCode::BAD_GATEWAY, "request body already sent"));
        };
        // Bounded here too (not only by the caller's request timeout), so an attempt that runs
        // out of time still counts against its endpoint's breaker and latency estimate.
        let try_deadline = rules
            .per_try_timeout
            .map_or(deadline, |t| (Instant::now() + t).min(deadline));
        let result = tokio::time::timeout_at(try_deadline, conn.send(route, endpoint, request))
            .await
            .unwrap_or(Err(UpstreamError::Timeout));
        let (failure, fallback) = match result {
            Ok(resp) => {
                outcome.allowed = Some(true);
                let code = resp.status().as_u16();
                let gateway_error = matches!(code, 502..=504);
                guard.record(!gateway_error);
                let listed = rules
                    .retry
                    .as_ref()
                    .is_some_and(|r| r.retries(RetryOn::Status(code)));
                if !listed {
                    return Ok((resp, guard));
                }
                (RetryOn::Status(code), Ok((resp, guard)))
            }
            Err(UpstreamError::Denied { reason }) => {
                guard.record(true);
                outcome.allowed = Some(false);
                conn.state.metrics.service(&route.name).denied.inc();
                tracing::warn!(caller = %conn.caller.id, service = %route.name, %reason, "denied by the destination agent");
                return Err(local(
                    StatusCode::FORBIDDEN,
                    "denied by the destination agent",
                ));
            }
            Err(e) => {
                guard.record(false);
                if matches!(e, UpstreamError::Timeout) && Instant::now() >= deadline {
                    route.counters.timeouts.inc();
                    return Err(local(StatusCode::GATEWAY_TIMEOUT, "request timeout"));
                }
                let (kind, status, reason) = match &e {
                    UpstreamError::Connect { .. } => {
                        conn.state
                            .metrics
                            .service(&route.name)
                            .connect_failures
                            .inc();
                        (
                            RetryOn::ConnectFailure,
                            StatusCode::BAD_GATEWAY,
                            "endpoint connect failed",
                        )
                    }
                    UpstreamError::Timeout => (
                        RetryOn::Reset,
                        StatusCode::GATEWAY_TIMEOUT,
                        "per-try timeout",
                    ),
                    _ => (RetryOn::Reset, StatusCode::BAD_GATEWAY, "endpoint reset"),
                };
                tracing::debug!(service = %route.name, endpoint = %addr, error = %e, "attempt failed");
                (kind, Err(local(status, reason)))
            }
        };
        // Retry? Only listed, allowed conditions, with a replayable body and budget left.
        let Some(retry_rules) = rules.retry.as_ref() else {
            return fallback;
        };
        let allowed = retries < retry_rules.max
            && out.replayable()
            && retry::retryable(retry_rules, &method, failure);
        if !allowed {
            return fallback;
        }
        if !route.budget.as_ref().is_none_or(|b| b.withdraw()) {
            route.counters.budget_exhausted.inc();
            return fallback;
        }
        if let Ok((response, _guard)) = fallback {
            drain(response).await;
        }
        retries += 1;
        outcome.retries = retries;
        route.counters.retries.inc();
        tried.push(addr);
        let pause = retry::backoff(retry_rules, retries);
        if Instant::now() + pause >= deadline {
            // The timeout would fire during the pause anyway; let it.
            tokio::time::sleep_until(deadline).await;
        } else {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Reads a response that will not be relayed (a retried 5xx) to its end, so its upstream
/// connection goes back to the pool instead of being closed; bounded in size and time.
async fn drain(response: Response<Incoming>) {
    const MAX_DRAIN: usize = 64 * 1024;
    const DRAIN_TIME: Duration = Duration::from_millis(100);
    let body = Limited::new(response.into_body(), MAX_DRAIN).collect();
    let _ = tokio::time::timeout(DRAIN_TIME, body).await;
}

/// An HTTP/1.1 upgrade request (WebSocket and the like): `Connection: upgrade` plus `Upgrade`.
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(hyper::header::UPGRADE)
        && req
            .headers()
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("upgrade"))
            })
}

/// Upgrades get one attempt (the request timeout bounds the handshake, not the upgraded
/// stream); after a 101 the two upgraded connections are relayed as bytes, holding the
/// endpoint call until they close.
async fn upgrade(
    conn: &Conn,
    route: &ServiceRoute,
    mut req: Request<Incoming>,
    deadline: Instant,
    outcome: &mut Outcome,
) -> Response<ProxyBody> {
    let client_side = hyper::upgrade::on(&mut req);
    let Some(guard) = route.pick(&[]) else {
        return local(StatusCode::SERVICE_UNAVAILABLE, "no available endpoint");
    };
    let addr = guard.endpoint().addr;
    let Some(endpoint) = route.endpoints.iter().find(|e| e.entry.addr == addr) else {
        return local(StatusCode::SERVICE_UNAVAILABLE, "endpoint left the service");
    };
    outcome.remote = endpoint.entry.node.is_some();
    outcome.endpoint = Some(addr);
    if endpoint.entry.node.is_none() {
        let allowed = conn.locally_allowed(route);
        outcome.allowed = Some(allowed);
        if !allowed {
            return local(StatusCode::FORBIDDEN, "denied by authorization");
        }
    }
    // Connection and Upgrade are what this request is about: they are passed on, not stripped.
    let (head, body) = req.into_parts();
    let outgoing = Request::from_parts(head, body.map_err(BoxError::from).boxed());
    let send = route.upstreams.send(endpoint, &conn.caller, outgoing);
    let mut response = match tokio::time::timeout_at(deadline, send).await {
        Ok(Ok(r)) => r,
        Ok(Err(UpstreamError::Denied { .. })) => {
            guard.record(true);
            return local(StatusCode::FORBIDDEN, "denied by the destination agent");
        }
        Ok(Err(e)) => {
            guard.record(false);
            tracing::debug!(service = %route.name, endpoint = %addr, error = %e, "upgrade attempt failed");
            return local(StatusCode::BAD_GATEWAY, "endpoint connect failed");
        }
        Err(_) => {
            guard.record(false);
            route.counters.timeouts.inc();
            return local(StatusCode::GATEWAY_TIMEOUT, "request timeout");
        }
    };
    guard.record(!matches!(response.status().as_u16(), 502..=504));
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return guarded(response, guard, None);
    }
    let upstream_side = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let _call = guard;
        match (client_side.await, upstream_side.await) {
            (Ok(client), Ok(upstream)) => {
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            (c, u) => {
                tracing::debug!(client = ?c.err(), upstream = ?u.err(), "upgrade did not complete")
            }
        }
    });
    let (head, _) = response.into_parts();
    Response::from_parts(
        head,
        http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
    )
}

/// A response the agent makes itself.
pub fn local(status: StatusCode, reason: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("nodemesh: {reason}\n")))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        HeaderName::from_static(REASON_HEADER),
        HeaderValue::from_static(reason),
    );
    r
}

/// Hop-by-hop header names (RFC 9110 §7.6.1), `connection` first: its value lists more.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// Connection-specific headers do not cross the proxy: the fixed ones, and those the
/// `Connection` header lists. One pass over the names says which are there (usually none, or
/// only `Connection`); removing every candidate would hash all nine names on every request and
/// response. Nothing is allocated unless `Connection` appears more than once.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Bit i: HOP_BY_HOP[i] is present.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| name == *h) {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 {
        // A value clone only counts a reference.
        let mut values = headers.get_all(hyper::header::CONNECTION).iter();
        let first = values.next().cloned();
        let rest: Vec<HeaderValue> = values.cloned().collect();
        for value in first.iter().chain(&rest) {
            for listed in value.to_str().unwrap_or_default().split(',') {
                headers.remove(listed.trim());
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// A small response (known length up to [`MAX_BUFFERED_RESPONSE`]) is read whole before it is
/// relayed: hyper then writes head and body to the client in one write (one packet, one
/// wake-up of the client) instead of the head first and the body when the upstream
/// connection's task hands it over.
const MAX_BUFFERED_RESPONSE: u64 = 16 * 1024;

/// HTTP/2 responses always stream (they may carry trailers, as gRPC's do).
fn small(response: &Response<Incoming>) -> bool {
    response.version() != hyper::Version::HTTP_2
        && response
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_BUFFERED_RESPONSE)
}

async fn buffered(
    response: Response<Incoming>,
    deadline: Instant,
    counters: &crate::traffic::metrics::ServiceCounters,
) -> Response<ProxyBody> {
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let read = Limited::new(body, MAX_BUFFERED_RESPONSE as usize).collect();
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(body)) => Response::from_parts(
            head,
            Full::new(body.to_bytes()).map_err(|e| match e {}).boxed(),
        ),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "reading the upstream response body");
            local(StatusCode::BAD_GATEWAY, "upstream response body failed")
        }
        Err(_) => {
            counters.timeouts.inc();
            local(StatusCode::GATEWAY_TIMEOUT, "request timeout")
        }
    }
}

/// The upstream response for the client; the endpoint call and the concurrency slot last
/// until its body is done.
fn guarded(
    response: Response<Incoming>,
    guard: CallGuard,
    permit: Option<OwnedSemaphorePermit>,
) -> Response<ProxyBody> {
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let body = Guarded {
        inner: body,
        _guards: (guard, permit),
    };
    Response::from_parts(head, body.map_err(BoxError::from).boxed())
}

pin_project_lite::pin_project! {
    struct Guarded<B> {
        #[pin]
        inner: B,
        _guards: (CallGuard, Option<OwnedSemaphorePermit>),
    }
}

impl<B: Body> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_lists_are_stripped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Session"),
            ("connection", "x-trace-hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("x-session", "abc"),
            ("x-trace-hop", "1"),
            ("content-length", "2"),
            ("x-kept", "yes"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "x-kept"]);

        let mut plain = HeaderMap::new();
        plain.insert(hyper::header::HOST, HeaderValue::from_static("web"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1, "nothing to strip: untouched");
    }
}
