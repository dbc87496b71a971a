//! Environment overrides (NODEMESH_*), applied after the file is parsed and before validation.

use super::{duration_text, Config, ConfigError};

/// Override variables and what they set; listed so the startup log and docs can name them.
pub const OVERRIDES: &[(&str, &str)] = &[
    ("NODEMESH_NODE_NAME", "node.name"),
    ("NODEMESH_INSTANCE", "node.instance"),
    ("NODEMESH_AGENT_IP", "node.agent_ip"),
    ("NODEMESH_EBPF_OBJECT", "node.ebpf_object"),
    ("NODEMESH_OUTBOUND_ADDR", "listen.outbound"),
    ("NODEMESH_METRICS_ADDR", "listen.metrics"),
    ("NODEMESH_HEALTH_ADDR", "listen.health"),
    ("NODEMESH_HBONE_ADDR", "listen.hbone"),
    ("NODEMESH_STATE_DIR", "identity.state_dir"),
    ("NODEMESH_CONNECT_TIMEOUT", "proxy.connect_timeout"),
    ("NODEMESH_RELOAD_POLL", "proxy.reload_poll"),
];

pub fn apply_env_overrides(
    config: &mut Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (var, field) in OVERRIDES {
        let Some(value) = env(var) else { continue };
        let bad = |what: &str| ConfigError::invalid(*field, format!("{var}={value:?} {what}"));
        match *field {
            "node.name" => config.node.name = value.clone(),
            "node.instance" => config.node.instance = value.clone(),
            "node.agent_ip" => {
                config.node.agent_ip = value.parse().map_err(|_| bad("is not an IPv4 address"))?
            }
            "node.ebpf_object" => config.node.ebpf_object = Some(value.clone().into()),
            "listen.outbound" => {
                config.listen.outbound = value.parse().map_err(|_| bad("is not ip:port"))?
            }
            "listen.metrics" => {
                config.listen.metrics = value.parse().map_err(|_| bad("is not ip:port"))?
            }
            "listen.health" => {
                config.listen.health = value.parse().map_err(|_| bad("is not ip:port"))?
            }
            "proxy.connect_timeout" => {
                config.proxy.connect_timeout = duration_text::parse(&value).map_err(|e| bad(&e))?
            }
            "proxy.reload_poll" => {
                config.proxy.reload_poll = duration_text::parse(&value).map_err(|e| bad(&e))?
            }
            _ => {}
        }
    }
    Ok(())
}
