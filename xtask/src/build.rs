//! Builds: the eBPF object (nightly, build-std, bpf-linker) and the userspace binaries.

use std::process::Command;

use anyhow::Result;

use crate::sh;

/// Environment the outer (stable) cargo sets that must not leak into the nightly eBPF build.
const LEAKY_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
];

pub fn ebpf() -> Result<()> {
    let mut command = Command::new("cargo");
    command
        .args([
            "+nightly",
            "build",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
            "--locked",
        ])
        .current_dir(sh::workspace_root().join("mesh-ebpf"));
    for var in LEAKY_ENV {
        command.env_remove(var);
    }
    sh::run(&mut command)
}

pub fn binaries() -> Result<()> {
    sh::cargo(&["build", "-p", "mesh-agent", "-p", "mesh-tests", "--bins"])
}

/// The agent as deployed: release build, eBPF object embedded (build `ebpf()` first).
pub fn release_agent() -> Result<()> {
    sh::cargo(&[
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "--bin",
        "mesh-agent",
    ])
}
