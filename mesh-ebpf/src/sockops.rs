//! sock_ops: when a captured connection reaches ESTABLISHED, re-key its original destination by
//! the client's (ip, port) and the agent port it reached, which is what the agent sees (peer and
//! local port) on accept.

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{flows::FlowKey, orig_dst::ClientKey};

use crate::maps::{AGENT_FLOWS, ORIG_DST, PENDING_DST};

const AF_INET: u32 = 2;

/// Attached to the agent's own cgroup: records every TCP connect the agent starts (the source
/// port is already chosen when the kernel calls TCP_CONNECT_CB, before the SYN goes out).
#[sock_ops]
pub fn mesh_agent_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_agent_sockops(&ctx);
    1
}

fn try_agent_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB || ctx.family() != AF_INET {
        return Ok(());
    }
    let key = FlowKey::new(
        ctx.local_ip4(),
        ctx.local_port() as u16,
        ctx.remote_ip4(),
        remote_port(ctx),
    );
    AGENT_FLOWS.insert(key, 1, 0)?;
    Ok(())
}

/// The remote port in host order. remote_port is the network-order port shifted into the
/// upper 16 bits on little-endian kernels (older ones left it in the lower 16); local_port is
/// already in host order.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    let raw = ctx.remote_port();
    let remote_be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(remote_be as u16)
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    // sock_ops return value is ignored for the callbacks we handle.
    1
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(());
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    let Some(orig) = (unsafe { PENDING_DST.get(cookie) }).copied() else {
        return Ok(());
    };
    // local_port is host byte order in bpf_sock_ops; local_ip4 is in network order like user_ip4.
    let key = ClientKey::new(ctx.local_ip4(), ctx.local_port() as u16, remote_port(ctx));
    ORIG_DST.insert(key, orig, 0)?;
    PENDING_DST.remove(cookie)?;
    Ok(())
}
