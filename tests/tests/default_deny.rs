//! End-to-end: default deny in the seed's policy form. A service's callers are exactly its
//! allow-list (`services[].policy.allow`), enforced at connect() in the caller's kernel (EPERM);
//! a service without a policy refuses everyone until the operator relaxes `policy.default`.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::{Node, Topology};

const ECHO_VIP: &str = "10.96.0.10:80";
const OPEN_VIP: &str = "10.96.0.11:80";
const EPERM: i32 = 1;
const BYPASS_PORT: u16 = 9090;

fn config(node: &Node, mesh_default: &str) -> String {
    let server = node.pod("server").ip;
    // The workload serving echo (its certificate CN) is what `mTLS: required` makes strict.
    let server_workload = format!(
        "{}    service: echo\n",
        node.pod("server").workload_yaml("demo", "server")
    );
    node.agent_config(&format!(
        "services:\n\
         \x20 - name: echo\n    namespace: demo\n    vip: {ECHO_VIP}\n    endpoints: [\"{server}:8080\"]\n    policy:\n      allow: [client]\n      mTLS: required\n\
         \x20 - name: open\n    namespace: demo\n    vip: {OPEN_VIP}\n    endpoints: [\"{server}:8080\"]\n\
         workloads:\n{}{}{server_workload}\
         policy:\n  default: {mesh_default}\n",
        node.pod("client").workload_yaml("demo", "client"),
        node.pod("other").workload_yaml("demo", "other"),
    ))
}

#[test]
fn callers_are_exactly_the_allow_list_and_the_mesh_default_is_deny() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client", "other", "server"])?;
    let node = topo.node(1);
    topo.start_echo_server(node.pod("server"), 8080, "srv")?;
    topo.start_echo_server(node.pod("server"), BYPASS_PORT, "srv")?;
    let agent = topo.start_agent(node, &config(node, "deny"), &[])?;
    topo.wait_ready(&agent)?;
    let (client, other) = (node.pod("client"), node.pod("other"));

    let allowed = topo.connect_from(client, ECHO_VIP, "hi", 1)?;
    ensure!(
        allowed[0].ok && allowed[0].reply == "srv:hi",
        "allow-listed caller: {:?}",
        allowed[0]
    );
    let outside = topo.connect_from(other, ECHO_VIP, "hi", 1)?;
    ensure!(
        outside[0].errno == Some(EPERM),
        "caller outside the allow-list not refused at connect(): {:?}",
        outside[0]
    );
    for pod in [client, other] {
        let unprotected = topo.connect_from(pod, OPEN_VIP, "hi", 1)?;
        ensure!(
            unprotected[0].errno == Some(EPERM),
            "service without a policy reachable under default deny: {:?}",
            unprotected[0]
        );
    }
    // mTLS: required puts echo's serving workload in strict mode: a host process connecting
    // straight to the pod (a port that is no endpoint, so nothing captures it) is dropped.
    let server = format!("{}:{BYPASS_PORT}", node.pod("server").ip);
    let direct = topo.probe_from_node(node, &["connect", &server, "direct", "1", "1500"])?;
    ensure!(
        !direct.ok,
        "mTLS-required service reached directly: {direct:?}"
    );

    // The operator relaxes the mesh default explicitly: now the unprotected service opens up,
    // the allow-listed one stays closed to others.
    std::fs::write(topo.config_path(node), config(node, "allow"))?;
    topo.wait_for("reload", Duration::from_secs(10), || {
        Ok(topo.reloads(&agent, "ok")? == 1)
    })?;
    let open = topo.connect_from(other, OPEN_VIP, "hi", 1)?;
    ensure!(
        open[0].ok,
        "policy.default: allow not applied: {:?}",
        open[0]
    );
    let still = topo.connect_from(other, ECHO_VIP, "hi", 1)?;
    ensure!(
        still[0].errno == Some(EPERM),
        "allow-list lost on reload: {:?}",
        still[0]
    );
    Ok(())
}
