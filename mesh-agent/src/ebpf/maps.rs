//! Typed handles to the pinned maps and the diff-based sync from the mesh model.

use std::collections::HashMap as StdHashMap;
use std::hash::Hash;
use std::net::SocketAddrV4;
use std::sync::Mutex;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::Pod;
use mesh_common::{
    addr::ip4_to_raw,
    counters::ConnCounters,
    deny::{DenyKey, DenyRule},
    map_names,
    orig_dst::{ClientKey, OrigDst},
    services::{AgentAddr, ServiceKey, ServiceValue},
    traffic::TrafficCounters,
    workloads::WorkloadIdentity,
};

use super::EbpfError;

/// What the kernel maps should contain; produced from config by the app.
#[derive(Debug, Default)]
pub struct DesiredMaps {
    pub workloads: StdHashMap<u64, WorkloadIdentity>,
    pub services: StdHashMap<ServiceKey, ServiceValue>,
    pub deny: StdHashMap<DenyKey, DenyRule>,
    pub agent: AgentAddr,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
}

impl std::ops::AddAssign for SyncStats {
    fn add_assign(&mut self, other: Self) {
        self.written += other.written;
        self.removed += other.removed;
    }
}

/// The maps the agent writes and reads (ORIG_DST lives in [`OrigDstTable`], shared with the proxy).
pub struct KernelMaps {
    workloads: HashMap<MapData, u64, WorkloadIdentity>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    deny: HashMap<MapData, DenyKey, DenyRule>,
    agent_addr: Array<MapData, AgentAddr>,
    counters: PerCpuArray<MapData, ConnCounters>,
    traffic: PerCpuArray<MapData, TrafficCounters>,
}

fn take<T>(bpf: &mut aya::Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

impl KernelMaps {
    pub fn take_from(bpf: &mut aya::Ebpf) -> Result<(KernelMaps, OrigDstTable), EbpfError> {
        let maps = KernelMaps {
            workloads: take(bpf, map_names::WORKLOADS)?,
            services: take(bpf, map_names::SERVICES)?,
            deny: take(bpf, map_names::DENY)?,
            agent_addr: take(bpf, map_names::AGENT_ADDR)?,
            counters: take(bpf, map_names::CONN_COUNTERS)?,
            traffic: take(bpf, map_names::TRAFFIC_COUNTERS)?,
        };
        let orig = OrigDstTable {
            map: Mutex::new(take(bpf, map_names::ORIG_DST)?),
        };
        Ok((maps, orig))
    }

    /// Brings the maps to `desired`: writes new and changed entries first, then removes stale
    /// ones, so a key that stays never disappears in between.
    pub fn sync(&mut self, desired: &DesiredMaps) -> Result<SyncStats, EbpfError> {
        let mut stats = SyncStats::default();
        stats += sync_hash(
            &mut self.workloads,
            &desired.workloads,
            map_names::WORKLOADS,
        )?;
        stats += sync_hash(&mut self.services, &desired.services, map_names::SERVICES)?;
        stats += sync_hash(&mut self.deny, &desired.deny, map_names::DENY)?;
        let current = self.agent_addr.get(&0, 0).ok();
        if current != Some(desired.agent) {
            self.agent_addr
                .set(0, desired.agent, 0)
                .map_err(|source| EbpfError::Map {
                    name: map_names::AGENT_ADDR,
                    source,
                })?;
            stats.written += 1;
        }
        Ok(stats)
    }

    /// Stops redirection so connects pass through unchanged. Only the port is cleared: strict
    /// mode keeps admitting connections from the agent address while the agent drains.
    pub fn clear_agent_addr(&mut self) -> Result<(), EbpfError> {
        let err = |source| EbpfError::Map {
            name: map_names::AGENT_ADDR,
            source,
        };
        let current = self.agent_addr.get(&0, 0).map_err(err)?;
        self.agent_addr
            .set(0, AgentAddr::new(current.ip, 0), 0)
            .map_err(err)
    }

    /// Per-identity counters summed over CPUs.
    pub fn counters(&self, identity: u32) -> Result<ConnCounters, EbpfError> {
        let per_cpu = self
            .counters
            .get(&identity, 0)
            .map_err(|source| EbpfError::Map {
                name: map_names::CONN_COUNTERS,
                source,
            })?;
        let mut total = ConnCounters::default();
        for value in per_cpu.iter() {
            total.accumulate(value);
        }
        Ok(total)
    }

    /// Per-identity bytes and packets summed over CPUs.
    pub fn traffic(&self, identity: u32) -> Result<TrafficCounters, EbpfError> {
        let per_cpu = self
            .traffic
            .get(&identity, 0)
            .map_err(|source| EbpfError::Map {
                name: map_names::TRAFFIC_COUNTERS,
                source,
            })?;
        let mut total = TrafficCounters::default();
        for value in per_cpu.iter() {
            total.accumulate(value);
        }
        Ok(total)
    }
}

fn sync_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    desired: &StdHashMap<K, V>,
    name: &'static str,
) -> Result<SyncStats, EbpfError>
where
    K: Pod + Hash + Eq,
    V: Pod + PartialEq,
{
    let err = |source| EbpfError::Map { name, source };
    let mut stats = SyncStats::default();
    for (key, value) in desired {
        if map.get(key, 0).ok().as_ref() != Some(value) {
            map.insert(key, value, 0).map_err(err)?;
            stats.written += 1;
        }
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !desired.contains_key(k))
        .collect();
    for key in stale {
        map.remove(&key).map_err(err)?;
        stats.removed += 1;
    }
    Ok(stats)
}

/// ORIG_DST, shared with the outbound proxy: on accept it takes the entry for the peer address.
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, ClientKey, OrigDst>>,
}

impl OrigDstTable {
    /// Returns and deletes the original destination recorded for a client address.
    pub fn take(&self, client: SocketAddrV4) -> Option<OrigDst> {
        let key = ClientKey::new(ip4_to_raw(client.ip().octets()), client.port());
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let value = map.get(&key, 0).ok()?;
        // Best effort: the map is LRU, so a failed delete only delays eviction.
        let _ = map.remove(&key);
        Some(value)
    }
}
