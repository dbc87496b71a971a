//! The per-identity byte/packet families read from the kernel's TRAFFIC_COUNTERS at scrape time.
//! Kept apart from any exposition code so that whatever renders /metrics only loops over
//! [`FAMILIES`] and [`read`].

use mesh_common::traffic::TrafficCounters;

use crate::state::AgentState;

/// Reads one counter of an identity's traffic.
pub type Field = fn(&TrafficCounters) -> u64;

/// (name, help, field) of each counter family; labels: node, identity.
pub const FAMILIES: [(&str, &str, Field); 4] = [
    (
        "nodemesh_kernel_sent_bytes_total",
        "Bytes (IP headers included) sent by workloads of an identity, counted in the kernel.",
        |c| c.sent_bytes,
    ),
    (
        "nodemesh_kernel_received_bytes_total",
        "Bytes (IP headers included) delivered to workloads of an identity, counted in the kernel.",
        |c| c.received_bytes,
    ),
    (
        "nodemesh_kernel_sent_packets_total",
        "IP packets sent by workloads of an identity, counted in the kernel.",
        |c| c.sent_packets,
    ),
    (
        "nodemesh_kernel_received_packets_total",
        "IP packets delivered to workloads of an identity, counted in the kernel.",
        |c| c.received_packets,
    ),
];

/// The counters of each (identity name, identity id), summed over CPUs; identities whose entry
/// cannot be read are left out. Empty once the kernel objects are gone (shutdown).
pub fn read(state: &AgentState, identities: &[(String, u32)]) -> Vec<(String, TrafficCounters)> {
    state
        .with_kernel(|k| {
            identities
                .iter()
                .filter_map(|(name, id)| Some((name.clone(), k.maps.traffic(*id).ok()?)))
                .collect()
        })
        .unwrap_or_default()
}
