//! HBONE end to end over real mTLS on 127.0.0.1: pool -> relay? -> server -> echo target.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_agent::identity::SpiffeId;
use mesh_agent::policy::authz::{Authorize, Authorizer};
use mesh_agent::policy::authz_config::AuthzConfig;
use mesh_agent::proxy::hbone::{HboneError, HbonePool, HboneServer, PoolConfig};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::time::timeout;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

const POLICY: &str = r#"
authorization:
  - name: echo-callers
    service: echo
    default: deny
    allow:
      - from_service: checkout
    deny:
      - from: spiffe://cluster.local/ns/shop/sa/web
"#;

struct TestCa {
    cert: Certificate,
    key: KeyPair,
}

struct Leaf {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    id: SpiffeId,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        Self { cert, key }
    }

    /// A workload/agent leaf: URI SAN spiffe://cluster.local/ns/<ns>/sa/<sa>, CN=<cn>, IP SAN
    /// 127.0.0.1 (the client verifies the node agent by IP).
    fn leaf(&self, ns: &str, sa: &str, cn: &str) -> Leaf {
        let uri = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = vec![
            SanType::URI(uri.as_str().try_into().expect("ia5 uri")),
            SanType::IpAddress(LOCALHOST),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf cert");
        Leaf {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            id: uri.parse().expect("spiffe id"),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("add root");
        Arc::new(roots)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_tls(ca: &TestCa, leaf: &Leaf) -> Arc<ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots(), provider())
        .build()
        .expect("client verifier");
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![leaf.cert.clone()],
            PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
        )
        .expect("server config");
    Arc::new(config)
}

fn client_tls(server_ca: &TestCa, leaf: &Leaf) -> Arc<ClientConfig> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(server_ca.roots())
        .with_client_auth_cert(
            vec![leaf.cert.clone()],
            PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
        )
        .expect("client config");
    Arc::new(config)
}

/// TCP echo server; counts accepted connections so tests can prove it was never reached.
async fn echo_target() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

struct Server {
    addr: SocketAddr,
    authorizer: Arc<Authorizer>,
    _shutdown: oneshot::Sender<()>,
}

async fn hbone_server(ca: &TestCa) -> Server {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind hbone");
    hbone_server_on(ca, listener)
}

fn hbone_server_on(ca: &TestCa, listener: TcpListener) -> Server {
    let leaf = ca.leaf("nodemesh", "agent", "agent");
    let config = AuthzConfig::from_yaml(POLICY).expect("policy yaml");
    let authorizer = Arc::new(Authorizer::new(&config).expect("policy"));
    let addr = listener.local_addr().expect("hbone addr");
    let (tx, rx) = oneshot::channel::<()>();
    let server = HboneServer::new(
        server_tls(ca, &leaf),
        authorizer.clone() as Arc<dyn Authorize>,
    )
    .with_target_connect_timeout(Duration::from_secs(2));
    tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        authorizer,
        _shutdown: tx,
    }
}

/// Writes `payload`, half-closes, and reads until the peer closes.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    timeout(TEST_TIMEOUT, stream.read_to_end(&mut back))
        .await
        .expect("echo EOF in time (half-close must propagate)")
        .expect("read");
    back
}

fn checkout(ca: &TestCa) -> Leaf {
    ca.leaf("shop", "checkout", "checkout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_echoes_bytes_and_half_closes() {
    let ca = TestCa::new("mesh ca");
    let (echo, accepted) = echo_target().await;
    let server = hbone_server(&ca).await;
    let client = checkout(&ca);
    let pool = HbonePool::new(PoolConfig::default());

    let stream = pool
        .connect(
            &client.id,
            client_tls(&ca, &client),
            server.addr,
            echo,
            "echo",
            None,
        )
        .await
        .expect("tunnel");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(stream, &payload).await, payload);

    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let stats = pool.stats();
    assert_eq!(
        (stats.connections_opened, stats.streams_opened),
        (1, 1),
        "{stats:?}"
    );
    // Allowed by from_service, i.e. the caller service came from the certificate CN.
    assert_eq!(server.authorizer.counters().get("echo-callers", true), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_share_one_connection() {
    const STREAMS: usize = 24;
    let ca = TestCa::new("mesh ca");
    let (echo, accepted) = echo_target().await;
    let server = hbone_server(&ca).await;
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig::default());

    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (pool, tls, id) = (pool.clone(), tls.clone(), client.id.clone());
        let node = server.addr;
        tasks.push(tokio::spawn(async move {
            let stream = pool
                .connect(&id, tls, node, echo, "echo", None)
                .await
                .expect("tunnel");
            let payload = format!("stream {i} ").repeat(1000).into_bytes();
            assert_eq!(round_trip(stream, &payload).await, payload);
        }));
    }
    for task in tasks {
        timeout(TEST_TIMEOUT, task)
            .await
            .expect("in time")
            .expect("stream task");
    }

    let stats = pool.stats();
    assert_eq!(stats.connections_opened, 1, "{stats:?}");
    assert_eq!(stats.streams_opened, STREAMS as u64, "{stats:?}");
    assert_eq!(stats.active_connections, 1, "{stats:?}");
    assert_eq!(stats.active_streams, 0, "{stats:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), STREAMS);
}

/// More tunnels at once than one HTTP/2 connection carries (the server allows 200 streams): the
/// pool dials more connections instead of making the 201st wait and fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_beyond_one_connections_stream_limit_get_more_connections() {
    const TUNNELS: usize = 250;
    let ca = TestCa::new("mesh ca");
    let (echo, accepted) = echo_target().await;
    let server = hbone_server(&ca).await;
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig::default());
    let mut open = Vec::new();
    for _ in 0..TUNNELS {
        let stream = timeout(
            TEST_TIMEOUT,
            pool.connect(&client.id, tls.clone(), server.addr, echo, "echo", None),
        )
        .await
        .expect("in time")
        .expect("tunnel");
        open.push(stream);
    }
    let stats = pool.stats();
    assert_eq!(stats.active_streams, TUNNELS as u64, "{stats:?}");
    let per_connection = PoolConfig::default().streams_per_connection;
    assert_eq!(
        stats.connections_opened,
        TUNNELS.div_ceil(per_connection) as u64,
        "{stats:?}"
    );
    // Every tunnel works, the last ones too.
    let last = open.pop().expect("a tunnel");
    assert_eq!(round_trip(last, b"last").await, b"last");
    drop(open);
    timeout(TEST_TIMEOUT, async {
        while accepted.load(Ordering::SeqCst) < TUNNELS {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every tunnel reached the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_released_but_busy_one_is_kept() {
    let idle = Duration::from_millis(200);
    let ca = TestCa::new("mesh ca");
    let (echo, _) = echo_target().await;
    let server = hbone_server(&ca).await;
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig {
        idle_timeout: idle,
        ..PoolConfig::default()
    });

    // A stream held open past the idle timeout keeps its connection.
    let mut held = pool
        .connect(&client.id, tls.clone(), server.addr, echo, "echo", None)
        .await
        .expect("tunnel");
    tokio::time::sleep(idle * 3).await;
    // A second stream now must reuse the busy connection, not dial a new one.
    let second = pool
        .connect(&client.id, tls.clone(), server.addr, echo, "echo", None)
        .await
        .expect("second tunnel");
    assert_eq!(round_trip(second, b"second").await, b"second");
    let stats = pool.stats();
    assert_eq!(
        stats.connections_opened, 1,
        "busy connection was released: {stats:?}"
    );
    held.write_all(b"still here")
        .await
        .expect("write on held stream");
    let mut buf = [0u8; 10];
    held.read_exact(&mut buf)
        .await
        .expect("read on held stream");
    assert_eq!(&buf, b"still here");
    drop(held);

    // Once idle, the connection is closed within a few sweep ticks.
    timeout(TEST_TIMEOUT, async {
        while pool.stats().active_connections != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("idle connection released");

    // The next stream dials a fresh connection.
    let stream = pool
        .connect(&client.id, tls, server.addr, echo, "echo", None)
        .await
        .expect("redial");
    assert_eq!(round_trip(stream, b"again").await, b"again");
    let stats = pool.stats();
    assert_eq!(
        (stats.connections_opened, stats.active_connections),
        (2, 1),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_from_another_ca_is_refused() {
    let ca = TestCa::new("mesh ca");
    let rogue_ca = TestCa::new("rogue ca");
    let (echo, accepted) = echo_target().await;
    let server = hbone_server(&ca).await;
    // Same SPIFFE ID as an allowed caller, but signed by the wrong CA.
    let rogue = checkout(&rogue_ca);
    let pool = HbonePool::new(PoolConfig::default());

    let result = timeout(
        TEST_TIMEOUT,
        pool.connect(
            &rogue.id,
            client_tls(&ca, &rogue),
            server.addr,
            echo,
            "echo",
            None,
        ),
    )
    .await
    .expect("fails in time");
    let err = result.expect_err("rogue client must be refused");
    assert!(
        !matches!(err, HboneError::Denied { .. }),
        "refused at handshake, not by policy: {err}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    assert!(
        server.authorizer.counters().snapshot().is_empty(),
        "no stream reached authorization"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_stream_is_reported_and_target_never_connected() {
    let ca = TestCa::new("mesh ca");
    let (echo, accepted) = echo_target().await;
    let server = hbone_server(&ca).await;
    // CN=checkout matches the allow rule, but the deny rule on the SPIFFE ID wins.
    let web = ca.leaf("shop", "web", "checkout");
    let pool = HbonePool::new(PoolConfig::default());

    let err = pool
        .connect(
            &web.id,
            client_tls(&ca, &web),
            server.addr,
            echo,
            "echo",
            None,
        )
        .await
        .expect_err("web is denied");
    match err {
        HboneError::Denied { reason } => {
            assert!(
                reason.contains("echo-callers") && reason.contains("deny[0]"),
                "{reason}"
            )
        }
        other => panic!("expected Denied, got {other}"),
    }
    // A caller matching no rule hits the default deny.
    let stranger = ca.leaf("other", "stranger", "stranger");
    let err = pool
        .connect(
            &stranger.id,
            client_tls(&ca, &stranger),
            server.addr,
            echo,
            "echo",
            None,
        )
        .await
        .expect_err("default deny");
    assert!(matches!(err, HboneError::Denied { .. }), "{err}");

    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "target must never see a denied connection"
    );
    assert_eq!(server.authorizer.counters().get("echo-callers", false), 2);
    assert_eq!(pool.stats().active_streams, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_or_node_fails_fast() {
    let ca = TestCa::new("mesh ca");
    let server = hbone_server(&ca).await;
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig::default());
    let closed = {
        let l = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        l.local_addr().expect("addr")
    };

    let err = timeout(
        TEST_TIMEOUT,
        pool.connect(&client.id, tls.clone(), server.addr, closed, "echo", None),
    )
    .await
    .expect("no hang")
    .expect_err("target is closed");
    match err {
        HboneError::Status { status, .. } => assert_eq!(status.as_u16(), 502),
        other => panic!("expected 502 from the server, got {other}"),
    }
    let err = timeout(
        TEST_TIMEOUT,
        pool.connect(&client.id, tls, closed, closed, "echo", None),
    )
    .await
    .expect("no hang")
    .expect_err("node is closed");
    assert!(matches!(err, HboneError::Connect { .. }), "{err}");
}

struct Relay {
    addr: SocketAddr,
    recording: Arc<Mutex<Vec<u8>>>,
    /// `notify_waiters` drops every relayed connection abruptly (a crashed peer).
    kill: Arc<Notify>,
}

/// Forwards TCP connections to `upstream` and records every byte in both directions.
async fn recording_relay(upstream: SocketAddr) -> Relay {
    async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, seen: Arc<Mutex<Vec<u8>>>) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            seen.lock().expect("recording").extend_from_slice(&buf[..n]);
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind relay");
    let addr = listener.local_addr().expect("relay addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recording = seen.clone();
    let kill = Arc::new(Notify::new());
    let killed = kill.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let both = futures_join(
                pump(cr, sw, recording.clone()),
                pump(sr, cw, recording.clone()),
            );
            let killed = killed.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = both => {}
                    () = killed.notified() => {}
                }
            });
        }
    });
    Relay {
        addr,
        recording: seen,
        kill,
    }
}

async fn futures_join(
    a: impl std::future::Future<Output = ()>,
    b: impl std::future::Future<Output = ()>,
) {
    tokio::join!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_on_the_wire() {
    let ca = TestCa::new("mesh ca");
    let (echo, _) = echo_target().await;
    let server = hbone_server(&ca).await;
    let Relay {
        addr: relay,
        recording,
        ..
    } = recording_relay(server.addr).await;
    let client = checkout(&ca);
    let pool = HbonePool::new(PoolConfig::default());

    let secret = b"NODEMESH-PLAINTEXT-CANARY-7f3a9c".repeat(64);
    let stream = pool
        .connect(
            &client.id,
            client_tls(&ca, &client),
            relay,
            echo,
            "echo",
            None,
        )
        .await
        .expect("tunnel through relay");
    assert_eq!(round_trip(stream, &secret).await, secret);

    let seen = recording.lock().expect("recording").clone();
    assert!(
        seen.len() > secret.len() * 2,
        "relay saw the traffic ({} bytes)",
        seen.len()
    );
    let canary = &secret[..32];
    assert!(
        !seen.windows(canary.len()).any(|w| w == canary),
        "payload visible in plaintext"
    );
    // The HTTP/2 headers (service name header) are encrypted too.
    let header = b"x-nodemesh-service";
    assert!(
        !seen.windows(header.len()).any(|w| w == header),
        "headers visible in plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_outlives_the_pool_that_opened_it() {
    let ca = TestCa::new("mesh ca");
    let (echo, _) = echo_target().await;
    let server = hbone_server(&ca).await;
    let client = checkout(&ca);
    let pool = HbonePool::new(PoolConfig::default());
    let stream = pool
        .connect(
            &client.id,
            client_tls(&ca, &client),
            server.addr,
            echo,
            "echo",
            None,
        )
        .await
        .expect("tunnel");
    drop(pool);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        round_trip(stream, b"after pool drop").await,
        b"after pool drop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains_open_tunnels() {
    let ca = TestCa::new("mesh ca");
    let (echo, _) = echo_target().await;
    let Server {
        addr,
        _shutdown: shutdown,
        ..
    } = hbone_server(&ca).await;
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig::default());
    let mut open = pool
        .connect(&client.id, tls.clone(), addr, echo, "echo", None)
        .await
        .expect("tunnel");

    shutdown.send(()).expect("server running");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The open tunnel keeps working through the GOAWAY drain...
    open.write_all(b"drain").await.expect("write");
    let mut buf = [0u8; 5];
    timeout(TEST_TIMEOUT, open.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&buf, b"drain");
    // ...while new streams are refused: the connection is draining and the listener is gone.
    let err = timeout(
        TEST_TIMEOUT,
        pool.connect(&client.id, tls, addr, echo, "echo", None),
    )
    .await
    .expect("no hang")
    .expect_err("server is shut down");
    assert!(!matches!(err, HboneError::Denied { .. }), "{err}");
    assert_eq!(round_trip(open, b"").await, b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_redials_after_the_connection_dies() {
    let ca = TestCa::new("mesh ca");
    let (echo, _) = echo_target().await;
    let server = hbone_server(&ca).await;
    let relay = recording_relay(server.addr).await;
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig::default());
    let stream = pool
        .connect(&client.id, tls.clone(), relay.addr, echo, "echo", None)
        .await
        .expect("tunnel");
    assert_eq!(round_trip(stream, b"before").await, b"before");

    relay.kill.notify_waiters();
    let stream = timeout(
        TEST_TIMEOUT,
        pool.connect(&client.id, tls, relay.addr, echo, "echo", None),
    )
    .await
    .expect("no hang")
    .expect("redialed");
    assert_eq!(round_trip(stream, b"after").await, b"after");
    let stats = pool.stats();
    assert_eq!(
        (stats.connections_opened, stats.streams_opened),
        (2, 2),
        "{stats:?}"
    );
}

/// A bare HTTP/2-over-mTLS client, to send requests the pool never would.
async fn raw_h2(ca: &TestCa, leaf: &Leaf, node: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let mut config = (*client_tls(ca, leaf)).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(node).await.expect("tcp");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(LOCALHOST.into()), tcp)
        .await
        .expect("tls");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_rejected() {
    let ca = TestCa::new("mesh ca");
    let (echo, accepted) = echo_target().await;
    let server = hbone_server(&ca).await;
    let mut h2 = raw_h2(&ca, &checkout(&ca), server.addr).await;

    let get = Request::get(format!("https://{echo}/"))
        .body(Empty::new())
        .expect("GET");
    let resp = h2.send_request(get).await.expect("GET answered");
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);

    let no_service = Request::builder()
        .method(Method::CONNECT)
        .uri(echo.to_string())
        .body(Empty::new())
        .expect("CONNECT");
    let resp = h2.send_request(no_service).await.expect("CONNECT answered");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let by_name = Request::builder()
        .method(Method::CONNECT)
        .uri("echo.shop.svc:80")
        .header("x-nodemesh-service", "echo")
        .body(Empty::new())
        .expect("CONNECT");
    let resp = h2.send_request(by_name).await.expect("CONNECT answered");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let unknown_protocol = Request::builder()
        .method(Method::CONNECT)
        .uri(echo.to_string())
        .header("x-nodemesh-service", "echo")
        .header("x-nodemesh-protocol", "http/2")
        .body(Empty::new())
        .expect("CONNECT");
    let resp = h2
        .send_request(unknown_protocol)
        .await
        .expect("CONNECT answered");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let reason = String::from_utf8_lossy(&body);
    assert!(reason.contains("x-nodemesh-protocol"), "{reason}");

    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_queued_behind_a_hung_dial_fail_together() {
    const CALLERS: usize = 8;
    let connect_timeout = Duration::from_millis(300);
    // Accepts TCP but never answers the TLS handshake.
    let silent = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let node = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    let ca = TestCa::new("mesh ca");
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig {
        connect_timeout,
        ..PoolConfig::default()
    });

    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let (pool, tls, id) = (pool.clone(), tls.clone(), client.id.clone());
        tasks.push(tokio::spawn(async move {
            pool.connect(&id, tls, node, node, "echo", None)
                .await
                .map(|_| ())
        }));
    }
    let mut timeouts = 0;
    for task in tasks {
        match timeout(TEST_TIMEOUT, task)
            .await
            .expect("in time")
            .expect("task")
        {
            Err(HboneError::Timeout { .. }) => timeouts += 1,
            Err(HboneError::NodeUnavailable { .. }) => {}
            other => panic!("expected a dial failure, got {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(
        timeouts, 1,
        "only the first caller should wait for the dial"
    );
    // Serial dials would take CALLERS * connect_timeout (2.4 s).
    assert!(elapsed < connect_timeout * 3, "took {elapsed:?}");
    assert_eq!(pool.stats().connections_opened, 0);
}

/// Pending TLS handshakes are capped per source address: silent connections from one source
/// beyond the cap are closed at once instead of each holding memory for the 10 s handshake
/// timeout; once the silent ones go, a real tunnel gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_from_one_source_are_capped() {
    use mesh_agent::admission::MAX_PENDING_HANDSHAKES_PER_SOURCE;
    let ca = TestCa::new("mesh ca");
    let (echo, _) = echo_target().await;
    let server = hbone_server(&ca).await;
    let mut silent = Vec::new();
    for _ in 0..MAX_PENDING_HANDSHAKES_PER_SOURCE {
        silent.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // Let the server accept them all: each now holds a pending-handshake slot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = TcpStream::connect(server.addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let closed = timeout(Duration::from_secs(2), over.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "connection beyond the cap was not closed: {closed:?}"
    );
    drop(silent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig::default());
    let stream = timeout(
        TEST_TIMEOUT,
        pool.connect(&client.id, tls, server.addr, echo, "echo", None),
    )
    .await
    .expect("in time")
    .expect("tunnel after the silent connections left");
    assert_eq!(round_trip(stream, b"after").await, b"after");
}

/// An HTTP server as the pod: answers "<version> <path>" on every request, for HTTP/1.1 or
/// HTTP/2 (prior knowledge) as its connections speak; counts connections.
async fn http_target() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind http");
    let addr = listener.local_addr().expect("http addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let service =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let text = format!("{:?} {}", req.version(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from(text)),
                    ))
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// Destination-reported request counts in a registry of its own.
struct Requests {
    registry: prometheus::Registry,
    istio: mesh_agent::metrics::istio::IstioMetrics,
}

impl mesh_agent::proxy::hbone::RequestMetrics for Requests {
    fn labels(
        &self,
        peer: &mesh_agent::proxy::hbone::PeerIdentity,
        service: &str,
    ) -> mesh_agent::metrics::istio::PeerLabels {
        mesh_agent::metrics::istio::PeerLabels::new(
            &peer.id,
            peer.service.as_deref(),
            service,
            "shop",
        )
    }

    fn series(
        &self,
        labels: &mesh_agent::metrics::istio::PeerLabels,
    ) -> mesh_agent::metrics::istio::HttpSeries {
        use mesh_agent::metrics::istio::{Reporter, Security};
        self.istio
            .http(labels, Reporter::Destination, Security::MutualTls)
    }

    fn requests(
        &self,
        labels: &mesh_agent::metrics::istio::PeerLabels,
        code: u16,
    ) -> prometheus::IntCounter {
        use mesh_agent::metrics::istio::{Reporter, Security};
        self.istio
            .requests(labels, Reporter::Destination, Security::MutualTls, code)
    }

    fn access_log(&self) -> Option<&mesh_agent::access_log::AccessLog> {
        None
    }
}

impl Requests {
    /// `istio_requests_total` summed over its series.
    fn total(&self) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == "istio_requests_total")
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value())
            .sum()
    }
}

/// Tunnels marked as carrying HTTP are served request by request by the destination agent
/// (which counts each one) over one connection to the pod: HTTP/2 requests multiplexed on
/// one tunnel, and HTTP/1.1 keep-alive requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tunnels_are_served_per_request() {
    use mesh_agent::proxy::hbone::TunnelProtocol;
    let ca = TestCa::new("mesh ca");
    let (pod, accepted) = http_target().await;
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind hbone");
    let addr = listener.local_addr().expect("hbone addr");
    let registry = prometheus::Registry::new();
    let requests = Arc::new(Requests {
        istio: mesh_agent::metrics::istio::IstioMetrics::new(&registry),
        registry,
    });
    let config = AuthzConfig::from_yaml(POLICY).expect("policy yaml");
    let authorizer = Arc::new(Authorizer::new(&config).expect("policy"));
    let leaf = ca.leaf("nodemesh", "agent", "agent");
    let (_stop, stopped) = oneshot::channel::<()>();
    let server = HboneServer::new(server_tls(&ca, &leaf), authorizer as Arc<dyn Authorize>)
        .with_request_metrics(requests.clone());
    tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let client = checkout(&ca);
    let tls = client_tls(&ca, &client);
    let pool = HbonePool::new(PoolConfig::default());
    let body = |resp: hyper::Response<hyper::body::Incoming>| async move {
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let get = |path: &str| {
        Request::get(format!("http://{pod}{path}"))
            .body(Empty::<Bytes>::new())
            .expect("GET")
    };

    let h2_tunnel = pool
        .connect_carrying(
            &client.id,
            tls.clone(),
            addr,
            pod,
            "echo",
            None,
            TunnelProtocol::Http2,
        )
        .await
        .expect("h2 tunnel");
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2_tunnel))
            .await
            .expect("h2 over the tunnel");
    tokio::spawn(conn);
    let mut h2b = h2.clone();
    let (a, b) = tokio::join!(h2.send_request(get("/a")), h2b.send_request(get("/b")));
    assert_eq!(body(a.expect("a")).await, "HTTP/2.0 /a");
    assert_eq!(body(b.expect("b")).await, "HTTP/2.0 /b");

    let h1_tunnel = pool
        .connect_carrying(
            &client.id,
            tls,
            addr,
            pod,
            "echo",
            None,
            TunnelProtocol::Http1,
        )
        .await
        .expect("h1 tunnel");
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(h1_tunnel))
        .await
        .expect("h1 over the tunnel");
    tokio::spawn(conn);
    for path in ["/c", "/d", "/e"] {
        h1.ready().await.expect("keep-alive connection ready");
        let resp = h1.send_request(get(path)).await.expect("h1 request");
        assert_eq!(body(resp).await, format!("HTTP/1.1 {path}"));
    }

    assert_eq!(requests.total(), 5.0);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one pod connection per tunnel"
    );
}
