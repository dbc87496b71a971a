//! The agent's config parser (YAML, nesting check, validation) on arbitrary text: it must return
//! a result, never panic or stall.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mesh_agent::config::parse(text, "fuzz", &|_| None);
    }
});
