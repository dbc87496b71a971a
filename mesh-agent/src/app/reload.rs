//! Hot reload: on SIGHUP or when the file content changes. A bad config is reported and counted
//! and the agent keeps running on the last good one.

use std::path::{Path, PathBuf};

use crate::config::{self, Config, ConfigError};
use crate::registry::MeshModel;
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
        let old = state.config();
        check_immutable(&old, &new)?;
        let old_model = state.model();
        let model = MeshModel::build(&new, Some(&old_model));
        let applied = state.with_kernel(|k| apply(k, &new, &model, Some((&old, &old_model))));
        if let Some(result) = applied {
            result?;
        }
        if let Err(e) = state.security.reload(&new) {
            // Put the kernel back so that nothing of the rejected config stays in force.
            state.with_kernel(|k| apply(k, &old, &old_model, None));
            return Err(e.into());
        }
        state.publish(new, model);
        Ok(())
    }
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
            "observability.access_log",
            old.observability.access_log != new.observability.access_log,
        ),
    ];
    match fields.iter().find(|(_, changed)| *changed) {
        Some((field, _)) => Err(ConfigError::invalid(
            *field,
            "cannot change on reload; restart the agent",
        )),
        None => Ok(()),
    }
}
