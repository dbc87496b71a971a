//! Applies a validated config to the kernel: resolve cgroups, attach, sync maps. Either all of it
//! takes effect or the previous state stays in force.

use std::collections::HashMap;
use std::net::SocketAddrV4;

use mesh_common::addr::ip4_to_raw;
use mesh_common::deny::{AllowEntry, DenyKey};
use mesh_common::services::{AgentAddr, ServiceKey, ServiceValue};
use mesh_common::workloads::WorkloadIdentity;
use thiserror::Error;

use crate::config::Config;
use crate::ebpf::{DesiredMaps, EbpfError, SyncStats};
use crate::policy::kernel;
use crate::registry::model::ModelIds;
use crate::registry::MeshModel;
use crate::state::Kernel;

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("config field `workloads[{index}].cgroup`: {source}")]
    Cgroup { index: usize, source: EbpfError },
    #[error(transparent)]
    Kernel(#[from] EbpfError),
}

/// Whether a workload runs in strict mode: its own setting, else the policy default; a service
/// with `policy.mTLS: required` makes the workloads serving it strict in any case.
fn strict(config: &Config, w: &crate::config::Workload) -> bool {
    let mtls_required = config.services.iter().any(|s| {
        s.name == w.service_name() && s.policy.as_ref().is_some_and(|p| p.requires_mtls())
    });
    mtls_required || w.is_strict(&config.policy)
}

pub fn desired_maps(config: &Config, model: &MeshModel, cgroup_ids: &[u64]) -> DesiredMaps {
    let workloads = config
        .workloads
        .iter()
        .zip(cgroup_ids)
        .map(|(w, id)| {
            let identity = WorkloadIdentity::new(model.identities[&w.identity()]);
            (*id, identity.with_strict(strict(config, w)))
        })
        .collect();
    let policy = kernel::compile(config, model);
    // Each service's VIP and every endpoint address: a caller dialing a pod IP directly meets
    // the same allow/deny decision (and capture) as one dialing the VIP. SERVICES holds the VIPs
    // and the config's endpoints; registry endpoints go to ENDPOINTS (see [`endpoint_entries`]).
    // An address two services share keeps the first service's id (by name); VIPs win over
    // endpoints.
    let mut services: HashMap<ServiceKey, ServiceValue> = HashMap::new();
    for s in model.services.values() {
        let value = ServiceValue::new(s.id).with_default_deny(policy.default_deny.contains(&s.id));
        services.insert(service_key(s.vip), value);
    }
    let configured: HashMap<&str, &crate::config::Service> = config
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    for s in model.services.values() {
        let value = ServiceValue::new(s.id).with_default_deny(policy.default_deny.contains(&s.id));
        for e in configured
            .get(s.name.as_str())
            .map_or(&[][..], |c| &c.endpoints)
        {
            services.entry(service_key(e.address())).or_insert(value);
        }
    }
    // The registry API port: connect4 records the caller's identity for it (not redirected,
    // open to every workload).
    if let std::net::SocketAddr::V4(registry) = config.registry_addr() {
        services.insert(
            service_key(registry),
            ServiceValue::new(mesh_common::services::REGISTRY_SERVICE),
        );
    }
    let endpoints = endpoint_entries(model, &services);
    let deny: HashMap<_, _> = policy
        .deny
        .iter()
        .map(|(&(i, s), v)| (DenyKey::new(i, s), *v))
        .collect();
    let allow: HashMap<_, _> = policy
        .allow
        .iter()
        .map(|&(i, s)| (DenyKey::new(i, s), AllowEntry::new()))
        .collect();
    let agent = AgentAddr::new(
        ip4_to_raw(config.node.agent_ip.octets()),
        config.listen.outbound.port(),
        config.listen.outbound_port_count(),
    );
    let egress =
        crate::policy::egress::kernel_entries(&crate::policy::egress::compile(config, model))
            .into_iter()
            .collect();
    DesiredMaps {
        workloads,
        services,
        endpoints,
        deny,
        allow,
        egress,
        agent,
    }
}

fn service_key(addr: SocketAddrV4) -> ServiceKey {
    ServiceKey::new(ip4_to_raw(addr.ip().octets()), addr.port())
}

/// The ENDPOINTS entries for `model`: every endpoint address SERVICES does not already hold,
/// with the value (id, default-deny flag) of its service's VIP entry. Endpoint churn recomputes
/// only this, from the SERVICES entries last synced: no policy is recompiled.
pub fn endpoint_entries(
    model: &MeshModel,
    services: &HashMap<ServiceKey, ServiceValue>,
) -> HashMap<ServiceKey, ServiceValue> {
    let mut entries = HashMap::new();
    for s in model.services.values() {
        let Some(value) = services
            .get(&service_key(s.vip))
            .filter(|v| v.service == s.id)
        else {
            continue;
        };
        for e in &s.endpoints {
            let key = service_key(e.addr);
            if !services.contains_key(&key) {
                entries.entry(key).or_insert(*value);
            }
        }
    }
    entries
}

/// Resolves every workload cgroup, naming the first one that does not exist.
fn resolve(kernel: &Kernel, config: &Config) -> Result<Vec<(std::path::PathBuf, u64)>, ApplyError> {
    config
        .workloads
        .iter()
        .enumerate()
        .map(|(index, w)| {
            kernel
                .ebpf
                .resolve_cgroup(&w.cgroup)
                .map_err(|source| ApplyError::Cgroup { index, source })
        })
        .collect()
}

/// The ids an earlier agent left in the kernel maps for the names in `config`, so that a
/// restarted agent keeps them (in-flight ORIG_DST entries and counters keep their meaning, and a
/// draining old agent and the new one agree on every id).
pub fn kernel_ids(kernel: &Kernel, config: &Config) -> ModelIds {
    let mut ids = ModelIds::default();
    for w in &config.workloads {
        let id = kernel
            .ebpf
            .resolve_cgroup(&w.cgroup)
            .ok()
            .and_then(|(_, cgroup)| kernel.maps.workload_identity(cgroup));
        if let Some(id) = id {
            ids.identities.entry(w.identity()).or_insert(id);
        }
    }
    for s in &config.services {
        if let Some(id) = kernel.maps.service_id(&service_key(s.vip)) {
            ids.services.insert(s.name.clone(), id);
        }
    }
    ids
}

/// Applies `config`; on a failure after attaching, re-applies `previous` so nothing is half-done.
pub fn apply(
    kernel: &mut Kernel,
    config: &Config,
    model: &MeshModel,
    previous: Option<(&Config, &MeshModel)>,
) -> Result<SyncStats, ApplyError> {
    let resolved = resolve(kernel, config)?;
    let ids: Vec<u64> = resolved.iter().map(|(_, id)| *id).collect();
    let desired = desired_maps(config, model, &ids);
    // Maps first: a newly attached cgroup must find its identity the moment programs run.
    match kernel.maps.sync(&desired) {
        Ok(stats) => match kernel.ebpf.attach_to(&resolved) {
            Ok(()) => Ok(stats),
            Err(e) => {
                rollback(kernel, previous);
                Err(e.into())
            }
        },
        Err(e) => {
            rollback(kernel, previous);
            Err(e.into())
        }
    }
}

fn rollback(kernel: &mut Kernel, previous: Option<(&Config, &MeshModel)>) {
    let Some((config, model)) = previous else {
        return;
    };
    let result = resolve(kernel, config)
        .map_err(|e| e.to_string())
        .and_then(|resolved| {
            let ids: Vec<u64> = resolved.iter().map(|(_, id)| *id).collect();
            kernel
                .maps
                .sync(&desired_maps(config, model, &ids))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::error!(error = %e, "restoring the previous kernel state failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config endpoints go to SERVICES; registry-only endpoints to ENDPOINTS with their
    /// service's id and default-deny flag, and only they change when the registry does.
    #[test]
    fn registry_endpoints_go_to_their_own_map() {
        let yaml = "node: {name: n1, agent_ip: 10.1.255.1}\n\
            services:\n  - {name: wallet, vip: 10.96.0.5:80, endpoints: [\"10.1.1.9:80\"]}\n";
        let config = crate::config::parse(yaml, "test", &|_| None).expect("config");
        let mut model = MeshModel::build(&config, None);
        let static_only = desired_maps(&config, &model, &[]);
        let wallet = model.services.get_mut("wallet").expect("wallet");
        let id = wallet.id;
        let mut registered = wallet.endpoints[0].clone();
        registered.addr = "10.1.1.10:8080".parse().expect("addr");
        wallet.endpoints.push(registered);
        let desired = desired_maps(&config, &model, &[]);
        assert_eq!(desired.services, static_only.services, "SERVICES unchanged");
        assert!(desired
            .services
            .contains_key(&service_key("10.1.1.9:80".parse().expect("addr"))));
        let key = service_key("10.1.1.10:8080".parse().expect("addr"));
        let value = desired.endpoints[&key];
        assert_eq!(desired.endpoints.len(), 1);
        assert_eq!(value.service, id);
        assert_eq!(value.flags, ServiceValue::DEFAULT_DENY, "mesh default deny");
        assert_eq!(
            endpoint_entries(&model, &desired.services),
            desired.endpoints,
            "churn computes the same entries from the synced SERVICES"
        );
    }

    fn config(strict_default: bool) -> Config {
        let yaml = format!(
            "node: {{name: n1, agent_ip: 10.1.255.1}}\n\
             workloads:\n\
             \x20 - {{name: a, service_account: a, cgroup: pods/a}}\n\
             \x20 - {{name: b, service_account: b, cgroup: pods/b, strict: true}}\n\
             \x20 - {{name: c, service_account: c, cgroup: pods/c, strict: false}}\n\
             policy: {{strict_default: {strict_default}}}\n"
        );
        crate::config::parse(&yaml, "test", &|_| None).expect("valid config")
    }

    /// (cgroup id, identity id, strict) as the WORKLOADS map would hold them, sorted.
    fn flags(config: &Config) -> Vec<(u64, u32, bool)> {
        let model = MeshModel::build(config, None);
        let desired = desired_maps(config, &model, &[11, 12, 13]);
        let mut out: Vec<_> = desired
            .workloads
            .iter()
            .map(|(cg, w)| (*cg, w.identity, w.is_strict()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn strict_flag_follows_workload_then_policy_default() {
        let off = config(false);
        let model = MeshModel::build(&off, None);
        let id = |name: &str| model.identities[&format!("default/{name}")];
        assert_eq!(
            flags(&off),
            vec![
                (11, id("a"), false),
                (12, id("b"), true),
                (13, id("c"), false)
            ]
        );
        assert_eq!(
            flags(&config(true)),
            vec![
                (11, id("a"), true),
                (12, id("b"), true),
                (13, id("c"), false)
            ]
        );
        let strict = desired_maps(&off, &model, &[11, 12, 13]).workloads[&12];
        assert_eq!(strict.flags, WorkloadIdentity::STRICT);
    }
}
