//! End-to-end across two nodes: pod -> agent -> HBONE (mTLS) -> agent -> pod, for real, with a
//! packet capture on the link between the nodes.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_tests::capture::{contains, packets_on_port};
use mesh_tests::http::metric;
use mesh_tests::l7::{count_code, curl, start_http_server};
use mesh_tests::topology::probe_binary;
use mesh_tests::two_nodes::{Options, TwoNodes, BYPASS_PORT, ECHO_VIP, WEB_VIP};

#[test]
fn cross_node_call_crosses_the_link_only_as_mtls() -> Result<()> {
    let mesh = TwoNodes::start(Options::default())?;
    let topo = &mesh.topo;
    let client = topo.node(1).pod("client");
    let capture = mesh.capture_uplink()?;

    let secret = "CANARY-mesh-7f3a91";
    let reply = topo.connect_from(client, ECHO_VIP, secret, 1)?;
    ensure!(
        reply[0].ok && reply[0].reply == format!("srv:{secret}"),
        "mesh call: {:?}\nagent1:\n{}\nagent2:\n{}",
        reply[0],
        mesh.agent1.log_text(),
        mesh.agent2.log_text()
    );
    // Control: the same capture does see plaintext that bypasses the mesh (server is not strict).
    let plain = "CANARY-plain-c0ffee";
    let direct = format!("{}:{BYPASS_PORT}", topo.node(2).pod("server").ip);
    let bypass = topo.connect_from(client, &direct, plain, 1)?;
    ensure!(
        bypass[0].ok,
        "plaintext control connection failed: {:?}",
        bypass[0]
    );
    let pcap_path = capture.pcap.clone();
    let wire = capture.finish()?;

    ensure!(
        contains(&wire, plain),
        "capture misses the plaintext control: the capture proves nothing"
    );
    ensure!(
        !contains(&wire, secret),
        "mesh payload crossed the link in plaintext"
    );
    ensure!(
        !packets_on_port(&pcap_path, 15008)?.is_empty(),
        "no HBONE (15008) traffic between the nodes"
    );

    // The server saw the bytes from the calling pod's address (node 2's agent connects
    // transparently, after authorizing the caller).
    let record = mesh.server_record();
    let caller = format!("{}:", mesh.topo.node(1).pod("client").ip);
    ensure!(
        record
            .lines()
            .any(|l| l.starts_with(&caller) && l.contains(secret)),
        "server record: {record}"
    );
    let m1 = topo.metrics(&mesh.agent1)?;
    ensure!(
        metric(
            &m1,
            "nodemesh_outbound_hbone_connections_total",
            &[("service", "echo")]
        ) == Some(1),
        "{m1}"
    );
    ensure!(
        metric(&m1, "nodemesh_hbone_connections_opened_total", &[]) == Some(1),
        "{m1}"
    );
    let m2 = topo.metrics(&mesh.agent2)?;
    let allowed = [("policy", "echo-callers"), ("decision", "allow")];
    ensure!(
        metric(&m2, "nodemesh_authz_decisions_total", &allowed) == Some(1),
        "{m2}"
    );
    // Istio's TCP families: the caller's agent reports the connection as source, node 2's
    // agent the tunnel as destination, both mutual_tls, with the exact bytes each way (the
    // echo server answers "srv:" + what it got).
    let (sent, received) = (secret.len() as u64, secret.len() as u64 + 4);
    for (m, reporter) in [(&m1, "source"), (&m2, "destination")] {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "shop"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
            ("destination_service", "echo.shop.svc.cluster.local"),
            ("destination_workload", "echo"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let tcp = |name| metric(m, name, &labels);
        ensure!(
            tcp("istio_tcp_connections_opened_total") == Some(1)
                && tcp("istio_tcp_connections_closed_total") == Some(1)
                && tcp("istio_tcp_sent_bytes_total") == Some(sent)
                && tcp("istio_tcp_received_bytes_total") == Some(received),
            "{reporter}: {m}"
        );
    }
    Ok(())
}

#[test]
fn unauthorized_identity_is_refused_by_the_destination_agent() -> Result<()> {
    let mesh = TwoNodes::start(Options::default())?;
    let topo = &mesh.topo;
    let intruder = topo.node(1).pod("intruder");
    let refused = topo.connect_from(intruder, ECHO_VIP, "let-me-in", 1)?;
    ensure!(
        refused[0].reply.is_empty(),
        "intruder got a reply: {:?}",
        refused[0]
    );
    ensure!(
        !mesh.server_record().contains("let-me-in"),
        "server saw the intruder's bytes"
    );

    let m2 = topo.metrics(&mesh.agent2)?;
    let denied = [("policy", "echo-callers"), ("decision", "deny")];
    ensure!(
        metric(&m2, "nodemesh_authz_decisions_total", &denied) == Some(1),
        "{m2}"
    );
    let streams = [("result", "denied")];
    ensure!(
        metric(&m2, "nodemesh_hbone_inbound_streams_total", &streams) == Some(1),
        "{m2}"
    );
    ensure!(
        mesh.agent2.log_text().contains("shop/sa/intruder"),
        "decision not logged with the source"
    );
    let m1 = topo.metrics(&mesh.agent1)?;
    ensure!(
        metric(
            &m1,
            "nodemesh_outbound_denied_total",
            &[("service", "echo")]
        ) == Some(1),
        "{m1}"
    );

    // The authorized identity still gets through on the same nodes.
    let ok = topo.connect_from(topo.node(1).pod("client"), ECHO_VIP, "hi", 1)?;
    ensure!(ok[0].ok && ok[0].reply == "srv:hi", "{:?}", ok[0]);
    Ok(())
}

#[test]
fn bypass_to_a_strict_pod_is_dropped_while_the_mesh_path_works() -> Result<()> {
    let mesh = TwoNodes::start(Options {
        strict_server: true,
        ..Default::default()
    })?;
    let topo = &mesh.topo;
    let client = topo.node(1).pod("client");
    let dropped = |m: &str| {
        metric(
            m,
            "nodemesh_kernel_inbound_dropped_total",
            &[("identity", "shop/server")],
        )
    };
    ensure!(dropped(&topo.metrics(&mesh.agent2)?) == Some(0));

    let via_mesh = topo.connect_from(client, ECHO_VIP, "through", 1)?;
    ensure!(
        via_mesh[0].ok && via_mesh[0].reply == "srv:through",
        "{:?}",
        via_mesh[0]
    );
    let direct = format!("{}:{BYPASS_PORT}", topo.node(2).pod("server").ip);
    let bypass =
        topo.connect_from_with_timeout(client, &direct, "around", 1, Duration::from_millis(1500))?;
    ensure!(
        !bypass[0].ok,
        "bypass reached the strict pod: {:?}",
        bypass[0]
    );
    ensure!(
        !std::fs::read_to_string(&mesh.bypass_record)
            .unwrap_or_default()
            .contains("around"),
        "strict pod saw bypass bytes"
    );
    ensure!(
        dropped(&topo.metrics(&mesh.agent2)?) >= Some(1),
        "drop not counted"
    );
    Ok(())
}

#[test]
fn certificate_rotation_under_continuous_traffic_drops_nothing() -> Result<()> {
    // 4 s certificates: renewed about every second on both agents while traffic flows.
    let identity = "identity:\n  cert_ttl: 4s\n  allow_short_ttl: true\n".to_owned();
    let mesh = TwoNodes::start(Options {
        identity_yaml: Some(identity),
        ..Default::default()
    })?;
    let topo = &mesh.topo;
    let client = topo.node(1).pod("client");
    let changes = |m: &str| metric(m, "nodemesh_identity_cert_changes_total", &[]).unwrap_or(0);
    let before = (
        changes(&topo.metrics(&mesh.agent1)?),
        changes(&topo.metrics(&mesh.agent2)?),
    );

    let probe = probe_binary()?;
    let out = topo.workdir.join("hold.out");
    let mut hold = Command::new(&probe);
    hold.args(["hold", ECHO_VIP, "tick", "8"])
        .stdout(File::create(&out)?)
        .stderr(Stdio::inherit());
    let hold_pid = topo.spawn_in_pod(client, &mut hold)?;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut fresh = 0;
    while Instant::now() < deadline {
        let a = topo.connect_from(client, ECHO_VIP, "new", 1)?;
        ensure!(
            a[0].ok && a[0].reply == "srv:new",
            "new connection {fresh} failed during rotation: {:?}",
            a[0]
        );
        fresh += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let status = topo.wait(hold_pid, Duration::from_secs(15))?;
    let held = std::fs::read_to_string(&out)?;
    ensure!(
        status.success(),
        "long-lived connection broke during rotation: {held}"
    );
    let exchanges: u64 = held
        .trim()
        .trim_start_matches("{\"exchanges\":")
        .trim_end_matches('}')
        .parse()
        .context(held.clone())?;
    ensure!(
        exchanges >= 40,
        "too few exchanges on the long-lived connection: {exchanges}"
    );

    let after = (
        changes(&topo.metrics(&mesh.agent1)?),
        changes(&topo.metrics(&mesh.agent2)?),
    );
    ensure!(
        after.0 >= before.0 + 4 && after.1 >= before.1 + 4,
        "certificates were not rotated: {before:?} -> {after:?}"
    );
    ensure!(fresh >= 20, "only {fresh} new connections were tried");
    // Pooled connections are not reused past half the TTL (2 s): new tunnels were carried by
    // fresh handshakes made with renewed certificates, while the long-lived one kept going.
    let dialed = metric(
        &topo.metrics(&mesh.agent1)?,
        "nodemesh_hbone_connections_opened_total",
        &[],
    )
    .unwrap_or(0);
    ensure!(
        dialed >= 3,
        "HBONE connections were not re-established with renewed certificates: {dialed}"
    );
    Ok(())
}

#[test]
fn capability_requirement_and_service_key_grant_apply_on_reload() -> Result<()> {
    let mesh = TwoNodes::start(Options::default())?;
    let topo = &mesh.topo;
    let (node2, client) = (topo.node(2), topo.node(1).pod("client"));
    let path = topo.config_path(node2);
    let original = std::fs::read_to_string(&path)?;
    let allow_rule = "      - from: spiffe://cluster.local/ns/shop/sa/client\n";
    ensure!(original.contains(allow_rule), "fixture changed: {original}");

    // The policy now also requires a capability the client does not hold: refused.
    let requiring = original.replace(
        allow_rule,
        &format!("{allow_rule}    capabilities:\n      required: [service.echo.call]\n"),
    );
    std::fs::write(&path, &requiring)?;
    topo.wait_for("capability reload", Duration::from_secs(10), || {
        Ok(topo.reloads(&mesh.agent2, "ok")? == 1)
    })?;
    let refused = topo.connect_from(client, ECHO_VIP, "no-key", 1)?;
    ensure!(
        refused[0].reply.is_empty(),
        "caller without the capability got through: {:?}",
        refused[0]
    );
    ensure!(
        !mesh.server_record().contains("no-key"),
        "server saw bytes of a refused caller"
    );

    // A service key grants it: the same caller is admitted.
    let granted = format!("{requiring}service_keys:\n  - identity: spiffe://cluster.local/ns/shop/sa/client\n    capabilities: [service.echo.call]\n");
    std::fs::write(&path, granted)?;
    topo.wait_for("service key reload", Duration::from_secs(10), || {
        Ok(topo.reloads(&mesh.agent2, "ok")? == 2)
    })?;
    let admitted = topo.connect_from(client, ECHO_VIP, "with-key", 1)?;
    ensure!(
        admitted[0].ok && admitted[0].reply == "srv:with-key",
        "caller holding the capability refused: {:?}",
        admitted[0]
    );

    let m2 = topo.metrics(&mesh.agent2)?;
    let count = |d: &str| {
        metric(
            &m2,
            "nodemesh_authz_decisions_total",
            &[("policy", "echo-callers"), ("decision", d)],
        )
    };
    ensure!(
        count("deny") == Some(1) && count("allow") == Some(1),
        "{m2}"
    );
    Ok(())
}

/// With the access log on, a cross-node connection gets a line from each agent (the caller's as
/// `source`, the destination's as `destination`, both mTLS, the same bytes), and a refused
/// identity's tunnel gets `policy: deny` lines naming it.
#[test]
fn access_log_has_both_ends_of_a_cross_node_connection() -> Result<()> {
    let path = access_log_path("tcp");
    let mesh = TwoNodes::start(Options {
        identity_yaml: Some(access_log_yaml(&path)),
        ..Options::default()
    })?;
    let topo = &mesh.topo;
    let text = "through-the-tunnel";
    let reply = topo.connect_from(topo.node(1).pod("client"), ECHO_VIP, text, 1)?;
    ensure!(
        reply[0].ok && reply[0].reply == format!("srv:{text}"),
        "{reply:?}"
    );
    let refused = topo.connect_from(topo.node(1).pod("intruder"), ECHO_VIP, "let-me-in", 1)?;
    ensure!(refused[0].reply.is_empty(), "{refused:?}");

    let lines = access_log_lines(&path, |lines| lines.len() >= 4)?;
    let find = |reporter: &str, sa: &str| {
        lines.iter().find(|l| {
            l["reporter"] == reporter
                && l["source_principal"]
                    == format!("spiffe://cluster.local/ns/shop/sa/{sa}").as_str()
        })
    };
    let server = format!("{}:8080", topo.node(2).pod("server").ip);
    let (sent, received) = (text.len() as u64, text.len() as u64 + 4);
    for reporter in ["source", "destination"] {
        let l =
            find(reporter, "client").with_context(|| format!("no {reporter} line: {lines:#?}"))?;
        ensure!(
            l["kind"] == "tcp"
                && l["destination_service"] == "echo.shop.svc.cluster.local"
                && l["endpoint"] == server.as_str()
                && l["policy"] == "allow"
                && l["connection_security_policy"] == "mutual_tls"
                && l["bytes_sent"] == sent
                && l["bytes_received"] == received,
            "{l}"
        );
        let denied = find(reporter, "intruder")
            .with_context(|| format!("no {reporter} line for the intruder: {lines:#?}"))?;
        ensure!(denied["policy"] == "deny", "{denied}");
    }
    Ok(())
}

/// A fresh access-log file for one test.
fn access_log_path(test: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("nodemesh-access-{test}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Config turning the access log on into `path`; appended to both agents' configs, it ends
/// with the `identity:` block the fixture fills.
fn access_log_yaml(path: &std::path::Path) -> String {
    format!(
        "observability:\n  access_log: {{enabled: true, path: {}}}\nidentity:\n",
        path.display()
    )
}

/// The JSON lines of the access log once `enough` holds (or after 5 s); removes the file.
fn access_log_lines(
    path: &std::path::Path,
    enough: impl Fn(&[serde_json::Value]) -> bool,
) -> Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("not JSON lines: {log}"))?;
        if enough(&lines) || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::fs::remove_file(path);
    Ok(lines)
}

/// Port of the HTTP server behind service `web` on the server pod.
const WEB_PORT: u16 = 8081;

/// Two nodes with service `web` (HTTP, a `meshprobe http` server on the server pod) and the
/// access log on in `path`.
fn web_mesh(path: &std::path::Path) -> Result<(TwoNodes, mesh_tests::l7::HttpServer)> {
    let mesh = TwoNodes::start(Options {
        identity_yaml: Some(access_log_yaml(path)),
        web_port: Some(WEB_PORT),
        web_policy: Some("{protocol: http}".into()),
        ..Options::default()
    })?;
    let server = start_http_server(
        &mesh.topo,
        mesh.topo.node(2).pod("server"),
        WEB_PORT,
        "web",
        "ok",
    )?;
    Ok((mesh, server))
}

/// Istio labels of shop/client calling `web` over the mesh, as `reporter` reports them.
fn web_labels(reporter: &'static str) -> [(&'static str, &'static str); 7] {
    [
        ("reporter", reporter),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/client",
        ),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("destination_workload", "web"),
        ("connection_security_policy", "mutual_tls"),
    ]
}

/// HTTP keep-alive requests across nodes: the destination agent sees each one (it serves the
/// marked tunnel request by request), logs one line per request with the caller's mTLS
/// identity, and reports Istio request metrics as `destination` whose counts match what was
/// sent, per response code; an opaque TCP service still works byte for byte alongside.
#[test]
fn destination_agent_counts_and_logs_each_http_request() -> Result<()> {
    let path = access_log_path("http");
    let (mesh, server) = web_mesh(&path)?;
    let topo = &mesh.topo;
    let client = topo.node(1).pod("client");
    let ok = curl(topo, client, &format!("http://{WEB_VIP}/"), 3, &[])?;
    let missing = curl(topo, client, &format!("http://{WEB_VIP}/missing"), 2, &[])?;
    ensure!(
        count_code(&ok, 200) == 3 && count_code(&missing, 404) == 2,
        "{ok:?} {missing:?}\nagent2:\n{}",
        mesh.agent2.log_text()
    );
    ensure!(server.requests().len() == 5, "{:?}", server.requests());
    // Opaque TCP across the same nodes: unmarked tunnel, relayed byte for byte.
    let text = "opaque-bytes-\u{1}\u{2}-end";
    let reply = topo.connect_from(client, ECHO_VIP, text, 1)?;
    ensure!(
        reply[0].ok && reply[0].reply == format!("srv:{text}"),
        "{reply:?}"
    );

    let http_lines = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|l| l["kind"] == "http" && l["reporter"] == "destination")
            .cloned()
            .collect::<Vec<_>>()
    };
    let lines = access_log_lines(&path, |l| http_lines(l).len() >= 5)?;
    let destination = http_lines(&lines);
    let endpoint = format!("{}:{WEB_PORT}", topo.node(2).pod("server").ip);
    ensure!(destination.len() == 5, "{lines:#?}");
    for (code, path, count) in [(200, "/", 3), (404, "/missing", 2)] {
        let matching = destination
            .iter()
            .filter(|l| {
                l["response_code"] == code
                    && l["path"] == path
                    && l["method"] == "GET"
                    && l["source_principal"] == "spiffe://cluster.local/ns/shop/sa/client"
                    && l["source_workload"] == "client"
                    && l["destination_service"] == "web.shop.svc.cluster.local"
                    && l["endpoint"] == endpoint.as_str()
                    && l["connection_security_policy"] == "mutual_tls"
                    && l["policy"] == "allow"
                    && l["bytes_received"] == 4
            })
            .count();
        ensure!(matching == count, "{code} {path}: {destination:#?}");
    }

    let m2 = topo.metrics(&mesh.agent2)?;
    let m1 = topo.metrics(&mesh.agent1)?;
    for (m, reporter) in [(&m2, "destination"), (&m1, "source")] {
        let labels = web_labels(reporter);
        for (code, count) in [("200", 3), ("404", 2)] {
            let mut with_code = labels.to_vec();
            with_code.push(("response_code", code));
            ensure!(
                metric(m, "istio_requests_total", &with_code) == Some(count),
                "{reporter} {code}: {m}"
            );
        }
        for family in [
            "istio_request_duration_milliseconds_count",
            "istio_request_bytes_count",
            "istio_response_bytes_count",
        ] {
            ensure!(
                metric(m, family, &labels) == Some(5),
                "{reporter} {family}: {m}"
            );
        }
        // The server answers "web\n" to each request.
        ensure!(
            metric(m, "istio_response_bytes_sum", &labels) == Some(20),
            "{reporter}: {m}"
        );
    }
    Ok(())
}

/// An HTTP/1.1 upgrade across nodes goes through the destination agent's HTTP serving: the
/// 101 reaches the client, the upgraded bytes flow both ways, and the destination counts it.
#[test]
fn http_upgrade_across_nodes_is_relayed_after_101() -> Result<()> {
    let path = access_log_path("upgrade");
    let (mesh, _server) = web_mesh(&path)?;
    let topo = &mesh.topo;
    let request = "GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nraw-bytes-after-upgrade";
    let replies = topo.connect_from(topo.node(1).pod("client"), WEB_VIP, request, 1)?;
    let reply = &replies[0].reply;
    ensure!(
        replies[0].ok
            && reply.starts_with("HTTP/1.1 101")
            && reply.ends_with("\r\n\r\nraw-bytes-after-upgrade"),
        "{replies:?}\nagent2:\n{}",
        mesh.agent2.log_text()
    );
    let mut labels = web_labels("destination").to_vec();
    labels.push(("response_code", "101"));
    let m2 = topo.metrics(&mesh.agent2)?;
    ensure!(
        metric(&m2, "istio_requests_total", &labels) == Some(1),
        "{m2}"
    );
    let lines = access_log_lines(&path, |l| {
        l.iter()
            .any(|l| l["reporter"] == "destination" && l["kind"] == "http")
    })?;
    ensure!(
        lines.iter().any(|l| l["reporter"] == "destination"
            && l["kind"] == "http"
            && l["path"] == "/chat"
            && l["response_code"] == 101),
        "{lines:#?}"
    );
    Ok(())
}
