//! Client side: dial a node agent (TCP + mTLS + HTTP/2) and open CONNECT streams on it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, Connection, SendRequest};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{HboneError, TunnelProtocol, ALPN_H2, PROTOCOL_HEADER, SERVICE_HEADER};

pub(crate) type Sender = SendRequest<Empty<Bytes>>;
pub(crate) type Driver = Connection<TokioIo<TlsStream<TcpStream>>, Empty<Bytes>, TokioExecutor>;

/// Pings detect a dead peer on an otherwise idle pooled connection.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Bounds how much of an error response body is read for the reason text.
const MAX_REASON_BYTES: usize = 4096;

/// Opens an HTTP/2 connection to `node`; the returned driver must be spawned.
pub(crate) async fn dial(
    tls: Arc<ClientConfig>,
    node: SocketAddr,
) -> Result<(Sender, Driver), HboneError> {
    let tcp = TcpStream::connect(node)
        .await
        .map_err(|source| HboneError::Connect { addr: node, source })?;
    // Tunnels carry interactive traffic; do not delay small writes.
    tcp.set_nodelay(true)
        .map_err(|source| HboneError::Connect { addr: node, source })?;
    // Node agents are addressed by IP; the server certificate is verified against it.
    let name = ServerName::IpAddress(node.ip().into());
    let stream = TlsConnector::from(with_h2_alpn(tls))
        .connect(name, tcp)
        .await
        .map_err(|source| HboneError::Tls { addr: node, source })?;
    if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
        return Err(HboneError::Alpn { addr: node });
    }
    http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        // Grow flow-control windows with the measured bandwidth-delay product.
        .adaptive_window(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| HboneError::Handshake { addr: node, source })
}

/// Sends one CONNECT for `target` and returns the tunnel once the server answers 200.
/// `caller` (the calling pod's address) goes in `Forwarded: for=`, so the destination agent
/// can connect to the target from it (`proxy.transparent`). `protocol` marks a tunnel that
/// carries HTTP, so the destination agent serves it request by request.
pub(crate) async fn open_stream(
    sender: &mut Sender,
    target: SocketAddr,
    service: &str,
    caller: Option<Ipv4Addr>,
    protocol: Option<TunnelProtocol>,
) -> Result<Upgraded, HboneError> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header(SERVICE_HEADER, service);
    if let Some(protocol) = protocol {
        req = req.header(PROTOCOL_HEADER, protocol.header_value());
    }
    if let Some(ip) = caller {
        req = req.header(hyper::header::FORWARDED, format!("for={ip}"));
    }
    let req = req.body(Empty::new())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| HboneError::Stream { target, source })?;
    match resp.status() {
        StatusCode::OK => hyper::upgrade::on(resp)
            .await
            .map_err(|source| HboneError::Stream { target, source }),
        StatusCode::FORBIDDEN => Err(HboneError::Denied {
            reason: reason(resp).await,
        }),
        status => Err(HboneError::Status {
            target,
            status,
            reason: reason(resp).await,
        }),
    }
}

async fn reason(resp: Response<Incoming>) -> String {
    match Limited::new(resp.into_body(), MAX_REASON_BYTES)
        .collect()
        .await
    {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(e) => format!("(unreadable response body: {e})"),
    }
}

/// HTTP/2 over TLS needs ALPN "h2"; set it unless the caller already did.
fn with_h2_alpn(tls: Arc<ClientConfig>) -> Arc<ClientConfig> {
    if tls.alpn_protocols == [ALPN_H2] {
        return tls;
    }
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}
