//! The HBONE listener's view of the agent state: its authorizer and which targets are local.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::identity::SpiffeId;
use crate::metrics::istio::{PeerLabels, Reporter, Security, TcpSeries};
use crate::policy::authz::{Authorize, Decision};
use crate::proxy::hbone::{InboundTargets, PeerIdentity, TunnelMetrics};
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
}
