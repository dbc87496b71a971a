//! End-to-end traffic policy: real upstream HTTP servers with injected faults in pods, curl as
//! the client, the agent proxying each request (L7) with retries, timeouts, breakers, rate
//! limits and balancing. One node with pods `client`, `a` and `b` unless said otherwise.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_tests::http::metric;
use mesh_tests::l7::{count_code, count_served, curl, start_http_server};
use mesh_tests::{AgentHandle, Node, Topology};

const VIP: &str = "10.96.0.10";
const URL: &str = "http://10.96.0.10/";
const VIP2: &str = "10.96.0.11";
const URL2: &str = "http://10.96.0.11/";

/// Fast retries for tests (the default base is 1 s, seed 003).
const QUICK_RETRIES: &str = "retries: {max: 3, backoff: {base: 5ms, max: 20ms}}";

fn setup() -> Result<Topology> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "a", "b"])?;
    Ok(topo)
}

/// A service entry; `endpoints` and `policy` are YAML flow values.
fn service(name: &str, vip: &str, endpoints: &str, policy: &str) -> String {
    format!("  - name: {name}\n    namespace: shop\n    vip: {vip}:80\n    endpoints: {endpoints}\n    policy: {policy}\n")
}

/// A service at [`VIP`] served by pod `a` on 8080.
fn served_by_a(node: &Node, name: &str, policy: &str) -> String {
    service(
        name,
        VIP,
        &format!("[\"{}:8080\"]", node.pod("a").ip),
        policy,
    )
}

/// The agent config: `services` entries, the three workloads, and an allow policy letting
/// `client` call every listed service.
fn config(node: &Node, services: &[String], names: &[&str], extra: &str) -> String {
    let authz: String = names
        .iter()
        .map(|s| {
            format!("  - name: {s}-callers\n    service: {s}\n    default: deny\n    allow:\n      - from_service: client\n")
        })
        .collect();
    node.agent_config(&format!(
        "{extra}services:\n{}workloads:\n{}{}{}authorization:\n{authz}",
        services.concat(),
        node.pod("client").workload_yaml("shop", "client"),
        node.pod("a").workload_yaml("shop", "a"),
        node.pod("b").workload_yaml("shop", "b"),
    ))
}

fn start(topo: &Topology, yaml: &str) -> Result<AgentHandle> {
    let agent = topo.start_agent(topo.node(1), yaml, &[])?;
    topo.wait_ready(&agent)?;
    Ok(agent)
}

fn admin_endpoints(topo: &Topology, agent: &AgentHandle) -> Result<serde_json::Value> {
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let (status, body) =
        topo.in_netns(&agent.netns, || mesh_tests::http::get(admin, "/endpoints"))?;
    ensure!(status == 200, "/endpoints answered {status}: {body}");
    Ok(serde_json::from_str(&body)?)
}

/// The admin view of one endpoint of one service.
fn endpoint_view(
    view: &serde_json::Value,
    service: &str,
    address: &str,
) -> Result<serde_json::Value> {
    view["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == service))
        .and_then(|s| s["endpoints"].as_array())
        .and_then(|e| e.iter().find(|e| e["address"] == address))
        .cloned()
        .with_context(|| format!("no endpoint {address} of {service} in {view}"))
}

#[test]
fn transient_503s_are_retried_and_post_is_not_by_default() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let flaky = start_http_server(&topo, a, 8080, "a", "503x2")?;
    let flaky_post = start_http_server(&topo, b, 8080, "b", "503x1")?;
    let services = [
        service(
            "get",
            VIP,
            &format!("[\"{}:8080\"]", a.ip),
            &format!("{{{QUICK_RETRIES}}}"),
        ),
        service(
            "post",
            VIP2,
            &format!("[\"{}:8080\"]", b.ip),
            &format!("{{{QUICK_RETRIES}}}"),
        ),
    ];
    let agent = start(&topo, &config(node, &services, &["get", "post"], ""))?;

    let got = curl(&topo, node.pod("client"), URL, 1, &[])?;
    ensure!(
        got[0].code == 200 && got[0].served_by == "a",
        "{got:?}\n{}",
        agent.log_text()
    );
    ensure!(
        flaky.requests().len() == 3,
        "two 503s then 200: {:?}",
        flaky.requests()
    );

    let posted = curl(
        &topo,
        node.pod("client"),
        URL2,
        1,
        &["-X", "POST", "-d", "x=1"],
    )?;
    ensure!(
        posted[0].code == 503 && posted[0].served_by == "b",
        "the upstream 503 is passed on: {posted:?}"
    );
    ensure!(
        flaky_post.requests() == ["POST /"],
        "POST sent once: {:?}",
        flaky_post.requests()
    );

    let m = topo.metrics(&agent)?;
    let retries = |s| metric(&m, "nodemesh_request_retries_total", &[("service", s)]);
    ensure!(
        retries("get") == Some(2) && retries("post") == Some(0),
        "{m}"
    );
    let requests = |s, code| {
        metric(
            &m,
            "nodemesh_requests_total",
            &[("service", s), ("caller", "shop/client"), ("code", code)],
        )
    };
    ensure!(
        requests("get", "200") == Some(1) && requests("post", "503") == Some(1),
        "{m}"
    );
    // The same requests in Istio's families (one per client request, retries not counted),
    // reported by the caller's agent; same-node endpoints, so no mTLS.
    let istio = |service: &'static str, code: Option<&'static str>| {
        let mut labels = vec![
            ("reporter", "source"),
            ("source_workload", "client"),
            ("source_workload_namespace", "shop"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
            ("destination_workload", service),
            ("connection_security_policy", "none"),
        ];
        labels.extend(code.map(|c| ("response_code", c)));
        labels
    };
    let get = istio("get", Some("200"));
    let post = istio("post", Some("503"));
    ensure!(
        metric(&m, "istio_requests_total", &get) == Some(1)
            && metric(&m, "istio_requests_total", &post) == Some(1)
            && metric(&m, "istio_requests_total", &istio("get", Some("503"))).is_none(),
        "{m}"
    );
    let post = istio("post", None);
    ensure!(
        metric(&m, "istio_request_duration_milliseconds_count", &post) == Some(1)
            && metric(&m, "istio_request_bytes_sum", &post) == Some(3)
            && metric(&m, "istio_response_bytes_count", &post) == Some(1),
        "{m}"
    );
    ensure!(
        m.contains("destination_service=\"get.shop.svc.cluster.local\""),
        "{m}"
    );
    mesh_tests::http::promtool_check(&m)?;
    Ok(())
}

#[test]
fn dead_endpoint_opens_its_breaker_then_recovers_through_half_open() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let (a, b) = (node.pod("a"), node.pod("b"));
    start_http_server(&topo, a, 8080, "a", "ok")?;
    let dying = start_http_server(&topo, b, 8080, "b", "ok")?;
    let policy = format!("{{load_balancer: round_robin, {QUICK_RETRIES}, circuit_breaker: {{failures: 2, recovery: 1s, half_open: 2}}}}");
    let services = [service(
        "echo",
        VIP,
        &format!("[\"{}:8080\", \"{}:8080\"]", a.ip, b.ip),
        &policy,
    )];
    let agent = start(&topo, &config(node, &services, &["echo"], ""))?;
    let client = node.pod("client");
    let b_addr = format!("{}:8080", b.ip);

    let before = curl(&topo, client, URL, 10, &[])?;
    ensure!(
        count_served(&before, "a") == 5 && count_served(&before, "b") == 5,
        "round robin: {before:?}"
    );

    topo.signal(dying.pid, libc::SIGKILL)?;
    topo.wait(dying.pid, Duration::from_secs(5))?;
    // Connect failures are retried on the other endpoint: the client sees no error.
    let during = curl(&topo, client, URL, 20, &[])?;
    ensure!(
        count_served(&during, "a") == 20,
        "traffic shifted to a: {during:?}"
    );
    let view = endpoint_view(&admin_endpoints(&topo, &agent)?, "echo", &b_addr)?;
    ensure!(
        view["breaker"] == "open" && view["ejected"] == true,
        "{view}"
    );
    let m = topo.metrics(&agent)?;
    let labels = [("service", "echo"), ("endpoint", b_addr.as_str())];
    ensure!(
        metric(&m, "nodemesh_breaker_state", &labels) == Some(1),
        "{m}"
    );
    ensure!(
        metric(&m, "nodemesh_endpoint_ejections_total", &labels) == Some(1),
        "one trip: {m}"
    );
    // Only the two failures that tripped it reached b; then it was skipped.
    ensure!(
        metric(&m, "nodemesh_request_retries_total", &[("service", "echo")]) == Some(2),
        "{m}"
    );

    let revived = start_http_server(&topo, b, 8080, "b", "ok")?;
    std::thread::sleep(Duration::from_millis(1100));
    let after = curl(&topo, client, URL, 10, &[])?;
    ensure!(count_code(&after, 200) == 10, "{after:?}");
    ensure!(
        count_served(&after, "b") >= 4,
        "b is back after its half-open probes: {after:?}"
    );
    ensure!(!revived.requests().is_empty());
    let view = endpoint_view(&admin_endpoints(&topo, &agent)?, "echo", &b_addr)?;
    ensure!(view["breaker"] == "closed", "{view}");
    let m = topo.metrics(&agent)?;
    let to = |state| {
        metric(
            &m,
            "nodemesh_breaker_transitions_total",
            &[("endpoint", b_addr.as_str()), ("to", state)],
        )
    };
    ensure!(
        to("open") == Some(1) && to("half_open") == Some(1) && to("closed") == Some(1),
        "{m}"
    );
    Ok(())
}

#[test]
fn request_timeout_fires_at_its_bound_and_concurrency_cap_sheds() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let (a, b) = (node.pod("a"), node.pod("b"));
    start_http_server(&topo, a, 8080, "a", "hang")?;
    start_http_server(&topo, b, 8080, "b", "slow1500")?;
    let services = [
        service(
            "hang",
            VIP,
            &format!("[\"{}:8080\"]", a.ip),
            "{timeouts: {request: 800ms}, retries: {enabled: false}}",
        ),
        service(
            "slow",
            VIP2,
            &format!("[\"{}:8080\"]", b.ip),
            "{concurrency: 1}",
        ),
    ];
    let agent = start(&topo, &config(node, &services, &["hang", "slow"], ""))?;
    let client = node.pod("client");

    let started = Instant::now();
    let timed_out = curl(&topo, client, URL, 1, &["--max-time", "5"])?;
    let took = started.elapsed();
    ensure!(
        timed_out[0].code == 504 && timed_out[0].reason == "request timeout",
        "{timed_out:?}"
    );
    let seconds = timed_out[0].seconds;
    ensure!(
        (0.72..=0.88).contains(&seconds),
        "504 after {seconds}s (bound 0.8s +-10%), run took {took:?}"
    );

    // One request holds the only slot for 1.5 s; a second one meanwhile is refused at once.
    let topo_ref = &topo;
    let (first, second) = std::thread::scope(|s| {
        let first = s.spawn(move || curl(topo_ref, client, URL2, 1, &[]));
        std::thread::sleep(Duration::from_millis(500));
        let second = curl(topo_ref, client, URL2, 1, &[]);
        (first.join().expect("thread"), second)
    });
    let (first, second) = (first?, second?);
    ensure!(first[0].code == 200, "{first:?}");
    ensure!(
        second[0].code == 503 && second[0].reason == "concurrency limit" && second[0].seconds < 0.3,
        "{second:?}"
    );
    let m = topo.metrics(&agent)?;
    ensure!(
        metric(
            &m,
            "nodemesh_request_timeouts_total",
            &[("service", "hang")]
        ) == Some(1),
        "{m}"
    );
    ensure!(
        metric(&m, "nodemesh_shed_total", &[("service", "slow")]) == Some(1),
        "{m}"
    );
    Ok(())
}

/// 4 s rather than 10 s keeps the suite quick; the bucket refills by elapsed time, so the
/// error bound does not depend on the window length beyond the fixed 100 ms burst (the unit
/// test `traffic::limit` covers 10 s on paused time).
#[test]
fn rate_limit_holds_within_five_percent() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let a = node.pod("a");
    start_http_server(&topo, a, 8080, "a", "ok")?;
    let services = [served_by_a(node, "limited", "{rate_limit: 50/s}")];
    let agent = start(&topo, &config(node, &services, &["limited"], ""))?;

    let started = Instant::now();
    let replies = curl(&topo, node.pod("client"), URL, 800, &["--rate", "200/s"])?;
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = count_code(&replies, 200) as f64;
    let limited: Vec<_> = replies.iter().filter(|r| r.code == 429).collect();
    ensure!(
        allowed + limited.len() as f64 == 800.0,
        "only 200 or 429: {replies:?}"
    );
    // 50/s over the run plus the 100 ms burst (5 tokens).
    let expected = 50.0 * elapsed + 5.0;
    ensure!(
        (allowed - expected).abs() / expected <= 0.05,
        "{allowed} allowed in {elapsed:.2}s, expected {expected:.0} +-5%"
    );
    ensure!(
        limited
            .iter()
            .all(|r| r.retry_after == "1" && r.served_by.is_empty()),
        "{limited:?}"
    );
    let m = topo.metrics(&agent)?;
    ensure!(
        metric(&m, "nodemesh_rate_limited_total", &[("service", "limited")])
            == Some(limited.len() as u64),
        "{m}"
    );
    Ok(())
}

#[test]
fn zone_failover_only_when_the_local_zone_is_down() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let local = start_http_server(&topo, a, 8080, "a", "ok")?;
    start_http_server(&topo, b, 8080, "b", "ok")?;
    let endpoints = format!(
        "[{{address: \"{}:8080\", zone: z1}}, {{address: \"{}:8080\", zone: z2}}]",
        a.ip, b.ip
    );
    let policy = format!("{{load_balancer: round_robin, {QUICK_RETRIES}, circuit_breaker: {{failures: 1, recovery: 30s}}}}");
    let yaml = config(
        node,
        &[service("zoned", VIP, &endpoints, &policy)],
        &["zoned"],
        "",
    )
    .replacen("proxy:\n", "  zone: z2\nproxy:\n", 1);
    let agent = start(&topo, &yaml)?;
    let client = node.pod("client");

    // This node is in z2: b only, although round robin would alternate.
    let normal = curl(&topo, client, URL, 10, &[])?;
    ensure!(count_served(&normal, "b") == 10, "{normal:?}");
    ensure!(
        local.requests().is_empty(),
        "z1 got traffic while z2 was up"
    );

    let yaml = yaml.replace("zone: z2\nproxy", "zone: z1\nproxy");
    std::fs::write(topo.config_path(node), &yaml)?;
    topo.wait_for("reload", Duration::from_secs(5), || {
        Ok(topo.reloads(&agent, "ok")? >= 1)
    })?;
    topo.signal(local.pid, libc::SIGKILL)?;
    topo.wait(local.pid, Duration::from_secs(5))?;
    // Now in z1, whose only endpoint is dead: after one failure (retried) z2 takes over.
    let failover = curl(&topo, client, URL, 10, &[])?;
    ensure!(
        count_served(&failover, "b") == 10,
        "{failover:?}\n{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn p2c_sends_under_a_fifth_of_requests_to_a_ten_times_slower_endpoint() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let (a, b) = (node.pod("a"), node.pod("b"));
    start_http_server(&topo, a, 8080, "fast", "slow5")?;
    start_http_server(&topo, b, 8080, "slow", "slow50")?;
    let services = [service(
        "p2c",
        VIP,
        &format!("[\"{}:8080\", \"{}:8080\"]", a.ip, b.ip),
        "{load_balancer: p2c_ewma}",
    )];
    let agent = start(&topo, &config(node, &services, &["p2c"], ""))?;
    let client = node.pod("client");
    // Two clients at once, so in-flight counts matter as well as latency.
    let topo_ref = &topo;
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(move || curl(topo_ref, client, URL, 150, &[])))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut replies = Vec::new();
    for r in runs {
        replies.extend(r?);
    }
    ensure!(count_code(&replies, 200) == 300, "{:?}", agent.log_text());
    let slow = count_served(&replies, "slow");
    ensure!(slow * 5 < 300, "{slow} of 300 went to the slow endpoint");
    Ok(())
}

#[test]
fn retry_budget_caps_retries_in_a_full_outage() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let a = node.pod("a");
    let down = start_http_server(&topo, a, 8080, "a", "503")?;
    let policy = "{retries: {max: 3, backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0.2, min_per_second: 1}}, circuit_breaker: {failures: 1000}}";
    let services = [service(
        "outage",
        VIP,
        &format!("[\"{}:8080\"]", a.ip),
        policy,
    )];
    let agent = start(&topo, &config(node, &services, &["outage"], ""))?;

    let replies = curl(&topo, node.pod("client"), URL, 100, &[])?;
    ensure!(count_code(&replies, 503) == 100, "{replies:?}");
    // Without a budget: 100 x (1 + 3) attempts. With it: 20% of 100 plus the 10 s x 1/s reserve.
    let attempts = down.requests().len();
    ensure!(
        (100..=132).contains(&attempts),
        "{attempts} attempts reached the server"
    );
    let m = topo.metrics(&agent)?;
    let exhausted = metric(
        &m,
        "nodemesh_retry_budget_exhausted_total",
        &[("service", "outage")],
    )
    .unwrap_or(0);
    let retries = metric(
        &m,
        "nodemesh_request_retries_total",
        &[("service", "outage")],
    )
    .unwrap_or(0);
    ensure!(
        exhausted > 50 && retries as usize == attempts - 100,
        "exhausted {exhausted}, retries {retries}: {m}"
    );
    Ok(())
}

/// Node 1's agent applies the caller's policy to an endpoint on node 2: the 503s come back
/// over HBONE and are retried there, on one pooled upstream HTTP connection (one tunnel).
#[test]
fn retries_across_nodes_over_hbone() -> Result<()> {
    use mesh_tests::two_nodes::{Options, TwoNodes, WEB_VIP};
    let mesh = TwoNodes::start(Options {
        web_port: Some(8081),
        web_policy: Some(format!("{{{QUICK_RETRIES}}}")),
        ..Options::default()
    })?;
    let topo = &mesh.topo;
    let server = start_http_server(topo, topo.node(2).pod("server"), 8081, "remote", "503x2")?;
    let url = format!("http://{}/", WEB_VIP.trim_end_matches(":80"));
    let replies = curl(topo, topo.node(1).pod("client"), &url, 3, &[])?;
    ensure!(
        count_served(&replies, "remote") == 3 && count_code(&replies, 200) == 3,
        "{replies:?}\n{}",
        mesh.agent1.log_text()
    );
    ensure!(
        server.requests().len() == 5,
        "2 retried 503s + 3 answers: {:?}",
        server.requests()
    );
    let m1 = topo.metrics(&mesh.agent1)?;
    ensure!(
        metric(&m1, "nodemesh_request_retries_total", &[("service", "web")]) == Some(2),
        "{m1}"
    );
    ensure!(
        metric(&m1, "nodemesh_hbone_streams_opened_total", &[]) == Some(1),
        "one pooled tunnel: {m1}"
    );
    let m2 = topo.metrics(&mesh.agent2)?;
    let allowed = [("policy", "web-callers"), ("decision", "allow")];
    ensure!(
        metric(&m2, "nodemesh_authz_decisions_total", &allowed) == Some(1),
        "{m2}"
    );
    // Three client requests, each answered 200 from node 2: Istio counts them once each (not
    // the retried attempts), over mTLS; node 2 sees the one pooled tunnel.
    let http = [
        ("reporter", "source"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let ok = [http.as_slice(), &[("response_code", "200")]].concat();
    ensure!(
        metric(&m1, "istio_requests_total", &ok) == Some(3)
            && metric(&m1, "istio_request_duration_milliseconds_count", &http) == Some(3),
        "{m1}"
    );
    let tunnel = [
        ("reporter", "destination"),
        ("destination_service", "web.shop.svc.cluster.local"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/client",
        ),
    ];
    ensure!(
        metric(&m2, "istio_tcp_connections_opened_total", &tunnel) == Some(1),
        "{m2}"
    );
    Ok(())
}

/// A reload applies to new requests; a request in flight keeps the rules it started with.
#[test]
fn reload_applies_to_new_requests_while_in_flight_ones_keep_their_rules() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let a = node.pod("a");
    start_http_server(&topo, a, 8080, "a", "hang")?;
    let policy = |t: &str| format!("{{timeouts: {{request: {t}}}, retries: {{enabled: false}}}}");
    let yaml = |t: &str| {
        config(
            node,
            &[service(
                "hang",
                VIP,
                &format!("[\"{}:8080\"]", a.ip),
                &policy(t),
            )],
            &["hang"],
            "",
        )
    };
    let agent = start(&topo, &yaml("2s"))?;
    let client = node.pod("client");
    let topo_ref = &topo;
    let (old, new) = std::thread::scope(|s| -> Result<_> {
        let old = s.spawn(move || curl(topo_ref, client, URL, 1, &["--max-time", "5"]));
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(topo_ref.config_path(node), yaml("500ms"))?;
        topo_ref.wait_for("reload", Duration::from_secs(5), || {
            Ok(topo_ref.reloads(&agent, "ok")? >= 1)
        })?;
        let new = curl(topo_ref, client, URL, 1, &["--max-time", "5"]);
        Ok((old.join().expect("thread"), new))
    })?;
    let (old, new) = (old?, new?);
    ensure!(
        old[0].code == 504 && (1.8..=2.2).contains(&old[0].seconds),
        "in flight kept 2s: {old:?}"
    );
    ensure!(
        new[0].code == 504 && (0.45..=0.55).contains(&new[0].seconds),
        "new request got 500ms: {new:?}"
    );
    Ok(())
}

/// HTTP/2 prior knowledge is detected from the preface and proxied per request as HTTP/2 to an
/// h2c upstream (nginx) over a pooled upstream connection.
#[test]
fn http2_prior_knowledge_is_proxied_per_request() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let a = node.pod("a");
    let dir = topo.workdir.join("nginx-h2");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n\
             http {{\n  log_format conn '$connection $server_protocol';\n  access_log {d}/access.log conn;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 server {{ listen 8080 http2; location / {{ add_header x-served-by h2c; return 200 \"h2\\n\"; }} }}\n}}\n"
        ),
    )?;
    let mut nginx = std::process::Command::new("nginx");
    nginx
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(std::process::Stdio::null());
    let master = topo.spawn_in_pod(a, &mut nginx)?;
    let services = [service(
        "grpcish",
        VIP,
        &format!("[\"{}:8080\"]", a.ip),
        "{load_balancer: round_robin}",
    )];
    let agent = start(&topo, &config(node, &services, &["grpcish"], ""))?;
    topo.wait_for("nginx", Duration::from_secs(10), || {
        Ok(std::fs::metadata(dir.join("nginx.pid")).is_ok())
    })?;
    // curl 7.88 cannot reuse a prior-knowledge connection for a second URL, so: three runs,
    // three client connections, which the agent serves from one pooled upstream connection.
    let mut replies = Vec::new();
    for _ in 0..3 {
        replies.extend(
            curl(
                &topo,
                node.pod("client"),
                URL,
                1,
                &["--http2-prior-knowledge"],
            )
            .with_context(|| agent.log_text())?,
        );
    }
    let result = (|| {
        ensure!(
            count_served(&replies, "h2c") == 3,
            "{replies:?}\n{}",
            agent.log_text()
        );
        let log = std::fs::read_to_string(dir.join("access.log"))?;
        let lines: Vec<&str> = log.lines().collect();
        ensure!(
            lines.len() == 3 && lines.iter().all(|l| l.contains("HTTP/2.0")),
            "upstream saw HTTP/2: {log}"
        );
        let connection = |l: &str| l.split_whitespace().next().map(str::to_owned);
        ensure!(
            lines.iter().all(|l| connection(l) == connection(lines[0])),
            "one pooled upstream connection: {log}"
        );
        let m = topo.metrics(&agent)?;
        ensure!(
            metric(
                &m,
                "nodemesh_outbound_connections_total",
                &[("service", "grpcish")]
            ) == Some(3),
            "{m}"
        );
        let requests = [("service", "grpcish"), ("code", "200")];
        ensure!(
            metric(&m, "nodemesh_requests_total", &requests) == Some(3),
            "{m}"
        );
        Ok(())
    })();
    // Graceful stop: nginx's master takes its worker with it.
    topo.signal(master, libc::SIGQUIT)?;
    topo.wait(master, Duration::from_secs(10))?;
    result
}

/// An endpoint that resets connections instead of answering: a GET is retried on the other
/// endpoint; a POST (not idempotent) is not, and the client gets 502 from the agent.
#[test]
fn resets_are_retried_for_get_but_not_for_post() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let resetting = start_http_server(&topo, a, 8080, "a", "reset")?;
    start_http_server(&topo, b, 8080, "b", "ok")?;
    // Round robin starts at a; the breaker never opens.
    let policy = format!(
        "{{load_balancer: round_robin, {QUICK_RETRIES}, circuit_breaker: {{failures: 1000}}}}"
    );
    let services = [
        service(
            "flaky",
            VIP,
            &format!("[\"{}:8080\", \"{}:8080\"]", a.ip, b.ip),
            &policy,
        ),
        service(
            "flaky-post",
            VIP2,
            &format!("[\"{}:8080\"]", a.ip),
            &format!("{{{QUICK_RETRIES}}}"),
        ),
    ];
    let agent = start(
        &topo,
        &config(node, &services, &["flaky", "flaky-post"], ""),
    )?;
    let client = node.pod("client");
    let got = curl(&topo, client, URL, 1, &[])?;
    ensure!(
        got[0].code == 200 && got[0].served_by == "b",
        "{got:?}\n{}",
        agent.log_text()
    );
    let posted = curl(&topo, client, URL2, 1, &["-X", "POST", "-d", "x"])?;
    ensure!(
        posted[0].code == 502 && posted[0].reason == "endpoint reset",
        "{posted:?}"
    );
    ensure!(
        resetting.requests() == ["GET /", "POST /"],
        "{:?}",
        resetting.requests()
    );
    let m = topo.metrics(&agent)?;
    ensure!(
        metric(
            &m,
            "nodemesh_request_retries_total",
            &[("service", "flaky")]
        ) == Some(1),
        "{m}"
    );
    Ok(())
}

/// `per_caller: true` gives each calling identity its own bucket.
#[test]
fn per_caller_rate_limit_keeps_callers_apart() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let a = node.pod("a");
    start_http_server(&topo, a, 8080, "a", "ok")?;
    let services = [served_by_a(
        node,
        "metered",
        "{rate_limit: {rate: 60/min, per_caller: true}}",
    )];
    let yaml = config(node, &services, &["metered"], "").replace(
        "      - from_service: client\n",
        "      - from_service: client\n      - from_service: b\n",
    );
    let agent = start(&topo, &yaml)?;
    // 1 per second with a burst of 1: the client's second request at once is limited...
    let client = curl(&topo, node.pod("client"), URL, 2, &[])?;
    ensure!(client[0].code == 200 && client[1].code == 429, "{client:?}");
    // ...while another identity still has its own token.
    let other = curl(&topo, node.pod("b"), URL, 1, &[])?;
    ensure!(other[0].code == 200, "{other:?}\n{}", agent.log_text());
    let m = topo.metrics(&agent)?;
    let limited = [
        ("service", "metered"),
        ("caller", "shop/client"),
        ("code", "429"),
    ];
    ensure!(
        metric(&m, "nodemesh_requests_total", &limited) == Some(1),
        "{m}"
    );
    ensure!(
        metric(
            &m,
            "nodemesh_requests_total",
            &[("caller", "shop/b"), ("code", "200")]
        ) == Some(1),
        "{m}"
    );
    Ok(())
}

/// An HTTP/1.1 upgrade (as WebSocket does) is passed through: the 101 reaches the client and
/// the upgraded bytes flow both ways through the agent.
#[test]
fn http_upgrade_is_relayed_after_101() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let a = node.pod("a");
    start_http_server(&topo, a, 8080, "a", "ok")?;
    let services = [served_by_a(node, "ws", "{}")];
    let agent = start(&topo, &config(node, &services, &["ws"], ""))?;
    let request = "GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nraw-bytes-after-upgrade";
    let replies = topo.connect_from(node.pod("client"), &format!("{VIP}:80"), request, 1)?;
    let reply = &replies[0].reply;
    ensure!(
        replies[0].ok
            && reply.starts_with("HTTP/1.1 101")
            && reply.ends_with("\r\n\r\nraw-bytes-after-upgrade"),
        "{replies:?}\n{}",
        agent.log_text()
    );
    // It went through the L7 path (a request answered 101), not the TCP relay.
    let m = topo.metrics(&agent)?;
    ensure!(
        metric(
            &m,
            "nodemesh_requests_total",
            &[("service", "ws"), ("code", "101")]
        ) == Some(1),
        "{m}"
    );
    Ok(())
}

/// The JSON access log (observability.access_log) has one line per HTTP request and per TCP
/// connection, with the caller's identity, the service and endpoint, the code, the retries,
/// the policy decision, the bytes and the trace id the request carried.
#[test]
fn access_log_has_one_line_per_request_and_connection() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _server = start_http_server(&topo, a, 8080, "a", "503x1")?;
    topo.start_echo_server(b, 9090, "raw")?;
    let services = [
        service(
            "echo",
            VIP,
            &format!("[\"{}:8080\"]", a.ip),
            &format!("{{{QUICK_RETRIES}}}"),
        ),
        service(
            "raw",
            VIP2,
            &format!("[\"{}:9090\"]", b.ip),
            "{protocol: tcp}",
        ),
    ];
    let path = topo.workdir.join("access.log");
    let extra = format!(
        "observability:\n  access_log: {{enabled: true, path: {}}}\n",
        path.display()
    );
    let agent = start(&topo, &config(node, &services, &["echo", "raw"], &extra))?;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
    let got = curl(&topo, node.pod("client"), URL, 3, &["-H", &traceparent])?;
    ensure!(count_code(&got, 200) == 3, "{got:?}");
    let reply = topo.connect_from(node.pod("client"), &format!("{VIP2}:80"), "hello", 1)?;
    ensure!(reply[0].ok && reply[0].reply == "raw:hello", "{reply:?}");

    let deadline = Instant::now() + Duration::from_secs(5);
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("access log is not JSON lines: {text}"))?;
        if lines.len() >= 4 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let http: Vec<_> = lines.iter().filter(|l| l["kind"] == "http").collect();
    let tcp: Vec<_> = lines.iter().filter(|l| l["kind"] == "tcp").collect();
    ensure!(
        http.len() == 3 && tcp.len() == 1,
        "3 HTTP lines and 1 TCP line: {lines:#?}\n{}",
        agent.log_text()
    );
    let endpoint = format!("{}:8080", a.ip);
    for (i, l) in http.iter().enumerate() {
        ensure!(
            l["source_principal"] == "spiffe://cluster.local/ns/shop/sa/client"
                && l["source_workload"] == "client"
                && l["destination_service"] == "echo.shop.svc.cluster.local"
                && l["endpoint"] == endpoint.as_str()
                && l["response_code"] == 200
                && l["method"] == "GET"
                && l["policy"] == "allow"
                && l["trace_id"] == trace
                && l["retries"] == if i == 0 { 1 } else { 0 }
                && l["bytes_received"].as_u64() > Some(0)
                && l["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "line {i}: {l}"
        );
    }
    let t = tcp[0];
    ensure!(
        t["source_principal"] == "spiffe://cluster.local/ns/shop/sa/client"
            && t["destination_service"] == "raw.shop.svc.cluster.local"
            && t["endpoint"] == format!("{}:9090", b.ip).as_str()
            && t["bytes_sent"] == 5
            && t["bytes_received"] == 9
            && t["policy"] == "allow"
            && t["connection_security_policy"] == "none",
        "{t}"
    );
    Ok(())
}

/// TIME_WAIT sockets in `netns` towards `dst` (ip:port).
fn time_wait_towards(netns: &str, dst: &str) -> Result<usize> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Htan", "state", "time-wait"])
        .args(["dst", dst])
        .output()?;
    ensure!(out.status.success(), "ss in {netns} failed");
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// A client that closes after each request (`Connection: close`): the agent passes the close
/// on to the upstream connection it opened for that client connection, so the server closes
/// first and keeps the TIME_WAIT, as it would talking to the client directly. Were the agent to
/// close first, every such request would leave a TIME_WAIT socket in the agent's namespace from
/// the caller's address towards the endpoint, and a busy caller would run out of ports there.
#[test]
fn connection_close_is_passed_upstream_so_the_server_closes_first() -> Result<()> {
    let topo = setup()?;
    let node = topo.node(1);
    let a = node.pod("a");
    let server = start_http_server(&topo, a, 8080, "a", "ok")?;
    let services = [served_by_a(node, "web", "{protocol: http}")];
    let agent = start(&topo, &config(node, &services, &["web"], ""))?;
    let replies = curl(
        &topo,
        node.pod("client"),
        URL,
        40,
        &["-H", "Connection: close"],
    )?;
    ensure!(
        count_code(&replies, 200) == 40,
        "{replies:?}\n{}",
        agent.log_text()
    );
    ensure!(server.requests().len() == 40, "{:?}", server.requests());
    let endpoint = format!("{}:8080", a.ip);
    let at_agent = time_wait_towards(&node.netns, &endpoint)?;
    ensure!(
        at_agent <= 2,
        "{at_agent} TIME_WAIT sockets towards {endpoint} in the agent's namespace after 40 closed client connections: the agent closed the upstream connections first"
    );
    Ok(())
}
