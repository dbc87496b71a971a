//! Inbound authorization config (YAML) and its validation into matchable rules.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::SpiffeId;

#[derive(Debug, Error)]
pub enum AuthzConfigError {
    #[error("authorization config is not valid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// `field` is the path of the offending value, e.g. `authorization[1].allow[0].from`.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: String, message: String) -> AuthzConfigError {
    AuthzConfigError::Invalid { field, message }
}

/// Top-level shape: the `authorization` and `service_keys` blocks of the agent config.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    #[serde(default)]
    pub authorization: Vec<PolicyConfig>,
    #[serde(default)]
    pub service_keys: Vec<ServiceKeyConfig>,
    /// For services without a policy; set from `policy.default` of the agent config.
    #[serde(skip)]
    pub mesh_default: DefaultAction,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    pub service: String,
    /// When absent: deny if the policy has allow rules (an allow-list), else allow.
    #[serde(default)]
    pub default: Option<DefaultAction>,
    #[serde(default)]
    pub allow: Vec<RuleConfig>,
    #[serde(default)]
    pub deny: Vec<RuleConfig>,
    #[serde(default)]
    pub capabilities: Option<CapabilitiesConfig>,
    /// `audit`: a connection the policy would deny is logged and counted as `audit_deny`, then
    /// allowed (dry run before enforcing).
    #[serde(default)]
    pub mode: PolicyMode,
}

#[derive(
    Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Audit,
}

#[derive(
    Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Allow,
    /// The mesh-wide default: a service's callers are exactly its allow-list.
    #[default]
    Deny,
}

/// Exactly one of the three fields must be set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_namespace: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesConfig {
    pub required: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceKeyConfig {
    pub identity: String,
    pub capabilities: Vec<String>,
}

/// A validated rule: who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    Identity(SpiffeId),
    Service(String),
    Namespace(String),
}

impl Rule {
    pub fn matches(&self, source: &SpiffeId, source_service: Option<&str>) -> bool {
        match self {
            Rule::Identity(id) => id == source,
            Rule::Service(svc) => source_service == Some(svc.as_str()),
            Rule::Namespace(ns) => source.namespace == *ns,
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Identity(id) => write!(f, "from {id}"),
            Rule::Service(svc) => write!(f, "from_service {svc}"),
            Rule::Namespace(ns) => write!(f, "from_namespace {ns}"),
        }
    }
}

/// A validated policy for one destination service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub service: String,
    pub default_allow: bool,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
    pub required_capabilities: Vec<String>,
    /// Dry run: would-deny decisions are allowed (and counted as such).
    pub audit: bool,
}

/// The validated config: policies keyed by destination service, capabilities by identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledAuthz {
    pub policies: HashMap<String, Policy>,
    pub capabilities: HashMap<SpiffeId, HashSet<String>>,
    /// Decision for a service without a policy (`policy.default`).
    pub default_allow: bool,
}

impl AuthzConfig {
    pub fn from_yaml(text: &str) -> Result<Self, AuthzConfigError> {
        Ok(serde_yaml::from_str(text)?)
    }

    /// Validates every field; the first error names the field path and the bad value.
    pub fn compile(&self) -> Result<CompiledAuthz, AuthzConfigError> {
        let mut policies: HashMap<String, Policy> = HashMap::new();
        let mut names = HashSet::new();
        for (i, p) in self.authorization.iter().enumerate() {
            let at = format!("authorization[{i}]");
            check_name(&format!("{at}.name"), &p.name)?;
            check_name(&format!("{at}.service"), &p.service)?;
            if !names.insert(p.name.as_str()) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("duplicate policy name {:?}", p.name),
                ));
            }
            // One policy per service keeps the decision (and its log line) unambiguous.
            if let Some(other) = policies.get(&p.service) {
                return Err(invalid(
                    format!("{at}.service"),
                    format!(
                        "service {:?} already has policy {:?}",
                        p.service, other.name
                    ),
                ));
            }
            let allow = compile_rules(&format!("{at}.allow"), &p.allow)?;
            let deny = compile_rules(&format!("{at}.deny"), &p.deny)?;
            let required_capabilities = match &p.capabilities {
                None => Vec::new(),
                Some(c) => {
                    for (j, cap) in c.required.iter().enumerate() {
                        check_name(&format!("{at}.capabilities.required[{j}]"), cap)?;
                    }
                    c.required.clone()
                }
            };
            let default_allow = match p.default {
                Some(DefaultAction::Allow) => true,
                Some(DefaultAction::Deny) => false,
                None => allow.is_empty(),
            };
            policies.insert(
                p.service.clone(),
                Policy {
                    name: p.name.clone(),
                    service: p.service.clone(),
                    default_allow,
                    allow,
                    deny,
                    required_capabilities,
                    audit: p.mode == PolicyMode::Audit,
                },
            );
        }

        let mut capabilities: HashMap<SpiffeId, HashSet<String>> = HashMap::new();
        for (i, key) in self.service_keys.iter().enumerate() {
            let at = format!("service_keys[{i}]");
            let id = parse_id(&format!("{at}.identity"), &key.identity)?;
            for (j, cap) in key.capabilities.iter().enumerate() {
                check_name(&format!("{at}.capabilities[{j}]"), cap)?;
            }
            capabilities
                .entry(id)
                .or_default()
                .extend(key.capabilities.iter().cloned());
        }
        Ok(CompiledAuthz {
            policies,
            capabilities,
            default_allow: self.mesh_default == DefaultAction::Allow,
        })
    }
}

fn compile_rules(at: &str, rules: &[RuleConfig]) -> Result<Vec<Rule>, AuthzConfigError> {
    rules
        .iter()
        .enumerate()
        .map(|(j, r)| {
            let at = format!("{at}[{j}]");
            match (&r.from, &r.from_service, &r.from_namespace) {
                (Some(id), None, None) => Ok(Rule::Identity(parse_id(&format!("{at}.from"), id)?)),
                (None, Some(svc), None) => {
                    check_name(&format!("{at}.from_service"), svc)?;
                    Ok(Rule::Service(svc.clone()))
                }
                (None, None, Some(ns)) => {
                    check_name(&format!("{at}.from_namespace"), ns)?;
                    Ok(Rule::Namespace(ns.clone()))
                }
                _ => Err(invalid(
                    at,
                    "set exactly one of from, from_service, from_namespace".to_owned(),
                )),
            }
        })
        .collect()
}

fn parse_id(field: &str, value: &str) -> Result<SpiffeId, AuthzConfigError> {
    value.parse().map_err(|e| {
        invalid(
            field.to_owned(),
            format!("{value:?} is not a SPIFFE ID ({e})"),
        )
    })
}

fn check_name(field: &str, value: &str) -> Result<(), AuthzConfigError> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field.to_owned(),
            format!("{value:?} must be non-empty letters, digits, '-', '.' or '_'"),
        ))
    }
}
