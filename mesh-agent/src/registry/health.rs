//! Health checks the agent runs on local instances: http, tcp, grpc (grpc.health.v1) and script;
//! plus TTL checks, which the application keeps passing with heartbeats. Active checks connect
//! from the agent address (strict pods accept new connections only from it).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::instance::HealthStatus;
use crate::proxy::connect::{connect_from, Source};

/// What a check does; parsed from a Consul check definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// GET the URL: 2xx passing, 429 warning, else critical.
    Http(String),
    /// Connect: passing when the connection opens.
    Tcp(SocketAddrV4),
    /// grpc.health.v1 Check; `service` empty means the server as a whole.
    Grpc { addr: SocketAddrV4, service: String },
    /// Run a program: exit 0 passing, 1 warning, else critical.
    Script(Vec<String>),
    /// Passing while heartbeats arrive within the TTL.
    Ttl(Duration),
}

/// Runs one active check within `timeout`; returns the status and a short note.
pub async fn run(
    kind: &CheckKind,
    timeout: Duration,
    agent_ip: Ipv4Addr,
    output_cap: usize,
) -> (HealthStatus, String) {
    let fut = async {
        match kind {
            CheckKind::Http(url) => http(url, agent_ip).await,
            CheckKind::Tcp(addr) => {
                match connect_from(Source::agent(agent_ip), None, *addr).await {
                    Ok(_) => (
                        HealthStatus::Passing,
                        format!("TCP connect {addr}: Success"),
                    ),
                    Err(e) => (HealthStatus::Critical, format!("TCP connect {addr}: {e}")),
                }
            }
            CheckKind::Grpc { addr, service } => grpc(*addr, service, agent_ip).await,
            CheckKind::Script(args) => script(args, output_cap).await,
            CheckKind::Ttl(_) => (HealthStatus::Passing, String::new()),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => (
            HealthStatus::Critical,
            format!("check timed out after {timeout:?}"),
        ),
    }
}

async fn http(url: &str, agent_ip: Ipv4Addr) -> (HealthStatus, String) {
    let critical = |m: String| (HealthStatus::Critical, m);
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return critical(format!("bad URL {url:?}"));
    };
    let Some(addr) = uri.authority().and_then(|a| {
        let ip: Ipv4Addr = a.host().parse().ok()?;
        Some(SocketAddrV4::new(ip, a.port_u16().unwrap_or(80)))
    }) else {
        return critical(format!("{url:?} must name an IPv4 address"));
    };
    let stream = match connect_from(Source::agent(agent_ip), None, addr).await {
        Ok(s) => s,
        Err(e) => return critical(format!("HTTP GET {url}: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => return critical(format!("HTTP GET {url}: {e}")),
    };
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .header("user-agent", "nodemesh health check")
        .body(Empty::<Bytes>::new());
    let Ok(request) = request else {
        return critical(format!("bad URL {url:?}"));
    };
    match sender.send_request(request).await {
        Ok(resp) => {
            let code = resp.status();
            let _ = resp.into_body().collect().await;
            let status = if code.is_success() {
                HealthStatus::Passing
            } else if code.as_u16() == 429 {
                HealthStatus::Warning
            } else {
                HealthStatus::Critical
            };
            (status, format!("HTTP GET {url}: {code}"))
        }
        Err(e) => critical(format!("HTTP GET {url}: {e}")),
    }
}

async fn grpc(addr: SocketAddrV4, service: &str, agent_ip: Ipv4Addr) -> (HealthStatus, String) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e,
        Err(e) => return (HealthStatus::Critical, format!("gRPC {addr}: {e}")),
    };
    let connector = tower::service_fn(move |_: hyper::Uri| async move {
        connect_from(Source::agent(agent_ip), None, addr)
            .await
            .map(TokioIo::new)
    });
    let channel = match endpoint.connect_with_connector(connector).await {
        Ok(c) => c,
        Err(e) => return (HealthStatus::Critical, format!("gRPC {addr}: {e}")),
    };
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    match HealthClient::new(channel).check(request).await {
        Ok(resp) if resp.get_ref().status == ServingStatus::Serving as i32 => (
            HealthStatus::Passing,
            format!("gRPC {addr} {service:?}: SERVING"),
        ),
        Ok(resp) => (
            HealthStatus::Critical,
            format!("gRPC {addr} {service:?}: status {}", resp.get_ref().status),
        ),
        Err(e) => (HealthStatus::Critical, format!("gRPC {addr}: {e}")),
    }
}

async fn script(args: &[String], output_cap: usize) -> (HealthStatus, String) {
    let Some((program, rest)) = args.split_first() else {
        return (HealthStatus::Critical, "empty Args".to_owned());
    };
    // kill_on_drop: a check that times out is killed, not left running.
    let child = tokio::process::Command::new(program)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match child {
        Ok(out) => {
            let mut text = out.stdout;
            text.extend_from_slice(&out.stderr);
            text.truncate(output_cap);
            let note = String::from_utf8_lossy(&text).into_owned();
            let status = match out.status.code() {
                Some(0) => HealthStatus::Passing,
                Some(1) => HealthStatus::Warning,
                _ => HealthStatus::Critical,
            };
            (status, note)
        }
        Err(e) => (
            HealthStatus::Critical,
            format!("cannot run {program:?}: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

    #[tokio::test]
    async fn tcp_check_follows_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("v4")
        };
        let kind = CheckKind::Tcp(addr);
        let (status, _) = run(&kind, Duration::from_secs(2), LO, 100).await;
        assert_eq!(status, HealthStatus::Passing);
        drop(listener);
        let (status, _) = run(&kind, Duration::from_secs(2), LO, 100).await;
        assert_eq!(status, HealthStatus::Critical);
    }

    #[tokio::test]
    async fn script_exit_codes_timeout_and_output_cap() {
        let sh = |s: &str| CheckKind::Script(vec!["sh".into(), "-c".into(), s.into()]);
        let t = Duration::from_secs(5);
        assert_eq!(run(&sh("exit 0"), t, LO, 10).await.0, HealthStatus::Passing);
        assert_eq!(run(&sh("exit 1"), t, LO, 10).await.0, HealthStatus::Warning);
        assert_eq!(
            run(&sh("exit 2"), t, LO, 10).await.0,
            HealthStatus::Critical
        );
        let (status, note) = run(&sh("yes | head -c 100000"), t, LO, 10).await;
        assert_eq!((status, note.len()), (HealthStatus::Passing, 10));
        let (status, note) = run(&sh("sleep 5"), Duration::from_millis(200), LO, 10).await;
        assert_eq!(status, HealthStatus::Critical);
        assert!(note.contains("timed out"), "{note}");
    }

    #[tokio::test]
    async fn grpc_check_against_a_real_health_server() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("wallet", tonic_health::ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("v4")
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let kind = |s: &str| CheckKind::Grpc {
            addr,
            service: s.into(),
        };
        let t = Duration::from_secs(5);
        assert_eq!(
            run(&kind("wallet"), t, LO, 10).await.0,
            HealthStatus::Passing
        );
        reporter
            .set_service_status("wallet", tonic_health::ServingStatus::NotServing)
            .await;
        assert_eq!(
            run(&kind("wallet"), t, LO, 10).await.0,
            HealthStatus::Critical
        );
    }

    #[tokio::test]
    async fn http_check_maps_status_codes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let code = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
        let served = code.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let c = served.load(std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        hyper::Response::builder()
                            .status(c)
                            .body(http_body_util::Full::new(Bytes::from("x")))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let kind = CheckKind::Http(format!("http://{addr}/health"));
        let t = Duration::from_secs(5);
        assert_eq!(run(&kind, t, LO, 10).await.0, HealthStatus::Passing);
        code.store(429, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(run(&kind, t, LO, 10).await.0, HealthStatus::Warning);
        code.store(503, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(run(&kind, t, LO, 10).await.0, HealthStatus::Critical);
    }
}
