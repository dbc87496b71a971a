//! nodemesh node agent library. See docs/ARCHITECTURE.md in the repository for the architecture.

pub mod access_log;
pub mod admission;
pub mod app;
pub mod atomic_file;
pub mod config;
pub mod ctl;
pub mod ebpf;
pub mod flows;
pub mod http_server;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod state;
pub mod traffic;
