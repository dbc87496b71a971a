//! Idempotent toolchain bootstrap for a fresh machine: nightly rust-src, LLVM 22 dev packages,
//! bpf-linker built against LLVM 22, and the tools the tests call (bpftool, iproute2).

use std::process::Command;

use anyhow::{bail, Result};

use crate::sh;

/// Debian packages: LLVM for bpf-linker; bpftool, iproute2, tcpdump for tests; wrk for benchmarks; prometheus for promtool.
const PACKAGES: &[&str] = &[
    "tcpdump",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "wrk",
    // The Prometheus server the metrics tests scrape, and promtool that checks /metrics.
    "prometheus",
    // kube-proxy style DNAT of service VIPs in the fail-closed tests; the agent's reply routing
    // for `proxy.transparent` (with iproute2's `ip`).
    "nftables",
    // Registry: a real etcd for the tests and demo, protoc for etcd-client's build script, curl
    // for registrations from inside pods.
    "etcd-server",
    "protobuf-compiler",
    "curl",
    // Real HTTP servers and clients in the L7 tests (nginx upstreams, h2c) and the benchmark.
    "nginx",
];
const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    nightly_rust_src()?;
    debian_packages(PACKAGES)?;
    bpf_linker()?;
    cargo_fuzz()?;
    python_packages()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let installed = sh::output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    );
    match installed {
        Ok(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Ok(_) => sh::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ])),
        Err(_) => {
            sh::run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            sh::run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        }
    }
}

fn is_installed(package: &str) -> bool {
    sh::output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_ok_and(|s| s.contains("install ok installed"))
}

/// Installs the packages of `wanted` that are missing (apt-get update first, only if needed).
pub fn debian_packages(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root or install them with apt-get");
    }
    sh::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    sh::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// cargo-fuzz runs the fuzz targets (`cargo xtask fuzz`, and briefly in `cargo xtask test`).
fn cargo_fuzz() -> Result<()> {
    if sh::output("cargo", &["+nightly", "fuzz", "--version"]).is_ok() {
        return Ok(());
    }
    sh::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

fn bpf_linker() -> Result<()> {
    let current = sh::output("bpf-linker", &["--version"]).unwrap_or_default();
    if current.contains(&format!("bpf-linker {BPF_LINKER_VERSION}")) {
        return Ok(());
    }
    sh::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// py-consul (PyPI): the real Consul client the registry tests drive the agent's API with.
fn python_packages() -> Result<()> {
    if sh::output("python3", &["-c", "import consul"]).is_ok() {
        return Ok(());
    }
    sh::run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "py-consul"]))
}
