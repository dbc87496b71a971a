//! The per-identity byte/packet counting programs (cgroup_skb egress + ingress): loaded with the
//! others and attached to every workload cgroup next to them. Kept apart from attach.rs so the
//! capture/enforcement attachment can evolve without touching the counting.

use std::fs::File;
use std::path::Path;

use aya::programs::{
    cgroup_skb::CgroupSkbLinkId, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType,
};
use mesh_common::program_names;

use super::attach::program_mut;
use super::EbpfError;

/// The counting links of one cgroup.
pub(super) struct TrafficLinks {
    egress: CgroupSkbLinkId,
    ingress: CgroupSkbLinkId,
}

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

fn attach_prog(
    bpf: &mut aya::Ebpf,
    (name, kind): (&'static str, CgroupSkbAttachType),
    dir: &File,
    path: &Path,
) -> Result<CgroupSkbLinkId, EbpfError> {
    // bpf_link attachments coexist with the strict ingress program on the same cgroup; the
    // kernel runs both and a packet passes only if every program passes it.
    program_mut::<CgroupSkb>(bpf, name)?
        .attach(dir, kind, CgroupAttachMode::Single)
        .map_err(|source| EbpfError::Attach {
            path: path.to_owned(),
            source,
        })
}

/// Attaches both counting programs to the cgroup at `path`, or neither.
pub(super) fn attach(
    bpf: &mut aya::Ebpf,
    dir: &File,
    path: &Path,
) -> Result<TrafficLinks, EbpfError> {
    let egress = attach_prog(bpf, PROGRAMS[0], dir, path)?;
    match attach_prog(bpf, PROGRAMS[1], dir, path) {
        Ok(ingress) => Ok(TrafficLinks { egress, ingress }),
        Err(e) => {
            detach_prog(bpf, PROGRAMS[0].0, egress);
            Err(e)
        }
    }
}

/// Best effort, like the other detaches: a failure is logged and the other link still detached.
pub(super) fn detach(bpf: &mut aya::Ebpf, links: TrafficLinks) {
    detach_prog(bpf, PROGRAMS[0].0, links.egress);
    detach_prog(bpf, PROGRAMS[1].0, links.ingress);
}

fn detach_prog(bpf: &mut aya::Ebpf, name: &'static str, link: CgroupSkbLinkId) {
    let result = program_mut::<CgroupSkb>(bpf, name)
        .and_then(|p| p.detach(link).map_err(EbpfError::program(name)));
    if let Err(e) = result {
        tracing::warn!(error = %e, "detaching");
    }
}
