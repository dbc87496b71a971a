//! Destination side of a tunnel marked as carrying HTTP ([`super::PROTOCOL_HEADER`]): the
//! tunnel is served with hyper (HTTP/1.1 or HTTP/2, as marked) and each request is forwarded
//! over one client connection to the pod, opened for this tunnel. Policy (retries, timeouts,
//! balancing) stays with the calling agent; this side only sees, counts and logs each request
//! (`reporter="destination"`). Upgrades (101) are relayed as bytes afterwards.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::{PeerIdentity, TunnelProtocol};
use crate::access_log::{AccessLog, Entry, RequestLine};
use crate::admission::{self, Activity};
use crate::metrics::istio::{HttpSeries, PeerLabels, Security};
use crate::proxy::body_end::OnEnd;
use crate::proxy::http::{is_upgrade, local, millis_since};
use crate::proxy::upstream::{BoxError, ProxyBody, POOL_IDLE};

/// Bound on waiting for a request head, also between keep-alive requests: longer than the
/// calling agent keeps an idle pooled connection, so the caller closes idle connections, and
/// never sends a request on one this side is closing at that moment.
const HEADER_READ_TIMEOUT: Duration = POOL_IDLE.saturating_add(Duration::from_secs(30));

/// Where the destination agent records requests (the agent state implements it).
pub trait RequestMetrics: Send + Sync {
    /// Istio label values of requests from `peer` to `service` (taken once per tunnel).
    fn labels(&self, peer: &PeerIdentity, service: &str) -> PeerLabels;
    /// The duration and size histograms of `labels` as reported by the destination.
    fn series(&self, labels: &PeerLabels) -> HttpSeries;
    /// `istio_requests_total` of `labels` and one response code, as reported by the destination.
    fn requests(&self, labels: &PeerLabels, code: u16) -> IntCounter;
    /// The access log, when it is on.
    fn access_log(&self) -> Option<&AccessLog>;
    /// The request tracer, when tracing is on (off unless the implementor has one).
    fn tracer(&self) -> Option<&crate::trace::RequestTracer> {
        None
    }
}

/// One tunnel's recording: label children taken once, request counters once per code.
pub(super) struct Recorder {
    metrics: Arc<dyn RequestMetrics>,
    labels: PeerLabels,
    series: HttpSeries,
    codes: Mutex<Vec<(u16, IntCounter)>>,
}

impl Recorder {
    pub(super) fn new(
        metrics: Arc<dyn RequestMetrics>,
        peer: &PeerIdentity,
        service: &str,
    ) -> Self {
        let labels = metrics.labels(peer, service);
        Self {
            series: metrics.series(&labels),
            labels,
            metrics,
            codes: Mutex::default(),
        }
    }

    fn count(&self, code: u16) {
        let mut codes = self.codes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, counter)) = codes.iter().find(|(c, _)| *c == code) {
            counter.inc();
            return;
        }
        let counter = self.metrics.requests(&self.labels, code);
        counter.inc();
        codes.push((code, counter));
    }
}

/// What one tunnel's requests share.
pub(super) struct Tunnel {
    /// The destination service named by the CONNECT.
    pub service: String,
    pub target: SocketAddr,
    pub recorder: Option<Recorder>,
    /// A relayed upgrade with no bytes either way for this long is closed.
    pub idle: Duration,
}

/// The one client connection to the pod a tunnel's requests go over.
enum Pod {
    /// HTTP/1.1 has one request at a time on a connection; the server side asks one at a time.
    Http1(tokio::sync::Mutex<client1::SendRequest<ProxyBody>>),
    Http2(client2::SendRequest<ProxyBody>),
}

impl Pod {
    async fn send(&self, req: Request<ProxyBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Pod::Http1(sender) => {
                let sent = {
                    let mut sender = sender.lock().await;
                    sender.ready().await?;
                    sender.send_request(req)
                };
                sent.await
            }
            Pod::Http2(sender) => {
                let mut sender = sender.clone();
                sender.ready().await?;
                sender.send_request(req).await
            }
        }
    }
}

struct Conn {
    tunnel: Tunnel,
    pod: Pod,
    /// The byte relay of an upgraded request (after a 101): the tunnel lasts until it ends.
    upgraded: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Serves the HTTP in `tunnel` until it closes or nothing moved either way for `tunnel.idle`,
/// forwarding each request to `pod` (already connected to the target endpoint).
pub(super) async fn serve<T, P>(client: T, pod: P, protocol: TunnelProtocol, tunnel: Tunnel)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (idle, target) = (tunnel.idle, tunnel.target);
    let activity = Activity::new();
    let client = TokioIo::new(activity.track(client));
    let pod = TokioIo::new(activity.track(pod));
    let handshake = match protocol {
        TunnelProtocol::Http1 => client1::handshake(pod).await.map(|(sender, conn)| {
            let pod = Pod::Http1(tokio::sync::Mutex::new(sender));
            (pod, tokio::spawn(async move { conn.with_upgrades().await }))
        }),
        TunnelProtocol::Http2 => client2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(pod)
            .await
            .map(|(sender, conn)| (Pod::Http2(sender), tokio::spawn(conn))),
    };
    let (pod, driver) = match handshake {
        Ok(handshake) => handshake,
        Err(e) => {
            tracing::debug!(%target, ?protocol, error = %e, "HTTP handshake with the pod failed");
            return;
        }
    };
    let conn = Arc::new(Conn {
        tunnel,
        pod,
        upgraded: Mutex::default(),
    });
    let serving = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = serving.clone();
        async move { Ok::<_, Infallible>(serve_request(&conn, req).await) }
    });
    let served = async {
        match protocol {
            TunnelProtocol::Http1 => {
                server1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(client, service)
                    .with_upgrades()
                    .await
            }
            TunnelProtocol::Http2 => {
                server2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(client, service)
                    .await
            }
        }
    };
    tokio::select! {
        result = served => if let Err(e) = result {
            tracing::debug!(%target, error = %e, "HTTP tunnel ended with error");
        },
        () = activity.idle_for(idle) => tracing::debug!(%target, ?idle, "HTTP tunnel idle; closing"),
    }
    let upgraded = conn
        .upgraded
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match upgraded {
        // The pod connection was handed to the relay; the tunnel ends with it.
        Some(relay) => {
            let _ = relay.await;
        }
        // The pod connection serves this tunnel only.
        None => driver.abort(),
    }
}

/// The per-request point on the destination agent: `req` is about to go to the pod (its
/// headers may still be changed here, e.g. to continue a trace), and the status of the
/// returned response is final. Records the request's Istio metrics and access-log line.
async fn serve_request(conn: &Arc<Conn>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    // Declared (Content-Length) or, for a chunked body, what is known before it streams.
    let request_bytes = req.body().size_hint().lower();
    // Before the access log reads `traceparent`: the pod and the log see this agent's span.
    let span = conn.tunnel.recorder.as_ref().and_then(|r| {
        let mut span = r
            .metrics
            .tracer()?
            .server_span(req.headers_mut(), &r.labels.destination_service);
        span.set_request(req.method(), req.uri().path());
        Some(span)
    });
    let line = conn
        .tunnel
        .recorder
        .as_ref()
        .and_then(|r| r.metrics.access_log())
        .map(|_| RequestLine::new(&req));
    let response = forward(conn, req).await;
    let Some(recorder) = &conn.tunnel.recorder else {
        return response;
    };
    let code = response.status().as_u16();
    if let Some(mut span) = span {
        span.set_response(code);
        span.set_endpoint(conn.tunnel.target);
        span.end();
    }
    recorder.count(code);
    recorder.series.request_bytes.observe(request_bytes as f64);
    let conn = conn.clone();
    response.map(|body| {
        OnEnd::new(body, move |response_bytes| {
            let millis = millis_since(start);
            let Some(recorder) = &conn.tunnel.recorder else {
                return;
            };
            recorder
                .series
                .response_bytes
                .observe(response_bytes as f64);
            recorder.series.duration_ms.observe(millis);
            if let (Some(line), Some(log)) = (line, recorder.metrics.access_log()) {
                log.log(&entry(
                    &conn.tunnel,
                    recorder,
                    &line,
                    code,
                    (request_bytes, response_bytes),
                    millis,
                ));
            }
        })
        .boxed()
    })
}

fn entry<'a>(
    tunnel: &Tunnel,
    recorder: &'a Recorder,
    line: &'a RequestLine,
    code: u16,
    (sent, received): (u64, u64),
    duration_ms: f64,
) -> Entry<'a> {
    let labels = &recorder.labels;
    Entry {
        time: crate::access_log::now(),
        kind: "http",
        reporter: "destination",
        source_principal: &labels.source_principal,
        source_workload: &labels.source_workload,
        destination_service: &labels.destination_service,
        endpoint: match tunnel.target {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(_) => None,
        },
        method: Some(line.method.as_str()),
        path: Some(line.path()),
        response_code: Some(code),
        bytes_sent: sent,
        bytes_received: received,
        duration_ms,
        retries: 0,
        // The tunnel was authorized before any request was served on it.
        policy: Some("allow"),
        connection_security_policy: Security::MutualTls.label(),
        trace_id: line.trace_id(),
    }
}

/// Sends `req` to the pod; after a 101, relays the two upgraded connections as bytes.
async fn forward(conn: &Conn, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let client_side = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let req = req.map(|body| body.map_err(BoxError::from).boxed());
    let mut response = match conn.pod.send(req).await {
        Ok(response) => response,
        Err(e) => {
            let (service, target) = (&conn.tunnel.service, conn.tunnel.target);
            tracing::debug!(%service, %target, error = %e, "request to the pod failed");
            return local(StatusCode::BAD_GATEWAY, "endpoint reset");
        }
    };
    if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) = (client_side, response.status()) {
        let pod_side = hyper::upgrade::on(&mut response);
        let idle = conn.tunnel.idle;
        let relay = tokio::spawn(async move {
            match (client_side.await, pod_side.await) {
                (Ok(client), Ok(pod)) => {
                    let (mut client, mut pod) = (TokioIo::new(client), TokioIo::new(pod));
                    let _ = admission::relay_with_idle_timeout(&mut client, &mut pod, idle).await;
                }
                (c, p) => {
                    tracing::debug!(client = ?c.err(), pod = ?p.err(), "upgrade did not complete")
                }
            }
        });
        *conn.upgraded.lock().unwrap_or_else(PoisonError::into_inner) = Some(relay);
    }
    response.map(|body| body.map_err(BoxError::from).boxed())
}
