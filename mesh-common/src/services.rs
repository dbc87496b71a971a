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

/// Single entry of the AGENT_ADDR array: the agent's outbound listeners as pods reach them,
/// `ports` consecutive ports from `port`. Each redirected connect picks one of them at random,
/// so a pod's connections through the agent are not all towards one address and port: the
/// TIME_WAIT sockets of its closed connections then leave the pod's source ports free (towards
/// a single agent port, a pod closing a few hundred connections a second exhausts them).
/// `ip == 0` or `port == 0` means "no redirect" and mesh connects pass through unchanged (only
/// before the agent first writes it); `ports` 0 counts as 1 (maps written by older agents).
/// Strict mode does not look at it: it trusts the agent's recorded flows (see [`crate::flows`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct AgentAddr {
    pub ip: u32,
    pub port: u16,
    pub ports: u16,
}

impl AgentAddr {
    pub const fn new(ip: u32, port: u16, ports: u16) -> Self {
        Self { ip, port, ports }
    }

    /// Whether connects to mesh services are redirected to the agent.
    #[inline(always)]
    pub const fn redirects(&self) -> bool {
        self.ip != 0 && self.port != 0
    }

    /// The listener port of one redirected connect, chosen by `random`.
    #[inline(always)]
    pub const fn port_for(&self, random: u32) -> u16 {
        if self.ports <= 1 {
            return self.port;
        }
        self.port.wrapping_add((random % self.ports as u32) as u16)
    }
}

crate::user_pod!(ServiceKey, ServiceValue, AgentAddr);

#[cfg(test)]
mod tests {
    use super::AgentAddr;

    #[test]
    fn redirect_needs_both_ip_and_port() {
        assert!(AgentAddr::new(1, 15001, 1).redirects());
        assert!(
            !AgentAddr::new(1, 0, 1).redirects(),
            "draining: ip kept, port cleared"
        );
        assert!(!AgentAddr::new(0, 15001, 1).redirects());
        assert!(!AgentAddr::default().redirects());
    }

    #[test]
    fn connects_are_spread_over_every_listener_port() {
        let agent = AgentAddr::new(1, 15101, 32);
        let mut seen = [false; 32];
        for r in 0..1000u32 {
            let port = agent.port_for(r.wrapping_mul(2_654_435_761));
            assert!((15101..=15132).contains(&port), "{port}");
            seen[usize::from(port - 15101)] = true;
        }
        assert!(seen.iter().all(|s| *s), "every port is used");
        // One port (or a map written before `ports` existed): always that port.
        assert_eq!(AgentAddr::new(1, 15001, 1).port_for(7), 15001);
        assert_eq!(AgentAddr::new(1, 15001, 0).port_for(7), 15001);
    }
}
