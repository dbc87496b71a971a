//! Upstream connects from the agent address.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

/// Connects to `endpoint` from the agent address: strict workloads only accept new connections
/// from it, so the source must not be whatever address the route would pick.
pub async fn connect_from(
    agent_ip: Ipv4Addr,
    endpoint: SocketAddrV4,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    defer_port_choice(&socket)?;
    socket.bind(SocketAddr::from((agent_ip, 0)))?;
    socket.connect(endpoint.into()).await
}

/// IP_BIND_ADDRESS_NO_PORT: bind(ip, 0) then leaves the port to connect(), which may reuse it
/// for other destinations; otherwise every upstream connection would hold a port of its own.
fn defer_port_choice(socket: &TcpSocket) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid socket fd, and the option value points to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
