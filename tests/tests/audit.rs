//! End-to-end: an authorization policy in audit mode (dry run) lets a caller through that the same
//! policy enforced would refuse, logging and counting the would-be denial.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::http::metric;
use mesh_tests::{Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const WALLET_VIP: &str = "10.96.0.20:80";
const EPERM: i32 = 1;

/// echo and wallet share one server and one rule set (only `other` may call); echo's policy is in
/// audit mode, wallet's is enforced.
fn config(node: &Node) -> String {
    let server = node.pod("server").ip;
    let policy = |name: &str, service: &str, mode: &str| {
        format!(
            "  - name: {name}\n    service: {service}\n    mode: {mode}\n    default: deny\n    allow:\n      - from_service: other\n"
        )
    };
    node.agent_config(&format!(
        "services:\n\
         \x20 - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{server}:8080\"]\n\
         \x20 - name: wallet\n    namespace: demo\n    vip: {WALLET_VIP}\n    endpoints: [\"{server}:8080\"]\n\
         workloads:\n{}{}{}\
         authorization:\n{}{}",
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("server").workload_yaml("demo", "server"),
        node.pod("other").workload_yaml("demo", "other"),
        policy("echo-dry-run", "echo", "audit"),
        policy("wallet-callers", "wallet", "enforce"),
    ))
}

#[test]
fn audit_mode_allows_and_counts_what_enforcement_would_deny() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server", "other"])?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let agent = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&agent)?;
    let client = node.pod("client");

    let audited = topo.connect_from(client, ECHO_VIP, "dry", 2)?;
    ensure!(
        audited.iter().all(|a| a.ok && a.reply == "srv:dry"),
        "audit mode must allow: {audited:?}\n{}",
        agent.log_text()
    );
    // Enforced allow-lists are compiled into the kernel: connect() fails with EPERM. The audited
    // one must not be (the echo calls above went through).
    let enforced = topo.connect_from(client, WALLET_VIP, "pay", 1)?;
    ensure!(
        enforced[0].errno == Some(EPERM),
        "enforced policy let it through: {enforced:?}"
    );
    let allowed = topo.connect_from(node.pod("other"), ECHO_VIP, "ok", 1)?;
    ensure!(allowed[0].ok && allowed[0].reply == "srv:ok", "{allowed:?}");

    let decisions = |m: &str, policy: &str, decision: &str| {
        metric(
            m,
            "nodemesh_authz_decisions_total",
            &[("policy", policy), ("decision", decision)],
        )
    };
    let mut m = String::new();
    topo.wait_for("the audited decisions", Duration::from_secs(5), || {
        m = topo.metrics(&agent)?;
        Ok(decisions(&m, "echo-dry-run", "audit_deny") == Some(2))
    })?;
    ensure!(
        metric(
            &m,
            "nodemesh_kernel_connections_denied_total",
            &[("identity", "demo/client")]
        ) == Some(1),
        "{m}"
    );
    ensure!(decisions(&m, "echo-dry-run", "allow") == Some(1), "{m}");
    ensure!(decisions(&m, "echo-dry-run", "deny").is_none(), "{m}");
    ensure!(
        decisions(&m, "wallet-callers", "audit_deny").is_none(),
        "{m}"
    );

    let log = agent.log_text();
    let audit_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("audit_deny") && l.contains("echo-dry-run"))
        .collect();
    ensure!(
        audit_lines.len() == 2
            && audit_lines
                .iter()
                .all(|l| l.contains("spiffe://cluster.local/ns/demo/sa/client")
                    && l.contains("would deny")),
        "audit log lines: {audit_lines:#?}\n{log}"
    );
    Ok(())
}
