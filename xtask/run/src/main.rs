//! `cargo xtask demo` and `cargo xtask bench` after setup: these tasks drive the agent, the netns
//! harness and etcd, so they build only once `cargo xtask setup` has installed protoc and LLVM.

mod bench;
mod demo;
mod demo_registry;
mod http_bench;
mod registry_bench;

use anyhow::Result;
use clap::Parser;
use xtask::run_task::RunTask;
// The task modules name this as `crate::setup`.
use xtask::setup;

#[derive(Parser)]
#[command(
    name = "xtask-run",
    about = "nodemesh demo and benchmark tasks (run by cargo xtask)"
)]
struct Cli {
    #[command(subcommand)]
    task: RunTask,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        RunTask::Demo {
            registry: Some(backend),
        } => demo_registry::run(&backend),
        RunTask::Demo { registry: None } => demo::run(),
        RunTask::Bench {
            observability: true,
            ..
        } => bench::observability_only(),
        RunTask::Bench { scale, .. } => {
            if !scale {
                bench::run()?;
            }
            registry_bench::run()
        }
    }
}
