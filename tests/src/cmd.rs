//! Running setup commands (`ip`, `sysctl`) with errors that show what failed.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs a command to completion; fails with its stderr if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` with the given arguments.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}
