//! End-to-end: strict mode. A new TCP connection to a strict pod that did not come through the
//! agent is dropped in the kernel (cgroup_skb ingress) and counted for the destination identity.
//! Runs for real: network namespaces, cgroup v2, eBPF programs attached by the agent.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use mesh_tests::http::metric;
use mesh_tests::{AgentHandle, Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
/// Bypass attempts are expected to time out; keep them short (the client retransmits its SYN
/// after 1 s, so this still gives the kernel at least one SYN to drop).
const BYPASS_TIMEOUT: Duration = Duration::from_millis(1500);
const DROPPED: &str = "nodemesh_kernel_inbound_dropped_total";
const SERVER_IDENTITY: &str = "demo/server";

/// How strict mode is configured for the run.
#[derive(Clone, Copy)]
enum Strict {
    /// Nothing set: the default (off) everywhere.
    Off,
    /// `strict: true` on the server workload only.
    Server,
    /// `policy.strict_default: true`, with `other` opting out (`strict: false`).
    DefaultWithOtherOptOut,
}

/// One node: pods client, server, other; service echo (VIP) served by `server`.
fn config(node: &Node, strict: Strict) -> String {
    let server = node.pod("server").ip;
    let (client_yaml, server_yaml, other_yaml, default) = match strict {
        Strict::Off => (
            node.pod("client").workload_yaml("demo", "client"),
            node.pod("server").workload_yaml("demo", "server"),
            node.pod("other").workload_yaml("demo", "other"),
            false,
        ),
        Strict::Server => (
            node.pod("client").workload_yaml("demo", "client"),
            node.pod("server")
                .workload_yaml_strict("demo", "server", true),
            node.pod("other").workload_yaml("demo", "other"),
            false,
        ),
        Strict::DefaultWithOtherOptOut => (
            node.pod("client").workload_yaml("demo", "client"),
            node.pod("server").workload_yaml("demo", "server"),
            node.pod("other")
                .workload_yaml_strict("demo", "other", false),
            true,
        ),
    };
    node.agent_config(&format!(
        "services:\n\
         \x20 - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{server}:8080\"]\n\
         workloads:\n{client_yaml}{server_yaml}{other_yaml}\
         authorization:\n  - name: echo-callers\n    service: echo\n    allow: [{{from_namespace: demo}}]\n\
         egress:\n  rules:\n    - {{name: node-pods, cidr: 10.1.0.0/16}}\n\
         policy:\n  strict_default: {default}\n"
    ))
}

fn setup() -> Result<Topology> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server", "other"])?;
    Ok(topo)
}

fn dropped(topo: &Topology, agent: &AgentHandle, identity: &str) -> Result<u64> {
    let m = topo.metrics(agent)?;
    match metric(&m, DROPPED, &[("identity", identity)]) {
        Some(v) => Ok(v),
        None => bail!("no {DROPPED} for {identity}:\n{m}"),
    }
}

fn server_direct(node: &Node) -> String {
    format!("{}:8080", node.pod("server").ip)
}

/// A port of the server pod that is no service endpoint (dialing an endpoint address is captured
/// like the VIP), so a connect to it really bypasses the mesh.
fn server_bypass(node: &Node) -> String {
    format!("{}:{BYPASS_PORT}", node.pod("server").ip)
}

const BYPASS_PORT: u16 = 9090;

/// Through the VIP (via the agent) works; straight to the pod IP is dropped and counted.
#[test]
fn strict_pod_accepts_the_agent_and_drops_the_bypass() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let record = topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let bypass_record = topo.start_echo_server(node.pod("server"), BYPASS_PORT, "srv")?;
    let agent = topo.start_agent(node, &config(node, Strict::Server), &[])?;
    topo.wait_ready(&agent)?;
    ensure!(
        dropped(&topo, &agent, SERVER_IDENTITY)? == 0,
        "drops before any traffic"
    );

    let via_agent = topo.connect_from(node.pod("client"), ECHO_VIP, "via-agent", 1)?;
    ensure!(
        via_agent[0].ok && via_agent[0].reply == "srv:via-agent",
        "client -> VIP under strict: {:?}\nagent log:\n{}",
        via_agent[0],
        agent.log_text()
    );
    ensure!(
        dropped(&topo, &agent, SERVER_IDENTITY)? == 0,
        "the agent's connection was counted as a drop"
    );

    let bypass = topo.connect_from_with_timeout(
        node.pod("client"),
        &server_bypass(node),
        "bypass",
        1,
        BYPASS_TIMEOUT,
    )?;
    ensure!(
        !bypass[0].ok,
        "bypass reached the strict server: {:?}",
        bypass[0]
    );
    let bypassed = std::fs::read_to_string(&bypass_record).unwrap_or_default();
    ensure!(
        !bypassed.contains("bypass"),
        "server recorded bypass bytes: {bypassed:?}"
    );
    let seen = std::fs::read_to_string(&record).unwrap_or_default();
    ensure!(seen.contains("via-agent"), "server record: {seen:?}");

    let drops = dropped(&topo, &agent, SERVER_IDENTITY)?;
    // At least the first SYN; retransmissions within the timeout count too.
    ensure!(drops >= 1, "expected >= 1 drop, got {drops}");
    // Drops are counted for the destination only: the client is not strict.
    ensure!(dropped(&topo, &agent, "demo/client")? == 0, "client drops");
    Ok(())
}

/// Without strict the same bypass works (so the test above can fail); turning strict on with a
/// hot reload then drops it without restarting the agent.
#[test]
fn bypass_works_without_strict_and_stops_after_reload() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let record = topo.start_echo_server(node.pod("server"), BYPASS_PORT, "srv")?;
    let agent = topo.start_agent(node, &config(node, Strict::Off), &[])?;
    topo.wait_ready(&agent)?;

    let bypass = topo.connect_from_with_timeout(
        node.pod("client"),
        &server_bypass(node),
        "open",
        1,
        BYPASS_TIMEOUT,
    )?;
    ensure!(
        bypass[0].ok && bypass[0].reply == "srv:open",
        "bypass without strict: {:?}",
        bypass[0]
    );
    ensure!(
        std::fs::read_to_string(&record)?.contains("open"),
        "server did not record the bypass"
    );
    ensure!(
        dropped(&topo, &agent, SERVER_IDENTITY)? == 0,
        "drops without strict"
    );

    // Same config file, now with strict on for the server.
    std::fs::write(
        topo.workdir.join(format!("{}.yaml", node.instance)),
        config(node, Strict::Server),
    )?;
    wait_generation(&topo, &agent, 2)?;
    let after = topo.connect_from_with_timeout(
        node.pod("client"),
        &server_bypass(node),
        "closed",
        1,
        BYPASS_TIMEOUT,
    )?;
    ensure!(!after[0].ok, "bypass after enabling strict: {:?}", after[0]);
    ensure!(
        !std::fs::read_to_string(&record)?.contains("closed"),
        "server recorded bytes after strict was enabled"
    );
    ensure!(
        dropped(&topo, &agent, SERVER_IDENTITY)? >= 1,
        "no drop counted"
    );
    Ok(())
}

/// A strict pod's own connections are unaffected: replies (SYN-ACK) to its outbound connections
/// pass, as does a connection to itself. Also checks `policy.strict_default` and the opt-out.
#[test]
fn strict_pod_outbound_and_self_connections_still_work() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let server = node.pod("server");
    topo.start_echo_server(server, 8080, "srv")?;
    topo.start_echo_server(server, BYPASS_PORT, "srv")?;
    topo.start_echo_server(node.pod("other"), 7070, "oth")?;
    let agent = topo.start_agent(node, &config(node, Strict::DefaultWithOtherOptOut), &[])?;
    topo.wait_ready(&agent)?;

    // server is strict by default; it connects straight to other (opted out) and gets the reply.
    let other_direct = format!("{}:7070", node.pod("other").ip);
    let out = topo.connect_from(server, &other_direct, "out", 1)?;
    ensure!(
        out[0].ok && out[0].reply == "oth:out",
        "strict pod's outbound connection: {:?}",
        out[0]
    );
    // ... and to its own pod IP (source == destination) and loopback.
    let own = topo.connect_from(server, &server_direct(node), "self", 1)?;
    ensure!(
        own[0].ok && own[0].reply == "srv:self",
        "self: {:?}",
        own[0]
    );
    let lo = topo.connect_from(server, "127.0.0.1:8080", "lo", 1)?;
    ensure!(lo[0].ok && lo[0].reply == "srv:lo", "loopback: {:?}", lo[0]);
    // Through the agent as usual.
    let vip = topo.connect_from(node.pod("client"), ECHO_VIP, "vip", 1)?;
    ensure!(
        vip[0].ok && vip[0].reply == "srv:vip",
        "client -> VIP: {:?}",
        vip[0]
    );
    ensure!(
        dropped(&topo, &agent, SERVER_IDENTITY)? == 0,
        "unexpected drops"
    );

    // strict_default really applies to the server: a bypass from client is dropped.
    let bypass = topo.connect_from_with_timeout(
        node.pod("client"),
        &server_bypass(node),
        "bypass",
        1,
        BYPASS_TIMEOUT,
    )?;
    ensure!(
        !bypass[0].ok,
        "bypass to default-strict server: {:?}",
        bypass[0]
    );
    ensure!(
        dropped(&topo, &agent, SERVER_IDENTITY)? >= 1,
        "no drop counted"
    );
    // other opted out: a direct connection from client reaches it.
    let opt_out = topo.connect_from(node.pod("client"), &other_direct, "direct", 1)?;
    ensure!(
        opt_out[0].ok && opt_out[0].reply == "oth:direct",
        "client -> opted-out other: {:?}",
        opt_out[0]
    );
    ensure!(
        dropped(&topo, &agent, "demo/other")? == 0,
        "drops for other"
    );
    Ok(())
}

/// Waits until the agent reports at least `generation` applied configs.
fn wait_generation(topo: &Topology, agent: &AgentHandle, generation: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = topo.metrics(agent)?;
        if metric(&m, "nodemesh_config_generation", &[]).is_some_and(|g| g >= generation) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "config generation {generation} not reached:\n{m}\nagent log:\n{}",
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Strict mode trusts the agent by its cgroup, not its address, and covers IPv6 and UDP: a host
/// process bound to the agent's IP, an IPv6 connection and a UDP datagram to a server socket all
/// reach the pod before the agent runs and are all dropped once it does, while the mesh path and
/// the pod's own connected UDP keep working.
#[test]
fn strict_trusts_the_agent_cgroup_not_its_address_and_covers_ipv6_and_udp() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let server = node.pod("server");
    topo.start_echo_server(server, 8080, "srv")?;
    topo.start_udp_echo_server(server, 8080, "udp")?;
    topo.start_udp_echo_server(node.pod("other"), 5353, "oth")?;
    let v6 = topo.add_ipv6(server)?;
    let out = topo.workdir.join("serve6.out");
    let mut serve6 = std::process::Command::new(mesh_tests::topology::probe_binary()?);
    serve6
        .args(["serve6", "8086", "six"])
        .stdout(std::fs::File::create(&out)?);
    topo.spawn_in_pod(server, &mut serve6)?;
    topo.wait_for("serve6", Duration::from_secs(10), || {
        Ok(std::fs::read_to_string(&out)?.contains("listening"))
    })?;

    let agent_ip = node.agent_ip.to_string();
    let v6_target = format!("[{v6}]:8086");
    let udp_target = server_direct(node);
    let timeout = BYPASS_TIMEOUT.as_millis().to_string();
    let attempts = |expect_ok: bool| -> Result<()> {
        let spoof = topo.probe_from_node(
            node,
            &[
                "connectfrom",
                &agent_ip,
                &server_direct(node),
                "spoof",
                &timeout,
            ],
        )?;
        let six = topo.probe_from_node(node, &["connect", &v6_target, "six", "1", &timeout])?;
        let udp = topo.probe_from_node(node, &["udp", &udp_target, "dgram", "sendto", &timeout])?;
        for (what, a) in [
            ("bound to the agent IP", &spoof),
            ("IPv6", &six),
            ("UDP", &udp),
        ] {
            ensure!(
                a.ok == expect_ok,
                "host process {what}: expected ok={expect_ok}, got {a:?}"
            );
        }
        Ok(())
    };
    // Before the agent: every path reaches the pod (what strict mode has to stop).
    attempts(true)?;

    let agent = topo.start_agent(node, &config(node, Strict::Server), &[])?;
    topo.wait_ready(&agent)?;
    attempts(false)?;
    ensure!(
        dropped(&topo, &agent, SERVER_IDENTITY)? >= 3,
        "drops not counted"
    );
    // The agent's own connects still pass; the pod's connected UDP still gets its replies.
    let vip = topo.connect_from(node.pod("client"), ECHO_VIP, "vip", 1)?;
    ensure!(
        vip[0].ok && vip[0].reply == "srv:vip",
        "mesh path: {:?}",
        vip[0]
    );
    let other_udp = format!("{}:5353", node.pod("other").ip);
    let reply = topo.udp_from(server, &other_udp, "q", true, Duration::from_secs(2))?;
    ensure!(
        reply.ok && reply.reply == "oth:q",
        "strict pod's own UDP: {reply:?}"
    );
    Ok(())
}
