//! cgroup/connect4, connect6, sendmsg4, sendmsg6: one decision for every address family and
//! protocol. A destination that is a mesh service (its VIP or one of its endpoint addresses, from
//! the config in SERVICES or from the registry in ENDPOINTS) is
//! checked against the deny/allow-lists for the caller's identity; TCP connects to it are then
//! redirected to the agent. IPv6 sockets are covered through v4-mapped addresses
//! (`::ffff:a.b.c.d`, which is what reaches an IPv4 service); UDP is checked on connect() and on
//! every unconnected sendto()/sendmsg(), but not redirected (the agent proxies TCP only).
//! A workload's connect or datagram to a non-mesh destination needs an egress rule (EGRESS);
//! loopback stays open. Native IPv6 destinations other than ::1 have no egress rules: refused.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    addr::ip4_from_raw,
    addr::{port_from_sock_addr, port_to_sock_addr},
    counters::ConnCounters,
    deny::{kernel_allows, DenyKey},
    egress::{EgressData, IDENTITY_BITS},
    orig_dst::OrigDst,
    services::{ServiceKey, REGISTRY_SERVICE},
};

use crate::maps::{
    AGENT_ADDR, ALLOW, CONN_COUNTERS, DENY, EGRESS, ENDPOINTS, PENDING_DST, SERVICES,
};
use crate::workload::current_workload;

/// Verdicts of a cgroup/connect or sendmsg program (0 fails the call with EPERM).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

const SOCK_STREAM: u32 = 1;
/// `::ffff:0:0/96` in the kernel's encoding of user_ip6 words (network order in memory).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // On an internal error (map full) the connection proceeds uncaptured rather than failing.
    try_connect4(&ctx).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg4(&ctx).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg6(&ctx).unwrap_or(PROCEED)
}

enum Outcome {
    Passed,
    Redirected,
    Denied,
    EgressDenied,
}

const LOOPBACK_FIRST_OCTET: u8 = 127;

/// What to do with a destination.
enum Verdict {
    /// Not a mesh service, or UDP to an allowed one: leave it alone.
    Pass,
    Deny,
    /// TCP to an allowed mesh service: rewrite to the agent.
    Redirect {
        agent_ip: u32,
        agent_port: u16,
    },
}

/// The decision shared by every hook. `redirect` is false for UDP. Inlined: BPF calls take at
/// most five register arguments and no stack arguments.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    identity: u32,
    dst_ip: u32,
    dst_port: u16,
    redirect: bool,
) -> Result<Verdict, i64> {
    let key = ServiceKey::new(dst_ip, dst_port);
    // A registry endpoint address is the same mesh destination as its service's VIP.
    let found = unsafe { SERVICES.get(key).or_else(|| ENDPOINTS.get(key)) };
    let (service, flags) = match found {
        Some(s) => (s.service, s.flags),
        None => return Ok(egress(identity, dst_ip, dst_port)),
    };
    if service == REGISTRY_SERVICE {
        // The agent's registry API: open to every workload and not redirected, but the caller's
        // identity is recorded (re-keyed by sock_ops) so the agent knows who registers.
        if redirect {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
            let orig = OrigDst {
                ip: dst_ip,
                port: dst_port,
                _pad: 0,
                service,
                identity,
            };
            PENDING_DST.insert(cookie, orig, 0)?;
        }
        count(identity, Outcome::Passed);
        return Ok(Verdict::Pass);
    }
    let pair = DenyKey::new(identity, service);
    let denied = unsafe { DENY.get(pair) }.is_some();
    let allowed = unsafe { ALLOW.get(pair) }.is_some();
    if !kernel_allows(denied, flags, allowed) {
        count(identity, Outcome::Denied);
        debug!(ctx, "deny identity={} service={}", identity, service);
        return Ok(Verdict::Deny);
    }
    let agent = match AGENT_ADDR.get(0) {
        Some(a) if redirect && a.redirects() => *a,
        _ => {
            count(identity, Outcome::Passed);
            return Ok(Verdict::Pass);
        }
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let orig = OrigDst {
        ip: dst_ip,
        port: dst_port,
        _pad: 0,
        service,
        identity,
    };
    PENDING_DST.insert(cookie, orig, 0)?;
    count(identity, Outcome::Redirected);
    debug!(ctx, "redirect identity={} service={}", identity, service);
    // A random listener port of the agent's range (see AgentAddr): spreads the pod's
    // connections, and their TIME_WAIT sockets, over several destination ports.
    let random = unsafe { bpf_get_prandom_u32() };
    Ok(Verdict::Redirect {
        agent_ip: agent.ip,
        agent_port: agent.port_for(random),
    })
}

/// A non-mesh destination: open for loopback and for processes outside any workload (identity
/// 0), else only with an egress rule for the caller.
#[inline(always)]
fn egress(identity: u32, dst_ip: u32, dst_port: u16) -> Verdict {
    if identity == 0 || ip4_from_raw(dst_ip)[0] == LOOPBACK_FIRST_OCTET {
        count(identity, Outcome::Passed);
        return Verdict::Pass;
    }
    let key = Key::new(
        IDENTITY_BITS + 32,
        EgressData {
            identity,
            ip: dst_ip,
        },
    );
    match EGRESS.get(&key) {
        Some(ports) if ports.allows(dst_port) => {
            count(identity, Outcome::Passed);
            Verdict::Pass
        }
        _ => {
            count(identity, Outcome::EgressDenied);
            Verdict::Deny
        }
    }
}

/// Native IPv6: only loopback (::1) is open to a workload.
#[inline(always)]
fn egress6(identity: u32, words: [u32; 4]) -> Verdict {
    let loopback = words[0] == 0 && words[1] == 0 && words[2] == 0 && words[3] == u32::from_be(1);
    if identity == 0 || loopback {
        count(identity, Outcome::Passed);
        return Verdict::Pass;
    }
    count(identity, Outcome::EgressDenied);
    Verdict::Deny
}

#[inline(always)]
fn caller() -> u32 {
    current_workload().map_or(0, |w| w.identity)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i64> {
    let sa = ctx.sock_addr;
    let (dst_ip, user_port, kind) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).type_) };
    match decide(
        ctx,
        caller(),
        dst_ip,
        port_from_sock_addr(user_port),
        kind == SOCK_STREAM,
    )? {
        Verdict::Pass => Ok(PROCEED),
        Verdict::Deny => Ok(REJECT),
        Verdict::Redirect {
            agent_ip,
            agent_port,
        } => {
            unsafe {
                (*sa).user_ip4 = agent_ip;
                (*sa).user_port = port_to_sock_addr(agent_port);
            }
            Ok(PROCEED)
        }
    }
}

/// The IPv4 address inside a v4-mapped IPv6 address, if it is one.
#[inline(always)]
fn v4_mapped(words: [u32; 4]) -> Option<u32> {
    (words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD).then_some(words[3])
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i64> {
    let sa = ctx.sock_addr;
    let (words, user_port, kind) = unsafe {
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port,
            (*sa).type_,
        )
    };
    // Services have IPv4 addresses; a native IPv6 destination is not a mesh destination.
    let Some(dst_ip) = v4_mapped(words) else {
        return Ok(match egress6(caller(), words) {
            Verdict::Deny => REJECT,
            _ => PROCEED,
        });
    };
    match decide(
        ctx,
        caller(),
        dst_ip,
        port_from_sock_addr(user_port),
        kind == SOCK_STREAM,
    )? {
        Verdict::Pass => Ok(PROCEED),
        Verdict::Deny => Ok(REJECT),
        Verdict::Redirect {
            agent_ip,
            agent_port,
        } => {
            // Stays v4-mapped: the socket keeps talking IPv4 on the wire, now to the agent.
            unsafe {
                (*sa).user_ip6[3] = agent_ip;
                (*sa).user_port = port_to_sock_addr(agent_port);
            }
            Ok(PROCEED)
        }
    }
}

/// Unconnected UDP: checked per datagram, never redirected.
fn try_sendmsg4(ctx: &SockAddrContext) -> Result<i32, i64> {
    let sa = ctx.sock_addr;
    let (dst_ip, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    match decide(ctx, caller(), dst_ip, port_from_sock_addr(user_port), false)? {
        Verdict::Deny => Ok(REJECT),
        _ => Ok(PROCEED),
    }
}

fn try_sendmsg6(ctx: &SockAddrContext) -> Result<i32, i64> {
    let sa = ctx.sock_addr;
    let (words, user_port) = unsafe {
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port,
        )
    };
    let Some(dst_ip) = v4_mapped(words) else {
        return Ok(match egress6(caller(), words) {
            Verdict::Deny => REJECT,
            _ => PROCEED,
        });
    };
    match decide(ctx, caller(), dst_ip, port_from_sock_addr(user_port), false)? {
        Verdict::Deny => Ok(REJECT),
        _ => Ok(PROCEED),
    }
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
        Outcome::EgressDenied => c.egress_denied += 1,
    }
}
