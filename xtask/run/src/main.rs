//! `cargo xtask demo` and `cargo xtask bench` after setup: these tasks drive the agent, the netns
//! harness and etcd, so they build only once `cargo xtask setup` has installed protoc and LLVM.

mod bench;
mod demo;
mod demo_registry;
mod http_bench;
mod registry_bench;

use anyhow::Result;
use clap::{Parser, Subcommand};
// The task modules name this as `crate::setup`.
use xtask::setup;

#[derive(Parser)]
#[command(
    name = "xtask-run",
    about = "nodemesh demo and benchmark tasks (run by cargo xtask)"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The single-node and cross-node demo, or with `--registry etcd` the registry demo.
    Demo {
        #[arg(long)]
        registry: Option<String>,
    },
    /// The data-path benchmark (unless `--scale`), then the registry at scale.
    Bench {
        #[arg(long)]
        scale: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Demo {
            registry: Some(backend),
        } => demo_registry::run(&backend),
        Task::Demo { registry: None } => demo::run(),
        Task::Bench { scale } => {
            if !scale {
                bench::run()?;
            }
            registry_bench::run()
        }
    }
}
