//! HBONE: TCP connections tunnelled as HTTP/2 CONNECT streams over mTLS between node agents.
//!
//! One CONNECT stream per tunnelled TCP connection; `:authority` is the target endpoint
//! `ip:port` and [`SERVICE_HEADER`] names the destination service for inbound authorization.
//! Many streams share one pooled HTTP/2 connection per (source identity, destination node).

mod client;
mod error;
mod l7;
mod peer;
mod pool;
pub mod request;
mod server;
mod stream;

pub use error::HboneError;
pub use l7::RequestMetrics;
pub use peer::PeerIdentity;
pub use pool::{HbonePool, PoolConfig, PoolStats};
pub use request::TunnelProtocol;
pub use server::{HboneServer, InboundStats, InboundTargets, TunnelEnd, TunnelMetrics};
pub use stream::HboneStream;

/// Inbound HBONE port of the node agent.
pub const HBONE_PORT: u16 = 15008;

/// Request header carrying the destination service name.
pub const SERVICE_HEADER: &str = "x-nodemesh-service";

/// Request header marking a tunnel that carries HTTP (`http/1.1` or `h2`); the destination
/// agent then sees each request. Opaque TCP tunnels go without it.
pub const PROTOCOL_HEADER: &str = "x-nodemesh-protocol";

/// HTTP/2 over TLS is negotiated with ALPN "h2".
pub(crate) const ALPN_H2: &[u8] = b"h2";
