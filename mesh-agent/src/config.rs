//! Agent configuration: one YAML file, environment overrides, validation that names the field.

mod env;
pub mod fields;
mod model;
mod validate;

pub use env::{apply_env_overrides, ENV_CONFIG, ENV_LOG, ENV_LOG_FORMAT, OVERRIDES, PROCESS_VARS};
pub use model::*;
pub use validate::validate;

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
    let mut config: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        message: e.to_string(),
    })?;
    apply_env_overrides(&mut config, env)?;
    validate(&config)?;
    Ok(config)
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
