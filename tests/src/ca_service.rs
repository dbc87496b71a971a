//! The mesh CA service (`mesh-agent ca serve`) as its own process in node 1's network namespace
//! on node 1's uplink address (as a Deployment pod on the host network would run), reachable
//! from both nodes; the CA key lives only in its state directory. Nodes get bootstrap files from
//! `mesh-agent ca issue-node`, written outside their agents' state directories (as a Secret).

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::topology::agent_binary;
use crate::Topology;

/// Address of the signing endpoint: node 1's uplink address.
pub const CA_ADDR: &str = "10.0.0.1:15012";
pub const CA_METRICS: &str = "10.0.0.1:15013";

pub struct CaService {
    pub config: PathBuf,
    /// Holds the CA (`ca.crt`, `ca.key`).
    pub state_dir: PathBuf,
    pub pid: Option<u32>,
    pub log: PathBuf,
    /// The node whose network namespace it runs in.
    pub netns: String,
    starts: u32,
    /// The config as [`CaService::configure`] wrote it.
    base_yaml: String,
}

impl CaService {
    /// Writes the CA service config (placements: `node-N` -> its `namespace/sa` identities).
    pub fn configure(topo: &Topology, placements: &[(&str, &[&str])]) -> Result<CaService> {
        let state_dir = topo.workdir.join("ca-state");
        let config = topo.workdir.join("ca.yaml");
        let mut yaml = format!(
            "trust_domain: cluster.local\nlisten: {CA_ADDR}\nmetrics: {CA_METRICS}\nstate_dir: {}\nplacements:\n",
            state_dir.display()
        );
        for (node, ids) in placements {
            yaml.push_str(&format!("  {node}: [{}]\n", ids.join(", ")));
        }
        std::fs::write(&config, &yaml)?;
        Ok(CaService {
            base_yaml: yaml,
            config,
            state_dir,
            pid: None,
            log: topo.workdir.join("ca.log"),
            netns: topo.node(1).netns.clone(),
            starts: 0,
        })
    }

    /// Rewrites the config with `extra` top-level fields (e.g. `ca_cert`, `trust_bundle`).
    pub fn rewrite_config(&self, extra: &str) -> Result<()> {
        Ok(std::fs::write(
            &self.config,
            format!("{extra}{}", self.base_yaml),
        )?)
    }

    /// Runs `mesh-agent ca <args>` to completion (the CLI subcommands), failing on non-zero exit.
    pub fn run(&self, args: &[&str]) -> Result<()> {
        let status = Command::new(agent_binary()?)
            .arg("ca")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("mesh-agent ca {args:?} failed: {status}");
        }
        Ok(())
    }

    /// `mesh-agent ca issue-node`: the node's bootstrap directory (`node.crt`, `node.key`,
    /// `ca.crt`), as a per-node Secret would hold it.
    pub fn issue_node(&self, topo: &Topology, node: &str) -> Result<PathBuf> {
        let out = topo.workdir.join(format!("{node}-bootstrap"));
        let dir = out.to_string_lossy();
        self.run(&["issue-node", "--node", node, "--out", &dir])?;
        Ok(out)
    }

    /// The agent config block for a node bootstrapped into `dir`; `extra` adds identity fields.
    pub fn identity_yaml(dir: &std::path::Path, extra: &str) -> String {
        format!(
            "identity:\n{extra}  ca_service:\n    address: \"{CA_ADDR}\"\n    node_cert: {}\n    node_key: {}\n    trust_bundle: {}\n",
            dir.join("node.crt").display(),
            dir.join("node.key").display(),
            dir.join("ca.crt").display()
        )
    }

    /// Starts `mesh-agent ca serve` and waits until it logged that it is ready.
    pub fn start(&mut self, topo: &Topology) -> Result<()> {
        self.starts += 1;
        let log = topo.workdir.join(format!("ca-{}.log", self.starts));
        let mut command = Command::new(agent_binary()?);
        command
            .arg("ca")
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("NODEMESH_LOG", "info,mesh_agent=debug")
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let node = (1..=2)
            .map(|i| topo.node(i))
            .find(|n| n.netns == self.netns)
            .context("CA node")?;
        let pid = topo.spawn_in_node(node, &mut command)?;
        self.pid = Some(pid);
        self.log = log;
        topo.wait_for("CA service ready", Duration::from_secs(20), || {
            if topo.has_exited(pid) {
                bail!("CA service exited; log:\n{}", self.log_text());
            }
            Ok(self.log_text().contains("CA service ready"))
        })
    }

    /// Stops the service (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self, topo: &Topology) -> Result<()> {
        if let Some(pid) = self.pid.take() {
            topo.signal(pid, libc::SIGTERM)?;
            topo.wait(pid, Duration::from_secs(10))?;
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Scrapes the service's /metrics.
    pub fn metrics(&self, topo: &Topology) -> Result<String> {
        let addr: SocketAddr = CA_METRICS.parse()?;
        let (status, body) = topo.in_netns(&self.netns, || crate::http::get(addr, "/metrics"))?;
        if status != 200 {
            bail!("CA /metrics answered {status}");
        }
        Ok(body)
    }
}
