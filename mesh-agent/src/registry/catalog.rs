//! The discovery cache: every instance and node a backend knows, with a change index. Lookups
//! (the Consul API, the reconciler) read this copy, never the backend itself, so a backend that
//! is unreachable leaves the last known view in force (`down_policy: extend-cache`).
//!
//! Instances are grouped per service behind `Arc`s: a change copies one service's map and the
//! outer index of services, not every instance, so churn at 100,000 instances stays cheap.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::instance::{HealthStatus, Instance, NodeRecord};

type ServiceInstances = BTreeMap<String, Arc<Instance>>;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    /// service name -> instance_id -> instance.
    services: BTreeMap<String, Arc<ServiceInstances>>,
    /// node name -> node.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Operator-defined services and workloads (persistent, not owned by any agent's lease).
    pub mesh: super::mesh_state::MeshObjects,
    /// Bumped on every change; the Consul API's X-Consul-Index.
    pub index: u64,
}

impl Catalog {
    /// Instances of `service`, optionally only passing ones.
    pub fn service<'a>(
        &'a self,
        service: &str,
        passing_only: bool,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|m| m.values())
            .map(|i| &**i)
            .filter(move |i| !passing_only || i.status == HealthStatus::Passing)
    }

    pub fn get(&self, service: &str, instance_id: &str) -> Option<&Instance> {
        self.services.get(service)?.get(instance_id).map(|i| &**i)
    }

    /// Every instance.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.services
            .values()
            .flat_map(|m| m.values())
            .map(|i| &**i)
    }

    /// Inserts or replaces; returns whether anything changed.
    pub fn insert(&mut self, instance: Instance) -> bool {
        let map = Arc::make_mut(
            self.services
                .entry(instance.service_name.clone())
                .or_default(),
        );
        if map
            .get(&instance.instance_id)
            .is_some_and(|i| **i == instance)
        {
            return false;
        }
        map.insert(instance.instance_id.clone(), Arc::new(instance));
        true
    }

    /// Removes an instance; returns whether it was there.
    pub fn remove(&mut self, service: &str, instance_id: &str) -> bool {
        let Some(map) = self.services.get_mut(service) else {
            return false;
        };
        if !map.contains_key(instance_id) {
            return false;
        }
        let map = Arc::make_mut(map);
        map.remove(instance_id);
        if map.is_empty() {
            self.services.remove(service);
        }
        true
    }

    /// Same records (ignoring the index).
    pub fn same_records(&self, other: &Catalog) -> bool {
        self.services == other.services && self.nodes == other.nodes && self.mesh == other.mesh
    }

    /// Service name -> union of its instances' tags.
    pub fn services(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in self.instances() {
            let tags = out.entry(i.service_name.clone()).or_default();
            for t in &i.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
        out
    }
}
