//! `egress`: which non-mesh destinations meshed workloads may reach (seed 001 §14.4: no egress
//! without permission). Everything else a workload connects to outside the mesh is refused in
//! the kernel (EPERM) and counted per identity.
//!
//! ```yaml
//! egress:
//!   dns: ["10.96.0.10:53"]          # the cluster DNS resolver, open to every workload
//!   rules:
//!     - {name: github, cidr: 140.82.112.0/20, ports: [443], from_namespace: ci}
//!     - {name: metrics, cidr: 10.20.0.0/16, from: ops/scraper}   # no ports: every port
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Cluster DNS resolvers: every workload may reach these (TCP and UDP).
    #[serde(default = "default_dns")]
    pub dns: Vec<SocketAddrV4>,
    #[serde(default)]
    pub rules: Vec<EgressRuleConfig>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            dns: default_dns(),
            rules: Vec::new(),
        }
    }
}

/// Kubernetes' default cluster DNS service address.
fn default_dns() -> Vec<SocketAddrV4> {
    vec![SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53)]
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRuleConfig {
    pub name: String,
    /// IPv4 network, e.g. `10.20.0.0/16` (a bare address means /32).
    pub cidr: String,
    /// Allowed destination ports; empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Only this identity (`<namespace>/<service-account>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Only workloads of this namespace. Neither `from` nor `from_namespace`: every workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_namespace: Option<String>,
}

impl EgressRuleConfig {
    /// Whether the rule applies to the identity `<namespace>/<service-account>`.
    pub fn applies_to(&self, identity: &str) -> bool {
        let namespace = identity.split_once('/').map_or(identity, |(ns, _)| ns);
        match (&self.from, &self.from_namespace) {
            (Some(id), _) => id == identity,
            (None, Some(ns)) => ns == namespace,
            (None, None) => true,
        }
    }
}

/// Parses `a.b.c.d/n` (or a bare address, /32) into the network address and prefix length.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (
            a,
            l.parse::<u8>()
                .map_err(|_| "prefix length must be 0-32".to_owned())?,
        ),
        None => (text, 32),
    };
    if len > 32 {
        return Err("prefix length must be 0-32".to_owned());
    }
    let ip: Ipv4Addr = addr
        .parse()
        .map_err(|_| "not an IPv4 address or CIDR like 10.0.0.0/8".to_owned())?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    if u32::from(ip) & !mask != 0 {
        return Err(format!(
            "host bits set; the network is {}/{len}",
            Ipv4Addr::from(u32::from(ip) & mask)
        ));
    }
    Ok((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_rejects_host_bits_and_bad_lengths() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok((Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(parse_cidr("10.1.2.3"), Ok((Ipv4Addr::new(10, 1, 2, 3), 32)));
        assert_eq!(parse_cidr("0.0.0.0/0"), Ok((Ipv4Addr::UNSPECIFIED, 0)));
        assert!(parse_cidr("10.0.0.1/8")
            .expect_err("host bits")
            .contains("10.0.0.0/8"));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nonsense").is_err());
    }

    #[test]
    fn rules_apply_by_identity_namespace_or_to_all() {
        let rule = |from: Option<&str>, ns: Option<&str>| EgressRuleConfig {
            name: "r".into(),
            cidr: "10.0.0.0/8".into(),
            ports: vec![],
            from: from.map(Into::into),
            from_namespace: ns.map(Into::into),
        };
        assert!(rule(None, None).applies_to("a/b"));
        assert!(rule(Some("a/b"), None).applies_to("a/b"));
        assert!(!rule(Some("a/b"), None).applies_to("a/c"));
        assert!(rule(None, Some("a")).applies_to("a/c"));
        assert!(!rule(None, Some("a")).applies_to("x/c"));
    }
}
