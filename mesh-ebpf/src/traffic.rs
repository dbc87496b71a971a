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

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV4_PROTO_OFF: usize = 9;
const IPV6_HEADER_LEN: usize = 40;
const IPV6_NEXT_HEADER_OFF: usize = 6;
/// Offset of the data-offset nibble in the TCP header.
const TCP_DOFF_OFF: usize = 12;
const UDP_HEADER_LEN: usize = 8;

/// Network + transport header length of the packet, as every segment of a GSO/GRO skb repeats
/// it. IPv6 extension headers are not walked (segmentation offload is TCP/UDP without them).
fn header_len(ctx: &SkBuffContext) -> Result<u32, i64> {
    let version_ihl: u8 = ctx.load(0)?;
    let (l3, proto) = match version_ihl >> 4 {
        4 => (
            usize::from(version_ihl & 0x0f) * 4,
            ctx.load::<u8>(IPV4_PROTO_OFF)?,
        ),
        6 => (IPV6_HEADER_LEN, ctx.load::<u8>(IPV6_NEXT_HEADER_OFF)?),
        _ => return Ok(0),
    };
    let l4 = match proto {
        IPPROTO_TCP => usize::from(ctx.load::<u8>(l3 + TCP_DOFF_OFF)? >> 4) * 4,
        IPPROTO_UDP => UDP_HEADER_LEN,
        _ => 0,
    };
    Ok((l3 + l4) as u32)
}

fn try_count(ctx: &SkBuffContext, direction: Direction) -> Result<(), i64> {
    // Same attribution as connect4 and strict: the nearest configured ancestor of the socket's
    // cgroup; 0 ("unknown") when none is configured.
    let identity = skb_workload(ctx).map_or(0, |w| w.identity);
    let Some(c) = TRAFFIC_COUNTERS.get_ptr_mut(identity) else {
        return Err(-1);
    };
    // skb->len starts at the network header here. With segmentation offload (GSO on the way out,
    // GRO on the way in) one skb stands for gso_segs wire packets that each repeat the headers;
    // counting them as on the wire keeps the numbers independent of the offload settings.
    let segs = u64::from(unsafe { (*ctx.skb.skb).gso_segs }).max(1);
    let mut bytes = u64::from(ctx.len());
    if segs > 1 {
        bytes += (segs - 1) * u64::from(header_len(ctx).unwrap_or(0));
    }
    let packets = segs;
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
