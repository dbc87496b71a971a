//! Runtime log level: the binary installs a reloadable `EnvFilter` and hands its handle over here;
//! the admin endpoint `/logging` reads and replaces the filter through it.

use std::sync::{Mutex, OnceLock};

use thiserror::Error;
use tracing_subscriber::{reload, EnvFilter};

#[derive(Debug, Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?}: {reason}")]
    InvalidFilter { filter: String, reason: String },
    #[error("the log filter cannot be changed: {0}")]
    Reload(String),
    #[error("the log filter is not reloadable in this process")]
    NotInstalled,
}

type Apply = Box<dyn Fn(EnvFilter) -> Result<(), reload::Error> + Send + Sync>;

struct Control {
    apply: Apply,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Registers the reload handle of the process-wide filter, which was built from `initial`.
/// Only the first call counts (there is one subscriber per process).
pub fn install<S: 'static>(handle: reload::Handle<EnvFilter, S>, initial: &str) {
    let _ = CONTROL.set(Control {
        apply: Box::new(move |filter| handle.reload(filter)),
        current: Mutex::new(initial.to_owned()),
    });
}

/// The filter in force, as it was given (e.g. `info,mesh_agent=debug`).
pub fn current() -> Option<String> {
    CONTROL
        .get()
        .map(|c| c.current.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// Replaces the filter; an invalid one is refused and the old one stays.
pub fn set(filter: &str) -> Result<(), LoggingError> {
    let control = CONTROL.get().ok_or(LoggingError::NotInstalled)?;
    let parsed = parse(filter)?;
    let mut current = control.current.lock().unwrap_or_else(|p| p.into_inner());
    (control.apply)(parsed).map_err(|e| LoggingError::Reload(e.to_string()))?;
    *current = filter.to_owned();
    Ok(())
}

/// Parses a filter strictly: `EnvFilter::try_new` alone skips directives it cannot parse.
fn parse(filter: &str) -> Result<EnvFilter, LoggingError> {
    let invalid = |reason: String| LoggingError::InvalidFilter {
        filter: filter.to_owned(),
        reason,
    };
    if filter.trim().is_empty() {
        return Err(invalid("empty".to_owned()));
    }
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_strictly() {
        assert!(parse("debug").is_ok());
        assert!(parse("info,mesh_agent=trace").is_ok());
        assert!(parse("").is_err());
        let err = parse("mesh_agent=loud")
            .expect_err("an unknown level is invalid")
            .to_string();
        assert!(err.contains("mesh_agent=loud"), "{err}");
    }
}
