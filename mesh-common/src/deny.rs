//! DENY map: (source identity, destination service) -> the rule that denies it.

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

crate::user_pod!(DenyKey, DenyRule);
