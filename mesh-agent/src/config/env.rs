//! Environment overrides (NODEMESH_*), applied after the file is parsed and before validation.

use std::net::SocketAddr;

use super::{duration_text, Config, ConfigError};

/// Config file path (also `--config`).
pub const ENV_CONFIG: &str = "NODEMESH_CONFIG";
/// Log filter, `tracing` EnvFilter syntax.
pub const ENV_LOG: &str = "NODEMESH_LOG";
/// Log format, `text` or `json` (also `--log-format`).
pub const ENV_LOG_FORMAT: &str = "NODEMESH_LOG_FORMAT";
/// Variables the binary reads itself (not config overrides).
pub const PROCESS_VARS: &[&str] = &[ENV_CONFIG, ENV_LOG, ENV_LOG_FORMAT];

type Setter = fn(&mut Config, &str) -> Result<(), String>;

fn addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| "is not ip:port".to_owned())
}

/// Each variable with the field it sets and how; listed so docs and errors can name them.
pub const OVERRIDES: &[(&str, &str, Setter)] = &[
    ("NODEMESH_NODE_NAME", "node.name", |c, v| {
        c.node.name = v.to_owned();
        Ok(())
    }),
    ("NODEMESH_INSTANCE", "node.instance", |c, v| {
        c.node.instance = v.to_owned();
        Ok(())
    }),
    ("NODEMESH_AGENT_IP", "node.agent_ip", |c, v| {
        c.node.agent_ip = v.parse().map_err(|_| "is not an IPv4 address".to_owned())?;
        Ok(())
    }),
    ("NODEMESH_EBPF_OBJECT", "node.ebpf_object", |c, v| {
        c.node.ebpf_object = Some(v.into());
        Ok(())
    }),
    ("NODEMESH_OUTBOUND_ADDR", "listen.outbound", |c, v| {
        c.listen.outbound = addr(v)?;
        Ok(())
    }),
    ("NODEMESH_METRICS_ADDR", "listen.metrics", |c, v| {
        c.listen.metrics = addr(v)?;
        Ok(())
    }),
    ("NODEMESH_HEALTH_ADDR", "listen.health", |c, v| {
        c.listen.health = addr(v)?;
        Ok(())
    }),
    ("NODEMESH_HBONE_ADDR", "listen.hbone", |c, v| {
        c.listen.hbone = addr(v)?;
        Ok(())
    }),
    (
        "NODEMESH_CONNECT_TIMEOUT",
        "proxy.connect_timeout",
        |c, v| {
            c.proxy.connect_timeout = duration_text::parse(v)?;
            Ok(())
        },
    ),
    ("NODEMESH_RELOAD_POLL", "proxy.reload_poll", |c, v| {
        c.proxy.reload_poll = duration_text::parse(v)?;
        Ok(())
    }),
    ("NODEMESH_STATE_DIR", "identity.state_dir", |c, v| {
        c.identity.state_dir = v.into();
        Ok(())
    }),
    ("NODEMESH_ADMIN_ADDR", "listen.admin", |c, v| {
        c.listen.admin = addr(v)?;
        Ok(())
    }),
    ("NODEMESH_CA_CERT", "identity.ca_cert", |c, v| {
        c.identity.ca_cert = Some(v.into());
        Ok(())
    }),
    ("NODEMESH_REGISTRY_ADDR", "listen.registry", |c, v| {
        c.listen.registry = Some(addr(v)?);
        Ok(())
    }),
    ("NODEMESH_REGISTRY_BACKEND", "registry.backend", |c, v| {
        c.registry.backend = match v {
            "file" => crate::config::RegistryBackendKind::File,
            "embedded" => crate::config::RegistryBackendKind::Embedded,
            "etcd" => crate::config::RegistryBackendKind::Etcd,
            _ => return Err("is not file, embedded or etcd".to_owned()),
        };
        Ok(())
    }),
    (
        "NODEMESH_ETCD_ENDPOINTS",
        "registry.etcd.endpoints",
        |c, v| {
            c.registry.etcd.endpoints = v.split(',').map(|e| e.trim().to_owned()).collect();
            Ok(())
        },
    ),
    ("NODEMESH_CA_KEY", "identity.ca_key", |c, v| {
        c.identity.ca_key = Some(v.into());
        Ok(())
    }),
    (
        "NODEMESH_OTLP_ENDPOINT",
        "observability.tracing.otlp_endpoint",
        |c, v| {
            c.observability.tracing.otlp_endpoint = Some(v.to_owned());
            Ok(())
        },
    ),
    (
        "NODEMESH_TRACE_SAMPLING",
        "observability.tracing.sampling",
        |c, v| {
            c.observability.tracing.sampling =
                v.parse().map_err(|_| "is not a number".to_owned())?;
            Ok(())
        },
    ),
];

pub fn apply_env_overrides(
    config: &mut Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (var, field, set) in OVERRIDES {
        if let Some(value) = env(var) {
            set(config, &value)
                .map_err(|what| ConfigError::invalid(*field, format!("{var}={value:?} {what}")))?;
        }
    }
    Ok(())
}
