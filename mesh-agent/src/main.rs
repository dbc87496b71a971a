//! nodemesh node agent.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about = "nodemesh node agent")]
struct Args {
    /// Config file (YAML).
    #[arg(
        long,
        short,
        env = mesh_agent::config::ENV_CONFIG,
        default_value = "/etc/nodemesh/config.yaml"
    )]
    config: PathBuf,
    /// Validate the config (with environment overrides), print the effective config and exit.
    #[arg(long)]
    check: bool,
    /// Detach the kernel programs and remove the pinned maps and links of the configured
    /// instance, then exit. Stopping the agent alone keeps them (fail closed).
    #[arg(long, conflicts_with = "check")]
    uninstall: bool,
    /// With --check: skip the checks that need the node itself (cgroups exist, addresses are
    /// local, CA files readable, kernel BTF), e.g. when validating in CI.
    #[arg(long, requires = "check")]
    off_node: bool,
    /// Log format: `text` (colour only when stderr is a terminal) or `json` (one object per line).
    #[arg(long, env = mesh_agent::config::ENV_LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Query or steer a running agent through its admin port.
    Ctl(mesh_agent::ctl::CtlArgs),
    /// The mesh CA service of a multi-node mesh (`serve`) and node bootstrap (`issue-node`).
    Ca(mesh_agent::ca_service::cli::CaArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr; ANSI colour codes only when a person is watching (not a file, pipe or journald).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env(mesh_agent::config::ENV_LOG)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Reloadable so the admin port can change the filter at runtime (PUT /logging).
    let initial = filter.to_string();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let builder = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter_reloading();
            mesh_agent::logging::install(builder.reload_handle(), &initial);
            builder.init();
        }
        LogFormat::Json => {
            let builder = builder.json().with_ansi(false).with_filter_reloading();
            mesh_agent::logging::install(builder.reload_handle(), &initial);
            builder.init();
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Ctl(ctl)) = &args.command {
        return print_outcome(mesh_agent::ctl::run(ctl));
    }
    init_logging(args.log_format);
    if let Some(Command::Ca(ca)) = &args.command {
        return print_outcome(mesh_agent::ca_service::cli::run(ca));
    }

    if args.check {
        return match mesh_agent::app::check(&args.config, args.off_node) {
            Ok(effective) => {
                print!("{effective}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    if args.uninstall {
        return match mesh_agent::app::uninstall(&args.config) {
            Ok(dir) => {
                println!("removed {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(mesh_agent::app::run(args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, through the log (stderr), so journald and log shippers see it in their format.
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// "outer: cause: root cause", skipping causes the outer message already contains.
/// A subcommand's text on stdout and success, or its error chain on stderr and failure.
fn print_outcome<E: std::error::Error>(outcome: Result<String, E>) -> ExitCode {
    match outcome {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}
