//! Multi-node mesh without a CA key on the nodes: the CA service (`mesh-agent ca serve`, its own
//! process) signs the agents' CSRs over mTLS, only for identities placed on the calling node.
//! Agents keep working from their (persisted) certificates while it is down, and an agent whose
//! first start finds it unreachable reports not ready until it answers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_agent::ca_service::client::load_node_cert;
use mesh_agent::ca_service::RemoteCa;
use mesh_agent::identity::persisted::load_pem_pair;
use mesh_agent::identity::{CertIssuer, CertStore, SpiffeId, TrustBundle, WorkloadSpec};
use mesh_tests::ca_service::{CaService, CA_ADDR};
use mesh_tests::http::metric;
use mesh_tests::two_nodes::{Options, TwoNodes, ECHO_VIP};
use mesh_tests::Topology;

/// Long enough to outlive the test, short enough that renewals (at half of the lifetime minus
/// the CA's 60 s clock-skew allowance) start within 30 s.
const SHORT_TTL: &str = "identity:\n  cert_ttl: 120s\n  allow_short_ttl: true\n";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("id")
}

fn echo_works(mesh: &TwoNodes, text: &str) -> Result<()> {
    let reply = mesh
        .topo
        .connect_from(mesh.topo.node(1).pod("client"), ECHO_VIP, text, 1)?;
    ensure!(
        reply[0].ok && reply[0].reply == format!("srv:{text}"),
        "cross-node call {text}: {:?}\nagent1:\n{}\nagent2:\n{}",
        reply[0],
        mesh.agent1.log_text(),
        mesh.agent2.log_text()
    );
    Ok(())
}

/// Two nodes whose agents get certificates from the CA service, checked with one call.
fn mesh_with_ca_service(identity_yaml: &str, first_call: &str) -> Result<TwoNodes> {
    let mesh = TwoNodes::start(Options {
        ca_service: true,
        identity_yaml: Some(identity_yaml.into()),
        ..Default::default()
    })?;
    echo_works(&mesh, first_call)?;
    Ok(mesh)
}

/// Every file below `dir` holding a private key holds the key of a leaf certificate of one of
/// `own` (the node's own identities); the CA key appears nowhere.
fn only_own_leaf_keys(dir: &Path, own: &[SpiffeId], ca_key: &str) -> Result<usize> {
    let mut keys = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            keys += only_own_leaf_keys(&path, own, ca_key)?;
            continue;
        }
        let text = std::fs::read(&path)?;
        let text = String::from_utf8_lossy(&text);
        ensure!(
            !text.contains(ca_key.trim()),
            "{} holds the CA key",
            path.display()
        );
        if !text.contains("PRIVATE KEY") {
            continue;
        }
        // A key file without its certificate pairs with the `.crt` beside it (bootstrap files).
        let cert = if text.contains("CERTIFICATE") {
            path.clone()
        } else {
            path.with_extension("crt")
        };
        let holder = own
            .iter()
            .find(|id| load_pem_pair(&cert, &path, id).is_ok())
            .with_context(|| {
                format!("{} holds a private key of none of {own:?}", path.display())
            })?;
        eprintln!("{}: leaf key of {holder}", path.display());
        keys += 1;
    }
    Ok(keys)
}

/// A signing request to the CA service from node 1's namespace, authenticated as `client`.
fn ask_ca(
    topo: &Topology,
    bundle: &Path,
    client: mesh_agent::identity::WorkloadCert,
    wanted: SpiffeId,
) -> Result<std::result::Result<(), String>> {
    let trust = TrustBundle::from_file(bundle)?;
    let store = Arc::new(CertStore::new());
    let as_id = client.spiffe_id.clone();
    store.insert(client)?;
    let remote = RemoteCa::new(
        CA_ADDR.parse()?,
        &trust,
        store,
        as_id,
        Duration::from_secs(3),
    )?;
    topo.in_netns(&topo.node(1).netns, || {
        let spec = WorkloadSpec {
            service: wanted.service_account.clone(),
            id: wanted,
        };
        Ok(remote
            .issue(&spec, Duration::from_secs(3600))
            .map(|_| ())
            .map_err(|e| e.to_string()))
    })
}

#[test]
fn nodes_without_a_ca_key_get_certificates_from_the_ca_service() -> Result<()> {
    let mut mesh = mesh_with_ca_service(SHORT_TTL, "via-ca-service")?;
    let topo = &mesh.topo;
    let ca = mesh.ca.as_ref().context("ca service")?;

    // No CA key on either node: only their own leaf keys, persisted for restarts.
    let ca_key = std::fs::read_to_string(ca.state_dir.join("ca.key"))?;
    let node_ids = |n: u8, placed: &[SpiffeId]| {
        let mut ids = placed.to_vec();
        ids.push(id("nodemesh-system", &format!("node.node-{n}")));
        ids
    };
    for (n, placed) in [
        (1, vec![id("shop", "client"), id("shop", "intruder")]),
        (2, vec![id("shop", "server")]),
    ] {
        let state = topo.state_dir(topo.node(n));
        ensure!(!state.join("ca.key").exists(), "node {n} has a CA key file");
        let keys = only_own_leaf_keys(&state, &node_ids(n, &placed), &ca_key)?;
        ensure!(
            keys >= placed.len(),
            "node {n}: {keys} persisted leaf keys, expected one per placed workload"
        );
        // The bootstrap directory (a Secret) holds the node's own key and no CA key either.
        let bootstrap = topo.workdir.join(format!("node-{n}-bootstrap"));
        only_own_leaf_keys(&bootstrap, &node_ids(n, &[]), &ca_key)?;
    }
    let m = ca.metrics(topo)?;
    let signed = metric(&m, "nodemesh_ca_csr_signed_total", &[]).unwrap_or(0);
    ensure!(signed >= 3, "CA signed {signed} CSRs:\n{m}");

    // Node 1 asking for node 2's workload: refused, counted as not_placed.
    let bootstrap1 = topo.workdir.join("node-1-bootstrap");
    let node1 = load_node_cert(
        &bootstrap1.join("node.crt"),
        &bootstrap1.join("node.key"),
        &id("nodemesh-system", "node.node-1"),
    )?;
    let bundle = bootstrap1.join("ca.crt");
    let stolen = ask_ca(topo, &bundle, node1, id("shop", "server"))?;
    ensure!(
        matches!(&stolen, Err(e) if e.contains("not placed")),
        "node 1 got node 2's identity: {stolen:?}"
    );
    // A workload certificate (no node identity) as the client: refused.
    let client_file = topo.state_dir(topo.node(1)).join("certs/shop.client.pem");
    let workload = load_pem_pair(&client_file, &client_file, &id("shop", "client"))?;
    let not_node = ask_ca(topo, &bundle, workload, id("shop", "client"))?;
    ensure!(
        matches!(&not_node, Err(e) if e.contains("not a node")),
        "a workload certificate got a CSR signed: {not_node:?}"
    );
    let m = ca.metrics(topo)?;
    for (reason, at_least) in [("not_placed", 1), ("not_a_node", 1)] {
        let n = metric(&m, "nodemesh_ca_csr_refused_total", &[("reason", reason)]).unwrap_or(0);
        ensure!(n >= at_least, "refused{{reason={reason}}} = {n}:\n{m}");
    }

    // CA down: traffic goes on with the certificates held; renewals fail and are counted.
    mesh.ca.as_mut().context("ca")?.stop(&mesh.topo)?;
    echo_works(&mesh, "ca-down")?;
    let topo = &mesh.topo;
    topo.wait_for(
        "a failed renewal on node 2",
        Duration::from_secs(45),
        || {
            Ok(metric(
                &topo.metrics(&mesh.agent2)?,
                "nodemesh_ca_renewal_failures_total",
                &[],
            )
            .unwrap_or(0)
                > 0)
        },
    )?;
    echo_works(&mesh, "ca-down-renewals-failing")?;

    // Restart node 2's agent while the CA is still down: it serves from its persisted certs.
    topo.signal(mesh.agent2.pid, libc::SIGTERM)?;
    topo.wait(mesh.agent2.pid, Duration::from_secs(30))?;
    let config2 = std::fs::read_to_string(topo.config_path(topo.node(2)))?;
    let agent2 = topo.start_agent_logged(topo.node(2), &config2, &[], "agent2-restarted")?;
    topo.wait_logged_ready(&agent2)?;
    topo.wait_ready(&agent2)?;
    mesh.agent2 = agent2;
    echo_works(&mesh, "restarted-while-ca-down")?;
    Ok(())
}

#[test]
fn first_start_without_the_ca_service_is_not_ready_until_it_answers() -> Result<()> {
    let mut topo = Topology::new()?;
    topo.add_node(&["client"])?;
    topo.add_node(&[])?;
    topo.link_nodes(1, 2)?;
    let mut ca = CaService::configure(&topo, &[("node-1", &["shop/client"])])?;
    let bootstrap = ca.issue_node(&topo, "node-1")?;
    let n1 = topo.node(1);
    let config = n1.agent_config(&format!(
        "workloads:\n{}{}",
        n1.pod("client").workload_yaml("shop", "client"),
        CaService::identity_yaml(&bootstrap, ""),
    ));
    // No CA service yet and nothing persisted: the agent runs, answers /ready with 503 and
    // lists the missing identity, and counts its failed requests.
    let agent = topo.start_agent(n1, &config, &[])?;
    let ready = |topo: &Topology| {
        topo.in_netns(&agent.netns, || {
            mesh_tests::http::get(agent.health, "/ready")
        })
    };
    topo.wait_for(
        "failed CA requests counted",
        Duration::from_secs(20),
        || {
            if topo.has_exited(agent.pid) {
                anyhow::bail!("agent exited without a CA service:\n{}", agent.log_text());
            }
            Ok(topo
                .metrics(&agent)
                .ok()
                .and_then(|m| metric(&m, "nodemesh_ca_renewal_failures_total", &[]))
                .unwrap_or(0)
                > 0)
        },
    )?;
    let (status, _) = ready(&topo)?;
    ensure!(
        status == 503,
        "/ready answered {status} without certificates"
    );
    let (_, health) = topo.in_netns(&agent.netns, || {
        mesh_tests::http::get(agent.health, "/health")
    })?;
    ensure!(
        health.contains("spiffe://cluster.local/ns/shop/sa/client"),
        "/health does not list the missing identity: {health}"
    );
    ensure!(!topo.has_exited(agent.pid), "agent exited");

    // The CA service comes up: the agent's backoff retry gets the certificate and it turns ready.
    ca.start(&topo)?;
    topo.wait_ready(&agent)?;
    let persisted = topo.state_dir(topo.node(1)).join("certs/shop.client.pem");
    ensure!(persisted.exists(), "certificate not persisted");
    ca.stop(&topo)?;
    Ok(())
}

/// Renewed every few seconds (half of 70 s + the 60 s skew allowance, minus that allowance), so a
/// root switch reaches every certificate quickly; the HBONE pool re-handshakes after 35 s.
const ROTATION_TTL: &str = "identity:\n  cert_ttl: 70s\n  allow_short_ttl: true\n";

/// The persisted certificates of both nodes' identities all chain to `roots` (and are valid).
fn all_certs_chain_to(topo: &Topology, roots: &TrustBundle) -> Result<bool> {
    for (n, ids) in [
        (
            1,
            vec![
                id("nodemesh-system", "node.node-1"),
                id("shop", "client"),
                id("shop", "intruder"),
            ],
        ),
        (
            2,
            vec![id("nodemesh-system", "node.node-2"), id("shop", "server")],
        ),
    ] {
        for id in ids {
            let file = topo
                .state_dir(topo.node(n))
                .join(format!("certs/{}.{}.pem", id.namespace, id.service_account));
            let Ok(cert) = load_pem_pair(&file, &file, &id) else {
                return Ok(false);
            };
            if !cert.leaf().is_some_and(|leaf| roots.verifies(leaf)) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[test]
fn root_rotation_loses_no_cross_node_connection() -> Result<()> {
    let mut mesh = mesh_with_ca_service(ROTATION_TTL, "before-rotation")?;
    let TwoNodes {
        topo,
        ca,
        agent1,
        agent2,
        ..
    } = &mut mesh;
    let topo: &Topology = topo;
    let ca = ca.as_mut().context("ca service")?;
    let client = topo.node(1).pod("client");
    let stop = std::sync::atomic::AtomicBool::new(false);

    let (attempts, failed) = std::thread::scope(|s| -> Result<(u64, Vec<String>)> {
        // A continuous stream of new cross-node connections for the whole rotation.
        let traffic = s.spawn(|| {
            let (mut attempts, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match topo.connect_from(client, ECHO_VIP, "rot", 10) {
                    Ok(results) => {
                        for a in results {
                            attempts += 1;
                            if !a.ok || a.reply != "srv:rot" {
                                failed.push(format!("{a:?}"));
                            }
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (attempts, failed)
        });
        let rotated = (|| -> Result<()> {
            let work = &topo.workdir;
            let old_root = std::fs::read_to_string(ca.state_dir.join("ca.crt"))?;
            let root2 = work.join("root2");
            ca.run(&["new-root", "--out", &root2.to_string_lossy()])?;
            let new_root = std::fs::read_to_string(root2.join("ca.crt"))?;
            let node_bundles = [
                work.join("node-1-bootstrap/ca.crt"),
                work.join("node-2-bootstrap/ca.crt"),
            ];
            let reloads = |log: String| log.matches("trust bundle reloaded").count();

            // 1. Every agent trusts the new root beside the old one.
            for b in &node_bundles {
                std::fs::write(b, format!("{old_root}{new_root}"))?;
            }
            topo.wait_for("agents trust both roots", Duration::from_secs(15), || {
                Ok(reloads(agent1.log_text()) >= 1 && reloads(agent2.log_text()) >= 1)
            })?;
            // 2. The CA service signs with the new root, trusting both.
            let ca_bundle = work.join("ca-bundle.pem");
            std::fs::write(&ca_bundle, format!("{old_root}{new_root}"))?;
            ca.rewrite_config(&format!(
                "ca_cert: {}\nca_key: {}\ntrust_bundle: {}\n",
                root2.join("ca.crt").display(),
                root2.join("ca.key").display(),
                ca_bundle.display()
            ))?;
            ca.stop(topo)?;
            ca.start(topo)?;
            // 3. Agents renew: every certificate they hold comes from the new root.
            let new_only = TrustBundle::from_file(&root2.join("ca.crt"))?;
            topo.wait_for(
                "every certificate from the new root",
                Duration::from_secs(60),
                || all_certs_chain_to(topo, &new_only),
            )?;
            // 4. The old root is removed everywhere.
            for b in node_bundles.iter().chain([&ca_bundle]) {
                std::fs::write(b, &new_root)?;
            }
            topo.wait_for("old root removed", Duration::from_secs(15), || {
                Ok(reloads(agent1.log_text()) >= 2
                    && reloads(agent2.log_text()) >= 2
                    && reloads(ca.log_text()) >= 1)
            })?;
            // 5. Longer than the HBONE pool's reuse age (half of cert_ttl): new handshakes
            // between the agents verify against the new root alone.
            std::thread::sleep(Duration::from_secs(40));
            ensure!(
                all_certs_chain_to(topo, &new_only)?,
                "a certificate from the old root came back"
            );
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (attempts, failed) = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?;
        rotated?;
        Ok((attempts, failed))
    })?;
    ensure!(
        failed.is_empty(),
        "{} of {attempts} connections failed during the rotation: {:?}\nagent1:\n{}\nagent2:\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        mesh.agent1.log_text(),
        mesh.agent2.log_text()
    );
    ensure!(
        attempts >= 100,
        "only {attempts} connections during the rotation"
    );
    echo_works(&mesh, "after-rotation")?;
    eprintln!("root rotation: {attempts} cross-node connections, 0 failed");
    Ok(())
}
