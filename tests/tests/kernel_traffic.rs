//! End-to-end: per-identity bytes and packets counted in the kernel by the cgroup_skb programs
//! (no agent involved in the counting). Runs for real: network namespaces, cgroup v2, eBPF attached by the agent.
//!
//! The counters count IP packets as on the wire (IPv4 header + TCP header + payload, offload
//! super-packets split into their segments), so every packet adds a header overhead on top of the
//! payload we send: an IPv4 header without options is 20 bytes (we send none) and a TCP header is
//! 20 to 60 bytes (here 32: timestamps on every segment; 40 on the SYN). Hence for each direction
//!     payload + 40 * packets <= bytes <= payload + 80 * packets.
//! Packets: the pods' veth has MTU 1500, so a TCP segment carries at most 1460 payload bytes and the
//! payload needs at least payload / 1460 packets; counting offload super-packets as one packet
//! falls below that.

use anyhow::{ensure, Result};
use mesh_tests::http::metric;
use mesh_tests::{Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const MAX_SEGMENT_PAYLOAD: u64 = 1460;
const MIN_HEADERS: u64 = 20 + 20;
const MAX_HEADERS: u64 = 20 + 60;

fn config(node: &Node) -> String {
    let server = node.pod("server").ip;
    node.agent_config(&format!(
        "services:\n\
         \x20 - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{server}:8080\"]\n\
         workloads:\n{}{}{}\
         authorization:\n\
         \x20 - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from_service: client\n",
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("server").workload_yaml("demo", "server"),
        node.pod("idle").workload_yaml("demo", "idle"),
    ))
}

/// Checks one direction of one identity against the payload it must carry.
fn check_direction(m: &str, identity: &str, direction: &str, payload: u64) -> Result<()> {
    let labels = [("identity", identity)];
    let bytes = metric(
        m,
        &format!("nodemesh_kernel_{direction}_bytes_total"),
        &labels,
    );
    let packets = metric(
        m,
        &format!("nodemesh_kernel_{direction}_packets_total"),
        &labels,
    );
    let (Some(bytes), Some(packets)) = (bytes, packets) else {
        anyhow::bail!("{identity} {direction}: counters missing\n{m}");
    };
    ensure!(
        packets >= payload / MAX_SEGMENT_PAYLOAD,
        "{identity} {direction}: {packets} packets cannot carry {payload} bytes\n{m}"
    );
    ensure!(
        bytes >= payload + MIN_HEADERS * packets && bytes <= payload + MAX_HEADERS * packets,
        "{identity} {direction}: {bytes} bytes in {packets} packets for a payload of {payload}\n{m}"
    );
    Ok(())
}

#[test]
fn kernel_counts_bytes_and_packets_per_identity() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server", "idle"])?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let agent = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&agent)?;
    let client = node.pod("client");

    // Straight to the server pod's address (the kernel captures endpoint addresses too, so this
    // one is also relayed by the agent, as the VIP one below).
    let direct = topo.send_from(client, &format!("{}:8080", node.pod("server").ip), 300_000)?;
    // Through the VIP: captured, relayed by the agent (client -> agent, agent -> server), from a
    // container cgroup below the pod's: the nearest configured ancestor's identity counts it.
    let container = topo.container(client, "app")?;
    let meshed = topo.send_from(&container, ECHO_VIP, 200_000)?;
    for s in [&direct, &meshed] {
        // The echo server prefixes every chunk it echoes, so the reply is at least the payload.
        ensure!(s.received >= s.sent, "short reply: {s:?}");
    }
    let sent = direct.sent + meshed.sent;
    let replied = direct.received + meshed.received;

    let m = topo.metrics(&agent)?;
    // Shown with --nocapture: the measured header overhead.
    eprintln!("payload sent {sent}, replied {replied}");
    for line in m.lines().filter(|l| {
        l.starts_with("nodemesh_kernel_") && l.contains("_bytes_total")
            || l.contains("_packets_total")
    }) {
        eprintln!("{line}");
    }
    check_direction(&m, "demo/client", "sent", sent)?;
    check_direction(&m, "demo/client", "received", replied)?;
    check_direction(&m, "demo/server", "received", sent)?;
    check_direction(&m, "demo/server", "sent", replied)?;
    for family in [
        "sent_bytes",
        "received_bytes",
        "sent_packets",
        "received_packets",
    ] {
        let name = format!("nodemesh_kernel_{family}_total");
        for identity in ["demo/idle", "unknown"] {
            ensure!(
                metric(&m, &name, &[("identity", identity)]) == Some(0),
                "traffic attributed to {identity}, which sent nothing: {name}\n{m}"
            );
        }
    }
    // Both connections went through the agent (VIP and endpoint address are both captured).
    ensure!(
        metric(
            &m,
            "nodemesh_outbound_connections_total",
            &[("service", "echo")]
        ) == Some(2),
        "{m}"
    );
    Ok(())
}
