//! Service registry: what services, endpoints and identities exist, with stable kernel ids.

pub mod model;

pub use model::{MeshModel, ServiceEntry};
