//! One-line summary of what a reload changed, by name: `services +cart ~echo; workloads -old`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::config::Config;

/// Added, removed and changed entries of one named list.
fn diff<T: Serialize>(
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> String,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let index = |items: &[T]| -> BTreeMap<String, String> {
        items
            .iter()
            .map(|i| (name(i), serde_json::to_string(i).unwrap_or_default()))
            .collect()
    };
    let (old, new) = (index(old), index(new));
    let added = new
        .keys()
        .filter(|k| !old.contains_key(*k))
        .cloned()
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k.clone())
        .collect();
    (added, removed, changed)
}

fn section(
    out: &mut Vec<String>,
    label: &str,
    (added, removed, changed): (Vec<String>, Vec<String>, Vec<String>),
) {
    let mut text = String::new();
    for (sign, names) in [("+", added), ("-", removed), ("~", changed)] {
        for n in names {
            let _ = write!(text, " {sign}{n}");
        }
    }
    if !text.is_empty() {
        out.push(format!("{label}{text}"));
    }
}

/// What differs between two configs, e.g. `services +cart ~echo; deny rules -no-x; proxy changed`,
/// or `no changes`.
pub fn summary(old: &Config, new: &Config) -> String {
    let mut out = Vec::new();
    section(
        &mut out,
        "services",
        diff(&old.services, &new.services, |s| s.name.clone()),
    );
    section(
        &mut out,
        "workloads",
        diff(&old.workloads, &new.workloads, |w| w.name.clone()),
    );
    section(
        &mut out,
        "deny rules",
        diff(&old.policy.deny, &new.policy.deny, |r| r.name.clone()),
    );
    section(
        &mut out,
        "authorization",
        diff(&old.authorization, &new.authorization, |p| p.name.clone()),
    );
    section(
        &mut out,
        "service keys",
        diff(&old.service_keys, &new.service_keys, |k| k.identity.clone()),
    );
    section(
        &mut out,
        "nodes",
        diff(&old.nodes, &new.nodes, |n| n.name.clone()),
    );
    let blocks = [
        ("node", old.node != new.node),
        ("proxy", old.proxy != new.proxy),
        (
            "policy.strict_default",
            old.policy.strict_default != new.policy.strict_default,
        ),
    ];
    for (name, changed) in blocks {
        if changed {
            out.push(format!("{name} changed"));
        }
    }
    if out.is_empty() {
        "no changes".to_owned()
    } else {
        out.join("; ")
    }
}

/// Counts for the start-up log line.
pub fn counts(config: &Config) -> String {
    format!(
        "{} services, {} workloads, {} deny rules, {} authorization policies, {} nodes",
        config.services.len(),
        config.workloads.len(),
        config.policy.deny.len(),
        config.authorization.len(),
        config.nodes.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        crate::config::parse(text, "test", &|_| None).expect("valid config")
    }

    const BASE: &str = "
node: {name: n1, agent_ip: 10.0.0.1}
services:
  - {name: echo, vip: 10.96.0.1:80, endpoints: [10.1.0.2:8080]}
  - {name: old, vip: 10.96.0.2:80}
workloads:
  - {name: client, service_account: client, cgroup: /a}
";

    #[test]
    fn names_what_was_added_removed_and_changed() {
        let old = parse(BASE);
        let new = parse(
            "
node: {name: n1, agent_ip: 10.0.0.1}
proxy: {connect_timeout: 1s}
services:
  - {name: echo, vip: 10.96.0.1:80, endpoints: [10.1.0.3:8080]}
  - {name: cart, vip: 10.96.0.3:80}
workloads:
  - {name: client, service_account: client, cgroup: /a}
policy:
  deny: [{name: no-client, from: default/client, to: cart}]
",
        );
        assert_eq!(
            summary(&old, &new),
            "services +cart -old ~echo; deny rules +no-client; proxy changed"
        );
        assert_eq!(summary(&old, &old), "no changes");
        assert_eq!(
            counts(&new),
            "2 services, 1 workloads, 1 deny rules, 0 authorization policies, 0 nodes"
        );
    }
}
