//! Typed handles to the pinned maps and the diff-based sync from the mesh model.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::hash::Hash;
use std::net::SocketAddrV4;
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::Pod;
use mesh_common::{
    addr::ip4_to_raw,
    counters::ConnCounters,
    deny::{AllowEntry, DenyKey, DenyRule},
    egress::{EgressData, EgressPorts},
    limits, map_names,
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
    /// Registry endpoint addresses not in `services` (see [`KernelMaps::sync_endpoints`]).
    pub endpoints: StdHashMap<ServiceKey, ServiceValue>,
    pub deny: StdHashMap<DenyKey, DenyRule>,
    pub allow: StdHashMap<DenyKey, AllowEntry>,
    /// (prefix length, data) -> ports.
    pub egress: StdHashMap<(u32, EgressData), EgressPorts>,
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
    /// SERVICES as last synced: endpoint entries take their service's value from its VIP entry.
    services_synced: StdHashMap<ServiceKey, ServiceValue>,
    endpoints: HashMap<MapData, ServiceKey, ServiceValue>,
    /// What ENDPOINTS holds, so churn diffs in userspace without reading the whole map.
    endpoints_synced: StdHashMap<ServiceKey, ServiceValue>,
    /// Registry endpoint addresses left out of ENDPOINTS because it is full.
    endpoints_overflow: usize,
    /// Entries written or removed per map since start (churn must only touch ENDPOINTS).
    writes: BTreeMap<&'static str, u64>,
    deny: HashMap<MapData, DenyKey, DenyRule>,
    allow: HashMap<MapData, DenyKey, AllowEntry>,
    egress: LpmTrie<MapData, EgressData, EgressPorts>,
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
        let endpoints: HashMap<MapData, ServiceKey, ServiceValue> =
            take(bpf, map_names::ENDPOINTS)?;
        // Adopted pins: start from what an earlier agent left, so the first sync is a diff too.
        let endpoints_synced = endpoints.iter().filter_map(Result::ok).collect();
        let maps = KernelMaps {
            workloads: take(bpf, map_names::WORKLOADS)?,
            services: take(bpf, map_names::SERVICES)?,
            services_synced: StdHashMap::new(),
            endpoints,
            endpoints_synced,
            endpoints_overflow: 0,
            writes: BTreeMap::new(),
            deny: take(bpf, map_names::DENY)?,
            allow: take(bpf, map_names::ALLOW)?,
            egress: take(bpf, map_names::EGRESS)?,
            agent_addr: take(bpf, map_names::AGENT_ADDR)?,
            counters: take(bpf, map_names::CONN_COUNTERS)?,
            traffic: take(bpf, map_names::TRAFFIC_COUNTERS)?,
        };
        let orig = OrigDstTable {
            map: Mutex::new(take(bpf, map_names::ORIG_DST)?),
        };
        Ok((maps, orig))
    }

    /// Brings the maps to `desired` in two phases: every new and changed entry is written
    /// (SERVICES last, so a service's DEFAULT_DENY flag changes only once its ALLOW and DENY
    /// entries are in place), then stale entries are removed. A key that stays never disappears
    /// in between, and a policy change never passes through a state that admits more than
    /// either the old or the new policy.
    pub fn sync(&mut self, desired: &DesiredMaps) -> Result<SyncStats, EbpfError> {
        let stats = self.sync_all(desired)?;
        self.services_synced = desired.services.clone();
        Ok(stats)
    }

    fn sync_all(&mut self, desired: &DesiredMaps) -> Result<SyncStats, EbpfError> {
        let mut stats = SyncStats::default();
        stats.written += write_entries(
            &mut self.workloads,
            &desired.workloads,
            map_names::WORKLOADS,
        )?;
        stats.written += write_entries(&mut self.allow, &desired.allow, map_names::ALLOW)?;
        stats.written += write_entries(&mut self.deny, &desired.deny, map_names::DENY)?;
        stats.written += self.write_egress(&desired.egress)?;
        let services = write_entries(&mut self.services, &desired.services, map_names::SERVICES)?;
        self.count(map_names::SERVICES, services);
        stats.written += services;
        stats += self.sync_endpoints(&desired.endpoints)?;
        let services = remove_stale(&mut self.services, &desired.services, map_names::SERVICES)?;
        self.count(map_names::SERVICES, services);
        stats.removed += services;
        stats.removed += remove_stale(&mut self.deny, &desired.deny, map_names::DENY)?;
        stats.removed += remove_stale(&mut self.allow, &desired.allow, map_names::ALLOW)?;
        stats.removed += self.remove_stale_egress(&desired.egress)?;
        stats.removed += remove_stale(
            &mut self.workloads,
            &desired.workloads,
            map_names::WORKLOADS,
        )?;
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

    fn write_egress(
        &mut self,
        desired: &StdHashMap<(u32, EgressData), EgressPorts>,
    ) -> Result<usize, EbpfError> {
        let mut written = 0;
        for ((len, data), ports) in desired {
            let key = LpmKey::new(*len, *data);
            if self.egress.get(&key, 0).ok().as_ref() != Some(ports) {
                self.egress
                    .insert(&key, ports, 0)
                    .map_err(|source| EbpfError::Map {
                        name: map_names::EGRESS,
                        source,
                    })?;
                written += 1;
            }
        }
        Ok(written)
    }

    fn remove_stale_egress(
        &mut self,
        desired: &StdHashMap<(u32, EgressData), EgressPorts>,
    ) -> Result<usize, EbpfError> {
        let stale: Vec<LpmKey<EgressData>> = self
            .egress
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !desired.contains_key(&(k.prefix_len(), k.data())))
            .collect();
        for key in &stale {
            self.egress.remove(key).map_err(|source| EbpfError::Map {
                name: map_names::EGRESS,
                source,
            })?;
        }
        Ok(stale.len())
    }

    /// Brings ENDPOINTS to `desired`, touching only the entries that differ: stale ones are
    /// removed first (freeing room), then new and changed ones written. Entries beyond the map's
    /// capacity are left out and counted in [`KernelMaps::endpoints_overflow`]; a direct dial to
    /// such an address meets the egress rules instead of its service's allow-list.
    pub fn sync_endpoints(
        &mut self,
        desired: &StdHashMap<ServiceKey, ServiceValue>,
    ) -> Result<SyncStats, EbpfError> {
        let plan = plan_endpoints(&self.endpoints_synced, desired, limits::MAX_ENDPOINTS);
        let map_error = |source| EbpfError::Map {
            name: map_names::ENDPOINTS,
            source,
        };
        for key in &plan.remove {
            match self.endpoints.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(map_error(source)),
            }
            self.endpoints_synced.remove(key);
        }
        for (key, value) in &plan.write {
            self.endpoints.insert(key, value, 0).map_err(map_error)?;
            self.endpoints_synced.insert(*key, *value);
        }
        if plan.overflow != self.endpoints_overflow && plan.overflow > 0 {
            tracing::error!(
                left_out = plan.overflow,
                capacity = limits::MAX_ENDPOINTS,
                "kernel endpoint map full: direct dials to the endpoints left out are not checked against their service's allow-list"
            );
        }
        self.endpoints_overflow = plan.overflow;
        let stats = SyncStats {
            written: plan.write.len(),
            removed: plan.remove.len(),
        };
        self.count(map_names::ENDPOINTS, stats.written + stats.removed);
        Ok(stats)
    }

    /// SERVICES as last synced by this agent.
    pub fn services(&self) -> &StdHashMap<ServiceKey, ServiceValue> {
        &self.services_synced
    }

    /// Entries ENDPOINTS holds.
    pub fn endpoint_entries(&self) -> usize {
        self.endpoints_synced.len()
    }

    /// Registry endpoint addresses that did not fit in ENDPOINTS.
    pub fn endpoints_overflow(&self) -> usize {
        self.endpoints_overflow
    }

    /// Entries written or removed per map since start (SERVICES and ENDPOINTS).
    pub fn writes(&self) -> &BTreeMap<&'static str, u64> {
        &self.writes
    }

    fn count(&mut self, map: &'static str, n: usize) {
        *self.writes.entry(map).or_default() += n as u64;
    }

    /// Identity id the WORKLOADS map holds for a cgroup (written by this or an earlier agent).
    pub fn workload_identity(&self, cgroup: u64) -> Option<u32> {
        self.workloads.get(&cgroup, 0).ok().map(|w| w.identity)
    }

    /// Service id the SERVICES map holds for a destination (written by this or an earlier agent).
    pub fn service_id(&self, key: &ServiceKey) -> Option<u32> {
        self.services.get(key, 0).ok().map(|s| s.service)
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

fn write_entries<K, V>(
    map: &mut HashMap<MapData, K, V>,
    desired: &StdHashMap<K, V>,
    name: &'static str,
) -> Result<usize, EbpfError>
where
    K: Pod + Hash + Eq,
    V: Pod + PartialEq,
{
    let mut written = 0;
    for (key, value) in desired {
        if map.get(key, 0).ok().as_ref() != Some(value) {
            map.insert(key, value, 0)
                .map_err(|source| EbpfError::Map { name, source })?;
            written += 1;
        }
    }
    Ok(written)
}

fn remove_stale<K, V>(
    map: &mut HashMap<MapData, K, V>,
    desired: &StdHashMap<K, V>,
    name: &'static str,
) -> Result<usize, EbpfError>
where
    K: Pod + Hash + Eq,
    V: Pod,
{
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !desired.contains_key(k))
        .collect();
    for key in &stale {
        map.remove(key)
            .map_err(|source| EbpfError::Map { name, source })?;
    }
    Ok(stale.len())
}

/// The changes that bring ENDPOINTS from `current` to `desired` within `capacity` entries.
#[derive(Debug, Default, PartialEq, Eq)]
struct EndpointPlan {
    remove: Vec<ServiceKey>,
    write: Vec<(ServiceKey, ServiceValue)>,
    /// New entries that do not fit.
    overflow: usize,
}

fn plan_endpoints(
    current: &StdHashMap<ServiceKey, ServiceValue>,
    desired: &StdHashMap<ServiceKey, ServiceValue>,
    capacity: u32,
) -> EndpointPlan {
    let mut plan = EndpointPlan {
        remove: current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect(),
        ..Default::default()
    };
    let mut held = current.len() - plan.remove.len();
    // Sorted, so which entries overflow does not depend on hash order.
    let mut changes: Vec<_> = desired
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .collect();
    changes.sort_unstable_by_key(|(k, _)| (k.ip, k.port));
    for (key, value) in changes {
        let new = !current.contains_key(key);
        if new && held >= capacity as usize {
            plan.overflow += 1;
            continue;
        }
        held += usize::from(new);
        plan.write.push((*key, *value));
    }
    plan
}

/// ORIG_DST, shared with the outbound proxy: on accept it takes the entry for the peer address.
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, ClientKey, OrigDst>>,
}

impl OrigDstTable {
    /// Returns and deletes the original destination recorded for a client address.
    /// The entry of the connection from `client` accepted on `local_port`, removed.
    pub fn take(&self, client: SocketAddrV4, local_port: u16) -> Option<OrigDst> {
        let ip = ip4_to_raw(client.ip().octets());
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Entries of an older sock_ops program (still attached during an upgrade) have no port.
        [local_port, 0].into_iter().find_map(|agent_port| {
            let key = ClientKey::new(ip, client.port(), agent_port);
            let value = map.get(&key, 0).ok()?;
            // Best effort: the map is LRU, so a failed delete only delays eviction.
            let _ = map.remove(&key);
            Some(value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(items: &[(u32, u32)]) -> StdHashMap<ServiceKey, ServiceValue> {
        items
            .iter()
            .map(|&(ip, service)| (ServiceKey::new(ip, 80), ServiceValue::new(service)))
            .collect()
    }

    #[test]
    fn churn_plans_only_the_entries_that_differ() {
        let current = entries(&[(1, 7), (2, 7), (3, 8)]);
        let desired = entries(&[(1, 7), (3, 9), (4, 7)]);
        let plan = plan_endpoints(&current, &desired, 16);
        assert_eq!(plan.remove, vec![ServiceKey::new(2, 80)]);
        assert_eq!(
            plan.write,
            vec![
                (ServiceKey::new(3, 80), ServiceValue::new(9)),
                (ServiceKey::new(4, 80), ServiceValue::new(7)),
            ]
        );
        assert_eq!(plan.overflow, 0);
        assert_eq!(
            plan_endpoints(&desired, &desired, 16),
            EndpointPlan::default()
        );
    }

    #[test]
    fn a_full_map_leaves_new_entries_out_and_counts_them() {
        let current = entries(&[(1, 7), (2, 7)]);
        let desired = entries(&[(2, 8), (3, 7), (4, 7), (5, 7)]);
        let plan = plan_endpoints(&current, &desired, 3);
        // 1 removed, 2 changed in place, 3 and 4 fill the map, 5 does not fit.
        assert_eq!(plan.remove.len(), 1);
        let written: Vec<u32> = plan.write.iter().map(|(k, _)| k.ip).collect();
        assert_eq!(written, vec![2, 3, 4]);
        assert_eq!(plan.overflow, 1);
    }
}
