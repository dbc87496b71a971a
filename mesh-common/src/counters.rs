//! CONN_COUNTERS: per-CPU array indexed by identity id, counting connect() outcomes and strict-mode
//! inbound drops in the kernel.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ConnCounters {
    /// connect() calls the kernel allowed (mesh and non-mesh destinations).
    pub opened: u64,
    /// connect() calls to mesh services that were redirected to the agent.
    pub redirected: u64,
    /// connect() calls refused with EPERM by the deny-list.
    pub denied: u64,
    /// New inbound TCP connections to this (strict) workload dropped because they bypassed the
    /// agent; counted per SYN, so a client's retransmissions count again.
    pub inbound_dropped: u64,
    /// connect()/sendmsg() calls to non-mesh destinations refused: no egress rule allows them.
    pub egress_denied: u64,
}

impl ConnCounters {
    /// Sums per-CPU values (userspace reads one value per possible CPU).
    pub fn accumulate(&mut self, other: &ConnCounters) {
        self.opened = self.opened.wrapping_add(other.opened);
        self.redirected = self.redirected.wrapping_add(other.redirected);
        self.denied = self.denied.wrapping_add(other.denied);
        self.inbound_dropped = self.inbound_dropped.wrapping_add(other.inbound_dropped);
        self.egress_denied = self.egress_denied.wrapping_add(other.egress_denied);
    }
}

crate::user_pod!(ConnCounters);

#[cfg(test)]
mod tests {
    use super::ConnCounters;

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ConnCounters>(), 5 * 8);
    }

    #[test]
    fn accumulate_sums_every_field() {
        let one = ConnCounters {
            opened: 1,
            redirected: 2,
            denied: 3,
            inbound_dropped: 4,
            egress_denied: 5,
        };
        let mut total = ConnCounters::default();
        total.accumulate(&one);
        total.accumulate(&one);
        assert_eq!(
            total,
            ConnCounters {
                opened: 2,
                redirected: 4,
                denied: 6,
                inbound_dropped: 8,
                egress_denied: 10,
            }
        );
    }
}
