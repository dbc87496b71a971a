//! The tasks `cargo xtask` hands to `xtask-run` once setup is done: one definition of their
//! arguments, parsed by both binaries, so the two command lines cannot drift apart.

use clap::Subcommand;

#[derive(Subcommand, Clone, Debug)]
pub enum RunTask {
    /// Setup, build, and show allowed and denied traffic with kernel counters, then a cross-node
    /// call over HBONE mTLS and an identity the destination agent refuses. With
    /// `--registry etcd`: mesh state applied to the registry with `ctl apply`, registration
    /// through the Consul API, a failing check, traffic moving, a registry policy enforced.
    Demo {
        #[arg(long)]
        registry: Option<String>,
    },
    /// Setup, build (release), and measure connection rates through the data path, then the
    /// registry at scale (etcd with 100,000 instances). `--scale`: only the registry rows;
    /// `--observability`: only the metrics / access log / tracing cost comparison.
    Bench {
        #[arg(long, conflicts_with = "observability")]
        scale: bool,
        #[arg(long)]
        observability: bool,
    },
}

impl RunTask {
    /// The command line that parses back into this task (for `cargo run -p xtask-run -- ...`).
    pub fn args(&self) -> Vec<String> {
        match self {
            RunTask::Demo { registry: None } => vec!["demo".into()],
            RunTask::Demo {
                registry: Some(backend),
            } => vec!["demo".into(), "--registry".into(), backend.clone()],
            RunTask::Bench {
                scale,
                observability,
            } => std::iter::once("bench")
                .chain(scale.then_some("--scale"))
                .chain(observability.then_some("--observability"))
                .map(String::from)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::RunTask;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        task: RunTask,
    }

    #[test]
    fn args_parse_back_into_the_same_task() {
        for task in [
            RunTask::Demo { registry: None },
            RunTask::Demo {
                registry: Some("etcd".into()),
            },
            RunTask::Bench {
                scale: false,
                observability: false,
            },
            RunTask::Bench {
                scale: true,
                observability: false,
            },
            RunTask::Bench {
                scale: false,
                observability: true,
            },
        ] {
            let line = std::iter::once("xtask-run".to_string()).chain(task.args());
            let parsed = Cli::try_parse_from(line).expect("args parse").task;
            assert_eq!(parsed.args(), task.args(), "{task:?}");
        }
    }
}
