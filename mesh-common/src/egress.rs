//! EGRESS: longest-prefix-match trie of the non-mesh destinations each identity may reach.
//! Key data is (identity, IPv4 address); the prefix length counts the 32 identity bits first, so
//! a rule for 10.0.0.0/8 is stored with prefix length 32 + 8. The value lists the allowed ports.
//! The agent stores in each entry the ports of every covering (shorter) entry too, because the
//! kernel only sees the longest match.

/// Ports one entry can list.
pub const MAX_EGRESS_PORTS: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct EgressData {
    pub identity: u32,
    /// IPv4 address, kernel encoding (network order in memory, as the trie matches bytes).
    pub ip: u32,
}

/// Bits of [`EgressData`] the identity takes in the prefix length.
pub const IDENTITY_BITS: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct EgressPorts {
    /// Non-zero: every port.
    pub any: u32,
    /// Valid entries of `ports`.
    pub count: u32,
    pub ports: [u16; MAX_EGRESS_PORTS],
}

impl EgressPorts {
    #[inline(always)]
    pub fn allows(&self, port: u16) -> bool {
        if self.any != 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_EGRESS_PORTS {
            if (i as u32) < self.count && self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

crate::user_pod!(EgressData, EgressPorts);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_match_only_within_count_or_any() {
        let mut p = EgressPorts {
            count: 2,
            ..Default::default()
        };
        p.ports[0] = 53;
        p.ports[1] = 443;
        p.ports[2] = 80;
        assert!(p.allows(53) && p.allows(443));
        assert!(!p.allows(80), "beyond count");
        p.any = 1;
        assert!(p.allows(80));
        assert_eq!(
            core::mem::size_of::<EgressPorts>(),
            8 + 2 * MAX_EGRESS_PORTS
        );
        assert_eq!(core::mem::size_of::<EgressData>(), 8);
    }
}
