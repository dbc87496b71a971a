//! `cargo xtask image`: the release agent binary the container image needs (deploy/Dockerfile),
//! and the image itself when docker is installed.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{build, setup, sh};

/// Where deploy/Dockerfile copies the binary from (relative to the repository root).
pub const IMAGE_BINARY: &str = "target/image/mesh-agent";
/// The image deploy/daemonset.yaml runs.
pub const IMAGE: &str = concat!("ghcr.io/nodemesh/mesh-agent:", env!("CARGO_PKG_VERSION"));

pub fn run() -> Result<()> {
    setup::run()?;
    build::ebpf()?;
    build::release_agent()?;
    let root = sh::workspace_root();
    let target = root.join(IMAGE_BINARY);
    std::fs::create_dir_all(target.parent().context("image dir")?)?;
    std::fs::copy(root.join("target/release/mesh-agent"), &target)
        .with_context(|| format!("copying the agent to {}", target.display()))?;
    eprintln!("xtask: agent binary for the image: {}", target.display());
    let docker = Command::new("docker").arg("version").output();
    if docker.is_ok_and(|o| o.status.success()) {
        sh::run(
            Command::new("docker")
                .args(["build", "-f", "deploy/Dockerfile", "-t", IMAGE, "."])
                .current_dir(&root),
        )
    } else {
        eprintln!(
            "xtask: docker is not available here; build the image elsewhere with\n  docker build -f deploy/Dockerfile -t {IMAGE} ."
        );
        Ok(())
    }
}
