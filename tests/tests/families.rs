//! End-to-end: every address family and protocol is under the same policy. A caller outside
//! the allow-list of `echo` tries every way around the VIP rule: an IPv6 socket to the
//! v4-mapped VIP, UDP connect() and unconnected sendto() (v4 and v4-mapped), and the endpoint's
//! pod address directly, with kube-proxy style DNAT in its netns so that any escape would reach
//! the server. Every attempt fails with EPERM at the source; the allowed caller still gets
//! through on the same paths. (The UDP server's replies are datagrams to its clients, so it
//! carries an egress rule for them.)

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::{Attempt, Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const MAPPED_VIP: &str = "[::ffff:10.96.0.10]:80";
const EPERM: i32 = 1;
const UDP_TIMEOUT: Duration = Duration::from_millis(1000);

/// From the agent address: the server's record then tells a mesh call from a bypass.
fn config(node: &Node) -> String {
    let server = node.pod("server").ip;
    node.agent_config_from_agent_address(&format!(
        "services:\n\
         \x20 - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{server}:8080\"]\n    policy:\n      allow: [client]\n\
         workloads:\n{}{}{}\
         egress:\n  rules:\n    - {{name: udp-replies, cidr: 10.1.0.0/16, from: demo/server}}\n",
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("other").workload_yaml("demo", "other"),
        node.pod("server").workload_yaml("demo", "server"),
    ))
}

#[test]
fn v4_mapped_udp_and_endpoint_paths_meet_the_allow_list() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "other", "server"])?;
    let node = topo.node(1);
    let server = node.pod("server");
    let endpoint = format!("{}:8080", server.ip);
    let mapped_endpoint = format!("[::ffff:{}]:8080", server.ip);
    topo.start_echo_server(server, 8080, "srv")?;
    topo.start_udp_echo_server(server, 8080, "udp")?;
    let (client, other) = (node.pod("client"), node.pod("other"));
    for pod in [client, other] {
        topo.dnat_in_pod(pod, ECHO_VIP, &endpoint)?;
    }
    // Before any agent: every path below reaches the server (so a bypass would be visible).
    let udp_before = topo.udp_from(other, ECHO_VIP, "pre", false, UDP_TIMEOUT)?;
    ensure!(udp_before.ok, "UDP DNAT path does not work: {udp_before:?}");
    let v6_before = topo.connect_from(other, MAPPED_VIP, "pre", 1)?;
    ensure!(
        v6_before[0].ok,
        "v4-mapped DNAT path does not work: {:?}",
        v6_before[0]
    );

    let agent = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&agent)?;

    let mut bypass_attempts: Vec<(&str, Attempt)> = vec![
        (
            "tcp v4 VIP",
            topo.connect_from(other, ECHO_VIP, "x", 1)?.remove(0),
        ),
        (
            "tcp v4-mapped VIP",
            topo.connect_from(other, MAPPED_VIP, "x", 1)?.remove(0),
        ),
        (
            "tcp endpoint",
            topo.connect_from(other, &endpoint, "x", 1)?.remove(0),
        ),
        (
            "tcp v4-mapped endpoint",
            topo.connect_from(other, &mapped_endpoint, "x", 1)?
                .remove(0),
        ),
    ];
    for (what, target, connect) in [
        ("udp connect VIP", ECHO_VIP, true),
        ("udp sendto VIP", ECHO_VIP, false),
        ("udp connect v4-mapped VIP", MAPPED_VIP, true),
        ("udp sendto v4-mapped VIP", MAPPED_VIP, false),
        ("udp sendto endpoint", endpoint.as_str(), false),
    ] {
        bypass_attempts.push((
            what,
            topo.udp_from(other, target, "x", connect, UDP_TIMEOUT)?,
        ));
    }
    let refused = bypass_attempts
        .iter()
        .filter(|(_, a)| a.errno == Some(EPERM))
        .count();
    eprintln!(
        "bypass attempts by a caller outside the allow-list: {} tried, {refused} refused with EPERM",
        bypass_attempts.len()
    );
    for (what, a) in &bypass_attempts {
        ensure!(a.errno == Some(EPERM), "{what} not refused: {a:?}");
    }

    // The allowed caller: TCP on every path goes through the agent; UDP passes (not proxied).
    for target in [ECHO_VIP, MAPPED_VIP, endpoint.as_str()] {
        let ok = topo.connect_from(client, target, "ok", 1)?;
        ensure!(
            ok[0].ok && ok[0].reply == "srv:ok",
            "client -> {target}: {:?}",
            ok[0]
        );
    }
    let udp = topo.udp_from(client, ECHO_VIP, "ok", false, UDP_TIMEOUT)?;
    ensure!(udp.ok && udp.reply == "udp:ok", "client UDP: {udp:?}");
    let record =
        std::fs::read_to_string(topo.workdir.join(format!("record-{}-8080", server.name)))?;
    let via_agent = record
        .lines()
        .filter(|l| l.ends_with(" ok"))
        .all(|l| l.starts_with(&format!("{}:", node.agent_ip)));
    ensure!(via_agent, "a TCP call bypassed the agent:\n{record}");
    Ok(())
}
