//! PENDING_DST (socket cookie -> original destination, written at connect) and ORIG_DST
//! ((client ip, client port, agent port) -> original destination, written by sock_ops at
//! ESTABLISHED) which the agent reads on accept to recover where the pod meant to go and who it
//! is.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct OrigDst {
    /// Original destination IPv4 address, kernel encoding.
    pub ip: u32,
    /// Original destination port, host byte order.
    pub port: u16,
    pub _pad: u16,
    /// Service id the destination matched.
    pub service: u32,
    /// Identity id of the calling workload.
    pub identity: u32,
}

/// Key of ORIG_DST: the redirected connection as the agent sees it on accept: its peer (the
/// client's address) and the agent port it reached. The agent port is part of the key because
/// connects are spread over several agent ports (see `AgentAddr`), and the kernel may give two
/// of a pod's concurrent connections the same source port when they go to different ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ClientKey {
    /// Client IPv4 address, kernel encoding.
    pub ip: u32,
    /// Client port, host byte order.
    pub port: u16,
    /// The agent port the client connected to, host byte order (0 in entries written by
    /// programs older than the port range).
    pub agent_port: u16,
}

impl ClientKey {
    pub const fn new(ip: u32, port: u16, agent_port: u16) -> Self {
        Self {
            ip,
            port,
            agent_port,
        }
    }
}

crate::user_pod!(OrigDst, ClientKey);
