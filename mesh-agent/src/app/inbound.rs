//! The HBONE listener's view of the agent state: its authorizer and which targets are local.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::identity::SpiffeId;
use prometheus::IntCounter;

use crate::access_log::AccessLog;
use crate::metrics::istio::{HttpSeries, PeerLabels, Reporter, Security, TcpSeries};
use crate::policy::authz::{Authorize, Decision};
use crate::proxy::hbone::{InboundTargets, PeerIdentity, RequestMetrics, TunnelEnd, TunnelMetrics};
use crate::state::AgentState;

/// Delegates to the current (hot-reloaded) authorizer and registry of the agent.
pub struct StateView(pub Arc<AgentState>);

impl StateView {
    /// Istio labels of `peer` calling `service` (in the service's namespace, `default` if it
    /// left the registry meanwhile).
    fn peer_labels(&self, peer: &PeerIdentity, service: &str) -> PeerLabels {
        let model = self.0.model();
        let namespace = model
            .services
            .get(service)
            .map_or("default", |s| s.namespace.as_str());
        PeerLabels::new(&peer.id, peer.service.as_deref(), service, namespace)
    }
}

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
        let labels = self.peer_labels(peer, service);
        self.0
            .metrics
            .istio
            .tcp_opened(&labels, Reporter::Destination, Security::MutualTls)
    }

    fn finished(&self, t: &TunnelEnd<'_>) {
        let Some(log) = self.0.access_log.get() else {
            return;
        };
        let labels = self.peer_labels(t.peer, t.service);
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

/// Requests on HTTP-carrying tunnels, as the destination reports them (always mTLS: they
/// came over HBONE).
impl RequestMetrics for StateView {
    fn labels(&self, peer: &PeerIdentity, service: &str) -> PeerLabels {
        self.peer_labels(peer, service)
    }

    fn series(&self, labels: &PeerLabels) -> HttpSeries {
        self.0
            .metrics
            .istio
            .http(labels, Reporter::Destination, Security::MutualTls)
    }

    fn requests(&self, labels: &PeerLabels, code: u16) -> IntCounter {
        self.0
            .metrics
            .istio
            .requests(labels, Reporter::Destination, Security::MutualTls, code)
    }

    fn access_log(&self) -> Option<&AccessLog> {
        self.0.access_log.get()
    }

    fn tracer(&self) -> Option<&crate::trace::RequestTracer> {
        self.0.tracer.get()
    }
}
