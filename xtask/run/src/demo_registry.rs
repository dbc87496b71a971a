//! `cargo xtask demo --registry etcd`: two nodes sharing a real etcd. The node files hold
//! bootstrap settings only; an operator applies the mesh state (the `echo` service, each node's
//! workloads and echo's authorization policy) once with `mesh-agent ctl apply`. Two instances of
//! `echo` on node 2 register themselves through the Consul-compatible API from inside their
//! pods; node 1 learns node 2 and the endpoints from etcd alone; one instance's health check
//! fails and traffic moves to the other, then it recovers. The registry's policy admits the
//! client and the kernel refuses the intruder, until a new policy applied on node 2 admits it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use mesh_tests::etcd::Etcd;
use mesh_tests::{Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";

pub fn run(backend: &str) -> Result<()> {
    if backend != "etcd" {
        bail!("--registry {backend:?}: the registry demo runs with etcd (--registry etcd)");
    }
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "intruder"])?;
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

    let registry = format!(
        "registry:\n  backend: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    lease_ttl: 3s\n",
        etcd.client_url
    );
    let agent1 = topo.start_agent(n1, &n1.agent_config(&registry), &[])?;
    topo.wait_ready(&agent1)?;
    let config2 = n2.agent_config(&format!(
        "{registry}identity:\n{}",
        topo.shared_ca_fields(n1)
    ));
    println!("-- node 2 config (bootstrap only: services, workloads, policy and nodes come from etcd) --\n{config2}");
    let agent2 = topo.start_agent(n2, &config2, &[])?;
    topo.wait_ready(&agent2)?;

    let mesh = format!(
        "services:\n  - name: echo\n    namespace: shop\n    vip: {ECHO_VIP}\n    policy: {{load_balancer: round_robin}}\n\
         workloads:\n  node-1:\n{}{}  node-2:\n{}    service: echo\n{}    service: echo\n{}",
        n1.pod("client").workload_yaml("shop", "client"),
        n1.pod("intruder").workload_yaml("shop", "intruder"),
        a.workload_yaml("shop", "echo"),
        b.workload_yaml("shop", "echo"),
        echo_callers(&["client"]),
    );
    println!("-- mesh.yaml, applied once for the whole mesh --\n{mesh}");
    println!("$ mesh-agent ctl apply -f mesh.yaml   (on node 1)");
    print!("{}", ctl_apply(&topo, n1, "mesh.yaml", &mesh)?);

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
    traffic(&topo, "client", "both instances healthy")?;

    println!("\n-- stopping echo-a's health port: its TCP check fails --");
    topo.signal(health_a, libc::SIGKILL)?;
    wait_passing(&topo, &n1.netns, reg1, 1)?;
    show_catalog(&topo, &n1.netns, reg1)?;
    traffic(&topo, "client", "echo-a critical: traffic moved to echo-b")?;

    println!("\n-- echo-a's health port is back --");
    topo.serve_probe(a, 8081, "health")?;
    wait_passing(&topo, &n1.netns, reg1, 2)?;
    traffic(&topo, "client", "echo-a passing again")?;
    let (_, health) = topo.get_in_netns(&n1.netns, agent1.health, "/health")?;
    println!("\nnode 1 /health: {}", health.trim());

    println!("\n-- authorization from the registry: echo-callers admits only the client --");
    traffic(&topo, "client", "client (allowed)")?;
    traffic(&topo, "intruder", "intruder (kernel: EPERM at connect)")?;
    let policy = echo_callers(&["client", "intruder"]);
    println!("$ mesh-agent ctl apply -f policy.yaml   (on node 2)\n{policy}");
    ctl_apply(&topo, n2, "policy.yaml", &policy)?;
    let started = Instant::now();
    topo.wait_for(
        "node 1 to admit the intruder",
        Duration::from_secs(5),
        || Ok(topo.connect_from(n1.pod("intruder"), ECHO_VIP, "hi", 1)?[0].ok),
    )?;
    println!(
        "node 1 applied the new policy {:?} after the write",
        started.elapsed()
    );
    traffic(&topo, "intruder", "intruder (now on the allow-list)")?;
    Ok(())
}

/// A mesh document holding echo's authorization policy: exactly `callers` (service accounts
/// in namespace `shop`) may call it.
fn echo_callers(callers: &[&str]) -> String {
    let allow: String = callers
        .iter()
        .map(|sa| format!("      - from: spiffe://cluster.local/ns/shop/sa/{sa}\n"))
        .collect();
    format!("authorization:\n  - name: echo-callers\n    service: echo\n    allow:\n{allow}")
}

/// Runs `mesh-agent ctl apply` with `document` against `node`'s agent; returns its tables.
fn ctl_apply(topo: &Topology, node: &Node, name: &str, document: &str) -> Result<String> {
    let path = topo.state_dir(node).join(name);
    std::fs::write(&path, document)?;
    let binary = mesh_tests::topology::agent_binary()?;
    let path = path.display().to_string();
    let (status, out, err) = topo.run_in_node(node, &binary, &["ctl", "apply", "-f", &path])?;
    ensure!(status.success(), "ctl apply {name}: {out}{err}");
    Ok(out)
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

/// Six connects from node 1's pod `from` to echo's VIP, printed as replies or errors.
fn traffic(topo: &Topology, from: &str, title: &str) -> Result<()> {
    let pod = topo.node(1).pod(from);
    let attempts = topo.connect_from(pod, ECHO_VIP, "hi", 6)?;
    let replies: Vec<String> = attempts
        .iter()
        .map(|a| match (a.ok, a.errno) {
            (true, _) => a.reply.clone(),
            (false, Some(1)) => "EPERM".to_owned(),
            (false, _) => format!("FAILED({:?})", a.error),
        })
        .collect();
    println!("{title}: {from} -> {ECHO_VIP} x6: {replies:?}");
    Ok(())
}
