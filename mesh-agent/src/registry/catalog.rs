//! The discovery cache: every instance and node a backend knows, with a change index. Lookups
//! (the Consul API, the reconciler) read this copy, never the backend itself, so a backend that
//! is unreachable leaves the last known view in force (`down_policy: extend-cache`).

use std::collections::BTreeMap;

use super::instance::{HealthStatus, Instance, NodeRecord};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    /// instance_id -> instance.
    pub instances: BTreeMap<String, Instance>,
    /// node name -> node.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Bumped on every change; the Consul API's X-Consul-Index.
    pub index: u64,
}

impl Catalog {
    /// Instances of `service`, optionally only passing ones.
    pub fn service<'a>(
        &'a self,
        service: &'a str,
        passing_only: bool,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances.values().filter(move |i| {
            i.service_name == service && (!passing_only || i.status == HealthStatus::Passing)
        })
    }

    /// Service name -> union of its instances' tags.
    pub fn services(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in self.instances.values() {
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
