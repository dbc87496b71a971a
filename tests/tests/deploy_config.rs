//! The shipped example config (also embedded in deploy/configmap.yaml) must pass validation.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use mesh_tests::topology::agent_binary;
use serde::Deserialize;

#[test]
fn example_config_passes_agent_check() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = root.join("deploy/example-config.yaml");
    let out = Command::new(agent_binary()?)
        .arg("--check")
        .arg("--off-node")
        .arg("--config")
        .arg(&example)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "deploy/example-config.yaml rejected: {stderr}"
    );
    let effective = String::from_utf8_lossy(&out.stdout);
    ensure!(
        effective.contains("web-may-not-call-wallet"),
        "effective config lost the deny rule:\n{effective}"
    );

    let configmap = std::fs::read_to_string(root.join("deploy/configmap.yaml"))?;
    let example_text = std::fs::read_to_string(&example)?;
    let embedded_lines = example_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .all(|l| configmap.contains(l.trim_end()));
    ensure!(
        embedded_lines,
        "deploy/configmap.yaml no longer embeds deploy/example-config.yaml"
    );
    Ok(())
}

#[test]
fn check_rejects_a_bad_config_naming_the_field() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("nodemesh-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "node:\n  name: n\n  agent_ip: 10.0.0.1\nservices:\n  - name: s\n    vip: 10.96.0.1:0\n",
    )?;
    let out = Command::new(agent_binary()?)
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "bad config accepted");
    ensure!(
        stderr.contains("`services[0].vip`"),
        "error does not name the field: {stderr}"
    );
    Ok(())
}

/// The nonsense `--check` used to accept (issue 9): each is refused, naming the field, and the
/// deeply nested file is refused before parsing (no 20 s stall).
#[test]
fn check_refuses_the_configs_that_make_no_sense_for_an_agent() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("nodemesh-sanity-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let base = "node:\n  name: n\n  agent_ip: 10.0.0.1\n";
    let cases = [
        (
            "listen.hbone",
            format!("{base}listen:\n  outbound: 0.0.0.0:15101\n  hbone: 0.0.0.0:15110\n"),
        ),
        (
            "services[0].vip",
            format!("{base}services:\n  - {{name: s, vip: \"10.0.0.1:15101\"}}\n"),
        ),
        (
            "services[0].endpoints[0]",
            format!("{base}services:\n  - {{name: s, vip: \"10.96.0.1:80\", endpoints: [\"127.0.0.1:15000\"]}}\n"),
        ),
        ("node.agent_ip", base.replace("10.0.0.1", "127.0.0.1")),
        ("node.agent_ip", base.replace("10.0.0.1", "239.1.1.1")),
        (
            "workloads[0].cgroup",
            format!("{base}workloads:\n  - {{name: w, service_account: w, cgroup: \"pods/../../etc\"}}\n"),
        ),
        ("line 4", format!("{base}x: {}\n", "[".repeat(100_000))),
    ];
    let mut refused = 0;
    for (i, (field, text)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.yaml"));
        std::fs::write(&path, text)?;
        let out = Command::new(agent_binary()?)
            .arg("--check")
            .arg("--config")
            .arg(&path)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "case {i} accepted:\n{:.300}", text);
        ensure!(
            stderr.contains(&format!("`{field}`")),
            "case {i}: error does not name `{field}`: {stderr:.300}"
        );
        refused += 1;
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "--check refused {refused} of {} nonsense configs",
        cases.len()
    );
    Ok(())
}

/// The seed 001 §13 traffic profiles pass `--check` and keep their rules in the effective
/// config.
#[test]
fn traffic_profiles_pass_agent_check() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let profiles = root.join("deploy/traffic-profiles.yaml");
    let out = Command::new(agent_binary()?)
        .arg("--check")
        .arg("--off-node")
        .arg("--config")
        .arg(&profiles)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "deploy/traffic-profiles.yaml rejected: {stderr}"
    );
    let effective: serde_json::Value = serde_yaml_to_json(&String::from_utf8_lossy(&out.stdout))?;
    let policy = |name: &str| {
        effective["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name))
            .map(|s| s["policy"].clone())
            .unwrap_or_default()
    };
    let wallet = policy("wallet");
    ensure!(
        wallet["timeouts"]["request"] == "1000ms" && wallet["retries"]["enabled"] == false,
        "{wallet}"
    );
    let embassy = policy("embassy");
    ensure!(
        embassy["timeouts"]["request"] == "500ms"
            && embassy["retries"]["max"] == 1
            && embassy["rate_limit"] == "500/min",
        "{embassy}"
    );
    let orchestrator = policy("agent-orchestrator");
    ensure!(
        orchestrator["timeouts"]["request"] == "60000ms" && orchestrator["concurrency"] == 50,
        "{orchestrator}"
    );
    let router = policy("router");
    ensure!(
        router["timeouts"]["request"] == "15000ms"
            && router["retries"]["max"] == 2
            && router["concurrency"] == 200,
        "{router}"
    );
    Ok(())
}

/// `--check` prints the effective config as YAML.
fn serde_yaml_to_json(text: &str) -> Result<serde_json::Value> {
    Ok(serde_yaml::from_str(text)?)
}

/// Every metric the Grafana dashboard queries is one the agent documents in docs/REFERENCE.md
/// (histogram series by their family name), and the latency panels use histogram_quantile over
/// Istio's duration histogram.
#[test]
fn dashboard_queries_only_documented_metrics() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("deploy/grafana-dashboard.json"),
    )?)?;
    let reference = std::fs::read_to_string(root.join("docs/REFERENCE.md"))?;
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.extend(target["expr"].as_str().map(str::to_owned));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("nodemesh_") || word.starts_with("istio_") {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .filter(|_| !reference.contains(&format!("| `{word}` |")))
                    .unwrap_or(word);
                names.insert(family.to_owned());
            }
        }
    }
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !reference.contains(&format!("| `{n}` |")))
        .collect();
    ensure!(
        missing.is_empty(),
        "undocumented metrics in the dashboard: {missing:?}"
    );
    for q in ["0.5", "0.95", "0.99"] {
        ensure!(
            exprs
                .iter()
                .any(|e| e.starts_with(&format!("histogram_quantile({q},"))
                    && e.contains("istio_request_duration_milliseconds_bucket")),
            "no p{q} latency panel"
        );
    }
    Ok(())
}

/// deploy/ca-deployment.yaml: a Deployment running `mesh-agent ca --config <file> serve` whose
/// config (from the ConfigMap) the CA service accepts, the CA key mounted from a Secret the file
/// references but does not contain, and a Service selecting the pods on the signing port.
#[test]
fn ca_deployment_runs_the_ca_service_with_its_key_from_a_secret() -> Result<()> {
    use mesh_agent::ca_service::CaServiceConfig;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("deploy/ca-deployment.yaml"))?;
    ensure!(
        !text.contains("PRIVATE KEY") && !text.contains("kind: Secret"),
        "the manifest must reference the CA key Secret, not carry it"
    );
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d)?).map_err(Into::into))
        .collect::<Result<_>>()?;
    let of = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .cloned()
            .unwrap_or_default()
    };
    let (deployment, configmap, service) = (of("Deployment"), of("ConfigMap"), of("Service"));
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .collect();
    ensure!(
        args.first() == Some(&"ca") && args.last() == Some(&"serve") && args[1] == "--config",
        "container args {args:?}"
    );
    let config_path = std::path::Path::new(args[2]);
    let mount_of = |volume: &serde_json::Value| {
        container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == volume["name"])
            .and_then(|m| m["mountPath"].as_str())
            .map(std::path::PathBuf::from)
    };
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == configmap["metadata"]["name"])
        .context("no volume of the ConfigMap")?;
    ensure!(
        mount_of(config_volume).is_some_and(|m| config_path.starts_with(m)),
        "{} is not in the ConfigMap's mount",
        config_path.display()
    );
    let file_name = config_path
        .file_name()
        .and_then(|f| f.to_str())
        .context("config file name")?;
    let yaml = configmap["data"][file_name]
        .as_str()
        .with_context(|| format!("ConfigMap has no {file_name}"))?;
    let config = CaServiceConfig::parse(yaml, "deploy/ca-deployment.yaml")?;
    let secret_volume = volumes
        .iter()
        .find(|v| v["secret"]["secretName"].is_string())
        .context("no Secret volume for the CA key")?;
    let secret_mount = mount_of(secret_volume).context("Secret volume not mounted")?;
    for (field, path) in [("ca_cert", &config.ca_cert), ("ca_key", &config.ca_key)] {
        let path = path.as_ref().with_context(|| format!("{field} unset"))?;
        ensure!(
            path.starts_with(&secret_mount),
            "{field} {} is not in the Secret's mount {}",
            path.display(),
            secret_mount.display()
        );
    }
    let ports = |list: &serde_json::Value, key: &str| -> Vec<u64> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p[key].as_u64())
            .collect()
    };
    ensure!(
        ports(&container["ports"], "containerPort").contains(&u64::from(config.listen.port())),
        "container does not declare listen port {}",
        config.listen.port()
    );
    ensure!(
        service["spec"]["selector"]
            == deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
                .as_str()
                .map(|n| serde_json::json!({"app.kubernetes.io/name": n}))
                .unwrap_or_default(),
        "Service does not select the CA pods"
    );
    ensure!(
        service["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_ok()),
        "agents need the Service as ip:port: a fixed clusterIP"
    );
    ensure!(
        service["spec"]["ports"][0]["targetPort"] == "sign"
            && ports(&service["spec"]["ports"], "port").contains(&u64::from(config.listen.port())),
        "Service port: {}",
        service["spec"]["ports"]
    );
    Ok(())
}
