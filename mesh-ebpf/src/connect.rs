//! cgroup/connect4: deny-list enforcement and capture of mesh destinations.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    addr::{port_from_sock_addr, port_to_sock_addr},
    counters::ConnCounters,
    deny::{kernel_allows, DenyKey},
    orig_dst::OrigDst,
    services::ServiceKey,
};

use crate::maps::{AGENT_ADDR, ALLOW, CONN_COUNTERS, DENY, PENDING_DST, SERVICES};
use crate::workload::current_workload;

/// Verdicts of a cgroup/connect4 program.
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // On an internal error (map full) the connection proceeds uncaptured rather than failing.
    try_connect4(&ctx).unwrap_or(PROCEED)
}

enum Outcome {
    Passed,
    Redirected,
    Denied,
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i64> {
    let identity = current_workload().map_or(0, |w| w.identity);

    let sa = ctx.sock_addr;
    let dst_ip = unsafe { (*sa).user_ip4 };
    let dst_port = port_from_sock_addr(unsafe { (*sa).user_port });

    let (service, flags) = match unsafe { SERVICES.get(ServiceKey::new(dst_ip, dst_port)) } {
        Some(s) => (s.service, s.flags),
        None => {
            count(identity, Outcome::Passed);
            return Ok(PROCEED);
        }
    };

    let pair = DenyKey::new(identity, service);
    let denied = unsafe { DENY.get(pair) }.is_some();
    let allowed = unsafe { ALLOW.get(pair) }.is_some();
    if !kernel_allows(denied, flags, allowed) {
        count(identity, Outcome::Denied);
        debug!(ctx, "deny identity={} service={}", identity, service);
        return Ok(REJECT);
    }

    let agent = match AGENT_ADDR.get(0) {
        Some(a) if a.redirects() => *a,
        _ => {
            count(identity, Outcome::Passed);
            return Ok(PROCEED);
        }
    };

    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    let orig = OrigDst {
        ip: dst_ip,
        port: dst_port,
        _pad: 0,
        service,
        identity,
    };
    PENDING_DST.insert(cookie, orig, 0)?;
    unsafe {
        (*sa).user_ip4 = agent.ip;
        (*sa).user_port = port_to_sock_addr(agent.port);
    }
    count(identity, Outcome::Redirected);
    debug!(ctx, "redirect identity={} service={}", identity, service);
    Ok(PROCEED)
}

fn count(identity: u32, outcome: Outcome) {
    let Some(c) = CONN_COUNTERS.get_ptr_mut(identity) else {
        return;
    };
    // Per-CPU slot: no other CPU writes it, so plain increments are race-free.
    let c: &mut ConnCounters = unsafe { &mut *c };
    match outcome {
        Outcome::Passed => c.opened += 1,
        Outcome::Redirected => {
            c.opened += 1;
            c.redirected += 1;
        }
        Outcome::Denied => c.denied += 1,
    }
}
