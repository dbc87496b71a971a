//! The mesh model compiled from config: ids the kernel maps use, kept stable across reloads so a
//! counter or in-flight connection never changes meaning when the config changes.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Config;

/// One endpoint; `node` is None when it runs on this node (reached directly).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    pub addr: SocketAddrV4,
    pub node: Option<String>,
    /// Zone for locality-aware balancing (None: unknown).
    pub zone: Option<String>,
    /// Share under weighted round robin, at least 1.
    pub weight: u32,
}

/// A service as the data path needs it.
#[derive(Debug)]
pub struct ServiceEntry {
    pub id: u32,
    pub name: String,
    pub namespace: String,
    pub vip: SocketAddrV4,
    pub endpoints: Vec<EndpointEntry>,
    /// Round-robin cursor over `endpoints`.
    next: AtomicUsize,
}

impl ServiceEntry {
    /// Picks the next endpoint round robin; None when the service has no endpoints.
    pub fn pick_endpoint(&self) -> Option<EndpointEntry> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(self.endpoints[i].clone())
    }
}

#[derive(Debug, Default)]
pub struct MeshModel {
    /// identity key (`ns/sa`) -> id, 1-based.
    pub identities: BTreeMap<String, u32>,
    /// service name -> entry.
    pub services: BTreeMap<String, ServiceEntry>,
    /// identity key -> the service its (first) workload serves, for authorization by service.
    pub identity_services: BTreeMap<String, String>,
    /// Registry mesh objects left out of this model's config (invalid, or clashing with the
    /// node's file), by kind; set by the reconciler's merge.
    pub refused_objects: BTreeMap<&'static str, usize>,
}

impl MeshModel {
    /// Builds the model for `config`, reusing the ids `previous` gave to names that still exist.
    pub fn build(config: &Config, previous: Option<&MeshModel>) -> MeshModel {
        let ids = previous.map(MeshModel::ids).unwrap_or_default();
        MeshModel::build_seeded(config, ids)
    }

    /// The ids of this model, to seed the next one.
    pub fn ids(&self) -> ModelIds {
        ModelIds {
            identities: self.identities.clone(),
            services: self
                .services
                .iter()
                .map(|(n, s)| (n.clone(), s.id))
                .collect(),
        }
    }

    /// Builds the model reusing the ids in `seed` (e.g. those an earlier agent left in the
    /// kernel maps, so that ids stay stable across agent restarts too). Ids in `seed` that two
    /// names share are honoured for the first name only.
    pub fn build_seeded(config: &Config, seed: ModelIds) -> MeshModel {
        let identity_names: Vec<String> = config.workloads.iter().map(|w| w.identity()).collect();
        let identities = assign_ids(identity_names, unique_ids(seed.identities));
        let service_ids = assign_ids(
            config.services.iter().map(|s| s.name.clone()).collect(),
            unique_ids(seed.services),
        );
        let services = config
            .services
            .iter()
            .map(|s| {
                let entry = ServiceEntry {
                    id: service_ids[&s.name],
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    vip: s.vip,
                    endpoints: s
                        .endpoints
                        .iter()
                        .map(|e| EndpointEntry {
                            addr: e.address(),
                            node: e
                                .node()
                                .filter(|n| *n != config.node.name)
                                .map(str::to_owned),
                            // An endpoint on this node without its own zone is in this node's.
                            zone: e.zone().map(str::to_owned).or_else(|| {
                                e.node()
                                    .is_none_or(|n| n == config.node.name)
                                    .then(|| config.node.zone.clone())
                                    .flatten()
                            }),
                            weight: e.weight(),
                        })
                        .collect(),
                    next: AtomicUsize::new(0),
                };
                (s.name.clone(), entry)
            })
            .collect();
        let mut identity_services = BTreeMap::new();
        for w in &config.workloads {
            identity_services
                .entry(w.identity())
                .or_insert_with(|| w.service_name().to_owned());
        }
        MeshModel {
            identities,
            services,
            identity_services,
            refused_objects: BTreeMap::new(),
        }
    }

    pub fn service_by_id(&self, id: u32) -> Option<&ServiceEntry> {
        self.services.values().find(|s| s.id == id)
    }

    pub fn identity_name(&self, id: u32) -> Option<&str> {
        self.identities
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| k.as_str())
    }
}

/// Ids to keep when building a model: identity key -> id, service name -> id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModelIds {
    pub identities: BTreeMap<String, u32>,
    pub services: BTreeMap<String, u32>,
}

/// Drops entries whose id an earlier name already has (ids must stay unique).
fn unique_ids(ids: BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let mut seen = std::collections::BTreeSet::new();
    ids.into_iter().filter(|(_, id)| seen.insert(*id)).collect()
}

/// Gives every name an id: previous ids are kept, new names get the lowest free ids (from 1).
fn assign_ids(names: Vec<String>, previous: BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let mut result = BTreeMap::new();
    for name in &names {
        if let Some(id) = previous.get(name) {
            result.insert(name.clone(), *id);
        }
    }
    let mut used: std::collections::BTreeSet<u32> = result.values().copied().collect();
    let mut candidate = 1u32;
    for name in names {
        if result.contains_key(&name) {
            continue;
        }
        while used.contains(&candidate) {
            candidate += 1;
        }
        used.insert(candidate);
        result.insert(name, candidate);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_reload_and_new_names_take_free_ids() {
        let first = assign_ids(vec!["a".into(), "b".into(), "c".into()], BTreeMap::new());
        assert_eq!(first["a"], 1);
        assert_eq!(first["c"], 3);
        let second = assign_ids(vec!["c".into(), "d".into(), "a".into()], first);
        assert_eq!(second["a"], 1, "kept");
        assert_eq!(second["c"], 3, "kept");
        assert_eq!(second["d"], 2, "lowest free id");
        assert!(!second.contains_key("b"));
    }

    #[test]
    fn seeded_ids_are_kept_and_duplicates_dropped() {
        let seed = BTreeMap::from([
            ("a".to_owned(), 5),
            ("b".to_owned(), 5),
            ("c".to_owned(), 1),
        ]);
        let ids = assign_ids(vec!["a".into(), "b".into(), "c".into()], unique_ids(seed));
        assert_eq!(ids["a"], 5);
        assert_eq!(ids["c"], 1);
        assert_eq!(ids["b"], 2, "duplicate seed id dropped; lowest free id");
    }

    #[test]
    fn round_robin_cycles_endpoints() {
        let e = ServiceEntry {
            id: 1,
            name: "s".into(),
            namespace: "d".into(),
            vip: "10.96.0.1:80".parse().expect("addr"),
            endpoints: ["10.0.0.1:1", "10.0.0.2:1"]
                .iter()
                .map(|a| EndpointEntry {
                    addr: a.parse().expect("addr"),
                    node: None,
                    zone: None,
                    weight: 1,
                })
                .collect(),
            next: AtomicUsize::new(0),
        };
        let picks: Vec<_> = (0..4)
            .filter_map(|_| e.pick_endpoint())
            .map(|e| e.addr.ip().octets()[3])
            .collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
    }
}
