//! Per-service traffic policy (`services[].policy`) and its mesh-wide defaults
//! (`traffic_defaults`), written the way seed 001 §18 writes them:
//!
//! ```yaml
//! policy:
//!   timeouts: {request: 1s, per_try: 500ms, connect: 1s}
//!   retries: {enabled: false}        # or {max: 3, backoff: {base: 25ms, max: 1s}, ...}
//!   circuit_breaker: {failures: 5, recovery: 60s, half_open: 3}
//!   rate_limit: 500/min              # or {rate: 500/min, per_caller: true}
//!   concurrency: 100
//!   load_balancer: p2c_ewma
//! ```
//!
//! Every field is optional; a service's value wins over `traffic_defaults`, which wins over the
//! built-in defaults (seed 001 §7, seed 003). [`TrafficRules`] is the resolved result the data
//! path uses.
//!
//! Authorization fields of the same block: `allow: [orders, "spiffe://...", "namespace:ops"]`,
//! `deny: [...]`, `mTLS: required`. The service's callers are exactly its allow-list: `allow` and
//! `deny` compile into an `authorization` policy for the service (checked by the destination
//! agent) and into the kernel's ALLOW/DENY maps (checked at connect() on the caller's node).

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;
use crate::policy::authz_config::{DefaultAction, PolicyConfig, PolicyMode, RuleConfig};

/// The `policy` block of one service. Other policy kinds (authorization) join this struct.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    /// `auto` (sniff the first bytes), `http` or `tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// Requests (HTTP) or connections (TCP) in flight at once; more are refused (503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Callers admitted: a caller service name, a SPIFFE ID (`spiffe://...`) or
    /// `namespace:<ns>`. Non-empty: everyone else is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Callers refused, in the same forms; a deny beats an allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// `required`: the service is reached only through the mesh (mTLS between nodes, the agent
    /// on the node): its workloads run in strict mode.
    #[serde(default, alias = "mTLS", skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
}

/// `traffic_defaults`: the same traffic fields, mesh-wide.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

impl ServicePolicy {
    /// The traffic fields, in the shape of the defaults they override.
    pub fn traffic(&self) -> TrafficDefaults {
        TrafficDefaults {
            protocol: self.protocol,
            timeouts: self.timeouts.clone(),
            retries: self.retries.clone(),
            circuit_breaker: self.circuit_breaker.clone(),
            rate_limit: self.rate_limit.clone(),
            concurrency: self.concurrency,
            load_balancer: self.load_balancer,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 methods or the HTTP/2 preface within the sniff window, else opaque TCP.
    #[default]
    Auto,
    Http,
    Tcp,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency weighted by in-flight requests.
    #[default]
    P2cEwma,
    RoundRobin,
    LeastRequest,
    WeightedRoundRobin,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Whole request, retries and backoff included.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub request: Option<Duration>,
    /// One attempt.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub per_try: Option<Duration>,
    /// Connecting to one endpoint (TCP, or the HBONE tunnel).
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub connect: Option<Duration>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetriesConfig {
    /// `false` turns retries off (other fields are then not allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Retries after the first attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffConfig>,
    /// Conditions that are retried: connect-failure, reset, and 5xx status codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<String>>")]
    pub on: Option<Vec<RetryOn>>,
    /// Retry non-idempotent methods (POST, PATCH, ...) too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_idempotent: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetConfig>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub base: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub max: Option<Duration>,
}

/// Retries may add at most `ratio` of the requests, plus `min_per_second` (as Linkerd does).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open an endpoint's breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
    /// How long it stays open before half-open probes (grows with repeated trips).
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub recovery: Option<Duration>,
    /// Successful probe calls in half-open that close it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open: Option<u32>,
}

/// A retried condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOn {
    /// The endpoint could not be connected (nothing was sent).
    ConnectFailure,
    /// The connection failed before a response arrived.
    Reset,
    /// The endpoint answered this 5xx status.
    Status(u16),
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryOn::ConnectFailure => f.write_str("connect-failure"),
            RetryOn::Reset => f.write_str("reset"),
            RetryOn::Status(code) => write!(f, "{code}"),
        }
    }
}

impl std::str::FromStr for RetryOn {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "connect-failure" => Ok(RetryOn::ConnectFailure),
            "reset" => Ok(RetryOn::Reset),
            code => match code.parse::<u16>() {
                Ok(c) if (500..600).contains(&c) => Ok(RetryOn::Status(c)),
                _ => Err(format!(
                    "{text:?} is not connect-failure, reset or a 5xx status code"
                )),
            },
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::Status(code) => s.serialize_u16(*code),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // YAML reads `503` as a number and `reset` as text; both are accepted.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Code(c) => c.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `500/min`, or `{rate: 500/min, per_caller: true}` for one bucket per calling identity.
#[derive(Clone, Debug, PartialEq, JsonSchema)]
#[schemars(with = "String")]
pub struct RateLimitConfig {
    pub rate: Rate,
    pub per_caller: bool,
}

/// `<requests>/<s|sec|second|min|minute|h|hour>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub requests: u32,
    pub per: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        f64::from(self.requests) / self.per.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.requests)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a rate like \"500/min\" (units: s, min, h)");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let requests: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if requests == 0 {
            return Err(format!("{text:?}: the rate must allow at least 1 request"));
        }
        Ok(Rate { requests, per })
    }
}

impl Serialize for RateLimitConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if !self.per_caller {
            return s.serialize_str(&self.rate.to_string());
        }
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("rate", &self.rate.to_string())?;
        map.serialize_entry("per_caller", &true)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for RateLimitConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            rate: String,
            #[serde(default)]
            per_caller: bool,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Short(String),
            Full(Full),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a rate like \"500/min\" or {rate: 500/min, per_caller: true}",
            )
        })?;
        let (text, per_caller) = match raw {
            Raw::Short(t) => (t, false),
            Raw::Full(f) => (f.rate, f.per_caller),
        };
        let rate = text.parse().map_err(serde::de::Error::custom)?;
        Ok(RateLimitConfig { rate, per_caller })
    }
}

/// Optional durations written as text.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::duration_text;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        duration_text::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// Built-in defaults: seed 001 §7 (request timeout 3 s, retries max 3) and seed 003 (breaker
/// 5 failures / 60 s / 3 half-open calls; backoff base 1 s, max 30 s, factor 2, jitter).
pub mod defaults {
    use std::time::Duration;

    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
    pub const RETRIES: u32 = 3;
    pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
    pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
    pub const BUDGET_RATIO: f64 = 0.2;
    pub const BUDGET_MIN_PER_SECOND: u32 = 10;
    pub const BREAKER_FAILURES: u32 = 5;
    pub const BREAKER_RECOVERY: Duration = Duration::from_secs(60);
    pub const BREAKER_HALF_OPEN: u32 = 3;
}

/// The rules one service runs under, defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficRules {
    pub protocol: Protocol,
    pub request_timeout: Duration,
    /// None: an attempt may use what is left of the request timeout.
    pub per_try_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// None: retries are off.
    pub retry: Option<RetryRules>,
    pub breaker: BreakerRules,
    pub rate_limit: Option<RateLimitConfig>,
    pub concurrency: Option<u32>,
    pub load_balancer: LoadBalancer,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryRules {
    pub max: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub on: Vec<RetryOn>,
    pub non_idempotent: bool,
    pub budget_ratio: f64,
    pub budget_min_per_second: u32,
}

impl RetryRules {
    pub fn retries(&self, condition: RetryOn) -> bool {
        self.on.contains(&condition)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerRules {
    pub failures: u32,
    pub recovery: Duration,
    pub half_open: u32,
}

/// Later layers win field by field.
fn pick<T: Clone>(layers: &[Option<&T>]) -> Option<T> {
    layers.iter().rev().find_map(|l| l.cloned())
}

impl TrafficRules {
    /// Resolves a service's rules: `service` over `defaults` over the built-in values;
    /// `connect_default` is `proxy.connect_timeout`.
    pub fn resolve(
        defaults: Option<&TrafficDefaults>,
        service: Option<&TrafficDefaults>,
        connect_default: Duration,
    ) -> TrafficRules {
        let layers = [defaults, service];
        let timeouts: Vec<Option<&TimeoutsConfig>> = layers
            .iter()
            .map(|l| l.and_then(|p| p.timeouts.as_ref()))
            .collect();
        let timeout = |f: fn(&TimeoutsConfig) -> Option<&Duration>| {
            pick(&timeouts.iter().map(|t| t.and_then(f)).collect::<Vec<_>>())
        };
        let retries: Vec<Option<&RetriesConfig>> = layers
            .iter()
            .map(|l| l.and_then(|p| p.retries.as_ref()))
            .collect();
        let breakers: Vec<Option<&BreakerConfig>> = layers
            .iter()
            .map(|l| l.and_then(|p| p.circuit_breaker.as_ref()))
            .collect();
        let breaker = |f: fn(&BreakerConfig) -> Option<&u32>| {
            pick(&breakers.iter().map(|b| b.and_then(f)).collect::<Vec<_>>())
        };
        TrafficRules {
            protocol: pick(&layers.map(|l| l.and_then(|p| p.protocol.as_ref())))
                .unwrap_or_default(),
            request_timeout: timeout(|t| t.request.as_ref()).unwrap_or(defaults::REQUEST_TIMEOUT),
            per_try_timeout: timeout(|t| t.per_try.as_ref()),
            connect_timeout: timeout(|t| t.connect.as_ref()).unwrap_or(connect_default),
            retry: resolve_retries(&retries),
            breaker: BreakerRules {
                failures: breaker(|b| b.failures.as_ref()).unwrap_or(defaults::BREAKER_FAILURES),
                recovery: pick(
                    &breakers
                        .iter()
                        .map(|b| b.and_then(|b| b.recovery.as_ref()))
                        .collect::<Vec<_>>(),
                )
                .unwrap_or(defaults::BREAKER_RECOVERY),
                half_open: breaker(|b| b.half_open.as_ref()).unwrap_or(defaults::BREAKER_HALF_OPEN),
            },
            rate_limit: pick(&layers.map(|l| l.and_then(|p| p.rate_limit.as_ref()))),
            concurrency: pick(&layers.map(|l| l.and_then(|p| p.concurrency.as_ref()))),
            load_balancer: pick(&layers.map(|l| l.and_then(|p| p.load_balancer.as_ref())))
                .unwrap_or_default(),
        }
    }
}

fn resolve_retries(layers: &[Option<&RetriesConfig>]) -> Option<RetryRules> {
    // The nearest layer that says `enabled` decides on/off; values merge field by field.
    let enabled = pick(
        &layers
            .iter()
            .map(|r| r.and_then(|r| r.enabled.as_ref()))
            .collect::<Vec<_>>(),
    );
    if enabled == Some(false) {
        return None;
    }
    let field = |f: fn(&RetriesConfig) -> Option<&u32>| {
        pick(&layers.iter().map(|r| r.and_then(f)).collect::<Vec<_>>())
    };
    let backoffs: Vec<Option<&BackoffConfig>> = layers
        .iter()
        .map(|r| r.and_then(|r| r.backoff.as_ref()))
        .collect();
    let backoff = |f: fn(&BackoffConfig) -> Option<&Duration>| {
        pick(&backoffs.iter().map(|b| b.and_then(f)).collect::<Vec<_>>())
    };
    let budgets: Vec<Option<&BudgetConfig>> = layers
        .iter()
        .map(|r| r.and_then(|r| r.budget.as_ref()))
        .collect();
    let max = field(|r| r.max.as_ref()).unwrap_or(defaults::RETRIES);
    if max == 0 {
        return None;
    }
    Some(RetryRules {
        max,
        backoff_base: backoff(|b| b.base.as_ref()).unwrap_or(defaults::BACKOFF_BASE),
        backoff_max: backoff(|b| b.max.as_ref()).unwrap_or(defaults::BACKOFF_MAX),
        on: pick(
            &layers
                .iter()
                .map(|r| r.and_then(|r| r.on.as_ref()))
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|| {
            vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::Status(502),
                RetryOn::Status(503),
                RetryOn::Status(504),
            ]
        }),
        non_idempotent: pick(
            &layers
                .iter()
                .map(|r| r.and_then(|r| r.non_idempotent.as_ref()))
                .collect::<Vec<_>>(),
        )
        .unwrap_or(false),
        budget_ratio: pick(
            &budgets
                .iter()
                .map(|b| b.and_then(|b| b.ratio.as_ref()))
                .collect::<Vec<_>>(),
        )
        .unwrap_or(defaults::BUDGET_RATIO),
        budget_min_per_second: pick(
            &budgets
                .iter()
                .map(|b| b.and_then(|b| b.min_per_second.as_ref()))
                .collect::<Vec<_>>(),
        )
        .unwrap_or(defaults::BUDGET_MIN_PER_SECOND),
    })
}

/// Checks one traffic block; `field` is its path, e.g. `services[2].policy`.
pub fn validate(field: &str, p: &TrafficDefaults) -> Result<(), ConfigError> {
    let invalid =
        |sub: &str, message: String| ConfigError::invalid(format!("{field}.{sub}"), message);
    let positive = |sub: &str, d: Option<Duration>| match d {
        Some(d) if d.is_zero() => Err(invalid(sub, "0ms must be greater than 0".to_owned())),
        _ => Ok(()),
    };
    if let Some(t) = &p.timeouts {
        positive("timeouts.request", t.request)?;
        positive("timeouts.per_try", t.per_try)?;
        positive("timeouts.connect", t.connect)?;
        if let (Some(r), Some(t)) = (t.request, t.per_try) {
            if t > r {
                return Err(invalid(
                    "timeouts.per_try",
                    format!(
                        "{}ms is longer than timeouts.request {}ms",
                        t.as_millis(),
                        r.as_millis()
                    ),
                ));
            }
        }
    }
    if let Some(r) = &p.retries {
        if r.enabled == Some(false)
            && (r.max.is_some()
                || r.backoff.is_some()
                || r.on.is_some()
                || r.budget.is_some()
                || r.non_idempotent.is_some())
        {
            return Err(invalid(
                "retries",
                "`enabled: false` turns retries off; remove the other retry fields".to_owned(),
            ));
        }
        if let Some(max) = r.max {
            if max > 10 {
                return Err(invalid("retries.max", format!("{max} is more than 10")));
            }
        }
        if let Some(b) = &r.backoff {
            positive("retries.backoff.base", b.base)?;
            positive("retries.backoff.max", b.max)?;
            if let (Some(base), Some(max)) = (b.base, b.max) {
                if base > max {
                    return Err(invalid(
                        "retries.backoff.base",
                        format!(
                            "{}ms is larger than backoff.max {}ms",
                            base.as_millis(),
                            max.as_millis()
                        ),
                    ));
                }
            }
        }
        if let Some(on) = &r.on {
            if on.is_empty() {
                return Err(invalid(
                    "retries.on",
                    "[] retries nothing; use `retries: {enabled: false}`".to_owned(),
                ));
            }
        }
        if let Some(b) = &r.budget {
            if let Some(ratio) = b.ratio {
                if !(0.0..=1.0).contains(&ratio) || ratio.is_nan() {
                    return Err(invalid(
                        "retries.budget.ratio",
                        format!("{ratio} must be between 0 and 1"),
                    ));
                }
            }
        }
    }
    if let Some(b) = &p.circuit_breaker {
        if b.failures == Some(0) {
            return Err(invalid(
                "circuit_breaker.failures",
                "0 must be at least 1".to_owned(),
            ));
        }
        if b.half_open == Some(0) {
            return Err(invalid(
                "circuit_breaker.half_open",
                "0 must be at least 1".to_owned(),
            ));
        }
        positive("circuit_breaker.recovery", b.recovery)?;
    }
    if p.concurrency == Some(0) {
        return Err(invalid(
            "concurrency",
            "0 would refuse everything; must be at least 1".to_owned(),
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    Required,
}

/// Prefix of a namespace entry in `allow`/`deny`.
pub const NAMESPACE_PREFIX: &str = "namespace:";

impl ServicePolicy {
    /// Whether the block says anything about authorization.
    pub fn has_authorization(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }

    pub fn requires_mtls(&self) -> bool {
        self.mtls == Some(MtlsMode::Required)
    }

    /// The equivalent `authorization` entry for `service`. With an allow-list the default is
    /// deny; with only a deny-list it is the mesh default.
    pub fn to_authorization(&self, service: &str, mesh_default: DefaultAction) -> PolicyConfig {
        PolicyConfig {
            name: format!("{service}.policy"),
            service: service.to_owned(),
            default: Some(if self.allow.is_empty() {
                mesh_default
            } else {
                DefaultAction::Deny
            }),
            allow: self.allow.iter().map(|e| rule(e)).collect(),
            deny: self.deny.iter().map(|e| rule(e)).collect(),
            capabilities: None,
            mode: PolicyMode::Enforce,
        }
    }
}

fn rule(entry: &str) -> RuleConfig {
    if entry.starts_with("spiffe://") {
        RuleConfig {
            from: Some(entry.to_owned()),
            ..Default::default()
        }
    } else if let Some(ns) = entry.strip_prefix(NAMESPACE_PREFIX) {
        RuleConfig {
            from_namespace: Some(ns.to_owned()),
            ..Default::default()
        }
    } else {
        RuleConfig {
            from_service: Some(entry.to_owned()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn config(services_policy: &str, defaults: &str) -> String {
        format!(
            "node: {{name: n1, agent_ip: 10.1.255.1}}\n{defaults}\nservices:\n  - name: a\n    vip: 10.96.0.1:80\n  - name: b\n    vip: 10.96.0.2:80\n  - name: c\n    vip: 10.96.0.3:80\n    endpoints: [{{address: \"10.1.1.2:80\", zone: z1, weight: 3}}]\n{services_policy}"
        )
    }

    fn parse_err(text: &str) -> String {
        match parse(text, "t.yaml", &|_| None) {
            Ok(_) => panic!("should be rejected:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn rules(text: &str, service: usize) -> TrafficRules {
        let c = parse(text, "t.yaml", &|_| None).unwrap_or_else(|e| panic!("{e}\n{text}"));
        TrafficRules::resolve(
            c.traffic_defaults.as_ref(),
            c.services[service]
                .policy
                .as_ref()
                .map(|p| p.traffic())
                .as_ref(),
            c.proxy.connect_timeout,
        )
    }

    #[test]
    fn built_in_defaults_follow_the_seeds() {
        let r = rules(&config("", ""), 0);
        assert_eq!(r.request_timeout, Duration::from_secs(3));
        let retry = r.retry.expect("retries on by default");
        assert_eq!(retry.max, 3);
        assert_eq!(retry.backoff_base, Duration::from_secs(1));
        assert_eq!(retry.backoff_max, Duration::from_secs(30));
        assert!(!retry.non_idempotent);
        assert_eq!(r.breaker.failures, 5);
        assert_eq!(r.breaker.recovery, Duration::from_secs(60));
        assert_eq!(r.breaker.half_open, 3);
        assert_eq!(r.load_balancer, LoadBalancer::P2cEwma);
        assert_eq!(r.protocol, Protocol::Auto);
    }

    #[test]
    fn service_overrides_defaults_field_by_field() {
        let text = config(
            "    policy:\n      timeouts: {request: 1s}\n      retries: {enabled: false}\n      rate_limit: 500/min\n      concurrency: 7\n      load_balancer: round_robin\n      protocol: tcp\n",
            "traffic_defaults:\n  timeouts: {request: 10s, per_try: 400ms}\n  retries: {max: 2, backoff: {base: 25ms, max: 1s}, on: [reset, 503]}\n  circuit_breaker: {failures: 2}\n",
        );
        let c = rules(&text, 2);
        assert_eq!(c.request_timeout, Duration::from_secs(1));
        assert_eq!(c.per_try_timeout, Some(Duration::from_millis(400)));
        assert_eq!(c.retry, None);
        assert_eq!(
            c.rate_limit.as_ref().map(|r| r.rate.per_second()),
            Some(500.0 / 60.0)
        );
        assert_eq!(c.concurrency, Some(7));
        assert_eq!(c.breaker.failures, 2);
        assert_eq!(c.breaker.half_open, 3);
        assert_eq!(c.protocol, Protocol::Tcp);
        let a = rules(&text, 0);
        let retry = a.retry.expect("defaults turn retries on");
        assert_eq!(retry.max, 2);
        assert_eq!(retry.backoff_base, Duration::from_millis(25));
        assert_eq!(retry.on, vec![RetryOn::Reset, RetryOn::Status(503)]);
        assert_eq!(a.request_timeout, Duration::from_secs(10));
    }

    #[test]
    fn per_caller_rate_limit_and_round_trip() {
        let text = config(
            "    policy:\n      rate_limit: {rate: 20/s, per_caller: true}\n      retries: {max: 1, on: [connect-failure, 502]}\n",
            "",
        );
        let c = parse(&text, "t.yaml", &|_| None).expect("parses");
        let p = c.services[2].policy.clone().expect("policy");
        let limit = p.rate_limit.clone().expect("limit");
        assert!(limit.per_caller);
        assert_eq!(limit.rate.requests, 20);
        // The effective config dump parses back to the same value.
        let dumped = serde_yaml::to_string(&c).expect("dump");
        let again = parse(&dumped, "dump.yaml", &|_| None).expect("dump parses");
        assert_eq!(again.services[2].policy, Some(p));
    }

    #[test]
    fn bad_values_name_the_field_and_value() {
        let cases = [
            (
                "      rate_limit: 500/fortnight\n",
                "services[2].policy.rate_limit",
                "500/fortnight",
            ),
            (
                "      timeouts: {request: 0ms}\n",
                "services[2].policy.timeouts.request",
                "0ms",
            ),
            (
                "      timeouts: {request: 1s, per_try: 2s}\n",
                "services[2].policy.timeouts.per_try",
                "2000ms",
            ),
            (
                "      retries: {on: [connect-failure, 404]}\n",
                "services[2].policy.retries.on",
                "404",
            ),
            (
                "      retries: {enabled: false, max: 2}\n",
                "services[2].policy.retries",
                "enabled: false",
            ),
            (
                "      retries: {backoff: {base: 2s, max: 1s}}\n",
                "services[2].policy.retries.backoff.base",
                "2000ms",
            ),
            (
                "      load_balancer: random\n",
                "services[2].policy.load_balancer",
                "random",
            ),
            (
                "      concurrency: 0\n",
                "services[2].policy.concurrency",
                "0",
            ),
            (
                "      circuit_breaker: {failures: 0}\n",
                "services[2].policy.circuit_breaker.failures",
                "0",
            ),
            (
                "      timeouts: {request: 3 parsecs}\n",
                "services[2].policy.timeouts.request",
                "3 parsecs",
            ),
            ("      retry: {max: 1}\n", "services[2].policy", "retry"),
        ];
        for (policy, field, value) in cases {
            let e = parse_err(&config(&format!("    policy:\n{policy}"), ""));
            assert!(e.contains(field) && e.contains(value), "{policy:?} -> {e}");
        }
        let e = parse_err(&config(
            "",
            "traffic_defaults: {retries: {budget: {ratio: 1.5}}}",
        ));
        assert!(
            e.contains("traffic_defaults.retries.budget.ratio") && e.contains("1.5"),
            "{e}"
        );
        let e = parse_err(&config("", "").replace("weight: 3", "weight: 0"));
        assert!(e.contains("services[2].endpoints[0].weight"), "{e}");
    }

    #[test]
    fn entries_map_to_identity_namespace_or_service_rules() {
        let p = ServicePolicy {
            allow: vec![
                "orders".into(),
                "spiffe://cluster.local/ns/shop/sa/checkout".into(),
                "namespace:ops".into(),
            ],
            deny: vec!["ads".into()],
            mtls: Some(MtlsMode::Required),
            ..Default::default()
        };
        let a = p.to_authorization("wallet", DefaultAction::Allow);
        assert_eq!(
            a.default,
            Some(DefaultAction::Deny),
            "allow-list: default deny"
        );
        assert_eq!(a.allow[0].from_service.as_deref(), Some("orders"));
        assert_eq!(
            a.allow[1].from.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/checkout")
        );
        assert_eq!(a.allow[2].from_namespace.as_deref(), Some("ops"));
        assert_eq!(a.deny[0].from_service.as_deref(), Some("ads"));
        assert!(p.requires_mtls());
        let deny_only = ServicePolicy {
            deny: vec!["ads".into()],
            ..Default::default()
        };
        assert_eq!(
            deny_only
                .to_authorization("w", DefaultAction::Allow)
                .default,
            Some(DefaultAction::Allow),
            "deny-list only: mesh default"
        );
    }

    #[test]
    fn seed_spelling_is_accepted() {
        let p: ServicePolicy =
            serde_yaml::from_str("allow: [a]\ndeny: [b]\nmTLS: required\n").expect("seed form");
        assert!(p.requires_mtls());
        assert!(serde_yaml::from_str::<ServicePolicy>("mtls: optional\n").is_err());
        assert!(serde_yaml::from_str::<ServicePolicy>("alow: [a]\n").is_err());
    }
}
