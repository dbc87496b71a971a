//! Service registry end to end: two agents sharing a real etcd, registrations through the
//! Consul-compatible API from inside pods, TTL heartbeats, identity checks on writes, etcd
//! restarts served from the cache, and the seeds' flow through the real py-consul client.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::etcd::Etcd;
use mesh_tests::{Node, Pod, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const ECHO_PORT: u16 = 8080;
const ETCD_PORT: u16 = 23790;

fn curl(topo: &Topology, pod: &Pod, method: &str, url: &str, body: &str) -> Result<(u16, String)> {
    topo.curl_in_pod(pod, method, url, body)
}

fn node_get(topo: &Topology, netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    topo.get_in_netns(netns, addr, path)
}

fn passing_echo(topo: &Topology, netns: &str, registry: SocketAddr) -> Result<usize> {
    let (status, body) = node_get(topo, netns, registry, "/v1/health/service/echo?passing")?;
    if status != 200 {
        bail!("health query answered {status}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v.as_array().map_or(0, Vec::len))
}

/// `pod` registers itself as echo-1 with a TTL check and sends its first heartbeat.
fn register_passing_echo(topo: &Topology, pod: &Pod, registry: &str, ttl: &str) -> Result<()> {
    let (status, body) = curl(
        topo,
        pod,
        "PUT",
        &format!("{registry}/v1/agent/service/register"),
        &echo_registration(ttl, &pod.ip.to_string()),
    )?;
    ensure!(status == 200, "register answered {status}: {body}");
    let (status, body) = curl(
        topo,
        pod,
        "PUT",
        &format!("{registry}/v1/agent/check/pass/service:echo-1"),
        "",
    )?;
    ensure!(status == 200, "heartbeat answered {status}: {body}");
    Ok(())
}

/// `pod` deregisters its instance `id` through the agent API at `registry`; returns the status.
fn deregister(topo: &Topology, pod: &Pod, registry: &str, id: &str) -> Result<u16> {
    let url = format!("{registry}/v1/agent/service/deregister/{id}");
    Ok(curl(topo, pod, "PUT", &url, "")?.0)
}

/// Node config for `echo` served by pods `sa` and `sb` with the service policy `policy`, only
/// `client` allowed to call it.
fn echo_pair_config(node: &Node, policy: &str) -> String {
    node.agent_config(&format!(
        "services:\n  - name: echo\n    namespace: shop\n    vip: {ECHO_VIP}\n    policy: {{{policy}}}\nworkloads:\n{}{}    service: echo\n{}    service: echo\n\
         authorization:\n  - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from_service: client\n",
        node.pod("client").workload_yaml("shop", "client"),
        node.pod("sa").workload_yaml("shop", "server"),
        node.pod("sb").workload_yaml("shop", "server"),
    ))
}

/// Pods `a` and `b` register as echo-a and echo-b (no Address: the caller's own address is
/// used) with the active check `check(pod ip)`; returns the registry address once both pass.
fn register_checked_echo_pair(
    topo: &Topology,
    node: &Node,
    pods: [&Pod; 2],
    service_type: &str,
    check: impl Fn(std::net::Ipv4Addr) -> String,
) -> Result<SocketAddr> {
    let reg = format!("http://{}:8500", node.agent_ip);
    for (pod, id) in pods.into_iter().zip(["echo-a", "echo-b"]) {
        let body = format!(
            r#"{{"Name":"echo","ID":"{id}","Port":{ECHO_PORT},"Meta":{{"service_version":"1","service_type":"{service_type}","environment":"test"}},"Check":{}}}"#,
            check(pod.ip)
        );
        let (status, text) = curl(
            topo,
            pod,
            "PUT",
            &format!("{reg}/v1/agent/service/register"),
            &body,
        )?;
        ensure!(status == 200, "register {id} answered {status}: {text}");
    }
    let registry = SocketAddr::from((node.agent_ip, 8500));
    topo.wait_for("both instances passing", Duration::from_secs(5), || {
        Ok(passing_echo(topo, &node.netns, registry)? == 2)
    })?;
    Ok(registry)
}

fn echo_registration(ttl: &str, server_ip: &str) -> String {
    format!(
        r#"{{"Name":"echo","ID":"echo-1","Address":"{server_ip}","Port":{ECHO_PORT},"Tags":["v1"],
            "Meta":{{"service_version":"1.0.0","service_type":"tcp","environment":"test","zone":"zone-b"}},
            "Check":{{"TTL":"{ttl}","DeregisterCriticalServiceAfter":"1m"}}}}"#
    )
}

/// One sample of the agent's metric `name` with `labels`, scraped now.
fn agent_metric(
    topo: &Topology,
    agent: &mesh_tests::AgentHandle,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<Option<u64>> {
    Ok(mesh_tests::http::metric(
        &topo.metrics(agent)?,
        name,
        labels,
    ))
}

#[test]
fn etcd_registry_across_two_nodes() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client"])?;
    topo.add_node(&["server", "intruder"])?;
    topo.link_nodes(1, 2)?;
    let (n1, n2) = (topo.node(1), topo.node(2));
    let mut etcd = Etcd::start(&topo, n1, n1.agent_ip, ETCD_PORT)?;
    let server = n2.pod("server");
    topo.start_echo_server(server, ECHO_PORT, "srv")?;
    let registry_block = format!(
        "registry:\n  backend: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    lease_ttl: 3s\n",
        etcd.client_url
    );
    let authz = "authorization:\n  - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from: spiffe://cluster.local/ns/shop/sa/client\n";
    let service = format!("services:\n  - name: echo\n    namespace: shop\n    vip: {ECHO_VIP}\n");
    // No `nodes:` anywhere: each node learns the other from the registry.
    let config1 = n1.agent_config(&format!(
        "{service}workloads:\n{}{authz}{registry_block}",
        n1.pod("client").workload_yaml("shop", "client"),
    ));
    let agent1 = topo.start_agent(n1, &config1, &[])?;
    topo.wait_ready(&agent1)?;
    let config2 = n2.agent_config(&format!(
        "{service}workloads:\n{}    service: echo\n{}{authz}{registry_block}identity:\n{}",
        server.workload_yaml("shop", "server"),
        n2.pod("intruder").workload_yaml("shop", "intruder"),
        topo.shared_ca_fields(n1),
    ));
    let agent2 = topo.start_agent(n2, &config2, &[])?;
    topo.wait_ready(&agent2)?;
    let cert_changes = |agent: &mesh_tests::AgentHandle| {
        agent_metric(&topo, agent, "nodemesh_identity_cert_changes_total", &[])
    };
    let certs_before = cert_changes(&agent1)?;
    assert!(certs_before.is_some());
    let services_writes = map_writes(&topo.metrics(&agent1)?, "SERVICES");
    let reg1 = SocketAddr::from((n1.agent_ip, 8500));
    let reg2 = format!("http://{}:8500", n2.agent_ip);
    let client = n1.pod("client");
    let intruder = n2.pod("intruder");
    let echo = |text: &str| -> Result<bool> {
        let attempts =
            topo.connect_from_with_timeout(client, ECHO_VIP, text, 1, Duration::from_secs(3))?;
        Ok(attempts
            .iter()
            .all(|a| a.ok && a.reply == format!("srv:{text}")))
    };

    // Bad records are refused with the field named; nothing is registered.
    let (status, body) = curl(
        &topo,
        server,
        "PUT",
        &format!("{reg2}/v1/agent/service/register"),
        &echo_registration("3s", &server.ip.to_string()).replace(r#""environment":"test","#, ""),
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Meta.environment"), "{body}");
    let (status, body) = curl(
        &topo,
        server,
        "PUT",
        &format!("{reg2}/v1/agent/service/register"),
        &echo_registration("3s", &server.ip.to_string())
            .replace(r#""ID":"echo-1""#, r#""ID":"Echo_1""#),
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("`ID`"), "{body}");

    // A pod cannot register under another identity's service.
    let (status, body) = curl(
        &topo,
        intruder,
        "PUT",
        &format!("{reg2}/v1/agent/service/register"),
        &echo_registration("3s", &intruder.ip.to_string()),
    )?;
    assert_eq!(status, 403, "{body}");
    assert!(agent2.log_text().contains("registry request refused"));

    // The server registers itself with a TTL check and heartbeats: node 1 sees it within 1 s.
    register_passing_echo(&topo, server, &reg2, "3s")?;
    let started = Instant::now();
    while passing_echo(&topo, &n1.netns, reg1)? == 0 {
        if started.elapsed() > Duration::from_secs(1) {
            bail!("node 1 did not see the registration within 1 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "registration visible on the other node after {:?}",
        started.elapsed()
    );
    // Routed over HBONE to a node that only the registry announced.
    assert!(echo("hello")?, "client reaches the registered endpoint");

    // Reads follow the allow-lists: the client may look echo up, the intruder may not.
    let (status, body) = curl(
        &topo,
        client,
        "GET",
        &format!("http://{}:8500/v1/health/service/echo", n1.agent_ip),
        "",
    )?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("echo-1"), "{body}");
    let (status, _) = curl(
        &topo,
        intruder,
        "GET",
        &format!("{reg2}/v1/health/service/echo"),
        "",
    )?;
    assert_eq!(status, 403, "the intruder is not on echo's allow-list");
    let (_, body) = curl(
        &topo,
        intruder,
        "GET",
        &format!("{reg2}/v1/catalog/services"),
        "",
    )?;
    assert!(
        !body.contains("echo"),
        "catalog listing filtered by the allow-list: {body}"
    );

    // The intruder can neither heartbeat nor deregister the server's instance.
    let (status, _) = curl(
        &topo,
        intruder,
        "PUT",
        &format!("{reg2}/v1/agent/check/fail/service:echo-1"),
        "",
    )?;
    assert_eq!(status, 403);
    let status = deregister(&topo, intruder, &reg2, "echo-1")?;
    assert_eq!(status, 403);

    // etcd dies: routing continues from the cache, /health says extend-cache.
    etcd.kill(&topo)?;
    topo.wait_for("extend-cache in /health", Duration::from_secs(5), || {
        let (_, body) = node_get(&topo, &n1.netns, agent1.health, "/health")?;
        Ok(body.contains("extend-cache"))
    })?;
    curl(
        &topo,
        server,
        "PUT",
        &format!("{reg2}/v1/agent/check/pass/service:echo-1"),
        "",
    )?;
    assert!(
        echo("cached")?,
        "routing continues from the cache while etcd is down"
    );
    etcd.restart(&topo, n1)?;
    topo.wait_for("node 1 back in sync", Duration::from_secs(10), || {
        let (_, body) = node_get(&topo, &n1.netns, agent1.health, "/health")?;
        Ok(body.contains("\"cache\":\"fresh\""))
    })?;
    curl(
        &topo,
        server,
        "PUT",
        &format!("{reg2}/v1/agent/check/pass/service:echo-1"),
        "",
    )?;
    assert_eq!(
        passing_echo(&topo, &n1.netns, reg1)?,
        1,
        "no registration lost"
    );
    assert!(echo("after-restart")?);

    // Heartbeats stop: after the TTL the instance is critical and out of routing.
    topo.wait_for("TTL expiry seen on node 1", Duration::from_secs(6), || {
        Ok(passing_echo(&topo, &n1.netns, reg1)? == 0)
    })?;
    assert!(!echo("expired")?, "a critical instance is not routed");
    // A heartbeat (the newer update form, with output) brings it back.
    let (status, body) = curl(
        &topo,
        server,
        "PUT",
        &format!("{reg2}/v1/agent/check/update/service:echo-1"),
        r#"{"Status":"passing","Output":"back"}"#,
    )?;
    assert_eq!(status, 200, "{body}");
    topo.wait_for("instance passing again", Duration::from_secs(2), || {
        Ok(passing_echo(&topo, &n1.netns, reg1)? == 1)
    })?;
    assert!(echo("back")?);

    // Endpoint churn did not touch the kernel maps or certificates: one config generation.
    let m = topo.metrics(&agent1)?;
    assert_eq!(
        mesh_tests::http::metric(&m, "nodemesh_config_generation", &[]),
        Some(1)
    );
    assert_eq!(
        cert_changes(&agent1)?,
        certs_before,
        "no certificate re-issued"
    );
    assert!(mesh_tests::http::metric(&m, "nodemesh_registry_updates_total", &[]).unwrap_or(0) >= 3);
    assert_eq!(
        map_writes(&m, "SERVICES"),
        services_writes,
        "churn wrote no SERVICES entry"
    );
    assert!(
        map_writes(&m, "ENDPOINTS") >= 3,
        "churn wrote the endpoint entry (added, removed on expiry, added back)"
    );

    // The owner deregisters: gone everywhere.
    let status = deregister(&topo, server, &reg2, "echo-1")?;
    assert_eq!(status, 200);
    topo.wait_for(
        "deregistration seen on node 1",
        Duration::from_secs(1),
        || {
            let (_, body) = node_get(&topo, &n1.netns, reg1, "/v1/catalog/service/echo")?;
            Ok(body.trim() == "[]")
        },
    )?;

    // SIGTERM on node 2: its node record and hosted instances leave the registry at once.
    let (status, _) = curl(
        &topo,
        server,
        "PUT",
        &format!("{reg2}/v1/agent/service/register"),
        &echo_registration("30s", &server.ip.to_string()),
    )?;
    assert_eq!(status, 200);
    topo.wait_for("re-registration on node 1", Duration::from_secs(1), || {
        let (_, body) = node_get(&topo, &n1.netns, reg1, "/v1/catalog/service/echo")?;
        Ok(body.contains("echo-1"))
    })?;
    topo.signal(agent2.pid, libc::SIGTERM)?;
    topo.wait(agent2.pid, Duration::from_secs(10))?;
    let (_, body) = node_get(&topo, &n1.netns, reg1, "/v1/catalog/service/echo")?;
    assert_eq!(
        body.trim(),
        "[]",
        "deregistered on SIGTERM, not after the lease TTL"
    );
    let (_, health) = node_get(&topo, &n1.netns, agent1.health, "/health")?;
    assert!(
        health.contains("\"nodes\":1"),
        "node-2 left the registry: {health}"
    );
    Ok(())
}

fn serve(topo: &Topology, pod: &Pod, port: u16, name: &str) -> Result<u32> {
    topo.serve_probe(pod, port, name)
}

#[test]
fn failing_active_check_moves_traffic_without_failed_requests() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "sa", "sb"])?;
    let n1 = topo.node(1);
    let (client, sa, sb) = (n1.pod("client"), n1.pod("sa"), n1.pod("sb"));
    serve(&topo, sa, ECHO_PORT, "a")?;
    serve(&topo, sb, ECHO_PORT, "b")?;
    // A separate health port: failing it takes `a` out of routing while it still serves.
    let health_a = serve(&topo, sa, 8081, "health")?;
    serve(&topo, sb, 8081, "health")?;
    let config = echo_pair_config(n1, "load_balancer: round_robin");
    let agent = topo.start_agent(n1, &config, &[])?;
    topo.wait_ready(&agent)?;
    let registry = register_checked_echo_pair(&topo, n1, [sa, sb], "tcp", |ip| {
        format!(r#"{{"TCP":"{ip}:8081","Interval":"200ms","Timeout":"1s"}}"#)
    })?;
    let round = |seen: &mut Vec<String>| -> Result<()> {
        for a in topo.connect_from(client, ECHO_VIP, "x", 4)? {
            assert!(a.ok, "request failed: {a:?}");
            seen.push(a.reply);
        }
        Ok(())
    };
    let mut seen = Vec::new();
    round(&mut seen)?;
    assert!(
        seen.contains(&"a:x".to_owned()) && seen.contains(&"b:x".to_owned()),
        "{seen:?}"
    );

    topo.signal(health_a, libc::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut seen = Vec::new();
        round(&mut seen)?;
        if seen.iter().all(|r| r == "b:x") && passing_echo(&topo, &n1.netns, registry)? == 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("traffic did not leave the failing instance: {seen:?}");
        }
    }
    let mut seen = Vec::new();
    round(&mut seen)?;
    assert!(
        seen.iter().all(|r| r == "b:x"),
        "critical instance not routed: {seen:?}"
    );

    // Healthy again: it comes back.
    serve(&topo, sa, 8081, "health")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut seen = Vec::new();
        round(&mut seen)?;
        if seen.contains(&"a:x".to_owned()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the recovered instance did not come back: {seen:?}");
        }
    }

    // A config reload goes through the same reconciler: registered endpoints survive it.
    let reloaded = config.replace(
        "workloads:",
        "  - name: other\n    namespace: shop\n    vip: 10.96.0.99:80\nworkloads:",
    );
    std::fs::write(topo.config_path(n1), reloaded)?;
    topo.wait_for("reload applied", Duration::from_secs(5), || {
        Ok(topo.reloads(&agent, "ok")? == 1)
    })?;
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let (_, endpoints) = node_get(&topo, &n1.netns, admin, "/endpoints/echo")?;
    for pod in [sa, sb] {
        assert!(
            endpoints.contains(&format!("{}:{ECHO_PORT}", pod.ip)),
            "{endpoints}"
        );
    }
    let (_, all) = node_get(&topo, &n1.netns, admin, "/endpoints")?;
    assert!(
        all.contains("\"other\""),
        "the new service is there too: {all}"
    );
    Ok(())
}

/// py-consul from PyPI, installed here (idempotent) so a fresh machine and CI have it.
fn ensure_py_consul() -> Result<()> {
    let ok = Command::new("python3")
        .args(["-c", "import consul"])
        .status()?
        .success();
    if !ok {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "py-consul"])
            .status()?;
        if !status.success() {
            bail!("pip install py-consul failed");
        }
    }
    Ok(())
}

const SEED_FLOW: &str = r#"
import sys, threading, time, consul
c = consul.Consul(host=sys.argv[1], port=8500)
meta = {"service_version": "2.1.0", "service_type": "http", "environment": "prod", "zone": "zone-a"}
assert c.agent.service.register("wallet", service_id="wallet-1", address=sys.argv[2], port=9000,
    tags=["primary"], meta=meta, check=consul.Check.ttl("10s"))
assert c.agent.check.ttl_pass("service:wallet-1", "ready")
index, nodes = c.health.service("wallet", passing=True)
assert len(nodes) == 1 and nodes[0]["Service"]["ID"] == "wallet-1", nodes
assert nodes[0]["Service"]["Meta"]["zone"] == "zone-a"
index2, nodes = c.health.service("wallet", passing=True, tag="other")
assert nodes == [], nodes
# A blocking query with nothing changing waits for `wait`.
t = time.time()
index2, _ = c.health.service("wallet", index=index, wait="1s")
assert time.time() - t >= 0.9 and index2 == index, (time.time() - t, index, index2)
# A change wakes it at once.
threading.Timer(0.3, lambda: c.agent.check.ttl_fail("service:wallet-1", "draining")).start()
t = time.time()
index3, nodes = c.health.service("wallet", index=index, wait="10s")
assert time.time() - t < 5 and int(index3) > int(index), (index, index3)
assert c.health.service("wallet", passing=True)[1] == []
_, services = c.catalog.services()
assert "wallet" in services and services["wallet"] == ["primary"], services
assert "wallet-1" in c.agent.services()
assert c.agent.service.deregister("wallet-1")
assert "wallet" not in c.catalog.services()[1]
print("seed flow ok")
"#;

#[test]
fn py_consul_seed_flow_on_embedded_registry() -> Result<()> {
    ensure_py_consul()?;
    let mut topo = Topology::new()?;
    topo.add_node(&["app"])?;
    let n1 = topo.node(1);
    let app = n1.pod("app");
    let config = n1.agent_config(&format!(
        "services:\n  - name: wallet\n    namespace: shop\n    vip: 10.96.0.20:80\nworkloads:\n{}    service: wallet\n\
         authorization:\n  - name: wallet-callers\n    service: wallet\n    default: deny\n    allow:\n      - from_service: wallet\n",
        app.workload_yaml("shop", "app"),
    ));
    let agent = topo.start_agent(n1, &config, &[])?;
    topo.wait_ready(&agent)?;
    let out = topo.run_in_pod(
        app,
        "python3",
        &[
            "-c",
            SEED_FLOW,
            &n1.agent_ip.to_string(),
            &app.ip.to_string(),
        ],
    )?;
    assert!(out.contains("seed flow ok"), "{out}");

    // Embedded backend: a registration survives an agent restart.
    let reg = format!("http://{}:8500", n1.agent_ip);
    let body = r#"{"Name":"wallet","ID":"wallet-2","Port":9000,"Meta":{"service_version":"1","service_type":"http","environment":"prod"}}"#;
    let (status, text) = curl(
        &topo,
        app,
        "PUT",
        &format!("{reg}/v1/agent/service/register"),
        body,
    )?;
    assert_eq!(status, 200, "{text}");
    topo.signal(agent.pid, libc::SIGTERM)?;
    topo.wait(agent.pid, Duration::from_secs(10))?;
    let agent = topo.start_agent(n1, &config, &[])?;
    topo.wait_ready(&agent)?;
    let (_, services) = node_get(
        &topo,
        &n1.netns,
        SocketAddr::from((n1.agent_ip, 8500)),
        "/v1/agent/services",
    )?;
    assert!(
        services.contains("wallet-2"),
        "restored after restart: {services}"
    );
    // The served OpenAPI document is the file in docs/.
    let (status, served) = node_get(
        &topo,
        &n1.netns,
        SocketAddr::from((n1.agent_ip, 8500)),
        "/v1/openapi.json",
    )?;
    assert_eq!(status, 200);
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/registry-openapi.json"
    ))?;
    assert_eq!(
        served, file,
        "served OpenAPI equals docs/registry-openapi.json"
    );
    Ok(())
}

/// Runs `mesh-agent ctl <args>` in a node (its admin port is on the node's loopback).
fn ctl(topo: &Topology, node: &Node, args: &[&str]) -> Result<(bool, String)> {
    let mut full = vec!["ctl"];
    full.extend_from_slice(args);
    let binary = mesh_tests::topology::agent_binary()?;
    let (status, out, err) = topo.run_in_node(node, &binary, &full)?;
    Ok((status.success(), format!("{out}{err}")))
}

/// Two linked nodes (pods `client` and `intruder` on node 1, `server` serving echo on node 2)
/// whose agents share an etcd on `etcd_port` and hold bootstrap settings only: no services,
/// workloads or nodes in either file.
fn bootstrap_only_pair(
    topo: &mut Topology,
    etcd_port: u16,
) -> Result<(Etcd, mesh_tests::AgentHandle, mesh_tests::AgentHandle)> {
    topo.add_node(&["client", "intruder"])?;
    topo.add_node(&["server"])?;
    topo.link_nodes(1, 2)?;
    let (n1, n2) = (topo.node(1), topo.node(2));
    let etcd = Etcd::start(topo, n1, n1.agent_ip, etcd_port)?;
    topo.start_echo_server(n2.pod("server"), ECHO_PORT, "srv")?;
    let registry_block = format!(
        "registry:\n  backend: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    lease_ttl: 3s\n",
        etcd.client_url
    );
    let agent1 = topo.start_agent(n1, &n1.agent_config(&registry_block), &[])?;
    topo.wait_ready(&agent1)?;
    let config2 = n2.agent_config(&format!(
        "{registry_block}identity:\n{}",
        topo.shared_ca_fields(n1)
    ));
    let agent2 = topo.start_agent(n2, &config2, &[])?;
    topo.wait_ready(&agent2)?;
    Ok((etcd, agent1, agent2))
}

/// An operator defines a service (VIP, allow-list) and each node's workloads once, in etcd,
/// through node 1's admin port; node 2 attaches to its workload from the registry and every
/// agent applies the service: the allowed caller reaches it, the other gets EPERM in the
/// kernel. A bad document is refused whole with the field named; deleting takes it away.
#[test]
fn mesh_state_defined_once_in_etcd_applies_on_every_node() -> Result<()> {
    const VIP: &str = "10.96.0.11:80";
    let mut topo = Topology::new()?;
    let (_etcd, agent1, agent2) = bootstrap_only_pair(&mut topo, ETCD_PORT + 1)?;
    let (n1, n2) = (topo.node(1), topo.node(2));
    let server = n2.pod("server");

    let document = |allow: &str| {
        format!(
            "services:\n  - name: echo\n    namespace: shop\n    vip: {VIP}\n    policy: {{allow: [{allow}]}}\n\
             workloads:\n  {}:\n{}{}  {}:\n{}    service: echo\n",
            "node-1",
            n1.pod("client").workload_yaml("shop", "client"),
            n1.pod("intruder").workload_yaml("shop", "intruder"),
            "node-2",
            server.workload_yaml("shop", "server"),
        )
    };
    let dir = topo.state_dir(n1);
    let bad = dir.join("bad-mesh.yaml");
    std::fs::write(&bad, document("Not_A_Label"))?;
    let (ok, out) = ctl(&topo, n1, &["apply", "-f", &bad.display().to_string()])?;
    assert!(!ok, "a bad document is refused: {out}");
    assert!(
        out.contains("services[0].policy.allow[0]") && out.contains("\"echo\""),
        "the error names the object and the field: {out}"
    );
    let (_, listed) = ctl(&topo, n1, &["-o", "json", "mesh"])?;
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    assert_eq!(listed["services"], serde_json::json!([]), "nothing written");
    assert_eq!(
        listed["workloads"],
        serde_json::json!([]),
        "nothing written"
    );

    let good = dir.join("mesh.yaml");
    std::fs::write(&good, document("client"))?;
    let (ok, out) = ctl(&topo, n1, &["apply", "-f", &good.display().to_string()])?;
    assert!(ok, "{out}");
    assert!(
        out.contains("echo") && out.contains("10.96.0.11:80"),
        "{out}"
    );

    // Node 2 attaches to the server from the registry: its registration passes the identity
    // check (the caller's cgroup is the registry-declared workload serving echo).
    let reg2 = format!("http://{}:8500", n2.agent_ip);
    let mut refused = None;
    topo.wait_for(
        "the server registered as echo on node 2",
        Duration::from_secs(5),
        || {
            refused = register_passing_echo(&topo, server, &reg2, "30s").err();
            Ok(refused.is_none())
        },
    )
    .with_context(|| format!("last attempt: {refused:?}"))?;

    let (client, intruder) = (n1.pod("client"), n1.pod("intruder"));
    let reach = |pod: &Pod| -> Result<mesh_tests::topology::Attempt> {
        let mut a = topo.connect_from_with_timeout(pod, VIP, "hi", 1, Duration::from_secs(3))?;
        Ok(a.remove(0))
    };
    let started = Instant::now();
    let mut last = None;
    topo.wait_for(
        "the client to reach the registry-defined service",
        Duration::from_secs(10),
        || {
            let a = reach(client)?;
            let reached = a.ok && a.reply == "srv:hi";
            last = Some(a);
            Ok(reached)
        },
    )
    .with_context(|| format!("last attempt: {last:?}"))?;
    eprintln!(
        "registry-defined service routed after {:?}",
        started.elapsed()
    );
    let denied = reach(intruder)?;
    assert_eq!(
        denied.errno,
        Some(1),
        "not on echo's allow-list: EPERM, {denied:?}"
    );
    assert!(
        agent2.log_text().contains("registry mesh objects applied"),
        "node 2 applied the objects it never saw in its file"
    );

    // A registry policy protecting echo (its callers move out of the service's own `allow`),
    // and one protecting another service.
    let policies = dir.join("policies.yaml");
    std::fs::write(
        &policies,
        "services:\n  - {name: echo, namespace: shop, vip: 10.96.0.11:80}\n  \
         - {name: other, vip: 10.96.0.12:80}\n\
         authorization:\n  - name: echo-callers\n    service: echo\n    allow:\n      \
         - from: spiffe://cluster.local/ns/shop/sa/client\n  - name: other-callers\n    \
         service: other\n    allow:\n      - from: spiffe://cluster.local/ns/shop/sa/client\n",
    )?;
    let (ok, out) = ctl(&topo, n1, &["apply", "-f", &policies.display().to_string()])?;
    assert!(ok, "{out}");

    // Deleting the service in the registry takes it out of every node, with the policies that
    // protect it (left behind, every node would refuse them as naming no service).
    let (ok, out) = ctl(&topo, n1, &["-o", "json", "delete", "service", "echo"])?;
    assert!(ok, "{out}");
    let removed: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        removed["authorization"][0]["name"], "echo-callers",
        "the reply lists the policy removed with the service: {out}"
    );
    let started = Instant::now();
    loop {
        let (_, services) = ctl(&topo, n1, &["-o", "json", "services"])?;
        if !services.contains("10.96.0.11") {
            break;
        }
        if started.elapsed() > Duration::from_secs(5) {
            bail!("echo still routed after delete: {services}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, listed) = ctl(&topo, n1, &["-o", "json", "mesh"])?;
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    let names: Vec<&str> = listed["authorization"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["other-callers"], "{listed}");
    for (agent, node) in [(&agent1, n1), (&agent2, n2)] {
        topo.wait_for(
            "every agent applied the delete with nothing refused",
            Duration::from_secs(5),
            || {
                let m = topo.metrics(agent)?;
                let refused = mesh_tests::http::metric(
                    &m,
                    "nodemesh_registry_objects_refused",
                    &[("kind", "authorization")],
                );
                let (_, services) = ctl(&topo, node, &["-o", "json", "services"])?;
                Ok(refused == Some(0)
                    && !services.contains("10.96.0.11")
                    && services.contains("10.96.0.12"))
            },
        )?;
    }
    Ok(())
}

/// Waits until `pod`'s connect to `vip` reaches the echo server (`admitted`) or fails with
/// EPERM at connect (denied in the kernel); returns how long the change took.
fn wait_for_decision(
    topo: &Topology,
    pod: &Pod,
    vip: &str,
    admitted: bool,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    let what = format!(
        "{} {}",
        pod.name,
        if admitted {
            "admitted"
        } else {
            "denied (EPERM)"
        }
    );
    topo.wait_for(&what, timeout, || {
        let a = topo
            .connect_from_with_timeout(pod, vip, "hi", 1, Duration::from_secs(2))?
            .remove(0);
        let done = if admitted {
            a.ok && a.reply == "srv:hi"
        } else {
            a.errno == Some(1)
        };
        last = Some(a);
        Ok(done)
    })
    .with_context(|| format!("last attempt: {last:?}"))?;
    Ok(started.elapsed())
}

/// Authorization policies and the mesh-wide default live in the registry too. An operator
/// applies a service with `default: allow` (both callers admitted), then, through the other
/// node's admin port, an allow-list policy: the callers' agent denies the intruder in the
/// kernel (EPERM at connect) and admits the client within about a second. An invalid policy is
/// refused with the field named and changes nothing; deleting the policy restores the default.
#[test]
fn registry_authorization_policies_reach_the_kernel_of_every_node() -> Result<()> {
    const VIP: &str = "10.96.0.14:80";
    const SOON: Duration = Duration::from_millis(1500);
    let mut topo = Topology::new()?;
    let (_etcd, agent1, agent2) = bootstrap_only_pair(&mut topo, ETCD_PORT + 3)?;
    let (n1, n2) = (topo.node(1), topo.node(2));
    let server = n2.pod("server");

    let (client, intruder) = (n1.pod("client"), n1.pod("intruder"));
    let apply = |node: &Node, name: &str, document: &str| -> Result<(bool, String)> {
        let path = topo.state_dir(node).join(name);
        std::fs::write(&path, document)?;
        ctl(&topo, node, &["apply", "-f", &path.display().to_string()])
    };
    let mesh = format!(
        "services:\n  - name: echo\n    namespace: shop\n    vip: {VIP}\n\
         workloads:\n  node-1:\n{}{}  node-2:\n{}    service: echo\ndefault: allow\n",
        client.workload_yaml("shop", "client"),
        intruder.workload_yaml("shop", "intruder"),
        server.workload_yaml("shop", "server"),
    );
    let (ok, out) = apply(n1, "mesh.yaml", &mesh)?;
    assert!(ok, "{out}");
    let reg2 = format!("http://{}:8500", n2.agent_ip);
    topo.wait_for(
        "the server registered as echo on node 2",
        Duration::from_secs(5),
        || Ok(register_passing_echo(&topo, server, &reg2, "30s").is_ok()),
    )?;
    wait_for_decision(&topo, client, VIP, true, Duration::from_secs(10))?;
    wait_for_decision(&topo, intruder, VIP, true, SOON)
        .context("the registry's default: allow admits a caller no policy names")?;

    let policy = |from: &str| {
        format!(
            "authorization:\n  - name: echo-callers\n    service: echo\n    allow:\n      - from: {from}\n"
        )
    };
    let (ok, out) = apply(n2, "bad-policy.yaml", &policy("not-a-spiffe-id"))?;
    assert!(!ok, "an invalid policy is refused: {out}");
    assert!(
        out.contains("registry authorization \"echo-callers\"")
            && out.contains("authorization[0].allow[0].from"),
        "the error names the policy and the field: {out}"
    );
    let (_, listed) = ctl(&topo, n1, &["-o", "json", "mesh"])?;
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    assert_eq!(
        listed["authorization"],
        serde_json::json!([]),
        "nothing written"
    );
    wait_for_decision(&topo, intruder, VIP, true, SOON).context("nothing changed")?;

    let (ok, out) = apply(
        n2,
        "policy.yaml",
        &policy("spiffe://cluster.local/ns/shop/sa/client"),
    )?;
    assert!(ok && out.contains("echo-callers"), "{out}");
    let took = wait_for_decision(&topo, intruder, VIP, false, SOON)
        .context("node 1's kernel denies the caller the registry policy leaves out")?;
    eprintln!("registry policy enforced in node 1's kernel {took:?} after the write");
    wait_for_decision(&topo, client, VIP, true, SOON)?;
    let (_, policy_view) = ctl(&topo, n1, &["-o", "json", "policy"])?;
    assert!(
        policy_view.contains("echo-callers"),
        "compiled into node 1's authorizer: {policy_view}"
    );
    let (_, table) = ctl(&topo, n1, &["mesh"])?;
    assert!(
        table.contains("echo-callers") && table.contains("mesh default: allow"),
        "{table}"
    );
    for agent in [&agent1, &agent2] {
        let m = topo.metrics(agent)?;
        assert_eq!(
            mesh_tests::http::metric(
                &m,
                "nodemesh_registry_objects_refused",
                &[("kind", "authorization")]
            ),
            Some(0),
            "nothing left out"
        );
    }

    // Endpoint churn under a registry policy neither reloads nor recompiles authorization.
    let generation = |agent: &mesh_tests::AgentHandle| {
        agent_metric(&topo, agent, "nodemesh_config_generation", &[])
    };
    let generation_before = generation(&agent1)?;
    let reg1 = SocketAddr::from((n1.agent_ip, 8500));
    let status = deregister(&topo, server, &reg2, "echo-1")?;
    assert_eq!(status, 200);
    topo.wait_for("node 1 sees the deregistration", SOON, || {
        Ok(passing_echo(&topo, &n1.netns, reg1)? == 0)
    })?;
    register_passing_echo(&topo, server, &reg2, "30s")?;
    topo.wait_for("node 1 sees the new registration", SOON, || {
        Ok(passing_echo(&topo, &n1.netns, reg1)? == 1)
    })?;
    assert_eq!(
        generation(&agent1)?,
        generation_before,
        "no reload on churn"
    );
    wait_for_decision(&topo, intruder, VIP, false, SOON)?;

    let (ok, out) = ctl(&topo, n2, &["delete", "authorization", "echo-callers"])?;
    assert!(ok, "{out}");
    wait_for_decision(&topo, intruder, VIP, true, SOON)
        .context("removing the policy restores the registry's default: allow")?;
    let (ok, out) = ctl(&topo, n1, &["delete", "default"])?;
    assert!(ok, "{out}");
    wait_for_decision(&topo, client, VIP, false, SOON)
        .context("without the registry's default the built-in deny holds")?;
    Ok(())
}

/// `nodemesh_kernel_map_writes_total{map}` (entries written or removed since start).
fn map_writes(metrics: &str, map: &str) -> u64 {
    mesh_tests::http::metric(metrics, "nodemesh_kernel_map_writes_total", &[("map", map)])
        .unwrap_or(0)
}

/// An endpoint that exists only in the registry (registered through the Consul API) is under its
/// service's allow-list in the kernel like a config endpoint: the allowed caller dialing its pod
/// address is captured and proxied, a denied caller gets EPERM on every family and protocol.
/// Registration and deregistration write only the ENDPOINTS entry: no SERVICES write, no
/// certificate, no new config generation. The pods' egress rule opens the pod network, so
/// without the entry the denied caller would reach the pod directly (it does after the
/// deregistration).
#[test]
fn registry_only_endpoint_addresses_meet_the_allow_list_in_the_kernel() -> Result<()> {
    const EPERM: Option<i32> = Some(1);
    const WAIT: Duration = Duration::from_secs(5);
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "intruder", "server"])?;
    let n1 = topo.node(1);
    let (client, intruder, server) = (n1.pod("client"), n1.pod("intruder"), n1.pod("server"));
    topo.start_echo_server(server, ECHO_PORT, "srv")?;
    topo.start_udp_echo_server(server, ECHO_PORT, "udp")?;
    let config = n1.agent_config(&format!(
        "services:\n  - name: echo\n    namespace: shop\n    vip: {ECHO_VIP}\nworkloads:\n{}{}{}    service: echo\n\
         authorization:\n  - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from: spiffe://cluster.local/ns/shop/sa/client\n\
         egress:\n  rules:\n    - {{name: pods, cidr: 10.1.0.0/16}}\n",
        client.workload_yaml("shop", "client"),
        intruder.workload_yaml("shop", "intruder"),
        server.workload_yaml("shop", "server"),
    ));
    let agent = topo.start_agent(n1, &config, &[])?;
    topo.wait_ready(&agent)?;
    let endpoint = format!("{}:{ECHO_PORT}", server.ip);
    let mapped = format!("[::ffff:{}]:{ECHO_PORT}", server.ip);
    let dial = |pod: &Pod, target: &str| -> Result<mesh_tests::topology::Attempt> {
        let mut a = topo.connect_from_with_timeout(pod, target, "hi", 1, Duration::from_secs(3))?;
        Ok(a.remove(0))
    };
    let proxied = || -> Result<u64> {
        let m = topo.metrics(&agent)?;
        Ok(mesh_tests::http::metric(
            &m,
            "nodemesh_outbound_connections_total",
            &[("service", "echo")],
        )
        .unwrap_or(0))
    };
    let entries = || agent_metric(&topo, &agent, "nodemesh_kernel_endpoint_entries", &[]);
    let before = dial(intruder, &endpoint)?;
    assert!(
        before.ok,
        "not yet an endpoint: the egress rule lets the pod be reached directly: {before:?}"
    );
    let m = topo.metrics(&agent)?;
    let services_writes = map_writes(&m, "SERVICES");
    assert!(services_writes > 0, "the start-up sync wrote SERVICES");
    let certs_before = mesh_tests::http::metric(&m, "nodemesh_identity_cert_changes_total", &[]);

    let reg = format!("http://{}:8500", n1.agent_ip);
    register_passing_echo(&topo, server, &reg, "30s")?;
    topo.wait_for("the endpoint entry in the kernel", WAIT, || {
        Ok(entries()? == Some(1))
    })?;

    let proxied_before = proxied()?;
    let allowed = dial(client, &endpoint)?;
    assert!(
        allowed.ok && allowed.reply == "srv:hi",
        "allowed caller dialing the pod address: {allowed:?}"
    );
    assert_eq!(
        proxied()?,
        proxied_before + 1,
        "captured and proxied as an endpoint of echo"
    );
    for (what, attempt) in [
        ("TCP to the pod address", dial(intruder, &endpoint)?),
        ("TCP v4-mapped", dial(intruder, &mapped)?),
        (
            "UDP connect",
            topo.udp_from(intruder, &endpoint, "x", true, Duration::from_secs(2))?,
        ),
        (
            "UDP sendto",
            topo.udp_from(intruder, &endpoint, "x", false, Duration::from_secs(2))?,
        ),
        (
            "UDP sendto v4-mapped",
            topo.udp_from(intruder, &mapped, "x", false, Duration::from_secs(2))?,
        ),
    ] {
        assert_eq!(attempt.errno, EPERM, "{what}: {attempt:?}");
    }

    let m = topo.metrics(&agent)?;
    assert_eq!(
        map_writes(&m, "SERVICES"),
        services_writes,
        "registration wrote no SERVICES entry"
    );
    assert_eq!(
        map_writes(&m, "ENDPOINTS"),
        1,
        "one ENDPOINTS entry written"
    );
    assert_eq!(
        mesh_tests::http::metric(&m, "nodemesh_kernel_endpoints_overflow", &[]),
        Some(0)
    );

    let status = deregister(&topo, server, &reg, "echo-1")?;
    assert_eq!(status, 200);
    topo.wait_for("the endpoint entry removed", WAIT, || {
        Ok(entries()? == Some(0))
    })?;
    let after = dial(intruder, &endpoint)?;
    assert!(
        after.ok && after.reply == "srv:hi",
        "the kernel no longer treats the address as echo's: {after:?}"
    );
    let m = topo.metrics(&agent)?;
    assert_eq!(map_writes(&m, "SERVICES"), services_writes);
    assert_eq!(map_writes(&m, "ENDPOINTS"), 2, "written once, removed once");
    assert_eq!(
        mesh_tests::http::metric(&m, "nodemesh_config_generation", &[]),
        Some(1),
        "no reload, no authz recompile"
    );
    assert_eq!(
        mesh_tests::http::metric(&m, "nodemesh_identity_cert_changes_total", &[]),
        certs_before,
        "no certificate re-issued"
    );

    Ok(())
}

/// The embedded registry keeps operator-defined mesh objects in the state directory: a service,
/// its workloads and its authorization policy applied with `ctl apply` are in force again after
/// an agent restart (the client routed, the intruder denied in the kernel), with no service,
/// workload or policy in the node's file.
#[test]
fn embedded_mesh_objects_survive_an_agent_restart() -> Result<()> {
    const VIP: &str = "10.96.0.12:80";
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server", "intruder"])?;
    let n1 = topo.node(1);
    let (client, server, intruder) = (n1.pod("client"), n1.pod("server"), n1.pod("intruder"));
    topo.start_echo_server(server, ECHO_PORT, "srv")?;
    let config = n1.agent_config("");
    let agent = topo.start_agent(n1, &config, &[])?;
    topo.wait_ready(&agent)?;
    let document = format!(
        "services:\n  - name: echo\n    namespace: shop\n    vip: {VIP}\n    endpoints: [\"{}:{ECHO_PORT}\"]\n\
         workloads:\n  node-1:\n{}{}{}    service: echo\n\
         authorization:\n  - {{name: echo-callers, service: echo, allow: [{{from_service: client}}]}}\n",
        server.ip,
        client.workload_yaml("shop", "client"),
        intruder.workload_yaml("shop", "intruder"),
        server.workload_yaml("shop", "server"),
    );
    let path = topo.state_dir(n1).join("applied-mesh.yaml");
    std::fs::write(&path, document)?;
    let (ok, out) = ctl(&topo, n1, &["apply", "-f", &path.display().to_string()])?;
    assert!(ok, "{out}");
    let reach = || -> Result<bool> {
        let a = topo.connect_from_with_timeout(client, VIP, "hi", 1, Duration::from_secs(3))?;
        Ok(a[0].ok && a[0].reply == "srv:hi")
    };
    topo.wait_for(
        "the applied service routed",
        Duration::from_secs(10),
        &reach,
    )?;

    topo.signal(agent.pid, libc::SIGTERM)?;
    topo.wait(agent.pid, Duration::from_secs(10))?;
    let agent = topo.start_agent(n1, &config, &[])?;
    topo.wait_ready(&agent)?;
    let (_, listed) = ctl(&topo, n1, &["-o", "json", "mesh"])?;
    assert!(
        listed.contains(VIP) && listed.contains("echo-callers"),
        "still in the registry: {listed}"
    );
    topo.wait_for(
        "the service routed again after the restart",
        Duration::from_secs(5),
        &reach,
    )?;
    wait_for_decision(&topo, intruder, VIP, false, Duration::from_secs(2))
        .context("the persisted policy denies the intruder in the kernel after the restart")?;
    let refused = |agent: &mesh_tests::AgentHandle, kind: &str| {
        agent_metric(
            &topo,
            agent,
            "nodemesh_registry_objects_refused",
            &[("kind", kind)],
        )
    };
    for kind in ["service", "authorization"] {
        assert_eq!(refused(&agent, kind)?, Some(0), "nothing refused yet");
    }

    // The node's file now defines echo and a policy named echo-callers too: the file wins, and
    // the registry's objects are counted as refused until the clash ends.
    topo.signal(agent.pid, libc::SIGTERM)?;
    topo.wait(agent.pid, Duration::from_secs(10))?;
    let clashing = n1.agent_config(
        "services:\n  - name: echo\n    namespace: shop\n    vip: 10.96.0.13:80\n\
         authorization:\n  - {name: echo-callers, service: echo}\n",
    );
    let agent = topo.start_agent(n1, &clashing, &[])?;
    topo.wait_ready(&agent)?;
    assert_eq!(
        refused(&agent, "service")?,
        Some(1),
        "the clashing registry service"
    );
    assert_eq!(
        refused(&agent, "authorization")?,
        Some(1),
        "the clashing registry policy"
    );
    Ok(())
}

/// Issue 7 item 8, L7: an HTTP service with two registry instances under HTTP health checks and
/// a client sending keep-alive GETs all along. One instance's health switch fails: once its
/// check marks it critical it gets no more requests, and none fails; switched back, it is
/// passing again and receives requests again.
#[test]
fn failing_http_check_moves_keep_alive_requests_without_failures() -> Result<()> {
    use mesh_tests::l7::{curl_in_background, start_http_server};
    const RATE: u32 = 50;
    const REQUESTS: u32 = 600;
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "sa", "sb"])?;
    let n1 = topo.node(1);
    let (client, sa, sb) = (n1.pod("client"), n1.pod("sa"), n1.pod("sb"));
    let switch_a = topo.workdir.join("a-unhealthy");
    let server_a = start_http_server(
        &topo,
        sa,
        ECHO_PORT,
        "a",
        &format!("health={}", switch_a.display()),
    )?;
    let server_b = start_http_server(
        &topo,
        sb,
        ECHO_PORT,
        "b",
        &format!("health={}", topo.workdir.join("b-unhealthy").display()),
    )?;
    let config = echo_pair_config(n1, "protocol: http, load_balancer: round_robin");
    let agent = topo.start_agent(n1, &config, &[])?;
    topo.wait_ready(&agent)?;
    let registry = register_checked_echo_pair(&topo, n1, [sa, sb], "http", |ip| {
        format!(r#"{{"HTTP":"http://{ip}:{ECHO_PORT}/health","Interval":"200ms","Timeout":"1s"}}"#)
    })?;
    let app_requests = |server: &mesh_tests::l7::HttpServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /app"))
            .count()
    };
    let accepted =
        |m: &str| mesh_tests::http::metric(m, "nodemesh_outbound_accepted_total", &[]).unwrap_or(0);
    let accepted_before = accepted(&topo.metrics(&agent)?);

    let rate = format!("{RATE}/s");
    let run = curl_in_background(
        &topo,
        client,
        &format!("http://{ECHO_VIP}/app"),
        REQUESTS,
        &["--rate", &rate, "-m", "60"],
    )?;
    topo.wait_for(
        "a serving under the running client",
        Duration::from_secs(5),
        || Ok(app_requests(&server_a) >= 5 && app_requests(&server_b) >= 5),
    )?;

    // a's health switch fails; its check marks it critical within a few intervals.
    std::fs::write(&switch_a, "")?;
    topo.wait_for("a critical", Duration::from_secs(5), || {
        Ok(passing_echo(&topo, &n1.netns, registry)? == 1)
    })?;
    // The reconciler publishes the change on the same watch; a request already in flight to a
    // may still land in the next instant.
    std::thread::sleep(Duration::from_millis(200));
    let a_when_critical = app_requests(&server_a);
    let b_when_critical = app_requests(&server_b);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        app_requests(&server_a),
        a_when_critical,
        "a critical instance receives no requests"
    );
    assert!(
        app_requests(&server_b) >= b_when_critical + (RATE as usize),
        "b served the whole load meanwhile"
    );

    // Healthy again: passing, and it receives requests again.
    std::fs::remove_file(&switch_a)?;
    topo.wait_for("a passing again", Duration::from_secs(5), || {
        Ok(passing_echo(&topo, &n1.netns, registry)? == 2)
    })?;
    topo.wait_for("a receives requests again", Duration::from_secs(5), || {
        Ok(app_requests(&server_a) >= a_when_critical + 5)
    })?;

    let replies = run.finish(&topo, Duration::from_secs(60))?;
    assert_eq!(replies.len(), REQUESTS as usize, "every request answered");
    let failed: Vec<_> = replies.iter().filter(|r| r.code != 200).collect();
    assert!(failed.is_empty(), "failed GETs: {failed:?}");
    assert_eq!(
        accepted(&topo.metrics(&agent)?),
        accepted_before + 1,
        "all requests on one kept-alive connection"
    );
    eprintln!(
        "{} keep-alive GETs, 0 failed; a served {} (none while critical), b served {}",
        replies.len(),
        app_requests(&server_a),
        app_requests(&server_b)
    );
    Ok(())
}

/// Entries of `node`'s pinned ENDPOINTS map as the kernel holds them (bpftool, not the agent).
fn pinned_endpoint_entries(node: &Node) -> Result<usize> {
    let pin = Path::new("/sys/fs/bpf/nodemesh")
        .join(&node.instance)
        .join("ENDPOINTS");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .context("bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool map dump {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(entries.as_array().map_or(0, Vec::len))
}

/// The pinned ENDPOINTS map outlives the agent and is adopted by the next one. Node 2's pods
/// `sa` and `sb` register as echo endpoints; node 1's kernel then refuses its intruder's direct
/// dials to both pod addresses. kill -9 of node 1's agent keeps refusing them (the pins stay).
/// `sb` deregisters while the agent is down: the restarted agent adopts the map, removes exactly
/// that stale entry (one ENDPOINTS write, no rewrite of the kept one) and the metric matches the
/// kernel's own count.
#[test]
fn kill_9_keeps_the_endpoint_map_and_a_restart_adopts_it_without_stale_entries() -> Result<()> {
    const EPERM: Option<i32> = Some(1);
    const WAIT: Duration = Duration::from_secs(5);
    let mut topo = Topology::new()?;
    topo.add_node(&["intruder"])?;
    topo.add_node(&["sa", "sb"])?;
    topo.link_nodes(1, 2)?;
    let (n1, n2) = (topo.node(1), topo.node(2));
    let (intruder, sa, sb) = (n1.pod("intruder"), n2.pod("sa"), n2.pod("sb"));
    topo.start_echo_server(sa, ECHO_PORT, "srv-a")?;
    topo.start_echo_server(sb, ECHO_PORT, "srv-b")?;
    let etcd = Etcd::start(&topo, n1, n1.agent_ip, ETCD_PORT + 4)?;
    let registry_block = format!(
        "registry:\n  backend: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    lease_ttl: 3s\n",
        etcd.client_url
    );
    let service = format!("services:\n  - name: echo\n    namespace: shop\n    vip: {ECHO_VIP}\n");
    // The egress rule opens node 2's pod network: without an ENDPOINTS entry the intruder
    // reaches the pods directly, so an EPERM below comes from the entry.
    let config1 = n1.agent_config(&format!(
        "{service}workloads:\n{}egress:\n  rules:\n    - {{name: pods, cidr: 10.2.0.0/16}}\n{registry_block}",
        intruder.workload_yaml("shop", "intruder"),
    ));
    let agent1 = topo.start_agent(n1, &config1, &[])?;
    topo.wait_ready(&agent1)?;
    let config2 = n2.agent_config(&format!(
        "{service}workloads:\n{}    service: echo\n{}    service: echo\n{registry_block}identity:\n{}",
        sa.workload_yaml("shop", "server"),
        sb.workload_yaml("shop", "server"),
        topo.shared_ca_fields(n1),
    ));
    let agent2 = topo.start_agent(n2, &config2, &[])?;
    topo.wait_ready(&agent2)?;
    let (to_a, to_b) = (
        format!("{}:{ECHO_PORT}", sa.ip),
        format!("{}:{ECHO_PORT}", sb.ip),
    );
    let dial = |target: &str| -> Result<mesh_tests::topology::Attempt> {
        let mut a =
            topo.connect_from_with_timeout(intruder, target, "hi", 1, Duration::from_secs(3))?;
        Ok(a.remove(0))
    };
    let entries = |agent: &mesh_tests::AgentHandle| {
        agent_metric(&topo, agent, "nodemesh_kernel_endpoint_entries", &[])
    };
    let before = dial(&to_b)?;
    ensure!(
        before.ok && before.reply == "srv-b:hi",
        "not yet an endpoint: reached directly: {before:?}"
    );

    register_checked_echo_pair(&topo, n2, [sa, sb], "tcp", |ip| {
        format!(r#"{{"TCP":"{ip}:{ECHO_PORT}","Interval":"1s","Timeout":"1s"}}"#)
    })?;
    topo.wait_for("both endpoints in node 1's kernel", WAIT, || {
        Ok(entries(&agent1)? == Some(2))
    })?;
    assert_eq!(pinned_endpoint_entries(n1)?, 2);
    for target in [&to_a, &to_b] {
        let a = dial(target)?;
        assert_eq!(a.errno, EPERM, "agent up, {target}: {a:?}");
    }

    topo.signal(agent1.pid, libc::SIGKILL)?;
    topo.wait(agent1.pid, Duration::from_secs(10))?;
    for target in [&to_a, &to_b] {
        let a = dial(target)?;
        assert_eq!(a.errno, EPERM, "agent down (pins kept), {target}: {a:?}");
    }
    // Deregistered while node 1's agent is down.
    let status = deregister(&topo, sb, &format!("http://{}:8500", n2.agent_ip), "echo-b")?;
    ensure!(status == 200, "deregister answered {status}");
    assert_eq!(pinned_endpoint_entries(n1)?, 2, "nobody rewrote the map");

    let restarted = topo.start_agent_logged(n1, &config1, &[], "restarted")?;
    topo.wait_ready(&restarted)?;
    topo.wait_for("the stale entry removed after the restart", WAIT, || {
        Ok(entries(&restarted)? == Some(1))
    })?;
    assert_eq!(pinned_endpoint_entries(n1)?, 1, "the kernel agrees");
    let a = dial(&to_a)?;
    assert_eq!(a.errno, EPERM, "the kept entry still refuses: {a:?}");
    let b = dial(&to_b)?;
    assert!(
        b.ok && b.reply == "srv-b:hi",
        "the deregistered address is no longer echo's: {b:?}"
    );
    assert_eq!(
        map_writes(&topo.metrics(&restarted)?, "ENDPOINTS"),
        1,
        "adopted: only the stale entry removed, the kept one not rewritten"
    );
    Ok(())
}
