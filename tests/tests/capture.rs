//! End-to-end: kernel capture, redirect through the agent, kernel deny-list, kernel counters.
//! Runs for real: network namespaces, cgroup v2, eBPF programs attached by the agent.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::http::metric;
use mesh_tests::prometheus::promtool_check_metrics;
use mesh_tests::{AgentHandle, Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const WALLET_VIP: &str = "10.96.0.20:80";
const EPERM: i32 = 1;

/// One node: pods client, server, other; services echo and wallet both served by `server`.
fn config(node: &Node, deny: &str) -> String {
    let server = node.pod("server").ip;
    node.agent_config(&format!(
        "services:\n\
         \x20 - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{server}:8080\"]\n\
         \x20 - name: wallet\n    namespace: demo\n    vip: {WALLET_VIP}\n    endpoints: [\"{server}:9090\"]\n\
         workloads:\n{}{}{}\
         authorization:\n{ALLOW_DEMO}\
         policy:\n  deny:\n{deny}",
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("server").workload_yaml("demo", "server"),
        node.pod("other").workload_yaml("demo", "other"),
    ))
}

/// Default deny: every caller in namespace demo may call both services (kernel deny rules
/// still apply on top).
const ALLOW_DEMO: &str = "  - name: echo-callers\n    service: echo\n    allow: [{from_namespace: demo}]\n  - name: wallet-callers\n    service: wallet\n    allow: [{from_namespace: demo}]\n";

const DENY_CLIENT_WALLET: &str =
    "    - name: client-not-wallet\n      from: demo/client\n      to: wallet\n";

fn setup() -> Result<Topology> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server", "other"])?;
    Ok(topo)
}

/// Echo (8080) and wallet (9090) served by `server`, the agent running with client -> wallet denied.
fn both_services_running() -> Result<(Topology, AgentHandle)> {
    let topo = setup()?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    topo.start_echo_server(node.pod("server"), 9090, "wallet")?;
    let agent = topo.start_agent(node, &config(node, DENY_CLIENT_WALLET), &[])?;
    topo.wait_ready(&agent)?;
    Ok((topo, agent))
}

#[test]
fn pod_reaches_service_vip_through_the_agent() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let record = topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let agent = topo.start_agent(node, &config(node, DENY_CLIENT_WALLET), &[])?;
    topo.wait_ready(&agent)?;

    let attempts = topo.connect_from(node.pod("client"), ECHO_VIP, "hello-mesh", 1)?;
    ensure!(
        attempts[0].ok,
        "connect failed: {:?}\nagent log:\n{}",
        attempts[0],
        agent.log_text()
    );
    ensure!(
        attempts[0].reply == "srv:hello-mesh",
        "reply {:?}",
        attempts[0].reply
    );

    // The server saw the bytes, from the caller's own address (proxy.transparent, the default).
    let seen = std::fs::read_to_string(&record)?;
    ensure!(seen.contains("hello-mesh"), "server record: {seen:?}");
    let client_ip = node.pod("client").ip;
    ensure!(
        seen.starts_with(&format!("{client_ip}:")),
        "server peer should be the caller {client_ip}: {seen:?}"
    );

    // Bytes are recorded when the relay ends, which can be just after the client saw EOF.
    let echo = [("service", "echo")];
    topo.wait_for("the relay's byte counts", Duration::from_secs(5), || {
        let m = topo.metrics(&agent)?;
        Ok(metric(&m, "nodemesh_outbound_bytes_received_total", &echo).is_some_and(|b| b > 0))
    })?;
    let m = topo.metrics(&agent)?;
    ensure!(
        metric(&m, "nodemesh_outbound_connections_total", &echo) == Some(1),
        "{m}"
    );
    ensure!(
        metric(&m, "nodemesh_outbound_bytes_sent_total", &echo) == Some(10),
        "{m}"
    );
    ensure!(
        metric(&m, "nodemesh_outbound_bytes_received_total", &echo) == Some(14),
        "{m}"
    );
    // The whole scrape (kernel, pool, authz and certificate families too) is valid exposition.
    promtool_check_metrics(&m)?;
    Ok(())
}

#[test]
fn denied_pair_gets_eperm_and_the_agent_sees_nothing() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let record = topo.start_echo_server(node.pod("server"), 9090, "wallet")?;
    let agent = topo.start_agent(node, &config(node, DENY_CLIENT_WALLET), &[])?;
    topo.wait_ready(&agent)?;

    let denied = topo.connect_from(node.pod("client"), WALLET_VIP, "steal", 1)?;
    ensure!(
        !denied[0].ok && denied[0].errno == Some(EPERM),
        "expected EPERM, got {:?}",
        denied[0]
    );
    let m = topo.metrics(&agent)?;
    ensure!(
        metric(&m, "nodemesh_outbound_accepted_total", &[]) == Some(0),
        "agent accepted something:\n{m}"
    );
    ensure!(
        std::fs::read_to_string(&record)
            .unwrap_or_default()
            .is_empty(),
        "wallet server saw bytes"
    );
    // The connect4 program's aya-log record of the refusal reached the agent's log.
    topo.wait_for(
        "the kernel's debug log line",
        Duration::from_secs(5),
        || Ok(agent.log_text().contains("deny identity=")),
    )?;

    // The same service stays reachable for an identity the rule does not name.
    let allowed = topo.connect_from(node.pod("other"), WALLET_VIP, "pay", 1)?;
    ensure!(
        allowed[0].ok && allowed[0].reply == "wallet:pay",
        "other -> wallet: {:?}",
        allowed[0]
    );
    Ok(())
}

#[test]
fn kernel_counters_match_what_was_sent() -> Result<()> {
    let (topo, agent) = both_services_running()?;
    let node = topo.node(1);
    let client = node.pod("client");
    let server_direct = format!("{}:8080", node.pod("server").ip);

    let redirected = topo.connect_from(client, ECHO_VIP, "a", 5)?;
    let denied = topo.connect_from(client, WALLET_VIP, "b", 3)?;
    // The endpoint's pod address is under the same rule as the VIP: captured too.
    let endpoint = topo.connect_from(client, &server_direct, "c", 2)?;
    ensure!(
        redirected.iter().all(|a| a.ok && a.reply == "srv:a"),
        "{redirected:?}"
    );
    ensure!(denied.iter().all(|a| a.errno == Some(EPERM)), "{denied:?}");
    ensure!(
        endpoint.iter().all(|a| a.ok && a.reply == "srv:c"),
        "{endpoint:?}"
    );
    topo.connect_from(node.pod("other"), ECHO_VIP, "d", 4)?;

    let m = topo.metrics(&agent)?;
    let kernel = |name: &str, identity: &str| metric(&m, name, &[("identity", identity)]);
    ensure!(
        kernel("nodemesh_kernel_connections_opened_total", "demo/client") == Some(7),
        "{m}"
    );
    ensure!(
        kernel(
            "nodemesh_kernel_connections_redirected_total",
            "demo/client"
        ) == Some(7),
        "{m}"
    );
    ensure!(
        kernel("nodemesh_kernel_connections_denied_total", "demo/client") == Some(3),
        "{m}"
    );
    ensure!(
        kernel("nodemesh_kernel_connections_redirected_total", "demo/other") == Some(4),
        "{m}"
    );
    ensure!(
        kernel("nodemesh_kernel_connections_denied_total", "demo/other") == Some(0),
        "{m}"
    );
    ensure!(
        kernel("nodemesh_kernel_connections_opened_total", "demo/server") == Some(0),
        "{m}"
    );
    ensure!(
        metric(
            &m,
            "nodemesh_outbound_connections_total",
            &[("service", "echo")]
        ) == Some(11),
        "{m}"
    );
    Ok(())
}

#[test]
fn processes_in_container_cgroups_below_the_pod_carry_the_pod_identity() -> Result<()> {
    let (topo, agent) = both_services_running()?;
    let node = topo.node(1);
    // The config names only the pod cgroup; the processes run one level below, as in Kubernetes.
    let app = topo.container(node.pod("client"), "app")?;
    let nested = topo.container(&app, "worker")?;

    let allowed = topo.connect_from(&app, ECHO_VIP, "from-container", 2)?;
    ensure!(
        allowed
            .iter()
            .all(|a| a.ok && a.reply == "srv:from-container"),
        "{allowed:?}"
    );
    let denied = topo.connect_from(&nested, WALLET_VIP, "deep", 1)?;
    ensure!(
        denied[0].errno == Some(EPERM),
        "deny rule missed a nested cgroup: {:?}",
        denied[0]
    );

    let m = topo.metrics(&agent)?;
    let kernel = |name: &str| metric(&m, name, &[("identity", "demo/client")]);
    ensure!(
        kernel("nodemesh_kernel_connections_redirected_total") == Some(2),
        "{m}"
    );
    ensure!(
        kernel("nodemesh_kernel_connections_denied_total") == Some(1),
        "{m}"
    );
    ensure!(
        metric(
            &m,
            "nodemesh_kernel_connections_opened_total",
            &[("identity", "unknown")]
        ) == Some(0),
        "container connections were not attributed to the pod:\n{m}"
    );
    Ok(())
}
