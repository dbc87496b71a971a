//! CONN_COUNTERS: per-CPU array indexed by identity id, counting connect() outcomes in the kernel.

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
}

impl ConnCounters {
    /// Sums per-CPU values (userspace reads one value per possible CPU).
    pub fn accumulate(&mut self, other: &ConnCounters) {
        self.opened = self.opened.wrapping_add(other.opened);
        self.redirected = self.redirected.wrapping_add(other.redirected);
        self.denied = self.denied.wrapping_add(other.denied);
    }
}

crate::user_pod!(ConnCounters);
