//! cgroup_skb/egress + cgroup_skb/ingress: bytes and packets per workload identity, counted in the
//! kernel so the numbers need no agent on the path (pass-through traffic included). Both programs
//! only count and always pass; enforcement stays in connect4 and strict.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use mesh_common::traffic::TrafficCounters;

use crate::maps::TRAFFIC_COUNTERS;
use crate::workload::skb_workload;

/// Verdict of a cgroup_skb program that never drops.
const PASS: i32 = 1;

enum Direction {
    Sent,
    Received,
}

#[cgroup_skb(egress)]
pub fn mesh_count_egress(ctx: SkBuffContext) -> i32 {
    let _ = try_count(&ctx, Direction::Sent);
    PASS
}

#[cgroup_skb(ingress)]
pub fn mesh_count_ingress(ctx: SkBuffContext) -> i32 {
    let _ = try_count(&ctx, Direction::Received);
    PASS
}

fn try_count(ctx: &SkBuffContext, direction: Direction) -> Result<(), i64> {
    // Same attribution as connect4 and strict: the nearest configured ancestor of the socket's
    // cgroup; 0 ("unknown") when none is configured.
    let identity = skb_workload(ctx).map_or(0, |w| w.identity);
    let Some(c) = TRAFFIC_COUNTERS.get_ptr_mut(identity) else {
        return Err(-1);
    };
    // skb->len starts at the network header here. With segmentation offload one skb carries
    // gso_segs wire packets (0 when it is a single one).
    let bytes = u64::from(ctx.len());
    let segs = unsafe { (*ctx.skb.skb).gso_segs };
    let packets = u64::from(if segs == 0 { 1 } else { segs });
    // Per-CPU slot: no other CPU writes it, so plain increments are race-free.
    let c: &mut TrafficCounters = unsafe { &mut *c };
    match direction {
        Direction::Sent => {
            c.sent_bytes += bytes;
            c.sent_packets += packets;
        }
        Direction::Received => {
            c.received_bytes += bytes;
            c.received_packets += packets;
        }
    }
    Ok(())
}
