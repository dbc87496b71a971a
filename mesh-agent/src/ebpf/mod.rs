//! Kernel side management: preflight checks, loading and pinning, cgroup attachment, map sync.

pub mod attach;
mod error;
mod loader;
mod maps;
pub mod object;
pub mod preflight;
mod traffic_links;

pub use attach::Attachments;
pub use error::EbpfError;
pub use loader::MeshEbpf;
pub use maps::{DesiredMaps, KernelMaps, OrigDstTable, SyncStats};
