//! The HBONE CONNECT request checks on arbitrary method, authority and service header bytes
//! (split at the first two newlines); the service bytes also serve as a `Forwarded` header and
//! as the protocol mark.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::hbone::request::{forwarded_for, parse_connect, tunnel_protocol};
use mesh_agent::proxy::hbone::{PROTOCOL_HEADER, SERVICE_HEADER};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (Some(method), Some(uri), Some(service)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(method) = hyper::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = hyper::Uri::try_from(uri) else {
        return;
    };
    let mut headers = hyper::HeaderMap::new();
    if let Ok(value) = hyper::header::HeaderValue::from_bytes(service) {
        headers.insert(SERVICE_HEADER, value.clone());
        headers.insert(PROTOCOL_HEADER, value.clone());
        headers.insert(hyper::header::FORWARDED, value);
    }
    // Any bytes: an answer, never a panic.
    let _ = forwarded_for(&headers);
    if let Ok(Some(protocol)) = tunnel_protocol(&headers) {
        assert_eq!(protocol.header_value().as_bytes(), service);
    }
    if let Ok((_, service)) = parse_connect(&method, &uri, &headers) {
        assert!(!service.is_empty());
        assert_eq!(method, hyper::Method::CONNECT);
    }
});
