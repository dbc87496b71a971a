//! HBONE errors; authorization denials are a distinct variant so callers can tell them apart.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::StatusCode;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HboneError {
    #[error("connect to node {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with node {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("node {addr} did not negotiate ALPN h2")]
    Alpn { addr: SocketAddr },
    #[error("HTTP/2 handshake with node {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// A dial to the node failed while this call was queued behind it.
    #[error("node {addr} unavailable: {reason}")]
    NodeUnavailable { addr: SocketAddr, reason: String },
    #[error("invalid CONNECT request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("CONNECT stream to {target}: {source}")]
    Stream {
        target: SocketAddr,
        source: hyper::Error,
    },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The destination agent's authorization policy refused the connection (HTTP 403).
    #[error("denied by destination: {reason}")]
    Denied { reason: String },
    #[error("CONNECT to {target} failed with {status}: {reason}")]
    Status {
        target: SocketAddr,
        status: StatusCode,
        reason: String,
    },
}
