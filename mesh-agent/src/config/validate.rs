//! Semantic checks the YAML parser cannot do. The whole config is checked before anything is
//! applied, so a bad file never leaves the kernel maps half-written.

use std::collections::HashSet;

use mesh_common::limits;

use std::time::Duration;

use super::{duration_text, Config, ConfigError, WILDCARD};

pub fn validate(config: &Config) -> Result<(), ConfigError> {
    check_name("node.name", &config.node.name)?;
    check_name("node.instance", &config.node.instance)?;
    if config.node.agent_ip.is_unspecified() {
        return Err(ConfigError::invalid(
            "node.agent_ip",
            "must be a concrete address pods can reach, not 0.0.0.0",
        ));
    }
    check_name("node.trust_domain", &config.node.trust_domain)?;
    if config.proxy.connect_timeout.is_zero() {
        return Err(ConfigError::invalid(
            "proxy.connect_timeout",
            "must be greater than 0",
        ));
    }

    super::sanity::validate(config)?;
    validate_limits(config)?;
    validate_identity(config)?;
    validate_nodes(config)?;
    super::registry::validate_registry(&config.registry)?;
    if let Some(zone) = &config.node.zone {
        if !is_dns_label(zone) {
            return Err(ConfigError::invalid(
                "node.zone",
                format!("{zone:?} must be a lowercase DNS label"),
            ));
        }
    }
    validate_service_policies(config)?;
    validate_authorization(config)?;
    validate_egress(config)?;
    validate_tracing(&config.observability.tracing)?;
    let mut names = HashSet::new();
    let mut vips = HashSet::new();
    for (i, s) in config.services.iter().enumerate() {
        let field = format!("services[{i}]");
        check_name(&format!("{field}.name"), &s.name)?;
        check_name(&format!("{field}.namespace"), &s.namespace)?;
        if !names.insert(s.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("{field}.name"),
                format!("duplicate service name {:?}", s.name),
            ));
        }
        if !vips.insert(s.vip) {
            return Err(ConfigError::invalid(
                format!("{field}.vip"),
                format!("{} is already used by another service", s.vip),
            ));
        }
        if s.vip.port() == 0 || s.vip.ip().is_unspecified() {
            return Err(ConfigError::invalid(
                format!("{field}.vip"),
                format!("{} must have a non-zero address and port", s.vip),
            ));
        }
        for (j, e) in s.endpoints.iter().enumerate() {
            let a = e.address();
            if a.port() == 0 || a.ip().is_unspecified() {
                return Err(ConfigError::invalid(
                    format!("{field}.endpoints[{j}]"),
                    format!("{a} must have a non-zero address and port"),
                ));
            }
            if e.weight() == 0 {
                return Err(ConfigError::invalid(
                    format!("{field}.endpoints[{j}].weight"),
                    "0 must be at least 1",
                ));
            }
            if let Some(node) = e.node() {
                if node != config.node.name && !config.nodes.iter().any(|n| n.name == node) {
                    return Err(ConfigError::invalid(
                        format!("{field}.endpoints[{j}].node"),
                        format!("{node:?} is neither this node nor listed in `nodes`"),
                    ));
                }
            }
        }
    }
    if let Some(d) = &config.traffic_defaults {
        super::service_policy::validate("traffic_defaults", d)?;
    }
    for (i, s) in config.services.iter().enumerate() {
        if let Some(p) = &s.policy {
            super::service_policy::validate(&format!("services[{i}].policy"), &p.traffic())?;
        }
    }
    // One SERVICES entry is the registry API's (caller identity for registrations).
    if config.services.len() >= limits::MAX_SERVICES as usize {
        return Err(ConfigError::invalid(
            "services",
            format!(
                "{} services exceed the kernel map capacity {} (one entry is the registry API's)",
                config.services.len(),
                limits::MAX_SERVICES - 1
            ),
        ));
    }

    let mut workload_names = HashSet::new();
    let mut cgroups = HashSet::new();
    let mut identities = HashSet::new();
    for (i, w) in config.workloads.iter().enumerate() {
        let field = format!("workloads[{i}]");
        check_name(&format!("{field}.name"), &w.name)?;
        check_name(&format!("{field}.namespace"), &w.namespace)?;
        check_name(&format!("{field}.service_account"), &w.service_account)?;
        if !workload_names.insert((w.namespace.as_str(), w.name.as_str())) {
            return Err(ConfigError::invalid(
                format!("{field}.name"),
                format!("duplicate workload {}/{}", w.namespace, w.name),
            ));
        }
        if w.cgroup.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                format!("{field}.cgroup"),
                "must not be empty",
            ));
        }
        // The service name becomes the certificate CN and DNS SAN <service>.<namespace>.svc.
        let service = w.service_name();
        if !is_dns_label(service) {
            let which = if w.service.is_some() {
                "service"
            } else {
                "name"
            };
            return Err(ConfigError::invalid(
                format!("{field}.{which}"),
                format!("{service:?} must be a DNS label (a-z, 0-9, '-') as it names the workload's service"),
            ));
        }
        if !cgroups.insert(&w.cgroup) {
            return Err(ConfigError::invalid(
                format!("{field}.cgroup"),
                format!("{} is already used by another workload", w.cgroup.display()),
            ));
        }
        identities.insert(w.identity());
    }
    if config.workloads.len() > limits::MAX_WORKLOADS as usize {
        return Err(ConfigError::invalid(
            "workloads",
            format!(
                "{} workloads exceed the kernel map capacity {}",
                config.workloads.len(),
                limits::MAX_WORKLOADS
            ),
        ));
    }
    // Identity ids index the per-CPU counter array; id 0 is reserved for unknown workloads.
    if identities.len() >= limits::MAX_IDENTITIES as usize {
        return Err(ConfigError::invalid(
            "workloads",
            format!(
                "{} identities exceed the limit {}",
                identities.len(),
                limits::MAX_IDENTITIES - 1
            ),
        ));
    }

    let mut rule_names = HashSet::new();
    for (i, r) in config.policy.deny.iter().enumerate() {
        let field = format!("policy.deny[{i}]");
        check_name(&format!("{field}.name"), &r.name)?;
        if !rule_names.insert(r.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("{field}.name"),
                format!("duplicate rule name {:?}", r.name),
            ));
        }
        if r.from != WILDCARD && !identities.contains(&r.from) {
            let message = if r.from.contains('/') {
                format!(
                    "{:?} is not the identity of any workload on this node",
                    r.from
                )
            } else {
                format!(
                    "{:?} must be <namespace>/<service-account> or \"*\"",
                    r.from
                )
            };
            return Err(ConfigError::invalid(format!("{field}.from"), message));
        }
        if r.to != WILDCARD && !names.contains(r.to.as_str()) {
            return Err(ConfigError::invalid(
                format!("{field}.to"),
                format!("{:?} is not a configured service", r.to),
            ));
        }
    }
    let deny_entries: usize = config
        .policy
        .deny
        .iter()
        .map(|r| {
            let from = if r.from == WILDCARD {
                identities.len()
            } else {
                1
            };
            let to = if r.to == WILDCARD {
                config.services.len()
            } else {
                1
            };
            from * to
        })
        .sum();
    if deny_entries > limits::MAX_DENY_RULES as usize {
        return Err(ConfigError::invalid(
            "policy.deny",
            format!(
                "expands to {deny_entries} kernel entries, over the capacity {}",
                limits::MAX_DENY_RULES
            ),
        ));
    }
    Ok(())
}

/// 12h-48h keeps a stolen certificate short-lived yet leaves a long window for CA outages.
const MIN_CERT_TTL: Duration = Duration::from_secs(12 * 3600);
const MAX_CERT_TTL: Duration = Duration::from_secs(48 * 3600);

fn validate_identity(config: &Config) -> Result<(), ConfigError> {
    let id = &config.identity;
    match (&id.ca_cert, &id.ca_key) {
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "identity.ca_key",
                "must be set together with identity.ca_cert",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "identity.ca_cert",
                "must be set together with identity.ca_key",
            ))
        }
        _ => {}
    }
    if let Some(service) = &id.ca_service {
        if id.ca_cert.is_some() {
            return Err(ConfigError::invalid(
                "identity.ca_service",
                "excludes identity.ca_cert/ca_key: with a CA service the node holds no CA key",
            ));
        }
        if service.timeout.is_zero() || service.timeout > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "identity.ca_service.timeout",
                format!("{:?} must be more than 0 and at most 60s", service.timeout),
            ));
        }
    }
    let ttl = id.cert_ttl;
    if ttl.is_zero() || ttl > MAX_CERT_TTL || (ttl < MIN_CERT_TTL && !id.allow_short_ttl) {
        return Err(ConfigError::invalid(
            "identity.cert_ttl",
            format!(
                "{} must be between 12h and 48h",
                duration_text::format(&ttl)
            ),
        ));
    }
    Ok(())
}

/// `services[].policy` allow/deny entries, checked here so errors name the service's field (the
/// block compiles into an `authorization` entry that has no place in the file).
fn validate_service_policies(config: &Config) -> Result<(), ConfigError> {
    use super::service_policy::NAMESPACE_PREFIX;
    for (i, s) in config.services.iter().enumerate() {
        let Some(policy) = s.policy.as_ref().filter(|p| p.has_authorization()) else {
            continue;
        };
        if let Some(other) = config.authorization.iter().find(|a| a.service == s.name) {
            return Err(ConfigError::invalid(
                format!("services[{i}].policy"),
                format!(
                    "service {:?} already has authorization policy {:?}; write its callers in one place",
                    s.name, other.name
                ),
            ));
        }
        for (list, entries) in [("allow", &policy.allow), ("deny", &policy.deny)] {
            for (j, entry) in entries.iter().enumerate() {
                let field = format!("services[{i}].policy.{list}[{j}]");
                if entry.starts_with("spiffe://") {
                    entry.parse::<crate::identity::SpiffeId>().map_err(|e| {
                        ConfigError::invalid(
                            &field,
                            format!("{} is not a SPIFFE ID ({e})", short(entry)),
                        )
                    })?;
                } else if let Some(ns) = entry.strip_prefix(NAMESPACE_PREFIX) {
                    check_name(&field, ns)?;
                } else {
                    check_name(&field, entry)?;
                }
            }
        }
    }
    Ok(())
}

fn validate_limits(config: &Config) -> Result<(), ConfigError> {
    let p = &config.proxy;
    if p.max_connections == 0 {
        return Err(ConfigError::invalid(
            "proxy.max_connections",
            "must be greater than 0",
        ));
    }
    if p.max_connections_per_identity == 0 || p.max_connections_per_identity > p.max_connections {
        return Err(ConfigError::invalid(
            "proxy.max_connections_per_identity",
            format!(
                "{} must be 1..=proxy.max_connections ({})",
                p.max_connections_per_identity, p.max_connections
            ),
        ));
    }
    if p.idle_timeout.is_zero() {
        return Err(ConfigError::invalid(
            "proxy.idle_timeout",
            "must be greater than 0",
        ));
    }
    Ok(())
}

/// A collector or backend URL: http:// or https://.
pub(crate) fn check_http_url(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.starts_with("http://") || value.starts_with("https://") {
        return Ok(());
    }
    Err(ConfigError::invalid(
        field,
        format!("{} must be an http:// or https:// URL", short(value)),
    ))
}

fn validate_tracing(t: &super::TracingConfig) -> Result<(), ConfigError> {
    if let Some(url) = &t.otlp_endpoint {
        check_http_url("observability.tracing.otlp_endpoint", url)?;
        // The exporter is built without TLS; an https:// collector would never get a span.
        if url.starts_with("https://") {
            return Err(ConfigError::invalid(
                "observability.tracing.otlp_endpoint",
                format!(
                    "{} uses https://, but spans are sent without TLS: use an http:// collector (e.g. a local OpenTelemetry Collector)",
                    short(url)
                ),
            ));
        }
        if url.parse::<hyper::Uri>().is_err() {
            return Err(ConfigError::invalid(
                "observability.tracing.otlp_endpoint",
                format!("{} is not a valid URL", short(url)),
            ));
        }
    }
    if !(0.0..=1.0).contains(&t.sampling) {
        return Err(ConfigError::invalid(
            "observability.tracing.sampling",
            format!("{} must be within 0.0..=1.0", t.sampling),
        ));
    }
    if t.service_name.is_empty() {
        return Err(ConfigError::invalid(
            "observability.tracing.service_name",
            "must not be empty",
        ));
    }
    Ok(())
}

fn validate_egress(config: &Config) -> Result<(), ConfigError> {
    use mesh_common::egress::MAX_EGRESS_PORTS;
    for (i, d) in config.egress.dns.iter().enumerate() {
        if d.port() == 0 || d.ip().is_unspecified() {
            return Err(ConfigError::invalid(
                format!("egress.dns[{i}]"),
                format!("{d} is not a resolver address (ip:port)"),
            ));
        }
    }
    let mut names = HashSet::new();
    for (i, r) in config.egress.rules.iter().enumerate() {
        let at = format!("egress.rules[{i}]");
        check_name(&format!("{at}.name"), &r.name)?;
        if !names.insert(r.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("{at}.name"),
                format!("duplicate egress rule name {}", short(&r.name)),
            ));
        }
        super::egress::parse_cidr(&r.cidr).map_err(|e| {
            ConfigError::invalid(format!("{at}.cidr"), format!("{}: {e}", short(&r.cidr)))
        })?;
        if r.ports.len() > MAX_EGRESS_PORTS {
            return Err(ConfigError::invalid(
                format!("{at}.ports"),
                format!("at most {MAX_EGRESS_PORTS} ports per rule; use more rules"),
            ));
        }
        if let Some(j) = r.ports.iter().position(|p| *p == 0) {
            return Err(ConfigError::invalid(
                format!("{at}.ports[{j}]"),
                "0 is not a port; leave `ports` out to allow every port",
            ));
        }
        match (&r.from, &r.from_namespace) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    at,
                    "set at most one of from, from_namespace",
                ))
            }
            (Some(id), None) => {
                let Some((ns, sa)) = id.split_once('/') else {
                    return Err(ConfigError::invalid(
                        format!("{at}.from"),
                        format!("{} must be <namespace>/<service-account>", short(id)),
                    ));
                };
                check_name(&format!("{at}.from"), ns)?;
                check_name(&format!("{at}.from"), sa)?;
            }
            (None, Some(ns)) => check_name(&format!("{at}.from_namespace"), ns)?,
            (None, None) => {}
        }
    }
    Ok(())
}

/// A parser message, which may quote a bad value whole, cut to a readable length.
pub(crate) fn short_message(message: &str) -> String {
    const MAX: usize = 300;
    match message.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}... (cut)", &message[..cut]),
        None => message.to_owned(),
    }
}

/// A bad value quoted in an error: at most a short prefix, so a huge value cannot flood logs.
pub(crate) fn short(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &value[..cut]),
        None => format!("{value:?}"),
    }
}

fn validate_authorization(config: &Config) -> Result<(), ConfigError> {
    use crate::policy::authz_config::AuthzConfigError;
    config.authz().compile().map_err(|e| match e {
        AuthzConfigError::Invalid { field, message } => ConfigError::invalid(field, message),
        other => ConfigError::invalid("authorization", other.to_string()),
    })?;
    let services: HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    for (i, p) in config.authorization.iter().enumerate() {
        if !services.contains(p.service.as_str()) {
            return Err(ConfigError::invalid(
                format!("authorization[{i}].service"),
                format!("{:?} is not a configured service", p.service),
            ));
        }
    }
    Ok(())
}

fn validate_nodes(config: &Config) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, n) in config.nodes.iter().enumerate() {
        check_name(&format!("nodes[{i}].name"), &n.name)?;
        if !seen.insert(n.name.as_str()) {
            return Err(ConfigError::invalid(
                format!("nodes[{i}].name"),
                format!("duplicate node {:?}", n.name),
            ));
        }
        if n.hbone.port() == 0 || n.hbone.ip().is_unspecified() {
            return Err(ConfigError::invalid(
                format!("nodes[{i}].hbone"),
                format!("{} must have a non-zero address and port", n.hbone),
            ));
        }
    }
    Ok(())
}

/// Names end up in metric labels, pin paths and SPIFFE IDs: keep them to a safe alphabet.
fn check_name(field: &str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!(
                "{} must be 1-63 characters of a-z, 0-9, '-', '.', '_'",
                short(value)
            ),
        ))
    }
}

/// A lowercase DNS label (RFC 1123): 1-63 of a-z, 0-9, '-', not starting or ending with '-'.
/// The one check for names that become DNS names (services, registry records).
pub fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}
