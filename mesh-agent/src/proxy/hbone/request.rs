//! Validation of an inbound HBONE CONNECT request, apart from I/O so that it can be unit tested
//! and fuzzed (`fuzz/fuzz_targets/hbone_request.rs`).

use std::net::{Ipv4Addr, SocketAddr};

use hyper::header::FORWARDED;
use hyper::{HeaderMap, Method, StatusCode, Uri};

use super::{PROTOCOL_HEADER, SERVICE_HEADER};

/// What an HBONE tunnel carries when the calling agent marks it with [`PROTOCOL_HEADER`]: the
/// destination agent then serves it request by request instead of relaying its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelProtocol {
    /// HTTP/1.1 with keep-alive (and upgrades).
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

impl TunnelProtocol {
    /// The header value naming this protocol.
    pub fn header_value(self) -> &'static str {
        match self {
            TunnelProtocol::Http1 => "http/1.1",
            TunnelProtocol::Http2 => "h2",
        }
    }
}

/// The protocol a CONNECT's [`PROTOCOL_HEADER`] names; none (an opaque TCP tunnel) when absent.
/// Any other value, or the header given twice, is refused with 400 naming the header.
pub fn tunnel_protocol(
    headers: &HeaderMap,
) -> Result<Option<TunnelProtocol>, (StatusCode, String)> {
    let mut values = headers.get_all(PROTOCOL_HEADER).iter();
    let (value, None) = (values.next(), values.next()) else {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("{PROTOCOL_HEADER} given more than once"),
        ));
    };
    let Some(value) = value else {
        return Ok(None);
    };
    match value.as_bytes() {
        b"http/1.1" => Ok(Some(TunnelProtocol::Http1)),
        b"h2" => Ok(Some(TunnelProtocol::Http2)),
        other => Err((
            StatusCode::BAD_REQUEST,
            format!(
                "{PROTOCOL_HEADER} {:?} is not one of \"http/1.1\", \"h2\"",
                String::from_utf8_lossy(other)
            ),
        )),
    }
}

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

/// What the `Forwarded` header of a CONNECT says about the original caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// No header: connect from the agent address.
    Absent,
    /// `for=` of the first (originating) element, an IPv4 address.
    Caller(Ipv4Addr),
    /// Present but not one IPv4 `for=` value this agent can bind (counted, then ignored).
    Unusable,
}

/// The caller named by `Forwarded: for=<ipv4>` (RFC 7239; the value may be quoted, a port is
/// not allowed since the destination agent binds the address only). Never panics on any input.
pub fn forwarded_for(headers: &HeaderMap) -> ForwardedFor {
    let mut values = headers.get_all(FORWARDED).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return match headers.contains_key(FORWARDED) {
            true => ForwardedFor::Unusable,
            false => ForwardedFor::Absent,
        };
    };
    let Ok(text) = value.to_str() else {
        return ForwardedFor::Unusable;
    };
    let first = text.split(',').next().unwrap_or_default();
    let mut found = None;
    for pair in first.split(';') {
        let Some((key, value)) = pair.trim().split_once('=') else {
            return ForwardedFor::Unusable;
        };
        if key.eq_ignore_ascii_case("for") {
            if found.is_some() {
                return ForwardedFor::Unusable;
            }
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            found = Some(value.parse::<Ipv4Addr>());
        }
    }
    match found {
        Some(Ok(ip)) => ForwardedFor::Caller(ip),
        _ => ForwardedFor::Unusable,
    }
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

    #[test]
    fn protocol_mark_is_absent_http1_or_h2_and_nothing_else() {
        let mark = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(PROTOCOL_HEADER, v.parse().expect("header"));
            }
            tunnel_protocol(&h)
        };
        assert_eq!(mark(&[]), Ok(None));
        assert_eq!(mark(&["http/1.1"]), Ok(Some(TunnelProtocol::Http1)));
        assert_eq!(mark(&["h2"]), Ok(Some(TunnelProtocol::Http2)));
        for p in [TunnelProtocol::Http1, TunnelProtocol::Http2] {
            assert_eq!(mark(&[p.header_value()]), Ok(Some(p)));
        }
        for bad in [&["H2"][..], &["http/1.0"], &[""], &["h2", "h2"]] {
            let (status, message) = mark(bad).expect_err("refused");
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert!(message.contains(PROTOCOL_HEADER), "{message}");
        }
    }

    fn forwarded(values: &[&str]) -> ForwardedFor {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(FORWARDED, v.parse().expect("header"));
        }
        forwarded_for(&h)
    }

    #[test]
    fn forwarded_for_names_one_ipv4_caller_or_is_unusable() {
        let caller = ForwardedFor::Caller(Ipv4Addr::new(10, 1, 1, 2));
        assert_eq!(forwarded(&[]), ForwardedFor::Absent);
        assert_eq!(forwarded(&["for=10.1.1.2"]), caller);
        assert_eq!(forwarded(&["For=\"10.1.1.2\";proto=https"]), caller);
        assert_eq!(forwarded(&["for=10.1.1.2, for=10.9.9.9"]), caller);
        for bad in [
            "for=10.1.1.2:80",
            "for=\"[::1]\"",
            "for=unknown",
            "for=10.1.1",
            "for=",
            "by=10.1.1.2",
            "garbage",
            "for=10.1.1.2;for=10.1.1.3",
            "",
        ] {
            assert_eq!(forwarded(&[bad]), ForwardedFor::Unusable, "{bad:?}");
        }
        assert_eq!(
            forwarded(&["for=10.1.1.2", "for=10.1.1.3"]),
            ForwardedFor::Unusable
        );
        let mut h = HeaderMap::new();
        h.insert(
            FORWARDED,
            hyper::header::HeaderValue::from_bytes(b"for=\xff").expect("bytes"),
        );
        assert_eq!(forwarded_for(&h), ForwardedFor::Unusable);
    }
}
