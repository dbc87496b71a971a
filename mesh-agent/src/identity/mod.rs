//! Workload identity: mesh CA, workload certificates, rotation, rustls configs.

pub mod spiffe;

pub use spiffe::{SpiffeError, SpiffeId};
