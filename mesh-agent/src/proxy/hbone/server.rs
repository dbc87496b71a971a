//! Inbound HBONE: accepts mTLS HTTP/2 connections from other agents, authorizes each CONNECT
//! stream and splices it to the target endpoint; a stream marked as carrying HTTP is served
//! request by request instead ([`super::l7`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use super::l7::{self, RequestMetrics};
use super::{PeerIdentity, ALPN_H2};
use crate::admission::{self, AcceptErrors, ConnLimiter};
use crate::flows::FlowTable;
use crate::metrics::istio::TcpSeries;
use crate::policy::authz::Authorize;
use crate::proxy::connect::{connect_from, Source};

/// A peer that cannot finish the handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which targets a CONNECT may name: without this check, a caller allowed to reach one service
/// could point its tunnel at any address the node can reach.
pub trait InboundTargets: Send + Sync {
    fn is_local_endpoint(&self, service: &str, target: SocketAddr) -> bool;
    /// Whether `ip` belongs to a pod on this node (never a remote caller's address).
    fn is_local_pod(&self, ip: Ipv4Addr) -> bool;
}

/// Inbound counters for metrics: connections by handshake outcome, streams by answer.
#[derive(Debug, Default)]
pub struct InboundStats {
    pub connections_accepted: AtomicU64,
    /// Connections (TLS or still handshaking) being served now; a stopping agent drains them.
    pub connections_active: AtomicU64,
    /// TLS failed, or the peer had no certificate, no SPIFFE ID, or no h2.
    pub handshakes_refused: AtomicU64,
    pub streams_opened: AtomicU64,
    /// Refused by authorization or because the target is not a local endpoint (403).
    pub streams_denied: AtomicU64,
    /// Malformed requests (400, 405).
    pub streams_rejected: AtomicU64,
    /// The target could not be reached (502, 503).
    pub streams_failed: AtomicU64,
    /// `Forwarded` caller addresses not bound (malformed or spoof-worthy); those tunnels
    /// connect from the agent address.
    pub forwarded_refused: AtomicU64,
}

impl InboundStats {
    fn count_answer(&self, status: StatusCode) {
        let counter = match status {
            StatusCode::OK => &self.streams_opened,
            StatusCode::FORBIDDEN => &self.streams_denied,
            s if s.is_client_error() => &self.streams_rejected,
            _ => &self.streams_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn refuse(&self) {
        self.handshakes_refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-tunnel TCP metrics at the destination (`reporter="destination"`).
pub trait TunnelMetrics: Send + Sync {
    /// Counts a tunnel to `service` from `peer` as opened and returns its series.
    fn opened(&self, peer: &PeerIdentity, service: &str) -> TcpSeries;

    /// A tunnel ended, or was refused by authorization (for the access log).
    fn finished(&self, _tunnel: &TunnelEnd<'_>) {}
}

/// One tunnel as the destination agent saw it.
pub struct TunnelEnd<'a> {
    pub peer: &'a PeerIdentity,
    pub service: &'a str,
    pub target: SocketAddr,
    /// (towards the target, back to the peer)
    pub bytes: (u64, u64),
    pub duration: Duration,
    pub allowed: bool,
}

pub struct HboneServer {
    stats: Arc<InboundStats>,
    tunnel_metrics: Option<Arc<dyn TunnelMetrics>>,
    request_metrics: Option<Arc<dyn RequestMetrics>>,
    acceptor: TlsAcceptor,
    authorizer: Arc<dyn Authorize>,
    target_connect_timeout: Duration,
    targets: Option<Arc<dyn InboundTargets>>,
    source: Option<Source>,
    /// Open tunnels, listed as inbound flows (admin /flows).
    flows: Arc<FlowTable>,
    /// TLS handshakes in progress, in total and per source address.
    handshakes: Arc<ConnLimiter<IpAddr>>,
    /// A tunnel with no bytes either way for this long is closed.
    idle_timeout: Duration,
}

impl HboneServer {
    /// `tls` must verify client certificates against the mesh CA; ALPN is forced to "h2".
    pub fn new(tls: Arc<ServerConfig>, authorizer: Arc<dyn Authorize>) -> Self {
        let tls = if tls.alpn_protocols == [ALPN_H2] {
            tls
        } else {
            let mut config = (*tls).clone();
            config.alpn_protocols = vec![ALPN_H2.to_vec()];
            Arc::new(config)
        };
        Self {
            stats: Arc::default(),
            tunnel_metrics: None,
            request_metrics: None,
            acceptor: TlsAcceptor::from(tls),
            authorizer,
            target_connect_timeout: Duration::from_secs(5),
            targets: None,
            source: None,
            handshakes: ConnLimiter::new(
                admission::MAX_PENDING_HANDSHAKES,
                admission::MAX_PENDING_HANDSHAKES_PER_SOURCE,
            ),
            idle_timeout: Duration::from_secs(3600),
            flows: Arc::default(),
        }
    }

    /// Closes a relayed tunnel after `idle` without bytes either way (default 1 h).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Lists open tunnels in `flows` (shared with the admin endpoint).
    pub fn with_flows(mut self, flows: Arc<FlowTable>) -> Self {
        self.flows = flows;
        self
    }

    /// Counts into `stats` (shared with the metrics endpoint).
    pub fn with_stats(mut self, stats: Arc<InboundStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Reports each tunnel's TCP metrics to `metrics`.
    pub fn with_tunnel_metrics(mut self, metrics: Arc<dyn TunnelMetrics>) -> Self {
        self.tunnel_metrics = Some(metrics);
        self
    }

    /// Records each request of tunnels marked as carrying HTTP in `metrics`.
    pub fn with_request_metrics(mut self, metrics: Arc<dyn RequestMetrics>) -> Self {
        self.request_metrics = Some(metrics);
        self
    }

    /// Only CONNECTs to an endpoint of the named service on this node are served.
    pub fn with_targets(mut self, targets: Arc<dyn InboundTargets>) -> Self {
        self.targets = Some(targets);
        self
    }

    /// Connect to targets from the agent address, or transparently (see [`Source`]).
    pub fn with_source(mut self, source: Source) -> Self {
        self.source = Some(source);
        self
    }

    /// Bound on connecting to the target endpoint (default 5 s); on expiry the stream gets 503.
    pub fn with_target_connect_timeout(mut self, after: Duration) -> Self {
        self.target_connect_timeout = after;
        self
    }

    /// Accepts until `shutdown` resolves, then asks open connections to drain (GOAWAY);
    /// established tunnels keep running until they close.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let (drain_tx, drain_rx) = watch::channel(false);
        let this = Arc::new(self);
        tokio::pin!(shutdown);
        let mut errors = AcceptErrors::new("hbone");
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, remote)) => {
                        errors.accepted();
                        let this = this.clone();
                        let drain = drain_rx.clone();
                        tokio::spawn(async move { this.handle_connection(tcp, remote, drain).await });
                    }
                    Err(e) => errors.failed(&e).await,
                },
            }
        }
        // Receivers see the change even if they subscribed later via clone.
        let _ = drain_tx.send(true);
    }

    async fn handle_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        mut drain: watch::Receiver<bool>,
    ) {
        let _active = ActiveGuard::enter(&self.stats.connections_active);
        // Bounded handshakes: one source cannot hold them all (each costs memory and CPU).
        let Ok(pending) = self.handshakes.try_acquire(remote.ip()) else {
            self.stats.refuse();
            tracing::debug!(remote = %remote, "too many pending HBONE handshakes; refusing");
            return;
        };
        // Tunnels carry small interactive HTTP/2 frames; Nagle plus delayed ACKs would add
        // tens of milliseconds to each exchange.
        let _ = tcp.set_nodelay(true);
        let tls = match timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.stats.refuse();
                tracing::info!(remote = %remote, error = %e, "HBONE TLS handshake failed");
                return;
            }
            Err(_) => {
                self.stats.refuse();
                tracing::info!(remote = %remote, "HBONE TLS handshake timed out");
                return;
            }
        };
        drop(pending);
        let session = tls.get_ref().1;
        if session.alpn_protocol() != Some(ALPN_H2) {
            self.stats.refuse();
            tracing::info!(remote = %remote, "HBONE peer did not negotiate h2");
            return;
        }
        // The TLS config should already require a client cert; never serve without one.
        let Some(cert) = session.peer_certificates().and_then(|certs| certs.first()) else {
            self.stats.refuse();
            tracing::info!(remote = %remote, "HBONE peer presented no client certificate");
            return;
        };
        let peer = match PeerIdentity::from_cert_der(cert.as_ref()) {
            Ok(peer) => Arc::new(peer),
            Err(e) => {
                self.stats.refuse();
                tracing::info!(remote = %remote, error = %e, "HBONE peer certificate has no SPIFFE ID");
                return;
            }
        };
        tracing::debug!(remote = %remote, peer = %peer.id, "HBONE connection accepted");
        self.stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);

        let this = self.clone();
        let service = service_fn(move |req| {
            let (this, peer) = (this.clone(), peer.clone());
            async move {
                let response = this.handle_stream(&peer, remote, req).await;
                this.stats.count_answer(response.status());
                Ok::<_, Infallible>(response)
            }
        });
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Grow flow-control windows with the measured bandwidth-delay product.
            .adaptive_window(true)
            .serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = draining(&mut drain) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(remote = %remote, error = %e, "HBONE connection ended with error");
        }
    }

    async fn handle_stream(
        &self,
        peer: &PeerIdentity,
        remote: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let started = tokio::time::Instant::now();
        let (target, service) =
            match super::request::parse_connect(req.method(), req.uri(), req.headers()) {
                Ok(parsed) => parsed,
                Err((status, message)) => return respond(status, message),
            };
        let protocol = match super::request::tunnel_protocol(req.headers()) {
            Ok(protocol) => protocol,
            Err((status, message)) => return respond(status, message),
        };

        let decision = self
            .authorizer
            .authorize(&peer.id, peer.service.as_deref(), service);
        if !decision.allowed {
            tracing::warn!(source = %peer.id, service, target = %target, policy = %decision.policy,
                reason = %decision.reason, "HBONE stream denied");
            if let Some(m) = &self.tunnel_metrics {
                m.finished(&TunnelEnd {
                    peer,
                    service,
                    target,
                    bytes: (0, 0),
                    duration: started.elapsed(),
                    allowed: false,
                });
            }
            return respond(
                StatusCode::FORBIDDEN,
                format!("policy {}: {}", decision.policy, decision.reason),
            );
        }

        if let Some(targets) = &self.targets {
            if !targets.is_local_endpoint(service, target) {
                tracing::warn!(source = %peer.id, service, target = %target, "HBONE target is not a local endpoint of the service");
                return respond(
                    StatusCode::FORBIDDEN,
                    format!("{target} is not an endpoint of {service} on this node"),
                );
            }
        }

        let caller = self.remote_caller(peer, remote, req.headers());
        let connect = async {
            match (self.source, target) {
                (Some(source), SocketAddr::V4(v4)) => connect_from(source, caller, v4).await,
                _ => TcpStream::connect(target).await,
            }
        };
        let mut upstream = match timeout(self.target_connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(target = %target, service, error = %e, "HBONE target connect failed");
                return respond(StatusCode::BAD_GATEWAY, format!("connect {target}: {e}"));
            }
            Err(_) => {
                tracing::info!(target = %target, service, "HBONE target connect timed out");
                return respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("connect {target}: timed out"),
                );
            }
        };
        let _ = upstream.set_nodelay(true);

        // Registered before `req` is consumed: `service` borrows from its headers.
        let flow = self
            .flows
            .open_inbound(peer.id.to_string(), service, target.to_string());
        let tcp = self.tunnel_metrics.as_ref().map(|m| {
            (
                m.opened(peer, service),
                m.clone(),
                peer.clone(),
                service.to_owned(),
            )
        });
        let http = protocol.map(|protocol| {
            let tunnel = l7::Tunnel {
                service: service.to_owned(),
                target,
                recorder: self
                    .request_metrics
                    .as_ref()
                    .map(|m| l7::Recorder::new(m.clone(), peer, service)),
                idle: self.idle_timeout,
            };
            (protocol, tunnel)
        });
        let on_upgrade = hyper::upgrade::on(req);
        let source = peer.id.clone();
        let idle = self.idle_timeout;
        tokio::spawn(async move {
            let mut tunnel = match on_upgrade.await {
                Ok(upgraded) => flow.count(TokioIo::new(upgraded)),
                Err(e) => {
                    if let Some((tcp, ..)) = &tcp {
                        tcp.finished(0, 0);
                    }
                    tracing::debug!(target = %target, error = %e, "HBONE upgrade failed");
                    return;
                }
            };
            let copied = match http {
                // copy_bidirectional forwards EOF as a write shutdown on the other side.
                None => admission::relay_with_idle_timeout(&mut tunnel, &mut upstream, idle).await,
                Some((protocol, http)) => {
                    l7::serve(tunnel, upstream, protocol, http).await;
                    Ok(flow.bytes())
                }
            };
            if let Some((tcp, metrics, peer, service)) = &tcp {
                let bytes = copied.as_ref().map_or((0, 0), |c| *c);
                tcp.finished(bytes.0, bytes.1);
                metrics.finished(&TunnelEnd {
                    peer,
                    service,
                    target,
                    bytes,
                    duration: started.elapsed(),
                    allowed: true,
                });
            }
            match copied {
                Ok((to_target, from_target)) => tracing::debug!(source = %source, target = %target,
                    to_target, from_target, "HBONE stream closed"),
                Err(e) => tracing::debug!(source = %source, target = %target, error = %e,
                    "HBONE stream ended with error"),
            }
        });
        respond(StatusCode::OK, String::new())
    }
}

/// Resolves when the server shuts down (or the serve future was dropped).
/// Counts a connection as active for as long as it lives.
struct ActiveGuard<'a>(&'a AtomicU64);

impl<'a> ActiveGuard<'a> {
    fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counter)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HboneServer {
    /// The caller address to connect from (`Forwarded: for=`, transparent mode only), when it
    /// passes [`Source::check_remote_caller`]; else None (the agent address), counted and logged.
    fn remote_caller(
        &self,
        peer: &PeerIdentity,
        remote: SocketAddr,
        headers: &hyper::HeaderMap,
    ) -> Option<Ipv4Addr> {
        use super::request::{forwarded_for, ForwardedFor};
        let source = self.source.filter(|s| s.transparent_mark.is_some())?;
        let refused = match (forwarded_for(headers), remote.ip()) {
            (ForwardedFor::Absent, _) => return None,
            (ForwardedFor::Caller(ip), IpAddr::V4(from)) => {
                let is_local_pod = |ip| self.targets.as_ref().is_some_and(|t| t.is_local_pod(ip));
                match source.check_remote_caller(ip, from, is_local_pod) {
                    Ok(ip) => return Some(ip),
                    Err(why) => format!("{ip} is {why}"),
                }
            }
            (ForwardedFor::Caller(ip), IpAddr::V6(_)) => format!("{ip} came over IPv6"),
            (ForwardedFor::Unusable, _) => "malformed Forwarded header".to_owned(),
        };
        self.stats.forwarded_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(source = %peer.id, %remote, reason = %refused,
            "HBONE Forwarded caller address refused; connecting from the agent address");
        None
    }
}

async fn draining(drain: &mut watch::Receiver<bool>) {
    // The guard returned by wait_for is not Send; drop it here, not across an await.
    let _ = drain.wait_for(|draining| *draining).await.map(|_| ());
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
