//! Agent configuration: one YAML file, environment overrides, validation that names the field.

pub mod egress;
mod env;
pub mod fields;
mod model;
mod registry;
pub mod sanity;
pub mod service_policy;
mod validate;

pub use env::{apply_env_overrides, ENV_CONFIG, ENV_LOG, ENV_LOG_FORMAT, OVERRIDES, PROCESS_VARS};
pub use model::*;
pub use registry::*;
pub use service_policy::{ServicePolicy, TrafficDefaults, TrafficRules};
pub(crate) use validate::short_message;
pub use validate::{is_dns_label, validate};

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses YAML text, applies environment overrides and validates the result.
pub fn parse(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    sanity::check_nesting(text)?;
    // serde_path_to_error names the exact field (`services[2].policy.rate_limit`), where the YAML
    // parser alone names the map around it.
    let mut config: Config = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(
        text,
    ))
    .map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        message: validate::short_message(&parse_message(&e)),
    })?;
    apply_env_overrides(&mut config, env)?;
    validate(&config)?;
    Ok(config)
}

fn parse_message(e: &serde_path_to_error::Error<serde_yaml::Error>) -> String {
    let inner = e.inner().to_string();
    let path = e.path().to_string();
    if path == "." {
        return inner;
    }
    // The YAML error starts with its own (shorter) path; keep only the exact one.
    let text = inner
        .split_once(": ")
        .filter(|(prefix, _)| path.starts_with(prefix))
        .map_or(inner.as_str(), |(_, rest)| rest);
    format!("{path}: {text}")
}

/// Reads, parses and validates the config file, with overrides from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string(), &|name| {
        std::env::var(name).ok()
    })
}

#[cfg(test)]
mod reference_doc;
#[cfg(test)]
mod tests;
