//! Real mTLS handshakes over loopback TCP between configs built by the identity module.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_agent::identity::{
    client_config, peer_spiffe_id, server_config, CertStore, MeshCa, SpiffeId, WorkloadCert,
    WorkloadSpec,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TD: &str = "cluster.local";
const TTL: Duration = Duration::from_secs(3600);
const LIMIT: Duration = Duration::from_secs(5);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).expect("valid id")
}

fn spec(id: &SpiffeId, service: &str) -> WorkloadSpec {
    WorkloadSpec {
        id: id.clone(),
        service: service.to_owned(),
    }
}

/// A store holding one certificate, as the agent holds one per local workload.
fn store_with(cert: WorkloadCert) -> Arc<CertStore> {
    let store = Arc::new(CertStore::new());
    store.insert(cert).expect("usable cert");
    store
}

fn loopback() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

/// Accepts one connection, reports the client's SPIFFE ID and echoes one message.
async fn serve_once(config: Arc<rustls::ServerConfig>) -> (SocketAddr, ServerTask) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(config).accept(tcp).await?;
        let peer = peer_spiffe_id(tls.get_ref().1).map_err(io::Error::other)?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
        Ok(peer)
    });
    (addr, task)
}

type ServerTask = tokio::task::JoinHandle<io::Result<SpiffeId>>;

async fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config).connect(loopback(), tcp).await
}

/// Client round trip: handshake, then "hello" out and back. The error of a refused client
/// certificate only shows after the handshake in TLS 1.3, hence the round trip.
async fn round_trip(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> io::Result<SpiffeId> {
    let mut tls = connect(config, addr).await?;
    let server = peer_spiffe_id(tls.get_ref().1).map_err(io::Error::other)?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    tls.write_all(b"hello").await?;
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"hello");
    Ok(server)
}

struct Mesh {
    ca: MeshCa,
    server_id: SpiffeId,
    client_id: SpiffeId,
}

impl Mesh {
    fn new() -> Self {
        Self {
            ca: MeshCa::generate(TD).expect("ca"),
            server_id: id("shop", "api"),
            client_id: id("shop", "web"),
        }
    }

    fn server(&self) -> Arc<rustls::ServerConfig> {
        let cert = self
            .ca
            .issue(&spec(&self.server_id, "api"), TTL)
            .expect("issue");
        server_config(self.ca.cert_der(), store_with(cert), self.server_id.clone())
            .expect("server config")
    }

    fn client_with(
        &self,
        cert: WorkloadCert,
        expect: Option<SpiffeId>,
    ) -> Arc<rustls::ClientConfig> {
        client_config(
            self.ca.cert_der(),
            store_with(cert),
            self.client_id.clone(),
            expect,
        )
        .expect("client config")
    }

    fn client(&self, expect: Option<SpiffeId>) -> Arc<rustls::ClientConfig> {
        let cert = self
            .ca
            .issue(&spec(&self.client_id, "web"), TTL)
            .expect("issue");
        self.client_with(cert, expect)
    }
}

/// Runs a client against a one-shot server and returns both sides' results.
async fn exchange(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (io::Result<SpiffeId>, io::Result<SpiffeId>) {
    let (addr, task) = serve_once(server).await;
    let client = timeout(LIMIT, round_trip(client, addr))
        .await
        .expect("client in time");
    let server = timeout(LIMIT, task)
        .await
        .expect("server in time")
        .expect("server task");
    (client, server)
}

fn assert_refused(result: &io::Result<SpiffeId>, why: &str) {
    match result {
        Ok(peer) => panic!("{why}: accepted peer {peer}"),
        Err(e) => eprintln!("{why}: refused as expected: {e}"),
    }
}

#[tokio::test]
async fn mutual_tls_succeeds_and_each_side_reads_the_peer_spiffe_id() {
    let mesh = Mesh::new();
    let (client, server) = exchange(mesh.server(), mesh.client(Some(mesh.server_id.clone()))).await;
    assert_eq!(client.expect("client side"), mesh.server_id);
    assert_eq!(server.expect("server side"), mesh.client_id);

    // Without an expected ID any peer of the trust domain is accepted. Reusing both configs
    // checks that the second connection is a full handshake too (no resumption).
    let (server_cfg, client_cfg) = (mesh.server(), mesh.client(None));
    for _ in 0..2 {
        let (client, server) = exchange(server_cfg.clone(), client_cfg.clone()).await;
        assert_eq!(client.expect("client side"), mesh.server_id);
        assert_eq!(server.expect("server side"), mesh.client_id);
    }
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let mesh = Mesh::new();
    let rogue = MeshCa::generate(TD).expect("rogue ca");
    let cert = rogue
        .issue(&spec(&mesh.client_id, "web"), TTL)
        .expect("issue");
    let (client, server) = exchange(mesh.server(), mesh.client_with(cert, None)).await;
    assert_refused(&server, "server, client cert from another CA");
    let err = server.expect_err("refused").to_string();
    // Same subject name as the mesh CA, so webpki finds it and the signature check fails.
    assert!(err.contains("BadSignature"), "{err}");
    assert_refused(&client, "client, after the server refused it");
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let mesh = Mesh::new();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cert = mesh
        .ca
        .issue_with_validity(&spec(&mesh.client_id, "web"), now - 2 * hour, now - hour)
        .expect("issue expired");
    let (client, server) = exchange(mesh.server(), mesh.client_with(cert, None)).await;
    assert_refused(&server, "server, expired client cert");
    let err = server.expect_err("refused").to_string();
    assert!(err.contains("expired"), "{err}");
    assert_refused(&client, "client, after the server refused it");
}

#[tokio::test]
async fn server_with_unexpected_spiffe_id_is_refused_by_the_client() {
    let mesh = Mesh::new();
    let wanted = id("bank", "wallet");
    let (client, server) = exchange(mesh.server(), mesh.client(Some(wanted.clone()))).await;
    assert_refused(&client, "client expecting another server ID");
    let err = client.expect_err("refused").to_string();
    assert!(
        err.contains(&wanted.to_string()) && err.contains(&mesh.server_id.to_string()),
        "{err}"
    );
    assert_refused(&server, "server, after the client aborted");
}

#[tokio::test]
async fn client_without_cert_is_refused() {
    let mesh = Mesh::new();
    // The client's workload has no certificate in its store, so it presents none.
    let empty = Arc::new(CertStore::new());
    let client = client_config(mesh.ca.cert_der(), empty, mesh.client_id.clone(), None)
        .expect("client config");
    let (client, server) = exchange(mesh.server(), client).await;
    assert_refused(&server, "server, client without cert");
    let err = server.expect_err("refused").to_string();
    assert!(err.contains("no certificates"), "{err}");
    assert_refused(&client, "client, after the server refused it");
}

#[tokio::test]
async fn server_cert_from_another_ca_is_refused_by_the_client() {
    let mesh = Mesh::new();
    let rogue = MeshCa::generate(TD).expect("rogue ca");
    let cert = rogue
        .issue(&spec(&mesh.server_id, "api"), TTL)
        .expect("issue");
    let server = server_config(rogue.cert_der(), store_with(cert), mesh.server_id.clone())
        .expect("server config");
    let (client, _server) = exchange(server, mesh.client(Some(mesh.server_id.clone()))).await;
    let err = client.expect_err("refused").to_string();
    // Same subject name as the mesh CA, so webpki finds it and the signature check fails.
    assert!(err.contains("BadSignature"), "{err}");
}

#[tokio::test]
async fn expired_server_cert_is_refused_by_the_client() {
    // The client verifier replaces WebPkiServerVerifier, so validity must still be enforced.
    let mesh = Mesh::new();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cert = mesh
        .ca
        .issue_with_validity(&spec(&mesh.server_id, "api"), now - 2 * hour, now - hour)
        .expect("issue expired");
    let server = server_config(mesh.ca.cert_der(), store_with(cert), mesh.server_id.clone())
        .expect("server config");
    let (client, _server) = exchange(server, mesh.client(Some(mesh.server_id.clone()))).await;
    let err = client.expect_err("refused").to_string();
    assert!(err.contains("expired"), "{err}");
}
