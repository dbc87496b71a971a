//! DENY map: (source identity, destination service) -> the rule that denies it; ALLOW map: the
//! pairs a default-deny service admits (its allow-list compiled for the identities on the node).
//! [`kernel_allows`] is the whole decision, shared by the kernel program and the agent's tests.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct DenyKey {
    pub identity: u32,
    pub service: u32,
}

impl DenyKey {
    pub const fn new(identity: u32, service: u32) -> Self {
        Self { identity, service }
    }
}

/// Value of the DENY map: which configured rule produced the entry (for reporting).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct DenyRule {
    pub rule: u32,
    pub _pad: u32,
}

impl DenyRule {
    pub const fn new(rule: u32) -> Self {
        Self { rule, _pad: 0 }
    }
}

impl DenyRule {
    /// Rule index of entries compiled from `authorization` (not from `policy.deny`).
    pub const AUTHORIZATION: u32 = u32::MAX;
}

/// Value of the ALLOW map (presence is what counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct AllowEntry {
    pub allowed: u32,
    pub _pad: u32,
}

impl AllowEntry {
    pub const fn new() -> Self {
        Self {
            allowed: 1,
            _pad: 0,
        }
    }
}

/// The connect() decision for a (caller, service) pair: an explicit deny wins; a default-deny
/// service (see [`crate::services::ServiceValue::DEFAULT_DENY`]) admits only pairs in ALLOW.
#[inline(always)]
pub const fn kernel_allows(denied: bool, service_flags: u32, allowed: bool) -> bool {
    if denied {
        return false;
    }
    service_flags & crate::services::ServiceValue::DEFAULT_DENY == 0 || allowed
}

crate::user_pod!(DenyKey, DenyRule, AllowEntry);

#[cfg(test)]
mod tests {
    use super::kernel_allows;
    use crate::services::ServiceValue;

    #[test]
    fn deny_wins_and_default_deny_needs_an_allow_entry() {
        let dd = ServiceValue::DEFAULT_DENY;
        assert!(!kernel_allows(true, 0, true));
        assert!(!kernel_allows(true, dd, true));
        assert!(kernel_allows(false, 0, false));
        assert!(!kernel_allows(false, dd, false));
        assert!(kernel_allows(false, dd, true));
    }
}
