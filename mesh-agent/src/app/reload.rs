//! Hot reload: on SIGHUP or when the file content changes. A bad config is reported and counted
//! and the agent keeps running on the last good one.

use std::path::{Path, PathBuf};

use crate::config::{self, Config, ConfigError};
use crate::state::AgentState;

use super::{apply, AppError};

pub struct Watcher {
    path: PathBuf,
    /// Content last tried, good or bad, so a bad file is reported once, not every poll.
    last_seen: Option<String>,
}

impl Watcher {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            last_seen: std::fs::read_to_string(path).ok(),
        }
    }

    /// Reloads if the file changed (or always when `forced`, i.e. on SIGHUP).
    pub fn reload(&mut self, state: &AgentState, forced: bool) {
        let trigger = if forced { "SIGHUP" } else { "file change" };
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(source) => {
                if forced {
                    let e = ConfigError::Read {
                        path: self.path.display().to_string(),
                        source,
                    };
                    self.fail(state, trigger, &e.into());
                }
                return;
            }
        };
        if !forced && self.last_seen.as_deref() == Some(text.as_str()) {
            return;
        }
        self.last_seen = Some(text.clone());
        let old = state.config();
        match self.apply_text(state, &text) {
            Ok(()) => {
                let new = state.config();
                tracing::info!(
                    path = %self.path.display(),
                    trigger,
                    changes = %super::changes::summary(&old, &new),
                    "config reloaded"
                );
                tracing::debug!(effective = %serde_json::to_string(&*new).unwrap_or_default(), "effective config");
                state.metrics.config_generation.inc();
                state.metrics.config_reloads_ok.inc();
            }
            Err(e) => self.fail(state, trigger, &e),
        }
    }

    /// Logs, then counts: whoever sees the counter move can already read why.
    fn fail(&self, state: &AgentState, trigger: &str, error: &AppError) {
        tracing::error!(path = %self.path.display(), trigger, %error, "config reload rejected; keeping the previous config");
        state.metrics.config_reloads_failed.inc();
    }

    fn apply_text(&self, state: &AgentState, text: &str) -> Result<(), AppError> {
        let new = config::parse(text, &self.path.display().to_string(), &|n| {
            std::env::var(n).ok()
        })?;
        let _serialized = state.mesh.lock();
        check_immutable(&state.config(), &new)?;
        apply_mesh_state(state, new)
    }
}

/// Applies `base` (a node file) merged with the registry's current view: kernel, then
/// certificates and authorization, then the published model. On failure the previous state
/// stays in force. The caller holds `state.mesh.lock()`.
pub fn apply_mesh_state(state: &AgentState, base: Config) -> Result<(), AppError> {
    let old = state.config();
    let old_model = state.model();
    // The one reconciler's view: the file merged with the registry's mesh objects, nodes and
    // endpoints.
    let (new, model) = state.mesh.effective(&base, Some(&old_model));
    let applied = state.with_kernel(|k| apply(k, &new, &model, Some((&old, &old_model))));
    if let Some(result) = applied {
        result?;
    }
    if let Err(e) = state.security.reload(&new) {
        // Put the kernel back so that nothing of the rejected config stays in force.
        state.with_kernel(|k| apply(k, &old, &old_model, None));
        return Err(e.into());
    }
    state.mesh.set_base(base);
    state.publish(new, model);
    Ok(())
}

/// Fields bound at start-up (sockets, pin paths) cannot change without a restart.
fn check_immutable(old: &Config, new: &Config) -> Result<(), ConfigError> {
    let fields = [
        ("node.instance", old.node.instance != new.node.instance),
        (
            "node.ebpf_object",
            old.node.ebpf_object != new.node.ebpf_object,
        ),
        (
            "listen.outbound",
            old.listen.outbound != new.listen.outbound,
        ),
        (
            "listen.outbound_ports",
            old.listen.outbound_ports != new.listen.outbound_ports,
        ),
        ("listen.metrics", old.listen.metrics != new.listen.metrics),
        ("listen.health", old.listen.health != new.listen.health),
        ("listen.hbone", old.listen.hbone != new.listen.hbone),
        ("listen.admin", old.listen.admin != new.listen.admin),
        ("node.name", old.node.name != new.node.name),
        (
            "node.trust_domain",
            old.node.trust_domain != new.node.trust_domain,
        ),
        ("identity", old.identity != new.identity),
        (
            "listen.registry",
            old.listen.registry != new.listen.registry,
        ),
        ("registry", old.registry != new.registry),
        // Bound into the HBONE listener, pool and reload ticker at start.
        ("node.agent_ip", old.node.agent_ip != new.node.agent_ip),
        (
            "proxy.connect_timeout",
            old.proxy.connect_timeout != new.proxy.connect_timeout,
        ),
        (
            "proxy.reload_poll",
            old.proxy.reload_poll != new.proxy.reload_poll,
        ),
        (
            "proxy.max_connections",
            old.proxy.max_connections != new.proxy.max_connections,
        ),
        (
            "proxy.max_connections_per_identity",
            old.proxy.max_connections_per_identity != new.proxy.max_connections_per_identity,
        ),
        (
            "proxy.idle_timeout",
            old.proxy.idle_timeout != new.proxy.idle_timeout,
        ),
        // The reply routing is installed at start.
        (
            "proxy.transparent",
            old.proxy.transparent != new.proxy.transparent,
        ),
        (
            "proxy.drain_timeout",
            old.proxy.drain_timeout != new.proxy.drain_timeout,
        ),
        (
            "observability.access_log",
            old.observability.access_log != new.observability.access_log,
        ),
        (
            "observability.tracing",
            old.observability.tracing != new.observability.tracing,
        ),
    ];
    match fields.iter().find(|(_, changed)| *changed) {
        Some((field, _)) => Err(ConfigError::invalid(
            *field,
            "cannot be applied live; it needs a restart of the agent",
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::check_immutable;

    fn config(extra: &str) -> crate::config::Config {
        let text = format!("node: {{name: n1, agent_ip: 10.1.255.1}}\n{extra}");
        crate::config::parse(&text, "t", &|_| None).expect("valid")
    }

    /// Values bound at start (listeners, pool, limits, timers) are refused on reload with a
    /// message saying a restart is needed, instead of being accepted and silently ignored.
    #[test]
    fn values_bound_at_start_are_refused_with_needs_a_restart() {
        let base = config("");
        for (field, extra) in [
            ("node.agent_ip", String::new()),
            (
                "proxy.connect_timeout",
                "proxy: {connect_timeout: 1s}\n".into(),
            ),
            ("proxy.reload_poll", "proxy: {reload_poll: 5s}\n".into()),
            (
                "proxy.max_connections",
                "proxy: {max_connections: 100, max_connections_per_identity: 10}\n".into(),
            ),
            ("proxy.idle_timeout", "proxy: {idle_timeout: 1m}\n".into()),
            ("proxy.drain_timeout", "proxy: {drain_timeout: 1s}\n".into()),
            ("proxy.transparent", "proxy: {transparent: false}\n".into()),
            ("listen.hbone", "listen: {hbone: 0.0.0.0:16008}\n".into()),
        ] {
            let new = if field == "node.agent_ip" {
                crate::config::parse("node: {name: n1, agent_ip: 10.1.255.2}\n", "t", &|_| None)
                    .expect("valid")
            } else {
                config(&extra)
            };
            let e = check_immutable(&base, &new).expect_err(field).to_string();
            assert!(
                e.contains(&format!("`{field}`")) && e.contains("needs a restart"),
                "{e}"
            );
        }
        // Live-applicable changes pass.
        check_immutable(&base, &config("policy: {strict_default: true}\n")).expect("live");
    }
}
