//! Policy: kernel deny-list compiler and inbound authorization.

pub mod authz;
pub mod authz_config;
pub mod deny;
pub mod egress;
pub mod kernel;
