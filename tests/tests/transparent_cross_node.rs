//! End-to-end: transparent connects across nodes. The source agent names the calling pod in the
//! HBONE CONNECT (`Forwarded: for=`); the destination agent connects to its pod from that
//! address, so a strict server on node 2 sees node 1's client pod. A valid mesh identity that
//! names a spoof-worthy address (a pod of node 2, node 2's agent or uplink address, loopback)
//! gets its tunnel from the agent address instead, counted in
//! `nodemesh_hbone_forwarded_refused_total`. Real netns topology, real agents, real eBPF.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_agent::identity::{client_config, CertStore, MeshCa, SpiffeId, WorkloadSpec};
use mesh_agent::proxy::hbone::{HbonePool, PoolConfig};
use mesh_tests::http::metric;
use mesh_tests::l7::start_http_server;
use mesh_tests::two_nodes::{Options, TwoNodes, ECHO_PORT, ECHO_VIP, WEB_VIP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REFUSED: &str = "nodemesh_hbone_forwarded_refused_total";

/// The peer address (IP only) of the echo server's record line carrying `payload`.
fn peer_of(nodes: &TwoNodes, payload: &str) -> Option<String> {
    nodes.server_record().lines().find_map(|l| {
        let (peer, data) = l.split_once(' ')?;
        (data == payload).then(|| peer.rsplit_once(':').map_or(peer, |(ip, _)| ip).to_owned())
    })
}

fn refused(nodes: &TwoNodes) -> Result<u64> {
    let m = nodes.topo.metrics(&nodes.agent2)?;
    Ok(metric(&m, REFUSED, &[]).unwrap_or(0))
}

/// A tunnel from node 1 to the echo server behind node 2's agent, presenting a genuine
/// certificate of the authorized identity shop/client and naming `caller` in `Forwarded`.
fn tunnel_naming(nodes: &TwoNodes, caller: Ipv4Addr, payload: &str) -> Result<String> {
    let (ca_cert, ca_key) = nodes.ca_files();
    let ca = MeshCa::from_pem_files(&ca_cert, &ca_key)?;
    let id = SpiffeId::new("cluster.local", "shop", "client")?;
    let spec = WorkloadSpec {
        id: id.clone(),
        service: "client".into(),
    };
    let store = Arc::new(CertStore::new());
    store.insert(ca.issue(&spec, Duration::from_secs(3600))?)?;
    let tls = client_config(ca.cert_der(), store, id.clone(), None)?;
    let target = SocketAddr::from((nodes.topo.node(2).pod("server").ip, ECHO_PORT));
    let node2: SocketAddr = "10.0.0.2:15008".parse()?;
    nodes.topo.in_netns(&nodes.topo.node(1).netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let pool = HbonePool::new(PoolConfig {
                connect_timeout: Duration::from_secs(3),
                ..Default::default()
            });
            let mut stream = pool
                .connect(&id, tls, node2, target, "echo", Some(caller))
                .await?;
            stream.write_all(payload.as_bytes()).await?;
            stream.shutdown().await?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await?;
            Ok(reply)
        })
    })
}

#[test]
fn cross_node_pods_see_the_caller_and_spoofed_callers_are_refused() -> Result<()> {
    let nodes = TwoNodes::start(Options {
        strict_server: true,
        ..Options::default()
    })?;
    let (n1, n2) = (nodes.topo.node(1), nodes.topo.node(2));
    let client = n1.pod("client");

    // Through both agents: the strict server accepts the tunnel's connection and sees the
    // client pod's own address.
    let attempts = nodes.topo.connect_from(client, ECHO_VIP, "via-hbone", 3)?;
    ensure!(
        attempts.iter().all(|a| a.ok && a.reply == "srv:via-hbone"),
        "client -> echo over HBONE: {attempts:?}\nagent 2 log:\n{}",
        nodes.agent2.log_text()
    );
    let peers: Vec<String> = nodes
        .server_record()
        .lines()
        .filter(|l| l.ends_with(" via-hbone"))
        .map(|l| l.split(':').next().unwrap_or_default().to_owned())
        .collect();
    ensure!(
        peers.len() == 3 && peers.iter().all(|p| *p == client.ip.to_string()),
        "server saw {peers:?}, expected {}",
        client.ip
    );
    ensure!(refused(&nodes)? == 0, "an honest caller was refused");

    // A remote pod's address is bound as named.
    let intruder = n1.pod("intruder").ip;
    ensure!(tunnel_naming(&nodes, intruder, "remote-pod")? == "srv:remote-pod");
    ensure!(peer_of(&nodes, "remote-pod") == Some(intruder.to_string()));

    // Spoof-worthy values: the tunnel still works, from node 2's agent address, and is counted.
    let agent2 = n2.agent_ip.to_string();
    let spoofs = [
        ("local-pod", n2.pod("server").ip),
        ("agent-address", n2.agent_ip),
        ("uplink-address", Ipv4Addr::new(10, 0, 0, 2)),
        ("loopback", Ipv4Addr::LOCALHOST),
    ];
    for (i, (payload, spoof)) in spoofs.into_iter().enumerate() {
        let reply = tunnel_naming(&nodes, spoof, payload)?;
        ensure!(reply == format!("srv:{payload}"), "{payload}: {reply:?}");
        let seen = peer_of(&nodes, payload);
        ensure!(
            seen.as_deref() == Some(agent2.as_str()),
            "{payload} ({spoof}): server saw {seen:?}, expected the agent address {agent2}"
        );
        let count = refused(&nodes)?;
        ensure!(count == i as u64 + 1, "{payload}: {REFUSED} = {count}");
    }
    ensure!(
        nodes
            .agent2
            .log_text()
            .contains("Forwarded caller address refused"),
        "refusals are not logged"
    );
    Ok(())
}

/// Per-request HTTP over HBONE: the upstream connection on node 2 comes from the client pod too
/// (node 1 pools its tunnels per caller address, node 2 binds the address each one names).
#[test]
fn cross_node_http_upstream_connections_come_from_the_caller() -> Result<()> {
    const WEB_PORT: u16 = 8081;
    let nodes = TwoNodes::start(Options {
        web_port: Some(WEB_PORT),
        web_policy: Some("{protocol: http}".into()),
        ..Options::default()
    })?;
    let server = nodes.topo.node(2).pod("server");
    start_http_server(&nodes.topo, server, WEB_PORT, "web", "ok")?;
    let client = nodes.topo.node(1).pod("client");
    let url = format!("http://{WEB_VIP}/");
    let out = nodes.topo.run_in_pod(
        client,
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %header{x-peer}\\n",
            &url,
            &url,
        ],
    )?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 2, "curl output {out:?}");
    for line in lines {
        let (code, peer) = line.split_once(' ').unwrap_or((line, ""));
        ensure!(
            code == "200" && peer.starts_with(&format!("{}:", client.ip)),
            "curl -> web over HBONE: {line:?}, expected 200 from {}\nagent 2 log:\n{}",
            client.ip,
            nodes.agent2.log_text()
        );
    }
    Ok(())
}
