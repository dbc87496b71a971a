//! The HBONE listener's view of the agent state: its authorizer and which targets are local.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::identity::SpiffeId;
use crate::metrics::istio::{PeerLabels, Reporter, Security, TcpSeries};
use crate::policy::authz::{Authorize, Decision};
use crate::proxy::hbone::{InboundTargets, PeerIdentity, TunnelEnd, TunnelMetrics};
use crate::state::AgentState;

/// Delegates to the current (hot-reloaded) authorizer and registry of the agent.
pub struct StateView(pub Arc<AgentState>);

impl Authorize for StateView {
    fn authorize(
        &self,
        source: &SpiffeId,
        source_service: Option<&str>,
        dest_service: &str,
    ) -> Decision {
        self.0
            .security
            .authz
            .authorize(source, source_service, dest_service)
    }
}

impl InboundTargets for StateView {
    fn is_local_endpoint(&self, service: &str, target: SocketAddr) -> bool {
        let SocketAddr::V4(target) = target else {
            return false;
        };
        let model = self.0.model();
        model.services.get(service).is_some_and(|s| {
            s.endpoints
                .iter()
                .any(|e| e.node.is_none() && e.addr == target)
        })
    }

    fn is_local_pod(&self, ip: std::net::Ipv4Addr) -> bool {
        let model = self.0.model();
        model
            .services
            .values()
            .flat_map(|s| &s.endpoints)
            .any(|e| e.node.is_none() && *e.addr.ip() == ip)
    }
}

impl TunnelMetrics for StateView {
    fn opened(&self, peer: &PeerIdentity, service: &str) -> TcpSeries {
        let model = self.0.model();
        let namespace = model
            .services
            .get(service)
            .map_or("default", |s| s.namespace.as_str());
        let labels = PeerLabels::new(&peer.id, peer.service.as_deref(), service, namespace);
        self.0
            .metrics
            .istio
            .tcp_opened(&labels, Reporter::Destination, Security::MutualTls)
    }

    fn finished(&self, t: &TunnelEnd<'_>) {
        let Some(log) = self.0.access_log.get() else {
            return;
        };
        let model = self.0.model();
        let namespace = model
            .services
            .get(t.service)
            .map_or("default", |s| s.namespace.as_str());
        let labels = PeerLabels::new(&t.peer.id, t.peer.service.as_deref(), t.service, namespace);
        let std::net::SocketAddr::V4(endpoint) = t.target else {
            return;
        };
        log.log(&crate::access_log::Entry {
            time: crate::access_log::now(),
            kind: "tcp",
            reporter: "destination",
            source_principal: &labels.source_principal,
            source_workload: &labels.source_workload,
            destination_service: &labels.destination_service,
            endpoint: Some(endpoint),
            method: None,
            path: None,
            response_code: None,
            bytes_sent: t.bytes.0,
            bytes_received: t.bytes.1,
            duration_ms: t.duration.as_secs_f64() * 1000.0,
            retries: 0,
            policy: Some(if t.allowed { "allow" } else { "deny" }),
            connection_security_policy: Security::MutualTls.label(),
            trace_id: None,
        });
    }
}
