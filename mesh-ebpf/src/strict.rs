//! cgroup_skb/ingress: strict mode. What reaches a strict workload must come through the agent:
//! - a new TCP connection (SYN without ACK), IPv4 or IPv6, passes only when its 4-tuple is one
//!   the agent opened (AGENT_FLOWS, written by a sock_ops program on the agent's own cgroup; a
//!   host process binding the agent's address gets no entry), or it is the pod talking to itself
//!   (same address, or loopback);
//! - UDP to a socket that did not connect() (a server socket, open to anyone) passes only from
//!   the pod itself; a connected socket only receives from the peer it chose.
//!
//! Everything else passes: replies to the pod's own TCP connections carry ACK, and no TCP
//! connection exists without its SYN. Drops are counted against the destination's identity.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use aya_log_ebpf::debug;
use mesh_common::{addr::ip4_from_raw, flows::FlowKey};

use crate::maps::{AGENT_FLOWS, CONN_COUNTERS};
use crate::workload::skb_workload;

/// Verdicts of a cgroup_skb program.
const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offsets in the IPv4 header (cgroup_skb data starts at the network header).
const IP_PROTO_OFF: usize = 9;
const IP_SRC_OFF: usize = 12;
const IP_DST_OFF: usize = 16;
/// Offsets in the IPv6 header; the transport header follows at 40 when there are no extension
/// headers (with one, next-header is not TCP/UDP and the packet is judged as "other").
const IP6_NEXT_OFF: usize = 6;
const IP6_SRC_OFF: usize = 8;
const IP6_DST_OFF: usize = 24;
const IP6_HDR_LEN: usize = 40;
/// Offsets in the TCP header.
const TCP_FLAGS_OFF: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const LOOPBACK_FIRST_OCTET: u8 = 127;

#[cgroup_skb(ingress)]
pub fn mesh_ingress(ctx: SkBuffContext) -> i32 {
    // Fail open on a packet the program cannot parse: the stack's business, not ours.
    try_ingress(&ctx).unwrap_or(PASS)
}

/// What the packet is, as far as strict mode cares.
enum Kind {
    /// New TCP connection from `flow` (IPv4) or from an IPv6 source (`flow` None).
    TcpSyn {
        flow: Option<FlowKey>,
        own: bool,
    },
    /// UDP datagram; `own`: from the pod itself.
    Udp {
        own: bool,
    },
    Other,
}

fn try_ingress(ctx: &SkBuffContext) -> Result<i32, i64> {
    let kind = match ctx.load::<u8>(0)? >> 4 {
        4 => classify_v4(ctx)?,
        6 => classify_v6(ctx)?,
        _ => Kind::Other,
    };
    let suspicious = match kind {
        Kind::Other => return Ok(PASS),
        Kind::TcpSyn { own: true, .. } | Kind::Udp { own: true } => return Ok(PASS),
        Kind::TcpSyn { flow, .. } => !flow.is_some_and(|f| unsafe { AGENT_FLOWS.get(f) }.is_some()),
        Kind::Udp { .. } => !receiver_is_connected(ctx),
    };
    if !suspicious {
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
    count_drop(workload.identity);
    debug!(ctx, "strict: dropped to identity={}", workload.identity);
    Ok(DROP)
}

fn classify_v4(ctx: &SkBuffContext) -> Result<Kind, i64> {
    let ihl = usize::from(ctx.load::<u8>(0)? & 0x0f) * 4;
    // Both addresses stay in kernel encoding (network order in memory), like the maps.
    let src: u32 = ctx.load(IP_SRC_OFF)?;
    let dst: u32 = ctx.load(IP_DST_OFF)?;
    let own = src == dst || ip4_from_raw(src)[0] == LOOPBACK_FIRST_OCTET;
    match ctx.load::<u8>(IP_PROTO_OFF)? {
        IPPROTO_TCP => {
            if !is_syn(ctx, ihl)? {
                return Ok(Kind::Other);
            }
            let src_port = u16::from_be(ctx.load::<u16>(ihl)?);
            let dst_port = u16::from_be(ctx.load::<u16>(ihl + 2)?);
            Ok(Kind::TcpSyn {
                flow: Some(FlowKey::new(src, src_port, dst, dst_port)),
                own,
            })
        }
        IPPROTO_UDP => Ok(Kind::Udp { own }),
        _ => Ok(Kind::Other),
    }
}

fn classify_v6(ctx: &SkBuffContext) -> Result<Kind, i64> {
    let src: [u64; 2] = [ctx.load(IP6_SRC_OFF)?, ctx.load(IP6_SRC_OFF + 8)?];
    let dst: [u64; 2] = [ctx.load(IP6_DST_OFF)?, ctx.load(IP6_DST_OFF + 8)?];
    // ::1 in memory: fifteen zero bytes, then 1.
    let loopback = src[0] == 0 && src[1] == u64::from_ne_bytes([0, 0, 0, 0, 0, 0, 0, 1]);
    let own = src == dst || loopback;
    match ctx.load::<u8>(IP6_NEXT_OFF)? {
        // The agent reaches pods over IPv4, so no IPv6 connection is one of its flows.
        IPPROTO_TCP if is_syn(ctx, IP6_HDR_LEN)? => Ok(Kind::TcpSyn { flow: None, own }),
        IPPROTO_UDP => Ok(Kind::Udp { own }),
        _ => Ok(Kind::Other),
    }
}

fn is_syn(ctx: &SkBuffContext, tcp_off: usize) -> Result<bool, i64> {
    let flags: u8 = ctx.load(tcp_off + TCP_FLAGS_OFF)?;
    Ok(flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

/// Whether the receiving socket is connected (has a peer port): then the kernel only delivers
/// datagrams from the peer the pod chose itself.
fn receiver_is_connected(ctx: &SkBuffContext) -> bool {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    unsafe { (*sk).dst_port != 0 }
}

fn count_drop(identity: u32) {
    let Some(c) = CONN_COUNTERS.get_ptr_mut(identity) else {
        return;
    };
    // Per-CPU slot: no other CPU writes it, so a plain increment is race-free.
    unsafe { (*c).inbound_dropped += 1 };
}
