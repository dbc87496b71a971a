//! `cargo xtask bench`: new-connection rate and latency through the real data path, in network
//! namespaces on this machine. Each scenario runs `meshprobe bench` inside a pod (connect, 1 byte
//! each way, close) for a fixed time with a fixed number of workers.

use anyhow::{Context, Result};
use mesh_tests::topology::probe_binary;
use mesh_tests::Topology;

const SECONDS: &str = "5";
const WORKERS: &str = "4";
const VIP: &str = "10.96.0.10:80";

pub fn run() -> Result<()> {
    let mut topo =
        Topology::new().context("the benchmark creates network namespaces: run it as root")?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    let (client, server) = (node.pod("client"), node.pod("server"));
    topo.start_echo_server(server, 8080, "s")?;
    let config = node.agent_config(&format!(
        "services:\n  - name: echo\n    vip: {VIP}\n    endpoints: [\"{}:8080\"]\nworkloads:\n{}{}",
        server.ip,
        client.workload_yaml("bench", "client"),
        server.workload_yaml("bench", "server"),
    ));
    let agent = topo.start_agent(node, &config, &[("NODEMESH_LOG", "warn")])?;
    topo.wait_ready(&agent)?;

    let probe = probe_binary()?;
    let probe = probe.to_string_lossy();
    let direct = format!("{}:8080", server.ip);
    let scenarios = [
        (
            "plain TCP, pod -> pod (connect4 pass-through)",
            direct.as_str(),
        ),
        ("through the agent, pod -> VIP -> agent -> pod", VIP),
    ];
    println!("| scenario | conn/s | p50 µs | p99 µs | errors |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, target) in scenarios {
        let out = topo.run_in_pod(client, &probe, &["bench", target, SECONDS, WORKERS])?;
        let v = parse(&out)?;
        println!("| {name} | {:.0} | {} | {} | {} |", v.0, v.1, v.2, v.3);
    }
    Ok(())
}

/// (conn/s, p50, p99, errors) from meshprobe's JSON line, without a JSON dependency in xtask.
fn parse(line: &str) -> Result<(f64, u64, u64, u64)> {
    let field = |name: &str| -> Result<f64> {
        let start = line
            .find(&format!("\"{name}\":"))
            .with_context(|| format!("no {name} in {line}"))?
            + name.len()
            + 3;
        let rest = &line[start..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Ok(rest[..end].trim().parse()?)
    };
    Ok((
        field("connections_per_second")?,
        field("p50_us")? as u64,
        field("p99_us")? as u64,
        field("errors")? as u64,
    ))
}
