//! `mesh-agent ca serve` (the CA service) and `mesh-agent ca issue-node` (a node's bootstrap
//! certificate, run where the CA key is, e.g. in the CA Deployment's pod).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::config::CaServiceConfig;
use super::server::{CaServer, CaServiceError};
use crate::config::ConfigError;
use crate::identity::files::pem_block;
use crate::identity::{IdentityError, WorkloadSpec};

/// How often `serve` checks its config file for new placements.
const RELOAD_POLL: Duration = Duration::from_secs(2);

#[derive(clap::Args, Debug)]
pub struct CaArgs {
    /// CA service config (YAML).
    #[arg(long, short, default_value = "/etc/nodemesh-ca/ca.yaml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum CaCommand {
    /// Serve CSRs from agents over mTLS until SIGTERM/SIGINT.
    Serve,
    /// Write a node's bootstrap certificate, key and the trust bundle into a directory
    /// (`node.crt`, `node.key`, `ca.crt`; e.g. for a per-node Secret).
    IssueNode {
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the bootstrap certificate; the agent renews it through the service.
        #[arg(long, default_value = "24h", value_parser = crate::config::duration_text::parse)]
        ttl: Duration,
    },
    /// Generate a new root CA (`ca.crt`, `ca.key`) into a directory that holds none, for a
    /// root rotation (docs/CA.md); the service keeps signing with its current CA until its
    /// `ca_cert`/`ca_key` name the new one.
    NewRoot {
        #[arg(long)]
        out: PathBuf,
    },
}

/// Generates the new root of a rotation into `out`; refuses a directory that already has one.
pub fn new_root(config: &CaServiceConfig, out: &Path) -> Result<String, CaServiceError> {
    if out.join("ca.crt").exists() || out.join("ca.key").exists() {
        return Err(ConfigError::invalid(
            "--out",
            format!("{} already holds a CA (ca.crt or ca.key)", out.display()),
        )
        .into());
    }
    crate::identity::MeshCa::load_or_generate(out, &config.trust_domain)?;
    Ok(format!(
        "new root for {}: ca.crt, ca.key in {}\n",
        config.trust_domain,
        out.display()
    ))
}

/// Writes the bootstrap files of `node` into `out`; returns what was written.
pub fn issue_node(
    config: &CaServiceConfig,
    node: &str,
    out: &Path,
    ttl: Duration,
) -> Result<String, CaServiceError> {
    if !crate::config::is_dns_label(node) {
        return Err(ConfigError::invalid("--node", "must be a lowercase DNS label").into());
    }
    let server = CaServer::new(config)?;
    let id = crate::app::security::agent_identity(&config.trust_domain, node)?;
    let cert = server.ca().issue(
        &WorkloadSpec {
            id: id.clone(),
            service: crate::ca_service::server::NODE_SERVICE.into(),
        },
        ttl,
    )?;
    let write = |name: &str, body: &[u8], mode| {
        crate::identity::files::write_atomically(&out.join(name), body, mode)
    };
    std::fs::create_dir_all(out).map_err(|source| IdentityError::Write {
        path: out.to_owned(),
        source,
    })?;
    let leaf = cert.leaf().map(|d| pem_of(d.as_ref())).unwrap_or_default();
    write("node.key", pem_key(cert.key.secret_der()).as_bytes(), 0o600)?;
    write("node.crt", leaf.as_bytes(), 0o644)?;
    write("ca.crt", server.trust().to_pem().as_bytes(), 0o644)?;
    Ok(format!(
        "{id}: node.crt, node.key, ca.crt in {}\n",
        out.display()
    ))
}

/// Runs the service on a new runtime until SIGTERM or SIGINT.
pub fn serve(config_path: &Path, config: &CaServiceConfig) -> Result<(), CaServiceError> {
    let runtime = tokio::runtime::Runtime::new().map_err(|source| CaServiceError::Listen {
        addr: config.listen,
        source,
    })?;
    runtime.block_on(async {
        let server = Arc::new(CaServer::new(config)?);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| CaServiceError::Listen {
                addr: config.listen,
                source,
            })?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        if let Some(addr) = config.metrics {
            let metrics = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| CaServiceError::Listen { addr, source })?;
            let shown = server.clone();
            let handler: crate::http_server::Handler = Arc::new(move |path| match path {
                "/metrics" => crate::http_server::Reply {
                    status: hyper::StatusCode::OK,
                    content_type: "text/plain; version=0.0.4",
                    body: shown.metrics().render(),
                },
                _ => crate::http_server::Reply::text(
                    hyper::StatusCode::NOT_FOUND,
                    "not found; try /metrics\n",
                ),
            });
            tokio::spawn(crate::http_server::serve(metrics, handler, stopped.clone()));
        }
        tracing::info!(listen = %config.listen, metrics = ?config.metrics, trust_domain = %config.trust_domain, "CA service ready");
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            let _ = stop.send(true);
        });
        server
            .run(listener, Some(config_path.to_owned()), RELOAD_POLL, stopped)
            .await
    })
}

/// `mesh-agent ca ...`: the text to print on success.
pub fn run(args: &CaArgs) -> Result<String, CaServiceError> {
    let config = CaServiceConfig::load(&args.config)?;
    match &args.command {
        CaCommand::Serve => serve(&args.config, &config).map(|()| String::new()),
        CaCommand::IssueNode { node, out, ttl } => issue_node(&config, node, out, *ttl),
        CaCommand::NewRoot { out } => new_root(&config, out),
    }
}

fn pem_of(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

fn pem_key(der: &[u8]) -> String {
    pem_block("PRIVATE KEY", der)
}
