//! Certificate rotation against a real CA, observed through the store and live TLS connections.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mesh_agent::identity::{
    client_config, peer_spiffe_id, server_config, spawn_rotation, Backoff, CertIssuer, CertStore,
    IdentityError, MeshCa, RotationConfig, SpiffeId, WorkloadCert, WorkloadSpec,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TD: &str = "cluster.local";

fn spec(ns: &str, sa: &str, service: &str) -> WorkloadSpec {
    WorkloadSpec {
        id: SpiffeId::new(TD, ns, sa).expect("valid id"),
        service: service.to_owned(),
    }
}

/// Waits for the next store change, at most `limit`.
async fn next_change(changes: &mut watch::Receiver<u64>, limit: Duration) {
    timeout(limit, changes.changed())
        .await
        .expect("store changed in time")
        .expect("store alive");
}

/// Echo server: every accepted connection echoes until EOF; reports the presented leaf per
/// connection is done by the client.
async fn echo_server(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = TlsAcceptor::from(Arc::clone(&config));
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await?;
                let mut buf = [0u8; 64];
                loop {
                    let n = tls.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<_, io::Error>(());
                    }
                    tls.write_all(&buf[..n]).await?;
                    tls.flush().await?;
                }
            });
        }
    });
    addr
}

async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    timeout(Duration::from_secs(2), tls.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn cert_is_renewed_at_half_life_without_breaking_established_connections() {
    // No backdating, so the 4 s TTL is the whole lifetime and renewal is due after ~2 s.
    let ca = Arc::new(
        MeshCa::generate(TD)
            .expect("ca")
            .with_clock_skew(Duration::ZERO),
    );
    let server = spec("shop", "api", "api");
    let client = spec("shop", "web", "web");
    let store = Arc::new(CertStore::new());
    let mut changes = store.subscribe();
    let config = RotationConfig {
        ttl: Duration::from_secs(4),
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
        },
    };
    // The client's cert lasts longer so only the server's rotates during the test.
    store
        .insert(ca.issue(&client, Duration::from_secs(3600)).expect("issue"))
        .expect("insert");
    changes.mark_unchanged();
    let (stop, shutdown) = watch::channel(false);
    let server_task = spawn_rotation(ca.clone(), store.clone(), server.clone(), config, shutdown);
    next_change(&mut changes, Duration::from_secs(2)).await;
    changes.mark_unchanged();
    let first = store.get(&server.id).expect("initial server cert");

    let server_cfg =
        server_config(ca.cert_der(), store.clone(), server.id.clone()).expect("server");
    let client_cfg = client_config(
        ca.cert_der(),
        store.clone(),
        client.id.clone(),
        Some(server.id.clone()),
    )
    .expect("client");
    let addr = echo_server(server_cfg).await;
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let connector = TlsConnector::from(client_cfg);
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut old_conn = connector
        .connect(name.clone(), tcp)
        .await
        .expect("handshake");
    assert_eq!(
        old_conn.get_ref().1.peer_certificates().expect("certs")[0],
        first.chain[0]
    );
    echo(&mut old_conn, b"before renewal").await;

    next_change(&mut changes, Duration::from_secs(5)).await;
    let renewed_at = SystemTime::now();
    let second = store.get(&server.id).expect("renewed server cert");
    assert_ne!(
        second.chain[0], first.chain[0],
        "store swapped in a new certificate"
    );
    assert!(
        renewed_at >= first.renew_at(),
        "not renewed before half-life"
    );
    let late = renewed_at
        .duration_since(first.renew_at())
        .expect("after renew_at");
    assert!(
        late < Duration::from_millis(800),
        "renewed {late:?} after half-life"
    );
    assert!(
        first.is_valid_at(renewed_at),
        "renewed while the old cert was still valid"
    );

    // The connection made with the old certificate keeps working in both directions.
    echo(&mut old_conn, b"after renewal").await;

    // New handshakes get the new certificate.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut new_conn = connector
        .connect(name, tcp)
        .await
        .expect("handshake after renewal");
    assert_eq!(
        new_conn.get_ref().1.peer_certificates().expect("certs")[0],
        second.chain[0]
    );
    assert_eq!(
        peer_spiffe_id(new_conn.get_ref().1).expect("peer id"),
        server.id
    );
    echo(&mut new_conn, b"new connection").await;
    echo(&mut old_conn, b"old still fine").await;

    stop.send(true).expect("rotation task alive");
    timeout(Duration::from_secs(1), server_task)
        .await
        .expect("stops on shutdown")
        .expect("no panic");
}

/// Wraps the real CA and fails the first `failures` issuances, recording when each attempt came.
struct FlakyCa {
    ca: MeshCa,
    failures: AtomicUsize,
    attempts: Mutex<Vec<Instant>>,
}

impl CertIssuer for FlakyCa {
    fn issue(&self, spec: &WorkloadSpec, ttl: Duration) -> Result<WorkloadCert, IdentityError> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        let remaining = self.failures.load(Ordering::SeqCst);
        if remaining > 0 {
            self.failures.store(remaining - 1, Ordering::SeqCst);
            return Err(IdentityError::Read {
                path: "/var/run/secrets/nodemesh-ca/ca.key".into(),
                source: io::Error::new(io::ErrorKind::NotFound, "CA secret not mounted yet"),
            });
        }
        self.ca.issue(spec, ttl)
    }
}

#[tokio::test]
async fn failed_renewal_keeps_the_valid_cert_and_retries_with_backoff() {
    let ca = MeshCa::generate(TD)
        .expect("ca")
        .with_clock_skew(Duration::ZERO);
    let workload = spec("shop", "api", "api");
    let store = Arc::new(CertStore::new());
    // Due for renewal within ~1 s, valid for ~2 s more than the retries below need.
    store
        .insert(ca.issue(&workload, Duration::from_secs(4)).expect("issue"))
        .expect("insert");
    let original = store.get(&workload.id).expect("original");
    let flaky = Arc::new(FlakyCa {
        ca,
        failures: AtomicUsize::new(4),
        attempts: Mutex::default(),
    });
    let mut changes = store.subscribe();
    changes.mark_unchanged();

    let config = RotationConfig {
        ttl: Duration::from_secs(3600),
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(300),
        },
    };
    let (stop, shutdown) = watch::channel(false);
    let task = spawn_rotation(
        flaky.clone(),
        store.clone(),
        workload.clone(),
        config,
        shutdown,
    );

    // While issuance fails, the original certificate stays in place.
    let deadline = Instant::now() + Duration::from_secs(4);
    while flaky
        .attempts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "rotation never attempted renewal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = store.get(&workload.id).expect("cert kept");
    assert!(
        Arc::ptr_eq(&held, &original),
        "failed renewals must not replace the cert"
    );
    assert!(held.is_valid_at(SystemTime::now()));

    next_change(&mut changes, Duration::from_secs(3)).await;
    let renewed = store.get(&workload.id).expect("renewed");
    assert_ne!(renewed.chain[0], original.chain[0]);
    assert!(renewed.not_after > original.not_after);
    assert!(
        !changes.has_changed().expect("store alive"),
        "exactly one swap"
    );

    let attempts = flaky
        .attempts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert_eq!(attempts.len(), 5, "4 failures then 1 success");
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    let expected = [100, 200, 300, 300].map(Duration::from_millis);
    for (gap, want) in gaps.iter().zip(expected) {
        assert!(
            *gap >= want && *gap < want + Duration::from_millis(250),
            "gaps {gaps:?}"
        );
    }

    stop.send(true).expect("rotation task alive");
    timeout(Duration::from_secs(1), task)
        .await
        .expect("stops on shutdown")
        .expect("no panic");
}

#[tokio::test]
async fn rotation_issues_at_once_when_the_store_is_empty_and_stops_when_the_sender_drops() {
    let ca = Arc::new(MeshCa::generate(TD).expect("ca"));
    let workload = spec("shop", "web", "web");
    let store = Arc::new(CertStore::new());
    let mut changes = store.subscribe();
    let (stop, shutdown) = watch::channel(false);
    let task = spawn_rotation(
        ca,
        store.clone(),
        workload.clone(),
        RotationConfig::default(),
        shutdown,
    );
    next_change(&mut changes, Duration::from_secs(2)).await;
    let cert = store.get(&workload.id).expect("issued");
    assert_eq!(
        cert.lifetime(),
        Duration::from_secs(24 * 3600 + 60),
        "default TTL + skew"
    );
    drop(stop);
    timeout(Duration::from_secs(1), task)
        .await
        .expect("stops")
        .expect("no panic");
}
