//! SERVICES map: destination (VIP, port) -> service id; AGENT_ADDR: where connects are redirected.
//!
//! ENDPOINTS has the same key and value types: the endpoint addresses that exist only in the
//! registry. The reconciler rewrites it entry by entry on endpoint churn, so churn never touches
//! SERVICES (VIPs and the config's endpoint addresses, written only on a config or mesh-state
//! change). The kernel looks a destination up in SERVICES, then in ENDPOINTS, and takes the same
//! decision for either.

/// Key of the SERVICES and ENDPOINTS maps: the destination a pod connects to.
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

/// Service id of the agent's registry API (agent_ip:8500) in the SERVICES map: connect4 records
/// the caller's identity for it (as for captured connects) but does not redirect the connect, so
/// the agent knows which workload registers, heartbeats or deregisters.
pub const REGISTRY_SERVICE: u32 = u32::MAX;

/// Value of the SERVICES and ENDPOINTS maps (an endpoint entry carries its service's flags).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceValue {
    /// Service id assigned by the agent (1-based).
    pub service: u32,
    /// Bit set of `ServiceValue::DEFAULT_DENY`, ... (unknown bits are ignored by the kernel).
    pub flags: u32,
}

impl ServiceValue {
    /// Callers not in the ALLOW map are refused (the service's callers are exactly its allow-list).
    pub const DEFAULT_DENY: u32 = 1;

    pub const fn new(service: u32) -> Self {
        Self { service, flags: 0 }
    }

    pub const fn with_default_deny(self, default_deny: bool) -> Self {
        let flags = if default_deny {
            self.flags | Self::DEFAULT_DENY
        } else {
            self.flags & !Self::DEFAULT_DENY
        };
        Self { flags, ..self }
    }
}

/// Single entry of the AGENT_ADDR array: the agent's outbound listener as pods reach it.
/// `ip == 0` or `port == 0` means "no redirect" and mesh connects pass through unchanged (only
/// before the agent first writes it). Strict mode does not look at it: it trusts the agent's
/// recorded flows (see [`crate::flows`]).
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

    /// Whether connects to mesh services are redirected to the agent.
    #[inline(always)]
    pub const fn redirects(&self) -> bool {
        self.ip != 0 && self.port != 0
    }
}

crate::user_pod!(ServiceKey, ServiceValue, AgentAddr);

#[cfg(test)]
mod tests {
    use super::AgentAddr;

    #[test]
    fn redirect_needs_both_ip_and_port() {
        assert!(AgentAddr::new(1, 15001).redirects());
        assert!(
            !AgentAddr::new(1, 0).redirects(),
            "draining: ip kept, port cleared"
        );
        assert!(!AgentAddr::new(0, 15001).redirects());
        assert!(!AgentAddr::default().redirects());
    }
}
