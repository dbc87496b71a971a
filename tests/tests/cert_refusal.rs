//! The live HBONE listener (port 15008 of node 2's agent) refuses clients whose certificate is
//! expired, from another CA, or carries a SPIFFE ID outside the trust domain. The client here is
//! an "attacker" that accepts any server and presents the certificate under test, so each refusal
//! can only come from the agent; the same client with a valid certificate gets through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Result};
use mesh_agent::identity::{MeshCa, SpiffeId, WorkloadCert, WorkloadSpec};
use mesh_agent::proxy::hbone::{HbonePool, PoolConfig};
use mesh_tests::two_nodes::{Options, TwoNodes, ECHO_PORT};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Accepts any server certificate: the attacker does not care who answers.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client certificate as the attacker presents it.
struct Presented {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    id: SpiffeId,
}

impl From<WorkloadCert> for Presented {
    fn from(c: WorkloadCert) -> Self {
        Presented {
            chain: c.chain,
            key: c.key,
            id: c.spiffe_id,
        }
    }
}

/// A leaf signed by the genuine mesh CA key whose SPIFFE ID lies outside the trust domain (the
/// mesh CA itself refuses to issue such a certificate, so it is forged here with rcgen).
fn forged_wrong_san(ca_cert: &std::path::Path, ca_key: &std::path::Path) -> Result<Presented> {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_key)?)?;
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(ca_cert)?)?
        .self_signed(&ca_key)?;
    let uri = "spiffe://evil.local/ns/shop/sa/client";
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::Ia5String::try_from(uri)?)];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = params.signed_by(&leaf_key, &ca, &ca_key)?;
    Ok(Presented {
        chain: vec![leaf.der().clone()],
        key: PrivateKeyDer::try_from(leaf_key.serialize_der()).map_err(anyhow::Error::msg)?,
        id: uri.parse()?,
    })
}

fn attacker_tls(cert: &Presented) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn spec(trust_domain: &str) -> Result<WorkloadSpec> {
    Ok(WorkloadSpec {
        id: SpiffeId::new(trust_domain, "shop", "client")?,
        service: "client".into(),
    })
}

/// Opens a tunnel from node 1 to the echo server on node 2 through node 2's agent and returns
/// the echo reply, or the error text.
fn tunnel(
    mesh: &TwoNodes,
    cert: &Presented,
    payload: &str,
) -> Result<std::result::Result<String, String>> {
    let tls = attacker_tls(cert)?;
    let target = SocketAddr::from((mesh.topo.node(2).pod("server").ip, ECHO_PORT));
    let node2: SocketAddr = "10.0.0.2:15008".parse()?;
    mesh.topo.in_netns(&mesh.topo.node(1).netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(async {
            let pool = HbonePool::new(PoolConfig {
                connect_timeout: Duration::from_secs(3),
                ..Default::default()
            });
            let mut stream = pool
                .connect(&cert.id, tls, node2, target, "echo", None)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .write_all(payload.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            stream.shutdown().await.map_err(|e| e.to_string())?;
            let mut reply = String::new();
            stream
                .read_to_string(&mut reply)
                .await
                .map_err(|e| e.to_string())?;
            Ok(reply)
        }))
    })
}

fn handshake_failures(mesh: &TwoNodes) -> usize {
    mesh.agent2
        .log_text()
        .matches("HBONE TLS handshake failed")
        .count()
}

#[test]
fn live_agent_refuses_expired_foreign_and_wrong_san_certificates() -> Result<()> {
    let mesh = TwoNodes::start(Options::default())?;
    let (ca_cert, ca_key) = mesh.ca_files();
    let ca = MeshCa::from_pem_files(&ca_cert, &ca_key)?;
    let now = SystemTime::now();

    // Control: the attacker client with a valid certificate of an authorized identity passes.
    let valid: Presented = ca
        .issue(&spec("cluster.local")?, Duration::from_secs(3600))?
        .into();
    let reply = tunnel(&mesh, &valid, "valid-cert")?;
    ensure!(
        reply.as_deref() == Ok("srv:valid-cert"),
        "valid certificate refused: {reply:?}\n{}",
        mesh.agent2.log_text()
    );

    let expired: Presented = ca
        .issue_with_validity(
            &spec("cluster.local")?,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )?
        .into();
    let rogue: Presented = MeshCa::generate("cluster.local")?
        .issue(&spec("cluster.local")?, Duration::from_secs(3600))?
        .into();
    let foreign_domain = forged_wrong_san(&ca_cert, &ca_key)?;
    let cases = [
        ("expired", &expired, "expired"),
        ("wrong CA", &rogue, "wrong-ca"),
        ("wrong SAN", &foreign_domain, "wrong-san"),
    ];
    for (name, cert, payload) in cases {
        let before = handshake_failures(&mesh);
        let outcome = tunnel(&mesh, cert, payload)?;
        ensure!(
            outcome.is_err(),
            "{name} certificate was accepted: {outcome:?}"
        );
        ensure!(
            !mesh.server_record().contains(payload),
            "{name}: the server saw the bytes"
        );
        // With TLS 1.3 the client can see the refusal before the server has logged it.
        let logged = mesh.topo.wait_for(
            "the refusal in node 2's log",
            Duration::from_secs(5),
            || Ok(handshake_failures(&mesh) > before),
        );
        ensure!(
            logged.is_ok(),
            "{name}: node 2's agent did not log a refused handshake:\n{}",
            mesh.agent2.log_text()
        );
        ensure!(
            handshake_failures(&mesh) == before + 1,
            "{name}: more than one refusal logged"
        );
    }
    // Counted before it is logged, so the counters are final once the last refusal is in the log.
    let m2 = mesh.topo.metrics(&mesh.agent2)?;
    let inbound = |result: &str| {
        mesh_tests::http::metric(
            &m2,
            "nodemesh_hbone_inbound_connections_total",
            &[("result", result)],
        )
    };
    ensure!(
        inbound("refused") == Some(3),
        "refused handshakes not counted:\n{m2}"
    );
    ensure!(
        inbound("accepted") == Some(1),
        "only the valid certificate should be accepted:\n{m2}"
    );
    let log = mesh.agent2.log_text();
    ensure!(
        log.contains("xpired"),
        "expiry not named in the refusal: {log}"
    );
    ensure!(
        log.contains("evil.local"),
        "foreign trust domain not named in the refusal: {log}"
    );
    Ok(())
}
