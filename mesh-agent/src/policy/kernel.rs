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
