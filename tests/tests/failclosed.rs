//! End-to-end: the mesh fails closed and restarts hitlessly. The service VIP also has a
//! kube-proxy style DNAT path inside the client pods (nftables), as a real cluster has, so a
//! connect that escaped capture would really reach the server: a bypass is measurable.
//!
//! - kill -9: the pinned programs and maps stay; while no agent runs, captured connects are
//!   refused (never reach the server directly), the denied pair gets EPERM, strict mode drops
//!   direct connects; a restarted agent adopts the pins and traffic flows again.
//! - SIGTERM rolling restart: a new agent binds the same ports (SO_REUSEPORT) while the old one
//!   runs; the old one stops accepting and drains; continuous traffic sees 0 failed connections
//!   and a long-lived connection through the old agent survives.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::topology::probe_binary;
use mesh_tests::{cmd, Node, Pod, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const EPERM: i32 = 1;

/// From the agent address: the server's record then tells a mesh call from a bypass.
fn config(node: &Node) -> String {
    node.agent_config_from_agent_address(&format!(
        "services:\n  - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{}:8080\"]\n\
         workloads:\n{}{}{}\
         policy:\n  deny:\n    - name: no-echo\n      from: demo/denied\n      to: echo\n\
         authorization:\n  - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from: spiffe://cluster.local/ns/demo/sa/client\n",
        node.pod("server").ip,
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("denied").workload_yaml("demo", "denied"),
        node.pod("server")
            .workload_yaml_strict("demo", "server", true),
    ))
}

/// One node: client, denied (deny-listed for echo), server (strict, serves echo on 8080).
/// DNAT for the VIP in both caller pods; checked to work before any agent runs.
fn setup() -> Result<(Topology, std::path::PathBuf)> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "denied", "server"])?;
    let node = topo.node(1);
    let server = format!("{}:8080", node.pod("server").ip);
    let record = topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    for pod in ["client", "denied"] {
        topo.dnat_in_pod(node.pod(pod), ECHO_VIP, &server)?;
        // Without an agent the DNAT path reaches the server: what a bypass would do.
        let direct = topo.connect_from(node.pod(pod), ECHO_VIP, "dnat", 1)?;
        ensure!(
            direct[0].ok && direct[0].reply == "srv:dnat",
            "DNAT path does not work from {pod}: {:?}",
            direct[0]
        );
    }
    Ok((topo, record))
}

/// Summary line of `meshprobe loop`.
#[derive(Debug, serde::Deserialize)]
struct LoopSummary {
    attempts: u64,
    ok: u64,
    failed: u64,
    errors: std::collections::BTreeMap<String, u64>,
    replies: std::collections::BTreeMap<String, u64>,
}

/// Starts continuous connects from `pod` in the background; `finish` returns the summary.
struct Traffic {
    pid: u32,
    out: std::path::PathBuf,
}

fn start_traffic(
    topo: &Topology,
    pod: &Pod,
    target: &str,
    millis: u64,
    timeout_ms: u64,
) -> Result<Traffic> {
    let out = topo.workdir.join(format!(
        "loop-{}-{}.json",
        pod.name,
        target.replace([':', '.'], "_")
    ));
    let mut command = Command::new(probe_binary()?);
    command
        .args([
            "loop",
            target,
            "x",
            &millis.to_string(),
            &timeout_ms.to_string(),
        ])
        .stdout(File::create(&out)?)
        .stderr(Stdio::inherit());
    let pid = topo.spawn_in_pod(pod, &mut command)?;
    Ok(Traffic { pid, out })
}

impl Traffic {
    fn finish(self, topo: &Topology) -> Result<LoopSummary> {
        let status = topo.wait(self.pid, Duration::from_secs(60))?;
        ensure!(status.success(), "meshprobe loop exited with {status}");
        let text = std::fs::read_to_string(&self.out)?;
        serde_json::from_str(text.trim()).with_context(|| format!("bad loop summary {text:?}"))
    }
}

/// Lines the echo server recorded from `peer_ip` (a direct, unproxied connection).
fn recorded_from(record: &std::path::Path, peer_ip: &str) -> usize {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&format!("{peer_ip}:")))
        .count()
}

/// The log without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn programs_attached(pod: &Pod) -> Result<String> {
    cmd::run(
        "bpftool",
        &["cgroup", "list", &pod.cgroup_abs.to_string_lossy()],
    )
}

fn check_mesh_works(topo: &Topology, record: &std::path::Path, tag: &str) -> Result<()> {
    let node = topo.node(1);
    let ok = topo.connect_from(node.pod("client"), ECHO_VIP, tag, 1)?;
    ensure!(
        ok[0].ok && ok[0].reply == format!("srv:{tag}"),
        "{tag}: {:?}",
        ok[0]
    );
    let denied = topo.connect_from(node.pod("denied"), ECHO_VIP, tag, 1)?;
    ensure!(
        denied[0].errno == Some(EPERM),
        "{tag}: denied pair: {:?}",
        denied[0]
    );
    let text = std::fs::read_to_string(record)?;
    let last = text.lines().last().unwrap_or_default();
    ensure!(
        last.starts_with(&format!("{}:", node.agent_ip)),
        "{tag}: the server saw {last:?}, not the agent"
    );
    Ok(())
}

#[test]
fn kill_9_keeps_enforcement_closed_and_a_restart_adopts_it() -> Result<()> {
    let (topo, record) = setup()?;
    let node = topo.node(1);
    let (client, denied) = (node.pod("client"), node.pod("denied"));
    let direct_server = format!("{}:8080", node.pod("server").ip);
    let agent = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&agent)?;
    check_mesh_works(&topo, &record, "before")?;

    topo.signal(agent.pid, libc::SIGKILL)?;
    topo.wait(agent.pid, Duration::from_secs(10))?;
    let bypasses_before = recorded_from(&record, &client.ip.to_string())
        + recorded_from(&record, &denied.ip.to_string());

    // Agent down: every path is tried concurrently for 2 s.
    let captured = start_traffic(&topo, client, ECHO_VIP, 2000, 300)?;
    let deny_listed = start_traffic(&topo, denied, ECHO_VIP, 2000, 300)?;
    let strict_bypass = start_traffic(&topo, client, &direct_server, 2000, 300)?;
    let (captured, deny_listed, strict_bypass) = (
        captured.finish(&topo)?,
        deny_listed.finish(&topo)?,
        strict_bypass.finish(&topo)?,
    );
    let bypasses = recorded_from(&record, &client.ip.to_string())
        + recorded_from(&record, &denied.ip.to_string())
        - bypasses_before;
    eprintln!(
        "agent down (kill -9): captured {captured:?}; deny-listed {deny_listed:?}; strict bypass {strict_bypass:?}; server saw {bypasses} direct connections"
    );
    ensure!(
        captured.attempts > 10 && captured.ok == 0,
        "captured connects got through: {captured:?}"
    );
    ensure!(
        deny_listed.ok == 0 && deny_listed.errors.get("1") == Some(&deny_listed.attempts),
        "denied pair not refused with EPERM while the agent was down: {deny_listed:?}"
    );
    ensure!(
        strict_bypass.ok == 0,
        "strict pod reached directly: {strict_bypass:?}"
    );
    ensure!(
        bypasses == 0,
        "{bypasses} connections reached the server without the agent"
    );
    let still = programs_attached(client)?;
    ensure!(
        still.contains("connect4") && still.contains("sock_ops"),
        "programs detached by kill -9:\n{still}"
    );

    let restarted = topo.start_agent_logged(node, &config(node), &[], "restarted")?;
    topo.wait_ready(&restarted)?;
    ensure!(
        strip_ansi(&restarted.log_text()).contains("adopted=true"),
        "restart did not adopt the pinned state:\n{}",
        restarted.log_text()
    );
    check_mesh_works(&topo, &record, "after")?;
    // Adoption swaps the program in the pinned link: still exactly one connect4 on the cgroup.
    let after = programs_attached(client)?;
    ensure!(
        after.matches("connect4").count() == 1,
        "links duplicated instead of adopted:\n{after}"
    );
    Ok(())
}

#[test]
fn sigterm_rolling_restart_fails_no_connection_and_drains_the_old_agent() -> Result<()> {
    let (topo, record) = setup()?;
    let node = topo.node(1);
    let client = node.pod("client");
    let old = topo.start_agent(node, &config(node), &[])?;
    topo.wait_ready(&old)?;
    check_mesh_works(&topo, &record, "before")?;

    // A long-lived connection through the old agent, and continuous new connections.
    let hold_out = topo.workdir.join("hold.json");
    let mut hold = Command::new(probe_binary()?);
    hold.args(["hold", ECHO_VIP, "held", "3"])
        .stdout(File::create(&hold_out)?)
        .stderr(Stdio::inherit());
    let hold_pid = topo.spawn_in_pod(client, &mut hold)?;
    let traffic = start_traffic(&topo, client, ECHO_VIP, 5000, 2000)?;
    std::thread::sleep(Duration::from_millis(500));

    let new = topo.start_agent_logged(node, &config(node), &[], "new")?;
    topo.wait_logged_ready(&new)?;
    topo.signal(old.pid, libc::SIGTERM)?;
    let status = topo.wait(old.pid, Duration::from_secs(15))?;
    ensure!(
        status.success(),
        "old agent exit {status}; log:\n{}",
        old.log_text()
    );

    let summary = traffic.finish(&topo)?;
    eprintln!("rolling restart under traffic: {summary:?}");
    ensure!(
        summary.attempts > 50,
        "too little traffic to judge: {summary:?}"
    );
    ensure!(
        summary.failed == 0,
        "connections failed across the restart: {summary:?}"
    );
    ensure!(
        summary.replies.keys().all(|r| r == "srv:x"),
        "unexpected replies: {summary:?}"
    );
    let hold_status = topo.wait(hold_pid, Duration::from_secs(15))?;
    ensure!(
        hold_status.success(),
        "the long-lived connection was cut by the drain: {}",
        std::fs::read_to_string(&hold_out).unwrap_or_default()
    );
    ensure!(
        recorded_from(&record, &client.ip.to_string()) == 1,
        "a connection bypassed the agent during the restart"
    );
    // The old agent left the pins the new one uses.
    let pins = std::path::Path::new("/sys/fs/bpf/nodemesh").join(&node.instance);
    ensure!(
        pins.join("DENY").exists(),
        "pinned maps removed by the old agent"
    );
    check_mesh_works(&topo, &record, "after")?;
    ensure!(!topo.has_exited(new.pid), "new agent died");
    Ok(())
}

/// SIGTERM on the destination node's agent drains inbound HBONE tunnels too: a long-lived
/// cross-node connection opened before the signal keeps exchanging data until it ends, and the
/// agent exits only after it (within `proxy.drain_timeout`).
#[test]
fn sigterm_drains_inbound_hbone_tunnels() -> Result<()> {
    use mesh_tests::two_nodes::{Options, TwoNodes, ECHO_VIP as CROSS_VIP};
    let mesh = TwoNodes::start(Options::default())?;
    let topo = &mesh.topo;
    let client = topo.node(1).pod("client");
    let out = topo.workdir.join("hold-cross.json");
    let mut hold = Command::new(probe_binary()?);
    hold.args(["hold", CROSS_VIP, "held", "3"])
        .stdout(File::create(&out)?)
        .stderr(Stdio::inherit());
    let started = std::time::Instant::now();
    let hold_pid = topo.spawn_in_pod(client, &mut hold)?;
    std::thread::sleep(Duration::from_millis(700));

    topo.signal(mesh.agent2.pid, libc::SIGTERM)?;
    let status = topo.wait(mesh.agent2.pid, Duration::from_secs(15))?;
    let agent_exited_after = started.elapsed();
    ensure!(status.success(), "agent2 exit {status}");
    let held = topo.wait(hold_pid, Duration::from_secs(15))?;
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    ensure!(
        held.success() && report.contains("exchanges"),
        "the cross-node connection was cut by the drain: {report}"
    );
    ensure!(
        agent_exited_after >= Duration::from_millis(2500),
        "agent2 exited after {agent_exited_after:?}, before the tunnel it carried had ended"
    );
    Ok(())
}
