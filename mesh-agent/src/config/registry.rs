//! The `registry:` section: which discovery backend holds the dynamic mesh state, and the
//! defaults of health checks run by the agent (seed 004: interval 30s, timeout 10s, deregister
//! after 1m critical).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration_text, ConfigError};

#[derive(
    Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RegistryBackendKind {
    /// Only this agent's memory; mesh state comes from the YAML file.
    File,
    /// Single-node registry; registrations and mesh objects persist in `identity.state_dir`.
    #[default]
    Embedded,
    /// Shared etcd v3 cluster.
    Etcd,
}

impl RegistryBackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistryBackendKind::File => "file",
            RegistryBackendKind::Embedded => "embedded",
            RegistryBackendKind::Etcd => "etcd",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    #[serde(default)]
    pub backend: RegistryBackendKind,
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// Lookups are answered from the local cache; it is fully re-read from the backend this
    /// often (between pushes from the watch) and reported stale when a re-read fails for longer.
    #[serde(default = "default_cache_ttl", with = "duration_text")]
    #[schemars(with = "String")]
    pub cache_ttl: Duration,
    #[serde(default)]
    pub health: HealthDefaults,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            backend: RegistryBackendKind::default(),
            etcd: EtcdConfig::default(),
            cache_ttl: default_cache_ttl(),
            health: HealthDefaults::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// etcd client URLs, e.g. `http://10.0.0.10:2379`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Key prefix of the mesh's records.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// TTL of this agent's lease; its records vanish that long after the agent stops heartbeating.
    #[serde(default = "default_lease_ttl", with = "duration_text")]
    #[schemars(with = "String")]
    pub lease_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: default_prefix(),
            lease_ttl: default_lease_ttl(),
        }
    }
}

/// Defaults for checks that do not set their own values.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthDefaults {
    #[serde(default = "default_interval", with = "duration_text")]
    #[schemars(with = "String")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "duration_text")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    #[serde(default = "default_deregister_after", with = "duration_text")]
    #[schemars(with = "String")]
    pub deregister_critical_after: Duration,
    /// Bytes of a script check's output kept as its note.
    #[serde(default = "default_output_cap")]
    pub script_output_cap: usize,
    /// Script checks run programs as the agent: off unless the operator allows them.
    #[serde(default)]
    pub enable_script_checks: bool,
}

impl Default for HealthDefaults {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            timeout: default_timeout(),
            deregister_critical_after: default_deregister_after(),
            script_output_cap: default_output_cap(),
            enable_script_checks: false,
        }
    }
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_prefix() -> String {
    "/nodemesh".to_owned()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_deregister_after() -> Duration {
    Duration::from_secs(60)
}
fn default_output_cap() -> usize {
    4096
}

/// Checks of the `registry:` section, naming the field.
pub fn validate_registry(r: &RegistryConfig) -> Result<(), ConfigError> {
    if r.backend == RegistryBackendKind::Etcd && r.etcd.endpoints.is_empty() {
        return Err(ConfigError::invalid(
            "registry.etcd.endpoints",
            "must list at least one etcd URL when registry.backend is etcd",
        ));
    }
    for (i, e) in r.etcd.endpoints.iter().enumerate() {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(ConfigError::invalid(
                format!("registry.etcd.endpoints[{i}]"),
                format!("{e:?} must be an http:// or https:// URL"),
            ));
        }
    }
    if !r.etcd.prefix.starts_with('/') {
        return Err(ConfigError::invalid(
            "registry.etcd.prefix",
            format!("{:?} must start with '/'", r.etcd.prefix),
        ));
    }
    if r.etcd.lease_ttl < Duration::from_secs(2) {
        return Err(ConfigError::invalid(
            "registry.etcd.lease_ttl",
            "must be at least 2s (etcd leases have whole-second TTLs)",
        ));
    }
    for (field, d) in [
        ("registry.cache_ttl", r.cache_ttl),
        ("registry.health.interval", r.health.interval),
        ("registry.health.timeout", r.health.timeout),
    ] {
        if d.is_zero() {
            return Err(ConfigError::invalid(field, "must be greater than 0"));
        }
    }
    Ok(())
}

impl super::Config {
    /// Where the registry API listens: `listen.registry`, else `<node.agent_ip>:8500`.
    pub fn registry_addr(&self) -> std::net::SocketAddr {
        self.listen
            .registry
            .unwrap_or_else(|| std::net::SocketAddr::from((self.node.agent_ip, 8500)))
    }
}

#[cfg(test)]
mod tests {
    fn parse(extra: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let yaml = format!("node: {{name: n1, agent_ip: 10.1.255.1}}\n{extra}");
        crate::config::parse(&yaml, "test", &|_| None)
    }

    fn field_of(extra: &str) -> String {
        match parse(extra) {
            Err(crate::config::ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a field error for {extra:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_seeds() {
        let c = parse("").expect("valid");
        assert_eq!(c.registry.backend, super::RegistryBackendKind::Embedded);
        assert_eq!(c.registry.cache_ttl.as_secs(), 30);
        assert_eq!(c.registry.health.interval.as_secs(), 30);
        assert_eq!(c.registry.health.timeout.as_secs(), 10);
        assert_eq!(c.registry.health.deregister_critical_after.as_secs(), 60);
        assert_eq!(c.registry.etcd.lease_ttl.as_secs(), 10);
        assert_eq!(c.registry_addr().to_string(), "10.1.255.1:8500");
    }

    #[test]
    fn bad_registry_fields_are_named() {
        assert_eq!(
            field_of("registry: {backend: etcd}\n"),
            "registry.etcd.endpoints"
        );
        assert_eq!(
            field_of("registry: {backend: etcd, etcd: {endpoints: [\"10.0.0.1:2379\"]}}\n"),
            "registry.etcd.endpoints[0]"
        );
        assert_eq!(
            field_of("registry: {etcd: {prefix: nodemesh}}\n"),
            "registry.etcd.prefix"
        );
        assert_eq!(
            field_of("registry: {etcd: {lease_ttl: 1s}}\n"),
            "registry.etcd.lease_ttl"
        );
        assert_eq!(
            field_of("registry: {health: {interval: 0s}}\n"),
            "registry.health.interval"
        );
        let zone = crate::config::parse(
            "node: {name: n1, agent_ip: 10.1.255.1, zone: Zone_A}\n",
            "test",
            &|_| None,
        );
        assert!(
            matches!(zone, Err(crate::config::ConfigError::Invalid { ref field, .. }) if field == "node.zone"),
            "{zone:?}"
        );
    }
}
