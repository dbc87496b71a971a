//! The per-identity byte/packet counting programs (cgroup_skb egress + ingress): loaded with the
//! others and attached (pinned links) to every workload cgroup next to them by attach.rs.

use aya::programs::{CgroupSkb, CgroupSkbAttachType};
use mesh_common::program_names;

use super::attach::program_mut;
use super::EbpfError;

const PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    (program_names::COUNT_EGRESS, CgroupSkbAttachType::Egress),
    (program_names::COUNT_INGRESS, CgroupSkbAttachType::Ingress),
];

/// Loads both counting programs into the kernel (before any attach).
pub(super) fn load(bpf: &mut aya::Ebpf) -> Result<(), EbpfError> {
    for (name, _) in PROGRAMS {
        program_mut::<CgroupSkb>(bpf, name)?
            .load()
            .map_err(EbpfError::program(name))?;
    }
    Ok(())
}

/// The attach type of a cgroup_skb program: egress for the sent-side counter, ingress for the
/// others (the strict-mode program and the received-side counter).
pub(super) fn attach_type(name: &str) -> CgroupSkbAttachType {
    PROGRAMS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(CgroupSkbAttachType::Ingress, |(_, t)| *t)
}
