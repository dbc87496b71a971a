//! IPv4 address encoding used in every map: the u32 exactly as the kernel stores it in
//! `bpf_sock_addr.user_ip4` / `bpf_sock_ops.local_ip4`, i.e. network byte order in memory.

/// Encodes octets the way the kernel stores an IPv4 address field.
#[inline(always)]
pub const fn ip4_to_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// Decodes a kernel IPv4 address field into octets.
#[inline(always)]
pub const fn ip4_from_raw(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// `bpf_sock_addr.user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
pub const fn port_from_sock_addr(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// Inverse of [`port_from_sock_addr`].
#[inline(always)]
pub const fn port_to_sock_addr(port: u16) -> u32 {
    port.to_be() as u32
}
