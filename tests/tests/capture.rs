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

/// An empty kernel deny-list.
const NO_DENY: &str = "    []\n";

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

/// A pod's closed connections through the agent leave TIME_WAIT sockets keyed by the address
/// connect4 rewrote to, the agent's. Connects are spread at random over the agent's 32 outbound
/// ports, so a pod with few source ports (100 here, set in its netns) still makes 4x as many
/// back-to-back connections as it has ports. With one agent port (`listen.outbound_ports: 1`,
/// the old behaviour) the same run runs out of source ports and connect() fails with
/// EADDRNOTAVAIL: on a real pod with 28,000 ports that is a few hundred closed connections a
/// second, to any mesh services together.
#[test]
fn connects_spread_over_the_agent_ports_so_time_wait_leaves_the_pods_ports_free() -> Result<()> {
    const EADDRNOTAVAIL: i32 = 99;
    let topo = setup()?;
    let node = topo.node(1);
    let client = node.pod("client");
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    topo.start_echo_server(node.pod("server"), 9090, "wallet")?;
    topo.run_in_pod(
        client,
        "sh",
        &[
            "-c",
            "echo '40000 40099' > /proc/sys/net/ipv4/ip_local_port_range",
        ],
    )?;
    let agent = topo.start_agent(node, &config(node, NO_DENY), &[])?;
    topo.wait_ready(&agent)?;
    let attempts = topo.connect_from(client, ECHO_VIP, "x", 400)?;
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    ensure!(
        failed.is_empty(),
        "{} of 400 connects failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    ensure!(attempts.iter().all(|a| a.reply == "srv:x"), "wrong replies");
    let agent_ip = node.agent_ip.to_string();
    let mut ports = std::collections::BTreeSet::new();
    for a in &attempts {
        let peer: std::net::SocketAddr = a.peer.as_deref().unwrap_or_default().parse()?;
        ensure!(
            peer.ip().to_string() == agent_ip && (15101..=15132).contains(&peer.port()),
            "captured connect went to {peer}, not to one of the agent's outbound ports"
        );
        ports.insert(peer.port());
    }
    ensure!(
        ports.len() >= 28,
        "400 connects used only {} of the 32 agent ports: {ports:?}",
        ports.len()
    );
    // Concurrent connects to two services from the one pod: with 100 source ports the kernel
    // gives one port to several connections towards different agent ports, and each must still
    // reach the service it dialled (the agent finds the original destination by peer and
    // agent port).
    let shared = &topo;
    let runs = std::thread::scope(|s| {
        let runs: Vec<_> = [ECHO_VIP, WALLET_VIP, ECHO_VIP, WALLET_VIP]
            .into_iter()
            .map(|vip| s.spawn(move || (vip, shared.connect_from(client, vip, "y", 150))))
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("connect thread"))
            .collect::<Vec<_>>()
    });
    for (vip, attempts) in runs {
        let want = if vip == ECHO_VIP { "srv:y" } else { "wallet:y" };
        let wrong: Vec<_> = attempts?.into_iter().filter(|a| a.reply != want).collect();
        ensure!(
            wrong.is_empty(),
            "{} of 150 connects to {vip} did not get {want:?}, first: {:?}",
            wrong.len(),
            wrong.first()
        );
    }

    // The same pod and run against a single agent port: the TIME_WAIT sockets use up the
    // pod's 100 ports (this is what the test would see if connects were not spread).
    topo.signal(agent.pid, libc::SIGTERM)?;
    topo.wait(agent.pid, Duration::from_secs(15))?;
    let single = format!("{}listen:\n  outbound_ports: 1\n", config(node, NO_DENY));
    let agent = topo.start_agent(node, &single, &[])?;
    topo.wait_ready(&agent)?;
    let attempts = topo.connect_from(client, ECHO_VIP, "x", 400)?;
    let out_of_ports = attempts
        .iter()
        .filter(|a| a.errno == Some(EADDRNOTAVAIL))
        .count();
    ensure!(
        out_of_ports >= 250,
        "with one agent port only {out_of_ports} of 400 connects ran out of source ports; the test no longer shows the limit it guards against"
    );
    Ok(())
}
