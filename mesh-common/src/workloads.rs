//! WORKLOADS map: cgroup id (inode of the pod's cgroup v2 directory) -> identity id.

/// Value of the WORKLOADS map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct WorkloadIdentity {
    /// Identity id assigned by the agent (1-based; 0 means "unknown workload").
    pub identity: u32,
    pub _pad: u32,
}

impl WorkloadIdentity {
    pub const fn new(identity: u32) -> Self {
        Self { identity, _pad: 0 }
    }
}

crate::user_pod!(WorkloadIdentity);
