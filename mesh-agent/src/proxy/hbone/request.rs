//! Validation of an inbound HBONE CONNECT request, apart from I/O so that it can be unit tested
//! and fuzzed (`fuzz/fuzz_targets/hbone_request.rs`).

use std::net::SocketAddr;

use hyper::{HeaderMap, Method, StatusCode, Uri};

use super::SERVICE_HEADER;

/// The target endpoint and destination service named by a CONNECT request, or the status and
/// message to answer with.
pub fn parse_connect<'a>(
    method: &Method,
    uri: &Uri,
    headers: &'a HeaderMap,
) -> Result<(SocketAddr, &'a str), (StatusCode, String)> {
    if method != Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT is supported".into(),
        ));
    }
    let target = uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or((StatusCode::BAD_REQUEST, "authority must be ip:port".into()))?;
    let service = headers
        .get(SERVICE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("missing {SERVICE_HEADER} header"),
            )
        })?;
    Ok((target, service))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(service: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(s) = service {
            h.insert(SERVICE_HEADER, s.parse().expect("header"));
        }
        h
    }

    #[test]
    fn connect_needs_an_ip_port_authority_and_a_service() {
        let uri: Uri = "10.1.2.2:8080".parse().expect("uri");
        let h = headers(Some("echo"));
        let (target, service) = parse_connect(&Method::CONNECT, &uri, &h).expect("valid");
        assert_eq!(
            (target.to_string().as_str(), service),
            ("10.1.2.2:8080", "echo")
        );
        assert_eq!(
            parse_connect(&Method::GET, &uri, &h).expect_err("GET").0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let by_name: Uri = "echo.svc:8080".parse().expect("uri");
        assert_eq!(
            parse_connect(&Method::CONNECT, &by_name, &h)
                .expect_err("name")
                .0,
            StatusCode::BAD_REQUEST
        );
        let none = headers(None);
        assert_eq!(
            parse_connect(&Method::CONNECT, &uri, &none)
                .expect_err("no service")
                .0,
            StatusCode::BAD_REQUEST
        );
    }
}
