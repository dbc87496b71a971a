//! Two nodes joined by an uplink, each with its own agent (own pinned maps, own certificates from
//! one mesh CA). Node 1 runs pods `client` (shop/client) and `intruder` (shop/intruder); node 2
//! runs `server` (shop/server) with an echo server on 8080 behind the service `echo`, whose
//! authorization policy on node 2 admits only shop/client. Node 1 relaxes the mesh default
//! (`policy.default: allow`) so that these tests exercise the destination agent's check.

use std::path::PathBuf;

use anyhow::Result;

use crate::ca_service::CaService;
use crate::capture::Capture;
use crate::{AgentHandle, Topology};

pub const ECHO_VIP: &str = "10.96.0.10:80";
pub const ECHO_PORT: u16 = 8080;
/// A second echo server on the server pod that is no service endpoint: a connect to it really
/// bypasses the mesh (an endpoint address is captured like the VIP).
pub const BYPASS_PORT: u16 = 9090;

#[derive(Default, Clone)]
pub struct Options {
    /// Extra YAML appended to both agents' configs (e.g. an `identity:` block).
    pub identity_yaml: Option<String>,
    /// Strict mode for the server pod.
    pub strict_server: bool,
    /// Log filter for the agents.
    pub log: Option<String>,
    /// Also route service `web` (VIP [`WEB_VIP`]) to this port of the server pod, for an HTTP
    /// server the caller starts there (benchmarks).
    pub web_port: Option<u16>,
    /// `policy:` block (YAML flow value) of service `web` on node 1, the calling side.
    pub web_policy: Option<String>,
    /// Certificates from a CA service ([`CaService`], in node 1's namespace) instead of a CA
    /// key on the nodes; `identity_yaml` then adds fields to the `identity:` block.
    pub ca_service: bool,
}

pub const WEB_VIP: &str = "10.96.0.11:80";

pub struct TwoNodes {
    pub topo: Topology,
    pub agent1: AgentHandle,
    pub agent2: AgentHandle,
    /// What the echo server received, one line per chunk: "<peer> <data>".
    pub server_record: PathBuf,
    /// The same for the echo server on [`BYPASS_PORT`].
    pub bypass_record: PathBuf,
    /// Name of node 1's uplink interface (inside node 1's namespace).
    pub uplink1: String,
    /// The CA service, with [`Options::ca_service`].
    pub ca: Option<CaService>,
}

impl TwoNodes {
    pub fn start(options: Options) -> Result<TwoNodes> {
        let mut topo = Topology::new()?;
        topo.add_node(&["client", "intruder"])?;
        topo.add_node(&["server"])?;
        let uplink1 = topo.link_nodes(1, 2)?;
        let (n1, n2) = (topo.node(1), topo.node(2));
        let server = n2.pod("server");
        let server_record = topo.start_echo_server(server, ECHO_PORT, "srv")?;
        let bypass_record = topo.start_echo_server(server, BYPASS_PORT, "srv")?;
        let ca = if options.ca_service {
            let mut ca = CaService::configure(
                &topo,
                &[
                    ("node-1", &["shop/client", "shop/intruder"]),
                    ("node-2", &["shop/server"]),
                ],
            )?;
            let dirs = [
                ca.issue_node(&topo, "node-1")?,
                ca.issue_node(&topo, "node-2")?,
            ];
            ca.start(&topo)?;
            Some((ca, dirs))
        } else {
            None
        };
        let identity = |shared_ca: Option<String>, node: usize| {
            if let Some((_, dirs)) = &ca {
                let block = options.identity_yaml.clone().unwrap_or_default();
                return CaService::identity_yaml(
                    &dirs[node - 1],
                    block.strip_prefix("identity:\n").unwrap_or(&block),
                );
            }
            let mut block = options
                .identity_yaml
                .clone()
                .unwrap_or_else(|| "identity:\n".to_owned());
            if let Some(fields) = shared_ca {
                block.push_str(&fields);
            }
            block
        };
        let env: Vec<(&str, &str)> = options
            .log
            .as_deref()
            .map(|l| vec![("NODEMESH_LOG", l)])
            .unwrap_or_default();

        let web = |remote: bool| {
            match options.web_port {
            Some(port) if remote => format!(
                "  - name: web\n    namespace: shop\n    vip: {WEB_VIP}\n    endpoints:\n      - {{address: \"{}:{port}\", node: node-2}}\n{}",
                server.ip,
                options.web_policy.as_ref().map(|p| format!("    policy: {p}\n")).unwrap_or_default()
            ),
            Some(port) => format!("  - name: web\n    namespace: shop\n    vip: {WEB_VIP}\n    endpoints: [\"{}:{port}\"]\n", server.ip),
            None => String::new(),
        }
        };
        let config1 = n1.agent_config(&format!(
            "services:\n{}  - name: echo\n    namespace: shop\n    vip: {ECHO_VIP}\n    endpoints:\n      - {{address: \"{}:{ECHO_PORT}\", node: node-2}}\n\
             workloads:\n{}{}\
             nodes:\n  - {{name: node-2, hbone: \"10.0.0.2:15008\"}}\n\
             policy:\n  default: allow\n\
             egress:\n  rules:\n    - {{name: node-2-pods, cidr: 10.2.0.0/16}}\n{}",
            web(true),
            server.ip,
            n1.pod("client").workload_yaml("shop", "client"),
            n1.pod("intruder").workload_yaml("shop", "intruder"),
            identity(None, 1),
        ));
        // Node 1 generates the mesh CA at first start; node 2 loads it as if from a Secret.
        let agent1 = topo.start_agent(n1, &config1, &env)?;
        topo.wait_ready(&agent1)?;

        let server_workload = if options.strict_server {
            server
                .workload_yaml("shop", "server")
                .replace("    cgroup:", "    strict: true\n    cgroup:")
        } else {
            server.workload_yaml("shop", "server")
        };
        let config2 = n2.agent_config(&format!(
            "services:\n{}  - name: echo\n    namespace: shop\n    vip: {ECHO_VIP}\n    endpoints: [\"{}:{ECHO_PORT}\"]\n\
             workloads:\n{server_workload}\
             nodes:\n  - {{name: node-1, hbone: \"10.0.0.1:15008\"}}\n\
             authorization:\n  - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from: spiffe://cluster.local/ns/shop/sa/client\n{}{}",
            web(false),
            server.ip,
            if options.web_port.is_some() {
                "  - name: web-callers\n    service: web\n    default: deny\n    allow:\n      - from: spiffe://cluster.local/ns/shop/sa/client\n"
            } else {
                ""
            },
            identity(Some(topo.shared_ca_fields(n1)), 2),
        ));
        let agent2 = topo.start_agent(n2, &config2, &env)?;
        topo.wait_ready(&agent2)?;
        Ok(TwoNodes {
            topo,
            agent1,
            agent2,
            server_record,
            bypass_record,
            uplink1,
            ca: ca.map(|(ca, _)| ca),
        })
    }

    /// The agents' mesh CA files (generated by node 1).
    pub fn ca_files(&self) -> (PathBuf, PathBuf) {
        let dir = self.topo.state_dir(self.topo.node(1));
        (dir.join("ca.crt"), dir.join("ca.key"))
    }

    pub fn server_record(&self) -> String {
        std::fs::read_to_string(&self.server_record).unwrap_or_default()
    }

    /// Starts a packet capture on node 1's uplink (the link between the nodes).
    pub fn capture_uplink(&self) -> Result<Capture<'_>> {
        Capture::start(&self.topo, self.topo.node(1), &self.uplink1)
    }
}
