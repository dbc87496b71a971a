//! Project tasks: `cargo xtask setup | build-ebpf | test | e2e | demo | bench | quickstart | image | fuzz`.

use xtask::run_task::RunTask;
use xtask::{build, fuzz, image, setup, sh};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "nodemesh project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces the eBPF build and tests need (idempotent).
    Setup,
    /// Build the eBPF object (mesh-ebpf) for bpfel-unknown-none with nightly + bpf-linker.
    BuildEbpf,
    /// Setup, build everything, run every test (unit + privileged end-to-end).
    Test,
    /// Setup, build, run only the end-to-end suites in network namespaces.
    E2e,
    #[command(flatten)]
    Run(RunTask),
    /// Setup, build the release agent (eBPF embedded) into target/image/ for deploy/Dockerfile,
    /// and build the image when docker is available.
    Image,
    /// Setup, build the release agent, and run scripts/quickstart.sh: example pods (netns + cgroup
    /// v2) on this machine, a config for them, the agent, and the curl commands to try.
    Quickstart {
        /// Stop the agent and remove everything the quickstart created.
        #[arg(long)]
        down: bool,
    },
    /// Run every fuzz target (config parsing, HBONE request, HBONE peer certificate) for a
    /// bounded time on nightly.
    Fuzz {
        /// Seconds per target.
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Image => image::run(),
        Task::Quickstart { down: true } => quickstart("down"),
        Task::Quickstart { down: false } => {
            setup::run()?;
            build::ebpf()?;
            build::release_agent()?;
            quickstart("up")
        }
        Task::Setup => setup::run(),
        Task::BuildEbpf => build::ebpf(),
        Task::Test => {
            prepare()?;
            sh::cargo(&["test", "--workspace", "--all-targets"])?;
            fuzz::run(fuzz::test_seconds()?)
        }
        Task::Fuzz { seconds } => {
            setup::run()?;
            fuzz::run(seconds)
        }
        Task::E2e => {
            prepare()?;
            sh::cargo(&["test", "-p", "mesh-tests"])
        }
        Task::Run(task @ RunTask::Demo { .. }) => {
            prepare()?;
            run_task(&task)
        }
        Task::Run(task @ RunTask::Bench { .. }) => {
            setup::run()?;
            build::ebpf()?;
            sh::cargo(&[
                "build",
                "--release",
                "-p",
                "mesh-agent",
                "-p",
                "mesh-tests",
                "--bins",
            ])?;
            let bins = sh::workspace_root().join("target/release");
            std::env::set_var("NODEMESH_AGENT_BIN", bins.join("mesh-agent"));
            std::env::set_var("NODEMESH_PROBE_BIN", bins.join("meshprobe"));
            run_task(&task)
        }
    }
}

/// Runs a demo or benchmark task of `xtask-run` (xtask/run/), which is built only now that setup
/// has installed what its dependencies need to compile.
fn run_task(task: &RunTask) -> Result<()> {
    let mut cargo: Vec<String> = ["run", "--quiet", "-p", "xtask-run", "--"]
        .map(String::from)
        .into();
    cargo.extend(task.args());
    sh::cargo(&cargo.iter().map(String::as_str).collect::<Vec<_>>())
}

fn quickstart(action: &str) -> Result<()> {
    let root = sh::workspace_root();
    let mut command = std::process::Command::new(root.join("scripts/quickstart.sh"));
    command
        .arg(action)
        .env("NODEMESH_AGENT_BIN", root.join("target/release/mesh-agent"));
    sh::run(&mut command)
}

/// What every test and demo run needs: tools, the eBPF object, the agent and probe binaries.
fn prepare() -> Result<()> {
    setup::run()?;
    build::ebpf()?;
    build::binaries()
}
