//! Mesh state an operator defines once in the registry (not in every node's file): services
//! (VIP, ports, traffic and allow/deny policy) and the workloads of each node. The reconciler
//! merges them into the node's YAML view; the node's file wins on a name clash (the registry
//! object is refused with an error naming it), and a registry object that fails the config's
//! validators is refused whole, so nothing of it is half-applied.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{self, Config, ConfigError, Service, Workload};

/// What the registry holds: services by name, workloads by (node, name).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshObjects {
    pub services: BTreeMap<String, Service>,
    pub workloads: BTreeMap<(String, String), Workload>,
}

/// The operator's document (`mesh-agent ctl apply -f mesh.yaml`): services, and workloads under
/// the name of the node that hosts them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeshDocument {
    #[serde(default)]
    pub services: Vec<Service>,
    /// node name -> its workloads.
    #[serde(default)]
    pub workloads: BTreeMap<String, Vec<Workload>>,
}

#[derive(Debug, Error)]
pub enum MeshStateError {
    #[error("mesh document: {0}")]
    Parse(String),
    #[error("registry {kind} {name:?}: {source}")]
    Invalid {
        kind: &'static str,
        name: String,
        #[source]
        source: ConfigError,
    },
    #[error("registry {kind} {name:?} clashes with the one in node {node}'s YAML file (the file's definition wins; rename or remove one)")]
    Clash {
        kind: &'static str,
        name: String,
        node: String,
    },
}

impl MeshStateError {
    /// The kind of object refused (`service`, `workload`), or `document` for a parse error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Parse(_) => "document",
            Self::Invalid { kind, .. } | Self::Clash { kind, .. } => kind,
        }
    }
}

impl MeshDocument {
    /// Parses YAML or JSON; errors name the field (`services[0].vip: ...`).
    pub fn parse(text: &str) -> Result<Self, MeshStateError> {
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
            .map_err(|e| MeshStateError::Parse(format!("{}: {}", e.path(), e.inner())))
    }

    /// The document that defines exactly `objects` (what the embedded backend saves).
    pub fn from_objects(objects: &MeshObjects) -> Self {
        let mut workloads: BTreeMap<String, Vec<Workload>> = BTreeMap::new();
        for ((node, _), w) in &objects.workloads {
            workloads.entry(node.clone()).or_default().push(w.clone());
        }
        Self {
            services: objects.services.values().cloned().collect(),
            workloads,
        }
    }

    pub fn objects(&self) -> MeshObjects {
        MeshObjects {
            services: self
                .services
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            workloads: self
                .workloads
                .iter()
                .flat_map(|(node, ws)| {
                    ws.iter()
                        .map(move |w| ((node.clone(), w.name.clone()), w.clone()))
                })
                .collect(),
        }
    }
}

/// `base` (the node's file) with every registry object that fits added; returns the refused
/// objects' errors. Objects are tried in key order, each checked by the config's validators
/// against what was accepted before it, so the outcome does not depend on arrival order.
pub fn merge(base: &Config, mesh: &MeshObjects) -> (Config, Vec<MeshStateError>) {
    let mut config = base.clone();
    let mut refused = Vec::new();
    if mesh.services.is_empty() && !mesh.workloads.keys().any(|(n, _)| *n == base.node.name) {
        return (config, refused);
    }
    for (name, service) in &mesh.services {
        if base.services.iter().any(|s| &s.name == name) {
            refused.push(MeshStateError::Clash {
                kind: "service",
                name: name.clone(),
                node: base.node.name.clone(),
            });
            continue;
        }
        config.services.push(service.clone());
        if let Err(source) = config::validate(&config) {
            config.services.pop();
            refused.push(MeshStateError::Invalid {
                kind: "service",
                name: name.clone(),
                source,
            });
        }
    }
    for ((node, name), workload) in &mesh.workloads {
        if *node != base.node.name {
            continue;
        }
        if base.workloads.iter().any(|w| &w.name == name) {
            refused.push(MeshStateError::Clash {
                kind: "workload",
                name: name.clone(),
                node: node.clone(),
            });
            continue;
        }
        config.workloads.push(workload.clone());
        if let Err(source) = config::validate(&config) {
            config.workloads.pop();
            refused.push(MeshStateError::Invalid {
                kind: "workload",
                name: format!("{node}/{name}"),
                source,
            });
        }
    }
    (config, refused)
}

/// Checks an operator's document before anything is written: it must merge with `base` and the
/// registry's current objects without a single refusal (all or nothing).
pub fn check_apply(
    base: &Config,
    current: &MeshObjects,
    document: &MeshDocument,
) -> Result<MeshObjects, MeshStateError> {
    let objects = document.objects();
    let mut next = current.clone();
    next.services.extend(objects.services.clone());
    next.workloads.extend(objects.workloads.clone());
    let (_, refused) = merge(base, &next);
    let is_new = |e: &MeshStateError| match e {
        MeshStateError::Invalid { kind, name, .. } | MeshStateError::Clash { kind, name, .. } => {
            match *kind {
                "service" => objects.services.contains_key(name),
                _ => objects
                    .workloads
                    .keys()
                    .any(|(n, w)| *name == *w || *name == format!("{n}/{w}")),
            }
        }
        MeshStateError::Parse(_) => true,
    };
    match refused.into_iter().find(is_new) {
        Some(e) => Err(e),
        None => Ok(objects),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        let yaml = "node: {name: n1, agent_ip: 10.1.255.1}\n\
                    services:\n  - {name: wallet, vip: 10.96.0.5:80, endpoints: [\"10.1.1.9:80\"]}\n";
        config::parse(yaml, "test", &|_| None).expect("config")
    }

    fn doc(text: &str) -> MeshDocument {
        MeshDocument::parse(text).expect("document")
    }

    #[test]
    fn registry_services_and_this_nodes_workloads_are_merged() {
        let d = doc("services:\n  - {name: ledger, vip: 10.96.0.6:80, policy: {allow: [wallet]}}\n\
                     workloads:\n  n1: [{name: ledger, service_account: ledger, cgroup: /x/ledger}]\n  \
                     n2: [{name: other, service_account: other, cgroup: /x/other}]\n");
        let (config, refused) = merge(&base(), &d.objects());
        assert!(refused.is_empty(), "{refused:?}");
        let names: Vec<_> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["wallet", "ledger"]);
        let workloads: Vec<_> = config.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(workloads, ["ledger"], "only this node's workloads");
    }

    #[test]
    fn clashes_and_invalid_objects_are_refused_whole_with_the_field_named() {
        let d = doc("services:\n  - {name: wallet, vip: 10.96.0.7:80}\n  \
                     - {name: taken, vip: 10.96.0.5:80}\n  - {name: fine, vip: 10.96.0.8:80}\n");
        let (config, refused) = merge(&base(), &d.objects());
        let errors: Vec<String> = refused.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("\"taken\"") && e.contains(".vip`")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("\"wallet\"") && e.contains("file's definition wins")),
            "{errors:?}"
        );
        let names: Vec<_> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["wallet", "fine"]);
        assert_eq!(
            config.services[0].vip.to_string(),
            "10.96.0.5:80",
            "file wins"
        );
        let e = check_apply(&base(), &MeshObjects::default(), &d).expect_err("refused");
        assert!(e.to_string().contains("registry service"), "{e}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = MeshDocument::parse("services:\n  - {name: a, vip: 10.96.0.9:80, vips: 1}\n")
            .expect_err("unknown field");
        assert!(e.to_string().contains("services[0]"), "{e}");
    }
}
