//! sock_ops: when a captured connection reaches ESTABLISHED, re-key its original destination by
//! the client's (ip, port), which is what the agent sees as the peer address on accept.

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::bpf_get_socket_cookie, macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::orig_dst::ClientKey;

use crate::maps::{ORIG_DST, PENDING_DST};

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
    let key = ClientKey::new(ctx.local_ip4(), ctx.local_port() as u16);
    ORIG_DST.insert(key, orig, 0)?;
    PENDING_DST.remove(cookie)?;
    Ok(())
}
