//! `cargo xtask demo`: one node, three pods, real eBPF capture; shows an allowed call through the
//! agent, a call the kernel denies with EPERM, and the kernel counters.

use anyhow::{Context, Result};
use mesh_tests::{Attempt, Topology};

const CHECKOUT_VIP: &str = "10.96.0.10:80";
const WALLET_VIP: &str = "10.96.0.20:80";

pub fn run() -> Result<()> {
    let mut topo = Topology::new()
        .context("the demo creates network namespaces and loads eBPF: run it as root")?;
    topo.add_node(&["web", "checkout", "wallet"])?;
    let node = topo.node(1);
    let (web, checkout, wallet) = (node.pod("web"), node.pod("checkout"), node.pod("wallet"));
    topo.start_echo_server(checkout, 8080, "checkout")?;
    topo.start_echo_server(wallet, 8080, "wallet")?;

    let config = node.agent_config(&format!(
        "services:\n\
         \x20 - name: checkout\n    namespace: shop\n    vip: {CHECKOUT_VIP}\n    endpoints: [\"{}:8080\"]\n\
         \x20 - name: wallet\n    namespace: shop\n    vip: {WALLET_VIP}\n    endpoints: [\"{}:8080\"]\n\
         workloads:\n{}{}{}\
         policy:\n  deny:\n    - name: web-may-not-touch-wallet\n      from: shop/web\n      to: wallet\n",
        checkout.ip,
        wallet.ip,
        web.workload_yaml("shop", "web"),
        checkout.workload_yaml("shop", "checkout"),
        wallet.workload_yaml("shop", "wallet"),
    ));
    println!(
        "== nodemesh demo: node {} (agent {}), pods web {}, checkout {}, wallet {}",
        node.netns, node.agent_ip, web.ip, checkout.ip, wallet.ip
    );
    println!("-- agent config --\n{config}");
    let agent = topo.start_agent(node, &config, &[])?;
    topo.wait_ready(&agent)?;
    println!("-- agent ready: eBPF connect4 + sock_ops attached to the pods' cgroups --\n");

    show(
        "web -> checkout (VIP)",
        CHECKOUT_VIP,
        &topo.connect_from(web, CHECKOUT_VIP, "order#1", 3)?,
    );
    show(
        "web -> wallet (VIP, denied by policy)",
        WALLET_VIP,
        &topo.connect_from(web, WALLET_VIP, "pay", 2)?,
    );
    show(
        "checkout -> wallet (VIP)",
        WALLET_VIP,
        &topo.connect_from(checkout, WALLET_VIP, "charge", 1)?,
    );

    println!("\n-- /metrics (kernel counters and proxied connections) --");
    let metrics = topo.metrics(&agent)?;
    for line in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("nodemesh_kernel_")
                || l.starts_with("nodemesh_outbound_connections_total"))
            && !l.contains("identity=\"unknown\"")
    }) {
        println!("{line}");
    }
    println!("\n== demo done; tearing down namespaces, cgroups and pinned maps");
    Ok(())
}

fn show(title: &str, target: &str, attempts: &[Attempt]) {
    println!("{title}:");
    for a in attempts {
        if a.ok {
            println!("  connect {target}: ALLOWED, reply {:?}", a.reply);
        } else {
            let reason = if a.errno == Some(1) {
                "DENIED by the kernel (EPERM)".to_owned()
            } else {
                format!("failed: {:?}", a.error)
            };
            println!("  connect {target}: {reason}");
        }
    }
}
