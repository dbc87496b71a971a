//! Kernel side management: preflight checks, loading and pinning, cgroup attachment, map sync.

pub mod attach;
mod error;
mod links;
mod loader;
mod maps;
pub mod object;
mod own_cgroup;
pub mod preflight;
mod traffic_links;

pub use attach::{uninstall, Attachments};
pub use error::EbpfError;
pub use loader::{pin_dir, MeshEbpf};
pub use maps::{DesiredMaps, KernelMaps, OrigDstTable, SyncStats};
