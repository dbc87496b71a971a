//! Who calls the registry API. connect4 records the calling workload's identity for connects to
//! the registry port (without redirecting them) and sock_ops re-keys it by the client address, so
//! on accept the agent looks the peer up in ORIG_DST, as the outbound proxy does.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_common::services::REGISTRY_SERVICE;

use crate::state::AgentState;

/// sock_ops writes the entry before the client's final ACK; these retries cover scheduling.
const ATTEMPTS: u32 = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A workload on this node: its identity key (`ns/sa`) and the service it serves.
    Workload { identity: String, service: String },
    /// Not from a mesh workload (the node itself, an operator): may read, may not register
    /// for a workload.
    Unidentified,
}

impl Caller {
    pub fn identity(&self) -> Option<&str> {
        match self {
            Caller::Workload { identity, .. } => Some(identity),
            Caller::Unidentified => None,
        }
    }
}

/// The caller of a connection from `peer` accepted on `local_port`.
pub async fn resolve(state: &AgentState, peer: SocketAddr, local_port: u16) -> Caller {
    let SocketAddr::V4(peer) = peer else {
        return Caller::Unidentified;
    };
    for attempt in 0..ATTEMPTS {
        if let Some(orig) = state.orig_dst.take(peer, local_port) {
            if orig.service != REGISTRY_SERVICE {
                return Caller::Unidentified;
            }
            let model = state.model();
            return match model.identity_name(orig.identity) {
                Some(key) => Caller::Workload {
                    identity: key.to_owned(),
                    service: model
                        .identity_services
                        .get(key)
                        .cloned()
                        .unwrap_or_default(),
                },
                None => Caller::Unidentified,
            };
        }
        tokio::time::sleep(Duration::from_millis(1 << attempt)).await;
    }
    Caller::Unidentified
}
