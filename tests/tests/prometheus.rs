//! End-to-end with a real Prometheus server: it scrapes the agent of a netns topology while pods
//! send real traffic, and its query API must agree with what the test sent. Also checks the
//! exposition format with `promtool check metrics`.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::http::metric;
use mesh_tests::prometheus::{promtool_check_metrics, Prometheus};
use mesh_tests::two_nodes::{Options, TwoNodes};
use mesh_tests::{Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const ROUNDS: u64 = 3;
const SHORT_PER_ROUND: u64 = 4;
const BULK_BYTES: u64 = 100_000;
/// Per-packet IPv4 + TCP header bytes: 20 + 20 at least, 20 + 60 at most (see kernel_traffic.rs).
const MIN_HEADERS: f64 = 40.0;
const MAX_HEADERS: f64 = 80.0;

fn config(node: &Node) -> String {
    let server = node.pod("server").ip;
    node.agent_config(&format!(
        "services:\n\
         \x20 - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{server}:8080\"]\n\
         workloads:\n{}{}\
         authorization:\n\
         \x20 - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from_service: client\n",
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("server").workload_yaml("demo", "server"),
    ))
}

#[test]
fn prometheus_scrapes_the_agent_during_traffic_and_its_counts_match() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let agent = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&agent)?;
    let prom = Prometheus::start(&topo, node, &[agent.metrics])?;
    let wait = Duration::from_secs(15);
    prom.wait_for_value("up{job=\"nodemesh\"}", wait, |v| v == 1.0)?;

    // Rounds far enough apart (several scrape intervals) that Prometheus sees the counters move.
    let client = node.pod("client");
    let mut payload = 0;
    for _ in 0..ROUNDS {
        let short = topo.connect_from(client, ECHO_VIP, "ping", SHORT_PER_ROUND as u32)?;
        ensure!(
            short.iter().all(|a| a.ok && a.reply == "srv:ping"),
            "{short:?}"
        );
        let bulk = topo.send_from(client, ECHO_VIP, BULK_BYTES)?;
        ensure!(bulk.received >= bulk.sent, "{bulk:?}");
        payload += SHORT_PER_ROUND * 4 + bulk.sent;
        std::thread::sleep(Duration::from_millis(800));
    }
    let connections = (ROUNDS * (SHORT_PER_ROUND + 1)) as f64;

    let echo = "service=\"echo\"";
    let client_id = "identity=\"demo/client\"";
    prom.wait_for_value(
        &format!("nodemesh_outbound_connections_total{{{echo}}}"),
        wait,
        |v| v == connections,
    )?;
    prom.wait_for_value(
        &format!("nodemesh_kernel_connections_redirected_total{{{client_id}}}"),
        wait,
        |v| v == connections,
    )?;
    // Scraped while traffic ran: the connection counter changed between scrapes, not just once.
    let changes = prom
        .value(&format!(
            "changes(nodemesh_outbound_connections_total{{{echo}}}[5m])"
        ))?
        .unwrap_or(0.0);
    ensure!(
        changes >= 2.0,
        "counter changed {changes} times across scrapes"
    );

    // Kernel bytes: Prometheus ends up with exactly the agent's value, and that value is the
    // payload plus a bounded header overhead per packet.
    let mut direct = (0.0, 0.0);
    topo.wait_for(
        "Prometheus to catch up with the kernel counters",
        wait,
        || {
            let m = topo.metrics(&agent)?;
            let labels = [("identity", "demo/client")];
            direct = (
                metric(&m, "nodemesh_kernel_sent_bytes_total", &labels).unwrap_or(0) as f64,
                metric(&m, "nodemesh_kernel_sent_packets_total", &labels).unwrap_or(0) as f64,
            );
            let scraped = (
                prom.value(&format!("nodemesh_kernel_sent_bytes_total{{{client_id}}}"))?,
                prom.value(&format!(
                    "nodemesh_kernel_sent_packets_total{{{client_id}}}"
                ))?,
            );
            Ok(scraped == (Some(direct.0), Some(direct.1)))
        },
    )?;
    let (bytes, packets) = direct;
    let payload = payload as f64;
    ensure!(
        bytes >= payload + MIN_HEADERS * packets && bytes <= payload + MAX_HEADERS * packets,
        "kernel sent {bytes} bytes in {packets} packets for a payload of {payload}"
    );

    promtool_check_metrics(&topo.metrics(&agent)?)?;
    dashboard_queries_run(&prom)?;
    Ok(())
}

/// Two nodes: one Prometheus (in node 1) scrapes both agents; cross-node calls and refusals show
/// up on the right agent, and the destination pod's kernel byte count matches what was sent.
#[test]
fn prometheus_scrapes_both_agents_of_a_two_node_mesh() -> Result<()> {
    let mesh = TwoNodes::start(Options::default())?;
    let topo = &mesh.topo;
    let prom = Prometheus::start(
        topo,
        topo.node(1),
        &[mesh.agent1.metrics, mesh.agent2.metrics],
    )?;
    let wait = Duration::from_secs(15);
    prom.wait_for_value("count(up{job=\"nodemesh\"} == 1)", wait, |v| v == 2.0)?;

    let (client, intruder) = (topo.node(1).pod("client"), topo.node(1).pod("intruder"));
    let mut payload = 0;
    for _ in 0..2 {
        let bulk = topo.send_from(client, mesh_tests::two_nodes::ECHO_VIP, BULK_BYTES)?;
        ensure!(bulk.received >= bulk.sent, "{bulk:?}");
        payload += bulk.sent;
        let refused = topo.connect_from(intruder, mesh_tests::two_nodes::ECHO_VIP, "x", 1)?;
        ensure!(refused[0].reply.is_empty(), "{refused:?}");
        std::thread::sleep(Duration::from_millis(600));
    }

    let q = |expr: &str, expected: f64| prom.wait_for_value(expr, wait, move |v| v == expected);
    // Tunnels carried; the intruder's were refused by node 2 and count as denied on node 1.
    q(
        "nodemesh_outbound_hbone_connections_total{node=\"node-1\",service=\"echo\"}",
        2.0,
    )?;
    q(
        "nodemesh_outbound_denied_total{node=\"node-1\",service=\"echo\"}",
        2.0,
    )?;
    q(
        "nodemesh_hbone_inbound_streams_total{node=\"node-2\",result=\"opened\"}",
        2.0,
    )?;
    q(
        "nodemesh_hbone_inbound_streams_total{node=\"node-2\",result=\"denied\"}",
        2.0,
    )?;
    q(
        "nodemesh_authz_decisions_total{node=\"node-2\",policy=\"echo-callers\",decision=\"deny\"}",
        2.0,
    )?;

    // The server pod on node 2 received exactly the client's payload (plus headers) from agent 2.
    let server = "identity=\"shop/server\"";
    let bytes = prom.wait_for_value(
        &format!("nodemesh_kernel_received_bytes_total{{node=\"node-2\",{server}}}"),
        wait,
        |v| v >= payload as f64,
    )?;
    let packets = prom
        .value(&format!(
            "nodemesh_kernel_received_packets_total{{node=\"node-2\",{server}}}"
        ))?
        .unwrap_or(0.0);
    let payload = payload as f64;
    ensure!(
        bytes >= payload + MIN_HEADERS * packets && bytes <= payload + MAX_HEADERS * packets,
        "server received {bytes} bytes in {packets} packets for a payload of {payload}"
    );
    Ok(())
}

/// Every query of deploy/grafana-dashboard.json parses and runs on the real server, and the kernel
/// traffic panels show the client that just sent traffic.
fn dashboard_queries_run(prom: &Prometheus) -> Result<()> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    ensure!(exprs.len() > 20, "found only {} queries", exprs.len());
    for expr in &exprs {
        // Grafana's variables as the dashboard's defaults resolve them.
        let query = expr.replace("$node", ".*").replace("$__range", "5m");
        let samples = prom.query(&query)?;
        if query.contains("nodemesh_kernel_sent_bytes_total") {
            ensure!(
                samples
                    .iter()
                    .any(|s| s.labels.get("identity").and_then(|v| v.as_str())
                        == Some("demo/client")
                        && s.value > 0.0),
                "{query}: no traffic for demo/client: {samples:?}"
            );
        }
    }
    Ok(())
}

fn collect_exprs(panels: &serde_json::Value, out: &mut Vec<String>) {
    for panel in panels.as_array().into_iter().flatten() {
        collect_exprs(&panel["panels"], out);
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(expr.to_owned());
            }
        }
    }
}
