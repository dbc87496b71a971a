//! Transparent upstream connects (`proxy.transparent`, the default): servers see the calling
//! pod's own address, for opaque TCP and per-request HTTP, same node; the reply routing survives
//! an agent restart, leaves other traffic to the caller's address alone, and `--uninstall`
//! removes it. One node with pods `client`, `other` and `server` (strict: the transparent
//! connects pass it because strict mode trusts the agent's cgroup, not its address).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::l7::start_http_server;
use mesh_tests::{topology, Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const WEB_URL: &str = "http://10.96.0.11/";

fn config(node: &Node) -> String {
    let server = node.pod("server").ip;
    node.agent_config(&format!(
        "services:\n\
         \x20 - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{server}:8080\"]\n    policy: {{protocol: tcp}}\n\
         \x20 - name: web\n    namespace: demo\n    vip: 10.96.0.11:80\n    endpoints: [\"{server}:8081\"]\n    policy: {{protocol: http}}\n\
         workloads:\n{}{}{}\
         policy:\n  default: allow\n\
         egress:\n  rules:\n    - {{name: pod-to-pod, cidr: 10.1.0.0/16, from: demo/server}}\n",
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("other").workload_yaml("demo", "other"),
        // Strict: it admits what the agent's cgroup opened, from whichever address.
        node.pod("server").workload_yaml_strict("demo", "server", true),
    ))
}

/// The last peer address the echo server recorded.
fn last_peer(record: &Path) -> Result<String> {
    let text = std::fs::read_to_string(record)?;
    let last = text.lines().last().unwrap_or_default();
    Ok(last
        .split_once(':')
        .map(|(ip, _)| ip.to_owned())
        .unwrap_or_default())
}

/// The `x-peer` address the HTTP server saw for one curl request from `pod`.
fn http_peer(topo: &Topology, pod: &mesh_tests::Pod) -> Result<String> {
    let out = topo.run_in_pod(
        pod,
        "curl",
        &["-s", "-o", "/dev/null", "-w", "%header{x-peer}", WEB_URL],
    )?;
    Ok(out
        .trim()
        .split_once(':')
        .map(|(ip, _)| ip.to_owned())
        .unwrap_or_default())
}

/// What `program args` prints in the node's namespace (empty when it fails).
fn in_node(topo: &Topology, node: &Node, program: &str, args: &[&str]) -> Result<String> {
    let (status, out, _) = topo.run_in_node(node, Path::new(program), args)?;
    Ok(if status.success() { out } else { String::new() })
}

fn call_echo(topo: &Topology, pod: &mesh_tests::Pod, record: &Path, tag: &str) -> Result<String> {
    let a = topo.connect_from(pod, ECHO_VIP, tag, 1)?;
    ensure!(
        a[0].ok && a[0].reply == format!("srv:{tag}"),
        "{tag}: {:?}",
        a[0]
    );
    last_peer(record)
}

#[test]
fn servers_see_the_callers_address_and_reply_routing_outlives_restarts() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "other", "server"])?;
    let node = topo.node(1);
    let (client, other, server) = (node.pod("client"), node.pod("other"), node.pod("server"));
    let record = topo.start_echo_server(server, 8080, "srv")?;
    start_http_server(&topo, server, 8081, "web", "ok")?;
    let agent = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&agent)?;

    // Opaque TCP, each caller from its own address.
    for pod in [client, other] {
        let peer = call_echo(&topo, pod, &record, pod.name.as_str())?;
        ensure!(
            peer == pod.ip.to_string(),
            "L4: server saw {peer}, not {} ({})",
            pod.ip,
            pod.name
        );
    }
    // HTTP per request: the upstream pool is per caller address, so `other`'s request does not
    // ride the connection pooled for `client`.
    for pod in [client, other, client] {
        let peer = http_peer(&topo, pod)?;
        ensure!(
            peer == pod.ip.to_string(),
            "L7: server saw {peer}, not {} ({})\n{}",
            pod.ip,
            pod.name,
            agent.log_text()
        );
    }

    // Traffic of another pod straight to the caller's address is not taken by the agent.
    let client_record = topo.start_echo_server(client, 7000, "cli")?;
    let direct = topo.connect_from(server, &format!("{}:7000", client.ip), "direct", 1)?;
    ensure!(
        direct[0].ok && direct[0].reply == "cli:direct",
        "server -> client directly: {:?}",
        direct[0]
    );
    ensure!(
        last_peer(&client_record)? == server.ip.to_string(),
        "client saw another peer"
    );

    // Kill -9: the reply routing stays; the restarted agent adopts it and calls keep working.
    let table = format!("nodemesh-{}", node.instance);
    topo.signal(agent.pid, libc::SIGKILL)?;
    topo.wait(agent.pid, Duration::from_secs(10))?;
    let nft = in_node(&topo, node, "nft", &["list", "table", "ip", &table])?;
    ensure!(
        nft.contains("ct mark"),
        "reply routing gone after kill -9: {nft:?}"
    );
    let agent = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&agent)?;
    let peer = call_echo(&topo, client, &record, "again")?;
    ensure!(peer == client.ip.to_string(), "after restart: {peer}");
    let rules = in_node(&topo, node, "ip", &["rule", "show"])?;
    ensure!(
        rules.matches("fwmark").count() == 1,
        "a restart must not add a second rule:\n{rules}"
    );

    // `--uninstall` removes the nftables table and the rule.
    topo.signal(agent.pid, libc::SIGTERM)?;
    topo.wait(agent.pid, Duration::from_secs(15))?;
    let config_path = topo.config_path(node);
    let (status, _, err) = topo.run_in_node(
        node,
        &topology::agent_binary()?,
        &["--uninstall", "--config", &config_path.to_string_lossy()],
    )?;
    ensure!(status.success(), "uninstall: {err}");
    let nft = in_node(&topo, node, "nft", &["list", "table", "ip", &table])?;
    let rules = in_node(&topo, node, "ip", &["rule", "show"])?;
    ensure!(nft.is_empty(), "nftables table left: {nft}");
    ensure!(!rules.contains("fwmark"), "rule left:\n{rules}");
    Ok(())
}
