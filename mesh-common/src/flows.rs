//! AGENT_FLOWS: TCP connections the agent itself opened, recorded by a sock_ops program attached
//! to the agent's own cgroup when the connect starts. Strict mode admits a new inbound
//! connection only when its 4-tuple is here: a host process cannot get an entry by binding the
//! agent's address, only by running in the agent's cgroup.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct FlowKey {
    /// Source (the agent's side) IPv4 address, kernel encoding.
    pub src_ip: u32,
    /// Destination IPv4 address, kernel encoding.
    pub dst_ip: u32,
    /// Ports in host byte order.
    pub src_port: u16,
    pub dst_port: u16,
}

impl FlowKey {
    pub const fn new(src_ip: u32, src_port: u16, dst_ip: u32, dst_port: u16) -> Self {
        Self {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
        }
    }
}

crate::user_pod!(FlowKey);
