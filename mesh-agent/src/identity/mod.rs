//! Workload identity: mesh CA, workload certificates, rotation, rustls configs.
//!
//! Typical wiring: `MeshCa::load_or_generate` (or `from_pem_files*` for a mounted Secret), one
//! shared `CertStore`, one `spawn_rotation` task per local workload, and `server_config` /
//! `client_config` built over the store so every new handshake uses the current certificate.

pub mod ca;
pub mod certs;
pub mod error;
pub(crate) mod files;
pub mod manager;
pub mod persisted;
pub mod rotation;
pub mod spiffe;
pub mod store;
pub mod tls;
pub mod trust;

pub use ca::MeshCa;
pub use certs::{WorkloadCert, WorkloadSpec};
pub use error::IdentityError;
pub use manager::IdentityManager;
pub use persisted::CertDir;
pub use rotation::{spawn_rotation, spawn_rotation_renewing, Backoff, CertIssuer, RotationConfig};
pub use spiffe::{SpiffeError, SpiffeId};
pub use store::CertStore;
pub use tls::{client_config, peer_spiffe_id, server_config};
pub use trust::TrustBundle;
