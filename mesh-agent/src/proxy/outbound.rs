//! Outbound listeners (15101-15132): connections the kernel redirected from pods. The original
//! destination and the caller's identity come from ORIG_DST, keyed by the peer address. HTTP
//! is proxied per request ([`super::http`]); anything else is relayed as opaque TCP with a
//! connect timeout, breakers and connect retries on other endpoints.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use mesh_common::addr::ip4_from_raw;
use mesh_common::orig_dst::OrigDst;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::connect::{connect_from, Source};
use super::hbone::{HboneError, HboneStream};
use super::sniff::{self, Detected};
use crate::admission::{relay_with_idle_timeout, AcceptErrors};
use crate::config::service_policy::{Protocol, RetryOn};
use crate::flows::FlowGuard;
use crate::identity::SpiffeId;
use crate::metrics::istio::{PeerLabels, Reporter, Security, TcpSeries};
use crate::metrics::{AgentMetrics, ServiceMetrics};
use crate::policy::authz::Authorize;
use crate::state::AgentState;
use crate::traffic::endpoint::CallGuard;
use crate::traffic::ServiceRoute;

/// sock_ops writes ORIG_DST when the client's connect completes, before the final ACK that
/// lets accept() return, so one lookup normally finds it. The fallback (a few yields, then
/// short sleeps) only covers an entry not yet visible; the old path slept on every retry, and
/// a tokio sleep of 1 ms costs up to 2 ms, which landed in the new-connection tail.
const ORIG_DST_YIELDS: u32 = 3;
const ORIG_DST_SLEEPS: u32 = 4;

pub async fn run(
    listener: TcpListener,
    state: Arc<AgentState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut errors = AcceptErrors::new("outbound");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors.accepted();
                let (state, shutdown) = (state.clone(), shutdown.clone());
                tokio::spawn(async move { handle(stream, peer, state, shutdown).await });
            }
            Err(e) => errors.failed(&e).await,
        }
    }
}

async fn lookup_orig_dst(state: &AgentState, peer: SocketAddrV4, port: u16) -> Option<OrigDst> {
    if let Some(orig) = state.orig_dst.take(peer, port) {
        return Some(orig);
    }
    for attempt in 0..ORIG_DST_YIELDS + ORIG_DST_SLEEPS {
        if attempt < ORIG_DST_YIELDS {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1 << (attempt - ORIG_DST_YIELDS))).await;
        }
        if let Some(orig) = state.orig_dst.take(peer, port) {
            tracing::debug!(%peer, retries = attempt + 1, "original destination found late");
            return Some(orig);
        }
    }
    None
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    state: Arc<AgentState>,
    shutdown: watch::Receiver<bool>,
) {
    let metrics = &state.metrics;
    metrics.outbound_accepted.inc();
    let SocketAddr::V4(peer) = peer else {
        metrics.outbound_unknown_destination.inc();
        return;
    };
    // The agent port the client reached: connects are spread over the outbound ports.
    let port = client.local_addr().map_or(0, |a| a.port());
    let Some(orig) = lookup_orig_dst(&state, peer, port).await else {
        metrics.outbound_unknown_destination.inc();
        tracing::warn!(%peer, "no original destination recorded; closing");
        return;
    };
    // Admission per calling identity and in total; held until the connection ends.
    let Ok(_permit) = state.outbound_limits.try_acquire(orig.identity) else {
        tracing::debug!(%peer, identity = orig.identity, "connection limit reached; refusing");
        return;
    };
    let original = SocketAddrV4::new(ip4_from_raw(orig.ip).into(), orig.port);
    let Some(route) = state
        .traffic
        .route(orig.service)
        .filter(|r| !r.endpoints.is_empty())
    else {
        metrics.outbound_no_endpoints.inc();
        tracing::warn!(%peer, %original, service = orig.service, "no endpoint for the service");
        return;
    };
    let Some(caller) = caller(&state, &orig, *peer.ip()) else {
        metrics.service(&route.name).denied.inc();
        tracing::warn!(%peer, %original, service = %route.name, "caller is not a known workload; refusing");
        return;
    };
    let _ = client.set_nodelay(true);
    let http = match route.rules.protocol {
        Protocol::Http => true,
        Protocol::Tcp => false,
        Protocol::Auto => sniff::detect(&client, sniff::SNIFF_WINDOW).await == Detected::Http,
    };
    tracing::debug!(caller = %caller.id, %peer, %original, service = %route.name, http, "proxying");
    let counters = metrics.service(&route.name);
    let peer = peer_labels(&state, &route, &caller);
    if http {
        counters.connections.inc();
        metrics.outbound_active.inc();
        super::http::serve(client, state.clone(), route.id, caller, peer, shutdown).await;
        metrics.outbound_active.dec();
    } else {
        tcp(client, &state, &route, &caller, &peer, counters).await;
    }
}

/// The Istio label values of this caller calling `route`'s service.
fn peer_labels(state: &AgentState, route: &ServiceRoute, caller: &Caller) -> PeerLabels {
    let model = state.model();
    let namespace = model
        .services
        .get(&*route.name)
        .map_or("default", |s| s.namespace.as_str());
    PeerLabels::new(&caller.id, Some(&caller.service), &route.name, namespace)
}

/// The calling workload as authorization and metrics see it.
pub struct Caller {
    pub id: SpiffeId,
    /// The service its workload serves, for policies written by service.
    pub service: String,
    /// `<namespace>/<service-account>`, the metrics label.
    pub key: String,
    /// Kernel identity id, the key of per-caller rate limits.
    pub identity: u32,
    /// The pod's address, the source of transparent upstream connects.
    pub ip: std::net::Ipv4Addr,
}

fn caller(state: &AgentState, orig: &OrigDst, ip: std::net::Ipv4Addr) -> Option<Caller> {
    let model = state.model();
    let config = state.config();
    let key = model.identity_name(orig.identity)?;
    let (ns, sa) = key.split_once('/')?;
    let id = SpiffeId::new(&config.node.trust_domain, ns, sa).ok()?;
    let service = model
        .identity_services
        .get(key)
        .cloned()
        .unwrap_or_default();
    Some(Caller {
        id,
        service,
        key: key.to_owned(),
        identity: orig.identity,
        ip,
    })
}

/// An upstream byte stream: a direct TCP connection or an HBONE tunnel.
enum Upstream {
    Direct(TcpStream),
    Tunnel(HboneStream),
}

/// Opaque TCP: limits, then connect with the connect timeout, retrying the connect on another
/// endpoint (retry rules permitting), with breakers; then relay bytes.
async fn tcp(
    client: TcpStream,
    state: &AgentState,
    route: &ServiceRoute,
    caller: &Caller,
    peer: &PeerLabels,
    counters: ServiceMetrics,
) {
    if let Some(limiter) = &route.limiter {
        if limiter.try_acquire(caller.identity).is_err() {
            route.counters.rate_limited.inc();
            return;
        }
    }
    let _permit = match &route.concurrency {
        Some(cap) => match cap.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                route.counters.shed.inc();
                return;
            }
        },
        None => None,
    };
    let retries = route
        .rules
        .retry
        .as_ref()
        .filter(|r| r.retries(RetryOn::ConnectFailure))
        .map_or(0, |r| r.max);
    let mut tried = Vec::new();
    let mut local_decision = None;
    let log = TcpLog {
        state,
        peer,
        start: tokio::time::Instant::now(),
    };
    loop {
        let Some(guard) = route.pick(&tried) else {
            counters.connect_failures.inc();
            tracing::warn!(service = %route.name, "every endpoint is ejected; closing");
            return;
        };
        let addr = guard.endpoint().addr;
        let Some(endpoint) = route.endpoints.iter().find(|e| e.entry.addr == addr) else {
            return;
        };
        let attempt = match &endpoint.entry.node {
            None => {
                let allowed =
                    *local_decision.get_or_insert_with(|| authorize(state, route, caller));
                if !allowed {
                    counters.denied.inc();
                    log.write(Some(addr), (0, 0), tried.len(), Some(false), false);
                    return;
                }
                direct(state, route, caller.ip, addr).await
            }
            // Boxed: the tunnel handshake is a large future, and inline every connection's
            // task (same node and HTTP ones too) would be sized for it.
            Some(node) => Box::pin(via_hbone(state, route, caller, addr, node)).await,
        };
        match attempt {
            Ok(upstream) => {
                guard.record(true);
                let remote = matches!(upstream, Upstream::Tunnel(_));
                if remote {
                    counters.hbone_connections.inc();
                }
                let flow = state.flows.open(
                    caller.id.to_string(),
                    &*route.name,
                    addr.to_string(),
                    endpoint.entry.node.clone(),
                );
                let tcp = state.metrics.istio.tcp_opened(
                    peer,
                    Reporter::Source,
                    Security::of_remote(remote),
                );
                let metrics = (&state.metrics, &counters, &tcp);
                let idle = state.config().proxy.idle_timeout;
                let bytes = match upstream {
                    Upstream::Direct(s) => relay(client, s, metrics, guard, flow, idle).await,
                    Upstream::Tunnel(s) => relay(client, s, metrics, guard, flow, idle).await,
                };
                log.write(Some(addr), bytes, tried.len(), Some(true), remote);
                return;
            }
            Err(HboneError::Denied { reason }) => {
                guard.record(true);
                counters.denied.inc();
                tracing::warn!(caller = %caller.id, service = %route.name, %reason, "denied by the destination agent");
                log.write(Some(addr), (0, 0), tried.len(), Some(false), true);
                return;
            }
            Err(e) => {
                guard.record(false);
                counters.connect_failures.inc();
                tracing::warn!(service = %route.name, endpoint = %addr, error = %e, "endpoint connect failed");
                if tried.len() as u32 >= retries {
                    log.write(Some(addr), (0, 0), tried.len(), local_decision, false);
                    return;
                }
                route.counters.retries.inc();
                tried.push(addr);
            }
        }
    }
}

fn authorize(state: &AgentState, route: &ServiceRoute, caller: &Caller) -> bool {
    let d = state
        .security
        .authz
        .authorize(&caller.id, Some(&caller.service), &route.name);
    if !d.allowed {
        tracing::warn!(caller = %caller.id, service = %route.name, policy = %d.policy, reason = %d.reason, "connection denied");
    }
    d.allowed
}

/// Same-node endpoint: connect straight to the pod, from the caller's address when transparent.
async fn direct(
    state: &AgentState,
    route: &ServiceRoute,
    caller_ip: std::net::Ipv4Addr,
    endpoint: SocketAddrV4,
) -> Result<Upstream, HboneError> {
    let timeout = route.rules.connect_timeout;
    let source = Source::of(&state.config());
    let connect = |source| HboneError::Connect {
        addr: SocketAddr::V4(endpoint),
        source,
    };
    let stream = tokio::time::timeout(timeout, connect_from(source, Some(caller_ip), endpoint))
        .await
        .map_err(|_| {
            connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("timed out after {timeout:?}"),
            ))
        })?
        .map_err(connect)?;
    let _ = stream.set_nodelay(true);
    Ok(Upstream::Direct(stream))
}

/// Endpoint on another node: an HBONE tunnel to that node's agent, presenting the caller's
/// certificate; the destination agent authorizes.
async fn via_hbone(
    state: &AgentState,
    route: &ServiceRoute,
    caller: &Caller,
    endpoint: SocketAddrV4,
    node: &str,
) -> Result<Upstream, HboneError> {
    let unavailable = |reason: String| HboneError::NodeUnavailable {
        addr: SocketAddr::V4(endpoint),
        reason,
    };
    let node_addr = state
        .config()
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.hbone)
        .ok_or_else(|| unavailable(format!("endpoint names an unknown node {node:?}")))?;
    let tls = state
        .security
        .client_tls(&caller.id, node)
        .map_err(|e| unavailable(format!("no TLS identity for the caller: {e}")))?;
    let timeout = route.rules.connect_timeout;
    let open = state.security.pool.connect(
        &caller.id,
        tls,
        node_addr,
        SocketAddr::V4(endpoint),
        &route.name,
        Some(caller.ip),
    );
    let stream = tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| HboneError::Timeout {
            what: "tunnel",
            after: timeout,
        })??;
    Ok(Upstream::Tunnel(stream))
}

/// Copies bytes both ways until both sides are done or no byte moved for `idle`
/// (`proxy.idle_timeout`), recording the traffic.
async fn relay<S>(
    client: TcpStream,
    mut upstream: S,
    (metrics, counters, tcp): (&AgentMetrics, &ServiceMetrics, &TcpSeries),
    _call: CallGuard,
    flow: FlowGuard,
    idle: Duration,
) -> (u64, u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = flow.count(client);
    counters.connections.inc();
    metrics.outbound_active.inc();
    let result = relay_with_idle_timeout(&mut client, &mut upstream, idle).await;
    metrics.outbound_active.dec();
    match result {
        Ok((to_endpoint, from_endpoint)) => {
            counters.bytes_to_endpoint.inc_by(to_endpoint);
            counters.bytes_from_endpoint.inc_by(from_endpoint);
            tcp.finished(to_endpoint, from_endpoint);
            (to_endpoint, from_endpoint)
        }
        Err(e) => {
            // The relay does not say how much went through before an error or the idle cut.
            tcp.finished(0, 0);
            tracing::debug!(error = %e, "connection ended with error");
            (0, 0)
        }
    }
}

/// The access-log line of one opaque TCP connection (written only when the log is on).
struct TcpLog<'a> {
    state: &'a AgentState,
    peer: &'a PeerLabels,
    start: tokio::time::Instant,
}

impl TcpLog<'_> {
    fn write(
        &self,
        endpoint: Option<SocketAddrV4>,
        (sent, received): (u64, u64),
        retries: usize,
        allowed: Option<bool>,
        remote: bool,
    ) {
        let Some(log) = self.state.access_log.get() else {
            return;
        };
        log.log(&crate::access_log::Entry {
            time: crate::access_log::now(),
            kind: "tcp",
            reporter: "source",
            source_principal: &self.peer.source_principal,
            source_workload: &self.peer.source_workload,
            destination_service: &self.peer.destination_service,
            endpoint,
            method: None,
            path: None,
            response_code: None,
            bytes_sent: sent,
            bytes_received: received,
            duration_ms: self.start.elapsed().as_secs_f64() * 1000.0,
            retries: retries as u32,
            policy: allowed.map(|a| if a { "allow" } else { "deny" }),
            connection_security_policy: Security::of_remote(remote).label(),
            trace_id: None,
        });
    }
}
