//! End-to-end: `mesh-agent ctl` against a live agent in a netns topology (admin port on the node's
//! loopback), and the runtime log level through the admin port.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::topology::agent_binary;
use mesh_tests::two_nodes::{self, Options, TwoNodes};
use mesh_tests::{AgentHandle, Node, Topology};
use serde_json::Value;

const ECHO_VIP: &str = "10.96.0.10:80";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

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

fn start(log_filter: Option<&str>) -> Result<(Topology, AgentHandle)> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let env: Vec<(&str, &str)> = log_filter
        .map(|f| ("NODEMESH_LOG", f))
        .into_iter()
        .collect();
    let agent = topo.start_agent(node, &config(node), &env)?;
    topo.wait_ready(&agent)?;
    Ok((topo, agent))
}

/// Runs `mesh-agent ctl <args>` in node 1 (the admin port listens on its loopback).
fn ctl(topo: &Topology, args: &[&str]) -> Result<String> {
    ctl_on(topo, 1, args)
}

fn ctl_on(topo: &Topology, node: u8, args: &[&str]) -> Result<String> {
    let mut full = vec!["ctl"];
    full.extend_from_slice(args);
    let (status, out, err) = topo.run_in_node(topo.node(node), &agent_binary()?, &full)?;
    if !status.success() {
        bail!("mesh-agent {full:?} exited with {status}: {err}");
    }
    Ok(out)
}

fn ctl_json(topo: &Topology, args: &[&str]) -> Result<Value> {
    ctl_json_on(topo, 1, args)
}

fn ctl_json_on(topo: &Topology, node: u8, args: &[&str]) -> Result<Value> {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let out = ctl_on(topo, node, &full)?;
    serde_json::from_str(&out).with_context(|| format!("ctl {args:?} printed no JSON: {out}"))
}

/// The table row (line) that contains `needle`.
fn row<'a>(table: &'a str, needle: &str) -> Result<&'a str> {
    table
        .lines()
        .find(|l| l.contains(needle))
        .with_context(|| format!("no row with {needle:?} in:\n{table}"))
}

#[test]
fn ctl_reports_the_live_agent_as_tables_and_json() -> Result<()> {
    let (topo, _agent) = start(None)?;
    let node = topo.node(1);
    let server = format!("{}:8080", node.pod("server").ip);

    let status = ctl(&topo, &["status"])?;
    ensure!(row(&status, "node ")?.contains("node-1"), "{status}");
    ensure!(row(&status, "ready")?.ends_with("true"), "{status}");
    ensure!(row(&status, "attached_cgroups")?.ends_with('2'), "{status}");

    let workloads = ctl(&topo, &["workloads"])?;
    let client_row = row(&workloads, CLIENT_ID)?;
    ensure!(
        client_row.starts_with("client ") && client_row.contains(" true "),
        "client row {client_row:?}"
    );
    ensure!(workloads.starts_with("NAME "), "{workloads}");

    let services = ctl(&topo, &["services"])?;
    let echo = row(&services, ECHO_VIP)?;
    ensure!(
        echo.starts_with("echo ") && echo.ends_with(&server),
        "{services}"
    );

    let endpoints = ctl(&topo, &["endpoints"])?;
    ensure!(row(&endpoints, &server)?.contains("echo"), "{endpoints}");

    let policy = ctl(&topo, &["policy"])?;
    ensure!(
        row(&policy, "echo-callers")?.contains("from_service=client"),
        "{policy}"
    );
    let certs = ctl_json(&topo, &["certs"])?;
    ensure!(
        certs["certificates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["spiffe_id"] == CLIENT_ID)),
        "{certs}"
    );
    let certs = ctl(&topo, &["certs"])?;
    ensure!(
        row(&certs, CLIENT_ID)?.contains('h'),
        "expiry in hours: {certs}"
    );
    let yaml = ctl(&topo, &["config"])?;
    ensure!(yaml.contains("name: echo"), "{yaml}");

    // A held connection is listed as a flow, with its identities and live bytes, then goes away.
    ensure!(
        ctl(&topo, &["flows"])?.lines().count() == 1,
        "flows before any connection"
    );
    let hold = topo.start_hold(node.pod("client"), ECHO_VIP, "tick", 3)?;
    let mut flow = Value::Null;
    topo.wait_for("a flow with bytes", Duration::from_secs(5), || {
        let flows = ctl_json(&topo, &["flows"])?;
        flow = flows["flows"].get(0).cloned().unwrap_or(Value::Null);
        Ok(flow["bytes_from_endpoint"].as_u64().is_some_and(|b| b > 0))
    })?;
    ensure!(
        flow["source"] == CLIENT_ID
            && flow["service"] == "echo"
            && flow["endpoint"] == server.as_str()
            && flow["bytes_to_endpoint"].as_u64().is_some_and(|b| b > 0),
        "{flow}"
    );
    let table = ctl(&topo, &["flows"])?;
    ensure!(row(&table, CLIENT_ID)?.contains(&server), "{table}");
    ensure!(
        topo.wait(hold, Duration::from_secs(10))?.success(),
        "hold failed"
    );
    topo.wait_for("the flow to close", Duration::from_secs(5), || {
        Ok(ctl_json(&topo, &["flows"])?["flows"] == Value::Array(vec![]))
    })?;

    // A wrong admin address fails with a message that says what to check.
    let (status, _, err) = topo.run_in_node(
        node,
        &agent_binary()?,
        &["ctl", "--admin", "127.0.0.1:1", "status"],
    )?;
    ensure!(
        !status.success() && err.contains("--admin"),
        "{status}: {err}"
    );
    Ok(())
}

/// A connection across nodes is an outbound flow on the caller's agent and an inbound one (the
/// HBONE tunnel) on the destination's, with the same caller identity.
#[test]
fn flows_show_both_ends_of_a_cross_node_connection() -> Result<()> {
    let mesh = TwoNodes::start(Options::default())?;
    let topo = &mesh.topo;
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let server = format!("{}:{}", topo.node(2).pod("server").ip, two_nodes::ECHO_PORT);
    let hold = topo.start_hold(topo.node(1).pod("client"), two_nodes::ECHO_VIP, "tick", 3)?;

    let flow_on = |node: u8| -> Result<Value> {
        let mut flow = Value::Null;
        topo.wait_for("a flow with bytes", Duration::from_secs(5), || {
            flow = ctl_json_on(topo, node, &["flows"])?["flows"]
                .get(0)
                .cloned()
                .unwrap_or(Value::Null);
            Ok(flow["bytes_from_endpoint"].as_u64().is_some_and(|b| b > 0))
        })?;
        Ok(flow)
    };
    let outbound = flow_on(1)?;
    ensure!(
        outbound["direction"] == "outbound"
            && outbound["source"] == client_id
            && outbound["endpoint"] == server.as_str()
            && outbound["node"] == "node-2",
        "{outbound}"
    );
    let inbound = flow_on(2)?;
    ensure!(
        inbound["direction"] == "inbound"
            && inbound["source"] == client_id
            && inbound["service"] == "echo"
            && inbound["endpoint"] == server.as_str(),
        "{inbound}"
    );
    let table = ctl_on(topo, 2, &["flows"])?;
    ensure!(row(&table, client_id)?.contains("inbound"), "{table}");
    ensure!(
        topo.wait(hold, Duration::from_secs(10))?.success(),
        "hold failed"
    );
    for node in [1, 2] {
        topo.wait_for("the flows to close", Duration::from_secs(5), || {
            Ok(ctl_json_on(topo, node, &["flows"])?["flows"] == Value::Array(vec![]))
        })?;
    }
    Ok(())
}

#[test]
fn log_level_changes_at_runtime_through_the_admin_port() -> Result<()> {
    let (topo, agent) = start(Some("info"))?;
    let client = topo.node(1).pod("client");
    let debug_lines = || agent.log_text().matches("proxying").count();
    let call = |text: &str| -> Result<()> {
        let a = topo.connect_from(client, ECHO_VIP, text, 1)?;
        ensure!(a[0].ok, "{a:?}");
        Ok(())
    };

    call("quiet")?;
    ensure!(
        debug_lines() == 0,
        "debug line at info:\n{}",
        agent.log_text()
    );
    ensure!(ctl(&topo, &["log-level"])? == "log level: info\n");

    let set = ctl(&topo, &["log-level", "info,mesh_agent=debug"])?;
    ensure!(set == "log level: info,mesh_agent=debug\n", "{set}");
    call("loud")?;
    topo.wait_for("the debug line", Duration::from_secs(5), || {
        Ok(debug_lines() == 1)
    })?;

    // An invalid filter is refused with the reason, and the one in force stays.
    let (status, _, err) = topo.run_in_node(
        topo.node(1),
        &agent_binary()?,
        &["ctl", "log-level", "mesh_agent=loud"],
    )?;
    ensure!(
        !status.success() && err.contains("mesh_agent=loud"),
        "{err}"
    );
    let current = ctl_json(&topo, &["log-level"])?;
    ensure!(current["level"] == "info,mesh_agent=debug", "{current}");

    ensure!(ctl(&topo, &["log-level", "warn"])? == "log level: warn\n");
    call("quiet-again")?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        debug_lines() == 1,
        "debug after going back:\n{}",
        agent.log_text()
    );
    Ok(())
}
