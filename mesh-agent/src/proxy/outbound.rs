//! Outbound listener (15001): connections the kernel redirected from pods. The original
//! destination and the caller's identity come from ORIG_DST, keyed by the peer address.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mesh_common::addr::ip4_from_raw;
use mesh_common::orig_dst::OrigDst;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::connect::connect_from;
use super::hbone::HboneError;
use crate::flows::FlowGuard;
use crate::identity::SpiffeId;
use crate::metrics::AgentMetrics;
use crate::policy::authz::Authorize;
use crate::registry::model::EndpointEntry;
use crate::state::AgentState;

/// sock_ops writes ORIG_DST before the client's final ACK, so it is normally there on accept;
/// these short retries only cover scheduling noise.
const ORIG_DST_ATTEMPTS: u32 = 5;

pub async fn run(
    listener: TcpListener,
    state: Arc<AgentState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let state = state.clone();
                tokio::spawn(async move { handle(stream, peer, state).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn lookup_orig_dst(state: &AgentState, peer: SocketAddrV4) -> Option<OrigDst> {
    for attempt in 0..ORIG_DST_ATTEMPTS {
        if let Some(orig) = state.orig_dst.take(peer) {
            return Some(orig);
        }
        tokio::time::sleep(Duration::from_millis(1 << attempt)).await;
    }
    None
}

async fn handle(client: TcpStream, peer: SocketAddr, state: Arc<AgentState>) {
    let metrics = &state.metrics;
    AgentMetrics::inc(&metrics.outbound_accepted);
    let SocketAddr::V4(peer) = peer else {
        AgentMetrics::inc(&metrics.outbound_unknown_destination);
        return;
    };
    let Some(orig) = lookup_orig_dst(&state, peer).await else {
        AgentMetrics::inc(&metrics.outbound_unknown_destination);
        tracing::warn!(%peer, "no original destination recorded; closing");
        return;
    };
    let original = SocketAddrV4::new(ip4_from_raw(orig.ip).into(), orig.port);
    let Some(route) = route(&state, &orig) else {
        AgentMetrics::inc(&metrics.outbound_no_endpoints);
        tracing::warn!(%peer, %original, service = orig.service, "no endpoint for the service");
        return;
    };
    let Some(caller) = route.caller.as_ref() else {
        metrics.record_service(&route.service, |s| s.denied += 1);
        tracing::warn!(%peer, %original, service = %route.service, "caller is not a known workload; refusing");
        return;
    };
    tracing::debug!(caller = %caller.id, %peer, %original, service = %route.service, endpoint = %route.endpoint.addr, node = ?route.endpoint.node, "proxying");
    match route.endpoint.node.clone() {
        None => direct(client, &state, &route, caller).await,
        Some(node) => via_hbone(client, &state, &route, caller, &node).await,
    }
}

/// The calling workload as authorization sees it.
struct Caller {
    id: SpiffeId,
    service: String,
}

/// Where an accepted connection goes.
struct Route {
    service: String,
    endpoint: EndpointEntry,
    caller: Option<Caller>,
}

fn route(state: &AgentState, orig: &OrigDst) -> Option<Route> {
    let model = state.model();
    let service = model.service_by_id(orig.service)?;
    let endpoint = service.pick_endpoint()?;
    let config = state.config();
    let caller = model.identity_name(orig.identity).and_then(|key| {
        let (ns, sa) = key.split_once('/')?;
        let id = SpiffeId::new(&config.node.trust_domain, ns, sa).ok()?;
        let service = model
            .identity_services
            .get(key)
            .cloned()
            .unwrap_or_default();
        Some(Caller { id, service })
    });
    Some(Route {
        service: service.name.clone(),
        endpoint,
        caller,
    })
}

/// Same-node endpoint: this agent authorizes, then connects straight to the pod.
async fn direct(client: TcpStream, state: &AgentState, route: &Route, caller: &Caller) {
    let metrics = &state.metrics;
    let decision =
        state
            .security
            .authz
            .authorize(&caller.id, Some(&caller.service), &route.service);
    if !decision.allowed {
        metrics.record_service(&route.service, |s| s.denied += 1);
        tracing::warn!(caller = %caller.id, service = %route.service, policy = %decision.policy, reason = %decision.reason, "connection denied");
        return;
    }
    let config = state.config();
    let (timeout, agent_ip) = (config.proxy.connect_timeout, config.node.agent_ip);
    drop(config);
    let upstream = match tokio::time::timeout(timeout, connect_from(agent_ip, route.endpoint.addr))
        .await
    {
        Ok(Ok(s)) => s,
        outcome => {
            let reason = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => format!("timed out after {timeout:?}"),
            };
            metrics.record_service(&route.service, |s| s.connect_failures += 1);
            tracing::warn!(service = %route.service, endpoint = %route.endpoint.addr, %reason, "endpoint connect failed");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let flow = state.flows.open(
        caller.id.to_string(),
        &route.service,
        route.endpoint.addr.to_string(),
        None,
    );
    relay(client, upstream, metrics, &route.service, flow).await;
}

/// Endpoint on another node: an HBONE tunnel to that node's agent, presenting the caller's
/// certificate; the destination agent authorizes.
async fn via_hbone(
    client: TcpStream,
    state: &AgentState,
    route: &Route,
    caller: &Caller,
    node: &str,
) {
    let metrics = &state.metrics;
    let Some(node_addr) = state
        .config()
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.hbone)
    else {
        metrics.record_service(&route.service, |s| s.connect_failures += 1);
        tracing::warn!(service = %route.service, node, "endpoint names an unknown node");
        return;
    };
    let tunnel = match state.security.client_tls(&caller.id, node) {
        Ok(tls) => {
            let target = SocketAddr::V4(route.endpoint.addr);
            state
                .security
                .pool
                .connect(&caller.id, tls, node_addr, target, &route.service)
                .await
        }
        Err(e) => {
            metrics.record_service(&route.service, |s| s.connect_failures += 1);
            tracing::error!(caller = %caller.id, node, error = %e, "no TLS identity for the caller");
            return;
        }
    };
    match tunnel {
        Ok(stream) => {
            metrics.record_service(&route.service, |s| s.hbone_connections += 1);
            let flow = state.flows.open(
                caller.id.to_string(),
                &route.service,
                route.endpoint.addr.to_string(),
                Some(node.to_owned()),
            );
            relay(client, stream, metrics, &route.service, flow).await;
        }
        Err(HboneError::Denied { reason }) => {
            metrics.record_service(&route.service, |s| s.denied += 1);
            tracing::warn!(caller = %caller.id, service = %route.service, node, %reason, "denied by the destination agent");
        }
        Err(e) => {
            metrics.record_service(&route.service, |s| s.connect_failures += 1);
            tracing::warn!(caller = %caller.id, service = %route.service, node, error = %e, "HBONE tunnel failed");
        }
    }
}

/// Copies bytes both ways until both sides are done, recording the traffic.
async fn relay<S>(
    client: TcpStream,
    mut upstream: S,
    metrics: &AgentMetrics,
    service: &str,
    flow: FlowGuard,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = client.set_nodelay(true);
    let mut client = flow.count(client);
    metrics.record_service(service, |s| s.connections += 1);
    metrics.outbound_active.fetch_add(1, Ordering::Relaxed);
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    metrics.outbound_active.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok((to_endpoint, from_endpoint)) => metrics.record_service(service, |s| {
            s.bytes_to_endpoint += to_endpoint;
            s.bytes_from_endpoint += from_endpoint;
        }),
        Err(e) => tracing::debug!(service, error = %e, "connection ended with error"),
    }
}
