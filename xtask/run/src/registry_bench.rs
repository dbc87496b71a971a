//! Registry scale rows of `cargo xtask bench`: a real etcd holding 10,000 services with 10
//! instances each (100,000 instances) and 1,000 nodes, all synthetic; one agent on the etcd
//! backend. Measures the agent's start-up sync, its memory, the kernel maps' memory, and the time
//! from an instance change written to etcd to the new endpoint set being routed (read from the
//! agent's admin `/endpoints/<service>`, the model the proxy picks endpoints from) while 1,000
//! other changes per second hit etcd.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, Txn, TxnOp};
use mesh_tests::etcd::Etcd;
use mesh_tests::Topology;
use serde_json::json;

const SERVICES: usize = 10_000;
const PER_SERVICE: usize = 10;
const NODES: usize = 1_000;
/// Services with a VIP in the agent's config (routed); the rest only live in the registry.
const ROUTED: usize = 100;
const CHURN_PER_SECOND: u64 = 1_000;
const PROBE_EVERY: Duration = Duration::from_millis(100);
const PROBE_FOR: Duration = Duration::from_secs(10);
const PREFIX: &str = "/nodemesh";

fn instance(service: usize, i: usize, port: u16, generation: u64) -> serde_json::Value {
    json!({
        "service_name": format!("svc-{service}"),
        "service_version": "1.0.0",
        "service_type": "http",
        "environment": "bench",
        "instance_id": format!("svc-{service}-i{i}"),
        "address": format!("10.{}.{}.{}", 100 + (service / 250) % 100, service % 250, i + 1),
        "port": port,
        "zone": format!("zone-{}", i % 3),
        "meta": {"generation": generation.to_string()},
        "node": format!("node-{}", (service * PER_SERVICE + i) % NODES),
        "owner": "bench/app",
        "status": "passing",
    })
}

fn key(service: usize, i: usize) -> String {
    format!("{PREFIX}/instances/svc-{service}/svc-{service}-i{i}")
}

async fn populate(url: &str) -> Result<Duration> {
    let started = Instant::now();
    let client = Client::connect([url], None).await?;
    let mut ops: Vec<(String, String)> = (0..NODES)
        .map(|n| {
            let record = json!({"name": format!("node-{n}"), "hbone": format!("10.250.{}.{}:15008", n / 250, n % 250 + 1)});
            (format!("{PREFIX}/nodes/node-{n}"), record.to_string())
        })
        .collect();
    for s in 0..SERVICES {
        for i in 0..PER_SERVICE {
            ops.push((key(s, i), instance(s, i, 8080, 0).to_string()));
        }
    }
    // etcd allows 128 operations per transaction; 8 transactions in flight.
    let batches: Vec<Vec<(String, String)>> = ops.chunks(128).map(<[_]>::to_vec).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in batches.chunks(batches.len().div_ceil(8)) {
        let mut client = client.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for batch in chunk {
                let puts: Vec<TxnOp> = batch
                    .into_iter()
                    .map(|(k, v)| TxnOp::put(k, v, None))
                    .collect();
                client.txn(Txn::new().and_then(puts)).await?;
            }
            Ok::<_, etcd_client::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// Bytes the kernel accounts to the maps pinned for this agent instance.
fn kernel_map_bytes(instance: &str) -> Result<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "-f", "map", "show"])
        .output()?;
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let dir = format!("/sys/fs/bpf/nodemesh/{instance}/");
    Ok(maps
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            m["pinned"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p.as_str().is_some_and(|p| p.starts_with(&dir)))
            })
        })
        .filter_map(|m| m["bytes_memlock"].as_u64())
        .sum())
}

/// CPU time (user + system) the process used so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // After the command name: utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

fn registry_instances(topo: &Topology, netns: &str, health: SocketAddr) -> u64 {
    topo.get_in_netns(netns, health, "/health")
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v["registry"]["instances"].as_u64())
        .unwrap_or(0)
}

pub fn run() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&[])?;
    let node = topo.node(1);
    let etcd = Etcd::start(&topo, node, node.agent_ip, 23790)?;
    let url = etcd.client_url.clone();
    let populated = topo.in_netns(&node.netns, || runtime()?.block_on(populate(&url)))?;

    let services: String = (0..ROUTED)
        .map(|s| {
            format!(
                "  - {{name: svc-{s}, namespace: bench, vip: \"10.97.{}.{}:80\"}}\n",
                s / 250,
                s % 250 + 1
            )
        })
        .collect();
    let config = node.agent_config(&format!(
        "services:\n{services}registry:\n  backend: etcd\n  etcd:\n    endpoints: [\"{url}\"]\n"
    ));
    let started = Instant::now();
    let agent = topo.start_agent(node, &config, &[("NODEMESH_LOG", "warn")])?;
    let total = (SERVICES * PER_SERVICE) as u64;
    topo.wait_for("agent synced", Duration::from_secs(120), || {
        Ok(registry_instances(&topo, &node.netns, agent.health) == total)
    })?;
    let sync = started.elapsed();
    let rss_synced = rss_kib(agent.pid)?;
    let map_bytes = kernel_map_bytes(&node.instance)?;

    // 1,000 changes/s to other services while the probe changes svc-0 and waits for routing.
    let stop = AtomicBool::new(false);
    let churned = AtomicU64::new(0);
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let cpu_before = cpu_time(agent.pid)?;
    let (latencies, acks, failures) = std::thread::scope(|scope| {
        let churn = scope.spawn(|| {
            topo.in_netns(&node.netns, || {
                runtime()?.block_on(async {
                    let client = Client::connect([url.as_str()], None).await?;
                    let mut tick = tokio::time::interval(Duration::from_millis(10));
                    let mut generation = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        // One tick's puts in flight together, so etcd latency does not cap the rate.
                        let mut puts = tokio::task::JoinSet::new();
                        for _ in 0..CHURN_PER_SECOND / 100 {
                            generation += 1;
                            let s = 1 + (generation as usize * 7919) % (SERVICES - 1);
                            let i = generation as usize % PER_SERVICE;
                            let mut client = client.clone();
                            let value = instance(s, i, 8080, generation).to_string();
                            puts.spawn(async move { client.put(key(s, i), value, None).await });
                        }
                        while let Some(r) = puts.join_next().await {
                            r??;
                            churned.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok::<_, anyhow::Error>(())
                })
            })
        });
        let probe = topo.in_netns(&node.netns, || {
            let rt = runtime()?;
            let mut client = rt.block_on(Client::connect([url.as_str()], None))?;
            let mut latencies = Vec::new();
            let mut acks = Vec::new();
            let mut failures = 0u32;
            let end = Instant::now() + PROBE_FOR;
            let mut port = 20_000u16;
            while Instant::now() < end {
                port += 1;
                let written = Instant::now();
                rt.block_on(client.put(key(0, 0), instance(0, 0, port, 0).to_string(), None))?;
                let acked = written.elapsed();
                let needle = format!(":{port}\"");
                let deadline = written + Duration::from_secs(5);
                loop {
                    let (_, body) = mesh_tests::http::get(admin, "/endpoints/svc-0")?;
                    if body.contains(&needle) {
                        latencies.push(written.elapsed());
                        acks.push(acked);
                        break;
                    }
                    if Instant::now() > deadline {
                        failures += 1;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                std::thread::sleep(PROBE_EVERY.saturating_sub(written.elapsed()));
            }
            Ok((latencies, acks, failures))
        });
        stop.store(true, Ordering::Relaxed);
        let churn = churn.join();
        match (probe, churn) {
            (Ok(p), Ok(Ok(()))) => Ok(p),
            (Err(e), _) | (_, Ok(Err(e))) => Err(e),
            (_, Err(_)) => bail!("churn thread panicked"),
        }
    })?;
    let rss_churned = rss_kib(agent.pid)?;
    let agent_cpu = (cpu_time(agent.pid)? - cpu_before).as_secs_f64() / PROBE_FOR.as_secs_f64();
    let mut after_ack: Vec<f64> = latencies
        .iter()
        .zip(&acks)
        .map(|(l, a)| l.saturating_sub(*a).as_secs_f64() * 1e3)
        .collect();
    after_ack.sort_by(f64::total_cmp);
    let mut ack_ms: Vec<f64> = acks.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ack_ms.sort_by(f64::total_cmp);
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let churn_rate = churned.load(Ordering::Relaxed) as f64 / PROBE_FOR.as_secs_f64();

    println!("\nRegistry scale: etcd with {SERVICES} services x {PER_SERVICE} instances ({total}) and {NODES} nodes; one agent on the etcd backend with {ROUTED} routed services.\n");
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| etcd load of {} records (txn of 128, 8 in flight) | {:.1} s |",
        total + NODES as u64,
        populated.as_secs_f64()
    );
    println!(
        "| agent start to full registry sync ({total} instances in the cache) | {:.2} s |",
        sync.as_secs_f64()
    );
    println!("| agent RSS after sync | {} MiB |", rss_synced / 1024);
    println!(
        "| agent RSS after {}s of churn | {} MiB |",
        PROBE_FOR.as_secs(),
        rss_churned / 1024
    );
    println!(
        "| kernel map memory (maps pinned for this agent) | {} KiB |",
        map_bytes / 1024
    );
    println!("| background churn achieved | {churn_rate:.0} changes/s |");
    println!(
        "| agent CPU during churn | {:.0}% of one core |",
        agent_cpu * 100.0
    );
    for (what, v) in [
        ("put sent -> routed endpoint set (end to end)", &ms),
        ("etcd put acknowledged (part of the above)", &ack_ms),
        (
            "put acknowledged -> routed (watch, cache, reconciler)",
            &after_ack,
        ),
    ] {
        println!(
            "| {what}, {} probes: p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!("| probes not routed within 5 s | {failures} |");
    drop(etcd);
    Ok(())
}
