//! The config file's shape. Unknown fields are rejected so a typo never silently does nothing.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
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
    #[serde(default)]
    pub identity: IdentityConfig,
    /// The nodes' agents, reached over HBONE (mTLS HTTP/2 CONNECT) for remote endpoints. One list
    /// can be shared by every node: the entry naming this node is not a peer and is skipped.
    #[serde(default)]
    pub nodes: Vec<PeerNode>,
    /// Inbound authorization per destination service (checked by the destination's agent).
    #[serde(default)]
    pub authorization: Vec<crate::policy::authz_config::PolicyConfig>,
    /// Capabilities granted to identities, required by policies that name them.
    #[serde(default)]
    pub service_keys: Vec<crate::policy::authz_config::ServiceKeyConfig>,
    /// Service registry: where dynamic mesh state (instances, nodes) comes from.
    #[serde(default)]
    pub registry: super::registry::RegistryConfig,
    /// Mesh-wide traffic policy; each service's `policy` overrides it field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_defaults: Option<super::TrafficDefaults>,
    /// Non-mesh destinations workloads may reach (the rest is refused in the kernel).
    #[serde(default)]
    pub egress: super::egress::EgressConfig,
    /// Access logs.
    #[serde(default)]
    pub observability: ObservabilityConfig,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservabilityConfig {
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// W3C trace context on HTTP requests and span export over OTLP.
    #[serde(default)]
    pub tracing: TracingConfig,
}

/// Tracing of HTTP requests: off (no spans, headers passed through) until `otlp_endpoint` is set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/gRPC collector URL, e.g. `http://10.0.0.10:4317`; unset turns tracing off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled (0.0..=1.0); an incoming traceparent's sampled flag wins.
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// `service.name` of the exported spans.
    #[serde(default = "default_tracing_service_name")]
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling: default_sampling(),
            service_name: default_tracing_service_name(),
        }
    }
}

fn default_sampling() -> f64 {
    0.01
}

fn default_tracing_service_name() -> String {
    "nodemesh-agent".to_owned()
}

/// One JSON line per proxied TCP connection and per HTTP request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Off by default.
    #[serde(default)]
    pub enabled: bool,
    /// File the lines are appended to; stdout when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

impl Config {
    /// The other nodes' agents (the `nodes` entries except this node's own).
    pub fn peers(&self) -> impl Iterator<Item = &PeerNode> {
        self.nodes.iter().filter(|n| n.name != self.node.name)
    }

    /// The authorization part of the config, in the shape the authorizer compiles: the
    /// `authorization` list plus one policy per service whose `policy` block has allow/deny.
    pub fn authz(&self) -> crate::policy::authz_config::AuthzConfig {
        let mut authorization = self.authorization.clone();
        authorization.extend(self.services.iter().filter_map(|s| {
            let p = s.policy.as_ref().filter(|p| p.has_authorization())?;
            Some(p.to_authorization(&s.name, self.policy.default_action()))
        }));
        crate::policy::authz_config::AuthzConfig {
            authorization,
            service_keys: self.service_keys.clone(),
            mesh_default: self.policy.default_action(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
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
    /// Override for the eBPF object (default: the object embedded in the agent binary at build time).
    #[serde(default)]
    pub ebpf_object: Option<PathBuf>,
    /// Zone of this node: endpoints in the same zone are preferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Region of this node (informational; zones are matched exactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// The first outbound (capture) port; pods are redirected to `outbound_ports` ports from it.
    #[serde(default = "default_outbound")]
    pub outbound: SocketAddr,
    /// How many consecutive outbound ports the agent listens on; each redirected connect picks
    /// one at random, so a pod's closed connections (TIME_WAIT) do not use up its source ports
    /// towards a single agent port. 1 to 1024; a port 0 `outbound` gets one port.
    #[serde(default = "default_outbound_ports")]
    pub outbound_ports: u16,
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
    #[serde(default = "default_health")]
    pub health: SocketAddr,
    /// Inbound HBONE (mTLS) from other nodes' agents.
    #[serde(default = "default_hbone")]
    pub hbone: SocketAddr,
    /// Admin endpoints (config dump, workloads, certificates, policy); keep it on loopback.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Consul-compatible registry API for pods; default `<node.agent_ip>:8500`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<SocketAddr>,
}

impl ListenConfig {
    /// How many outbound ports the agent listens on: `outbound_ports`, or one when
    /// `outbound`'s port is 0 (the kernel picks it).
    pub fn outbound_port_count(&self) -> u16 {
        match self.outbound.port() {
            0 => 1,
            _ => self.outbound_ports.max(1),
        }
    }

    /// The outbound listeners' addresses: [`Self::outbound_port_count`] consecutive ports from
    /// `outbound`'s.
    pub fn outbound_addrs(&self) -> impl Iterator<Item = SocketAddr> {
        let first = self.outbound;
        (0..self.outbound_port_count())
            .filter_map(move |i| first.port().checked_add(i))
            .map(move |port| SocketAddr::new(first.ip(), port))
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            outbound: default_outbound(),
            outbound_ports: default_outbound_ports(),
            metrics: default_metrics(),
            health: default_health(),
            hbone: default_hbone(),
            admin: default_admin(),
            registry: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// How long connecting to an endpoint may take, e.g. "3s" or "500ms".
    #[serde(default = "default_connect_timeout", with = "duration_text")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// How often the config file is checked for changes ("0s" disables polling; SIGHUP still works).
    #[serde(default = "default_reload_poll", with = "duration_text")]
    #[schemars(with = "String")]
    pub reload_poll: Duration,
    /// On SIGTERM, how long established connections (outbound and inbound HBONE) may take to
    /// finish before the agent exits; the kernel programs stay pinned either way.
    #[serde(default = "default_drain_timeout", with = "duration_text")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
    /// Concurrent connections on the outbound (capture) listener, all callers together.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent outbound connections of one calling identity; below `max_connections`, so
    /// one workload cannot take the share every other workload needs.
    #[serde(default = "default_max_connections_per_identity")]
    pub max_connections_per_identity: usize,
    /// A relayed connection (inbound HBONE tunnel or captured opaque TCP) with no bytes either
    /// way for this long is closed.
    #[serde(default = "default_idle_timeout", with = "duration_text")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
    /// Connects to pods come from the caller's address (IP_TRANSPARENT plus reply routing set
    /// up with `nft` and `ip`), not from the agent address.
    #[serde(default = "default_transparent")]
    pub transparent: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            reload_poll: default_reload_poll(),
            drain_timeout: default_drain_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_identity: default_max_connections_per_identity(),
            idle_timeout: default_idle_timeout(),
            transparent: default_transparent(),
        }
    }
}

/// A mesh service: a virtual IP:port that pods connect to and the endpoints behind it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub vip: SocketAddrV4,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Policy of calls to this service: traffic (timeouts, retries, breaker, limits, balancing)
    /// and who may call it (seed 001 §18 form: `allow`, `deny`, `mTLS: required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<super::ServicePolicy>,
}

/// A workload on this node: the cgroup its processes run in and the identity they carry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
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
    /// Service this workload serves (certificate CN and DNS SAN); defaults to the workload name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl Workload {
    /// The identity key used by policy: `<namespace>/<service-account>`.
    pub fn identity(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }

    pub fn service_name(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.name)
    }

    /// Whether strict mode applies: the workload's own setting, else the policy default.
    pub fn is_strict(&self, policy: &PolicyConfig) -> bool {
        self.strict.unwrap_or(policy.strict_default)
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Pairs refused in the kernel: connect() fails with EPERM.
    #[serde(default)]
    pub deny: Vec<DenyRuleConfig>,
    /// Strict mode for workloads that do not set `strict` themselves.
    #[serde(default)]
    pub strict_default: bool,
    /// Mesh-wide default for a service without an authorization policy: `deny` (its callers
    /// are exactly its allow-list, so none) unless an operator relaxes it to `allow`. Unset:
    /// the registry's mesh-wide `default` (`ctl apply`), else `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<crate::policy::authz_config::DefaultAction>,
}

impl PolicyConfig {
    /// The mesh-wide default in force: the file's (or, merged in, the registry's), else deny.
    pub fn default_action(&self) -> crate::policy::authz_config::DefaultAction {
        self.default.unwrap_or_default()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
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
    SocketAddr::from(([0, 0, 0, 0], 15101))
}
/// 15101-15132: clear of the other listeners (15000, 15008, 15020, 15021).
pub const DEFAULT_OUTBOUND_PORTS: u16 = 32;
fn default_outbound_ports() -> u16 {
    DEFAULT_OUTBOUND_PORTS
}
/// The most outbound ports one agent listens on.
pub const MAX_OUTBOUND_PORTS: u16 = 1024;
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15020))
}
fn default_health() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15021))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}
fn default_hbone() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15008))
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/nodemesh")
}
fn default_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Workload identity settings: where the mesh CA comes from and how long certificates live.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Agent state; holds the generated mesh CA when no `ca_cert`/`ca_key` are given.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// CA certificate (PEM), e.g. from a mounted Kubernetes Secret. Set with `ca_key`.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// CA private key (PEM, PKCS#8 or SEC1). Set with `ca_cert`.
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// The CA service of a multi-node mesh: certificates come from it and this node holds no
    /// CA key. Excludes `ca_cert`/`ca_key`.
    #[serde(default)]
    pub ca_service: Option<CaServiceClientConfig>,
    /// Workload certificate lifetime, 12h to 48h; renewed at half of it.
    #[serde(default = "default_cert_ttl", with = "duration_text")]
    #[schemars(with = "String")]
    pub cert_ttl: Duration,
    /// Lifts the 12h minimum of `cert_ttl` (for rotation tests only).
    #[serde(default)]
    pub allow_short_ttl: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            ca_cert: None,
            ca_key: None,
            ca_service: None,
            cert_ttl: default_cert_ttl(),
            allow_short_ttl: false,
        }
    }
}

/// Where the CA service is and the node's bootstrap files (`mesh-agent ca issue-node`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaServiceClientConfig {
    /// `ip:port` of the CA service's mTLS endpoint.
    #[schemars(with = "String")]
    pub address: std::net::SocketAddr,
    /// The node certificate (PEM) this agent authenticates with at first start.
    pub node_cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub node_key: PathBuf,
    /// The mesh trust bundle (PEM CA certificate), without its key.
    pub trust_bundle: PathBuf,
    /// Connect, read and write timeout of each signing request.
    #[serde(default = "default_ca_service_timeout", with = "duration_text")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

fn default_ca_service_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Another node's agent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerNode {
    pub name: String,
    /// Its HBONE listener, e.g. 10.0.0.2:15008.
    pub hbone: SocketAddr,
}

/// A service endpoint: `ip:port` on this node, or `{address, node?, zone?, weight?}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Endpoint {
    Local(SocketAddrV4),
    Placed {
        address: SocketAddrV4,
        /// The node it runs on (reached over HBONE unless it is this node).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// Its zone, for locality-aware balancing; unset on this node: `node.zone`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        zone: Option<String>,
        /// Relative share under weighted round robin (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
    },
}

impl Endpoint {
    pub fn address(&self) -> SocketAddrV4 {
        match self {
            Endpoint::Local(a) | Endpoint::Placed { address: a, .. } => *a,
        }
    }

    /// The node the endpoint runs on, when it names one.
    pub fn node(&self) -> Option<&str> {
        match self {
            Endpoint::Local(_) => None,
            Endpoint::Placed { node, .. } => node.as_deref(),
        }
    }

    pub fn zone(&self) -> Option<&str> {
        match self {
            Endpoint::Local(_) => None,
            Endpoint::Placed { zone, .. } => zone.as_deref(),
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            Endpoint::Local(_) => 1,
            Endpoint::Placed { weight, .. } => weight.unwrap_or(1),
        }
    }
}

/// Namespace of the agents' own identities: `spiffe://<td>/ns/nodemesh-system/sa/node.<name>`.
pub const AGENT_NAMESPACE: &str = "nodemesh-system";

/// Service account part of a node agent's SPIFFE ID.
pub fn agent_service_account(node: &str) -> String {
    format!("node.{node}")
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_max_connections() -> usize {
    16384
}
fn default_max_connections_per_identity() -> usize {
    4096
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_transparent() -> bool {
    true
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(5)
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
