//! `cargo xtask demo --registry etcd`: two nodes sharing a real etcd. Two instances of `echo` on
//! node 2 register themselves through the Consul-compatible API from inside their pods; node 1
//! learns node 2 and the endpoints from etcd alone; one instance's health check fails and
//! traffic moves to the other, then it recovers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mesh_tests::etcd::Etcd;
use mesh_tests::Topology;

const ECHO_VIP: &str = "10.96.0.10:80";

pub fn run(backend: &str) -> Result<()> {
    if backend != "etcd" {
        bail!("--registry {backend:?}: the registry demo runs with etcd (--registry etcd)");
    }
    let mut topo = Topology::new()?;
    topo.add_node(&["client"])?;
    topo.add_node(&["echo-a", "echo-b"])?;
    topo.link_nodes(1, 2)?;
    let (n1, n2) = (topo.node(1), topo.node(2));
    let etcd = Etcd::start(&topo, n1, n1.agent_ip, 23790)?;
    println!(
        "== etcd running at {} (inside node 1's namespace)",
        etcd.client_url
    );
    let (a, b) = (n2.pod("echo-a"), n2.pod("echo-b"));
    for (pod, name) in [(a, "a"), (b, "b")] {
        topo.serve_probe(pod, 8080, name)?;
    }
    let health_a = topo.serve_probe(a, 8081, "health")?;
    topo.serve_probe(b, 8081, "health")?;

    let common = format!(
        "services:\n  - name: echo\n    namespace: shop\n    vip: {ECHO_VIP}\n    policy: {{load_balancer: round_robin}}\n\
         authorization:\n  - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from: spiffe://cluster.local/ns/shop/sa/client\n\
         registry:\n  backend: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    lease_ttl: 3s\n",
        etcd.client_url
    );
    let config1 = n1.agent_config(&format!(
        "{common}workloads:\n{}",
        n1.pod("client").workload_yaml("shop", "client")
    ));
    let agent1 = topo.start_agent(n1, &config1, &[])?;
    topo.wait_ready(&agent1)?;
    let ca = topo.state_dir(n1);
    let config2 = n2.agent_config(&format!(
        "{common}workloads:\n{}    service: echo\n{}    service: echo\nidentity:\n  ca_cert: {}\n  ca_key: {}\n",
        a.workload_yaml("shop", "echo"),
        b.workload_yaml("shop", "echo"),
        ca.join("ca.crt").display(),
        ca.join("ca.key").display()
    ));
    println!("-- node 2 config (no `nodes:`, no endpoints: both come from etcd) --\n{config2}");
    let agent2 = topo.start_agent(n2, &config2, &[])?;
    topo.wait_ready(&agent2)?;

    let reg2 = format!("http://{}:8500", n2.agent_ip);
    for (pod, id) in [(a, "echo-a"), (b, "echo-b")] {
        let body = format!(
            r#"{{"Name":"echo","ID":"{id}","Port":8080,"Tags":["demo"],"Meta":{{"service_version":"1.0.0","service_type":"tcp","environment":"demo"}},"Check":{{"TCP":"{}:8081","Interval":"500ms","Timeout":"1s"}}}}"#,
            pod.ip
        );
        let (status, text) = topo.curl_in_pod(
            pod,
            "PUT",
            &format!("{reg2}/v1/agent/service/register"),
            &body,
        )?;
        println!("{id}: PUT /v1/agent/service/register -> {status} {text}");
    }
    let reg1 = SocketAddr::from((n1.agent_ip, 8500));
    wait_passing(&topo, &n1.netns, reg1, 2)?;
    show_catalog(&topo, &n1.netns, reg1)?;
    traffic(&topo, "both instances healthy")?;

    println!("\n-- stopping echo-a's health port: its TCP check fails --");
    topo.signal(health_a, libc::SIGKILL)?;
    wait_passing(&topo, &n1.netns, reg1, 1)?;
    show_catalog(&topo, &n1.netns, reg1)?;
    traffic(&topo, "echo-a critical: traffic moved to echo-b")?;

    println!("\n-- echo-a's health port is back --");
    topo.serve_probe(a, 8081, "health")?;
    wait_passing(&topo, &n1.netns, reg1, 2)?;
    traffic(&topo, "echo-a passing again")?;
    let (_, health) = topo.get_in_netns(&n1.netns, agent1.health, "/health")?;
    println!("\nnode 1 /health: {}", health.trim());
    Ok(())
}

fn wait_passing(topo: &Topology, netns: &str, reg: SocketAddr, want: usize) -> Result<()> {
    let started = Instant::now();
    topo.wait_for("passing instances", Duration::from_secs(10), || {
        let (_, body) = topo.get_in_netns(netns, reg, "/v1/health/service/echo?passing")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v.as_array().map_or(0, Vec::len) == want)
    })?;
    println!(
        "node 1 sees {want} passing instance(s) of echo after {:?}",
        started.elapsed()
    );
    Ok(())
}

fn show_catalog(topo: &Topology, netns: &str, reg: SocketAddr) -> Result<()> {
    let (_, body) = topo.get_in_netns(netns, reg, "/v1/health/service/echo")?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    println!("GET /v1/health/service/echo on node 1:");
    for e in v.as_array().into_iter().flatten() {
        let status = e["Checks"][0]["Status"].as_str().unwrap_or("?");
        println!(
            "  {} {}:{} node {} -> {status}",
            e["Service"]["ID"].as_str().unwrap_or("?"),
            e["Service"]["Address"].as_str().unwrap_or("?"),
            e["Service"]["Port"],
            e["Node"]["Node"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

fn traffic(topo: &Topology, title: &str) -> Result<()> {
    let client = topo.node(1).pod("client");
    let attempts = topo.connect_from(client, ECHO_VIP, "hi", 6)?;
    let replies: Vec<String> = attempts
        .iter()
        .map(|a| {
            if a.ok {
                a.reply.clone()
            } else {
                format!("FAILED({:?})", a.error)
            }
        })
        .collect();
    println!("{title}: client -> {ECHO_VIP} x6: {replies:?}");
    Ok(())
}
