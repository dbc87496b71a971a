//! Mesh state an operator defines once in the registry (not in every node's file): services
//! (VIP, ports, traffic and allow/deny policy), the workloads of each node, authorization
//! policies and the mesh-wide default (`policy.default` of a node file that sets none; the
//! file's own value wins, and with neither the built-in deny holds). The reconciler
//! merges them into the node's YAML view; the node's file wins on a name clash (the registry
//! object is refused with an error naming it), and a registry object that fails the config's
//! validators is refused whole, so nothing of it is half-applied.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{self, Config, ConfigError, Service, Workload};
use crate::policy::authz_config::{DefaultAction, PolicyConfig as AuthzPolicy};

/// What the registry holds: services by name, workloads by (node, name), authorization
/// policies by name, and the mesh-wide default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshObjects {
    pub services: BTreeMap<String, Service>,
    pub workloads: BTreeMap<(String, String), Workload>,
    pub authorization: BTreeMap<String, AuthzPolicy>,
    pub default: Option<DefaultAction>,
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
    /// Inbound authorization policies, as the config file's `authorization` list.
    #[serde(default)]
    pub authorization: Vec<AuthzPolicy>,
    /// Mesh-wide default for services without a policy, used by nodes whose file does not set
    /// `policy.default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultAction>,
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
    /// The kind of object refused (`service`, `workload`, `authorization`), or `document` for a
    /// parse error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Parse(_) => "document",
            Self::Invalid { kind, .. } | Self::Clash { kind, .. } => kind,
        }
    }
}

impl MeshObjects {
    /// The registry service `name` with the registry authorization policies that protect it:
    /// what deleting the service removes, in one write. Left behind, such a policy would be
    /// refused on every node (it names no service) and come back unseen if a service of that
    /// name were defined again; removed, a new service of that name starts under the default.
    pub fn service_with_its_policies(&self, name: &str) -> MeshObjects {
        let mut objects = MeshObjects::default();
        if let Some(s) = self.services.get(name) {
            objects.services.insert(name.to_owned(), s.clone());
            objects.authorization = self
                .authorization
                .iter()
                .filter(|(_, p)| p.service == name)
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect();
        }
        objects
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
            authorization: objects.authorization.values().cloned().collect(),
            default: objects.default,
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
            authorization: self
                .authorization
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            default: self.default,
        }
    }
}

/// `base` (the node's file) with every registry object that fits added; returns the refused
/// objects' errors. Objects are tried in key order, each checked by the config's validators
/// against what was accepted before it, so the outcome does not depend on arrival order.
pub fn merge(base: &Config, mesh: &MeshObjects) -> (Config, Vec<MeshStateError>) {
    let mut config = base.clone();
    let mut refused = Vec::new();
    if config.policy.default.is_none() {
        config.policy.default = mesh.default;
    }
    let this_node = |node: &String| *node == base.node.name;
    let services = mesh.services.iter().map(|(name, s)| {
        let clash = base.services.iter().any(|b| &b.name == name);
        (name.clone(), clash, s)
    });
    try_each(&mut config, &mut refused, "service", services, |c| {
        &mut c.services
    });
    let workloads = mesh
        .workloads
        .iter()
        .filter(|((node, _), _)| this_node(node))
        .map(|((node, name), w)| {
            let clash = base.workloads.iter().any(|b| &b.name == name);
            (format!("{node}/{name}"), clash, w)
        });
    try_each(&mut config, &mut refused, "workload", workloads, |c| {
        &mut c.workloads
    });
    let policies = mesh.authorization.iter().map(|(name, p)| {
        let clash = base.authorization.iter().any(|b| &b.name == name);
        (name.clone(), clash, p)
    });
    try_each(&mut config, &mut refused, "authorization", policies, |c| {
        &mut c.authorization
    });
    (config, refused)
}

/// Adds each `(name, clashes with the file, object)` to the list `list` picks out of `config`,
/// keeping it only when it does not clash and the whole config still validates. Errors come
/// out in the objects' order.
fn try_each<'a, T: Clone + 'a>(
    config: &mut Config,
    refused: &mut Vec<MeshStateError>,
    kind: &'static str,
    objects: impl Iterator<Item = (String, bool, &'a T)>,
    list: impl Fn(&mut Config) -> &mut Vec<T>,
) {
    let mut errors = Vec::new();
    let mut candidates = Vec::new();
    for (index, (name, clash, object)) in objects.enumerate() {
        if clash {
            let node = config.node.name.clone();
            errors.push((index, MeshStateError::Clash { kind, name, node }));
        } else {
            candidates.push(Candidate {
                index,
                name,
                object,
            });
        }
    }
    add_valid(config, &candidates, kind, &list, &mut errors);
    errors.sort_by_key(|(index, _)| *index);
    refused.extend(errors.into_iter().map(|(_, e)| e));
}

/// A registry object waiting to be merged, with its place in key order.
struct Candidate<'a, T> {
    index: usize,
    name: String,
    object: &'a T,
}

/// Adds `batch` whole when the config still validates with all of it; otherwise tries its two
/// halves, first then second, down to single objects, which are refused with the validator's
/// error. One validation of the whole config when everything fits (the usual case), and about
/// log2(n) per refused object, instead of one per object: validation is linear in the config,
/// so object by object a registry of n services cost n^2. The outcome is the one of adding the
/// objects one by one in order, each checked against those accepted before it, as long as no
/// rule makes an object valid only through one after it (the validators' rules are about one
/// object, or a clash between two).
fn add_valid<T: Clone>(
    config: &mut Config,
    batch: &[Candidate<'_, T>],
    kind: &'static str,
    list: &impl Fn(&mut Config) -> &mut Vec<T>,
    errors: &mut Vec<(usize, MeshStateError)>,
) {
    if batch.is_empty() {
        return;
    }
    let kept = list(config).len();
    list(config).extend(batch.iter().map(|c| c.object.clone()));
    let Err(source) = config::validate(config) else {
        return;
    };
    list(config).truncate(kept);
    if let [one] = batch {
        let name = one.name.clone();
        errors.push((one.index, MeshStateError::Invalid { kind, name, source }));
        return;
    }
    let (first, second) = batch.split_at(batch.len() / 2);
    add_valid(config, first, kind, list, errors);
    add_valid(config, second, kind, list, errors);
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
    next.authorization.extend(objects.authorization.clone());
    next.default = objects.default.or(current.default);
    let (_, refused) = merge(base, &next);
    let is_new = |e: &MeshStateError| match e {
        MeshStateError::Invalid { kind, name, .. } | MeshStateError::Clash { kind, name, .. } => {
            match *kind {
                "service" => objects.services.contains_key(name),
                "authorization" => objects.authorization.contains_key(name),
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
    fn registry_policies_merge_under_the_file_and_the_files_default_wins() {
        let d = doc("services:\n  - {name: ledger, vip: 10.96.0.6:80}\n\
                     authorization:\n  \
                     - {name: ledger-callers, service: ledger, allow: [{from_service: wallet}]}\n  \
                     - {name: nowhere, service: missing, allow: [{from_service: wallet}]}\n\
                     default: allow\n");
        let (config, refused) = merge(&base(), &d.objects());
        let names: Vec<_> = config
            .authorization
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["ledger-callers"]);
        let errors: Vec<String> = refused.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("registry authorization \"nowhere\"")
                && errors[0].contains("authorization[1].service"),
            "{errors:?}"
        );
        assert_eq!(refused[0].kind(), "authorization");
        assert_eq!(config.policy.default_action(), DefaultAction::Allow);
        let compiled = config.authz().compile().expect("compiles");
        assert!(
            compiled.policies.contains_key("ledger"),
            "compiled into authz"
        );

        let mut strict = base();
        strict.policy.default = Some(DefaultAction::Deny);
        strict.authorization = config.authorization.clone();
        let (config, refused) = merge(&strict, &d.objects());
        assert_eq!(
            config.policy.default_action(),
            DefaultAction::Deny,
            "file wins"
        );
        assert!(
            refused
                .iter()
                .any(|e| e.to_string().contains("file's definition wins")),
            "same policy name as the file: {refused:?}"
        );
        assert_eq!(
            merge(&base(), &MeshObjects::default())
                .0
                .policy
                .default_action(),
            DefaultAction::Deny,
            "neither: the built-in deny"
        );
        let e = check_apply(&base(), &MeshObjects::default(), &d).expect_err("refused");
        assert!(e.to_string().contains("authorization[1].service"), "{e}");
    }

    #[test]
    fn merging_in_halves_refuses_what_one_by_one_refuses() {
        // Every 37th service reuses an earlier one's VIP, every 53rd has a bad namespace.
        let mut objects = MeshObjects::default();
        for i in 0..400u32 {
            let name = format!("svc-{i:03}");
            let vip_of = if i % 37 == 36 { i - 30 } else { i };
            let namespace = if i % 53 == 52 { "Bad_NS" } else { "shop" };
            let yaml = format!(
                "name: {name}\nnamespace: {namespace}\nvip: 10.97.{}.{}:80\n",
                vip_of / 200,
                vip_of % 200 + 1
            );
            let service: Service = serde_yaml::from_str(&yaml).expect("service");
            objects.services.insert(name, service);
        }
        let (config, refused) = merge(&base(), &objects);

        // The rule as it reads: each object in key order, checked against those before it.
        let mut one_by_one = base();
        let mut expected = Vec::new();
        for (name, service) in &objects.services {
            one_by_one.services.push(service.clone());
            if let Err(e) = config::validate(&one_by_one) {
                one_by_one.services.pop();
                expected.push(format!("registry service {name:?}: {e}"));
            }
        }
        let errors: Vec<String> = refused.iter().map(ToString::to_string).collect();
        assert_eq!(errors, expected);
        assert_eq!(errors.len(), 10 + 7, "{errors:#?}");
        assert!(errors[0].contains("\"svc-036\"") && errors[0].contains(".vip`"));
        assert!(errors[1].contains("\"svc-052\"") && errors[1].contains(".namespace`"));
        assert_eq!(config.services, one_by_one.services);
    }

    #[test]
    fn a_service_goes_with_the_policies_that_protect_it_and_no_others() {
        let d = doc("services:\n  - {name: ledger, vip: 10.96.0.6:80}\n  \
                     - {name: audit, vip: 10.96.0.7:80}\n\
                     authorization:\n  \
                     - {name: ledger-callers, service: ledger, allow: [{from_service: wallet}]}\n  \
                     - {name: ledger-admins, service: ledger, allow: [{from_service: audit}]}\n  \
                     - {name: audit-callers, service: audit, allow: [{from_service: ledger}]}\n");
        let objects = d.objects();
        let gone = objects.service_with_its_policies("ledger");
        assert_eq!(gone.services.keys().collect::<Vec<_>>(), ["ledger"]);
        assert_eq!(
            gone.authorization.keys().collect::<Vec<_>>(),
            ["ledger-admins", "ledger-callers"],
            "a policy only calling from ledger stays"
        );
        assert_eq!(
            objects.service_with_its_policies("wallet"),
            MeshObjects::default(),
            "not a registry service: nothing"
        );

        let mut left = objects.clone();
        left.services.retain(|k, _| !gone.services.contains_key(k));
        left.authorization
            .retain(|k, _| !gone.authorization.contains_key(k));
        let (_, refused) = merge(&base(), &left);
        assert!(
            refused.is_empty(),
            "nothing left naming ledger: {refused:?}"
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = MeshDocument::parse("services:\n  - {name: a, vip: 10.96.0.9:80, vips: 1}\n")
            .expect_err("unknown field");
        assert!(e.to_string().contains("services[0]"), "{e}");
    }
}
