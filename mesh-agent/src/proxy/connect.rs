//! Upstream connects: from the caller's own address (transparent, `proxy.transparent`) or from
//! the agent address.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

use super::reply_routing::Marks;
use crate::config::Config;

/// Where this agent's upstream connects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub agent_ip: Ipv4Addr,
    /// SO_MARK of transparent sockets; None: every connect comes from the agent address.
    pub transparent_mark: Option<u32>,
}

impl Source {
    /// Every connect from the agent address (health checks, tests).
    pub fn agent(agent_ip: Ipv4Addr) -> Self {
        Self {
            agent_ip,
            transparent_mark: None,
        }
    }

    pub fn of(config: &Config) -> Self {
        Self {
            agent_ip: config.node.agent_ip,
            transparent_mark: config
                .proxy
                .transparent
                .then(|| Marks::for_instance(&config.node.instance).socket),
        }
    }

    /// The address a connect on behalf of `caller` binds. The agent's own address when not
    /// transparent, when the caller is unknown, or when the caller calls itself (the pod would
    /// answer its own address inside its namespace, never back to the agent).
    pub fn bind_ip(&self, caller: Option<Ipv4Addr>, endpoint: SocketAddrV4) -> Ipv4Addr {
        match (self.transparent_mark, caller) {
            (Some(_), Some(ip)) if ip != *endpoint.ip() && ip != self.agent_ip => ip,
            _ => self.agent_ip,
        }
    }
}

/// Why the caller address named by another agent (`Forwarded: for=`) is not bound: each would
/// let a mesh identity make a pod believe a call came from somewhere it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RemoteCallerRefused {
    #[error("a loopback, unspecified, link-local, multicast or broadcast address")]
    Reserved,
    #[error("the agent address")]
    AgentAddress,
    #[error("an address of this node")]
    NodeAddress,
    #[error("an address of a pod on this node")]
    LocalPod,
    #[error("routed elsewhere than the agent that names it")]
    OtherRoute,
}

impl Source {
    /// Checks `ip`, named as the caller by the agent at `peer`. Beyond the address classes and
    /// this node's own addresses, the node must route `ip` the way it routes `peer` (the same
    /// source address chosen), like reverse-path filtering; `is_local_pod` covers local pods on
    /// nodes whose pod interfaces carry no address of their own.
    pub fn check_remote_caller(
        &self,
        ip: Ipv4Addr,
        peer: Ipv4Addr,
        is_local_pod: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Ipv4Addr, RemoteCallerRefused> {
        if ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_link_local()
            || ip.is_multicast()
            || ip.is_broadcast()
        {
            return Err(RemoteCallerRefused::Reserved);
        }
        if ip == self.agent_ip {
            return Err(RemoteCallerRefused::AgentAddress);
        }
        let via = route_source(ip);
        if via == Some(ip) {
            return Err(RemoteCallerRefused::NodeAddress);
        }
        if is_local_pod(ip) {
            return Err(RemoteCallerRefused::LocalPod);
        }
        if via.is_none() || via != route_source(peer) {
            return Err(RemoteCallerRefused::OtherRoute);
        }
        Ok(ip)
    }
}

/// The source address the node's routing picks toward `ip` (its own address when `ip` is
/// local). A connected UDP socket asks the kernel without sending anything.
fn route_source(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((ip, 9)).ok()?;
    match socket.local_addr().ok()? {
        SocketAddr::V4(local) => Some(*local.ip()),
        SocketAddr::V6(_) => None,
    }
}

/// Connects to `endpoint` on behalf of `caller` (see [`Source::bind_ip`]). Strict workloads
/// accept a new connection only when its 4-tuple was opened from the agent's cgroup, whatever
/// the source address.
pub async fn connect_from(
    source: Source,
    caller: Option<Ipv4Addr>,
    endpoint: SocketAddrV4,
) -> std::io::Result<TcpStream> {
    let ip = source.bind_ip(caller, endpoint);
    let socket = TcpSocket::new_v4()?;
    if let (Some(mark), true) = (source.transparent_mark, ip != source.agent_ip) {
        // IP_TRANSPARENT permits binding the caller's (non-local) address; the mark lets the
        // reply routing deliver the pod's answers to this socket.
        set_int(&socket, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?;
        set_int(
            &socket,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            mark as libc::c_int,
        )?;
    }
    // IP_BIND_ADDRESS_NO_PORT: bind(ip, 0) then leaves the port to connect(), which may reuse
    // it for other destinations; otherwise every upstream connection would hold a port of its own.
    set_int(&socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    socket.bind(SocketAddr::from((ip, 0)))?;
    socket.connect(endpoint.into()).await
}

fn set_int(
    socket: &TcpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: valid socket fd, and the option value points to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::Source;
    use std::net::{Ipv4Addr, SocketAddrV4};

    #[test]
    fn binds_the_caller_only_when_transparent_and_not_calling_itself() {
        let agent_ip = Ipv4Addr::new(10, 1, 255, 1);
        let caller = Ipv4Addr::new(10, 1, 0, 2);
        let other = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 3), 80);
        let itself = SocketAddrV4::new(caller, 80);
        let on = Source {
            agent_ip,
            transparent_mark: Some(1),
        };
        let off = Source {
            transparent_mark: None,
            ..on
        };
        assert_eq!(on.bind_ip(Some(caller), other), caller);
        assert_eq!(on.bind_ip(Some(caller), itself), agent_ip);
        assert_eq!(on.bind_ip(None, other), agent_ip);
        assert_eq!(off.bind_ip(Some(caller), other), agent_ip);
    }

    #[test]
    fn remote_callers_may_not_be_local_or_reserved_addresses() {
        use super::RemoteCallerRefused as R;
        let source = Source {
            agent_ip: Ipv4Addr::new(10, 1, 255, 1),
            transparent_mark: Some(1),
        };
        let peer = Ipv4Addr::new(192, 0, 2, 1);
        let pod = Ipv4Addr::new(10, 1, 0, 2);
        let check = |ip| source.check_remote_caller(ip, peer, |p| p == pod);
        assert_eq!(check(Ipv4Addr::LOCALHOST), Err(R::Reserved));
        assert_eq!(check(Ipv4Addr::new(127, 3, 0, 1)), Err(R::Reserved));
        assert_eq!(check(Ipv4Addr::UNSPECIFIED), Err(R::Reserved));
        assert_eq!(check(Ipv4Addr::BROADCAST), Err(R::Reserved));
        assert_eq!(check(source.agent_ip), Err(R::AgentAddress));
        assert_eq!(check(pod), Err(R::LocalPod));
    }
}
