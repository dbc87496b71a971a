//! Outbound listener (15001): connections the kernel redirected from pods. The original
//! destination and the caller's identity come from ORIG_DST, keyed by the peer address.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mesh_common::addr::ip4_from_raw;
use mesh_common::orig_dst::OrigDst;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::connect::connect_from;
use crate::metrics::AgentMetrics;
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

async fn handle(mut client: TcpStream, peer: SocketAddr, state: Arc<AgentState>) {
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
    let model = state.model();
    let caller = model
        .identity_name(orig.identity)
        .unwrap_or("unknown")
        .to_owned();
    let Some(service) = model.service_by_id(orig.service) else {
        AgentMetrics::inc(&metrics.outbound_no_endpoints);
        tracing::warn!(%peer, %original, "service id {} no longer configured", orig.service);
        return;
    };
    let Some(endpoint) = service.pick_endpoint() else {
        AgentMetrics::inc(&metrics.outbound_no_endpoints);
        tracing::warn!(service = %service.name, "no endpoints");
        return;
    };
    let service_name = service.name.clone();
    drop(model);

    let config = state.config();
    let (timeout, agent_ip) = (config.proxy.connect_timeout, config.node.agent_ip);
    drop(config);
    let connect = connect_from(agent_ip, endpoint.addr);
    let upstream = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => s,
        outcome => {
            let reason = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => format!("timed out after {timeout:?}"),
            };
            metrics.record_service(&service_name, |s| s.connect_failures += 1);
            tracing::warn!(service = %service_name, endpoint = %endpoint.addr, %reason, "endpoint connect failed");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    tracing::debug!(%caller, %peer, %original, service = %service_name, endpoint = %endpoint.addr, "proxying");
    metrics.record_service(&service_name, |s| s.connections += 1);
    metrics.outbound_active.fetch_add(1, Ordering::Relaxed);
    let mut upstream = upstream;
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    metrics.outbound_active.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok((to_endpoint, from_endpoint)) => metrics.record_service(&service_name, |s| {
            s.bytes_to_endpoint += to_endpoint;
            s.bytes_from_endpoint += from_endpoint;
        }),
        Err(e) => {
            tracing::debug!(service = %service_name, error = %e, "connection ended with error")
        }
    }
}
