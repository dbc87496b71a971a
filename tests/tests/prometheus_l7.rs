//! A real Prometheus server scrapes the agent while a pod makes HTTP requests through the L7 path
//! to a server that answers after a fixed delay; the request-latency quantiles Prometheus computes
//! from `istio_request_duration_milliseconds` must agree with what the client measured.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::l7::{count_code, curl, start_http_server};
use mesh_tests::prometheus::Prometheus;
use mesh_tests::Topology;

const VIP: &str = "10.96.0.10";
/// The server's delay: long enough that the agent's own time is small next to it.
const DELAY_MS: u64 = 30;
const REQUESTS: u32 = 20;
/// Istio's duration buckets (ms), the histogram's resolution.
const BUCKETS: [f64; 8] = [0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0];

#[test]
fn latency_quantiles_from_prometheus_fall_in_the_range_the_client_measured() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    let server = node.pod("server");
    let _http = start_http_server(&topo, server, 8080, "slow", &format!("slow{DELAY_MS}"))?;
    let config = node.agent_config(&format!(
        "services:\n\
         \x20 - name: slow\n    namespace: shop\n    vip: {VIP}:80\n    endpoints: [\"{}:8080\"]\n    policy: {{protocol: http}}\n\
         workloads:\n{}{}\
         authorization:\n\
         \x20 - name: slow-callers\n    service: slow\n    default: deny\n    allow:\n      - from_service: client\n",
        server.ip,
        node.pod("client").workload_yaml("shop", "client"),
        server.workload_yaml("shop", "server"),
    ));
    let agent = topo.start_agent(node, &config, &[])?;
    topo.wait_ready(&agent)?;
    let prom = Prometheus::start(&topo, node, &[agent.metrics])?;
    let wait = Duration::from_secs(15);
    prom.wait_for_value("up{job=\"nodemesh\"}", wait, |v| v == 1.0)?;

    let replies = curl(
        &topo,
        node.pod("client"),
        &format!("http://{VIP}/"),
        REQUESTS,
        &[],
    )?;
    ensure!(
        count_code(&replies, 200) == REQUESTS as usize,
        "{replies:?}"
    );
    let millis: Vec<f64> = replies.iter().map(|r| r.seconds * 1000.0).collect();
    let (min, max) = millis
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &m| (lo.min(m), hi.max(m)));
    ensure!(
        min >= DELAY_MS as f64,
        "the server delay did not apply: {millis:?}"
    );

    let series = "istio_request_duration_milliseconds_bucket{reporter=\"source\", destination_service=\"slow.shop.svc.cluster.local\"}";
    prom.wait_for_value(
        "sum(istio_requests_total{destination_service=\"slow.shop.svc.cluster.local\", response_code=\"200\"})",
        wait,
        |v| v == REQUESTS as f64,
    )?;
    // A quantile is interpolated inside the bucket it falls in, so the client's range is widened
    // to the bucket bounds around it: the histogram cannot be more precise than its buckets.
    let low = BUCKETS
        .iter()
        .rev()
        .copied()
        .find(|b| *b <= min)
        .unwrap_or(0.0);
    let high = BUCKETS
        .iter()
        .copied()
        .find(|b| *b >= max)
        .unwrap_or(f64::INFINITY);
    for q in [0.5, 0.95, 0.99] {
        // The cumulative buckets (not a rate): the series hold exactly this test's requests.
        let promql = format!("histogram_quantile({q}, sum by (le) ({series}))");
        let value = prom.value(&promql)?;
        ensure!(
            value.is_some_and(|v| v >= low && v <= high),
            "p{q} = {value:?} ms, client measured {min:.1}..{max:.1} ms (buckets {low}..{high})\n{}",
            topo.metrics(&agent)?
        );
    }
    Ok(())
}
