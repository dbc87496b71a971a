//! Embeds the eBPF object (built by `cargo xtask build-ebpf`) into the agent binary, so one binary
//! is the whole agent. With the `embed-ebpf` feature off (xtask builds the agent library that way,
//! because xtask itself builds the object) nothing is embedded and `node.ebpf_object` is required.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_EMBED_EBPF");
    if std::env::var_os("CARGO_FEATURE_EMBED_EBPF").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = manifest.join("../mesh-ebpf/target/bpfel-unknown-none/release/mesh-ebpf");
    // Rebuild the agent whenever the object is rebuilt (or appears).
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("mesh-ebpf.o");
    if let Err(e) = std::fs::copy(&object, &out) {
        panic!(
            "\n\nthe eBPF object {} is missing ({e}).\nRun `cargo xtask build-ebpf` first (nightly + bpf-linker; `cargo xtask setup` installs them),\nthen build the agent again. `cargo xtask test|demo|bench|image` do this for you.\n\n",
            object.display()
        );
    }
}
