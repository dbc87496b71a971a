//! The agent binary's command line without the kernel: log formats, and start-up errors reported
//! once, before any side effect.

use std::process::{Command, Output};

use mesh_tests::topology::agent_binary;

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(agent_binary().expect("agent binary"));
    command
        .args(args)
        .env_remove("NODEMESH_LOG_FORMAT")
        .env_remove("NODEMESH_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("running mesh-agent")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn json_logs_are_one_object_per_line_and_the_error_is_printed_once() {
    let out = agent(
        &[
            "--config",
            "/nonexistent/nodemesh.yaml",
            "--log-format",
            "json",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected the error once:\n{err}");
    let value: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON log line");
    assert_eq!(value["level"], "ERROR", "{value}");
    let message = value["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("/nonexistent/nodemesh.yaml"), "{value}");
}

#[test]
fn env_selects_the_format_and_text_logs_have_no_colour_in_a_pipe() {
    let out = agent(
        &["--config", "/nonexistent/nodemesh.yaml"],
        &[("NODEMESH_LOG_FORMAT", "json")],
    );
    let err = stderr(&out);
    assert!(
        err.trim_start().starts_with('{'),
        "NODEMESH_LOG_FORMAT=json ignored:\n{err}"
    );

    let out = agent(
        &[
            "--config",
            "/nonexistent/nodemesh.yaml",
            "--log-format",
            "text",
        ],
        &[],
    );
    let err = stderr(&out);
    assert!(err.contains("ERROR"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "ANSI codes in piped stderr:\n{err:?}"
    );
    assert_eq!(
        err.matches("/nonexistent/nodemesh.yaml").count(),
        1,
        "printed more than once:\n{err}"
    );

    let bad = agent(&["--config", "/x", "--log-format", "xml"], &[]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("json"),
        "the error lists the accepted formats"
    );
}

/// A non-loopback IPv4 address of this host (validation refuses a loopback agent_ip: pods cannot
/// reach it); nothing is sent to it, `--check` only verifies that it is local.
fn local_address() -> String {
    let out = mesh_tests::cmd::run("ip", &["-4", "-o", "addr", "show", "scope", "global"])
        .expect("ip addr");
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .expect("a global IPv4 address on this host")
        .to_owned()
}

fn write_config(dir: &std::path::Path, cgroup: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    let text = format!(
        "node: {{name: n1, instance: agentcli-{pid}, agent_ip: {ip}}}\n\
         listen: {{outbound: '127.0.0.1:0', hbone: '127.0.0.1:0', metrics: '127.0.0.1:0', health: '127.0.0.1:0', admin: '127.0.0.1:0'}}\n\
         identity: {{state_dir: {state}}}\n\
         workloads:\n  - {{name: w, service_account: w, cgroup: {cgroup}}}\n",
        pid = std::process::id(),
        ip = local_address(),
        state = dir.join("state").display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn check_validates_cgroups_on_the_node_and_says_what_it_skipped() {
    let dir = tempfile_dir("check");
    let cgroup = format!("nodemesh-agentcli-{}", std::process::id());
    let config = write_config(&dir, &cgroup);
    let config_arg = config.to_str().expect("utf-8 path");

    let missing = agent(&["--check", "--config", config_arg], &[]);
    assert!(!missing.status.success(), "a missing cgroup passed --check");
    assert!(
        stderr(&missing).contains("workloads[0].cgroup:"),
        "{}",
        stderr(&missing)
    );
    let off = agent(&["--check", "--off-node", "--config", config_arg], &[]);
    assert!(off.status.success(), "{}", stderr(&off));
    assert!(String::from_utf8_lossy(&off.stdout).contains("# check skipped: cgroups"));

    // Start-up: refused before any side effect (no CA generated), error printed once.
    let start = agent(&["--config", config_arg], &[]);
    assert!(!start.status.success());
    assert_eq!(
        stderr(&start).matches("workloads[0].cgroup").count(),
        1,
        "{}",
        stderr(&start)
    );
    assert!(
        !dir.join("state").exists(),
        "the CA was generated before the config was known good"
    );

    let created = mesh_tests::topology::cgroup2_mount()
        .expect("cgroup2")
        .join(&cgroup);
    std::fs::create_dir_all(&created).expect("create cgroup");
    let ok = agent(&["--check", "--config", config_arg], &[]);
    let _ = std::fs::remove_dir(&created);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.contains("# check ok: workloads[0].cgroup:"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "# check ok: node.agent_ip: {} is local",
            local_address()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("# check skipped: kernel:"), "{stdout}");
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nodemesh-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
