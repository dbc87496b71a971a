//! Types shared by the kernel programs (mesh-ebpf) and the agent.
//!
//! One module per map family. Every map key/value is `#[repr(C)]`, `Copy`, with explicit padding
//! fields so that the kernel and userspace agree byte for byte (the hash of a key includes padding).
#![no_std]

pub mod addr;
pub mod counters;
pub mod deny;
pub mod orig_dst;
pub mod services;
pub mod workloads;

/// Names of the maps in the eBPF object; the agent looks them up by these names.
pub mod map_names {
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const SERVICES: &str = "SERVICES";
    pub const DENY: &str = "DENY";
    pub const PENDING_DST: &str = "PENDING_DST";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const CONN_COUNTERS: &str = "CONN_COUNTERS";
    pub const AGENT_ADDR: &str = "AGENT_ADDR";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const INGRESS: &str = "mesh_ingress";
}

/// Capacity of the maps; the agent validates config against these before writing anything.
pub mod limits {
    pub const MAX_WORKLOADS: u32 = 4096;
    pub const MAX_SERVICES: u32 = 8192;
    pub const MAX_DENY_RULES: u32 = 65536;
    /// Identity ids index the per-CPU counter array, so they must stay below this.
    pub const MAX_IDENTITIES: u32 = 4096;
    pub const MAX_IN_FLIGHT: u32 = 65536;
}

/// Implements `aya::Pod` for map types when built for userspace.
#[macro_export]
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is repr(C), Copy, has explicit padding and every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
