//! The config file's shape. Unknown fields are rejected so a typo never silently does nothing.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub policy: PolicyConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name, used in logs and metrics.
    pub name: String,
    /// Agent instance: its eBPF maps are pinned under `<bpffs>/nodemesh/<instance>`.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Address pods use to reach this agent; captured connects are rewritten to it.
    pub agent_ip: Ipv4Addr,
    /// SPIFFE trust domain of the mesh.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Path of the compiled eBPF object (default: next to the agent binary, then the build tree).
    #[serde(default)]
    pub ebpf_object: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    #[serde(default = "default_outbound")]
    pub outbound: SocketAddr,
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
    #[serde(default = "default_health")]
    pub health: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            outbound: default_outbound(),
            metrics: default_metrics(),
            health: default_health(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// How long connecting to an endpoint may take, e.g. "3s" or "500ms".
    #[serde(default = "default_connect_timeout", with = "duration_text")]
    pub connect_timeout: Duration,
    /// How often the config file is checked for changes ("0s" disables polling; SIGHUP still works).
    #[serde(default = "default_reload_poll", with = "duration_text")]
    pub reload_poll: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            reload_poll: default_reload_poll(),
        }
    }
}

/// A mesh service: a virtual IP:port that pods connect to and the endpoints behind it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub vip: SocketAddrV4,
    #[serde(default)]
    pub endpoints: Vec<SocketAddrV4>,
}

/// A workload on this node: the cgroup its processes run in and the identity they carry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub service_account: String,
    /// cgroup v2 directory, absolute or relative to the cgroup v2 mount.
    pub cgroup: PathBuf,
    /// Strict mode: new inbound TCP connections that did not come through the agent are dropped
    /// in the kernel. Unset: `policy.strict_default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl Workload {
    /// The identity key used by policy: `<namespace>/<service-account>`.
    pub fn identity(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }

    /// Whether strict mode applies: the workload's own setting, else the policy default.
    pub fn is_strict(&self, policy: &PolicyConfig) -> bool {
        self.strict.unwrap_or(policy.strict_default)
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Pairs refused in the kernel: connect() fails with EPERM.
    #[serde(default)]
    pub deny: Vec<DenyRuleConfig>,
    /// Strict mode for workloads that do not set `strict` themselves.
    #[serde(default)]
    pub strict_default: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DenyRuleConfig {
    pub name: String,
    /// Source identity `<namespace>/<service-account>`, or `*` for every workload on the node.
    pub from: String,
    /// Destination service name, or `*` for every service.
    pub to: String,
}

pub const WILDCARD: &str = "*";

fn default_instance() -> String {
    "default".to_owned()
}
fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}
fn default_namespace() -> String {
    "default".to_owned()
}
fn default_outbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15001))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15020))
}
fn default_health() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15021))
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_reload_poll() -> Duration {
    Duration::from_secs(2)
}

/// Durations written as text: "500ms", "3s", "2m", "1h".
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: u64 = number.parse().map_err(|_| {
            format!("{text:?} is not a duration like \"500ms\", \"3s\", \"2m\" or \"1h\"")
        })?;
        let millis = match unit {
            "ms" => Some(value),
            "s" => value.checked_mul(1_000),
            "m" => value.checked_mul(60_000),
            "h" => value.checked_mul(3_600_000),
            _ => return Err(format!("{text:?} has unit {unit:?}; use ms, s, m or h")),
        };
        millis
            .map(Duration::from_millis)
            .ok_or_else(|| format!("{text:?} is too large"))
    }

    pub fn format(d: &Duration) -> String {
        format!("{}ms", d.as_millis())
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}
