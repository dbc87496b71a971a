//! Compiles `policy.deny` rules into DENY map entries: (identity id, service id) -> rule index.

use std::collections::BTreeMap;

use mesh_common::deny::DenyRule;

use crate::config::{Config, WILDCARD};
use crate::registry::MeshModel;

/// Expands wildcards over the model. The first rule that names a pair wins (its index is reported).
pub fn compile(config: &Config, model: &MeshModel) -> BTreeMap<(u32, u32), DenyRule> {
    let mut entries = BTreeMap::new();
    for (index, rule) in config.policy.deny.iter().enumerate() {
        let sources: Vec<u32> = if rule.from == WILDCARD {
            model.identities.values().copied().collect()
        } else {
            model
                .identities
                .get(&rule.from)
                .copied()
                .into_iter()
                .collect()
        };
        let targets: Vec<u32> = if rule.to == WILDCARD {
            model.services.values().map(|s| s.id).collect()
        } else {
            model
                .services
                .get(&rule.to)
                .map(|s| s.id)
                .into_iter()
                .collect()
        };
        for &identity in &sources {
            for &service in &targets {
                entries
                    .entry((identity, service))
                    .or_insert(DenyRule::new(index as u32));
            }
        }
    }
    entries
}
