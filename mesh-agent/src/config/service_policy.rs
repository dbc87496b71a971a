//! The per-service `policy` block (`services[].policy`), written the way seed 001 §18 writes it:
//!
//! ```yaml
//! services:
//!   - name: wallet
//!     vip: 10.96.0.20:80
//!     policy:
//!       allow: [orders, "spiffe://cluster.local/ns/shop/sa/checkout", "namespace:ops"]
//!       deny: [ads]
//!       mTLS: required
//! ```
//!
//! Authorization fields only here; other policy kinds (traffic) join this struct. The service's
//! callers are exactly its allow-list: `allow` and `deny` compile into an `authorization` policy
//! for the service (checked by the destination agent) and into the kernel's ALLOW/DENY maps
//! (checked at connect() on the caller's node).

use serde::{Deserialize, Serialize};

use crate::policy::authz_config::{DefaultAction, PolicyConfig, RuleConfig};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    /// Callers admitted: a caller service name, a SPIFFE ID (`spiffe://...`) or
    /// `namespace:<ns>`. Non-empty: everyone else is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Callers refused, in the same forms; a deny beats an allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// `required`: the service is reached only through the mesh (mTLS between nodes, the agent
    /// on the node): its workloads run in strict mode.
    #[serde(default, alias = "mTLS", skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    Required,
}

/// Prefix of a namespace entry in `allow`/`deny`.
pub const NAMESPACE_PREFIX: &str = "namespace:";

impl ServicePolicy {
    /// Whether the block says anything about authorization.
    pub fn has_authorization(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }

    pub fn requires_mtls(&self) -> bool {
        self.mtls == Some(MtlsMode::Required)
    }

    /// The equivalent `authorization` entry for `service`. With an allow-list the default is
    /// deny; with only a deny-list it is the mesh default.
    pub fn to_authorization(&self, service: &str, mesh_default: DefaultAction) -> PolicyConfig {
        PolicyConfig {
            name: format!("{service}.policy"),
            service: service.to_owned(),
            default: Some(if self.allow.is_empty() {
                mesh_default
            } else {
                DefaultAction::Deny
            }),
            allow: self.allow.iter().map(|e| rule(e)).collect(),
            deny: self.deny.iter().map(|e| rule(e)).collect(),
            capabilities: None,
        }
    }
}

fn rule(entry: &str) -> RuleConfig {
    if entry.starts_with("spiffe://") {
        RuleConfig {
            from: Some(entry.to_owned()),
            ..Default::default()
        }
    } else if let Some(ns) = entry.strip_prefix(NAMESPACE_PREFIX) {
        RuleConfig {
            from_namespace: Some(ns.to_owned()),
            ..Default::default()
        }
    } else {
        RuleConfig {
            from_service: Some(entry.to_owned()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_map_to_identity_namespace_or_service_rules() {
        let p = ServicePolicy {
            allow: vec![
                "orders".into(),
                "spiffe://cluster.local/ns/shop/sa/checkout".into(),
                "namespace:ops".into(),
            ],
            deny: vec!["ads".into()],
            mtls: Some(MtlsMode::Required),
        };
        let a = p.to_authorization("wallet", DefaultAction::Allow);
        assert_eq!(
            a.default,
            Some(DefaultAction::Deny),
            "allow-list: default deny"
        );
        assert_eq!(a.allow[0].from_service.as_deref(), Some("orders"));
        assert_eq!(
            a.allow[1].from.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/checkout")
        );
        assert_eq!(a.allow[2].from_namespace.as_deref(), Some("ops"));
        assert_eq!(a.deny[0].from_service.as_deref(), Some("ads"));
        assert!(p.requires_mtls());
        let deny_only = ServicePolicy {
            deny: vec!["ads".into()],
            ..Default::default()
        };
        assert_eq!(
            deny_only
                .to_authorization("w", DefaultAction::Allow)
                .default,
            Some(DefaultAction::Allow),
            "deny-list only: mesh default"
        );
    }

    #[test]
    fn seed_spelling_is_accepted() {
        let p: ServicePolicy =
            serde_yaml::from_str("allow: [a]\ndeny: [b]\nmTLS: required\n").expect("seed form");
        assert!(p.requires_mtls());
        assert!(serde_yaml::from_str::<ServicePolicy>("mtls: optional\n").is_err());
        assert!(serde_yaml::from_str::<ServicePolicy>("alow: [a]\n").is_err());
    }
}
