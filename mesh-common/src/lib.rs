//! Types shared by the kernel programs (mesh-ebpf) and the agent.
//!
//! One module per map family. Every map key/value is `#[repr(C)]`, `Copy`, with explicit padding
//! fields so that the kernel and userspace agree byte for byte (the hash of a key includes padding).
#![no_std]

pub mod addr;
pub mod counters;
pub mod deny;
pub mod egress;
pub mod flows;
pub mod orig_dst;
pub mod services;
pub mod traffic;
pub mod workloads;

/// Names of the maps in the eBPF object; the agent looks them up by these names.
pub mod map_names {
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const SERVICES: &str = "SERVICES";
    /// Registry endpoint addresses (churn writes only this map; see [`crate::services`]).
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const DENY: &str = "DENY";
    pub const ALLOW: &str = "ALLOW";
    pub const PENDING_DST: &str = "PENDING_DST";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const CONN_COUNTERS: &str = "CONN_COUNTERS";
    pub const AGENT_ADDR: &str = "AGENT_ADDR";
    pub const TRAFFIC_COUNTERS: &str = "TRAFFIC_COUNTERS";
    pub const AGENT_FLOWS: &str = "AGENT_FLOWS";
    pub const EGRESS: &str = "EGRESS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    pub const SOCKOPS: &str = "mesh_sockops";
    /// sock_ops on the agent's own cgroup: records the agent's connects for strict mode.
    pub const AGENT_SOCKOPS: &str = "mesh_agent_sockops";
    pub const INGRESS: &str = "mesh_ingress";
    pub const COUNT_EGRESS: &str = "mesh_count_egress";
    pub const COUNT_INGRESS: &str = "mesh_count_ingress";
}

/// Capacity of the maps; the agent validates config against these before writing anything.
pub mod limits {
    pub const MAX_WORKLOADS: u32 = 4096;
    pub const MAX_SERVICES: u32 = 8192;
    /// Registry endpoint addresses (ENDPOINTS) of the services this node routes.
    pub const MAX_ENDPOINTS: u32 = 65536;
    pub const MAX_DENY_RULES: u32 = 65536;
    /// Allowed (identity, service) pairs of default-deny services.
    pub const MAX_ALLOW_RULES: u32 = 65536;
    /// Identity ids index the per-CPU counter array, so they must stay below this.
    pub const MAX_IDENTITIES: u32 = 4096;
    pub const MAX_IN_FLIGHT: u32 = 65536;
    /// (identity, CIDR) egress entries.
    pub const MAX_EGRESS_RULES: u32 = 16384;
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

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use crate::addr::*;
    use crate::counters::ConnCounters;
    use crate::deny::{DenyKey, DenyRule};
    use crate::orig_dst::{ClientKey, OrigDst};
    use crate::services::{AgentAddr, ServiceKey, ServiceValue};
    use crate::workloads::WorkloadIdentity;

    /// Sizes are the sum of the fields: no implicit padding the kernel could hash differently.
    #[test]
    fn map_types_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 4 + 2 + 2);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<AgentAddr>(), 8);
        assert_eq!(size_of::<DenyKey>(), 8);
        assert_eq!(size_of::<DenyRule>(), 8);
        assert_eq!(size_of::<crate::deny::AllowEntry>(), 8);
        assert_eq!(size_of::<ClientKey>(), 8);
        assert_eq!(size_of::<crate::flows::FlowKey>(), 12);
        assert_eq!(size_of::<OrigDst>(), 16);
        assert_eq!(size_of::<WorkloadIdentity>(), 8);
        assert_eq!(size_of::<ConnCounters>() % 8, 0);
    }

    /// The kernel stores IPv4 addresses in network order and user_port as big-endian u16.
    #[test]
    fn address_encoding_matches_the_kernel_layout() {
        let raw = ip4_to_raw([10, 96, 0, 10]);
        assert_eq!(raw.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(ip4_from_raw(raw), [10, 96, 0, 10]);
        let user_port = port_to_sock_addr(15001);
        assert_eq!((user_port as u16).to_ne_bytes(), 15001u16.to_be_bytes());
        assert_eq!(port_from_sock_addr(user_port), 15001);
    }

    #[test]
    fn service_key_bytes_are_ip_then_port() {
        let key = ServiceKey::new(ip4_to_raw([10, 96, 0, 10]), 80);
        // SAFETY: ServiceKey is repr(C) plain data of 8 bytes.
        let bytes: [u8; 8] = unsafe { core::mem::transmute(key) };
        assert_eq!(&bytes[..4], &[10, 96, 0, 10]);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 80);
        assert_eq!(&bytes[6..], &[0, 0]);
    }

    #[test]
    fn counters_accumulate_per_cpu_values() {
        let mut total = ConnCounters::default();
        total.accumulate(&ConnCounters {
            opened: 2,
            redirected: 1,
            denied: 3,
            ..Default::default()
        });
        total.accumulate(&ConnCounters {
            opened: 5,
            redirected: 4,
            denied: 0,
            ..Default::default()
        });
        assert_eq!((total.opened, total.redirected, total.denied), (7, 5, 3));
    }
}
