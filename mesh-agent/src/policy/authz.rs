//! Inbound authorization: decides whether a source identity may reach a destination service.
//!
//! Order: no policy for the service -> the mesh default (`policy.default`, deny unless relaxed);
//! a matching deny rule -> deny; a matching allow
//! rule or the policy default -> allow/deny; an allowed request must then hold every required
//! capability (granted to identities by `service_keys`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::identity::SpiffeId;
use crate::policy::authz_config::{AuthzConfig, AuthzConfigError, CompiledAuthz, Policy};

/// Policy name reported when the destination service has no policy (the mesh default decides).
pub const NO_POLICY: &str = "<none>";

/// Decides whether `source` may open a connection to `dest_service`.
pub trait Authorize: Send + Sync {
    fn authorize(
        &self,
        source: &SpiffeId,
        source_service: Option<&str>,
        dest_service: &str,
    ) -> Decision;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Name of the policy that decided, or [`NO_POLICY`].
    pub policy: String,
    pub reason: String,
    /// Allowed only because the policy is in audit mode: enforcing it would deny.
    pub audit_deny: bool,
}

/// One counter of the decision snapshot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DecisionCount {
    pub policy: String,
    pub allowed: bool,
    pub count: u64,
}

/// Decision counters keyed by (policy, allow|deny); shared across reloads so they stay monotonic.
/// Audit-mode would-deny decisions count apart, by policy.
#[derive(Debug, Default)]
pub struct DecisionCounters {
    counts: RwLock<HashMap<(String, bool), AtomicU64>>,
    audit_denies: RwLock<HashMap<String, AtomicU64>>,
}

impl DecisionCounters {
    fn record_audit_deny(&self, policy: &str) {
        {
            let counts = self
                .audit_denies
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = counts.get(policy) {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut counts = self
            .audit_denies
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        counts
            .entry(policy.to_owned())
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// (policy, count) of audit-mode would-deny decisions, sorted by policy.
    pub fn audit_deny_snapshot(&self) -> Vec<(String, u64)> {
        let counts = self
            .audit_denies
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<(String, u64)> = counts
            .iter()
            .map(|(p, c)| (p.clone(), c.load(Ordering::Relaxed)))
            .collect();
        out.sort();
        out
    }

    fn record(&self, policy: &str, allowed: bool) {
        // Fast path under the read lock; the write lock is only taken for a new key.
        {
            let counts = self.counts.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = counts.get(&(policy.to_owned(), allowed)) {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut counts = self.counts.write().unwrap_or_else(PoisonError::into_inner);
        counts
            .entry((policy.to_owned(), allowed))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Sorted by policy then verdict, for stable metrics output.
    pub fn snapshot(&self) -> Vec<DecisionCount> {
        let counts = self.counts.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<DecisionCount> = counts
            .iter()
            .map(|((policy, allowed), c)| DecisionCount {
                policy: policy.clone(),
                allowed: *allowed,
                count: c.load(Ordering::Relaxed),
            })
            .collect();
        out.sort();
        out
    }

    pub fn get(&self, policy: &str, allowed: bool) -> u64 {
        let counts = self.counts.read().unwrap_or_else(PoisonError::into_inner);
        counts
            .get(&(policy.to_owned(), allowed))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// An immutable, validated rule set plus the counters it records into.
#[derive(Debug)]
pub struct Authorizer {
    rules: CompiledAuthz,
    counters: Arc<DecisionCounters>,
}

impl Authorizer {
    pub fn new(config: &AuthzConfig) -> Result<Self, AuthzConfigError> {
        Self::with_counters(config, Arc::default())
    }

    pub fn with_counters(
        config: &AuthzConfig,
        counters: Arc<DecisionCounters>,
    ) -> Result<Self, AuthzConfigError> {
        Ok(Self {
            rules: config.compile()?,
            counters,
        })
    }

    pub fn counters(&self) -> &Arc<DecisionCounters> {
        &self.counters
    }

    /// The decision without counting or logging it (the kernel policy is compiled from it).
    pub fn evaluate(
        &self,
        source: &SpiffeId,
        source_service: Option<&str>,
        dest: &str,
    ) -> Decision {
        // Audit mode allows (the kernel compiles this: an audited policy must not enforce there).
        self.decide_with_mode(source, source_service, dest)
    }

    /// What a caller no rule names gets from `dest`: the policy default (allow for a policy in
    /// audit mode), else the mesh default.
    pub fn default_allows(&self, dest: &str) -> bool {
        self.rules
            .policies
            .get(dest)
            .map_or(self.rules.default_allow, |p| p.default_allow || p.audit)
    }

    fn decide(&self, source: &SpiffeId, source_service: Option<&str>, dest: &str) -> Decision {
        let Some(policy) = self.rules.policies.get(dest) else {
            let default = if self.rules.default_allow {
                "allow"
            } else {
                "deny"
            };
            return verdict(
                self.rules.default_allow,
                NO_POLICY,
                format!("no policy for service {dest}, mesh default {default}"),
            );
        };
        if let Some((i, rule)) = policy
            .deny
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(source, source_service))
        {
            return verdict(false, &policy.name, format!("deny[{i}] matched ({rule})"));
        }
        let matched = policy
            .allow
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(source, source_service));
        let reason = match matched {
            Some((i, rule)) => format!("allow[{i}] matched ({rule})"),
            None if policy.default_allow => "no rule matched, default allow".to_owned(),
            None => {
                return verdict(
                    false,
                    &policy.name,
                    "no rule matched, default deny".to_owned(),
                )
            }
        };
        match self.missing_capability(policy, source) {
            Some(cap) => verdict(
                false,
                &policy.name,
                format!("{reason}; missing capability {cap}"),
            ),
            None => verdict(true, &policy.name, reason),
        }
    }

    /// A policy in audit mode turns its would-deny into an allow that says so.
    fn decide_with_mode(
        &self,
        source: &SpiffeId,
        source_service: Option<&str>,
        dest: &str,
    ) -> Decision {
        let d = self.decide(source, source_service, dest);
        let audit = self.rules.policies.get(dest).is_some_and(|p| p.audit);
        if d.allowed || !audit {
            return d;
        }
        Decision {
            allowed: true,
            audit_deny: true,
            reason: format!("audit mode, would deny: {}", d.reason),
            ..d
        }
    }

    fn missing_capability<'p>(&self, policy: &'p Policy, source: &SpiffeId) -> Option<&'p str> {
        let held = self.rules.capabilities.get(source);
        policy
            .required_capabilities
            .iter()
            .find(|cap| !held.is_some_and(|h| h.contains(cap.as_str())))
            .map(String::as_str)
    }
}

fn verdict(allowed: bool, policy: &str, reason: String) -> Decision {
    Decision {
        allowed,
        policy: policy.to_owned(),
        reason,
        audit_deny: false,
    }
}

impl Authorize for Authorizer {
    fn authorize(&self, source: &SpiffeId, source_service: Option<&str>, dest: &str) -> Decision {
        let d = self.decide_with_mode(source, source_service, dest);
        if d.audit_deny {
            self.counters.record_audit_deny(&d.policy);
            tracing::info!(policy = %d.policy, source = %source, destination = dest, decision = "audit_deny", reason = %d.reason, "authorization");
            return d;
        }
        self.counters.record(&d.policy, d.allowed);
        // Denials are rare and operator-relevant; allows are per connection, so debug level.
        if d.allowed {
            tracing::debug!(policy = %d.policy, source = %source, destination = dest, decision = "allow", reason = %d.reason, "authorization");
        } else {
            tracing::info!(policy = %d.policy, source = %source, destination = dest, decision = "deny", reason = %d.reason, "authorization");
        }
        d
    }
}

/// Holds the current [`Authorizer`]; a reload swaps it atomically and keeps the counters.
#[derive(Debug)]
pub struct ReloadableAuthorizer {
    current: RwLock<Arc<Authorizer>>,
    counters: Arc<DecisionCounters>,
}

impl ReloadableAuthorizer {
    pub fn new(config: &AuthzConfig) -> Result<Self, AuthzConfigError> {
        let counters = Arc::new(DecisionCounters::default());
        let current = Authorizer::with_counters(config, counters.clone())?;
        Ok(Self {
            current: RwLock::new(Arc::new(current)),
            counters,
        })
    }

    /// Validates `config` and swaps it in; on error the previous rules stay in force.
    pub fn reload(&self, config: &AuthzConfig) -> Result<(), AuthzConfigError> {
        let next = Arc::new(Authorizer::with_counters(config, self.counters.clone())?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    pub fn current(&self) -> Arc<Authorizer> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn counters(&self) -> &Arc<DecisionCounters> {
        &self.counters
    }
}

impl Authorize for ReloadableAuthorizer {
    fn authorize(&self, source: &SpiffeId, source_service: Option<&str>, dest: &str) -> Decision {
        // Clone the Arc so the lock is not held while deciding.
        self.current().authorize(source, source_service, dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
authorization:
  - name: wallet-callers
    service: wallet
    default: deny
    allow:
      - from: spiffe://cluster.local/ns/shop/sa/checkout
      - from_service: checkout
      - from_namespace: shop
    deny:
      - from: spiffe://cluster.local/ns/shop/sa/web
  - name: agent-runners
    service: agent
    default: allow
    capabilities:
      required: [service.agent.run]
  - name: open-catalog
    service: catalog
    deny:
      - from_namespace: untrusted
service_keys:
  - identity: spiffe://cluster.local/ns/ops/sa/runner
    capabilities: [service.agent.run]
"#;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("test SPIFFE ID")
    }

    fn authorizer() -> Authorizer {
        let cfg = AuthzConfig::from_yaml(CONFIG).expect("yaml");
        Authorizer::new(&cfg).expect("valid config")
    }

    fn invalid_field(yaml: &str) -> (String, String) {
        let cfg = AuthzConfig::from_yaml(yaml).expect("yaml shape");
        match Authorizer::new(&cfg) {
            Err(AuthzConfigError::Invalid { field, message }) => (field, message),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn deny_rule_beats_allow_rule() {
        let a = authorizer();
        // web is in namespace shop (allowed) but explicitly denied.
        let d = a.authorize(&id("spiffe://cluster.local/ns/shop/sa/web"), None, "wallet");
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.policy, "wallet-callers");
        assert!(d.reason.contains("deny[0]"), "{d:?}");
        let d = a.authorize(
            &id("spiffe://cluster.local/ns/shop/sa/cart"),
            None,
            "wallet",
        );
        assert!(d.allowed, "{d:?}");
        assert!(d.reason.contains("allow[2]"), "{d:?}");
    }

    #[test]
    fn allow_by_identity_and_by_caller_service() {
        let a = authorizer();
        let d = a.authorize(
            &id("spiffe://cluster.local/ns/shop/sa/checkout"),
            None,
            "wallet",
        );
        assert!(d.allowed && d.reason.contains("allow[0]"), "{d:?}");
        let d = a.authorize(
            &id("spiffe://cluster.local/ns/pay/sa/co"),
            Some("checkout"),
            "wallet",
        );
        assert!(d.allowed && d.reason.contains("allow[1]"), "{d:?}");
    }

    #[test]
    fn default_deny_when_no_rule_matches() {
        let a = authorizer();
        let d = a.authorize(
            &id("spiffe://cluster.local/ns/pay/sa/x"),
            Some("other"),
            "wallet",
        );
        assert!(!d.allowed, "{d:?}");
        assert!(d.reason.contains("default deny"), "{d:?}");
    }

    #[test]
    fn service_without_policy_follows_the_mesh_default_deny_unless_relaxed() {
        let d = authorizer().authorize(&id("spiffe://cluster.local/ns/a/sa/b"), None, "unknown");
        assert!(!d.allowed, "default deny: {d:?}");
        assert_eq!(d.policy, NO_POLICY);
        assert!(d.reason.contains("mesh default deny"), "{d:?}");
        let relaxed = AuthzConfig {
            mesh_default: crate::policy::authz_config::DefaultAction::Allow,
            ..Default::default()
        };
        let d = Authorizer::new(&relaxed).expect("valid").authorize(
            &id("spiffe://cluster.local/ns/a/sa/b"),
            None,
            "unknown",
        );
        assert!(d.allowed, "explicit policy.default: allow: {d:?}");
    }

    #[test]
    fn omitted_default_is_allow_without_allow_rules() {
        let a = authorizer();
        assert!(
            a.authorize(&id("spiffe://cluster.local/ns/shop/sa/x"), None, "catalog")
                .allowed
        );
        assert!(
            !a.authorize(
                &id("spiffe://cluster.local/ns/untrusted/sa/x"),
                None,
                "catalog"
            )
            .allowed
        );
    }

    #[test]
    fn capabilities_are_required_from_service_keys() {
        let a = authorizer();
        let d = a.authorize(
            &id("spiffe://cluster.local/ns/ops/sa/runner"),
            None,
            "agent",
        );
        assert!(d.allowed, "{d:?}");
        let d = a.authorize(&id("spiffe://cluster.local/ns/ops/sa/other"), None, "agent");
        assert!(!d.allowed, "{d:?}");
        assert!(
            d.reason.contains("missing capability service.agent.run"),
            "{d:?}"
        );
    }

    #[test]
    fn decisions_are_counted_per_policy_and_verdict() {
        let a = authorizer();
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let cart = id("spiffe://cluster.local/ns/shop/sa/cart");
        a.authorize(&web, None, "wallet");
        a.authorize(&web, None, "wallet");
        a.authorize(&cart, None, "wallet");
        a.authorize(&cart, None, "nothing");
        assert_eq!(
            a.counters().snapshot(),
            vec![
                DecisionCount {
                    policy: NO_POLICY.into(),
                    allowed: false,
                    count: 1
                },
                DecisionCount {
                    policy: "wallet-callers".into(),
                    allowed: false,
                    count: 2
                },
                DecisionCount {
                    policy: "wallet-callers".into(),
                    allowed: true,
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn reload_swaps_rules_keeps_counters_and_rejects_bad_config() {
        let cfg = AuthzConfig::from_yaml(CONFIG).expect("yaml");
        let r = ReloadableAuthorizer::new(&cfg).expect("valid");
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        assert!(!r.authorize(&web, None, "wallet").allowed);

        let open = AuthzConfig::from_yaml(
            "authorization:\n  - name: wallet-callers\n    service: wallet\n    default: allow\n",
        )
        .expect("yaml");
        r.reload(&open).expect("valid reload");
        assert!(r.authorize(&web, None, "wallet").allowed);
        assert_eq!(r.counters().get("wallet-callers", false), 1);
        assert_eq!(r.counters().get("wallet-callers", true), 1);

        let bad = AuthzConfig::from_yaml(
            "authorization:\n  - name: x\n    service: wallet\n    allow:\n      - from: nope\n",
        )
        .expect("yaml");
        assert!(r.reload(&bad).is_err());
        assert!(
            r.authorize(&web, None, "wallet").allowed,
            "last good config stays"
        );
    }

    #[test]
    fn validation_names_the_field_and_value() {
        let (field, message) = invalid_field(
            "authorization:\n  - name: a\n    service: s\n  - name: b\n    service: t\n    allow:\n      - from: \"spiffe:/x\"\n",
        );
        assert_eq!(field, "authorization[1].allow[0].from");
        assert!(
            message.contains("\"spiffe:/x\" is not a SPIFFE ID"),
            "{message}"
        );

        let (field, message) = invalid_field(
            "authorization:\n  - name: a\n    service: s\n  - name: a\n    service: t\n",
        );
        assert_eq!(field, "authorization[1].name");
        assert!(message.contains("duplicate policy name \"a\""), "{message}");

        let (field, _) = invalid_field(
            "authorization:\n  - name: a\n    service: s\n    deny:\n      - from_service: x\n        from_namespace: y\n",
        );
        assert_eq!(field, "authorization[0].deny[0]");

        let (field, _) =
            invalid_field("service_keys:\n  - identity: spiffe://td/ns/a\n    capabilities: [x]\n");
        assert_eq!(field, "service_keys[0].identity");

        let (field, _) = invalid_field(
            "authorization:\n  - name: a\n    service: s\n  - name: b\n    service: s\n",
        );
        assert_eq!(field, "authorization[1].service");
    }

    #[test]
    fn unknown_fields_and_bad_defaults_are_rejected() {
        let err =
            AuthzConfig::from_yaml("authorization:\n  - name: a\n    service: s\n    alow: []\n")
                .expect_err("typo");
        assert!(err.to_string().contains("alow"), "{err}");
        let err = AuthzConfig::from_yaml(
            "authorization:\n  - name: a\n    service: s\n    default: maybe\n",
        )
        .expect_err("bad default");
        assert!(err.to_string().contains("maybe"), "{err}");
    }

    #[test]
    fn audit_mode_allows_would_deny_decisions_and_counts_them_apart() {
        let cfg = AuthzConfig::from_yaml(
            "authorization:\n  - name: dry\n    service: wallet\n    mode: audit\n    default: deny\n    allow:\n      - from_namespace: shop\n",
        )
        .expect("yaml");
        let a = Authorizer::new(&cfg).expect("valid");
        let outsider = id("spiffe://cluster.local/ns/other/sa/x");
        let d = a.authorize(&outsider, None, "wallet");
        assert!(d.allowed && d.audit_deny, "{d:?}");
        assert!(
            d.reason
                .contains("would deny: no rule matched, default deny"),
            "{d:?}"
        );
        let insider = id("spiffe://cluster.local/ns/shop/sa/checkout");
        let d = a.authorize(&insider, None, "wallet");
        assert!(d.allowed && !d.audit_deny, "{d:?}");
        let c = a.counters();
        assert_eq!(c.audit_deny_snapshot(), vec![("dry".to_owned(), 1)]);
        assert_eq!((c.get("dry", true), c.get("dry", false)), (1, 0));

        // The same policy enforced denies; enforce is the default mode.
        let enforced = AuthzConfig::from_yaml(
            "authorization:\n  - name: dry\n    service: wallet\n    default: deny\n    allow:\n      - from_namespace: shop\n",
        )
        .expect("yaml");
        let d = Authorizer::new(&enforced)
            .expect("valid")
            .authorize(&outsider, None, "wallet");
        assert!(!d.allowed && !d.audit_deny, "{d:?}");
        let bad = AuthzConfig::from_yaml(
            "authorization:\n  - name: dry\n    service: wallet\n    mode: maybe\n",
        );
        assert!(bad.is_err(), "unknown mode accepted");
    }
}
