//! WORKLOADS map: cgroup id (inode of the pod's cgroup v2 directory) -> identity id and flags.

/// Value of the WORKLOADS map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct WorkloadIdentity {
    /// Identity id assigned by the agent (1-based; 0 means "unknown workload").
    pub identity: u32,
    /// Bit set of `WorkloadIdentity::STRICT`, ... (unknown bits are ignored by the kernel).
    pub flags: u32,
}

impl WorkloadIdentity {
    /// Strict mode: new inbound TCP connections that did not come through the agent are dropped.
    pub const STRICT: u32 = 1;

    pub const fn new(identity: u32) -> Self {
        Self { identity, flags: 0 }
    }

    /// Same identity with the strict flag set or cleared.
    pub const fn with_strict(self, strict: bool) -> Self {
        let flags = if strict {
            self.flags | Self::STRICT
        } else {
            self.flags & !Self::STRICT
        };
        Self { flags, ..self }
    }

    #[inline(always)]
    pub const fn is_strict(&self) -> bool {
        self.flags & Self::STRICT != 0
    }
}

crate::user_pod!(WorkloadIdentity);

#[cfg(test)]
mod tests {
    use super::WorkloadIdentity;

    #[test]
    fn strict_flag_is_bit_zero_of_flags() {
        let w = WorkloadIdentity::new(7);
        assert_eq!(w.flags, 0);
        assert!(!w.is_strict());
        let s = w.with_strict(true);
        assert_eq!((s.identity, s.flags), (7, 1));
        assert!(s.is_strict());
        assert_eq!(s.with_strict(false), w);
        // Other bits survive toggling strict.
        let other = WorkloadIdentity {
            identity: 7,
            flags: 0b110,
        };
        assert_eq!(other.with_strict(true).flags, 0b111);
        assert_eq!(other.with_strict(true).with_strict(false).flags, 0b110);
    }

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<WorkloadIdentity>(), 8);
        assert_eq!(core::mem::offset_of!(WorkloadIdentity, flags), 4);
    }
}
