//! Peer identity extraction from an arbitrary DER certificate (what an HBONE client presents).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::proxy::hbone::PeerIdentity::from_cert_der(data);
});
