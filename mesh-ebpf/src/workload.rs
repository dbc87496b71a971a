//! Which workload a task or packet belongs to. Kubernetes puts a pod's processes in container
//! cgroups below the pod cgroup, so an exact match is not enough: the nearest ancestor that is a
//! configured workload wins.

use aya_ebpf::helpers::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_skb_ancestor_cgroup_id,
    bpf_skb_cgroup_id,
};
use aya_ebpf::programs::SkBuffContext;
use mesh_common::workloads::WorkloadIdentity;

use crate::maps::WORKLOADS;

/// Deepest ancestor level searched; Kubernetes pod cgroups sit at depth 3-5
/// (kubepods/<qos>/pod<uid>), with containers one below.
const MAX_DEPTH: i32 = 16;

/// The workload of the current task (process context: connect4).
pub fn current_workload() -> Option<WorkloadIdentity> {
    let own = unsafe { bpf_get_current_cgroup_id() };
    lookup(own)
        .or_else(|| nearest_ancestor(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) }))
}

/// The workload of the socket receiving `ctx` (cgroup_skb).
pub fn skb_workload(ctx: &SkBuffContext) -> Option<WorkloadIdentity> {
    let own = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    lookup(own).or_else(|| {
        nearest_ancestor(|level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) })
    })
}

fn lookup(cgroup_id: u64) -> Option<WorkloadIdentity> {
    unsafe { WORKLOADS.get(cgroup_id) }.copied()
}

/// The nearest configured ancestor. Level 0 is the root cgroup, never a workload; past the
/// task's own depth the helper returns 0. The depth is found with helper calls only, then the
/// map is searched from the parent upwards, so a process in a container cgroup right below its
/// pod costs one lookup (the cgroup_skb counters run this for every packet).
fn nearest_ancestor(ancestor_id: impl Fn(i32) -> u64) -> Option<WorkloadIdentity> {
    let mut depth = MAX_DEPTH;
    for level in 1..MAX_DEPTH {
        if ancestor_id(level) == 0 {
            depth = level - 1;
            break;
        }
    }
    // `depth` is the cgroup itself, already looked up by the caller.
    let mut level = depth - 1;
    while level >= 1 {
        let id = ancestor_id(level);
        if id == 0 {
            return None;
        }
        if let Some(w) = lookup(id) {
            return Some(w);
        }
        level -= 1;
    }
    None
}
