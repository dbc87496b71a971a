//! `cargo xtask fuzz [seconds]`: runs every cargo-fuzz target in fuzz/ for a bounded time on
//! nightly and reports the executions. A crash, panic, leak or timeout fails the run; libFuzzer
//! leaves the input in fuzz/artifacts/<target>/. `cargo xtask test` runs it too, for
//! NODEMESH_FUZZ_SECONDS seconds per target (default 10; 0 skips it).

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sh;

pub const TARGETS: [&str; 4] = [
    "config_parse",
    "hbone_request",
    "hbone_peer_cert",
    "protocol_detect",
];
pub const DEFAULT_TEST_SECONDS: u64 = 10;

/// Seconds per target for `xtask test` (NODEMESH_FUZZ_SECONDS).
pub fn test_seconds() -> Result<u64> {
    match std::env::var("NODEMESH_FUZZ_SECONDS") {
        Ok(v) => v
            .parse()
            .context("NODEMESH_FUZZ_SECONDS must be a number of seconds"),
        Err(_) => Ok(DEFAULT_TEST_SECONDS),
    }
}

pub fn run(seconds: u64) -> Result<()> {
    if seconds == 0 {
        eprintln!("xtask: fuzzing skipped (0 seconds)");
        return Ok(());
    }
    let dir = sh::workspace_root().join("fuzz");
    let mut summary = Vec::new();
    for target in TARGETS {
        // Work on a copy of the seeds so that the corpus libFuzzer grows stays out of the repo.
        let corpus = dir.join("target/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        for seed in std::fs::read_dir(dir.join("corpus").join(target))? {
            let seed = seed?;
            std::fs::copy(seed.path(), corpus.join(seed.file_name()))?;
        }
        eprintln!("xtask: fuzzing {target} for {seconds}s");
        let out = Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run", "--sanitizer", "none", target])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-max_len=65536",
            ])
            .output()
            .context("running cargo fuzz (cargo xtask setup installs it)")?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            bail!(
                "fuzz target {target} failed ({}):\n{}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let runs = log
            .lines()
            .find_map(|l| {
                l.strip_prefix("Done ")?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        summary.push(format!(
            "{target}: {runs} executions in {seconds}s, no findings"
        ));
    }
    for line in summary {
        println!("fuzz {line}");
    }
    Ok(())
}
