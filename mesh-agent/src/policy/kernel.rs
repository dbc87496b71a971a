//! Compiles authorization into the kernel's connect() decision for the identities on this node,
//! so a caller outside a service's allow-list gets EPERM at the source. The destination agent
//! still checks the mTLS identity; both decide from the same [`Authorizer`], so they agree.
//!
//! Per service: a default-deny service (no policy and mesh default deny, or a policy whose
//! default is deny) gets the DEFAULT_DENY flag and one ALLOW entry per local identity it admits;
//! a default-allow service gets one DENY entry per local identity it refuses. `policy.deny`
//! entries (kernel-only rules) come first and win.

use std::collections::{BTreeMap, BTreeSet};

use mesh_common::deny::DenyRule;

use crate::config::Config;
use crate::identity::SpiffeId;
use crate::policy::authz::Authorizer;
use crate::policy::deny;
use crate::registry::MeshModel;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    /// (identity id, service id) -> the rule refusing it.
    pub deny: BTreeMap<(u32, u32), DenyRule>,
    /// (identity id, service id) pairs a default-deny service admits.
    pub allow: BTreeSet<(u32, u32)>,
    /// Service ids whose callers are exactly their ALLOW entries.
    pub default_deny: BTreeSet<u32>,
}

impl KernelPolicy {
    /// The kernel's decision, as the connect4 program takes it.
    pub fn allows(&self, identity: u32, service: u32) -> bool {
        let flags = if self.default_deny.contains(&service) {
            mesh_common::services::ServiceValue::DEFAULT_DENY
        } else {
            0
        };
        mesh_common::deny::kernel_allows(
            self.deny.contains_key(&(identity, service)),
            flags,
            self.allow.contains(&(identity, service)),
        )
    }
}

pub fn compile(config: &Config, model: &MeshModel) -> KernelPolicy {
    let mut policy = KernelPolicy {
        deny: deny::compile(config, model),
        ..Default::default()
    };
    let authz = match Authorizer::new(&config.authz()) {
        Ok(a) => a,
        Err(e) => {
            // Validation rejects such a config before it gets here; if one slips through, the
            // kernel refuses every mesh connect rather than guess.
            tracing::error!(error = %e, "authorization does not compile; refusing every service in the kernel");
            policy.default_deny = model.services.values().map(|s| s.id).collect();
            return policy;
        }
    };
    let callers: Vec<(u32, SpiffeId, Option<&str>)> = model
        .identities
        .iter()
        .filter_map(|(key, &id)| {
            let (ns, sa) = key.split_once('/')?;
            let spiffe = SpiffeId::new(&config.node.trust_domain, ns, sa).ok()?;
            let service = model.identity_services.get(key).map(String::as_str);
            Some((id, spiffe, service))
        })
        .collect();
    for service in model.services.values() {
        let default_allow = authz.default_allows(&service.name);
        if !default_allow {
            policy.default_deny.insert(service.id);
        }
        for (identity, spiffe, caller_service) in &callers {
            let pair = (*identity, service.id);
            if policy.deny.contains_key(&pair) {
                continue;
            }
            let allowed = authz
                .evaluate(spiffe, *caller_service, &service.name)
                .allowed;
            match (allowed, default_allow) {
                (true, false) => {
                    policy.allow.insert(pair);
                }
                (false, true) => {
                    policy
                        .deny
                        .insert(pair, DenyRule::new(DenyRule::AUTHORIZATION));
                }
                _ => {}
            }
        }
    }
    policy
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NAMESPACES: [&str; 2] = ["a", "b"];
    const SERVICES: [&str; 4] = ["s0", "s1", "s2", "s3"];

    /// One caller rule in the `authorization` syntax.
    fn rule() -> impl Strategy<Value = String> {
        prop_oneof![
            (0..2usize, 0..4usize).prop_map(|(n, a)| format!(
                "{{from: \"spiffe://cluster.local/ns/{}/sa/w{a}\"}}",
                NAMESPACES[n]
            )),
            (0..4usize).prop_map(|s| format!("{{from_service: {}}}", SERVICES[s])),
            (0..2usize).prop_map(|n| format!("{{from_namespace: {}}}", NAMESPACES[n])),
        ]
    }

    /// One caller entry in the seed's per-service form.
    fn entry() -> impl Strategy<Value = String> {
        prop_oneof![
            (0..2usize, 0..4usize).prop_map(|(n, a)| format!(
                "\"spiffe://cluster.local/ns/{}/sa/w{a}\"",
                NAMESPACES[n]
            )),
            (0..4usize).prop_map(|s| SERVICES[s].to_owned()),
            (0..2usize).prop_map(|n| format!("\"namespace:{}\"", NAMESPACES[n])),
        ]
    }

    /// How one service is protected: not at all, an `authorization` entry, or `policy:` on it.
    #[derive(Debug, Clone)]
    enum Protection {
        None,
        Authorization {
            default: Option<bool>,
            allow: Vec<String>,
            deny: Vec<String>,
            capability: bool,
        },
        ServicePolicy {
            allow: Vec<String>,
            deny: Vec<String>,
        },
    }

    fn protection() -> impl Strategy<Value = Protection> {
        prop_oneof![
            Just(Protection::None),
            (
                proptest::option::of(any::<bool>()),
                proptest::collection::vec(rule(), 0..3),
                proptest::collection::vec(rule(), 0..2),
                any::<bool>()
            )
                .prop_map(|(default, allow, deny, capability)| {
                    Protection::Authorization {
                        default,
                        allow,
                        deny,
                        capability,
                    }
                }),
            (
                proptest::collection::vec(entry(), 0..3),
                proptest::collection::vec(entry(), 0..2)
            )
                .prop_map(|(allow, deny)| Protection::ServicePolicy { allow, deny }),
        ]
    }

    #[derive(Debug, Clone)]
    struct Mesh {
        /// (namespace index, account index, served service index) per workload.
        workloads: Vec<(usize, usize, usize)>,
        protections: Vec<Protection>,
        mesh_allow: bool,
        /// (from workload index or None for `*`, to service index or None for `*`).
        kernel_deny: Vec<(Option<usize>, Option<usize>)>,
        /// Workload indexes granted the capability.
        granted: Vec<usize>,
    }

    fn mesh() -> impl Strategy<Value = Mesh> {
        (
            proptest::collection::vec((0..2usize, 0..4usize, 0..4usize), 1..6),
            proptest::collection::vec(protection(), 4),
            any::<bool>(),
            proptest::collection::vec(
                (
                    proptest::option::of(0..6usize),
                    proptest::option::of(0..4usize),
                ),
                0..3,
            ),
            proptest::collection::vec(0..6usize, 0..3),
        )
            .prop_map(
                |(workloads, protections, mesh_allow, kernel_deny, granted)| Mesh {
                    workloads,
                    protections,
                    mesh_allow,
                    kernel_deny,
                    granted,
                },
            )
    }

    fn yaml(m: &Mesh) -> String {
        let mut y = String::from("node: {name: n1, agent_ip: 10.1.255.1}\nservices:\n");
        for (i, name) in SERVICES.iter().enumerate() {
            y += &format!("  - name: {name}\n    vip: 10.96.0.{}:80\n", i + 1);
            if let Protection::ServicePolicy { allow, deny } = &m.protections[i] {
                y += &format!(
                    "    policy: {{allow: [{}], deny: [{}]}}\n",
                    allow.join(", "),
                    deny.join(", ")
                );
            }
        }
        y += "workloads:\n";
        for (i, (ns, account, serves)) in m.workloads.iter().enumerate() {
            y += &format!(
                "  - {{name: p{i}, namespace: {}, service_account: w{account}, cgroup: pods/p{i}, service: {}}}\n",
                NAMESPACES[*ns], SERVICES[*serves]
            );
        }
        let default = if m.mesh_allow { "allow" } else { "deny" };
        y += &format!("policy:\n  default: {default}\n  deny:\n");
        for (i, (from, to)) in m.kernel_deny.iter().enumerate() {
            let from = match from.and_then(|w| m.workloads.get(w)) {
                Some((ns, account, _)) => format!("{}/w{account}", NAMESPACES[*ns]),
                None => "\"*\"".to_owned(),
            };
            let to = to.map_or("\"*\"".to_owned(), |s| SERVICES[s].to_owned());
            y += &format!("    - {{name: d{i}, from: {from}, to: {to}}}\n");
        }
        if m.kernel_deny.is_empty() {
            y += "    []\n";
        }
        y += "authorization:\n";
        let mut any = false;
        for (i, p) in m.protections.iter().enumerate() {
            if let Protection::Authorization {
                default,
                allow,
                deny,
                capability,
            } = p
            {
                any = true;
                y += &format!(
                    "  - name: p{i}\n    service: {}\n    allow: [{}]\n    deny: [{}]\n",
                    SERVICES[i],
                    allow.join(", "),
                    deny.join(", ")
                );
                if let Some(d) = default {
                    y += &format!("    default: {}\n", if *d { "allow" } else { "deny" });
                }
                if *capability {
                    y += "    capabilities: {required: [cap.x]}\n";
                }
            }
        }
        if !any {
            y += "  []\n";
        }
        y += "service_keys:\n";
        let granted: Vec<_> = m
            .granted
            .iter()
            .filter_map(|w| m.workloads.get(*w))
            .collect();
        for (ns, account, _) in &granted {
            y += &format!(
                "  - {{identity: \"spiffe://cluster.local/ns/{}/sa/w{account}\", capabilities: [cap.x]}}\n",
                NAMESPACES[*ns]
            );
        }
        if granted.is_empty() {
            y += "  []\n";
        }
        y
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// For every (identity, service) pair, the kernel's connect() decision (the maps this
        /// module compiles, read by the same `kernel_allows` the eBPF program calls) equals the
        /// userspace decision: the authorizer's verdict and no `policy.deny` rule.
        #[test]
        fn kernel_and_userspace_decisions_agree(m in mesh()) {
            let text = yaml(&m);
            let config = crate::config::parse(&text, "proptest", &|_| None)
                .unwrap_or_else(|e| panic!("generated config rejected: {e}\n{text}"));
            let model = MeshModel::build(&config, None);
            let kernel = compile(&config, &model);
            let authz = Authorizer::new(&config.authz()).expect("compiles");
            let kernel_only = deny::compile(&config, &model);
            for (key, &identity) in &model.identities {
                let (ns, sa) = key.split_once('/').expect("ns/sa");
                let id = SpiffeId::new("cluster.local", ns, sa).expect("id");
                let caller_service = model.identity_services.get(key).map(String::as_str);
                for service in model.services.values() {
                    let userspace = authz.evaluate(&id, caller_service, &service.name).allowed
                        && !kernel_only.contains_key(&(identity, service.id));
                    prop_assert_eq!(
                        kernel.allows(identity, service.id),
                        userspace,
                        "{} -> {}\n{}", key, service.name, text
                    );
                }
            }
        }
    }

    #[test]
    fn default_deny_service_admits_exactly_its_allow_list() {
        let text = "node: {name: n1, agent_ip: 10.1.255.1}\n\
            services:\n  - {name: wallet, vip: 10.96.0.1:80, policy: {allow: [checkout]}}\n  - {name: open, vip: 10.96.0.2:80}\n\
            workloads:\n  - {name: checkout, service_account: checkout, cgroup: pods/c}\n  - {name: web, service_account: web, cgroup: pods/w}\n";
        let config = crate::config::parse(text, "t", &|_| None).expect("valid");
        let model = MeshModel::build(&config, None);
        let kernel = compile(&config, &model);
        let id = |k: &str| model.identities[k];
        let svc = |s: &str| model.services[s].id;
        assert!(kernel.allows(id("default/checkout"), svc("wallet")));
        assert!(!kernel.allows(id("default/web"), svc("wallet")));
        assert!(
            !kernel.allows(id("default/checkout"), svc("open")),
            "no policy: mesh default deny"
        );
        assert!(kernel.default_deny.contains(&svc("open")));
    }
}
