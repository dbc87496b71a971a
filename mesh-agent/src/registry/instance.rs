//! The registry's records: service instances (seed 004's model) and node memberships. These are
//! what backends store, what the Consul-compatible API reads and writes, and what the JSON Schema
//! in docs/ describes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::is_dns_label;

/// A record refused by validation; `field` names the offending field.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("registry record field `{field}`: {message}")]
pub struct RecordError {
    pub field: String,
    pub message: String,
}

impl RecordError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Health of an instance as its checks report it; only `passing` instances are routed.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    #[default]
    Passing,
    Warning,
    Critical,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Passing => "passing",
            HealthStatus::Warning => "warning",
            HealthStatus::Critical => "critical",
        }
    }
}

/// One running instance of a service.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    /// Service name (lowercase DNS label).
    pub service_name: String,
    /// Version of the code the instance runs, e.g. "1.4.2".
    pub service_version: String,
    /// Kind of service, e.g. "http", "grpc", "worker" (lowercase DNS label).
    pub service_type: String,
    /// Environment, e.g. "prod", "staging" (lowercase DNS label).
    pub environment: String,
    /// Unique id of this instance (lowercase DNS label).
    pub instance_id: String,
    /// Address the instance listens on.
    pub address: Ipv4Addr,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Zone, for locality-aware load balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Load-balancing weight (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Node whose agent registered the instance (set by the agent, not by callers).
    #[serde(default)]
    pub node: String,
    /// Workload identity (`<namespace>/<service-account>`) that registered it; only that identity
    /// may heartbeat or deregister it.
    #[serde(default)]
    pub owner: String,
    /// Aggregated health of the instance's checks.
    #[serde(default)]
    pub status: HealthStatus,
}

fn default_weight() -> u32 {
    1
}

impl Instance {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), RecordError> {
        for (field, value) in [
            ("service_name", &self.service_name),
            ("service_type", &self.service_type),
            ("environment", &self.environment),
            ("instance_id", &self.instance_id),
        ] {
            label(field, value)?;
        }
        if self.service_version.is_empty()
            || self.service_version.len() > 64
            || !self
                .service_version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_'))
        {
            return Err(RecordError::new(
                "service_version",
                format!(
                    "{:?} must be 1-64 characters of a-z, A-Z, 0-9, '.', '-', '+', '_'",
                    self.service_version
                ),
            ));
        }
        if self.address.is_unspecified() {
            return Err(RecordError::new("address", "must not be 0.0.0.0"));
        }
        if self.port == 0 {
            return Err(RecordError::new("port", "must be 1-65535"));
        }
        for (field, value) in [
            ("region", &self.region),
            ("zone", &self.zone),
            ("deployment_id", &self.deployment_id),
        ] {
            if let Some(v) = value {
                label(field, v)?;
            }
        }
        for (i, c) in self.capabilities.iter().enumerate() {
            label(&format!("capabilities[{i}]"), c)?;
        }
        if self.weight == 0 {
            return Err(RecordError::new("weight", "must be at least 1"));
        }
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.address, self.port))
    }
}

fn label(field: &str, value: &str) -> Result<(), RecordError> {
    if is_dns_label(value) {
        Ok(())
    } else {
        Err(RecordError::new(
            field,
            format!("{value:?} must be a lowercase DNS label (1-63 of a-z, 0-9, '-')"),
        ))
    }
}

/// A node's agent as the registry announces it, so nodes join without editing each other's files.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub name: String,
    /// Its HBONE (mTLS) listener.
    pub hbone: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// The JSON Schema of [`Instance`], as published in docs/registry-instance.schema.json.
pub fn instance_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Instance)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> Instance {
        Instance {
            service_name: "wallet".into(),
            service_version: "1.2.0".into(),
            service_type: "http".into(),
            environment: "prod".into(),
            instance_id: "wallet-1".into(),
            address: Ipv4Addr::new(10, 1, 1, 2),
            port: 8080,
            region: None,
            zone: Some("zone-a".into()),
            deployment_id: None,
            capabilities: vec![],
            tags: vec![],
            meta: BTreeMap::new(),
            weight: 1,
            node: String::new(),
            owner: String::new(),
            status: HealthStatus::Passing,
        }
    }

    #[test]
    fn good_record_passes() {
        assert_eq!(sample().validate(), Ok(()));
    }

    #[test]
    fn bad_records_name_the_field() {
        type Mutation = Box<dyn Fn(&mut Instance)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "service_name",
                Box::new(|i| i.service_name = "Wallet".into()),
            ),
            ("service_type", Box::new(|i| i.service_type = "".into())),
            ("environment", Box::new(|i| i.environment = "-prod".into())),
            ("instance_id", Box::new(|i| i.instance_id = "a_b".into())),
            (
                "service_version",
                Box::new(|i| i.service_version = "1 2".into()),
            ),
            ("address", Box::new(|i| i.address = Ipv4Addr::UNSPECIFIED)),
            ("port", Box::new(|i| i.port = 0)),
            ("zone", Box::new(|i| i.zone = Some("Zone A".into()))),
            (
                "capabilities[1]",
                Box::new(|i| i.capabilities = vec!["pay".into(), "X".into()]),
            ),
            ("weight", Box::new(|i| i.weight = 0)),
        ];
        for (field, mutate) in cases {
            let mut i = sample();
            mutate(&mut i);
            let err = i.validate().expect_err(field);
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn schema_lists_required_fields() {
        let schema = instance_schema();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for f in [
            "service_name",
            "service_version",
            "service_type",
            "environment",
            "instance_id",
            "address",
            "port",
        ] {
            assert!(required.contains(&f), "{f} required in {required:?}");
        }
        assert!(!required.contains(&"zone"));
    }
}
