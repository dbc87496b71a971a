//! nodemesh node agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about = "nodemesh node agent")]
struct Args {
    /// Config file (YAML).
    #[arg(
        long,
        short,
        env = "NODEMESH_CONFIG",
        default_value = "/etc/nodemesh/config.yaml"
    )]
    config: PathBuf,
    /// Validate the config (with environment overrides), print the effective config and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Query or steer a running agent through its admin port.
    Ctl(mesh_agent::ctl::CtlArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Ctl(ctl)) = &args.command {
        return match mesh_agent::ctl::run(ctl) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let filter = EnvFilter::try_from_env("NODEMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Reloadable so the admin port can change the level at runtime (PUT /logging).
    let initial_filter = filter.to_string();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_filter_reloading();
    mesh_agent::logging::install(subscriber.reload_handle(), &initial_filter);
    subscriber.init();

    if args.check {
        return match mesh_agent::app::check(&args.config) {
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
            let message = error_chain(&e);
            tracing::error!("{message}");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// "outer: cause: root cause", skipping causes the outer message already contains.
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
