//! Maps shared with the agent. All pinned by name so the agent pins them per instance directory.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray},
};
use mesh_common::{
    counters::ConnCounters,
    deny::{AllowEntry, DenyKey, DenyRule},
    egress::{EgressData, EgressPorts},
    flows::FlowKey,
    limits,
    orig_dst::{ClientKey, OrigDst},
    services::{AgentAddr, ServiceKey, ServiceValue},
    traffic::TrafficCounters,
    workloads::WorkloadIdentity,
};

/// cgroup id -> identity of the workload running in that cgroup.
#[map]
pub static WORKLOADS: HashMap<u64, WorkloadIdentity> = HashMap::pinned(limits::MAX_WORKLOADS, 0);

/// mesh service VIP:port -> service id.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(limits::MAX_SERVICES, 0);

/// Registry endpoint address:port -> its service (id and flags); looked up after SERVICES.
#[map]
pub static ENDPOINTS: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(limits::MAX_ENDPOINTS, 0);

/// (identity, service) pairs refused in the kernel.
#[map]
pub static DENY: HashMap<DenyKey, DenyRule> = HashMap::pinned(limits::MAX_DENY_RULES, 0);

/// (identity, service) pairs a default-deny service admits.
#[map]
pub static ALLOW: HashMap<DenyKey, AllowEntry> = HashMap::pinned(limits::MAX_ALLOW_RULES, 0);

/// (identity, CIDR) -> ports: the non-mesh destinations a workload may reach.
#[map]
pub static EGRESS: LpmTrie<EgressData, EgressPorts> = LpmTrie::pinned(limits::MAX_EGRESS_RULES, 0);

/// socket cookie -> original destination, between connect() and ESTABLISHED.
#[map]
pub static PENDING_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(limits::MAX_IN_FLIGHT, 0);

/// (client ip, client port) -> original destination, read and deleted by the agent on accept.
#[map]
pub static ORIG_DST: LruHashMap<ClientKey, OrigDst> = LruHashMap::pinned(limits::MAX_IN_FLIGHT, 0);

/// Per-identity connect() outcome counters.
#[map]
pub static CONN_COUNTERS: PerCpuArray<ConnCounters> =
    PerCpuArray::pinned(limits::MAX_IDENTITIES, 0);

/// Per-identity bytes and packets sent and received (cgroup_skb egress/ingress).
#[map]
pub static TRAFFIC_COUNTERS: PerCpuArray<TrafficCounters> =
    PerCpuArray::pinned(limits::MAX_IDENTITIES, 0);
/// TCP connections the agent opened (4-tuple), for strict mode; LRU so they need no cleanup.
#[map]
pub static AGENT_FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(limits::MAX_IN_FLIGHT, 0);

/// Index 0: the agent's outbound listener as pods reach it.
#[map]
pub static AGENT_ADDR: Array<AgentAddr> = Array::pinned(1, 0);
