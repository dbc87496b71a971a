//! SERVICES map: destination (VIP, port) -> service id; AGENT_ADDR: where connects are redirected.

/// Key of the SERVICES map: the destination a pod connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceKey {
    /// IPv4 address, kernel encoding (see [`crate::addr`]).
    pub ip: u32,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl ServiceKey {
    pub const fn new(ip: u32, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// Value of the SERVICES map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceValue {
    /// Service id assigned by the agent (1-based).
    pub service: u32,
    pub _pad: u32,
}

impl ServiceValue {
    pub const fn new(service: u32) -> Self {
        Self { service, _pad: 0 }
    }
}

/// Single entry of the AGENT_ADDR array: the agent's outbound listener as pods reach it.
/// `ip == 0` means "no redirect configured" and mesh connects pass through unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct AgentAddr {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

impl AgentAddr {
    pub const fn new(ip: u32, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

crate::user_pod!(ServiceKey, ServiceValue, AgentAddr);
