//! nodemesh node agent library. See ../shared/DESIGN.md for the architecture.

pub mod identity;
pub mod policy;
pub mod proxy;
