//! Protocol detection on arbitrary first bytes: it never panics, it calls HTTP only what starts
//! with a whole request-line method or the HTTP/2 preface, and a decision never changes when more
//! bytes arrive (the sniffer stops at the first decision, so a later flip would misroute).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::sniff::{classify, Detected};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
];

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(64)];
    let mut decided: Option<Detected> = None;
    for end in 1..=data.len() {
        let verdict = classify(&data[..end]);
        if let Some(earlier) = decided {
            assert_eq!(verdict, Some(earlier), "decision changed at {end} bytes");
        }
        if verdict == Some(Detected::Http) {
            let bytes = &data[..end];
            assert!(
                bytes.starts_with(H2_PREFACE) || METHODS.iter().any(|m| bytes.starts_with(m)),
                "HTTP without a method or preface"
            );
        }
        decided = decided.or(verdict);
    }
});
