//! End-to-end: bounded resources. One calling identity cannot take the capture port's share of
//! every other caller; after a soak of 10,000 proxied connections the agent's fds and memory come
//! back down.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::http::metric;
use mesh_tests::topology::probe_binary;
use mesh_tests::{Node, Pod, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";

fn config(node: &Node, limits: &str) -> String {
    node.agent_config(&format!(
        "services:\n  - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{}:8080\"]\n    policy:\n      allow: [\"namespace:demo\"]\n\
         workloads:\n{}{}{}",
        node.pod("server").ip,
        node.pod("hog").workload_yaml("demo", "hog"),
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("server").workload_yaml("demo", "server"),
    ))
    .replace("proxy:\n", &format!("proxy:\n{limits}"))
}

fn setup(limits: &str) -> Result<(Topology, mesh_tests::AgentHandle)> {
    let mut topo = Topology::new()?;
    topo.add_node(&["hog", "client", "server"])?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let agent = topo.start_agent(node, &config(node, limits), &[])?;
    topo.wait_ready(&agent)?;
    Ok((topo, agent))
}

#[derive(Debug, serde::Deserialize)]
struct Many {
    ok: usize,
    failed: usize,
}

/// Starts `meshprobe many` in `pod`; returns its summary once the connections are open (they
/// stay open for `hold_ms`) and the pid to wait for.
fn many(topo: &Topology, pod: &Pod, count: usize, hold_ms: u64) -> Result<(Many, u32)> {
    let out = topo
        .workdir
        .join(format!("many-{}-{}", pod.name, std::process::id()));
    let _ = std::fs::remove_file(&out);
    let mut command = Command::new(probe_binary()?);
    command
        .args(["many", ECHO_VIP, &count.to_string(), &hold_ms.to_string()])
        .stdout(File::create(&out)?)
        .stderr(Stdio::inherit());
    let pid = topo.spawn_in_pod(pod, &mut command)?;
    topo.wait_for("connections open", Duration::from_secs(120), || {
        Ok(std::fs::read_to_string(&out)?.contains('}'))
    })?;
    let summary = serde_json::from_str(std::fs::read_to_string(&out)?.trim())?;
    Ok((summary, pid))
}

#[test]
fn one_identity_cannot_take_the_share_of_others() -> Result<()> {
    let (topo, agent) = setup("  max_connections: 60\n  max_connections_per_identity: 20\n")?;
    let node = topo.node(1);
    let (hog, client) = (node.pod("hog"), node.pod("client"));

    let (flood, pid) = many(&topo, hog, 40, 3000)?;
    // While the hog holds its share, another identity still gets through, and /ready answers.
    let others = topo.connect_from(client, ECHO_VIP, "fair", 5)?;
    let ready = topo.in_netns(&agent.netns, || {
        mesh_tests::http::get(agent.health, "/ready")
    })?;
    topo.wait(pid, Duration::from_secs(30))?;
    eprintln!(
        "hog: {flood:?}; other identity: {} of 5 ok",
        others.iter().filter(|a| a.ok).count()
    );
    ensure!(
        flood.ok == 20 && flood.failed == 20,
        "per-identity cap not applied: {flood:?}"
    );
    ensure!(
        others.iter().all(|a| a.ok && a.reply == "srv:fair"),
        "{others:?}"
    );
    ensure!(ready.0 == 200, "/ready under load: {ready:?}");
    let m = topo.metrics(&agent)?;
    ensure!(
        metric(&m, "nodemesh_outbound_refused_total", &[]) == Some(20),
        "{m}"
    );
    Ok(())
}

#[test]
fn idle_captured_tcp_connections_close_after_the_idle_timeout() -> Result<()> {
    let (topo, agent) = setup("  idle_timeout: 1s\n")?;
    let hog = topo.node(1).pod("hog");
    // Three relayed connections that exchange one byte, then stay silent for 20 s.
    let (held, pid) = many(&topo, hog, 3, 20_000)?;
    ensure!(held.ok == 3, "connections: {held:?}");
    let active = || -> Result<Option<u64>> {
        Ok(metric(
            &topo.metrics(&agent)?,
            "nodemesh_outbound_active_connections",
            &[],
        ))
    };
    topo.wait_for("idle relays closed", Duration::from_secs(8), || {
        Ok(active()? == Some(0))
    })?;
    // The agent closed them, not the client: it is still holding its connections.
    ensure!(
        !topo.has_exited(pid),
        "the client exited before the idle cut"
    );
    topo.signal(pid, libc::SIGKILL)?;
    Ok(())
}

/// VmRSS in KiB and the number of open fds of a process.
fn rss_and_fds(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

#[test]
fn fds_and_memory_come_back_after_a_10000_connection_soak() -> Result<()> {
    const ROUNDS: usize = 5;
    const CONCURRENT: usize = 2000;
    let (topo, agent) = setup("")?;
    let node = topo.node(1);
    let hog = node.pod("hog");
    // Warm up (thread pools, TLS, allocator arenas) before the baseline.
    let (warm, pid) = many(&topo, hog, 200, 0)?;
    topo.wait(pid, Duration::from_secs(30))?;
    ensure!(warm.ok == 200, "warm-up: {warm:?}");
    std::thread::sleep(Duration::from_millis(500));
    let (rss_before, fds_before) = rss_and_fds(agent.pid)?;

    let mut peak = (0, 0);
    for _ in 0..ROUNDS {
        let (round, pid) = many(&topo, hog, CONCURRENT, 300)?;
        let now = rss_and_fds(agent.pid)?;
        peak = (peak.0.max(now.0), peak.1.max(now.1));
        topo.wait(pid, Duration::from_secs(60))?;
        ensure!(round.ok == CONCURRENT, "soak round: {round:?}");
    }
    topo.wait_for("connections closed", Duration::from_secs(20), || {
        Ok(rss_and_fds(agent.pid)?.1 <= fds_before + 4)
    })?;
    // The agent trims its allocator once connections have drained (checked every 2 s).
    let _ = topo.wait_for("RSS back down", Duration::from_secs(10), || {
        Ok(rss_and_fds(agent.pid)?.0 * 100 <= rss_before * 120)
    });
    let (rss_after, fds_after) = rss_and_fds(agent.pid)?;
    eprintln!(
        "soak of {} connections ({CONCURRENT} at once): RSS {rss_before} KiB before, {} KiB peak, {rss_after} KiB after; fds {fds_before} before, {} peak, {fds_after} after",
        ROUNDS * CONCURRENT,
        peak.0,
        peak.1
    );
    ensure!(
        fds_after <= fds_before + 4,
        "fds leaked: {fds_before} -> {fds_after}"
    );
    ensure!(
        rss_after * 100 <= rss_before * 120,
        "RSS not returned: {rss_before} KiB -> {rss_after} KiB (peak {} KiB)",
        peak.0
    );
    Ok(())
}
