//! Tracing end to end: curl in a pod calls an HTTP service through the mesh, the calling
//! workload's agent continues (or starts) the W3C trace context, the upstream server (`meshprobe
//! http`, which echoes the `traceparent` it got as `x-traceparent`) sees the agent's span as its
//! parent, and the agent exports that span over OTLP/gRPC to a real receiver (tonic serving
//! opentelemetry-proto's TraceService).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::l7::start_http_server;
use mesh_tests::otlp::{OtlpReceiver, ReceivedSpan, SPAN_KIND_CLIENT};
use mesh_tests::{AgentHandle, Pod, Topology};

const VIP: &str = "10.96.0.10";
const URL: &str = "http://10.96.0.10/";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
/// How long spans may take to arrive (the batch is sent every 100 ms here).
const ARRIVAL: Duration = Duration::from_secs(10);

/// One node with `client` and `a`, an HTTP server in `a` behind service `echo`, and an agent
/// with `tracing` (a YAML flow value, or None for no tracing block) and the access log on, and
/// an OTLP receiver on the node's loopback.
fn start(tracing: Option<&str>) -> Result<(Topology, AgentHandle, OtlpReceiver)> {
    start_with_batch_delay(tracing, "100")
}

/// [`start`] with the span batch sent every `delay_ms` (OTEL_BSP_SCHEDULE_DELAY).
fn start_with_batch_delay(
    tracing: Option<&str>,
    delay_ms: &str,
) -> Result<(Topology, AgentHandle, OtlpReceiver)> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "a"])?;
    let node = topo.node(1);
    let receiver = OtlpReceiver::start(&topo, &[node])?;
    let a = node.pod("a");
    start_http_server(&topo, a, 8080, "a", "ok")?;
    let log = topo.workdir.join("access.log");
    let tracing = tracing
        .map(|t| format!("  tracing: {t}\n"))
        .unwrap_or_default();
    let yaml = node.agent_config(&format!(
        "observability:\n  access_log: {{enabled: true, path: {}}}\n{tracing}\
         services:\n  - name: echo\n    namespace: shop\n    vip: {VIP}:80\n    endpoints: [\"{}:8080\"]\n\
         workloads:\n{}{}\
         authorization:\n  - name: echo-callers\n    service: echo\n    default: deny\n    allow:\n      - from_service: client\n",
        log.display(),
        a.ip,
        node.pod("client").workload_yaml("shop", "client"),
        a.workload_yaml("shop", "a"),
    ));
    let agent = topo.start_agent(node, &yaml, &[("OTEL_BSP_SCHEDULE_DELAY", delay_ms)])?;
    topo.wait_ready(&agent)?;
    Ok((topo, agent, receiver))
}

fn tracing_to_receiver(sampling: f64) -> String {
    format!(
        "{{otlp_endpoint: \"{}\", sampling: {sampling}}}",
        OtlpReceiver::endpoint()
    )
}

/// curl `url` from `pod`, with a `traceparent` if given; returns (code, the traceparent the
/// upstream server received).
fn call(topo: &Topology, pod: &Pod, url: &str, traceparent: Option<&str>) -> Result<(u16, String)> {
    let header = traceparent.map(|t| format!("traceparent: {t}"));
    let mut args = vec![
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}|%header{x-traceparent}",
    ];
    if let Some(h) = &header {
        args.extend(["-H", h.as_str()]);
    }
    args.push(url);
    let out = topo.run_in_pod(pod, "curl", &args)?;
    let (code, received) = out.trim().split_once('|').context("curl output")?;
    Ok((code.parse()?, received.to_owned()))
}

/// (trace id, span id, flags) of a traceparent.
fn parts(traceparent: &str) -> Result<(String, String, String)> {
    let p: Vec<&str> = traceparent.split('-').collect();
    ensure!(
        p.len() == 4 && p[0] == "00" && p[1].len() == 32 && p[2].len() == 16,
        "not a traceparent: {traceparent:?}"
    );
    Ok((p[1].to_owned(), p[2].to_owned(), p[3].to_owned()))
}

/// The access log's HTTP lines.
fn access_lines(topo: &Topology) -> Vec<serde_json::Value> {
    std::fs::read_to_string(topo.workdir.join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["kind"] == "http")
        .collect()
}

fn check_client_span(span: &ReceivedSpan, endpoint: &str) -> Result<()> {
    let (ip, port) = endpoint.split_once(':').context("endpoint")?;
    ensure!(
        span.kind == SPAN_KIND_CLIENT
            && span.name == "outbound echo.shop.svc.cluster.local"
            && span.service_name == "nodemesh-agent"
            && span.attribute("nodemesh.service") == Some("echo.shop.svc.cluster.local")
            && span.attribute("http.response.status_code") == Some("200")
            && span.attribute("nodemesh.retries") == Some("0")
            && span.attribute("server.address") == Some(ip)
            && span.attribute("server.port") == Some(port)
            && span.attribute("http.request.method") == Some("GET"),
        "{span:#?}"
    );
    Ok(())
}

/// The span of the one request to `echo` (endpoint in pod `a`), and the access log's line for
/// it, which must carry the span's trace id.
fn check_span_and_access_log(topo: &Topology, span: &ReceivedSpan, trace: &str) -> Result<()> {
    check_client_span(span, &format!("{}:8080", topo.node(1).pod("a").ip))?;
    topo.wait_for("the access log line", ARRIVAL, || {
        Ok(access_lines(topo).len() == 1)
    })?;
    let line = &access_lines(topo)[0];
    ensure!(line["trace_id"] == trace, "{line}");
    Ok(())
}

/// A request carrying a sampled traceparent: the agent's span is its child, exported with the
/// service, endpoint, code and retries; the server sees the agent's span as parent; the access
/// log line has the trace id.
#[test]
fn incoming_trace_context_is_continued_and_the_span_exported() -> Result<()> {
    let (topo, agent, receiver) = start(Some(&tracing_to_receiver(0.0)))?;
    let node = topo.node(1);
    let sent = format!("00-{TRACE}-{PARENT}-01");
    let (code, received) = call(&topo, node.pod("client"), URL, Some(&sent))?;
    ensure!(code == 200, "{code}\n{}", agent.log_text());
    let (trace, agent_span, flags) = parts(&received)?;
    ensure!(
        trace == TRACE && agent_span != PARENT && flags == "01",
        "upstream got {received}"
    );
    let span = receiver.wait_for_span(ARRIVAL, |s| s.trace_id == TRACE)?;
    ensure!(
        span.parent_span_id == PARENT && span.span_id == agent_span,
        "{span:#?} vs upstream {received}"
    );
    check_span_and_access_log(&topo, &span, TRACE)
}

/// Without a traceparent and sampling 1.0 the agent starts a trace: a root span, whose ids the
/// upstream server and the access log see.
#[test]
fn a_trace_is_started_when_the_request_has_none() -> Result<()> {
    let (topo, agent, receiver) = start(Some(&tracing_to_receiver(1.0)))?;
    let node = topo.node(1);
    let (code, received) = call(&topo, node.pod("client"), URL, None)?;
    ensure!(code == 200, "{code}\n{}", agent.log_text());
    let (trace, agent_span, flags) = parts(&received)?;
    ensure!(flags == "01", "sampled: {received}");
    let span = receiver.wait_for_span(ARRIVAL, |s| s.trace_id == trace)?;
    ensure!(
        span.parent_span_id.is_empty() && span.span_id == agent_span,
        "{span:#?} vs upstream {received}"
    );
    check_span_and_access_log(&topo, &span, &trace)
}

/// Sampling 0: new traces are passed on unsampled and nothing is exported for them; a request
/// that arrives sampled is still traced (its flag wins), and its span is the only one received.
#[test]
fn sampling_zero_exports_only_traces_sampled_upstream() -> Result<()> {
    let (topo, agent, receiver) = start(Some(&tracing_to_receiver(0.0)))?;
    let client = topo.node(1).pod("client");
    for _ in 0..5 {
        let (code, received) = call(&topo, client, URL, None)?;
        ensure!(code == 200, "{code}\n{}", agent.log_text());
        let (_, _, flags) = parts(&received)?;
        ensure!(flags == "00", "not sampled: {received}");
    }
    // Sent after the others: once its span is here, theirs would have been too.
    let (code, _) = call(&topo, client, URL, Some(&format!("00-{TRACE}-{PARENT}-01")))?;
    ensure!(code == 200, "{code}");
    receiver.wait_for_span(ARRIVAL, |s| s.trace_id == TRACE)?;
    std::thread::sleep(Duration::from_millis(300));
    let spans = receiver.spans();
    ensure!(spans.len() == 1, "only the sampled request: {spans:#?}");
    Ok(())
}

/// No tracing block: the request's traceparent reaches the server unchanged (no span in
/// between) and nothing is exported.
#[test]
fn tracing_unconfigured_passes_headers_through_and_exports_nothing() -> Result<()> {
    let (topo, agent, receiver) = start(None)?;
    let sent = format!("00-{TRACE}-{PARENT}-01");
    let (code, received) = call(&topo, topo.node(1).pod("client"), URL, Some(&sent))?;
    ensure!(code == 200, "{code}\n{}", agent.log_text());
    ensure!(received == sent, "unchanged: {received}");
    // The batch delay is 100 ms: an agent that exported would have done so by now.
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        receiver.export_requests() == 0 && receiver.spans().is_empty(),
        "{:#?}",
        receiver.spans()
    );
    Ok(())
}

/// Across nodes: node 1's agent continues the trace with a client span; node 2's agent, serving
/// the HBONE tunnel's HTTP, continues it with a server span, the client span's child, which is
/// the parent the server on node 2 sees.
#[test]
fn trace_context_crosses_nodes() -> Result<()> {
    use mesh_tests::otlp::SPAN_KIND_SERVER;
    use mesh_tests::two_nodes::{Options, TwoNodes, WEB_VIP};
    let tracing = format!(
        "observability:\n  tracing: {}\nidentity:\n",
        tracing_to_receiver(0.0)
    );
    let mesh = TwoNodes::start(Options {
        web_port: Some(8081),
        identity_yaml: Some(tracing),
        ..Options::default()
    })?;
    let topo = &mesh.topo;
    let receiver = OtlpReceiver::start(topo, &[topo.node(1), topo.node(2)])?;
    let server = topo.node(2).pod("server");
    start_http_server(topo, server, 8081, "remote", "ok")?;
    let url = format!("http://{}/", WEB_VIP.trim_end_matches(":80"));
    let sent = format!("00-{TRACE}-{PARENT}-01");
    let (code, received) = call(topo, topo.node(1).pod("client"), &url, Some(&sent))?;
    ensure!(code == 200, "{code}\n{}", mesh.agent1.log_text());
    let (trace, upstream_parent, _) = parts(&received)?;
    ensure!(trace == TRACE, "upstream got {received}");
    // The agents batch for 5 s by default.
    let wait = ARRIVAL + Duration::from_secs(5);
    let client =
        receiver.wait_for_span(wait, |s| s.trace_id == TRACE && s.kind == SPAN_KIND_CLIENT)?;
    ensure!(
        client.parent_span_id == PARENT
            && client.attribute("nodemesh.service") == Some("web.shop.svc.cluster.local")
            && client.attribute("http.response.status_code") == Some("200")
            && client.attribute("server.address") == Some(server.ip.to_string().as_str()),
        "{client:#?}"
    );
    let hop = receiver.wait_for_span(wait, |s| s.span_id == upstream_parent)?;
    ensure!(
        hop.kind == SPAN_KIND_SERVER
            && hop.trace_id == TRACE
            && hop.parent_span_id == client.span_id
            && hop.name == "inbound web.shop.svc.cluster.local"
            && hop.attribute("nodemesh.reporter") == Some("destination")
            && hop.attribute("http.response.status_code") == Some("200"),
        "the destination agent's span is the client span's child and the server's parent: {hop:#?}"
    );
    Ok(())
}

/// Spans still queued when the agent stops are sent before it exits (the batch delay here is a
/// minute, so only the shutdown flush can deliver them).
#[test]
fn queued_spans_are_flushed_on_shutdown() -> Result<()> {
    let (topo, agent, receiver) = start_with_batch_delay(Some(&tracing_to_receiver(0.0)), "60000")?;
    let sent = format!("00-{TRACE}-{PARENT}-01");
    let (code, _) = call(&topo, topo.node(1).pod("client"), URL, Some(&sent))?;
    ensure!(code == 200, "{code}\n{}", agent.log_text());
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        receiver.spans().is_empty(),
        "sent before shutdown: {:#?}",
        receiver.spans()
    );
    topo.signal(agent.pid, libc::SIGTERM)?;
    topo.wait(agent.pid, Duration::from_secs(15))?;
    let span = receiver.wait_for_span(Duration::from_secs(1), |s| s.trace_id == TRACE)?;
    ensure!(span.parent_span_id == PARENT, "{span:#?}");
    Ok(())
}
