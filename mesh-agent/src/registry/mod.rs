//! Service registry: what services, endpoints and identities exist, with stable kernel ids; the
//! discovery backends that feed it, the one reconciler, health checks and the Consul API.

pub mod agent;
pub mod api;
pub mod backend;
pub mod caller;
pub mod catalog;
pub mod health;
pub mod instance;
pub mod mesh_state;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod reconcile;

pub use model::{MeshModel, ServiceEntry};
