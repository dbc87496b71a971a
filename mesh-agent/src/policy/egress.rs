//! Compiles `egress` into the kernel's EGRESS trie for the identities on this node. The kernel
//! finds only the longest matching prefix, so each entry also carries the ports of every shorter
//! entry of the same identity that covers it.

use std::collections::{BTreeMap, BTreeSet};

use mesh_common::addr::ip4_to_raw;
use mesh_common::egress::{EgressData, EgressPorts, IDENTITY_BITS, MAX_EGRESS_PORTS};

use crate::config::{egress::parse_cidr, Config};
use crate::registry::MeshModel;

/// Allowed ports of one entry; None: every port.
type Ports = Option<BTreeSet<u16>>;

/// (identity id, network as host-order u32, prefix length) -> ports.
pub type EgressTable = BTreeMap<(u32, u32, u8), Ports>;

pub fn compile(config: &Config, model: &MeshModel) -> EgressTable {
    let mut table: EgressTable = BTreeMap::new();
    let mut add = |key: (u32, u32, u8), ports: Ports| {
        let entry = table.entry(key).or_insert_with(|| Some(BTreeSet::new()));
        merge(entry, &ports);
    };
    for (identity, &id) in &model.identities {
        for dns in &config.egress.dns {
            add(
                (id, u32::from(*dns.ip()), 32),
                Some(BTreeSet::from([dns.port()])),
            );
        }
        for rule in config
            .egress
            .rules
            .iter()
            .filter(|r| r.applies_to(identity))
        {
            // Validation already parsed every CIDR.
            let Ok((net, len)) = parse_cidr(&rule.cidr) else {
                continue;
            };
            let ports = (!rule.ports.is_empty()).then(|| rule.ports.iter().copied().collect());
            add((id, u32::from(net), len), ports);
        }
    }
    // Longest match only in the kernel: fold covering entries' ports into each entry.
    let snapshot = table.clone();
    for ((id, net, len), ports) in table.iter_mut() {
        for ((other_id, other_net, other_len), other_ports) in &snapshot {
            if other_id == id && other_len < len && covers(*other_net, *other_len, *net) {
                merge(ports, other_ports);
            }
        }
    }
    table
}

fn merge(into: &mut Ports, from: &Ports) {
    match (into.as_mut(), from) {
        (_, None) => *into = None,
        (Some(set), Some(more)) => set.extend(more),
        (None, Some(_)) => {}
    }
}

fn covers(net: u32, len: u8, addr: u32) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    addr & mask == net
}

/// Trie entries as the kernel map holds them.
pub fn kernel_entries(table: &EgressTable) -> Vec<((u32, EgressData), EgressPorts)> {
    table
        .iter()
        .map(|((id, net, len), ports)| {
            let data = EgressData {
                identity: *id,
                ip: ip4_to_raw(net.to_be_bytes()),
            };
            let mut value = EgressPorts::default();
            match ports {
                None => value.any = 1,
                Some(set) => {
                    if set.len() > MAX_EGRESS_PORTS {
                        // Fail closed: the first ports are kept, the rest stays refused.
                        tracing::warn!(
                            identity = id,
                            ports = set.len(),
                            max = MAX_EGRESS_PORTS,
                            "egress entry lists too many ports; extra ports refused"
                        );
                    }
                    for (slot, port) in value.ports.iter_mut().zip(set) {
                        *slot = *port;
                        value.count += 1;
                    }
                }
            }
            ((IDENTITY_BITS + u32::from(*len), data), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(egress: &str) -> Config {
        let yaml = format!(
            "node: {{name: n1, agent_ip: 10.1.255.1}}\n\
             workloads:\n  - {{name: a, namespace: shop, service_account: a, cgroup: pods/a}}\n  - {{name: b, namespace: ops, service_account: b, cgroup: pods/b}}\n{egress}"
        );
        crate::config::parse(&yaml, "t", &|_| None).expect("valid")
    }

    /// The kernel decision: the longest matching entry for (identity, ip) allows the port.
    fn allows(table: &EgressTable, id: u32, ip: [u8; 4], port: u16) -> bool {
        let addr = u32::from_be_bytes(ip);
        table
            .iter()
            .filter(|((i, net, len), _)| *i == id && covers(*net, *len, addr))
            .max_by_key(|((_, _, len), _)| *len)
            .is_some_and(|(_, ports)| ports.as_ref().is_none_or(|p| p.contains(&port)))
    }

    #[test]
    fn dns_is_open_to_all_and_rules_follow_identity_and_namespace() {
        let c = config(
            "egress:\n  rules:\n    - {name: web, cidr: 140.82.112.0/20, ports: [443], from_namespace: shop}\n    - {name: all, cidr: 10.20.0.0/16, from: ops/b}\n",
        );
        let model = MeshModel::build(&c, None);
        let t = compile(&c, &model);
        let (a, b) = (model.identities["shop/a"], model.identities["ops/b"]);
        assert!(allows(&t, a, [10, 96, 0, 10], 53) && allows(&t, b, [10, 96, 0, 10], 53));
        assert!(!allows(&t, a, [10, 96, 0, 10], 80), "DNS port only");
        assert!(allows(&t, a, [140, 82, 113, 4], 443));
        assert!(!allows(&t, a, [140, 82, 113, 4], 80));
        assert!(!allows(&t, b, [140, 82, 113, 4], 443), "other namespace");
        assert!(allows(&t, b, [10, 20, 9, 9], 5432), "no ports: every port");
        assert!(!allows(&t, a, [10, 20, 9, 9], 5432));
        assert!(!allows(&t, a, [1, 1, 1, 1], 443), "no rule");
    }

    #[test]
    fn a_longer_prefix_keeps_the_ports_of_a_covering_one() {
        let c = config(
            "egress:\n  dns: []\n  rules:\n    - {name: wide, cidr: 10.0.0.0/8, ports: [443]}\n    - {name: narrow, cidr: 10.1.2.0/24, ports: [80]}\n",
        );
        let model = MeshModel::build(&c, None);
        let t = compile(&c, &model);
        let a = model.identities["shop/a"];
        assert!(allows(&t, a, [10, 1, 2, 3], 80));
        assert!(
            allows(&t, a, [10, 1, 2, 3], 443),
            "covering /8 port kept in the /24 entry"
        );
        assert!(!allows(&t, a, [10, 9, 2, 3], 80));
        let entries = kernel_entries(&t);
        let narrow = entries
            .iter()
            .find(|((len, _), _)| *len == IDENTITY_BITS + 24)
            .expect("narrow entry");
        assert_eq!(narrow.1.count, 2);
        assert_eq!(narrow.0 .1.ip, ip4_to_raw([10, 1, 2, 0]));
    }
}
