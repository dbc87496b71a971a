use std::time::Duration;

use super::*;

const GOOD: &str = r#"
node:
  name: node-a
  agent_ip: 10.1.255.1
proxy:
  connect_timeout: 500ms
services:
  - name: echo
    namespace: demo
    vip: 10.96.0.10:80
    endpoints: ["10.1.2.2:8080", "10.1.3.2:8080"]
  - name: wallet
    vip: 10.96.0.20:80
workloads:
  - name: client
    namespace: demo
    service_account: client
    cgroup: /kubepods/client
policy:
  deny:
    - name: no-wallet
      from: demo/client
      to: wallet
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse_ok(text: &str) -> Config {
    parse(text, "test.yaml", &no_env).unwrap_or_else(|e| panic!("config should parse: {e}"))
}

fn parse_err(text: &str) -> String {
    match parse(text, "test.yaml", &no_env) {
        Ok(_) => panic!("config should be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn parses_a_full_config_with_defaults() {
    let c = parse_ok(GOOD);
    assert_eq!(c.node.instance, "default");
    assert_eq!(c.node.trust_domain, "cluster.local");
    assert_eq!(c.listen.outbound.port(), 15101);
    assert_eq!(c.listen.outbound_ports, 32);
    assert_eq!(c.listen.metrics.port(), 15020);
    assert_eq!(c.listen.health.port(), 15021);
    assert_eq!(c.proxy.connect_timeout, Duration::from_millis(500));
    assert_eq!(c.services[1].namespace, "default");
    assert_eq!(c.services[0].endpoints.len(), 2);
    assert_eq!(c.workloads[0].identity(), "demo/client");
}

#[test]
fn unknown_field_is_named() {
    let e = parse_err(&GOOD.replace("vip: 10.96.0.20:80", "vipp: 10.96.0.20:80"));
    assert!(e.contains("vipp"), "{e}");
}

#[test]
fn bad_values_name_their_field() {
    let cases = [
        (
            GOOD.replace("10.96.0.20:80", "10.96.0.10:80"),
            "services[1].vip",
        ),
        (
            GOOD.replace("name: wallet", "name: echo"),
            "services[1].name",
        ),
        (GOOD.replace("to: wallet", "to: bank"), "policy.deny[0].to"),
        (
            GOOD.replace("from: demo/client", "from: demo/ghost"),
            "policy.deny[0].from",
        ),
        (
            GOOD.replace("from: demo/client", "from: client"),
            "policy.deny[0].from",
        ),
        (GOOD.replace("name: node-a", "name: Node_A!"), "node.name"),
        (
            GOOD.replace("agent_ip: 10.1.255.1", "agent_ip: 0.0.0.0"),
            "node.agent_ip",
        ),
        (
            GOOD.replace("\"10.1.3.2:8080\"", "\"10.1.3.2:0\""),
            "services[0].endpoints[1]",
        ),
        (
            GOOD.replace("cgroup: /kubepods/client", "cgroup: \"\""),
            "workloads[0].cgroup",
        ),
    ];
    for (text, field) in cases {
        let e = parse_err(&text);
        assert!(
            e.contains(&format!("`{field}`")),
            "expected field {field} in: {e}"
        );
    }
}

#[test]
fn malformed_values_are_reported_with_position() {
    let e = parse_err(&GOOD.replace("10.96.0.20:80", "10.96.0.300:80"));
    assert!(e.contains("test.yaml") && e.contains("line"), "{e}");
    let e = parse_err(&GOOD.replace("500ms", "5 parsecs"));
    assert!(e.contains("5 parsecs"), "{e}");
}

#[test]
fn env_overrides_apply_before_validation() {
    let env = |name: &str| match name {
        "NODEMESH_AGENT_IP" => Some("10.9.9.9".to_owned()),
        "NODEMESH_INSTANCE" => Some("node-9".to_owned()),
        "NODEMESH_CONNECT_TIMEOUT" => Some("2s".to_owned()),
        "NODEMESH_STATE_DIR" => Some("/run/nodemesh-test".to_owned()),
        "NODEMESH_HBONE_ADDR" => Some("10.9.9.9:15008".to_owned()),
        _ => None,
    };
    let c = parse(GOOD, "test.yaml", &env).expect("valid");
    assert_eq!(c.node.agent_ip.to_string(), "10.9.9.9");
    assert_eq!(c.node.instance, "node-9");
    assert_eq!(c.proxy.connect_timeout, Duration::from_secs(2));
    assert_eq!(
        c.identity.state_dir,
        std::path::Path::new("/run/nodemesh-test")
    );
    assert_eq!(c.listen.hbone.to_string(), "10.9.9.9:15008");

    let bad = |name: &str| (name == "NODEMESH_METRICS_ADDR").then(|| "nowhere".to_owned());
    let e = parse(GOOD, "test.yaml", &bad)
        .expect_err("bad override")
        .to_string();
    assert!(
        e.contains("`listen.metrics`") && e.contains("NODEMESH_METRICS_ADDR"),
        "{e}"
    );
}

#[test]
fn durations_round_trip_and_reject_bad_units() {
    assert_eq!(duration_text::parse("3s"), Ok(Duration::from_secs(3)));
    assert_eq!(duration_text::parse("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(duration_text::parse("1h"), Ok(Duration::from_secs(3600)));
    assert!(duration_text::parse("3d").is_err());
    assert!(duration_text::parse("s").is_err());
    let c = parse_ok(GOOD);
    let again = parse_ok(&serde_yaml::to_string(&c).expect("serializes"));
    assert_eq!(
        c, again,
        "effective config dump parses back to the same config"
    );
}

#[test]
fn a_shared_nodes_list_may_name_this_node() {
    let text = format!(
        "{GOOD}nodes:\n  - {{name: node-a, hbone: \"10.0.0.1:15008\"}}\n  - {{name: node-b, hbone: \"10.0.0.2:15008\"}}\n"
    );
    let c = parse_ok(&text);
    let peers: Vec<&str> = c.peers().map(|n| n.name.as_str()).collect();
    assert_eq!(peers, vec!["node-b"]);
    let dup = format!("{text}  - {{name: node-b, hbone: \"10.0.0.3:15008\"}}\n");
    assert!(parse_err(&dup).contains("`nodes[2].name`"));
}

#[test]
fn ca_files_come_in_pairs_and_from_the_environment() {
    let e = parse_err(&format!("{GOOD}identity:\n  ca_cert: /etc/ca/tls.crt\n"));
    assert!(e.contains("`identity.ca_key`"), "{e}");
    let env = |name: &str| match name {
        "NODEMESH_CA_CERT" => Some("/etc/ca/tls.crt".to_owned()),
        "NODEMESH_CA_KEY" => Some("/etc/ca/tls.key".to_owned()),
        "NODEMESH_ADMIN_ADDR" => Some("127.0.0.1:16000".to_owned()),
        _ => None,
    };
    let c = parse(GOOD, "test.yaml", &env).expect("valid");
    assert_eq!(
        c.identity.ca_key.as_deref(),
        Some(std::path::Path::new("/etc/ca/tls.key"))
    );
    assert_eq!(c.listen.admin.port(), 16000);
}

#[test]
fn cert_ttl_is_bounded_unless_short_ttls_are_allowed() {
    let e = parse_err(&format!("{GOOD}identity:\n  cert_ttl: 1h\n"));
    assert!(
        e.contains("`identity.cert_ttl`") && e.contains("between 12h and 48h"),
        "{e}"
    );
    assert!(
        parse_err(&format!("{GOOD}identity:\n  cert_ttl: 49h\n")).contains("`identity.cert_ttl`")
    );
    let c = parse_ok(&format!(
        "{GOOD}identity:\n  cert_ttl: 4s\n  allow_short_ttl: true\n"
    ));
    assert_eq!(c.identity.cert_ttl, Duration::from_secs(4));
}

/// GOOD with one line replaced (the replaced text must be present).
fn good_with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from:?} not in GOOD");
    GOOD.replacen(from, to, 1)
}

#[test]
fn listeners_on_one_port_are_refused() {
    let text = format!(
        "{GOOD}listen:\n  outbound: 0.0.0.0:15001\n  outbound_ports: 1\n  hbone: 0.0.0.0:15001\n"
    );
    let e = parse_err(&text);
    assert!(
        e.contains("`listen.hbone`") && e.contains("listen.outbound"),
        "{e}"
    );
    // A wildcard overlaps a specific address on the same port.
    let text = format!("{GOOD}listen:\n  metrics: 0.0.0.0:15020\n  admin: 127.0.0.1:15020\n");
    assert!(parse_err(&text).contains("`listen.admin`"));
    // Port 0 takes a free port each time: never a clash.
    parse_ok(&format!(
        "{GOOD}listen:\n  outbound: 127.0.0.1:0\n  hbone: 127.0.0.1:0\n"
    ));
    // The outbound range covers every port from the first: 15001-15032 holds 15008 and 15020.
    let e = parse_err(&format!("{GOOD}listen:\n  outbound: 0.0.0.0:15001\n"));
    assert!(
        e.contains("`listen.metrics`") && e.contains("0.0.0.0:15001-15032"),
        "{e}"
    );
    parse_ok(&format!(
        "{GOOD}listen:\n  outbound: 0.0.0.0:15001\n  outbound_ports: 7\n"
    ));
}

#[test]
fn outbound_port_counts_out_of_range_are_refused() {
    for (yaml, says) in [
        ("outbound_ports: 0", "0: must be 1 to 1024"),
        ("outbound_ports: 1025", "1025: must be 1 to 1024"),
        (
            "outbound: 0.0.0.0:65530\n  outbound_ports: 7",
            "go past port 65535",
        ),
    ] {
        let e = parse_err(&format!("{GOOD}listen:\n  {yaml}\n"));
        assert!(
            e.contains("`listen.outbound_ports`") && e.contains(says),
            "{yaml}: {e}"
        );
    }
    parse_ok(&format!(
        "{GOOD}listen:\n  outbound: 0.0.0.0:65530\n  outbound_ports: 6\n"
    ));
}

#[test]
fn vip_or_endpoint_on_the_agents_own_ports_is_refused() {
    // Any port of the outbound range, not only the first.
    let e = parse_err(&good_with("vip: 10.96.0.10:80", "vip: 10.1.255.1:15120"));
    assert!(
        e.contains("`services[0].vip`") && e.contains("listen.outbound"),
        "{e}"
    );
    // A port-0 outbound listener is one kernel-chosen port, not a range from 0.
    let text = good_with("vip: 10.96.0.10:80", "vip: 10.1.255.1:5");
    parse_ok(&format!("{text}listen:\n  outbound: 0.0.0.0:0\n"));
    let e = parse_err(&good_with("\"10.1.2.2:8080\"", "\"10.1.255.1:15020\""));
    assert!(
        e.contains("`services[0].endpoints[0]`") && e.contains("listen.metrics"),
        "{e}"
    );
    // The admin port listens on loopback only: a loopback endpoint is refused outright.
    let e = parse_err(&good_with("\"10.1.2.2:8080\"", "\"127.0.0.1:15000\""));
    assert!(
        e.contains("`services[0].endpoints[0]`") && e.contains("loopback"),
        "{e}"
    );
    // The agent's address on another port is a legitimate endpoint (a host-network pod).
    parse_ok(&good_with("\"10.1.2.2:8080\"", "\"10.1.255.1:8080\""));
}

#[test]
fn loopback_or_multicast_agent_ip_is_refused() {
    for ip in ["127.0.0.1", "224.0.0.1", "255.255.255.255"] {
        let e = parse_err(&good_with(
            "agent_ip: 10.1.255.1",
            &format!("agent_ip: {ip}"),
        ));
        assert!(e.contains("`node.agent_ip`"), "{ip}: {e}");
    }
}

#[test]
fn cgroup_paths_cannot_leave_the_cgroup_root() {
    let e = parse_err(&good_with(
        "cgroup: /kubepods/client",
        "cgroup: /kubepods/../../etc",
    ));
    assert!(
        e.contains("`workloads[0].cgroup`") && e.contains(".."),
        "{e}"
    );
}

#[test]
fn deeply_nested_yaml_is_refused_before_parsing() {
    let flow = format!("{GOOD}x: {}\n", "[".repeat(100_000));
    assert!(parse_err(&flow).contains("nested too deeply"));
    let mut block = GOOD.to_owned();
    for depth in 0..300 {
        block.push_str(&format!("{}k{depth}:\n", " ".repeat(depth)));
    }
    assert!(parse_err(&block).contains("nested too deeply"));
    let dashes = format!("{GOOD}x: \n{}1\n", "- ".repeat(1000));
    assert!(parse_err(&dashes).contains("nested too deeply"));
    // Brackets inside quotes or comments are not nesting.
    parse_ok(&format!("{GOOD}# {}\n", "[".repeat(1000)));
}

#[test]
fn errors_quote_only_a_short_prefix_of_a_bad_value() {
    let long = "x".repeat(10_000);
    let e = parse_err(&good_with("name: wallet", &format!("name: {long}")));
    assert!(e.contains("`services[1].name`"), "{e}");
    assert!(e.len() < 300, "{} bytes: {e:.200}", e.len());
    let e = parse_err(&format!("{GOOD}bogus_{long}: 1\n"));
    assert!(e.len() < 500, "{} bytes", e.len());
}

#[test]
fn tracing_fields_are_checked_with_their_path() {
    let with = |block: &str| format!("{GOOD}observability:\n  tracing: {block}\n");
    let c = parse_ok(&with(
        "{otlp_endpoint: \"http://127.0.0.1:4317\", sampling: 0.5}",
    ));
    assert_eq!(
        c.observability.tracing.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4317")
    );
    assert_eq!(c.observability.tracing.sampling, 0.5);
    for (block, wanted) in [
        (
            "{otlp_endpoint: \"https://collector:4317\"}",
            "spans are sent without TLS",
        ),
        (
            "{otlp_endpoint: \"collector:4317\"}",
            "must be an http:// or https:// URL",
        ),
        ("{sampling: 1.5}", "must be within 0.0..=1.0"),
        ("{service_name: \"\"}", "must not be empty"),
    ] {
        let e = parse_err(&with(block));
        assert!(
            e.contains("observability.tracing.") && e.contains(wanted),
            "{block}: {e}"
        );
    }
}
