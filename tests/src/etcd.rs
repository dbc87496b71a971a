//! A real etcd (Debian's etcd-server) for registry tests, started inside a node's network
//! namespace on a free port with a temporary data directory; killed with the topology.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{Node, Topology};

pub struct Etcd {
    pub pid: u32,
    pub client_url: String,
    pub data_dir: PathBuf,
    ip: Ipv4Addr,
    port: u16,
    netns: String,
}

impl Etcd {
    /// Starts etcd in `node`'s namespace listening on `ip:port` (peer port `port + 1`).
    pub fn start(topo: &Topology, node: &Node, ip: Ipv4Addr, port: u16) -> Result<Etcd> {
        let data_dir = topo.workdir.join(format!("etcd-{port}"));
        std::fs::create_dir_all(&data_dir)?;
        let mut etcd = Etcd {
            pid: 0,
            client_url: format!("http://{ip}:{port}"),
            data_dir,
            ip,
            port,
            netns: node.netns.clone(),
        };
        etcd.spawn(topo, node)?;
        Ok(etcd)
    }

    fn spawn(&mut self, topo: &Topology, node: &Node) -> Result<()> {
        let peer = format!("http://{}:{}", self.ip, self.port + 1);
        let log = std::fs::File::create(topo.workdir.join(format!("etcd-{}.log", self.port)))?;
        let mut command = Command::new("etcd");
        command
            .args(["--name", "mesh-test"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("mesh-test={peer}")])
            .stdout(Stdio::null())
            .stderr(log);
        self.pid = topo.spawn_in_node(node, &mut command)?;
        let addr = SocketAddr::from((self.ip, self.port));
        topo.wait_for("etcd to answer /health", Duration::from_secs(20), || {
            Ok(topo
                .in_netns(&self.netns, || crate::http::get(addr, "/health"))
                .map(|(status, body)| status == 200 && body.contains("true"))
                .unwrap_or(false))
        })
        .context("etcd did not start")
    }

    /// SIGKILLs etcd (the data directory stays).
    pub fn kill(&self, topo: &Topology) -> Result<()> {
        topo.signal(self.pid, libc::SIGKILL)?;
        topo.wait(self.pid, Duration::from_secs(10))?;
        Ok(())
    }

    /// Starts etcd again on the same data directory.
    pub fn restart(&mut self, topo: &Topology, node: &Node) -> Result<()> {
        self.spawn(topo, node)
    }
}
