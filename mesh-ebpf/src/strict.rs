//! cgroup_skb/ingress: strict mode. A new inbound TCP connection (SYN without ACK) to a strict
//! workload must come from the agent; anything else is dropped here and counted against the
//! destination workload's identity. Replies to the pod's own connections carry ACK and pass, and
//! non-SYN packets pass because no connection exists without its SYN.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use aya_log_ebpf::debug;
use mesh_common::addr::ip4_from_raw;

use crate::maps::{AGENT_ADDR, CONN_COUNTERS};
use crate::workload::skb_workload;

/// Verdicts of a cgroup_skb program.
const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
/// Offsets in the IPv4 header (cgroup_skb data starts at the network header).
const IP_PROTO_OFF: usize = 9;
const IP_SRC_OFF: usize = 12;
const IP_DST_OFF: usize = 16;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFF: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const LOOPBACK_FIRST_OCTET: u8 = 127;

#[cgroup_skb(ingress)]
pub fn mesh_ingress(ctx: SkBuffContext) -> i32 {
    // Fail open: a packet the program cannot parse is the stack's business, not ours.
    try_ingress(&ctx).unwrap_or(PASS)
}

fn try_ingress(ctx: &SkBuffContext) -> Result<i32, i64> {
    let version_ihl: u8 = ctx.load(0)?;
    // IPv4 only; a dual-stack socket also sees IPv6 packets here.
    if version_ihl >> 4 != 4 || ctx.load::<u8>(IP_PROTO_OFF)? != IPPROTO_TCP {
        return Ok(PASS);
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let flags: u8 = ctx.load(ihl + TCP_FLAGS_OFF)?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(PASS);
    }

    // The kernel runs this for the receiving socket (the listener for a SYN), in the pod's cgroup
    // or one of its container cgroups.
    let Some(workload) = skb_workload(ctx) else {
        return Ok(PASS);
    };
    if !workload.is_strict() {
        return Ok(PASS);
    }

    // Both addresses stay in kernel encoding (network order in memory), like the maps.
    let src: u32 = ctx.load(IP_SRC_OFF)?;
    let dst: u32 = ctx.load(IP_DST_OFF)?;
    let agent = AGENT_ADDR.get(0).map_or(0, |a| a.ip);
    if (agent != 0 && src == agent) || src == dst || ip4_from_raw(src)[0] == LOOPBACK_FIRST_OCTET {
        return Ok(PASS);
    }

    count_drop(workload.identity);
    debug!(
        ctx,
        "strict: dropped SYN to identity={} from {:i}",
        workload.identity,
        u32::from_be(src)
    );
    Ok(DROP)
}

fn count_drop(identity: u32) {
    let Some(c) = CONN_COUNTERS.get_ptr_mut(identity) else {
        return;
    };
    // Per-CPU slot: no other CPU writes it, so a plain increment is race-free.
    unsafe { (*c).inbound_dropped += 1 };
}
