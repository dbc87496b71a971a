//! `cargo xtask bench`: new-connection rate and latency through the real data path, in network
//! namespaces on this machine. Connection scenarios run `meshprobe bench` inside a pod (connect,
//! 1 byte each way, close) for a fixed time with a fixed number of workers; the handshake
//! scenario opens full mTLS (TLS 1.3, client certificate) connections to a live agent's 15008.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_agent::app::security::agent_identity;
use mesh_agent::identity::{client_config, CertStore, MeshCa, SpiffeId, WorkloadSpec};
use mesh_tests::topology::probe_binary;
use mesh_tests::two_nodes::{Options, TwoNodes, BYPASS_PORT, ECHO_VIP, WEB_VIP};

use crate::http_bench::{self, BASELINE_HTTP_PORT, FAILING_HTTP_PORT, HTTP_PORT};

/// Echo server port for the plain same-node baseline (no service endpoint).
const BASELINE_PORT: u16 = 9090;
use mesh_tests::{Pod, Topology};

const SECONDS: u64 = 5;
const WORKERS: u64 = 4;
const VIP: &str = "10.96.0.10:80";
/// The same nginx behind a service proxied as opaque TCP (L4), for comparison with L7.
const WEB_L4_VIP: &str = "10.96.0.12:80";
/// nginx behind a service whose second endpoint answers 503 to everything, retried on the
/// healthy one (round robin, so every other request's first attempt fails).
const FLAKY_VIP: &str = "10.96.0.13:80";
/// The same two endpoints with the default breaker, which ejects the failing one.
const FLAKY_EJECTED_VIP: &str = "10.96.0.14:80";
/// Row names of the two failure rows (their ratios look the rows up by name).
const FLAKY_RETRIED_ROW: &str =
    "same node, L7, one of two endpoints answers 503, every other request retried once (breaker held closed)";
const FLAKY_EJECTED_ROW: &str =
    "same node, L7, one of two endpoints answers 503, ejected by the default breaker";

pub fn run() -> Result<()> {
    crate::setup::debian_packages(&["nginx"])?;
    println!("New connections: each row {SECONDS} s, {WORKERS} concurrent workers, veth paths between network namespaces.\n");
    println!("| scenario | conn/s | p50 µs | p99 µs | errors |");
    println!("| --- | --- | --- | --- | --- |");
    let mut http = Vec::new();
    let same = same_node(&mut http)?;
    let (observability, spans) = observability_cost(&mut http)?;
    let cross = cross_node(&mut http)?;
    print_http_rows(&http);
    same.print("");
    cross.print("");
    print_ratio(
        &http,
        "same node, one request per connection: L7 / L4",
        "same node, L7, one request",
        "same node, L4, one request",
    );
    print_ratio(
        &http,
        "same node: L7 with every other request retried / L7 healthy (last round)",
        FLAKY_RETRIED_ROW,
        "same node, L7: ",
    );
    print_ratio(
        &http,
        "same node: L7 with the failing endpoint ejected / L7 healthy (last round)",
        FLAKY_EJECTED_ROW,
        "same node, L7: ",
    );
    print_ratio(
        &http,
        "same node: L7 with access log / without (last round)",
        "same node, L7 + JSON access log",
        "same node, L7: ",
    );
    observability.print(&format!("; {spans} spans received by the OTLP receiver"));
    Ok(())
}

/// `cargo xtask bench --observability`: only the observability cost comparison.
pub fn observability_only() -> Result<()> {
    crate::setup::debian_packages(&["nginx"])?;
    let mut http = Vec::new();
    let (observability, spans) = observability_cost(&mut http)?;
    print_http_rows(&http);
    observability.print(&format!("; {spans} spans received by the OTLP receiver"));
    Ok(())
}

/// Prints `label requests/s = a / b` for the last rows whose names start with the prefixes
/// (of alternated rounds, the last one: the nearest in time to the rows that follow them).
fn print_ratio(http: &[HttpRow], label: &str, numerator: &str, denominator: &str) {
    let rate = |prefix: &str| {
        http.iter()
            .rev()
            .find(|r| r.name.starts_with(prefix))
            .map(|r| r.rate)
    };
    if let (Some(a), Some(b)) = (rate(numerator), rate(denominator)) {
        println!("{label} requests/s = {:.2}", a / b);
    }
}

fn print_http_rows(http: &[HttpRow]) {
    println!("\nHTTP over keep-alive connections (rows \"one request per connection\": wrk -H \"Connection: close\"): wrk -t2 -c16 -d5s against nginx (return 200) in the server pod.");
    println!("Agent CPU is user+system time of the agent(s) on the path during the run (/proc/<pid>/stat), per 1000 requests; RSS is the agents' resident set right after the run (VmRSS) and their peak so far (VmHWM); switches / req are the context switches of the whole machine during the run (/proc/stat ctxt) per request: how often the client, the agents and the server went to sleep and were woken, or were preempted, instead of running on.\n");
    println!("| scenario | req/s | p50 µs | p99 µs | errors | agent CPU s / 1k req | agent RSS MiB after / peak | switches / req |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in http {
        println!("{}", row.line);
    }
    println!();
}

/// One ratio of requests/s (e.g. L7 over L4), measured in alternating rounds.
struct Ratios {
    what: &'static str,
    ratios: Vec<f64>,
}

impl Ratios {
    fn mean(&self) -> f64 {
        self.ratios.iter().sum::<f64>() / self.ratios.len().max(1) as f64
    }

    fn median(&self) -> f64 {
        let mut sorted = self.ratios.clone();
        sorted.sort_by(f64::total_cmp);
        match sorted.len() {
            0 => 0.0,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        }
    }

    fn print(&self, note: &str) {
        let rounds: Vec<String> = self.ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{} requests/s = {:.2} mean, {:.2} median of {} alternating rounds ({}){note}",
            self.what,
            self.mean(),
            self.median(),
            self.ratios.len(),
            rounds.join(", ")
        );
    }
}

/// Rounds of the L7 / L4 keep-alive comparisons; L4 and L7 alternate so load changes on the
/// machine hit both alike.
const L7_L4_ROUNDS: usize = 6;

/// Runs `rounds` pairs of rows (L4, then L7), calling `switch(l7)` before each row (a no-op
/// where both paths are up at once); returns L7 / L4 of each pair.
fn alternate_l4_l7(
    http: &mut Vec<HttpRow>,
    what: &'static str,
    mut row: impl FnMut(bool, usize) -> Result<HttpRow>,
) -> Result<Ratios> {
    let mut ratios = Vec::new();
    for round in 1..=L7_L4_ROUNDS {
        let l4 = row(false, round)?;
        let l7 = row(true, round)?;
        ratios.push(l7.rate / l4.rate.max(1.0));
        http.push(l4);
        http.push(l7);
    }
    Ok(Ratios { what, ratios })
}

/// Rounds of the observability comparison; off and on alternate so load changes on the
/// machine hit both alike.
const OBSERVABILITY_ROUNDS: usize = 10;

/// Issue 8's cost budget: the same-node L7 path with metrics only (they cannot be turned off)
/// against metrics + JSON access log + tracing at sampling 0.01 exporting to a live OTLP/gRPC
/// receiver, alternating agent restarts (both are start-up settings). Returns on / off of each
/// round and the spans the receiver got.
fn observability_cost(http: &mut Vec<HttpRow>) -> Result<(Ratios, usize)> {
    use mesh_tests::otlp::OtlpReceiver;
    let mut topo =
        Topology::new().context("the benchmark creates network namespaces: run it as root")?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    let (client, server) = (node.pod("client"), node.pod("server"));
    let receiver = OtlpReceiver::start(&topo, &[node])?;
    let config = node.agent_config(&format!(
        "services:\n  - name: web\n    vip: {WEB_VIP}\n    endpoints: [\"{}:{HTTP_PORT}\"]\n    policy: {{protocol: http}}\n\
         workloads:\n{}{}{}",
        server.ip,
        client.workload_yaml("bench", "client"),
        server.workload_yaml("bench", "server"),
        allow_client(&["web"]),
    ));
    let log_path = topo.workdir.join("bench-observability-access.log");
    let observed = format!(
        "observability:\n  access_log: {{enabled: true, path: {}}}\n  tracing: {{otlp_endpoint: \"{}\", sampling: 0.01}}\n{config}",
        log_path.display(),
        OtlpReceiver::endpoint(),
    );
    let nginx = http_bench::start_nginx(&topo, server)?;
    let mut ratios = Vec::new();
    for round in 1..=OBSERVABILITY_ROUNDS {
        let mut rates = [0.0; 2];
        for (rate, (yaml, name)) in rates.iter_mut().zip([
            (&config, "metrics only"),
            (&observed, "metrics + access log + tracing 1% (OTLP)"),
        ]) {
            let agent = topo.start_agent(node, yaml, &[("NODEMESH_LOG", "warn")])?;
            topo.wait_ready(&agent)?;
            let row = http_row(
                &topo,
                client,
                &format!("same node, L7, {name}, round {round}"),
                WEB_VIP,
                &[agent.pid],
            )?;
            *rate = row.rate;
            http.push(row);
            topo.signal(agent.pid, libc::SIGTERM)?;
            topo.wait(agent.pid, Duration::from_secs(15))?;
        }
        ratios.push(rates[1] / rates[0].max(1.0));
    }
    http_bench::stop_nginx(&topo, nginx)?;
    let spans = receiver.spans().len();
    anyhow::ensure!(
        spans > 0,
        "the traced rows exported no span to the OTLP receiver"
    );
    Ok((
        Ratios {
            what: "same node: L7 with metrics + access log + tracing 1% / metrics only",
            ratios,
        },
        spans,
    ))
}

/// One HTTP benchmark row and its request rate (for the L7 / L4 ratios).
struct HttpRow {
    name: String,
    rate: f64,
    line: String,
}

/// Runs wrk against `target` and measures the CPU the `agents` spent meanwhile.
fn http_row(
    topo: &Topology,
    client: &Pod,
    name: &str,
    target: &str,
    agents: &[u32],
) -> Result<HttpRow> {
    http_row_with(topo, client, name, target, agents, &[])
}

/// [`http_row`] with extra wrk arguments.
fn http_row_with(
    topo: &Topology,
    client: &Pod,
    name: &str,
    target: &str,
    agents: &[u32],
    wrk_args: &[&str],
) -> Result<HttpRow> {
    let cpu_before: f64 = agents
        .iter()
        .map(|p| proc_stats::cpu_seconds(*p))
        .sum::<Result<f64>>()?;
    let switches_before = proc_stats::context_switches()?;
    let run = http_bench::wrk(topo, client, target, wrk_args)?;
    let switches = proc_stats::context_switches()? - switches_before;
    let cpu = agents
        .iter()
        .map(|p| proc_stats::cpu_seconds(*p))
        .sum::<Result<f64>>()?
        - cpu_before;
    let (cpu_per_k, rss) = if agents.is_empty() {
        ("-".to_owned(), "-".to_owned())
    } else {
        let sum = |field| -> Result<u64> {
            agents
                .iter()
                .map(|p| proc_stats::status_kib(*p, field))
                .sum()
        };
        let (now, peak) = (sum("VmRSS:")?, sum("VmHWM:")?);
        (
            format!("{:.3}", cpu / (run.requests.max(1) as f64 / 1000.0)),
            format!("{:.1} / {:.1}", now as f64 / 1024.0, peak as f64 / 1024.0),
        )
    };
    let line = format!(
        "| {name} | {:.0} | {} | {} | {} | {cpu_per_k} | {rss} | {:.2} |",
        run.rate,
        run.p50,
        run.p99,
        run.errors,
        switches as f64 / run.requests.max(1) as f64
    );
    Ok(HttpRow {
        name: name.to_owned(),
        rate: run.rate,
        line,
    })
}

/// The agents' CPU time and memory, from procfs.
mod proc_stats {
    use anyhow::{Context, Result};

    /// utime + stime of `pid` in seconds.
    pub fn cpu_seconds(pid: u32) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(ticks as f64 / hz)
    }

    /// Context switches of the whole machine since boot (`ctxt` in /proc/stat).
    pub fn context_switches() -> Result<u64> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        stat.lines()
            .find_map(|l| l.strip_prefix("ctxt "))
            .and_then(|v| v.trim().parse().ok())
            .context("no ctxt in /proc/stat")
    }

    /// A memory figure of `pid` from /proc/<pid>/status in KiB: `VmRSS:` (resident now) or
    /// `VmHWM:` (peak resident).
    pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {field} in /proc/{pid}/status"))
    }
}

fn same_node(http: &mut Vec<HttpRow>) -> Result<Ratios> {
    let mut topo =
        Topology::new().context("the benchmark creates network namespaces: run it as root")?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    let (client, server) = (node.pod("client"), node.pod("server"));
    topo.start_echo_server(server, 8080, "s")?;
    // The plain baselines use ports that are no service endpoint (an endpoint address is
    // captured like the VIP); the egress rule above lets the client reach them.
    topo.start_echo_server(server, BASELINE_PORT, "s")?;
    let config = node.agent_config(&format!(
        "services:\n  - name: echo\n    vip: {VIP}\n    endpoints: [\"{s}:8080\"]\n\
         \x20 - name: web\n    vip: {WEB_VIP}\n    endpoints: [\"{s}:{HTTP_PORT}\"]\n    policy: {{protocol: http}}\n\
         \x20 - name: web-l4\n    vip: {WEB_L4_VIP}\n    endpoints: [\"{s}:{HTTP_PORT}\"]\n    policy: {{protocol: tcp}}\n\
         \x20 - name: web-flaky\n    vip: {FLAKY_VIP}\n    endpoints: [\"{s}:{HTTP_PORT}\", \"{s}:{FAILING_HTTP_PORT}\"]\n    policy: {{protocol: http, load_balancer: round_robin, \
         retries: {{max: 3, backoff: {{base: 1ms, max: 10ms}}, budget: {{ratio: 1.0}}}}, circuit_breaker: {{failures: 1000000000}}}}\n\
         \x20 - name: web-flaky-ejected\n    vip: {FLAKY_EJECTED_VIP}\n    endpoints: [\"{s}:{HTTP_PORT}\", \"{s}:{FAILING_HTTP_PORT}\"]\n    policy: {{protocol: http, load_balancer: round_robin}}\n\
         egress:\n  rules:\n    - {{name: bench-baseline, cidr: 10.1.0.0/16}}\nworkloads:\n{}{}{}",
        client.workload_yaml("bench", "client"),
        server.workload_yaml("bench", "server"),
        allow_client(&["echo", "web", "web-l4", "web-flaky", "web-flaky-ejected"]),
        s = server.ip,
    ));
    let agent = topo.start_agent(node, &config, &[("NODEMESH_LOG", "warn")])?;
    topo.wait_ready(&agent)?;
    let direct = format!("{}:{BASELINE_PORT}", server.ip);
    row(
        &topo,
        client,
        "same node, plain TCP pod -> pod (connect4 pass-through)",
        &direct,
    )?;
    row(&topo, client, "same node, pod -> VIP -> agent -> pod", VIP)?;
    let nginx = http_bench::start_nginx(&topo, server)?;
    let direct = format!("{}:{BASELINE_HTTP_PORT}", server.ip);
    http.push(http_row(
        &topo,
        client,
        "same node, direct pod -> pod",
        &direct,
        &[],
    )?);
    let same = alternate_l4_l7(http, "same node: L7 / L4", |l7, round| {
        let (name, target) = if l7 {
            ("same node, L7: pod -> VIP -> agent (HTTP per request, upstream connections of the client connection) -> pod", WEB_VIP)
        } else {
            (
                "same node, L4: pod -> VIP -> agent (TCP relay) -> pod",
                WEB_L4_VIP,
            )
        };
        http_row(
            &topo,
            client,
            &format!("{name}, round {round}"),
            target,
            &[agent.pid],
        )
    })?;
    // One request per client connection: what the L7 path costs a client that does not keep
    // connections alive (the agent's upstream connections are still reused).
    let on_path: &[u32] = &[agent.pid];
    for (name, target, agents) in [
        (
            "same node, direct, one request per connection",
            direct.as_str(),
            &[][..],
        ),
        (
            "same node, L4, one request per connection",
            WEB_L4_VIP,
            on_path,
        ),
        (
            "same node, L7, one request per connection",
            WEB_VIP,
            on_path,
        ),
    ] {
        http.push(http_row_with(
            &topo,
            client,
            name,
            target,
            agents,
            &["-H", "Connection: close"],
        )?);
    }
    // Under failure: one of two endpoints answers 503. Held in (breaker never opens, budget
    // unbounded, backoff 0-1 ms), every other request is retried once on the healthy one;
    // with the default breaker the failing endpoint is ejected after 5 failures.
    for (name, target) in [
        (FLAKY_RETRIED_ROW, FLAKY_VIP),
        (FLAKY_EJECTED_ROW, FLAKY_EJECTED_VIP),
    ] {
        http.push(http_row(&topo, client, name, target, on_path)?);
    }
    // The same L7 path with the JSON access log on (a restart: the log is a start-up setting).
    // Istio and nodemesh metrics are recorded in both rows; they cannot be turned off.
    topo.signal(agent.pid, libc::SIGTERM)?;
    topo.wait(agent.pid, Duration::from_secs(15))?;
    let log_path = topo.workdir.join("bench-access.log");
    let with_log = format!(
        "observability:\n  access_log: {{enabled: true, path: {}}}\n{config}",
        log_path.display()
    );
    let agent = topo.start_agent(node, &with_log, &[("NODEMESH_LOG", "warn")])?;
    topo.wait_ready(&agent)?;
    http.push(http_row(
        &topo,
        client,
        "same node, L7 + JSON access log (file)",
        WEB_VIP,
        &[agent.pid],
    )?);
    http_bench::stop_nginx(&topo, nginx)?;
    Ok(same)
}

fn cross_node(http: &mut Vec<HttpRow>) -> Result<Ratios> {
    let mesh = TwoNodes::start(Options {
        log: Some("warn".into()),
        web_port: Some(HTTP_PORT),
        web_policy: Some("{protocol: tcp}".into()),
        ..Default::default()
    })?;
    let client = mesh.topo.node(1).pod("client");
    let direct = format!("{}:{BYPASS_PORT}", mesh.topo.node(2).pod("server").ip);
    row(
        &mesh.topo,
        client,
        "cross node, plain TCP pod -> pod",
        &direct,
    )?;
    row(
        &mesh.topo,
        client,
        "cross node, pod -> VIP -> agent -> HBONE mTLS (pooled) -> agent -> pod",
        ECHO_VIP,
    )?;
    let (rate, p50, p99, errors) = mtls_handshakes(&mesh)?;
    println!("| cross node, new mTLS connections to the agent's 15008 (TCP + TLS 1.3 handshake with client cert) | {rate:.0} | {p50} | {p99} | {errors} |");
    let server = mesh.topo.node(2).pod("server");
    let nginx = http_bench::start_nginx(&mesh.topo, server)?;
    let direct = format!("{}:{BASELINE_HTTP_PORT}", server.ip);
    let agents = [mesh.agent1.pid, mesh.agent2.pid];
    http.push(http_row(
        &mesh.topo,
        client,
        "cross node, direct pod -> pod",
        &direct,
        &[],
    )?);
    // One service, switched between L4 and L7 by live reloads of node 1's config.
    let node1 = mesh.topo.node(1);
    let path = mesh.topo.config_path(node1);
    let mut l7_now = false;
    let cross = alternate_l4_l7(http, "cross node: L7 / L4", |l7, round| {
        if l7 != l7_now {
            let before = mesh.topo.reloads(&mesh.agent1, "ok")?;
            let (from, to) = match l7 {
                true => ("{protocol: tcp}", "{protocol: http}"),
                false => ("{protocol: http}", "{protocol: tcp}"),
            };
            let text = std::fs::read_to_string(&path)?;
            std::fs::write(&path, text.replace(from, to))?;
            mesh.topo.wait_for("reload", Duration::from_secs(10), || {
                Ok(mesh.topo.reloads(&mesh.agent1, "ok")? > before)
            })?;
            l7_now = l7;
        }
        let name = match l7 {
            true => "cross node, L7: pod -> VIP -> agent (HTTP per request, upstream connections of the client connection, over HBONE) -> agent -> pod",
            false => "cross node, L4: pod -> VIP -> agent -> HBONE mTLS tunnel per connection -> agent -> pod",
        };
        http_row(
            &mesh.topo,
            client,
            &format!("{name}, round {round}"),
            WEB_VIP,
            &agents,
        )
    })?;
    http_bench::stop_nginx(&mesh.topo, nginx)?;
    Ok(cross)
}

/// Authorization policies admitting the client pod to each service (default deny).
fn allow_client(services: &[&str]) -> String {
    let mut yaml = "authorization:\n".to_owned();
    for s in services {
        yaml.push_str(&format!(
            "  - name: {s}-callers\n    service: {s}\n    default: deny\n    allow:\n      - from_service: client\n"
        ));
    }
    yaml
}

fn row(topo: &Topology, client: &Pod, name: &str, target: &str) -> Result<()> {
    let probe = probe_binary()?;
    let out = topo.run_in_pod(
        client,
        &probe.to_string_lossy(),
        &["bench", target, &SECONDS.to_string(), &WORKERS.to_string()],
    )?;
    let (rate, p50, p99, errors) = parse(&out)?;
    println!("| {name} | {rate:.0} | {p50} | {p99} | {errors} |");
    Ok(())
}

/// Full handshakes per second from node 1 to node 2's agent, with a certificate of shop/client.
fn mtls_handshakes(mesh: &TwoNodes) -> Result<(f64, u64, u64, u64)> {
    let (ca_cert, ca_key) = mesh.ca_files();
    let ca = MeshCa::from_pem_files(&ca_cert, &ca_key)?;
    let id = SpiffeId::new("cluster.local", "shop", "client")?;
    let store = Arc::new(CertStore::new());
    store.insert(ca.issue(
        &WorkloadSpec {
            id: id.clone(),
            service: "client".into(),
        },
        Duration::from_secs(3600),
    )?)?;
    let tls = client_config(
        ca.cert_der(),
        store,
        id,
        Some(agent_identity("cluster.local", "node-2")?),
    )?;
    let node2: SocketAddr = "10.0.0.2:15008".parse()?;
    mesh.topo.in_netns(&mesh.topo.node(1).netns, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let errors = Arc::new(AtomicU64::new(0));
            let deadline = Instant::now() + Duration::from_secs(SECONDS);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..WORKERS {
                let (tls, errors) = (tls.clone(), errors.clone());
                tasks.push(tokio::spawn(async move {
                    let connector = tokio_rustls::TlsConnector::from(tls);
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let done = async {
                            let tcp = tokio::net::TcpStream::connect(node2).await?;
                            let name = rustls::pki_types::ServerName::IpAddress(node2.ip().into());
                            connector.connect(name, tcp).await
                        };
                        match done.await {
                            Ok(_) => latencies.push(t.elapsed()),
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    latencies
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await?);
            }
            all.sort();
            let pct = |p: usize| {
                all.get(all.len().saturating_sub(1) * p / 100)
                    .map_or(0, |d| d.as_micros() as u64)
            };
            let rate = all.len() as f64 / start.elapsed().as_secs_f64();
            Ok((rate, pct(50), pct(99), errors.load(Ordering::Relaxed)))
        })
    })
}

/// (conn/s, p50, p99, errors) from meshprobe's JSON line.
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
