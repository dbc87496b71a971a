//! The CA service's config file: where its CA comes from, where it listens, and which workload
//! identities run on which node (the placement authority; never the requesting node's word).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::ConfigError;

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaServiceConfig {
    pub trust_domain: String,
    /// Address of the mTLS signing endpoint.
    #[schemars(with = "String")]
    pub listen: SocketAddr,
    /// Holds the generated CA (`ca.crt`, `ca.key`) when `ca_cert`/`ca_key` are not given.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// The roots nodes' certificates may chain to and that the service publishes (PEM, one or
    /// more certificates); must hold the CA's own certificate. Default: that certificate alone.
    /// Two roots while a root is rotated. Re-read with the placements.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// Address of the plain-HTTP `/metrics` endpoint (Prometheus); none when unset.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub metrics: Option<SocketAddr>,
    /// Node name -> the `<namespace>/<service-account>[:<service>]` identities placed on it; the
    /// service (the certificate's CN, which `from_service` rules match) defaults to the service
    /// account.
    #[serde(default)]
    pub placements: BTreeMap<String, Vec<String>>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/nodemesh-ca")
}

/// Placements as looked up per request: node -> `namespace/service-account` -> service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placements(BTreeMap<String, HashMap<String, String>>);

impl Placements {
    /// Whether `namespace/service_account` is placed on `node` serving `service`.
    pub fn allows(&self, node: &str, key: &str, service: &str) -> bool {
        self.0
            .get(node)
            .and_then(|ids| ids.get(key))
            .is_some_and(|placed| placed == service)
    }
}

impl CaServiceConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        crate::config::sanity::check_nesting(text)?;
        let config: Self = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(
            text,
        ))
        .map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: crate::config::short_message(&e.to_string()),
        })?;
        config.placements()?;
        if config.ca_cert.is_some() != config.ca_key.is_some() {
            return Err(ConfigError::invalid(
                "ca_cert",
                "ca_cert and ca_key must be set together",
            ));
        }
        Ok(config)
    }

    /// The validated placements: node names are DNS labels, entries
    /// `<namespace>/<sa>[:<service>]` with the service a DNS label.
    pub fn placements(&self) -> Result<Placements, ConfigError> {
        let mut out = BTreeMap::new();
        for (node, ids) in &self.placements {
            if !crate::config::is_dns_label(node) {
                return Err(ConfigError::invalid(
                    format!("placements.{}", crate::config::short_message(node)),
                    "a node name must be a lowercase DNS label",
                ));
            }
            let mut placed = HashMap::new();
            for (i, entry) in ids.iter().enumerate() {
                let field = format!("placements.{node}[{i}]");
                let (id, service) = match entry.split_once(':') {
                    Some((id, service)) => (id, Some(service)),
                    None => (entry.as_str(), None),
                };
                let Some((ns, sa)) = id.split_once('/') else {
                    return Err(ConfigError::invalid(
                        field,
                        format!(
                            "{:?} must be <namespace>/<service-account>[:<service>]",
                            crate::config::short_message(entry)
                        ),
                    ));
                };
                crate::identity::SpiffeId::new(&self.trust_domain, ns, sa)
                    .map_err(|e| ConfigError::invalid(&field, e.to_string()))?;
                let service = service.unwrap_or(sa);
                if !crate::config::is_dns_label(service) {
                    return Err(ConfigError::invalid(
                        field,
                        format!(
                            "service {:?} must be a lowercase DNS label",
                            crate::config::short_message(service)
                        ),
                    ));
                }
                placed.insert(id.to_owned(), service.to_owned());
            }
            out.insert(node.clone(), placed);
        }
        Ok(Placements(out))
    }
}
