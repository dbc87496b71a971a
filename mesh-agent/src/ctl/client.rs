//! A small blocking HTTP/1.0 client for the admin port (loopback, one request per connection).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::CtlError;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one request and returns (status, body).
pub fn request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, String), CtlError> {
    let io = |source| CtlError::Connect { admin, source };
    let mut stream = TcpStream::connect_timeout(&admin, TIMEOUT).map_err(io)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {admin}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CtlError::Malformed {
            path: path.to_owned(),
            detail: format!("no status line in {head:?}"),
        })?;
    Ok((status, body.to_owned()))
}

/// Percent-encodes a query parameter value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
