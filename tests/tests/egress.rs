//! End-to-end: egress control (seed 001 §14.4). A meshed pod reaches a non-mesh destination only
//! through an egress rule (CIDR + ports, per identity or namespace); everything else fails with
//! EPERM at connect()/sendto() and is counted per identity. The configured DNS resolver is open
//! to every workload; loopback stays open; native IPv6 has no rules and is refused.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::http::metric;
use mesh_tests::{Node, Topology};

const EPERM: i32 = 1;
const ECONNREFUSED: i32 = 111;

fn config(node: &Node) -> String {
    let outside = node.pod("outside").ip;
    node.agent_config(&format!(
        "services: []\nworkloads:\n{}{}\
         egress:\n  dns: [\"{outside}:5353\"]\n  rules:\n    - {{name: shop-web, cidr: {outside}/32, ports: [7070], from_namespace: shop}}\n",
        node.pod("client").workload_yaml("shop", "client"),
        node.pod("other").workload_yaml("ops", "other"),
    ))
}

#[test]
fn non_mesh_destinations_need_an_egress_rule() -> Result<()> {
    let mut topo = Topology::new()?;
    // `outside` is not a workload: it stands for a destination outside the mesh.
    topo.add_node(&["client", "other", "outside"])?;
    let node = topo.node(1);
    let outside = node.pod("outside");
    topo.start_echo_server(outside, 7070, "web")?;
    topo.start_echo_server(outside, 7071, "other-port")?;
    topo.start_udp_echo_server(outside, 5353, "dns")?;
    let v6 = topo.add_ipv6(outside)?;
    let (client, other) = (node.pod("client"), node.pod("other"));
    let web = format!("{}:7070", outside.ip);
    let web_other_port = format!("{}:7071", outside.ip);
    let dns = format!("{}:5353", outside.ip);

    // Before the agent every path works: the refusals below are the mesh's.
    let before = topo.connect_from(other, &web, "pre", 1)?;
    ensure!(before[0].ok, "no path to the outside pod: {:?}", before[0]);

    let agent = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&agent)?;

    let allowed = topo.connect_from(client, &web, "hi", 1)?;
    ensure!(
        allowed[0].ok && allowed[0].reply == "web:hi",
        "rule for shop: {:?}",
        allowed[0]
    );
    let mut refused = vec![
        (
            "other namespace",
            topo.connect_from(other, &web, "x", 1)?.remove(0),
        ),
        (
            "port not in the rule",
            topo.connect_from(client, &web_other_port, "x", 1)?
                .remove(0),
        ),
        (
            "native IPv6",
            topo.connect_from(client, &format!("[{v6}]:7070"), "x", 1)?
                .remove(0),
        ),
    ];
    refused.push((
        "UDP to a port no rule names",
        topo.udp_from(other, &web, "x", false, Duration::from_millis(500))?,
    ));
    for (what, a) in &refused {
        ensure!(a.errno == Some(EPERM), "{what}: {a:?}");
    }
    eprintln!(
        "egress attempts without a rule: {} tried, {} refused with EPERM",
        refused.len(),
        refused
            .iter()
            .filter(|(_, a)| a.errno == Some(EPERM))
            .count()
    );

    // DNS is open to every workload (UDP and TCP port), loopback stays open.
    for pod in [client, other] {
        let answer = topo.udp_from(pod, &dns, "q", false, Duration::from_secs(2))?;
        ensure!(
            answer.ok && answer.reply == "dns:q",
            "DNS from {}: {answer:?}",
            pod.name
        );
    }
    let lo = topo.connect_from(other, "127.0.0.1:9", "x", 1)?;
    ensure!(
        lo[0].errno == Some(ECONNREFUSED),
        "loopback must stay open: {:?}",
        lo[0]
    );

    let m = topo.metrics(&agent)?;
    let denied = |id: &str| {
        metric(
            &m,
            "nodemesh_kernel_egress_denied_total",
            &[("identity", id)],
        )
    };
    ensure!(denied("ops/other") == Some(2), "{m}");
    ensure!(denied("shop/client") == Some(2), "{m}");
    Ok(())
}
