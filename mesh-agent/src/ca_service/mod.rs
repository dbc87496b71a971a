//! The mesh CA as a service (`mesh-agent ca serve`), so nodes of a multi-node mesh hold no CA
//! key. Agents send a CSR over mTLS, authenticated by their node identity
//! (`spiffe://<td>/ns/nodemesh-system/sa/node.<node>`); the service signs only the node's own
//! identity and the workload identities its placement config puts on that node.

pub mod cli;
pub mod client;
pub mod config;
pub mod protocol;
pub mod server;

pub use client::RemoteCa;
pub use config::{CaServiceConfig, Placements};
pub use server::CaServer;

/// The SPIFFE service account the CA service presents (namespace `nodemesh-system`).
pub const CA_SERVICE_ACCOUNT: &str = "ca";
