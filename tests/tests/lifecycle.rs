//! End-to-end agent lifecycle: config errors at start and on reload, hot reload reaching the
//! kernel, enforcement kept on SIGTERM and removed only by `--uninstall`, refusal to run
//! unprivileged.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::{cmd, topology, AgentHandle, Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const EPERM: i32 = 1;

fn config(node: &Node, deny: &str) -> String {
    node.agent_config(&format!(
        "services:\n  - name: echo\n    vip: {ECHO_VIP}\n    endpoints: [\"{}:8080\"]\n\
         workloads:\n{}authorization:\n  - name: echo-callers\n    service: echo\n    allow: [{{from_namespace: demo}}]\n\
         policy:\n  deny:\n{deny}",
        node.pod("server").ip,
        node.pod("client").workload_yaml("demo", "client"),
    ))
}

const DENY_ECHO: &str = "    - name: no-echo\n      from: demo/client\n      to: echo\n";

fn setup() -> Result<(Topology, AgentHandle)> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let agent = topo.start_agent(node, &config(node, "    []\n"), &[])?;
    topo.wait_ready(&agent)?;
    Ok((topo, agent))
}

#[test]
fn bad_config_at_start_exits_naming_the_field() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    let bad = config(
        node,
        "    - name: x\n      from: demo/client\n      to: nowhere\n",
    );
    let agent = topo.start_agent(node, &bad, &[])?;
    let status = topo.wait(agent.pid, Duration::from_secs(10))?;
    ensure!(!status.success(), "agent accepted a bad config");
    let log = agent.log_text();
    ensure!(
        log.contains("`policy.deny[0].to`") && log.contains("nowhere"),
        "log does not name the field:\n{log}"
    );
    ensure!(
        !std::path::Path::new("/sys/fs/bpf/nodemesh")
            .join(&node.instance)
            .exists(),
        "left pinned maps behind"
    );
    Ok(())
}

#[test]
fn bad_reload_keeps_the_old_config_and_a_good_one_reaches_the_kernel() -> Result<()> {
    let (topo, agent) = setup()?;
    let node = topo.node(1);
    let client = node.pod("client");
    let config_path = topo.config_path(node);

    // A typo'd field: rejected, counted, logged with the field; traffic keeps flowing.
    std::fs::write(
        &config_path,
        config(node, "    []\n").replace("endpoints:", "endpoint:"),
    )?;
    topo.wait_for("reload error", Duration::from_secs(10), || {
        Ok(topo.reloads(&agent, "error")? == 1)
    })?;
    ensure!(
        agent.log_text().contains("endpoint"),
        "log should name the bad field:\n{}",
        agent.log_text()
    );
    let ok = topo.connect_from(client, ECHO_VIP, "still", 1)?;
    ensure!(
        ok[0].ok && ok[0].reply == "srv:still",
        "old config not in force: {:?}",
        ok[0]
    );
    ensure!(!topo.has_exited(agent.pid), "agent died on a bad reload");

    // A valid change that names a cgroup that does not exist: rejected as a whole.
    std::fs::write(
        &config_path,
        config(node, DENY_ECHO).replace(
            "workloads:\n",
            "workloads:\n  - name: ghost\n    service_account: ghost\n    cgroup: /no/such/cgroup\n",
        ),
    )?;
    topo.wait_for("second reload error", Duration::from_secs(10), || {
        Ok(topo.reloads(&agent, "error")? == 2)
    })?;
    let still = topo.connect_from(client, ECHO_VIP, "x", 1)?;
    ensure!(
        still[0].ok,
        "half-applied reload: the deny rule took effect although the reload failed"
    );

    // A good config adding a deny rule: the kernel refuses the pair from now on.
    std::fs::write(&config_path, config(node, DENY_ECHO))?;
    topo.wait_for("good reload", Duration::from_secs(10), || {
        Ok(topo.reloads(&agent, "ok")? == 1)
    })?;
    let denied = topo.connect_from(client, ECHO_VIP, "y", 1)?;
    ensure!(
        denied[0].errno == Some(EPERM),
        "deny rule not applied by reload: {:?}",
        denied[0]
    );

    // SIGHUP reload back to no rule.
    std::fs::write(&config_path, config(node, "    []\n"))?;
    topo.signal(agent.pid, libc::SIGHUP)?;
    topo.wait_for("reload back", Duration::from_secs(10), || {
        Ok(topo.reloads(&agent, "ok")? >= 2)
    })?;
    let allowed = topo.connect_from(client, ECHO_VIP, "z", 1)?;
    ensure!(allowed[0].ok, "rule removal not applied: {:?}", allowed[0]);
    Ok(())
}

#[test]
fn sigterm_keeps_enforcement_and_only_uninstall_detaches() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    let agent = topo.start_agent(node, &config(node, DENY_ECHO), &[])?;
    topo.wait_ready(&agent)?;
    let client = node.pod("client");
    let pins = std::path::Path::new("/sys/fs/bpf/nodemesh").join(&node.instance);
    let attached = || {
        cmd::run(
            "bpftool",
            &["cgroup", "list", &client.cgroup_abs.to_string_lossy()],
        )
    };
    ensure!(
        pins.join("DENY").exists() && pins.join("links").is_dir(),
        "maps and links not pinned in {}",
        pins.display()
    );
    let before = attached()?;
    ensure!(
        before.contains("connect4") && before.contains("sock_ops"),
        "programs not attached:\n{before}"
    );

    topo.signal(agent.pid, libc::SIGTERM)?;
    let status = topo.wait(agent.pid, Duration::from_secs(15))?;
    ensure!(
        status.success(),
        "agent exit status {status}; log:\n{}",
        agent.log_text()
    );
    let after = attached()?;
    ensure!(
        after.contains("connect4") && after.contains("sock_ops"),
        "SIGTERM detached the programs (fail open):\n{after}"
    );
    let denied = topo.connect_from(client, ECHO_VIP, "stopped", 1)?;
    ensure!(
        denied[0].errno == Some(EPERM),
        "deny-list not enforced with the agent stopped: {:?}",
        denied[0]
    );

    let out = Command::new(topology::agent_binary()?)
        .arg("--uninstall")
        .arg("--config")
        .arg(topo.config_path(node))
        .output()?;
    ensure!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = attached()?;
    ensure!(
        !gone.contains("connect4") && !gone.contains("sock_ops"),
        "programs still attached after uninstall:\n{gone}"
    );
    ensure!(!pins.exists(), "pins left in {}", pins.display());

    // Without capture the VIP is just an unroutable address: no EPERM, no agent.
    let direct = topo.connect_from(client, ECHO_VIP, "gone", 1)?;
    ensure!(
        !direct[0].ok && direct[0].errno != Some(EPERM),
        "VIP still captured: {:?}",
        direct[0]
    );
    Ok(())
}

#[test]
fn unprivileged_agent_refuses_with_a_clear_error() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client"])?;
    let node = topo.node(1);
    let config_path = topo.workdir.join("unprivileged.yaml");
    std::fs::write(&config_path, node.agent_config("services: []\n"))?;
    // Ports above 1024 so binding is not what fails.
    let out = Command::new(topology::agent_binary()?)
        .arg("--config")
        .arg(&config_path)
        .env("NODEMESH_OUTBOUND_ADDR", "127.0.0.1:25101")
        .env("NODEMESH_METRICS_ADDR", "127.0.0.1:25020")
        .env("NODEMESH_HEALTH_ADDR", "127.0.0.1:25021")
        .uid(65534)
        .gid(65534)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "unprivileged agent started");
    ensure!(
        stderr.contains("must run as root"),
        "unclear error: {stderr}"
    );
    Ok(())
}

#[test]
fn admin_port_serves_config_workloads_certs_and_policy() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "server"])?;
    let node = topo.node(1);
    let agent = topo.start_agent(node, &config(node, DENY_ECHO), &[])?;
    topo.wait_ready(&agent)?;
    let admin: std::net::SocketAddr = "127.0.0.1:15000".parse()?;
    let get = |path: &str| -> Result<serde_json::Value> {
        let (status, body) = topo.in_netns(&node.netns, || mesh_tests::http::get(admin, path))?;
        ensure!(status == 200, "{path} answered {status}: {body}");
        Ok(serde_json::from_str(&body)?)
    };

    let dump = get("/config_dump")?;
    ensure!(
        dump["node"]["name"] == "node-1" && dump["services"][0]["vip"] == ECHO_VIP,
        "{dump:#}"
    );
    let workloads = get("/workloads")?;
    let client = &workloads["workloads"][0];
    ensure!(
        client["identity"] == "spiffe://cluster.local/ns/demo/sa/client",
        "{workloads:#}"
    );
    ensure!(
        client["capture_attached"] == true,
        "capture not reported attached: {workloads:#}"
    );
    let certs = get("/certs")?.to_string();
    for id in [
        "spiffe://cluster.local/ns/demo/sa/client",
        "spiffe://cluster.local/ns/nodemesh-system/sa/node.node-1",
    ] {
        ensure!(certs.contains(id), "no certificate for {id}: {certs}");
    }
    let policy = get("/policy")?;
    let rule = &policy["kernel_deny"][0];
    ensure!(
        rule["from"] == "demo/client" && rule["to"] == "echo" && rule["rule"] == "no-echo",
        "{policy:#}"
    );
    Ok(())
}
